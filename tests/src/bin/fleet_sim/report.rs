//! The benchmark's result: one record, printed as an aligned table or as JSON.

use super::procfs::Memory;
use serde::Serialize;

const MIB: f64 = 1024.0;

/// Everything one run measured. Field names are the `--json` schema.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub workers: usize,
    pub heartbeat_ms: u64,
    pub window_s: f64,
    pub client_endpoints: usize,
    pub machine: Machine,
    /// Seconds to issue (or load) every worker certificate and build its TLS config.
    pub cert_setup_s: f64,
    /// Seconds from the first connection attempt until the coordinator reported all ready.
    pub ramp_s: f64,
    /// Coordinator memory with no worker connected, just after start.
    pub coordinator_idle: Memory,
    /// Coordinator memory at the end of the window.
    pub coordinator_end: Memory,
    /// Highest VmRSS sampled (once a second) during the window, KiB.
    pub coordinator_rss_max_in_window_kib: u64,
    /// Coordinator CPU over the window, in cores (1.0 = one core busy all the time).
    pub coordinator_cpu_cores: f64,
    /// The sim's own CPU over the window, in cores.
    pub sim_cpu_cores: f64,
    /// The whole machine's busy CPU over the window (every process), in cores.
    pub machine_busy_cores: f64,
    pub sim_end: Memory,
    pub heartbeats_sent_per_s: f64,
    pub acks_per_s: f64,
    pub ack_latency_p50_ms: Option<f64>,
    pub ack_latency_p99_ms: Option<f64>,
    pub ack_latency_max_ms: f64,
    /// Connection attempts that failed (or sessions that ended) during the window.
    pub failures_in_window: u64,
    /// Datagrams the kernel dropped on the coordinator's socket during the window.
    pub coordinator_udp_drops: u64,
    /// Datagrams the kernel dropped on the sim's sockets during the window.
    pub sim_udp_drops: u64,
    /// Workers the coordinator reported ready at the end of the window.
    pub ready_at_end: u32,
    pub lost_at_end: u32,
    pub coordinator_exit: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_total_kib: u64,
    pub kernel: String,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".into(), |(_, m)| m.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_total_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |k| k.trim().to_string());
        Self {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory_total_kib,
            kernel,
        }
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / MIB)
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2} ms"))
}

impl Report {
    /// Per-worker coordinator memory: RSS growth over idle divided by the worker count, KiB.
    pub fn rss_per_worker_kib(&self) -> f64 {
        (self.coordinator_end.vm_rss_kib as f64 - self.coordinator_idle.vm_rss_kib as f64)
            / self.workers.max(1) as f64
    }

    pub fn table(&self) -> String {
        let m = &self.machine;
        let rows: Vec<(&str, String)> = vec![
            ("workers", self.workers.to_string()),
            ("heartbeat interval", format!("{} ms", self.heartbeat_ms)),
            ("measurement window", format!("{:.1} s", self.window_s)),
            (
                "machine",
                format!(
                    "{} CPUs, {}, {}, kernel {}",
                    m.cpus,
                    m.cpu_model,
                    mib(m.memory_total_kib),
                    m.kernel
                ),
            ),
            ("certificate setup", format!("{:.1} s", self.cert_setup_s)),
            ("ramp to all ready", format!("{:.1} s", self.ramp_s)),
            (
                "coordinator CPU",
                format!("{:.3} cores", self.coordinator_cpu_cores),
            ),
            (
                "coordinator RSS (end)",
                format!(
                    "{} (anon {}, file {})",
                    mib(self.coordinator_end.vm_rss_kib),
                    mib(self.coordinator_end.rss_anon_kib),
                    mib(self.coordinator_end.rss_file_kib)
                ),
            ),
            (
                "coordinator RSS max in window",
                mib(self.coordinator_rss_max_in_window_kib),
            ),
            ("coordinator VmHWM", mib(self.coordinator_end.vm_hwm_kib)),
            (
                "coordinator RSS idle",
                mib(self.coordinator_idle.vm_rss_kib),
            ),
            (
                "coordinator RSS per worker",
                format!("{:.1} KiB", self.rss_per_worker_kib()),
            ),
            (
                "coordinator threads",
                self.coordinator_end.threads.to_string(),
            ),
            ("sim CPU", format!("{:.3} cores", self.sim_cpu_cores)),
            ("sim RSS", mib(self.sim_end.vm_rss_kib)),
            (
                "machine busy (all processes)",
                format!("{:.3} cores", self.machine_busy_cores),
            ),
            (
                "heartbeats sent / acked",
                format!(
                    "{:.0}/s / {:.0}/s",
                    self.heartbeats_sent_per_s, self.acks_per_s
                ),
            ),
            (
                "ack latency p50 / p99 / max",
                format!(
                    "{} / {} / {:.1} ms",
                    ms(self.ack_latency_p50_ms),
                    ms(self.ack_latency_p99_ms),
                    self.ack_latency_max_ms
                ),
            ),
            ("failures in window", self.failures_in_window.to_string()),
            (
                "UDP drops coordinator / sim",
                format!("{} / {}", self.coordinator_udp_drops, self.sim_udp_drops),
            ),
            (
                "ready / lost at end",
                format!("{} / {}", self.ready_at_end, self.lost_at_end),
            ),
            ("coordinator exit", self.coordinator_exit.clone()),
        ];
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }
}
