//! The bare loops beside `throughput`: the no-op run by tests/bench/bare_noop.c with nothing
//! scheduling, logging or streaming it — only what a system must do per attempt to run it
//! the way issue 4 asks (see the C file's header for each level). Their rate is what this
//! machine allows such a system at most, measured in the same run as drover and HyperQueue.
//!
//! `2 × nproc` loops run at once, each its share of the tasks one after another, so every
//! core stays busy even while a loop waits (in `waitpid`, or for the kernel's cgroup lock). The
//! clock runs from before the first loop starts to the last one's end; the machine's CPU
//! over the same window.

use super::common;
use super::throughput::{Noop, RunResult};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::Instant;

/// The loops' source; see its header.
const BARE_NOOP_C: &str = include_str!("../../../bench/bare_noop.c");

/// What each attempt gets in a bare loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// fork, exec, wait.
    Plain,
    /// Plus the attempt's own cgroup with its limits, read and removed after.
    Cgroup,
    /// Plus the namespaces, a private /tmp and no_new_privs.
    Sandbox,
}

impl Level {
    /// The system's name in `--systems` and in the results.
    fn system(self) -> &'static str {
        match self {
            Level::Plain => "bare",
            Level::Cgroup => "bare-cgroup",
            Level::Sandbox => "bare-sandbox",
        }
    }

    /// The level's name for bare_noop.c.
    fn arg(self) -> &'static str {
        match self {
            Level::Plain => "plain",
            Level::Cgroup => "cgroup",
            Level::Sandbox => "sandbox",
        }
    }
}

/// Builds the loops' program (see [`common::build_c`]).
pub fn build() -> Result<(tempfile::TempDir, std::path::PathBuf)> {
    common::build_c(
        BARE_NOOP_C,
        "bare_noop.c",
        "bare_noop",
        &["-O2"],
        "leave the bare systems out of --systems",
    )
}

/// Runs `tasks` no-ops over `2 × nproc` loops of `exe` at `level`.
pub fn run(exe: &Path, level: Level, noop: &Noop, tasks: usize) -> Result<RunResult> {
    if level != Level::Plain && !nix::unistd::geteuid().is_root() {
        bail!(
            "{} makes cgroups and namespaces, which needs root; run task-bench as root \
             or leave it out of --systems",
            level.system()
        );
    }
    let nproc = common::Machine::detect().nproc;
    let loops = (2 * nproc).clamp(1, tasks.max(1));
    let cpu0 = common::MachineCpu::take();
    let start = Instant::now();
    let mut children = Vec::with_capacity(loops);
    for k in 0..loops {
        let share = tasks / loops + usize::from(k < tasks % loops);
        let child = std::process::Command::new(exe)
            .arg(level.arg())
            .arg(share.to_string())
            .arg(&noop.program)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        children.push(child);
    }
    let mut outputs = Vec::with_capacity(loops);
    for child in children {
        outputs.push(
            child
                .wait_with_output()
                .context("waiting for a bare loop")?,
        );
    }
    let total_s = start.elapsed().as_secs_f64();
    let cpu1 = common::MachineCpu::take();
    let mut done = 0usize;
    for out in &outputs {
        if !out.status.success() {
            bail!(
                "a {} loop failed ({}): {}",
                level.system(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let line: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("a bare loop printed no JSON result")?;
        done += line["tasks"].as_u64().unwrap_or(0) as usize;
    }
    if done != tasks {
        bail!("the {} loops ran {done} tasks, not {tasks}", level.system());
    }
    Ok(RunResult {
        system: level.system().into(),
        noop: noop.name.into(),
        tasks,
        submit_s: 0.0,
        total_s,
        tasks_per_s: tasks as f64 / total_s,
        failed: 0,
        machine_busy_cores: cpu1.busy_cores_since(&cpu0, nproc),
        machine_cpu_ms_per_task: cpu1.busy_seconds_since(&cpu0) * 1000.0 / tasks as f64,
        coordinator_cpu_ms_per_task: None,
        worker_cpu_ms_per_task: None,
    })
}

/// What a goal of `factor` × HyperQueue leaves drover per task, given a bare loop's cost:
/// the CPU per task the goal's rate allows with every core busy, less the bare loop's own
/// CPU per task (ms; negative: the goal is past the bare loop's ceiling).
pub fn budget_ms(nproc: usize, hq_tasks_per_s: f64, factor: f64, bare_cpu_ms: f64) -> f64 {
    nproc as f64 * 1000.0 / (factor * hq_tasks_per_s) - bare_cpu_ms
}

#[cfg(test)]
mod tests {
    use super::budget_ms;

    #[test]
    fn budget_is_what_the_goal_rate_allows_less_the_bare_cost() {
        // 2 cores, HyperQueue 500/s: 2× is 1,000/s, 2 ms of CPU per task; bare costs 1.5.
        assert!((budget_ms(2, 500.0, 2.0, 1.5) - 0.5).abs() < 1e-9);
        // Past the ceiling: the bare loop alone needs more than the goal's rate allows.
        assert!(budget_ms(2, 800.0, 2.0, 1.5) < 0.0);
    }
}
