//! Failover benchmark: how long from SIGKILL of a worker to its task running on another worker.
//!
//! Starts a real coordinator and `--workers` real workers on loopback with the coordinator's
//! LAN defaults (heartbeat 500 ms, lease 3000 ms, unless overridden), then `--runs` times:
//! submit a long task, wait until it runs, wait a random 0–1 s (so the kill lands anywhere in
//! the heartbeat cycle), SIGKILL the task's worker, and read from the coordinator's database
//! (directly, read-only) the `started` event of the next attempt. The failover time is that
//! event's timestamp (stamped by the new worker when the process started) minus the time of the
//! kill; both clocks are this host's. The killed worker is restarted and the task cancelled
//! before the next run. Prints every sample, then p50, p99 and max.
//!
//! Needs root (the sandbox) and the binaries (`cargo build --workspace`):
//! `cargo run -p drover-tests --bin failover-bench -- --runs 30`.

use anyhow::{bail, Context as _};
use clap::Parser;
use drover_protocol::task::{TaskInfo, TaskState};
use drover_tests::checker::read_sessions;
use drover_tests::{TestFleet, DEADLINE};
use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Parser)]
#[command(about = "Measure failover time: worker SIGKILL -> its task running on another worker")]
struct Args {
    /// Number of kills measured.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Workers in the fleet (at least 2).
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Coordinator heartbeat interval in ms (the coordinator's default: 500).
    #[arg(long, default_value_t = 500)]
    heartbeat_ms: u64,
    /// Coordinator lease in ms (the coordinator's default: 3000).
    #[arg(long, default_value_t = 3000)]
    lease_ms: u64,
    /// Turn the coordinator's liveness probe off (`liveness_probe = false`): lease only.
    #[arg(long)]
    no_probe: bool,
    /// Seed of the random kill timing (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        bail!("failover-bench runs tasks in the sandbox and needs root");
    }
    if args.workers < 2 {
        bail!("--workers must be at least 2: the task has to move somewhere");
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut fleet = TestFleet::builder()
        .workers(args.workers)
        .heartbeat_interval_ms(args.heartbeat_ms)
        .lease_ms(args.lease_ms)
        .build();
    if args.no_probe {
        let toml = std::fs::read_to_string(fleet.coordinator_config())?;
        std::fs::write(
            fleet.coordinator_config(),
            format!("liveness_probe = false\n{toml}"),
        )?;
    }
    fleet.start_coordinator();
    fleet.start_all_workers();
    fleet.wait_all_ready();
    let spec = fleet.dir().join("long.toml");
    std::fs::write(
        &spec,
        "name = \"long\"\ncommand = [\"sleep\", \"600\"]\n[retry]\nmax_attempts = 5\nbackoff = \"0s\"\n",
    )?;
    let mut samples = Vec::new();
    for run in 0..args.runs {
        let out = fleet.cli(&["submit", spec.to_str().context("utf-8 path")?]);
        if !out.status.success() {
            bail!("submit: {}", String::from_utf8_lossy(&out.stderr));
        }
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let t: TaskInfo = fleet.wait_for(DEADLINE, "the task to run", || {
            match fleet.try_cli_json::<TaskInfo>(&["task", "show", &id, "--json"]) {
                Ok(t) if t.state == TaskState::Running => Ok(t),
                Ok(t) => Err(format!("{}", t.state)),
                Err(e) => Err(e),
            }
        });
        let victim = t.worker.context("running task without a worker")?;
        let first_epoch = t.epoch;
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..1000)));
        let killed_at = now_ms();
        fleet.stop_worker(&victim, Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(30);
        let started = loop {
            let sessions = read_sessions(&fleet.db_path())?;
            let found = sessions.get(&id).and_then(|evs| {
                let started = evs
                    .iter()
                    .find(|e| e.kind == "started" && e.epoch > first_epoch)?;
                let assigned = evs
                    .iter()
                    .find(|e| e.kind == "assigned" && e.epoch == started.epoch)?;
                Some((
                    started.ts_ms,
                    assigned.json()["worker"].as_str()?.to_owned(),
                ))
            });
            if let Some((ts, on)) = found {
                if on == victim {
                    bail!("run {run}: task {id} restarted on the killed worker {victim}");
                }
                break ts;
            }
            if Instant::now() > deadline {
                bail!(
                    "run {run}: task {id} did not start again within 30 s\n{}",
                    fleet.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let ms = started.saturating_sub(killed_at);
        println!("run {run:>3}: worker {victim} killed, task {id} running again after {ms} ms");
        samples.push(ms);
        let _ = fleet.cli(&["cancel", &id]);
        fleet.start_worker(&victim);
        fleet.wait_all_ready();
    }
    samples.sort_unstable();
    println!(
        "failover over {} runs (heartbeat {} ms, lease {} ms, liveness probe {}): p50 {} ms, p99 {} ms, max {} ms, min {} ms",
        samples.len(),
        args.heartbeat_ms,
        args.lease_ms,
        if args.no_probe { "off" } else { "on" },
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples.last().copied().unwrap_or(0),
        samples.first().copied().unwrap_or(0),
    );
    Ok(())
}
