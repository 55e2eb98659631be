//! `drover-worker`: the per-host daemon. Thin: parse flags, load config (exit 64 on bad
//! config, before any socket is opened), detect resources, run the link until SIGTERM/SIGINT.

use clap::Parser;
use drover_worker::config::{WorkerConfig, DEFAULT_CONFIG_PATH};
use drover_worker::link::Link;
use drover_worker::resources::Resources;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// drover-worker: report this host's resources to a drover coordinator and run its tasks.
///
/// Connects over QUIC with mutual TLS (a worker certificate from the fleet CA), registers,
/// heartbeats, and reconnects with capped exponential backoff whenever the coordinator is
/// away. It never exits because the coordinator is down; SIGTERM stops it cleanly.
#[derive(Debug, Parser)]
#[command(
    name = "drover-worker",
    version,
    max_term_width = 100,
    after_long_help = "\
EXIT STATUS:
  0   stopped by SIGTERM or SIGINT
  1   could not start (for example: unreadable certificate)
  64  bad configuration (the message names the file and key)"
)]
struct Args {
    /// Worker config file.
    #[arg(long, short = 'c', value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Print the resource report this host would send, as JSON, and exit.
    #[arg(long)]
    print_resources: bool,
}

fn main() {
    let args = Args::parse();
    drover_worker::logging::init("drover-worker", "info");
    let config = match WorkerConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("drover-worker: {e}");
            std::process::exit(64);
        }
    };
    if args.print_config {
        print!("{}", toml::to_string_pretty(&config).unwrap_or_default());
        return;
    }
    if let Err(e) = std::fs::create_dir_all(&config.work_dir) {
        eprintln!(
            "drover-worker: cannot create work directory {} (config key `work_dir` in {}): {e}",
            config.work_dir.display(),
            args.config.display()
        );
        std::process::exit(64);
    }
    let mut resources = Resources::detect(&config.work_dir, &config.labels);
    if args.print_resources {
        println!(
            "{}",
            serde_json::to_string_pretty(&resources.report()).unwrap_or_default()
        );
        return;
    }
    // One thread is plenty for a control link, and keeps the idle footprint small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover-worker: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        let link = match Link::new(config.clone()) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("drover-worker: {e}");
                return if matches!(e, drover_worker::link::LinkError::Tls(_)) { 64 } else { 1 };
            }
        };
        tracing::info!(
            worker = %link.name(), coordinator = %config.coordinator, version = env!("CARGO_PKG_VERSION"),
            "drover-worker starting"
        );
        let shutdown = CancellationToken::new();
        let run = link.run(resources, shutdown.clone());
        tokio::pin!(run);
        tokio::select! {
            _ = &mut run => {}
            // After the signal, let the link say goodbye before returning.
            _ = drover_worker::shutdown_on_signal(shutdown) => run.await,
        }
        tracing::info!("drover-worker stopped");
        0
    });
    std::process::exit(code);
}
