//! `drover-worker`: the per-host daemon. Thin: parse flags, load config (exit 64 on bad
//! config, before any socket is opened), detect resources, run the link until SIGTERM/SIGINT.

use clap::Parser;
use drover_worker::config::{WorkerConfig, DEFAULT_CONFIG_PATH};
use drover_worker::link::Link;
use drover_worker::resources::Resources;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Report this host's resources to a drover coordinator and run its tasks.
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
    /// Write the drover-worker(1) man page into DIR and exit (used by packaging).
    #[arg(long, hide = true, value_name = "DIR")]
    manpage_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Join a fleet with a join token (`drover token create`): make this worker's key here,
    /// get a certificate from the coordinator, and install it with the CA certificate at the
    /// config's tls.cert, tls.key (mode 0600) and tls.ca paths. Then start the service.
    /// Exits 0 when enrolled, 69 when the coordinator cannot be reached, 77 when it refuses.
    Join {
        /// The coordinator's address, host:port [default: `coordinator` from the config].
        #[arg(long, value_name = "HOST:PORT")]
        coordinator: Option<String>,
        /// SHA-256 fingerprint of the fleet CA, as `drover token create` prints it.
        #[arg(long, value_name = "FP")]
        ca_fingerprint: String,
        /// The join token. Also read from the environment variable DROVER_JOIN_TOKEN, which
        /// keeps it out of the process list.
        #[arg(long, env = "DROVER_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// The name to ask for [default: this host's name; a token made with --name wins].
        #[arg(long)]
        name: Option<String>,
    },
}

/// Enroll (see `drover-worker join`); returns the exit status.
fn join(config: &WorkerConfig, ca_fingerprint: &str, token: &str, name: &str) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover-worker: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(drover_worker::enroll::enroll(
        config,
        ca_fingerprint,
        token,
        name,
    )) {
        Ok(name) => {
            println!(
                "enrolled as {name}: certificate {}, key {}",
                config.tls.cert.display(),
                config.tls.key.display()
            );
            0
        }
        Err(e) => {
            eprintln!("drover-worker: enrollment failed: {e}");
            e.exit_code()
        }
    }
}

fn main() {
    // First: this binary is also the sandbox's standby helper (and says so to the sandbox).
    drover_worker::sandbox::standby::run_helper_or_enable();
    let args = Args::parse();
    if let Some(dir) = &args.manpage_dir {
        let man = clap_mangen::Man::new(<Args as clap::CommandFactory>::command());
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| man.generate_to(dir))
            .map(|_| ());
        if let Err(e) = written {
            eprintln!(
                "drover-worker: cannot write the man page into {}: {e}",
                dir.display()
            );
            std::process::exit(1);
        }
        return;
    }
    drover_worker::logging::init("drover-worker", "info");
    if let Some(Sub::Join {
        coordinator,
        ca_fingerprint,
        token,
        name,
    }) = &args.command
    {
        // The config file is optional here: without one, the default paths are used.
        let mut config = if args.config.exists() {
            match WorkerConfig::load(&args.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("drover-worker: {e}");
                    std::process::exit(64);
                }
            }
        } else {
            WorkerConfig::default()
        };
        if let Some(c) = coordinator {
            config.coordinator = c.clone();
        }
        let name = name
            .clone()
            .unwrap_or_else(|| drover_worker::enroll::default_name(&config));
        std::process::exit(join(&config, ca_fingerprint, token, &name));
    }
    let config = match WorkerConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("drover-worker: {e}");
            std::process::exit(64);
        }
    };
    if args.print_config {
        // The join token is a secret: show that one is set, never its value.
        let mut shown = config.clone();
        if shown.join_token.is_some() {
            shown.join_token = Some("<set, not shown>".into());
        }
        print!("{}", toml::to_string_pretty(&shown).unwrap_or_default());
        return;
    }
    if !config.tls.cert.exists() {
        if let (Some(token), Some(fp)) = (&config.join_token, &config.ca_fingerprint) {
            let name = drover_worker::enroll::default_name(&config);
            let code = join(&config, fp, token, &name);
            if code != 0 {
                std::process::exit(code);
            }
        }
    }
    if config.join_token.is_some() && config.tls.cert.exists() {
        match drover_worker::enroll::forget_token(&args.config) {
            Ok(true) => {
                tracing::info!(config = %args.config.display(), "removed the used join_token from the config")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(config = %args.config.display(), error = %e, "cannot remove join_token from the config; remove it by hand (it is used up)")
            }
        }
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
            Err(drover_worker::link::LinkError::Tls(e)) => {
                let files = drover_worker::pki::TlsFiles {
                    ca: config.tls.ca.clone(),
                    cert: config.tls.cert.clone(),
                    key: config.tls.key.clone(),
                };
                match e.config_key(&files) {
                    Some(key) => eprintln!("drover-worker: {}: key `{key}`: {e}", args.config.display()),
                    None => eprintln!("drover-worker: {}: TLS setup failed: {e}", args.config.display()),
                }
                return 64;
            }
            Err(e) => {
                eprintln!("drover-worker: {e}");
                return 1;
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
