//! What every `task-bench` measurement shares: a fleet of the real release binaries, the
//! operator client the CLI uses, task specs, session reads, percentiles and machine facts.

use anyhow::{bail, Context, Result};
use drover::cli::client::OperatorClient;
use drover::cli::settings::Resolved;
use drover_protocol::identity::COORDINATOR_SERVER_NAME;
use drover_protocol::task::{Isolation, Requirements, SessionEvent, TaskSpec};
use drover_protocol::{OperatorRequest, OperatorResponse};
use drover_tests::TestFleet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME), comparable with `date +%s%N` on the
/// same host.
pub fn realtime_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Point the harness at the release binaries next to this one (or `dir`), checking they exist.
pub fn use_binaries(dir: Option<&Path>) -> Result<PathBuf> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::current_exe()
            .context("locating this binary")?
            .parent()
            .context("this binary has no directory")?
            .to_path_buf(),
    };
    for name in ["drover", "drover-worker"] {
        if !dir.join(name).is_file() {
            bail!(
                "no {name} in {}; build the release binaries first \
                 (`cargo build --release -p drover-coordinator -p drover-worker-agent -p drover-tests`) \
                 or pass --bin-dir",
                dir.display()
            );
        }
    }
    // Read by the harness's `bin_dir`; set before any thread exists.
    std::env::set_var("DROVER_BIN_DIR", &dir);
    Ok(dir)
}

/// A coordinator and `workers` real workers (`w1`..), started and ready. Heartbeats every
/// second, lease 10 s: the defaults of a real deployment, not the tests' fast ones.
pub fn start_fleet(workers: usize) -> TestFleet {
    let mut fleet = TestFleet::builder()
        .workers(workers)
        .heartbeat_interval_ms(1000)
        .lease_ms(10_000)
        .build();
    fleet.start_coordinator_and_wait();
    fleet.start_all_workers();
    fleet.wait_all_ready();
    fleet
}

/// The settings the CLI would resolve for the fleet's operator certificate.
pub fn operator_settings(fleet: &TestFleet) -> Resolved {
    let paths = fleet.cert_paths("operator");
    Resolved {
        coordinator: fleet.addr(),
        server_name: COORDINATOR_SERVER_NAME.into(),
        ca: fleet.ca_cert(),
        cert: paths.cert,
        key: paths.key,
    }
}

pub async fn connect(s: &Resolved) -> Result<OperatorClient> {
    OperatorClient::connect(s)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the coordinator: {}", e.message))
}

/// A task spec running `argv` with `isolation`, reserving `cpus`, no retries.
pub fn spec(name: &str, argv: &[&str], isolation: Isolation, cpus: u32) -> TaskSpec {
    let mut spec: TaskSpec = serde_json::from_value(serde_json::json!({
        "name": name,
        "command": argv,
        "retry": { "max_attempts": 1, "backoff_ms": 0 },
    }))
    .expect("a valid spec");
    spec.isolation = isolation;
    spec.requirements = Requirements {
        cpus,
        ..Requirements::default()
    };
    spec
}

/// Submit and return the task id.
pub async fn submit(client: &mut OperatorClient, spec: TaskSpec) -> Result<String> {
    match request(client, OperatorRequest::Submit { spec }).await? {
        OperatorResponse::Submitted { id } => Ok(id),
        other => bail!("unexpected answer to submit: {other:?}"),
    }
}

pub async fn request(
    client: &mut OperatorClient,
    req: OperatorRequest,
) -> Result<OperatorResponse> {
    match client.request(&req).await {
        Ok(OperatorResponse::Error { kind, message }) => bail!("{kind:?}: {message}"),
        Ok(r) => Ok(r),
        Err(e) => bail!("{}", e.message),
    }
}

/// The whole session of `id` (in pages of 1,000).
pub async fn session(client: &mut OperatorClient, id: &str) -> Result<Vec<SessionEvent>> {
    let mut all = Vec::new();
    loop {
        let req = OperatorRequest::Events {
            id: id.to_owned(),
            from: all.len() as u64,
            to: None,
            limit: 1000,
        };
        match request(client, req).await? {
            OperatorResponse::Events { events, len } => {
                let done = events.is_empty() || all.len() + events.len() >= len as usize;
                all.extend(events);
                if done {
                    return Ok(all);
                }
            }
            other => bail!("unexpected answer to events: {other:?}"),
        }
    }
}

/// Poll the session of `id` every `every` until it has a `completed` event (at most
/// `deadline`); returns the session.
pub async fn wait_completed(
    client: &mut OperatorClient,
    id: &str,
    every: Duration,
    deadline: Duration,
) -> Result<Vec<SessionEvent>> {
    let start = Instant::now();
    loop {
        let events = session(client, id).await?;
        if events.iter().any(|e| e.kind == "completed") {
            return Ok(events);
        }
        if start.elapsed() > deadline {
            bail!(
                "task {id} did not complete within {deadline:?}; last events: {:?}",
                events.iter().rev().take(3).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(every).await;
    }
}

/// The `state` of a session's `completed` event.
pub fn completed_state(events: &[SessionEvent]) -> Option<(String, u64)> {
    let e = events.iter().find(|e| e.kind == "completed")?;
    let v: serde_json::Value = serde_json::from_str(&e.payload).ok()?;
    Some((v.get("state")?.as_str()?.to_owned(), e.ts_ms))
}

/// Everything the task wrote to stdout.
pub fn stdout_of(events: &[SessionEvent]) -> String {
    events
        .iter()
        .filter(|e| e.kind == "stdout")
        .filter_map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.payload).ok()?;
            Some(v.get("data")?.as_str()?.to_owned())
        })
        .collect()
}

/// The `q` quantile (0..=1, nearest rank) of sorted `xs`.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let rank = ((xs.len() as f64) * q).ceil().max(1.0) as usize;
    xs[rank.min(xs.len()) - 1]
}

pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// p50/p90/p99/max/mean of a sample, in its own unit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    pub fn of(mut xs: Vec<f64>) -> Self {
        xs.sort_by(f64::total_cmp);
        Self {
            n: xs.len(),
            p50: quantile(&xs, 0.5),
            p90: quantile(&xs, 0.9),
            p99: quantile(&xs, 0.99),
            max: xs.last().copied().unwrap_or(f64::NAN),
            mean: mean(&xs),
        }
    }

    pub fn line(&self, unit: &str) -> String {
        format!(
            "p50 {:.2} {unit}, p90 {:.2}, p99 {:.2}, max {:.2}, mean {:.2} (n = {})",
            self.p50, self.p90, self.p99, self.max, self.mean, self.n
        )
    }
}

/// The machine and how busy it is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub loadavg: String,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            loadavg: loadavg(),
        }
    }
}

/// `/proc/loadavg`'s first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Busy and total jiffies of the whole machine (`/proc/stat`), to tell how busy it was over
/// a window — including other people's builds.
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    pub fn take() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        Self {
            busy: total - idle,
            total,
        }
    }

    /// Cores busy on average since `earlier` (out of `nproc`).
    pub fn busy_cores_since(&self, earlier: &Self, nproc: usize) -> f64 {
        let total = (self.total - earlier.total).max(1) as f64;
        (self.busy - earlier.busy) as f64 / total * nproc as f64
    }

    /// CPU seconds the whole machine spent since `earlier`.
    pub fn busy_seconds_since(&self, earlier: &Self) -> f64 {
        (self.busy - earlier.busy) as f64 / clock_ticks()
    }
}

/// The coordinator's pid, found by its config path on the command line.
pub fn coordinator_pid(config: &std::path::Path) -> Option<String> {
    pid_by_cmdline(&["serve", &config.to_string_lossy()])
}

/// The pid of the process whose command line contains every one of `needles`.
pub fn pid_by_cmdline(needles: &[&str]) -> Option<String> {
    pids_by_cmdline(needles).into_iter().next()
}

/// Every pid whose command line contains all of `needles`, lowest first (a worker and the
/// spawner it forked share one).
pub fn pids_by_cmdline(needles: &[&str]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            needles.iter().all(|n| cmd.contains(n)).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids.into_iter().map(|p| p.to_string()).collect()
}

/// utime + stime of `pid`, in clock ticks.
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// Builds a C program shipped with the bench (`source`, its text, saved as `file`) with the
/// system C compiler (`cc`) into a fresh directory under /var/tmp: a sandboxed task sees the
/// host's tree read-only but a /tmp of its own, so a program it runs cannot live under /tmp.
/// The directory and the program are readable and runnable by every user (a task's user may
/// be another); both go when the returned guard drops. `instead`: what the user can do
/// without a compiler, for the error.
pub fn build_c(
    source: &str,
    file: &str,
    exe_name: &str,
    flags: &[&str],
    instead: &str,
) -> Result<(tempfile::TempDir, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("drover-task-bench-")
        .tempdir_in("/var/tmp")
        .with_context(|| format!("making a directory for {file} under /var/tmp"))?;
    let everyone = || std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(dir.path(), everyone())
        .with_context(|| format!("opening the directory of {file} to every user"))?;
    let src = dir.path().join(file);
    let exe = dir.path().join(exe_name);
    std::fs::write(&src, source).with_context(|| format!("writing {}", src.display()))?;
    let out = std::process::Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .with_context(|| {
            format!(
                "running the C compiler `cc` for tests/bench/{file} (install gcc, or {instead})"
            )
        })?;
    if !out.status.success() {
        bail!(
            "building tests/bench/{file} failed ({}): {}\n\
             (it needs a C compiler for this machine as `cc`; or {instead})",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::set_permissions(&exe, everyone())
        .with_context(|| format!("opening {} to every user", exe.display()))?;
    Ok((dir, exe))
}
