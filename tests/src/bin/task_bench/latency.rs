//! Dispatch latency: submit → the task's process running in its sandbox.
//!
//! Definition. `t0` is CLOCK_REALTIME read by the client right before it sends `Submit` (the
//! operator client the CLI uses, on a connection opened beforehand). The task is
//! `date +%s%N`: its first action reads CLOCK_REALTIME and prints it, and that stamp comes
//! back as a stdout event. Latency = stamp − `t0`; both clocks are the same host's. It
//! therefore includes the exec of `date` and its own start-up (dynamic loading), which the
//! benchmark measures separately outside any sandbox (`exec_baseline`) so it can be told
//! apart.
//!
//! Samples are sequential: one task at a time, the next submitted only after the previous one
//! completed, so each dispatch finds an idle coordinator and worker. The bench polls the
//! session every 10 ms starting 20 ms after the submit was acknowledged, so its reads almost
//! never overlap the dispatch being measured. The session's own timestamps (milliseconds)
//! split the mean into stages: submitted → assigned (coordinator), assigned → `started`
//! (assignment reaches the worker, attempt stream opened), `started` → stamp (workspace,
//! sandbox set-up, exec).

use super::common::{self, Summary};
use anyhow::{bail, Context, Result};
use drover_protocol::task::{Isolation, NetworkPolicy};
use rand::Rng;
use std::time::Duration;

#[derive(Debug, serde::Serialize)]
pub struct LatencyReport {
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
    samples: usize,
) -> Result<LatencyReport> {
    let spec = |name: &str| {
        let mut s = common::spec(name, &["date", "+%s%N"], isolation, 0);
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
        isolation: format!("{isolation:?}").to_lowercase(),
        network: format!("{network:?}").to_lowercase(),
        dispatch_ms: Summary::of(dispatch),
        submit_ack_ms: Summary::of(acks),
        stage_submitted_to_assigned_ms: common::mean(&s1),
        stage_assigned_to_started_ms: common::mean(&s2),
        stage_started_to_stamp_ms: common::mean(&s3),
    })
}

/// `date +%s%N` spawned directly by this process, no drover and no sandbox: spawn → its stamp,
/// ms. The part of the dispatch latency that is the task's own start-up.
pub fn exec_baseline(samples: usize) -> Result<Summary> {
    let mut xs = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t0 = common::realtime_ns();
        let out = std::process::Command::new("date")
            .arg("+%s%N")
            .output()
            .context("running date")?;
        let stamp: u128 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("date printed no timestamp")?;
        xs.push((stamp as f64 - t0 as f64) / 1e6);
    }
    Ok(Summary::of(xs))
}
