//! `task-bench`: the task path's speed, measured against the real release binaries.
//!
//! Starts a real `drover serve` and real `drover-worker`s on loopback (the end-to-end
//! harness's `TestFleet`, with the release builds next to this binary) and drives them with
//! the operator client library the CLI uses:
//!
//! - `latency`: dispatch latency, submit → the task's process running in its sandbox;
//! - `throughput`: N no-op tasks at once, drover with the full sandbox and with
//!   `isolation = "process"`, against HyperQueue (tests/bench/hq_noop.py), interleaved;
//! - `ingest`: durable event ingestion, coordinator-only with simulated workers over real
//!   QUIC + mTLS, and end to end from real tasks writing to `DROVER_EVENTS_FD`.
//!
//! Each module's doc defines exactly what it measures. This is a benchmark, not a test: it
//! asserts nothing about speed (it fails only when the system misbehaves: a task that does not
//! succeed, an event lost). docs/benchmarks.md ("Task path") records the results.
//!
//! ```text
//! cargo build --release -p drover-coordinator -p drover-worker-agent -p drover-tests
//! target/release/task-bench latency --samples 300          # --probe static|date|both
//! target/release/task-bench throughput --tasks 2000 --rounds 3   # --noop true|static
//! target/release/task-bench ingest
//! ```

#[path = "task_bench/bare.rs"]
mod bare;
#[path = "task_bench/common.rs"]
mod common;
#[path = "task_bench/ingest.rs"]
mod ingest;
#[path = "task_bench/latency.rs"]
mod latency;
#[path = "task_bench/throughput.rs"]
mod throughput;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use drover_protocol::task::{Isolation, NetworkPolicy};
use std::path::PathBuf;

/// Measure drover's task path: dispatch latency, no-op throughput against HyperQueue, and
/// durable event ingestion.
#[derive(Debug, Parser)]
#[command(name = "task-bench", max_term_width = 100)]
struct Args {
    /// Directory holding the `drover` and `drover-worker` binaries to measure [default: this
    /// binary's directory, i.e. target/release].
    #[arg(long, global = true, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Also print the results as JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum System {
    Sandbox,
    Process,
    Hq,
    Bare,
    BareCgroup,
    BareSandbox,
}

impl System {
    /// The level of a bare loop (tests/bench/bare_noop.c); `None` for a real system.
    fn bare_level(self) -> Option<bare::Level> {
        match self {
            System::Bare => Some(bare::Level::Plain),
            System::BareCgroup => Some(bare::Level::Cgroup),
            System::BareSandbox => Some(bare::Level::Sandbox),
            System::Sandbox | System::Process | System::Hq => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProbeChoice {
    Static,
    Date,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Noop {
    True,
    Static,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Submit → the task's program running (its first instruction, with the static probe), one
    /// task at a time, with the full sandbox and with `isolation = "process"`.
    Latency {
        /// Samples per isolation mode and probe.
        #[arg(long, default_value_t = 300)]
        samples: usize,
        /// What the task runs to stamp its start: `static` (tests/bench/stamp.c, built with
        /// `cc`: the stamp is its program's first instruction), `date` (`date +%s%N`: also its
        /// dynamic start-up), or `both`, one after the other for each isolation mode (the
        /// order swapped from one mode to the next).
        #[arg(long, value_enum, default_value_t = ProbeChoice::Both)]
        probe: ProbeChoice,
    },
    /// N no-op tasks at once until all completed: drover-sandbox, drover-process, HyperQueue,
    /// in turn, for several rounds.
    Throughput {
        #[arg(long, default_value_t = 2000)]
        tasks: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Operator connections submitting concurrently.
        #[arg(long, default_value_t = 8)]
        submitters: usize,
        /// The HyperQueue driver [default: tests/bench/hq_noop.py of this source tree].
        #[arg(long, value_name = "PATH")]
        hq_script: Option<PathBuf>,
        /// Which systems to run, in this order each round: `sandbox` (drover, full sandbox),
        /// `process` (drover, `isolation = "process"`), `hq` (HyperQueue), and the bare loops
        /// of tests/bench/bare_noop.c, the machine's ceilings (built with `cc`; the last two
        /// need root and cgroup v1): `bare` (fork, exec, wait), `bare-cgroup` (plus the
        /// attempt's own cgroup, as drover gives both isolations, reset and reused as drover's
        /// worker does), `bare-sandbox` (plus namespaces, a private /tmp, no_new_privs).
        #[arg(long, value_delimiter = ',', default_value = "sandbox,process,hq")]
        systems: Vec<System>,
        /// The no-op every system runs: `true`, or `static` (tests/bench/stamp.c built with
        /// `cc -DNOOP`: it only exits, without the ~1 ms of glibc start-up `true` costs on
        /// the build machines).
        #[arg(long, value_enum, default_value_t = Noop::True)]
        noop: Noop,
    },
    /// Events per second acknowledged after fsync, and the ack latency.
    Ingest {
        /// Simulated workers (one QUIC connection each).
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Attempt streams in all (one task each), split over the simulated workers.
        #[arg(long, default_value_t = 64)]
        streams: usize,
        /// Events per stream (the last is `exited`).
        #[arg(long, default_value_t = 5000)]
        events: u64,
        /// Unacknowledged events per stream; several values run one after another, each on a
        /// fresh coordinator [default: 256, the real worker's window].
        #[arg(long, value_delimiter = ',', default_value = "256")]
        window: Vec<usize>,
        /// Size of each event's payload, bytes (a stdout chunk).
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
        /// Real tasks flooding `DROVER_EVENTS_FD` at once in the end-to-end part (0: skip it).
        #[arg(long, default_value_t = 1)]
        e2e_tasks: usize,
        /// Events each end-to-end task writes.
        #[arg(long, default_value_t = 20000)]
        e2e_events: u64,
    },
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("task-bench: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn run(args: Args) -> Result<()> {
    let bins = common::use_binaries(args.bin_dir.as_deref())?;
    let machine = common::Machine::detect();
    eprintln!(
        "task-bench: binaries {}; {} CPUs ({}), kernel {}, load {}",
        bins.display(),
        machine.nproc,
        machine.cpu_model,
        machine.kernel,
        machine.loadavg
    );
    let rt = runtime()?;
    let result = match args.what {
        What::Latency { samples, probe } => latency_main(&rt, samples, probe)?,
        What::Throughput {
            tasks,
            rounds,
            submitters,
            hq_script,
            systems,
            noop,
        } => {
            let script = hq_script.unwrap_or_else(|| {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/hq_noop.py"))
            });
            // Built first; the guard removes it when the rounds are done.
            let built = match noop {
                Noop::True => None,
                Noop::Static => Some(latency::build_static_probe(true)?),
            };
            let noop = match &built {
                None => throughput::Noop {
                    name: "true",
                    program: "true".into(),
                },
                Some((_, exe)) => throughput::Noop {
                    name: "static",
                    program: exe.display().to_string(),
                },
            };
            throughput_main(
                &rt,
                &noop,
                tasks,
                rounds,
                submitters.max(1),
                &systems,
                &script,
            )?
        }
        What::Ingest {
            workers,
            streams,
            events,
            window,
            payload_bytes,
            e2e_tasks,
            e2e_events,
        } => ingest_main(
            &rt,
            workers.max(1),
            streams.max(1),
            events.max(2),
            &window,
            payload_bytes,
            (e2e_tasks, e2e_events),
        )?,
    };
    eprintln!("task-bench: load at the end {}", common::loadavg());
    if args.json {
        let out = serde_json::json!({ "machine": machine, "load_end": common::loadavg(), "result": result });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

fn latency_main(
    rt: &tokio::runtime::Runtime,
    samples: usize,
    choice: ProbeChoice,
) -> Result<serde_json::Value> {
    // Built before the fleet starts; the guard removes it when the runs are done.
    let built = match choice {
        ProbeChoice::Date => None,
        ProbeChoice::Static | ProbeChoice::Both => Some(latency::build_static_probe(false)?),
    };
    let mut probes: Vec<latency::Probe> = built
        .iter()
        .map(|(_, exe)| latency::Probe::Static(exe.clone()))
        .collect();
    if choice != ProbeChoice::Static {
        probes.push(latency::Probe::Date);
    }
    let fleet = common::start_fleet(1);
    let settings = common::operator_settings(&fleet);
    let mut baselines = serde_json::Map::new();
    for probe in &probes {
        let baseline = latency::exec_baseline(probe, samples.min(200))?;
        eprintln!(
            "exec baseline ({} probe spawned directly): {}",
            probe.name(),
            baseline.line("ms")
        );
        baselines.insert(probe.name().into(), serde_json::to_value(baseline)?);
    }
    let mut reports = Vec::new();
    let runs = [
        (Isolation::Sandbox, NetworkPolicy::None),
        (Isolation::Sandbox, NetworkPolicy::Host),
        (Isolation::Process, NetworkPolicy::Host),
    ];
    for (k, (isolation, network)) in runs.into_iter().enumerate() {
        // Neither probe always goes first.
        let order: Vec<&latency::Probe> = if k % 2 == 0 {
            probes.iter().collect()
        } else {
            probes.iter().rev().collect()
        };
        for probe in order {
            let cpu0 = common::MachineCpu::take();
            let r = rt.block_on(latency::run(&settings, isolation, network, probe, samples))?;
            let busy =
                common::MachineCpu::take().busy_cores_since(&cpu0, common::Machine::detect().nproc);
            eprintln!(
                "{} (network {}, {} probe): dispatch {}\n  submit ack {}\n  stages (means): submitted→assigned {:.2} ms, \
                 assigned→started {:.2} ms, started→stamp {:.2} ms; machine busy {busy:.2} cores",
                r.isolation,
                r.network,
                r.probe,
                r.dispatch_ms.line("ms"),
                r.submit_ack_ms.line("ms"),
                r.stage_submitted_to_assigned_ms,
                r.stage_assigned_to_started_ms,
                r.stage_started_to_stamp_ms
            );
            reports.push(serde_json::json!({ "report": r, "machine_busy_cores": busy }));
        }
    }
    drop(fleet);
    drop(built);
    Ok(serde_json::json!({ "exec_baseline_ms": baselines, "runs": reports }))
}

fn throughput_main(
    rt: &tokio::runtime::Runtime,
    noop: &throughput::Noop,
    tasks: usize,
    rounds: usize,
    submitters: usize,
    systems: &[System],
    hq_script: &std::path::Path,
) -> Result<serde_json::Value> {
    let cores = common::Machine::detect().nproc;
    // Built before the first round; the guard removes it when the rounds are done.
    let bare_exe = systems
        .iter()
        .any(|s| s.bare_level().is_some())
        .then(bare::build)
        .transpose()?;
    let mut all = Vec::new();
    for round in 1..=rounds {
        let mut row = Vec::new();
        for system in systems {
            let isolation = match (system, system.bare_level(), &bare_exe) {
                (System::Hq, _, _) => {
                    row.push(throughput::hq_run(hq_script, noop, tasks, cores)?);
                    continue;
                }
                (_, Some(level), Some((_, exe))) => {
                    row.push(bare::run(exe, level, noop, tasks)?);
                    continue;
                }
                (System::Sandbox, _, _) => Isolation::Sandbox,
                (System::Process, _, _) => Isolation::Process,
                _ => unreachable!("a bare loop's program is built before the first round"),
            };
            let fleet = common::start_fleet(1);
            let r = rt.block_on(throughput::drover_run(
                noop, &fleet, isolation, tasks, submitters,
            ))?;
            drop(fleet);
            row.push(r);
        }
        for r in &row {
            eprintln!(
                "round {round}: {:<22} {:>6} tasks in {:>7.2} s = {:>7.1} tasks/s (no-op {}; submitted in {:.2} s; {} failed; machine busy {:.2} cores, {:.2} ms of machine CPU per task{})",
                r.system, r.tasks, r.total_s, r.tasks_per_s, r.noop, r.submit_s, r.failed, r.machine_busy_cores, r.machine_cpu_ms_per_task,
                match (r.coordinator_cpu_ms_per_task, r.worker_cpu_ms_per_task) {
                    (Some(c), Some(w)) => format!("; coordinator {c:.2} ms, worker {w:.2} ms"),
                    _ => String::new(),
                }
            );
        }
        if let Some(hq) = row.iter().find(|r| r.system.starts_with("hyperqueue")) {
            for r in row
                .iter()
                .filter(|r| r.system.starts_with("drover") || r.system.starts_with("bare"))
            {
                eprintln!(
                    "round {round}: {} / HyperQueue = {:.2}×",
                    r.system,
                    r.tasks_per_s / hq.tasks_per_s
                );
            }
            // The goals against the bare loops: what each leaves drover per task.
            for (goal, factor, bare_name) in [
                ("process", 2.0, "bare-cgroup"),
                ("sandbox", 1.0, "bare-sandbox"),
            ] {
                let Some(b) = row.iter().find(|r| r.system == bare_name) else {
                    continue;
                };
                let goal_rate = factor * hq.tasks_per_s;
                eprintln!(
                    "round {round}: goal for {goal}: {factor}× HyperQueue = {goal_rate:.1} tasks/s, {:.0} % of {bare_name}'s {:.1}; at {cores} cores busy it allows {:.2} ms of CPU per task, {bare_name} takes {:.2}, leaving {:.2} ms for everything else",
                    100.0 * goal_rate / b.tasks_per_s,
                    b.tasks_per_s,
                    cores as f64 * 1000.0 / goal_rate,
                    b.machine_cpu_ms_per_task,
                    bare::budget_ms(cores, hq.tasks_per_s, factor, b.machine_cpu_ms_per_task),
                );
            }
        }
        all.push(row);
    }
    Ok(serde_json::to_value(all)?)
}

fn ingest_main(
    rt: &tokio::runtime::Runtime,
    workers: usize,
    streams: usize,
    events: u64,
    windows: &[usize],
    payload_bytes: usize,
    (e2e_tasks, e2e_events): (usize, u64),
) -> Result<serde_json::Value> {
    let mut reports = Vec::new();
    for &window in windows {
        let mut fleet = drover_tests::TestFleet::builder()
            .heartbeat_interval_ms(1000)
            .lease_ms(10_000)
            .build();
        fleet.start_coordinator_and_wait();
        let r = rt.block_on(ingest::sim(
            &fleet,
            workers,
            streams,
            events,
            window.max(1),
            payload_bytes,
        ))?;
        print_ingest(&r);
        reports.push(r);
    }
    if e2e_tasks > 0 {
        let fleet = common::start_fleet(1);
        for isolation in [Isolation::Sandbox, Isolation::Process] {
            let r = rt.block_on(ingest::e2e(&fleet, e2e_tasks, e2e_events, isolation))?;
            print_ingest(&r);
            reports.push(r);
        }
    }
    Ok(serde_json::to_value(reports)?)
}

fn print_ingest(r: &ingest::IngestReport) {
    eprintln!(
        "{}: {} events over {} stream(s){} in {:.2} s = {:.0} events/s; payload {} B; coordinator {} cores; machine busy {:.2} cores",
        r.mode,
        r.events,
        r.streams,
        r.window.map_or(String::new(), |w| format!(" (window {w})")),
        r.seconds,
        r.events_per_s,
        r.payload_bytes,
        r.coordinator_cores.map_or("?".into(), |c| format!("{c:.2}")),
        r.machine_busy_cores
    );
    if let Some(e) = r.events_per_coordinator_cpu_s {
        eprintln!("  {e:.0} events per second of coordinator CPU time");
    }
    if let Some(a) = &r.ack_ms {
        eprintln!("  ack latency {}", a.line("ms"));
    }
}
