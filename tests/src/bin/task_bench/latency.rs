//! Dispatch latency: submit → the task's process running in its sandbox.
//!
//! Definition. `t0` is CLOCK_REALTIME read by the client right before it sends `Submit` (the
//! operator client the CLI uses, on a connection opened beforehand). The task's first action
//! reads CLOCK_REALTIME and prints it in nanoseconds, and that stamp comes back as a stdout
//! event. Latency = stamp − `t0`; both clocks are the same host's.
//!
//! Two probes print the stamp ([`Probe`]):
//! - `static` (the goal's measure): tests/bench/stamp.c, built at run time with `cc`, static,
//!   without libc or start-up code. Its first instruction reads the clock, so its stamp is the
//!   moment the task's program first runs, right after its `execve` (the process itself
//!   existed before: drover's own set-up of the sandbox runs in it).
//! - `date +%s%N` (the measure of every round before the tenth in docs/benchmarks.md): the
//!   stamp also includes the dynamic loader and glibc's start-up, about 1 ms of CPU per exec
//!   on the build machines (glibc's cache enumeration with `cpuid`, which the hypervisor
//!   traps). That is the task's own program running, not the dispatch; it is kept so figures
//!   stay comparable.
//!
//! Each probe's own start is also measured spawned directly by this process, outside drover
//! ([`exec_baseline`]).
//!
//! Samples are sequential: one task at a time, the next submitted only after the previous one
//! completed, so each dispatch finds an idle coordinator and worker. The bench polls the
//! session every 10 ms starting 20 ms after the submit was acknowledged, so its reads almost
//! never overlap the dispatch being measured. The session's own timestamps (milliseconds)
//! split the mean into stages: submitted → assigned (coordinator), assigned → `started`
//! (assignment reaches the worker, attempt stream opened), `started` → stamp (workspace,
//! sandbox set-up, exec, and the probe's own start-up).

use super::common::{self, Summary};
use anyhow::{bail, Context, Result};
use drover_protocol::task::{Isolation, NetworkPolicy};
use rand::Rng;
use std::path::PathBuf;
use std::time::Duration;

/// What the task runs to stamp the moment it runs.
#[derive(Debug, Clone)]
pub enum Probe {
    /// The static probe (tests/bench/stamp.c) at this path.
    Static(PathBuf),
    /// `date +%s%N`.
    Date,
}

impl Probe {
    pub fn name(&self) -> &'static str {
        match self {
            Probe::Static(_) => "static",
            Probe::Date => "date",
        }
    }

    fn argv(&self) -> Vec<String> {
        match self {
            Probe::Static(path) => vec![path.display().to_string()],
            Probe::Date => vec!["date".into(), "+%s%N".into()],
        }
    }
}

/// The static probe's source; see its header.
const STAMP_C: &str = include_str!("../../../bench/stamp.c");

/// Builds the static probe with the system C compiler (`cc`) into a fresh directory under
/// /var/tmp (see [`common::build_c`]). With `noop`, the program built only exits 0 (a `true`
/// without glibc's start-up).
pub fn build_static_probe(noop: bool) -> Result<(tempfile::TempDir, PathBuf)> {
    let flags = [
        "-static",
        "-nostdlib",
        "-ffreestanding",
        "-fno-stack-protector",
        "-fno-pie",
        "-no-pie",
        "-O2",
    ];
    let flags: Vec<&str> = flags.into_iter().chain(noop.then_some("-DNOOP")).collect();
    common::build_c(
        STAMP_C,
        "stamp.c",
        if noop { "noop" } else { "stamp" },
        &flags,
        if noop {
            "pass --noop true"
        } else {
            "pass --probe date"
        },
    )
}

#[derive(Debug, serde::Serialize)]
pub struct LatencyReport {
    pub probe: String,
    pub isolation: String,
    pub network: String,
    /// Submit → the task's own stamp, ms.
    pub dispatch_ms: Summary,
    /// Submit → `Submitted` answer (the task durable), ms.
    pub submit_ack_ms: Summary,
    /// Means of the session-timestamp stages, ms (millisecond stamps: ±1 ms each, unbiased
    /// over many samples).
    pub stage_submitted_to_assigned_ms: f64,
    pub stage_assigned_to_started_ms: f64,
    pub stage_started_to_stamp_ms: f64,
}

pub async fn run(
    settings: &drover::cli::settings::Resolved,
    isolation: Isolation,
    network: NetworkPolicy,
    probe: &Probe,
    samples: usize,
) -> Result<LatencyReport> {
    let argv = probe.argv();
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let spec = |name: &str| {
        let mut s = common::spec(name, &argv, isolation, 0);
        s.network = network;
        s
    };
    let mut client = common::connect(settings).await?;
    // Warm-up: the first task pays for cold caches on both sides.
    for _ in 0..5 {
        let id = common::submit(&mut client, spec("warm")).await?;
        common::wait_completed(
            &mut client,
            &id,
            Duration::from_millis(10),
            Duration::from_secs(30),
        )
        .await?;
    }
    let (mut dispatch, mut acks) = (Vec::new(), Vec::new());
    let (mut s1, mut s2, mut s3) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let spec = spec(&format!("lat{i}"));
        let t0 = common::realtime_ns();
        let id = common::submit(&mut client, spec).await?;
        let acked = common::realtime_ns();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let events = common::wait_completed(
            &mut client,
            &id,
            Duration::from_millis(10),
            Duration::from_secs(30),
        )
        .await?;
        match common::completed_state(&events) {
            Some((state, _)) if state == "succeeded" => {}
            other => bail!("task {id} did not succeed ({other:?}): {events:?}"),
        }
        let out = common::stdout_of(&events);
        let stamp: u128 = out
            .trim()
            .parse()
            .with_context(|| format!("task {id} printed {out:?}, not a timestamp"))?;
        dispatch.push((stamp as f64 - t0 as f64) / 1e6);
        acks.push((acked - t0) as f64 / 1e6);
        let ts = |kind: &str| {
            events
                .iter()
                .find(|e| e.kind == kind)
                .map(|e| e.ts_ms as f64)
        };
        if let (Some(sub), Some(asg), Some(st)) = (ts("submitted"), ts("assigned"), ts("started")) {
            s1.push(asg - sub);
            s2.push(st - asg);
            s3.push(stamp as f64 / 1e6 - st);
        }
        // A random gap, so samples do not lock onto the heartbeat or any other period.
        let gap = rand::thread_rng().gen_range(5..15);
        tokio::time::sleep(Duration::from_millis(gap)).await;
    }
    client.close().await;
    Ok(LatencyReport {
        probe: probe.name().into(),
        isolation: format!("{isolation:?}").to_lowercase(),
        network: format!("{network:?}").to_lowercase(),
        dispatch_ms: Summary::of(dispatch),
        submit_ack_ms: Summary::of(acks),
        stage_submitted_to_assigned_ms: common::mean(&s1),
        stage_assigned_to_started_ms: common::mean(&s2),
        stage_started_to_stamp_ms: common::mean(&s3),
    })
}

/// The probe spawned directly by this process, no drover and no sandbox: spawn → its stamp,
/// ms. The part of the dispatch latency that is the task's own start.
pub fn exec_baseline(probe: &Probe, samples: usize) -> Result<Summary> {
    let argv = probe.argv();
    let mut xs = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t0 = common::realtime_ns();
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .with_context(|| format!("running {}", argv[0]))?;
        let stamp: u128 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("{} printed no timestamp", argv[0]))?;
        xs.push((stamp as f64 - t0 as f64) / 1e6);
    }
    Ok(Summary::of(xs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe is built and prints the time it ran: after the spawn, before its end. (A
    /// probe that printed anything else would fail every latency sample; one that printed a
    /// stale clock would be caught here.)
    #[test]
    fn static_probe_prints_the_time_it_started() {
        let (_dir, exe) = build_static_probe(false).expect("building the probe (needs cc)");
        let t0 = common::realtime_ns();
        let out = std::process::Command::new(&exe)
            .output()
            .expect("running it");
        let t1 = common::realtime_ns();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).expect("ASCII");
        assert!(text.ends_with('\n'), "{text:?}");
        let stamp: u128 = text.trim().parse().expect("a number");
        assert!(t0 <= stamp && stamp <= t1, "{t0} <= {stamp} <= {t1}");
        let (_dir, noop) = build_static_probe(true).expect("building the no-op");
        let out = std::process::Command::new(&noop)
            .output()
            .expect("running it");
        assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    }
}
