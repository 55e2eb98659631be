//! `drover`: the coordinator daemon and operator CLI. Everything lives in the library; this
//! parses the command line, sets up logging and maps errors to exit codes.

use clap::Parser;
use drover::cli::{run::run, Cli, Command};

fn main() {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    drover::logging::init("drover", default_log);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // Half the CPUs, at least one (TOKIO_WORKER_THREADS overrides): the coordinator's state
    // lives in one task and its database in one thread, so more runtime threads mostly hand
    // wake-ups back and forth; on 2 CPUs one thread took about 10% less CPU per task than two
    // (docs/benchmarks.md). The CLI's one request needs no more either.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        builder.worker_threads((cpus / 2).max(1));
    }
    // No LIFO slot: with it, a task woken by the one running runs next, so each attempt
    // stream that wrote its ack woke the QUIC connection's driver, which sent that ack in a
    // packet of its own before the next stream wrote; without it the acks of one commit share
    // packets. Ingestion at 64 streams x window 4 went from 94-110k to 111-142k events/s
    // (docs/benchmarks.md). An unstable tokio option: see .cargo/config.toml.
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("drover: {}", e.message);
        std::process::exit(e.code);
    }
}
