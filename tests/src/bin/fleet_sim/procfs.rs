//! What the benchmark reads from /proc: a process's CPU time and memory, the whole machine's
//! CPU time, and per-socket UDP drop counters.

use anyhow::{bail, Context, Result};
use std::time::Instant;

/// Clock ticks per second for /proc CPU counters.
pub fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// CPU time a process used (user + system), in clock ticks, from `/proc/<pid>/stat`.
pub fn cpu_ticks(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name is in parentheses and may contain spaces: count fields after it.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path}: no ')' after the command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `rest` starts at field 3 (state).
    let get = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {} missing", i + 3))
    };
    Ok(get(11)? + get(12)?)
}

/// Memory figures of a process from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Memory {
    pub vm_rss_kib: u64,
    pub vm_hwm_kib: u64,
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
    pub threads: u64,
}

pub fn memory(pid: &str) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut m = Memory::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let num = || {
            value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match key {
            "VmRSS" => m.vm_rss_kib = num(),
            "VmHWM" => m.vm_hwm_kib = num(),
            "RssAnon" => m.rss_anon_kib = num(),
            "RssFile" => m.rss_file_kib = num(),
            "Threads" => m.threads = num(),
            _ => {}
        }
    }
    if m.vm_rss_kib == 0 {
        bail!("{path}: no VmRSS line (has the process exited?)");
    }
    Ok(m)
}

/// The whole machine's busy CPU time from the `cpu` line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    pub busy: u64,
}

pub fn machine_cpu() -> Result<MachineCpu> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok(MachineCpu {
        busy: total.saturating_sub(idle),
    })
}

/// Packets the kernel dropped on the UDP sockets bound to these local ports (the `drops`
/// column of /proc/net/udp and /proc/net/udp6), summed.
pub fn udp_drops(ports: &[u16]) -> u64 {
    let mut sum = 0;
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if port.is_some_and(|p| ports.contains(&p)) {
                sum += f.last().and_then(|d| d.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    sum
}

/// CPU counters of one process and the machine at one instant.
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    pub at: Instant,
    pub process: u64,
    pub machine: MachineCpu,
}

impl CpuSnapshot {
    pub fn take(pid: &str) -> Result<Self> {
        Ok(Self {
            at: Instant::now(),
            process: cpu_ticks(pid)?,
            machine: machine_cpu()?,
        })
    }

    /// Cores the process used on average since `earlier` (1.0 = one core fully busy).
    pub fn cores_since(&self, earlier: &Self, ticks: f64) -> f64 {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        (self.process.saturating_sub(earlier.process)) as f64 / ticks / wall
    }

    /// Cores the whole machine was busy on average since `earlier`.
    pub fn machine_cores_since(&self, earlier: &Self, ticks: f64) -> f64 {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        (self.machine.busy.saturating_sub(earlier.machine.busy)) as f64 / ticks / wall
    }
}
