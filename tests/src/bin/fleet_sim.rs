//! `fleet-sim`: how much a coordinator costs per worker.
//!
//! Starts the real `drover serve` (a release build) as a child process, connects N simulated
//! workers to it from this one process — each a real QUIC connection with its own certificate,
//! doing the worker's handshake, registration and heartbeats — waits until the coordinator
//! reports all N ready, then measures over a window: the coordinator's CPU (utime + stime from
//! /proc/PID/stat over wall time, in cores) and memory (VmRSS, VmHWM from /proc/PID/status),
//! the sim's own CPU and the whole machine's, and the heartbeat ack rate and latency the
//! workers saw. Prints a table (or `--json`), then stops everything.
//!
//! This is a benchmark, not a test: it asserts nothing. docs/benchmarks.md records its results
//! and the commands that reproduce them.
//!
//! ```text
//! cargo build --release -p drover-coordinator -p drover-tests
//! target/release/fleet-sim --workers 10000 --duration 30
//! ```

#[path = "fleet_sim/certs.rs"]
mod certs;
#[path = "fleet_sim/coordinator.rs"]
mod coordinator;
#[path = "fleet_sim/procfs.rs"]
mod procfs;
#[path = "fleet_sim/report.rs"]
mod report;
#[path = "fleet_sim/worker.rs"]
mod worker;

use anyhow::{bail, Context, Result};
use clap::Parser;
use coordinator::Coordinator;
use procfs::CpuSnapshot;
use report::{Machine, Report};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use worker::Shared;

/// Connect many simulated workers to a real coordinator and measure what it costs.
#[derive(Debug, Parser)]
#[command(name = "fleet-sim", max_term_width = 100)]
struct Args {
    /// How many simulated workers to connect.
    #[arg(long, default_value_t = 1000)]
    workers: usize,
    /// Length of the measurement window, in seconds (after all workers are ready and the
    /// settle time has passed).
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Heartbeat interval, in milliseconds (also the coordinator's heartbeat_interval_ms).
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// The coordinator's lease, in milliseconds [default: the larger of 10000 and 10
    /// heartbeat intervals].
    #[arg(long)]
    lease_ms: Option<u64>,
    /// Directory for certificates, the coordinator's config, database and log [default: a
    /// temporary directory, removed at the end unless --keep]. Certificates found there are
    /// reused, so repeated runs skip issuing them.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Keep the temporary state directory (with the coordinator's log).
    #[arg(long)]
    keep: bool,
    /// The `drover` binary to benchmark [default: `drover` next to this binary].
    #[arg(long, value_name = "PATH")]
    coordinator_bin: Option<PathBuf>,
    /// Print the result as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 200)]
    connect_rate: u32,
    /// Worker connections per client UDP socket (quinn endpoint).
    #[arg(long, default_value_t = 1000)]
    conns_per_endpoint: usize,
    /// Receive and send buffer asked for each client UDP socket, in bytes (the kernel caps it
    /// at net.core.rmem_max / wmem_max).
    #[arg(long, default_value_t = 4 << 20)]
    udp_buffer: usize,
    /// Seconds to wait after all workers are ready before the window starts, so handshake
    /// work does not count.
    #[arg(long, default_value_t = 5)]
    settle: u64,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run_main(args) {
        eprintln!("fleet-sim: {e:#}");
        std::process::exit(1);
    }
}

fn run_main(args: Args) -> Result<()> {
    if args.workers == 0 || args.workers > 99_999 {
        bail!("--workers must be between 1 and 99999");
    }
    if args.heartbeat_ms < 50 || args.connect_rate == 0 || args.conns_per_endpoint == 0 {
        bail!("--heartbeat-ms must be at least 50; --connect-rate and --conns-per-endpoint at least 1");
    }
    let bin = match &args.coordinator_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating this binary")?
            .with_file_name("drover"),
    };
    if !bin.is_file() {
        bail!(
            "no coordinator binary at {}; build it with `cargo build --release -p drover-coordinator` \
             or pass --coordinator-bin",
            bin.display()
        );
    }
    let (temp, dir) = match &args.state_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (None, std::path::absolute(d)?)
        }
        None => {
            let t = tempfile::Builder::new().prefix("fleet-sim-").tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    eprintln!("fleet-sim: state directory {}", dir.display());

    let setup = Instant::now();
    let pki = certs::Pki::ensure(&dir.join("tls"))?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let configs = pki.worker_configs(args.workers, threads)?;
    let cert_setup_s = setup.elapsed().as_secs_f64();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = runtime.block_on(simulate(&args, &bin, &dir, &pki, configs, cert_setup_s));
    runtime.shutdown_timeout(Duration::from_secs(2));

    match (temp, args.keep) {
        (Some(t), true) => eprintln!("fleet-sim: kept {}", t.keep().display()),
        (Some(t), false) => drop(t),
        (None, _) => {}
    }
    let report = result?;
    if args.json {
        eprint!("{}", report.table());
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// A client endpoint on its own loopback socket with the buffers asked for.
fn client_endpoint(buffer: usize) -> Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("binding a client socket")?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = state.set_recv_buffer_size((&socket).into(), buffer);
    let _ = state.set_send_buffer_size((&socket).into(), buffer);
    let runtime = quinn::default_runtime().context("no async runtime for quinn")?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        runtime,
    )?)
}

async fn simulate(
    args: &Args,
    bin: &Path,
    dir: &Path,
    pki: &certs::Pki,
    configs: Vec<quinn::ClientConfig>,
    cert_setup_s: f64,
) -> Result<Report> {
    let n = args.workers;
    let lease_ms = args
        .lease_ms
        .unwrap_or_else(|| (args.heartbeat_ms * 10).max(10_000));
    let mut coord = Coordinator::start(bin, dir, pki, args.heartbeat_ms, lease_ms).await?;
    let pid = coord.pid_str();
    eprintln!(
        "fleet-sim: coordinator pid {pid} on {} (log {})",
        coord.addr,
        coord.log.display()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let coordinator_idle = procfs::memory(&pid)?;

    let endpoints = (0..n.div_ceil(args.conns_per_endpoint))
        .map(|_| client_endpoint(args.udp_buffer))
        .collect::<Result<Vec<_>>>()?;
    let sim_ports: Vec<u16> = endpoints
        .iter()
        .filter_map(|e| e.local_addr().ok().map(|a| a.port()))
        .collect();
    let shared = Arc::new(Shared {
        stats: worker::Stats::default(),
        coordinator: coord.addr,
        heartbeat: Duration::from_millis(args.heartbeat_ms),
        pace: Semaphore::new(0),
    });

    let mut tasks = JoinSet::new();
    tasks.spawn(pace(shared.clone(), args.connect_rate));
    for (i, cfg) in configs.into_iter().enumerate() {
        let ep = endpoints[i / args.conns_per_endpoint].clone();
        tasks.spawn(worker::run(shared.clone(), i, ep, cfg));
    }

    let outcome = measure(args, &mut coord, &shared, &sim_ports, n).await;

    // Stop the workers (the close reaches the coordinator as a goodbye), then the coordinator.
    shared.stats.stopping.store(true, Ordering::Relaxed);
    shared.pace.close();
    for ep in &endpoints {
        ep.close(
            drover_protocol::close_code::GOODBYE.into(),
            b"fleet-sim stopping",
        );
    }
    if tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tasks.shutdown().await;
    }
    for ep in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    }
    let exit = coord.stop().await?;
    let mut report = outcome?;
    report.coordinator_exit = exit;
    report.coordinator_idle = coordinator_idle;
    report.cert_setup_s = cert_setup_s;
    report.client_endpoints = endpoints.len();
    Ok(report)
}

/// Hand out connection permits at `rate` per second, keeping at most a second's worth banked.
async fn pace(shared: Arc<Shared>, rate: u32) {
    let step = Duration::from_millis(10);
    let per_step = f64::from(rate) / 100.0;
    let mut owed = 0.0;
    let mut tick = tokio::time::interval(step);
    while !shared.pace.is_closed() {
        tick.tick().await;
        owed += per_step;
        let whole = owed.floor();
        owed -= whole;
        if shared.pace.available_permits() < rate as usize {
            shared.pace.add_permits(whole as usize);
        }
    }
}

/// Ramp up, wait for all ready, settle, then measure the window.
async fn measure(
    args: &Args,
    coord: &mut Coordinator,
    shared: &Shared,
    sim_ports: &[u16],
    n: usize,
) -> Result<Report> {
    let pid = coord.pid_str();
    let stats = &shared.stats;
    let started = Instant::now();
    let ramp_limit = Duration::from_secs_f64(n as f64 / f64::from(args.connect_rate) * 3.0 + 120.0);
    let mut last_print = Instant::now();
    let ready_time = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !coord.running() {
            bail!(
                "the coordinator exited during the ramp; see {}",
                coord.log.display()
            );
        }
        let connected = stats.connected.load(Ordering::Relaxed) as usize;
        let print = last_print.elapsed() >= Duration::from_secs(2);
        if print {
            last_print = Instant::now();
            let coord_mem = procfs::memory(&pid).map(|m| m.vm_rss_kib).unwrap_or(0);
            eprintln!(
                "fleet-sim: [{:>4.0}s] registered {connected}/{n}  attempts {}  failures {}  coordinator RSS {:.1} MiB",
                started.elapsed().as_secs_f64(),
                stats.connect_attempts.load(Ordering::Relaxed),
                stats.failures.load(Ordering::Relaxed),
                coord_mem as f64 / 1024.0,
            );
            if let Some(e) = stats.last_error.lock().expect("stats lock").take() {
                eprintln!("fleet-sim:   last failure: {e}");
            }
        }
        if connected >= n {
            match coord.status().await {
                Ok(s) if s.workers.ready as usize >= n => break started.elapsed(),
                Ok(s) if print => {
                    eprintln!("fleet-sim:   coordinator reports {} ready", s.workers.ready)
                }
                Ok(_) => {}
                Err(e) => eprintln!("fleet-sim:   status failed: {e:#}"),
            }
        }
        if started.elapsed() > ramp_limit {
            bail!(
                "only {connected} of {n} workers registered within {ramp_limit:?}; see {}",
                coord.log.display()
            );
        }
    };
    eprintln!(
        "fleet-sim: all {n} workers ready after {:.1}s; settling {}s, then measuring {}s",
        ready_time.as_secs_f64(),
        args.settle,
        args.duration
    );
    tokio::time::sleep(Duration::from_secs(args.settle)).await;

    let ticks = procfs::clock_ticks();
    let c0 = CpuSnapshot::take(&pid)?;
    let s0 = CpuSnapshot::take("self")?;
    let st0 = stats.snapshot();
    stats.ack_latency_max_us.store(0, Ordering::Relaxed);
    let coord_drops0 = procfs::udp_drops(&[coord.addr.port()]);
    let sim_drops0 = procfs::udp_drops(sim_ports);
    let mut rss_max = 0;
    let window = Duration::from_secs(args.duration);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let window_start = Instant::now();
    while window_start.elapsed() < window {
        tick.tick().await;
        let m = procfs::memory(&pid)
            .with_context(|| format!("the coordinator exited; see {}", coord.log.display()))?;
        rss_max = rss_max.max(m.vm_rss_kib);
    }
    let c1 = CpuSnapshot::take(&pid)?;
    let s1 = CpuSnapshot::take("self")?;
    let st1 = stats.snapshot();
    let coordinator_end = procfs::memory(&pid)?;
    let sim_end = procfs::memory("self")?;
    let coord_drops = procfs::udp_drops(&[coord.addr.port()]) - coord_drops0;
    let sim_drops = procfs::udp_drops(sim_ports).saturating_sub(sim_drops0);
    let summary = coord.status().await?;
    let wall = c1.at.duration_since(c0.at).as_secs_f64();
    Ok(Report {
        workers: n,
        heartbeat_ms: args.heartbeat_ms,
        window_s: wall,
        client_endpoints: 0,
        machine: Machine::detect(),
        cert_setup_s: 0.0,
        ramp_s: ready_time.as_secs_f64(),
        coordinator_idle: Default::default(),
        coordinator_end,
        coordinator_rss_max_in_window_kib: rss_max.max(coordinator_end.vm_rss_kib),
        coordinator_cpu_cores: c1.cores_since(&c0, ticks),
        sim_cpu_cores: s1.cores_since(&s0, ticks),
        machine_busy_cores: c1.machine_cores_since(&c0, ticks),
        sim_end,
        heartbeats_sent_per_s: (st1.heartbeats_sent - st0.heartbeats_sent) as f64 / wall,
        acks_per_s: (st1.acks - st0.acks) as f64 / wall,
        ack_latency_p50_ms: st1.latency_quantile_ms(&st0, 0.5),
        ack_latency_p99_ms: st1.latency_quantile_ms(&st0, 0.99),
        ack_latency_max_ms: stats.ack_latency_max_us.load(Ordering::Relaxed) as f64 / 1000.0,
        failures_in_window: st1.failures - st0.failures,
        coordinator_udp_drops: coord_drops,
        sim_udp_drops: sim_drops,
        ready_at_end: summary.workers.ready,
        lost_at_end: summary.workers.lost,
        coordinator_exit: String::new(),
    })
}
