//! `drover dev`: a whole local fleet in one command — a generated CA and certificates, a
//! coordinator and N workers as child processes, logs in the state directory — stopped
//! cleanly (SIGTERM, then SIGKILL after a deadline) on Ctrl-C or SIGTERM.

use super::client::OperatorClient;
use super::settings::Resolved;
use super::{exit, CliError};
use crate::pki::{self, CertRequest, Validity};
use clap::Args;
use drover_protocol::{OperatorRequest, OperatorResponse, Role};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::{Child, Command};

/// How long children get to stop after SIGTERM before they are killed.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct DevArgs {
    /// How many local workers to start.
    #[arg(long, short = 'n', default_value_t = 2)]
    pub workers: u32,
    /// Directory for the CA, certificates, configs, database and logs (reused if present).
    #[arg(long, default_value = ".drover-dev", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// UDP port for the coordinator [default: 7070, or a free port if 7070 is taken].
    #[arg(long)]
    pub port: Option<u16>,
    /// Path to the drover-worker binary [default: next to this drover, then $PATH].
    #[arg(long, value_name = "PATH")]
    pub worker_bin: Option<PathBuf>,
}

struct Proc {
    label: String,
    child: Child,
    log: PathBuf,
}

pub async fn run(args: DevArgs) -> Result<(), CliError> {
    if args.workers == 0 || args.workers > 64 {
        return Err(CliError::new(
            exit::USAGE,
            "--workers must be between 1 and 64",
        ));
    }
    let dir = std::path::absolute(&args.state_dir)
        .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    let tls = dir.join("tls");
    let logs = dir.join("logs");
    for d in [&dir, &tls, &logs] {
        std::fs::create_dir_all(d).map_err(|e| {
            CliError::new(exit::FAILURE, format!("cannot create {}: {e}", d.display()))
        })?;
    }
    let names: Vec<String> = (1..=args.workers)
        .map(|i| format!("dev-worker-{i}"))
        .collect();
    make_certs(&tls, &names)?;
    let port = pick_port(args.port)?;
    let addr = format!("127.0.0.1:{port}");
    write_configs(&dir, &addr, &names)?;

    let drover =
        std::env::current_exe().map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    let worker_bin = find_worker_bin(args.worker_bin.as_deref(), &drover)?;
    let settings = Resolved {
        coordinator: addr.clone(),
        server_name: drover_protocol::identity::COORDINATOR_SERVER_NAME.into(),
        ca: tls.join(pki::CA_CERT_FILE),
        cert: tls.join("dev-operator.crt"),
        key: tls.join("dev-operator.key"),
    };

    let mut procs = Vec::new();
    let result = start_fleet(&dir, &drover, &worker_bin, &names, &settings, &mut procs).await;
    if let Err(e) = result {
        stop_all(&mut procs).await;
        return Err(e);
    }
    print_banner(&dir, &addr, &drover, &procs, &names);
    let outcome = wait_for_stop(&mut procs).await;
    eprintln!("drover dev: stopping {} processes", procs.len());
    stop_all(&mut procs).await;
    eprintln!("drover dev: stopped");
    outcome
}

async fn start_fleet(
    dir: &Path,
    drover: &Path,
    worker_bin: &Path,
    names: &[String],
    settings: &Resolved,
    procs: &mut Vec<Proc>,
) -> Result<(), CliError> {
    eprintln!("drover dev: starting the coordinator");
    procs.push(spawn(
        "coordinator",
        drover,
        &["serve", "--config"],
        &dir.join("coordinator.toml"),
        &dir.join("logs/coordinator.log"),
    )?);
    wait_until(
        Duration::from_secs(15),
        "the coordinator to answer",
        procs,
        || async {
            let mut c = OperatorClient::connect(settings).await.ok()?;
            let r = c.request(&OperatorRequest::FleetStatus).await.ok();
            c.close().await;
            r
        },
    )
    .await?;
    for name in names {
        eprintln!("drover dev: starting {name}");
        let log = dir.join(format!("logs/{name}.log"));
        procs.push(spawn(
            name,
            worker_bin,
            &["--config"],
            &dir.join(format!("{name}.toml")),
            &log,
        )?);
    }
    let want = names.len() as u32;
    wait_until(
        Duration::from_secs(20),
        "every worker to register",
        procs,
        || async {
            let mut c = OperatorClient::connect(settings).await.ok()?;
            let r = c.request(&OperatorRequest::FleetStatus).await.ok();
            c.close().await;
            match r {
                Some(OperatorResponse::FleetStatus(s)) if s.workers.ready >= want => Some(()),
                _ => None,
            }
        },
    )
    .await?;
    Ok(())
}

fn spawn(
    label: &str,
    bin: &Path,
    args: &[&str],
    config: &Path,
    log: &Path,
) -> Result<Proc, CliError> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("cannot open log {}: {e}", log.display()),
            )
        })?;
    let err = out
        .try_clone()
        .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    let child = Command::new(bin)
        .args(args)
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .env_remove("NOTIFY_SOCKET")
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("cannot start {}: {e}", bin.display()),
            )
        })?;
    Ok(Proc {
        label: label.into(),
        child,
        log: log.into(),
    })
}

/// Poll `probe` until it yields, a child dies, or the deadline passes; prints progress.
async fn wait_until<F, Fut, T>(
    deadline: Duration,
    what: &str,
    procs: &mut [Proc],
    mut probe: F,
) -> Result<T, CliError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    let mut last_note = start;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(CliError::new(
                    exit::FAILURE,
                    format!(
                        "{} exited ({status}) while waiting for {what}; see {}",
                        p.label,
                        p.log.display()
                    ),
                ));
            }
        }
        if start.elapsed() > deadline {
            return Err(CliError::new(
                exit::FAILURE,
                format!(
                    "timed out after {}s waiting for {what}; logs are in {}",
                    deadline.as_secs(),
                    procs[0]
                        .log
                        .parent()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
            ));
        }
        if last_note.elapsed() > Duration::from_secs(3) {
            eprintln!(
                "drover dev: still waiting for {what} ({}s)",
                start.elapsed().as_secs()
            );
            last_note = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for_stop(procs: &mut [Proc]) -> Result<(), CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = check.tick() => {
                for p in procs.iter_mut() {
                    if let Ok(Some(status)) = p.child.try_wait() {
                        return Err(CliError::new(exit::FAILURE, format!(
                            "{} exited unexpectedly ({status}); see {}", p.label, p.log.display())));
                    }
                }
            }
        }
    }
}

/// Stop the workers first, so their goodbyes reach a live coordinator and they are recorded
/// `down`, then the coordinator. Each gets SIGTERM, then SIGKILL at the deadline.
async fn stop_all(procs: &mut [Proc]) {
    let (coordinator, workers): (Vec<&mut Proc>, Vec<&mut Proc>) =
        procs.iter_mut().partition(|p| p.label == "coordinator");
    stop_group(workers).await;
    stop_group(coordinator).await;
}

async fn stop_group(mut group: Vec<&mut Proc>) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for p in group.iter_mut() {
        if let Some(pid) = p.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for p in group.iter_mut() {
        if tokio::time::timeout(STOP_DEADLINE, p.child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "drover dev: {} did not stop within {}s; killing it",
                p.label,
                STOP_DEADLINE.as_secs()
            );
            let _ = p.child.kill().await;
        }
    }
}

fn make_certs(tls: &Path, workers: &[String]) -> Result<(), CliError> {
    let fail = |e: pki::PkiError| CliError::new(exit::FAILURE, e.to_string());
    if !tls.join(pki::CA_KEY_FILE).exists() {
        pki::create_ca(tls, "dev").map_err(fail)?;
    }
    let mut want = vec![
        (Role::Coordinator, "coordinator".to_owned()),
        (Role::Operator, "dev-operator".to_owned()),
    ];
    want.extend(workers.iter().map(|n| (Role::Worker, n.clone())));
    for (role, name) in want {
        if tls.join(format!("{name}.crt")).exists() {
            continue;
        }
        let req = CertRequest {
            role,
            name,
            validity: Validity::Days(365),
            extra_sans: vec![],
        };
        pki::issue_cert(tls, tls, &req, false).map_err(fail)?;
    }
    Ok(())
}

fn pick_port(port: Option<u16>) -> Result<u16, CliError> {
    let try_bind = |p: u16| {
        std::net::UdpSocket::bind(("127.0.0.1", p))
            .ok()
            .and_then(|s| s.local_addr().ok())
            .map(|a| a.port())
    };
    match port {
        Some(p) => try_bind(p).ok_or_else(|| {
            CliError::new(
                exit::FAILURE,
                format!("UDP port {p} on 127.0.0.1 is in use; pick another with --port"),
            )
        }),
        None => try_bind(7070)
            .or_else(|| try_bind(0))
            .ok_or_else(|| CliError::new(exit::FAILURE, "no free UDP port on 127.0.0.1")),
    }
}

fn write_configs(dir: &Path, addr: &str, workers: &[String]) -> Result<(), CliError> {
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text)
            .map_err(|e| CliError::new(exit::FAILURE, format!("cannot write {}: {e}", p.display())))
    };
    write(
        "coordinator.toml",
        format!(
            "# Written by `drover dev`; rewritten on every start.\nlisten = \"{addr}\"\nstate_dir = \"state\"\n\n[tls]\nca = \"tls/ca.crt\"\ncert = \"tls/coordinator.crt\"\nkey = \"tls/coordinator.key\"\n# The dev CA's key: lets `drover token create` enroll more workers into the dev fleet.\nca_key = \"tls/ca.key\"\n"
        ),
    )?;
    write(
        "cli.toml",
        format!("# Written by `drover dev`. Use with: export DROVER_CONFIG={}/cli.toml\ncoordinator = \"{addr}\"\nca = \"tls/ca.crt\"\ncert = \"tls/dev-operator.crt\"\nkey = \"tls/dev-operator.key\"\n", dir.display()),
    )?;
    for name in workers {
        write(
            &format!("{name}.toml"),
            format!(
                "# Written by `drover dev`; rewritten on every start.\ncoordinator = \"{addr}\"\nwork_dir = \"work/{name}\"\nlabels = [\"dev\"]\n\n[tls]\nca = \"tls/ca.crt\"\ncert = \"tls/{name}.crt\"\nkey = \"tls/{name}.key\"\n"
            ),
        )?;
    }
    Ok(())
}

fn find_worker_bin(given: Option<&Path>, drover: &Path) -> Result<PathBuf, CliError> {
    if let Some(p) = given {
        return Ok(p.into());
    }
    let beside = drover.with_file_name("drover-worker");
    if beside.is_file() {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("drover-worker"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CliError::new(
                exit::FAILURE,
                format!(
                    "cannot find the drover-worker binary next to {} or on PATH; build it with \
                     `cargo build --release` or pass --worker-bin PATH",
                    drover.display()
                ),
            )
        })
}

fn print_banner(dir: &Path, addr: &str, drover: &Path, procs: &[Proc], names: &[String]) {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("drover") == drover))
        .unwrap_or(false);
    let cmd = if on_path {
        "drover".to_owned()
    } else {
        drover.display().to_string()
    };
    outln!(
        "drover dev: local fleet running (state in {})",
        dir.display()
    );
    for p in procs {
        let pid = p
            .child
            .id()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into());
        let what = if p.label == "coordinator" {
            format!("coordinator {addr}")
        } else {
            format!("worker {}", p.label)
        };
        outln!("  {what:<32} pid {pid:<8} log {}", p.log.display());
    }
    outln!();
    outln!("Try, in another shell:");
    outln!("  export DROVER_CONFIG={}/cli.toml", dir.display());
    outln!("  {cmd} status");
    outln!("  {cmd} workers");
    outln!("  {cmd} worker show {}", names[0]);
    outln!("  {cmd} workers --json");
    if Path::new("examples/hello.toml").exists() {
        outln!("  {cmd} submit examples/hello.toml --follow");
        outln!("  {cmd} tasks");
    }
    outln!();
    outln!("Press Ctrl-C to stop the fleet.");
}
