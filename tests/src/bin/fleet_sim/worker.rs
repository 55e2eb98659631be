//! One simulated worker: the real worker's link protocol (QUIC + mutual TLS, coordinator role
//! check, Hello, Register with a resource report, then a Heartbeat every interval while reading
//! acks), reconnecting after a pause if the connection ends before the sim stops.
//!
//! Every worker task shares one [`Stats`] of atomic counters, which the driver snapshots at the
//! start and end of the measurement window.

use anyhow::{bail, Context, Result};
use drover::pki;
use drover::wire::{self, FramedRecv};
use drover_protocol::identity::COORDINATOR_SERVER_NAME;
use drover_protocol::{
    close_code, CgroupVersion, CoordinatorMessage, Gpu, GpuVendor, Hello, HelloReply, LoadAvg,
    ResourceReport, Role, Usage, WorkerMessage, SUPPORTED_VERSIONS,
};
use rand::Rng;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// How long connecting, the handshake and registration may each take (as in the real worker).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeats sent but not yet acknowledged that a worker keeps times for.
const MAX_OUTSTANDING: usize = 64;

/// Ack latency histogram: bucket `b` holds latencies up to `bound_us(b)` microseconds, four
/// buckets per doubling from 16 µs (so a percentile read from it is within 19 %).
pub const BUCKETS: usize = 4 * 20;

pub fn bound_us(b: usize) -> f64 {
    16.0 * 2f64.powf(b as f64 / 4.0)
}

fn bucket_of(us: u64) -> usize {
    if us <= 16 {
        return 0;
    }
    let b = ((us as f64 / 16.0).log2() * 4.0).ceil() as usize;
    b.min(BUCKETS - 1)
}

/// Counters shared by every simulated worker.
#[derive(Debug)]
pub struct Stats {
    pub connect_attempts: AtomicU64,
    pub registrations: AtomicU64,
    /// Workers registered right now.
    pub connected: AtomicU64,
    pub failures: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    pub acks: AtomicU64,
    pub ack_latency: [AtomicU64; BUCKETS],
    pub ack_latency_max_us: AtomicU64,
    pub last_error: std::sync::Mutex<Option<String>>,
    pub stopping: AtomicBool,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            connect_attempts: AtomicU64::new(0),
            registrations: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            heartbeats_sent: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            ack_latency: std::array::from_fn(|_| AtomicU64::new(0)),
            ack_latency_max_us: AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
            stopping: AtomicBool::new(false),
        }
    }
}

/// A copy of the counters at one instant.
#[derive(Debug, Clone)]
pub struct StatsSnapshot {
    pub failures: u64,
    pub heartbeats_sent: u64,
    pub acks: u64,
    pub ack_latency: [u64; BUCKETS],
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            failures: self.failures.load(Ordering::Relaxed),
            heartbeats_sent: self.heartbeats_sent.load(Ordering::Relaxed),
            acks: self.acks.load(Ordering::Relaxed),
            ack_latency: std::array::from_fn(|b| self.ack_latency[b].load(Ordering::Relaxed)),
        }
    }

    fn record_latency(&self, d: Duration) {
        let us = d.as_micros() as u64;
        self.ack_latency[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.ack_latency_max_us.fetch_max(us, Ordering::Relaxed);
    }

    fn fail(&self, e: &anyhow::Error) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().expect("stats lock") = Some(format!("{e:#}"));
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

impl StatsSnapshot {
    /// The `q` quantile (0..=1) of ack latencies in `self` minus `earlier`, in milliseconds
    /// (the upper bound of the bucket it falls in).
    pub fn latency_quantile_ms(&self, earlier: &StatsSnapshot, q: f64) -> Option<f64> {
        let counts: Vec<u64> = (0..BUCKETS)
            .map(|b| self.ack_latency[b] - earlier.ack_latency[b])
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(bound_us(b) / 1000.0);
            }
        }
        None
    }
}

/// What every worker task shares.
#[derive(Debug)]
pub struct Shared {
    pub stats: Stats,
    pub coordinator: SocketAddr,
    pub heartbeat: Duration,
    /// Connection attempts are paced by taking one permit each (refilled at the connect rate).
    pub pace: Semaphore,
}

/// Run simulated worker `index` until the sim stops.
pub async fn run(
    shared: Arc<Shared>,
    index: usize,
    endpoint: quinn::Endpoint,
    cfg: quinn::ClientConfig,
) {
    let report = resource_report(index);
    let mut pause = Duration::from_millis(500);
    while !shared.stats.stopping() {
        match shared.pace.acquire().await {
            Ok(p) => p.forget(),
            Err(_) => return,
        }
        shared
            .stats
            .connect_attempts
            .fetch_add(1, Ordering::Relaxed);
        let result = session(&shared, &endpoint, &cfg, &report).await;
        if shared.stats.stopping() {
            return;
        }
        if let Err(e) = result {
            shared.stats.fail(&e);
        }
        // Like the real worker: back off with jitter before reconnecting.
        let jitter = rand::thread_rng().gen_range(0.5..=1.0);
        sleep(pause.mul_f64(jitter)).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

/// One connection: handshake, register, heartbeat until it ends.
async fn session(
    shared: &Shared,
    endpoint: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    report: &ResourceReport,
) -> Result<()> {
    let connecting = endpoint
        .connect_with(cfg.clone(), shared.coordinator, COORDINATOR_SERVER_NAME)
        .context("connect")?;
    let conn = timeout(STEP_TIMEOUT, connecting)
        .await
        .context("QUIC handshake timed out")?
        .context("QUIC handshake")?;
    let result = registered_session(shared, &conn, report).await;
    conn.close(close_code::PROTOCOL_ERROR.into(), b"reconnecting");
    result
}

async fn registered_session(
    shared: &Shared,
    conn: &quinn::Connection,
    report: &ResourceReport,
) -> Result<()> {
    pki::peer_role_is_coordinator(&wire::peer_certs(conn)).context("coordinator role")?;
    let (mut send, recv) = conn.open_bi().await.context("open stream")?;
    let mut recv = FramedRecv::new(recv);
    let hello = Hello {
        versions: SUPPORTED_VERSIONS,
        role: Role::Worker,
        software: format!("drover-worker {} (fleet-sim)", env!("CARGO_PKG_VERSION")),
    };
    wire::send(&mut send, &hello).await.context("send hello")?;
    match timeout(STEP_TIMEOUT, recv.next::<HelloReply>()).await {
        Ok(Ok(Some(HelloReply::Accepted { .. }))) => {}
        Ok(Ok(Some(HelloReply::Refused(r)))) => bail!("refused: {r}"),
        Ok(Ok(None)) => bail!("coordinator closed the handshake stream"),
        Ok(Err(e)) => return Err(e).context("hello reply"),
        Err(_) => bail!("no hello reply within 10s"),
    }
    let register = WorkerMessage::Register {
        resources: report.clone(),
    };
    wire::send(&mut send, &register)
        .await
        .context("send register")?;
    match timeout(STEP_TIMEOUT, recv.next::<CoordinatorMessage>()).await {
        Ok(Ok(Some(CoordinatorMessage::Registered { .. }))) => {}
        Ok(Ok(Some(other))) => bail!("expected Registered, got {other:?}"),
        Ok(Ok(None)) => bail!("coordinator closed the stream before Registered"),
        Ok(Err(e)) => return Err(e).context("registration reply"),
        Err(_) => bail!("no registration reply within 10s"),
    }
    shared.stats.registrations.fetch_add(1, Ordering::Relaxed);
    shared.stats.connected.fetch_add(1, Ordering::Relaxed);
    let result = heartbeat_loop(shared, &mut send, &mut recv, report).await;
    shared.stats.connected.fetch_sub(1, Ordering::Relaxed);
    result
}

/// Heartbeat at a random phase within the interval, each beat jittered by ±10 % (the mean
/// rate stays one per interval), timing every ack.
async fn heartbeat_loop(
    shared: &Shared,
    send: &mut quinn::SendStream,
    recv: &mut FramedRecv,
    report: &ResourceReport,
) -> Result<()> {
    let every = shared.heartbeat;
    let mut next = Instant::now() + every.mul_f64(rand::thread_rng().gen_range(0.0..1.0));
    let mut outstanding: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = sleep_until(next) => {
                seq += 1;
                let usage = usage(report, seq);
                wire::send(send, &WorkerMessage::Heartbeat { seq, usage })
                    .await
                    .context("send heartbeat")?;
                shared.stats.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                if outstanding.len() == MAX_OUTSTANDING {
                    outstanding.pop_front();
                }
                outstanding.push_back((seq, Instant::now()));
                next += every.mul_f64(rand::thread_rng().gen_range(0.9..1.1));
            }
            msg = recv.next::<CoordinatorMessage>() => match msg.context("reading acks")? {
                Some(CoordinatorMessage::HeartbeatAck { seq: acked }) => {
                    shared.stats.acks.fetch_add(1, Ordering::Relaxed);
                    while let Some(&(s, at)) = outstanding.front() {
                        if s > acked {
                            break;
                        }
                        outstanding.pop_front();
                        if s == acked {
                            shared.stats.record_latency(at.elapsed());
                        }
                    }
                }
                Some(other) => bail!("unexpected message {other:?}"),
                None => bail!("coordinator closed the control stream"),
            },
        }
    }
}

const GIB: u64 = 1 << 30;

/// A resource report like a real worker's, varied by index so the registry holds a mixed
/// fleet: 4-64 CPUs, 8-256 GiB, one worker in ten with a GPU, one in four with a browser.
pub fn resource_report(index: usize) -> ResourceReport {
    let cpus = [4u32, 8, 16, 32, 64][index % 5];
    let memory = [8u64, 16, 32, 64, 128, 256][index % 6] * GIB;
    let mut labels = vec!["linux".to_string(), "sim".to_string()];
    if index % 4 == 0 {
        labels.push("browser".into());
    }
    let gpus = if index % 10 == 0 {
        labels.push("gpu".into());
        vec![Gpu {
            vendor: GpuVendor::Nvidia,
            model: "NVIDIA L4".into(),
            memory_bytes: Some(24 * GIB),
        }]
    } else {
        Vec::new()
    };
    labels.sort();
    ResourceReport {
        arch: "x86_64".into(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        kernel: "6.1.0-28-amd64".into(),
        hostname: format!("sim-host-{:05}.fleet.example", index + 1),
        cpu_count: cpus,
        cpu_model: "AMD EPYC 7B13 64-Core Processor".into(),
        load: LoadAvg {
            one: 0.12,
            five: 0.2,
            fifteen: 0.18,
        },
        memory_total_bytes: memory,
        memory_available_bytes: memory / 10 * 9,
        work_dir: "/var/lib/drover-worker".into(),
        disk_total_bytes: 500 * GIB,
        disk_free_bytes: 420 * GIB,
        gpus,
        cgroup: CgroupVersion::V2,
        namespaces: true,
        labels,
    }
}

/// Usage that changes from beat to beat, as a real host's does.
fn usage(report: &ResourceReport, seq: u64) -> Usage {
    let wobble = (seq % 17) as f32 / 17.0;
    Usage {
        load: LoadAvg {
            one: 0.1 + wobble,
            five: 0.2 + wobble / 2.0,
            fifteen: 0.18,
        },
        cpu_percent: 3.0 + 10.0 * wobble,
        memory_available_bytes: report.memory_available_bytes - (seq % 64) * (1 << 20),
        disk_free_bytes: report.disk_free_bytes - (seq % 8) * (1 << 20),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_their_bounds() {
        for us in [1u64, 16, 17, 100, 1000, 25_000, 1_000_000] {
            let b = bucket_of(us);
            assert!(bound_us(b) >= us as f64 - 0.5, "{us} in bucket {b}");
            if b > 0 {
                assert!(bound_us(b - 1) < us as f64, "{us} in bucket {b}");
            }
        }
    }
}
