//! The worker's view of its host: what it has ([`ResourceReport`], sent at registration) and how
//! busy it is ([`Usage`], sent with each heartbeat).
//!
//! [`Resources::detect`] probes once at start-up what cannot change while the worker runs (arch,
//! OS, CPUs, GPUs, cgroup version, namespace support, labels); [`Resources::report`] and
//! [`Resources::usage`] then only read a few small `/proc` files and make one `statvfs` call, so
//! heartbeats stay cheap and the daemon stays small (no sysinfo process tables).
//! Detection never fails: what cannot be found degrades to "unknown", 0 or `None`, with a
//! `debug!` line saying why.
//!
//! Submodules: `system` (procfs/uname figures), `gpu` (GPU discovery), `host` (cgroups,
//! namespaces, programs on `PATH`).

mod gpu;
pub(crate) mod host;
mod system;

use std::path::{Path, PathBuf};

use drover_protocol::{CgroupVersion, Gpu, ResourceReport, Usage};
use tracing::debug;

use system::CpuTimes;

/// Label added when a Chromium-family browser is on `PATH`.
pub const LABEL_BROWSER: &str = "browser";
/// Label added when at least one GPU is found.
pub const LABEL_GPU: &str = "gpu";

/// Detects once at start-up what cannot change while running; samples usage cheaply after.
#[derive(Debug, Clone)]
pub struct Resources {
    work_dir: PathBuf,
    arch: String,
    os: String,
    kernel: String,
    hostname: String,
    cpu_count: u32,
    cpu_model: String,
    gpus: Vec<Gpu>,
    cgroup: CgroupVersion,
    namespaces: bool,
    labels: Vec<String>,
    /// CPU counters at the previous [`Resources::usage`] call (or at detection).
    last_cpu: Option<CpuTimes>,
}

impl Resources {
    /// `work_dir`: the worker's work directory (disk figures are for the filesystem holding it; create nothing).
    /// `config_labels`: labels from the worker's config.
    ///
    /// Takes a few milliseconds: it forks two short-lived children (a namespace probe, and
    /// `nvidia-smi` only on hosts that have it but no NVIDIA procfs files).
    pub fn detect(work_dir: &Path, config_labels: &[String]) -> Resources {
        let (arch, kernel) = system::uname();
        let gpus = gpu::detect();
        let mut detected = Vec::new();
        if host::has_browser() {
            detected.push(LABEL_BROWSER);
        }
        if !gpus.is_empty() {
            detected.push(LABEL_GPU);
        }
        let resources = Resources {
            work_dir: work_dir.to_path_buf(),
            arch,
            os: system::os_name(),
            kernel,
            hostname: system::hostname(),
            cpu_count: system::cpu_count(),
            cpu_model: system::cpu_model(),
            gpus,
            cgroup: host::cgroup_version(),
            namespaces: host::can_create_namespaces(),
            labels: merge_labels(config_labels, &detected),
            last_cpu: CpuTimes::read(),
        };
        debug!(?resources, "resources detected");
        resources
    }

    /// The full report sent at registration (fresh memory/disk/load figures each call).
    pub fn report(&mut self) -> ResourceReport {
        let memory = system::memory();
        let (disk_total_bytes, disk_free_bytes) = system::disk(&self.work_dir);
        ResourceReport {
            arch: self.arch.clone(),
            os: self.os.clone(),
            kernel: self.kernel.clone(),
            hostname: self.hostname.clone(),
            cpu_count: self.cpu_count,
            cpu_model: self.cpu_model.clone(),
            load: system::load(),
            memory_total_bytes: memory.total,
            memory_available_bytes: memory.available,
            work_dir: self.work_dir.display().to_string(),
            disk_total_bytes,
            disk_free_bytes,
            gpus: self.gpus.clone(),
            cgroup: self.cgroup,
            namespaces: self.namespaces,
            labels: self.labels.clone(),
        }
    }

    /// Current usage for a heartbeat: load, CPU % since the previous call (whole machine, 0-100), memory available, disk free.
    ///
    /// The first call measures since [`Resources::detect`].
    pub fn usage(&mut self) -> Usage {
        let now = CpuTimes::read();
        let cpu_percent = match (now, self.last_cpu) {
            (Some(now), Some(before)) => now.percent_since(before),
            _ => 0.0,
        };
        if now.is_some() {
            self.last_cpu = now;
        }
        Usage {
            load: system::load(),
            cpu_percent,
            memory_available_bytes: system::memory().available,
            disk_free_bytes: system::disk(&self.work_dir).1,
        }
    }
}

/// Config labels plus detected ones, sorted and unique; empty labels are dropped.
fn merge_labels(config: &[String], detected: &[&str]) -> Vec<String> {
    let mut labels: Vec<String> = config
        .iter()
        .map(String::as_str)
        .chain(detected.iter().copied())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    labels.sort();
    labels.dedup();
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_sorted_and_unique() {
        let config = vec![
            "zeta".to_owned(),
            "gpu".to_owned(),
            "".to_owned(),
            "alpha".to_owned(),
        ];
        assert_eq!(
            merge_labels(&config, &[LABEL_GPU, LABEL_BROWSER]),
            ["alpha", "browser", "gpu", "zeta"]
        );
        assert!(merge_labels(&[], &[]).is_empty());
    }

    #[test]
    fn resources_on_this_machine() {
        let mut resources = Resources::detect(Path::new("/tmp"), &["x".into()]);
        let report = resources.report();
        println!("{report:#?}");
        assert_eq!(report.arch, std::env::consts::ARCH);
        assert!(report.cpu_count >= 1);
        assert!(report.memory_total_bytes > 0);
        assert!(report.memory_available_bytes <= report.memory_total_bytes);
        assert!(report.disk_total_bytes > 0);
        assert!(report.labels.contains(&"x".to_owned()));
        assert_eq!(report.work_dir, "/tmp");
        assert_eq!(
            report.labels.contains(&LABEL_GPU.to_owned()),
            !report.gpus.is_empty()
        );

        // Burn a little CPU so the second sample has ticks to measure.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        for _ in 0..2 {
            let usage = resources.usage();
            println!("{usage:?}");
            assert!((0.0..=100.0).contains(&usage.cpu_percent), "{usage:?}");
            assert!(usage.memory_available_bytes > 0);
        }
    }
}
