//! The machine's identity and cheap usage figures, read straight from procfs and syscalls.
//!
//! Owns: arch/kernel (`uname`), hostname, OS name (`os-release`), CPU count and model
//! (`/proc/stat`, `/proc/cpuinfo`, device tree), load (`/proc/loadavg`), memory (`/proc/meminfo`),
//! CPU time counters (`/proc/stat`) and disk figures (`statvfs`).
//! Every parser takes file contents so it can be tested with fixtures; the readers around them
//! never fail: an unreadable or odd file gives "unknown"/0 and a `debug!` line.

use std::fs;
use std::path::Path;

use drover_protocol::LoadAvg;
use tracing::debug;

/// Reads a small text file, logging why when it cannot.
pub(crate) fn read_text(path: &str) -> Option<String> {
    match fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(err) => {
            debug!(path, %err, "cannot read");
            None
        }
    }
}

/// `uname -m` and the kernel release.
pub(crate) fn uname() -> (String, String) {
    match nix::sys::utsname::uname() {
        Ok(u) => (
            u.machine().to_string_lossy().into_owned(),
            u.release().to_string_lossy().into_owned(),
        ),
        Err(err) => {
            debug!(%err, "uname failed");
            (std::env::consts::ARCH.to_owned(), "unknown".to_owned())
        }
    }
}

pub(crate) fn hostname() -> String {
    match nix::unistd::gethostname() {
        Ok(name) => name.to_string_lossy().into_owned(),
        Err(err) => {
            debug!(%err, "gethostname failed");
            "unknown".to_owned()
        }
    }
}

/// `PRETTY_NAME` from os-release, else "Linux".
pub(crate) fn os_name() -> String {
    ["/etc/os-release", "/usr/lib/os-release"]
        .into_iter()
        .filter_map(read_text)
        .find_map(|text| parse_os_release_pretty_name(&text))
        .unwrap_or_else(|| {
            debug!("no PRETTY_NAME in os-release");
            "Linux".to_owned()
        })
}

/// The `PRETTY_NAME` value of an os-release file, unquoted.
pub(crate) fn parse_os_release_pretty_name(text: &str) -> Option<String> {
    let value = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("PRETTY_NAME="))?
        .trim();
    let unquoted = match value.as_bytes().first() {
        Some(q @ (b'"' | b'\'')) if value.len() >= 2 && value.as_bytes()[value.len() - 1] == *q => {
            &value[1..value.len() - 1]
        }
        _ => value,
    };
    // os-release uses shell escapes inside double quotes: \" \\ \$ \`.
    let mut out = String::with_capacity(unquoted.len());
    let mut chars = unquoted.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The CPU model: "model name" (x86), else ARM's "Hardware"/"Model" lines, else the device-tree
/// model, else the decoded "CPU implementer"/"CPU part" lines, else "unknown".
pub(crate) fn cpu_model() -> String {
    let cpuinfo = read_text("/proc/cpuinfo").unwrap_or_default();
    let dt_model = read_text("/sys/firmware/devicetree/base/model")
        .or_else(|| read_text("/proc/device-tree/model"));
    parse_cpu_model(&cpuinfo, dt_model.as_deref()).unwrap_or_else(|| {
        debug!("no CPU model in /proc/cpuinfo or the device tree");
        "unknown".to_owned()
    })
}

pub(crate) fn parse_cpu_model(cpuinfo: &str, dt_model: Option<&str>) -> Option<String> {
    for key in ["model name", "Hardware", "Model"] {
        if let Some(v) = cpuinfo_value(cpuinfo, key) {
            return Some(v.to_owned());
        }
    }
    if let Some(m) = dt_model.map(|m| m.trim_end_matches('\0').trim()) {
        if !m.is_empty() {
            return Some(m.to_owned());
        }
    }
    arm_parts(cpuinfo)
}

/// First non-empty value of `key` in cpuinfo's `key<tabs>: value` lines.
fn cpuinfo_value<'a>(cpuinfo: &'a str, key: &str) -> Option<&'a str> {
    cpuinfo.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        let v = v.trim();
        (k.trim() == key && !v.is_empty()).then_some(v)
    })
}

/// Decodes the distinct (implementer, part) pairs, e.g. "ARM Cortex-A76 + ARM Cortex-A55".
fn arm_parts(cpuinfo: &str) -> Option<String> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut implementer: Option<String> = None;
    for line in cpuinfo.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k.trim() {
            "CPU implementer" => implementer = Some(v.trim().to_lowercase()),
            "CPU part" => {
                let pair = (
                    implementer.clone().unwrap_or_default(),
                    v.trim().to_lowercase(),
                );
                if !pairs.contains(&pair) {
                    pairs.push(pair);
                }
            }
            _ => {}
        }
    }
    if pairs.is_empty() {
        return None;
    }
    let names: Vec<String> = pairs
        .iter()
        .map(|(imp, part)| arm_part_name(imp, part))
        .collect();
    Some(names.join(" + "))
}

fn arm_part_name(implementer: &str, part: &str) -> String {
    let known = match (implementer, part) {
        ("0x41", "0xd03") => Some("ARM Cortex-A53"),
        ("0x41", "0xd04") => Some("ARM Cortex-A35"),
        ("0x41", "0xd05") => Some("ARM Cortex-A55"),
        ("0x41", "0xd07") => Some("ARM Cortex-A57"),
        ("0x41", "0xd08") => Some("ARM Cortex-A72"),
        ("0x41", "0xd09") => Some("ARM Cortex-A73"),
        ("0x41", "0xd0a") => Some("ARM Cortex-A75"),
        ("0x41", "0xd0b") => Some("ARM Cortex-A76"),
        ("0x41", "0xd0c") => Some("ARM Neoverse-N1"),
        ("0x41", "0xd0d") => Some("ARM Cortex-A77"),
        ("0x41", "0xd40") => Some("ARM Neoverse-V1"),
        ("0x41", "0xd41") => Some("ARM Cortex-A78"),
        ("0x41", "0xd42") => Some("ARM Cortex-A78AE"),
        ("0x41", "0xd44") => Some("ARM Cortex-X1"),
        ("0x41", "0xd46") => Some("ARM Cortex-A510"),
        ("0x41", "0xd47") => Some("ARM Cortex-A710"),
        ("0x41", "0xd49") => Some("ARM Neoverse-N2"),
        ("0x41", "0xd4f") => Some("ARM Neoverse-V2"),
        ("0x41", "0xd4b") => Some("ARM Cortex-A78C"),
        ("0x4e", "0x004") => Some("NVIDIA Carmel"),
        ("0x61", _) => Some("Apple"),
        _ => None,
    };
    match known {
        Some(name) => name.to_owned(),
        None => format!("ARM implementer {implementer} part {part}"),
    }
}

/// Counters from the first (`cpu `) line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CpuTimes {
    pub total: u64,
    /// idle + iowait.
    pub idle: u64,
}

impl CpuTimes {
    pub(crate) fn read() -> Option<CpuTimes> {
        parse_proc_stat_cpu(&read_text("/proc/stat")?)
    }

    /// Busy share of the time between `earlier` and `self`, 0-100; 0 when no time passed.
    pub(crate) fn percent_since(self, earlier: CpuTimes) -> f32 {
        let total = self.total.saturating_sub(earlier.total);
        let idle = self.idle.saturating_sub(earlier.idle).min(total);
        if total == 0 {
            return 0.0;
        }
        let pct = (total - idle) as f64 * 100.0 / total as f64;
        pct.clamp(0.0, 100.0) as f32
    }
}

pub(crate) fn parse_proc_stat_cpu(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is already
    // counted in user/nice, so only the first eight add up to the total.
    let total = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some(CpuTimes { total, idle })
}

/// Online logical CPUs: the `cpuN` lines of /proc/stat.
pub(crate) fn parse_proc_stat_cpu_count(text: &str) -> u32 {
    text.lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .and_then(|rest| rest.split(char::is_whitespace).next())
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .count() as u32
}

pub(crate) fn cpu_count() -> u32 {
    let from_stat = read_text("/proc/stat")
        .map(|t| parse_proc_stat_cpu_count(&t))
        .unwrap_or(0);
    if from_stat > 0 {
        return from_stat;
    }
    debug!("no cpuN lines in /proc/stat; using available_parallelism");
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

pub(crate) fn load() -> LoadAvg {
    read_text("/proc/loadavg")
        .and_then(|t| parse_loadavg(&t))
        .unwrap_or_else(|| {
            debug!("no load averages from /proc/loadavg");
            LoadAvg::default()
        })
}

pub(crate) fn parse_loadavg(text: &str) -> Option<LoadAvg> {
    let mut it = text.split_whitespace().map(|f| f.parse::<f32>().ok());
    Some(LoadAvg {
        one: it.next()??,
        five: it.next()??,
        fifteen: it.next()??,
    })
}

/// Total and available memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Memory {
    pub total: u64,
    pub available: u64,
}

pub(crate) fn memory() -> Memory {
    read_text("/proc/meminfo")
        .and_then(|t| parse_meminfo(&t))
        .unwrap_or_else(|| {
            debug!("no memory figures from /proc/meminfo");
            Memory::default()
        })
}

pub(crate) fn parse_meminfo(text: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        text.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            if k != name {
                return None;
            }
            let mut parts = v.split_whitespace();
            let n: u64 = parts.next()?.parse().ok()?;
            Some(match parts.next() {
                Some("kB") => n * 1024,
                _ => n,
            })
        })
    };
    let total = field("MemTotal")?;
    // MemAvailable exists since Linux 3.14; before it, free + page cache is the usual estimate.
    let available = field("MemAvailable").unwrap_or_else(|| {
        field("MemFree").unwrap_or(0) + field("Buffers").unwrap_or(0) + field("Cached").unwrap_or(0)
    });
    Some(Memory {
        total,
        available: available.min(total),
    })
}

/// Total and free (available to unprivileged users) bytes of the filesystem holding `path`, or of
/// its nearest existing ancestor when `path` does not exist yet.
pub(crate) fn disk(path: &Path) -> (u64, u64) {
    // A relative path's last ancestor is "", which stands for the current directory.
    let existing = path
        .ancestors()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .find(|p| p.exists());
    let Some(existing) = existing else {
        debug!(path = %path.display(), "no existing ancestor for disk figures");
        return (0, 0);
    };
    match nix::sys::statvfs::statvfs(existing) {
        // c_ulong and fsblkcnt_t are u32 on some 32-bit targets (armhf): keep the conversions.
        #[allow(clippy::useless_conversion)]
        Ok(st) => {
            let frsize = u64::from(st.fragment_size());
            (
                u64::from(st.blocks()).saturating_mul(frsize),
                u64::from(st.blocks_available()).saturating_mul(frsize),
            )
        }
        Err(err) => {
            debug!(path = %existing.display(), %err, "statvfs failed");
            (0, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_pretty_name() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n";
        assert_eq!(
            parse_os_release_pretty_name(text).as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(
            parse_os_release_pretty_name("PRETTY_NAME=Alpine\n").as_deref(),
            Some("Alpine")
        );
        assert_eq!(
            parse_os_release_pretty_name("PRETTY_NAME='A \\\"b\\\"'").as_deref(),
            Some("A \"b\"")
        );
        assert_eq!(parse_os_release_pretty_name("NAME=x\n"), None);
        assert_eq!(parse_os_release_pretty_name("PRETTY_NAME=\"\"\n"), None);
    }

    #[test]
    fn cpu_model_x86() {
        let text =
            "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n";
        assert_eq!(parse_cpu_model(text, None).as_deref(), Some("AMD EPYC"));
    }

    #[test]
    fn cpu_model_raspberry_pi_hardware_then_model() {
        let text = "processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n\n\
                    Hardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n";
        assert_eq!(parse_cpu_model(text, None).as_deref(), Some("BCM2835"));
        let no_hw = text.replace("Hardware\t: BCM2835\n", "");
        assert_eq!(
            parse_cpu_model(&no_hw, None).as_deref(),
            Some("Raspberry Pi 4 Model B Rev 1.4")
        );
    }

    #[test]
    fn cpu_model_arm_device_tree_then_parts() {
        let text = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd05\n\n\
                    processor\t: 4\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n\n\
                    processor\t: 5\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n";
        assert_eq!(
            parse_cpu_model(text, Some("Radxa ROCK 5B\0")).as_deref(),
            Some("Radxa ROCK 5B")
        );
        assert_eq!(
            parse_cpu_model(text, Some("\0")).as_deref(),
            Some("ARM Cortex-A55 + ARM Cortex-A76")
        );
        assert_eq!(
            parse_cpu_model("CPU implementer : 0x51\nCPU part : 0x802\n", None).as_deref(),
            Some("ARM implementer 0x51 part 0x802")
        );
        assert_eq!(parse_cpu_model("processor : 0\n", None), None);
    }

    const STAT: &str = "cpu  38383 0 4373 53207 438 0 21 37 5 0\n\
                        cpu0 18963 0 1992 27139 112 0 3 14 0 0\n\
                        cpu1 19419 0 2381 26068 325 0 17 22 0 0\n\
                        intr 1234 0 0\nctxt 99\ncpu_freq_not_a_cpu 1\n";

    #[test]
    fn proc_stat_cpu_times_and_count() {
        let t = parse_proc_stat_cpu(STAT).expect("cpu line");
        assert_eq!(t.total, 38383 + 4373 + 53207 + 438 + 21 + 37);
        assert_eq!(t.idle, 53207 + 438);
        assert_eq!(parse_proc_stat_cpu_count(STAT), 2);
        assert_eq!(parse_proc_stat_cpu("cpu  1 2\n"), None);
        assert_eq!(parse_proc_stat_cpu("garbage"), None);
    }

    #[test]
    fn cpu_percent_between_samples() {
        let a = CpuTimes {
            total: 1000,
            idle: 800,
        };
        let b = CpuTimes {
            total: 1100,
            idle: 825,
        };
        assert!((b.percent_since(a) - 75.0).abs() < 1e-4);
        assert_eq!(a.percent_since(a), 0.0);
        // Counters going backwards (e.g. a CPU taken offline) never give a value out of range.
        assert_eq!(a.percent_since(b), 0.0);
    }

    #[test]
    fn loadavg() {
        let l = parse_loadavg("0.56 0.75 0.40 1/84 7633\n").expect("loadavg");
        assert_eq!((l.one, l.five, l.fifteen), (0.56, 0.75, 0.40));
        assert_eq!(parse_loadavg("0.5 x"), None);
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:        4028536 kB\nMemFree:          123456 kB\nMemAvailable:    3000000 kB\nBuffers: 1 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some(Memory {
                total: 4028536 * 1024,
                available: 3000000 * 1024
            })
        );
        let old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 200 kB\n";
        assert_eq!(
            parse_meminfo(old),
            Some(Memory {
                total: 1000 * 1024,
                available: 310 * 1024
            })
        );
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn disk_of_missing_dir_uses_ancestor() {
        let (total, free) = disk(Path::new("/tmp/drover-does-not-exist/a/b"));
        assert!(total > 0);
        assert!(free <= total);
        assert!(!Path::new("/tmp/drover-does-not-exist").exists());
    }
}
