//! No-op task throughput: N no-op tasks submitted at once, time until every one completed —
//! drover with the full sandbox, drover with `isolation = "process"`, and HyperQueue
//! (tests/bench/hq_noop.py), interleaved round by round so a noisy machine hits all three alike.
//!
//! Fairness: one drover worker on this machine reports its cores (`nproc`), and every drover
//! task reserves one CPU, so at most `nproc` run at once; the HyperQueue worker gets the same
//! core count and each of its tasks asks for one core (its default). Each run starts a fresh
//! coordinator and worker (or HyperQueue server and worker); start-up is not timed.
//!
//! drover's clock: from CLOCK_REALTIME right before the first submit to the latest
//! `completed` event's timestamp (milliseconds, written by the coordinator on this host).
//! Submitters: `--submitters` operator connections submit their share of the N tasks
//! concurrently, each one request at a time (drover has no batch submit; HyperQueue submits
//! one job of N tasks in a single request). During the run the bench reads only the last
//! task's session, every 50 ms; every session is checked once that one has completed.
//!
//! The no-op is `true` unless `--noop static` names the static one (tests/bench/stamp.c built
//! with `-DNOOP`: it only exits). On the build machines `true` costs about 1 ms of CPU per
//! exec (glibc's start-up; see stamp.c), which both systems pay; the static one shows each
//! system's own cost per task without it.

use super::common;
use anyhow::{bail, Context, Result};
use drover_protocol::task::Isolation;
use std::path::Path;
use std::time::Duration;

/// The no-op every task of a run runs.
#[derive(Debug, Clone)]
pub struct Noop {
    /// `true` or `static`.
    pub name: &'static str,
    /// The program's path or name.
    pub program: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    pub system: String,
    /// The no-op every task ran (`true` or `static`).
    pub noop: String,
    pub tasks: usize,
    /// Start → last submit acknowledged (drover) or job submitted (HyperQueue), seconds.
    pub submit_s: f64,
    /// Start → every task completed, seconds.
    pub total_s: f64,
    pub tasks_per_s: f64,
    /// Tasks that did not succeed.
    pub failed: usize,
    /// Cores busy on the whole machine during the run (all processes, out of `nproc`).
    pub machine_busy_cores: f64,
    /// The whole machine's CPU over the run (every process's, other tenants' included) per
    /// task, milliseconds: the window is the one of `machine_busy_cores`.
    pub machine_cpu_ms_per_task: f64,
    /// CPU time of drover's coordinator and worker processes (the worker with its spawner; the
    /// tasks and sandbox helpers not included) per task, milliseconds.
    pub coordinator_cpu_ms_per_task: Option<f64>,
    pub worker_cpu_ms_per_task: Option<f64>,
}

pub async fn drover_run(
    noop: &Noop,
    fleet: &drover_tests::TestFleet,
    isolation: Isolation,
    tasks: usize,
    submitters: usize,
) -> Result<RunResult> {
    let settings = &common::operator_settings(fleet);
    let mut clients = Vec::new();
    for _ in 0..submitters {
        clients.push(common::connect(settings).await?);
    }
    // The worker's figure counts its spawner too (a process of its own that forks every
    // attempt; same command line), so moving work there moves none out of the count.
    let pids = [
        common::coordinator_pid(&fleet.coordinator_config())
            .into_iter()
            .collect::<Vec<_>>(),
        common::pids_by_cmdline(&[
            "drover-worker",
            &fleet.worker_config("w1").to_string_lossy(),
        ]),
    ];
    let ticks = || {
        pids.clone().map(|ps| {
            (!ps.is_empty()).then(|| ps.iter().filter_map(|p| common::cpu_ticks(p)).sum::<u64>())
        })
    };
    let ticks0 = ticks();
    let cpu0 = common::MachineCpu::take();
    let start_ns = common::realtime_ns();
    let mut set = tokio::task::JoinSet::new();
    for (k, mut client) in clients.into_iter().enumerate() {
        let share = tasks / submitters + usize::from(k < tasks % submitters);
        let noop = noop.program.clone();
        set.spawn(async move {
            let mut ids = Vec::with_capacity(share);
            for i in 0..share {
                let spec = common::spec(&format!("noop{k}-{i}"), &[noop.as_str()], isolation, 1);
                ids.push(common::submit(&mut client, spec).await?);
            }
            Ok::<_, anyhow::Error>((ids, client))
        });
    }
    let mut ids = Vec::with_capacity(tasks);
    let mut clients = Vec::new();
    while let Some(r) = set.join_next().await {
        let (mine, client) = r.context("a submitter panicked")??;
        ids.extend(mine);
        clients.push(client);
    }
    let submit_s = (common::realtime_ns() - start_ns) as f64 / 1e9;
    // Tasks run in submission order: wait for the last one (one session read every 50 ms, so
    // the bench's reads cost the coordinator next to nothing during the run), then read every
    // session. The end is the latest `completed` timestamp, so reading afterwards adds nothing.
    ids.sort_by_key(|id| {
        id.trim_start_matches('t')
            .parse::<u64>()
            .unwrap_or(u64::MAX)
    });
    let mut client = clients.pop().context("no submitter")?;
    let last = ids.last().context("no tasks")?.clone();
    common::wait_completed(
        &mut client,
        &last,
        Duration::from_millis(50),
        Duration::from_secs(600),
    )
    .await?;
    // The machine's CPU up to here (within one 50 ms poll of the end), not over the reads of
    // every session that follow.
    let cpu1 = common::MachineCpu::take();
    let busy = cpu1.busy_cores_since(&cpu0, common::Machine::detect().nproc);
    let machine_cpu_s = cpu1.busy_seconds_since(&cpu0);
    let ticks1 = ticks();
    let (mut last_ms, mut failed) = (0u64, 0usize);
    for id in &ids {
        let events = common::wait_completed(
            &mut client,
            id,
            Duration::from_millis(20),
            Duration::from_secs(600),
        )
        .await?;
        let (state, ts) = common::completed_state(&events).context("no completed event")?;
        if state != "succeeded" {
            failed += 1;
            if failed == 1 {
                eprintln!("task-bench: task {id} {state}: {events:?}");
            }
        }
        last_ms = last_ms.max(ts);
    }
    let per_task = |i: usize| match (ticks0[i], ticks1[i]) {
        (Some(a), Some(b)) => Some((b - a) as f64 / common::clock_ticks() * 1000.0 / tasks as f64),
        _ => None,
    };
    for c in clients.into_iter().chain([client]) {
        c.close().await;
    }
    let total_s = (last_ms as f64 - start_ns as f64 / 1e6) / 1e3;
    Ok(RunResult {
        system: format!("drover-{}", format!("{isolation:?}").to_lowercase()),
        noop: noop.name.into(),
        tasks,
        submit_s,
        total_s,
        tasks_per_s: tasks as f64 / total_s,
        failed,
        machine_busy_cores: busy,
        machine_cpu_ms_per_task: machine_cpu_s * 1000.0 / tasks as f64,
        coordinator_cpu_ms_per_task: per_task(0),
        worker_cpu_ms_per_task: per_task(1),
    })
}

#[derive(Debug, serde::Deserialize)]
struct HqOutput {
    submit_s: f64,
    total_s: f64,
    /// Over the timed window (hq_noop.py samples /proc/stat itself).
    machine_busy_cores: f64,
    machine_cpu_s: f64,
    hq_version: String,
}

/// Run tests/bench/hq_noop.py once with `cores` cores.
pub fn hq_run(script: &Path, noop: &Noop, tasks: usize, cores: usize) -> Result<RunResult> {
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg("--tasks")
        .arg(tasks.to_string())
        .arg("--cores")
        .arg(cores.to_string())
        .arg("--program")
        .arg(&noop.program)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running python3 {}", script.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        bail!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    // HyperQueue prints its own tables on stdout; the result is the last line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    let parsed: HqOutput = serde_json::from_str(last).with_context(|| {
        format!(
            "{} printed no JSON result: {}",
            script.display(),
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    Ok(RunResult {
        system: format!("hyperqueue-{}", parsed.hq_version),
        noop: noop.name.into(),
        tasks,
        submit_s: parsed.submit_s,
        total_s: parsed.total_s,
        tasks_per_s: tasks as f64 / parsed.total_s,
        failed: 0,
        machine_busy_cores: parsed.machine_busy_cores,
        machine_cpu_ms_per_task: parsed.machine_cpu_s * 1000.0 / tasks as f64,
        coordinator_cpu_ms_per_task: None,
        worker_cpu_ms_per_task: None,
    })
}
