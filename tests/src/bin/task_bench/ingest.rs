//! Durable event ingestion: events per second the coordinator acknowledges (an ack means the
//! event is committed with fsync), and the ack latency.
//!
//! Coordinator only ([`sim`]): simulated workers over real QUIC + mutual TLS (their own worker
//! certificates, the real worker's TLS config and transport settings) register like a
//! `drover-worker`, take real assignments for submitted tasks, and for each one open an
//! attempt stream exactly as worker-agent/src/executor.rs does — `Open`, then `AttemptUp::Event`
//! frames with seq from 0, at most `--window` unacknowledged (256 by default, the real
//! worker's `MAX_UNACKED`) — ending with an `exited` event so
//! the task completes. Each event's ack latency is send → the first ack covering its seq.
//! Throughput = events acknowledged / (first event sent → last ack received), over all streams.
//!
//! End to end ([`e2e`]): real `drover-worker`s run tasks that write JSON lines to
//! `DROVER_EVENTS_FD` as fast as `yes | head` can; events per second from the session's
//! timestamps: the first task event (stamped by the worker when it read it) to the
//! `completed` event (stamped by the coordinator when it took in `exited`, the last event of
//! the attempt, which the worker sends only after every earlier one; same host, same clock).
//! Not the `exited` event's own stamp: the worker stamps it when the process is gone, which
//! can be long before the events before it have reached the coordinator.

use super::common::{self, Summary};
use anyhow::{bail, Context, Result};
use drover::pki::{self, TlsFiles};
use drover::wire::{self, FramedRecv};
use drover_protocol::identity::COORDINATOR_SERVER_NAME;
use drover_protocol::task::{ExitClass, Isolation};
use drover_protocol::{
    AttemptDown, AttemptEvent, AttemptUp, CgroupVersion, CoordinatorMessage, Hello, HelloReply,
    LoadAvg, ResourceReport, Role, Usage, WorkerMessage, SUPPORTED_VERSIONS,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{timeout, Instant};

#[derive(Debug, serde::Serialize)]
pub struct IngestReport {
    pub mode: String,
    pub streams: usize,
    /// Unacknowledged events allowed per stream (coordinator-only mode).
    pub window: Option<usize>,
    pub events: u64,
    pub payload_bytes: usize,
    pub seconds: f64,
    pub events_per_s: f64,
    /// Ack latency, ms (coordinator-only mode).
    pub ack_ms: Option<Summary>,
    /// The coordinator process's CPU over the window, cores.
    pub coordinator_cores: Option<f64>,
    /// Events per second of coordinator CPU time: what one whole core would ingest at this
    /// efficiency (the machine may not have given the coordinator a whole core).
    pub events_per_coordinator_cpu_s: Option<f64>,
    pub machine_busy_cores: f64,
}

/// What one simulated attempt stream measured.
struct StreamResult {
    first_send: Instant,
    last_ack: Instant,
    events: u64,
    latencies_us: Vec<u32>,
}

fn now_ms() -> u64 {
    (common::realtime_ns() / 1_000_000) as u64
}

fn report(cpus: u32) -> ResourceReport {
    ResourceReport {
        arch: std::env::consts::ARCH.into(),
        os: "task-bench simulated worker".into(),
        kernel: "-".into(),
        hostname: "task-bench-sim".into(),
        cpu_count: cpus,
        cpu_model: "simulated".into(),
        load: LoadAvg::default(),
        memory_total_bytes: 64 << 30,
        memory_available_bytes: 60 << 30,
        work_dir: "/nonexistent".into(),
        disk_total_bytes: 100 << 30,
        disk_free_bytes: 90 << 30,
        gpus: vec![],
        cgroup: CgroupVersion::V2,
        namespaces: true,
        labels: vec!["sim".into()],
    }
}

fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig> {
    let rustls = pki::client_config(files, Role::Worker).context("worker TLS config")?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(rustls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    // The real worker's transport settings (worker-agent/src/link.rs).
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(30)).ok());
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.stream_receive_window((256u32 * 1024).into());
    transport.receive_window((1024u32 * 1024).into());
    transport.send_window(1024 * 1024);
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// One simulated worker: register, then run every attempt assigned to it, each sending
/// `events` events (the last one `exited`), until `done` counts `total` finished streams over
/// all simulated workers; returns what each of its streams measured.
async fn sim_worker(
    addr: SocketAddr,
    files: TlsFiles,
    done: Arc<AtomicUsize>,
    total: usize,
    events: u64,
    window: usize,
    payload: Arc<String>,
) -> Result<Vec<StreamResult>> {
    let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let conn = endpoint
        .connect_with(client_config(&files)?, addr, COORDINATOR_SERVER_NAME)?
        .await
        .context("QUIC handshake")?;
    pki::peer_role_is_coordinator(&wire::peer_certs(&conn)).context("coordinator role")?;
    let (mut send, recv) = conn.open_bi().await?;
    let mut recv = FramedRecv::new(recv);
    let hello = Hello {
        versions: SUPPORTED_VERSIONS,
        role: Role::Worker,
        software: "drover-worker (task-bench sim)".into(),
    };
    wire::send(&mut send, &hello).await?;
    match recv.next::<HelloReply>().await? {
        Some(HelloReply::Accepted { .. }) => {}
        other => bail!("hello refused: {other:?}"),
    }
    let register = WorkerMessage::Register {
        resources: report(64),
    };
    wire::send(&mut send, &register).await?;
    match recv.next::<CoordinatorMessage>().await? {
        Some(CoordinatorMessage::Registered { .. }) => {}
        other => bail!("expected Registered, got {other:?}"),
    }
    wire::send(
        &mut send,
        &WorkerMessage::Attempts {
            running: Vec::new(),
        },
    )
    .await?;
    let mut attempts = tokio::task::JoinSet::new();
    let mut prepared = std::collections::HashSet::new();
    let mut results = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut check = tokio::time::interval(Duration::from_millis(10));
    let mut hb = 0u64;
    while done.load(Ordering::SeqCst) < total || !attempts.is_empty() {
        tokio::select! {
            _ = check.tick() => {}
            _ = tick.tick() => {
                hb += 1;
                let usage = Usage { memory_available_bytes: 60 << 30, disk_free_bytes: 90 << 30, ..Usage::default() };
                wire::send(&mut send, &WorkerMessage::Heartbeat { seq: hb, usage }).await?;
            }
            msg = recv.next::<CoordinatorMessage>() => match msg? {
                // As the worker does: an attempt streams once it is confirmed.
                Some(CoordinatorMessage::Assign(a)) => {
                    attempts.spawn(attempt(conn.clone(), a.task_id, a.epoch, events, window, payload.clone()));
                }
                Some(CoordinatorMessage::Prepare(a)) => {
                    prepared.insert((a.task_id.clone(), a.epoch));
                }
                Some(CoordinatorMessage::Confirm { task_id, epoch }) => {
                    if !prepared.remove(&(task_id.clone(), epoch)) {
                        bail!("confirm of {task_id} epoch {epoch}, which was not prepared");
                    }
                    attempts.spawn(attempt(conn.clone(), task_id, epoch, events, window, payload.clone()));
                }
                Some(CoordinatorMessage::HeartbeatAck { .. }) => {}
                Some(other) => bail!("unexpected message {other:?}"),
                None => bail!("coordinator closed the control stream"),
            },
            Some(finished) = attempts.join_next(), if !attempts.is_empty() => {
                results.push(finished.context("attempt task panicked")??);
                done.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let _ = wire::send(
        &mut send,
        &WorkerMessage::Goodbye {
            reason: "bench done".into(),
        },
    )
    .await;
    conn.close(drover_protocol::close_code::GOODBYE.into(), b"done");
    let _ = timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(results)
}

/// One attempt stream, as the executor streams it: events in seq order with at most
/// `window` unacknowledged.
async fn attempt(
    conn: quinn::Connection,
    task_id: String,
    epoch: u64,
    events: u64,
    window: usize,
    payload: Arc<String>,
) -> Result<StreamResult> {
    let (mut send, recv) = conn.open_bi().await?;
    let mut recv = FramedRecv::new(recv);
    wire::send(
        &mut send,
        &AttemptUp::Open {
            task_id: task_id.clone(),
            epoch,
        },
    )
    .await?;
    let exited = serde_json::json!({ "class": ExitClass::Exited(0) }).to_string();
    let mut unacked: VecDeque<(u64, Instant)> = VecDeque::with_capacity(window);
    let mut latencies_us = Vec::with_capacity(events as usize);
    let (mut next, mut acked) = (0u64, 0u64);
    let first_send = Instant::now();
    let mut last_ack = first_send;
    while acked < events {
        tokio::select! {
            biased;
            reply = recv.next::<AttemptDown>() => match reply? {
                Some(AttemptDown::Ack { seq }) => {
                    let at = Instant::now();
                    while unacked.front().is_some_and(|(s, _)| *s <= seq) {
                        let (_, sent) = unacked.pop_front().expect("front exists");
                        latencies_us.push((at - sent).as_micros().min(u32::MAX as u128) as u32);
                        acked += 1;
                    }
                    last_ack = at;
                }
                Some(AttemptDown::Fenced { reason }) => bail!("{task_id}/{epoch} fenced: {reason}"),
                Some(other) => bail!("unexpected answer on the attempt stream of {task_id}: {other:?}"),
                None => bail!("coordinator closed the attempt stream of {task_id}"),
            },
            _ = std::future::ready(()), if next < events && unacked.len() < window => {
                let (kind, body) = if next + 1 == events {
                    ("exited", exited.clone())
                } else {
                    ("stdout", payload.as_str().to_owned())
                };
                let ev = AttemptEvent { seq: next, ts_ms: now_ms(), kind: kind.into(), payload: body };
                unacked.push_back((next, Instant::now()));
                wire::send(&mut send, &AttemptUp::Event(ev)).await?;
                next += 1;
            }
        }
    }
    let _ = send.finish();
    Ok(StreamResult {
        first_send,
        last_ack,
        events: acked,
        latencies_us,
    })
}

/// Coordinator only: `workers` simulated workers with `streams` attempt streams in all.
pub async fn sim(
    fleet: &drover_tests::TestFleet,
    workers: usize,
    streams: usize,
    events: u64,
    window: usize,
    payload_bytes: usize,
) -> Result<IngestReport> {
    if streams > workers * 60 {
        bail!("at most 60 attempt streams per simulated worker (the coordinator allows 64 streams per connection); add --workers");
    }
    let settings = common::operator_settings(fleet);
    let mut client = common::connect(&settings).await?;
    let data = "x".repeat(payload_bytes.saturating_sub(12));
    let payload = Arc::new(serde_json::json!({ "data": data }).to_string());
    let mut sims = tokio::task::JoinSet::new();
    let done = Arc::new(AtomicUsize::new(0));
    for w in 0..workers {
        let name = format!("sim{w}");
        let paths = fleet.issue(Role::Worker, &name, pki::Validity::Days(1));
        let files = TlsFiles {
            ca: fleet.ca_cert(),
            cert: paths.cert,
            key: paths.key,
        };
        sims.spawn(sim_worker(
            fleet.socket_addr(),
            files,
            done.clone(),
            streams,
            events,
            window,
            payload.clone(),
        ));
    }
    // Wait until every simulated worker is registered, so placement spreads the tasks.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = common::request(&mut client, drover_protocol::OperatorRequest::FleetStatus).await?;
        if let drover_protocol::OperatorResponse::FleetStatus(s) = r {
            if s.workers.ready as usize >= workers {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("simulated workers did not register within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = common::coordinator_pid(&fleet.coordinator_config());
    let cpu0 = common::MachineCpu::take();
    let (t0, ticks0) = (Instant::now(), pid.as_deref().and_then(common::cpu_ticks));
    let mut spec = common::spec("ingest", &["true"], Isolation::Process, 1);
    spec.requirements.labels = vec!["sim".into()];
    let mut ids = Vec::new();
    for _ in 0..streams {
        ids.push(common::submit(&mut client, spec.clone()).await?);
    }
    let mut results = Vec::new();
    while let Some(r) = sims.join_next().await {
        results.extend(r.context("simulated worker panicked")??);
    }
    let wall = t0.elapsed().as_secs_f64();
    let ticks1 = pid.as_deref().and_then(common::cpu_ticks);
    let busy = common::MachineCpu::take().busy_cores_since(&cpu0, common::Machine::detect().nproc);
    let first = results
        .iter()
        .map(|r| r.first_send)
        .min()
        .context("no streams")?;
    let last = results
        .iter()
        .map(|r| r.last_ack)
        .max()
        .context("no streams")?;
    let total: u64 = results.iter().map(|r| r.events).sum();
    let seconds = (last - first).as_secs_f64();
    let lat: Vec<f64> = results
        .iter()
        .flat_map(|r| r.latencies_us.iter().map(|us| *us as f64 / 1000.0))
        .collect();
    // The submitting connection sat idle through the run (the idle timeout may have closed
    // it): check on a new one. Every event stored once: each session holds submitted,
    // assigned, the events, completed.
    client.close().await;
    let mut client = common::connect(&settings).await?;
    for id in &ids {
        let r = common::request(
            &mut client,
            drover_protocol::OperatorRequest::Events {
                id: id.clone(),
                from: 0,
                to: Some(1),
                limit: 1,
            },
        )
        .await?;
        match r {
            drover_protocol::OperatorResponse::Events { len, .. } if len == events + 3 => {}
            other => bail!("session {id} should hold {} events: {other:?}", events + 3),
        }
    }
    client.close().await;
    let coordinator_cores = match (ticks0, ticks1) {
        (Some(a), Some(b)) => Some((b - a) as f64 / common::clock_ticks() / wall),
        _ => None,
    };
    Ok(IngestReport {
        mode: format!("coordinator only ({workers} simulated workers)"),
        streams,
        window: Some(window),
        events: total,
        payload_bytes: payload.len(),
        seconds,
        events_per_s: total as f64 / seconds,
        ack_ms: Some(Summary::of(lat)),
        coordinator_cores,
        events_per_coordinator_cpu_s: coordinator_cores.map(|c| total as f64 / (c * wall)),
        machine_busy_cores: busy,
    })
}

/// End to end: `tasks` real tasks at once on the fleet's real worker(s), each writing
/// `events` JSON lines to `DROVER_EVENTS_FD`.
pub async fn e2e(
    fleet: &drover_tests::TestFleet,
    tasks: usize,
    events: u64,
    isolation: Isolation,
) -> Result<IngestReport> {
    let settings = common::operator_settings(fleet);
    let mut client = common::connect(&settings).await?;
    let line = r#"{"type":"progress","step":"a step of the task","pct":50}"#;
    let script = format!("yes '{line}' | head -n {events} >&\"$DROVER_EVENTS_FD\"");
    let pid = common::coordinator_pid(&fleet.coordinator_config());
    let cpu0 = common::MachineCpu::take();
    let (t0, ticks0) = (Instant::now(), pid.as_deref().and_then(common::cpu_ticks));
    let mut ids = Vec::new();
    for i in 0..tasks {
        let spec = common::spec(&format!("flood{i}"), &["sh", "-c", &script], isolation, 0);
        ids.push(common::submit(&mut client, spec).await?);
    }
    let (mut first_ms, mut last_ms, mut total) = (u64::MAX, 0u64, 0u64);
    for id in &ids {
        let evs = common::wait_completed(
            &mut client,
            id,
            Duration::from_millis(100),
            Duration::from_secs(600),
        )
        .await?;
        match common::completed_state(&evs) {
            Some((s, _)) if s == "succeeded" => {}
            other => bail!("task {id} did not succeed: {other:?}"),
        }
        let progress: Vec<_> = evs.iter().filter(|e| e.kind == "progress").collect();
        if progress.len() as u64 != events {
            bail!(
                "task {id} stored {} progress events, not {events}",
                progress.len()
            );
        }
        // Stored once and in order: positions without gaps, the attempt's seq increasing.
        let in_order = evs.iter().enumerate().all(|(i, e)| e.pos == i as u64)
            && progress.windows(2).all(|w| w[0].seq < w[1].seq);
        if !in_order {
            bail!("task {id}: session out of order or with gaps");
        }
        first_ms = first_ms.min(progress.first().map_or(u64::MAX, |e| e.ts_ms));
        let completed = evs
            .iter()
            .find(|e| e.kind == "completed")
            .context("no completed")?;
        last_ms = last_ms.max(completed.ts_ms);
        total += events;
    }
    let wall = t0.elapsed().as_secs_f64();
    let ticks1 = pid.as_deref().and_then(common::cpu_ticks);
    let busy = common::MachineCpu::take().busy_cores_since(&cpu0, common::Machine::detect().nproc);
    client.close().await;
    let coordinator_cores = match (ticks0, ticks1) {
        (Some(a), Some(b)) => Some((b - a) as f64 / common::clock_ticks() / wall),
        _ => None,
    };
    let seconds = (last_ms.saturating_sub(first_ms)).max(1) as f64 / 1000.0;
    Ok(IngestReport {
        mode: format!(
            "end to end ({tasks} real task(s), isolation {})",
            format!("{isolation:?}").to_lowercase()
        ),
        streams: tasks,
        window: None,
        events: total,
        payload_bytes: line.len(),
        seconds,
        events_per_s: total as f64 / seconds,
        ack_ms: None,
        coordinator_cores,
        events_per_coordinator_cpu_s: coordinator_cores.map(|c| total as f64 / (c * wall)),
        machine_busy_cores: busy,
    })
}
