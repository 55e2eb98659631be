//! The coordinator under test: the real `drover serve` binary as a child process, with a
//! config written for the run, its log in the state directory, and an operator session to
//! ask it how many workers are ready.

use anyhow::{bail, Context, Result};
use drover::cli::client::OperatorClient;
use drover::cli::settings::Resolved;
use drover_protocol::identity::COORDINATOR_SERVER_NAME;
use drover_protocol::{FleetSummary, OperatorRequest, OperatorResponse};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

use super::certs::{Pki, COORDINATOR_NAME, OPERATOR_NAME};

/// How long the coordinator gets to stop after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct Coordinator {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub log: PathBuf,
    operator: Resolved,
}

/// A free UDP port on loopback (free when asked; the coordinator binds it right after).
fn free_port() -> Result<u16> {
    let s = UdpSocket::bind("127.0.0.1:0").context("binding a probe UDP socket")?;
    Ok(s.local_addr()?.port())
}

impl Coordinator {
    /// Write `coordinator.toml` into `dir` (database in `dir/db`, emptied first) and start
    /// `bin serve` with it.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        pki: &Pki,
        heartbeat_ms: u64,
        lease_ms: u64,
    ) -> Result<Self> {
        let db = dir.join("db");
        if db.exists() {
            std::fs::remove_dir_all(&db).with_context(|| format!("emptying {}", db.display()))?;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let tls = pki.files(COORDINATOR_NAME);
        let config = format!(
            "listen = \"{addr}\"\nstate_dir = \"{}\"\nheartbeat_interval_ms = {heartbeat_ms}\n\
             lease_ms = {lease_ms}\n\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            db.display(),
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display(),
        );
        let config_path = dir.join("coordinator.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log = dir.join("coordinator.log");
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("DROVER_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} serve", bin.display()))?;
        let pid = child.id().context("coordinator exited at once")?;
        let ops = pki.files(OPERATOR_NAME);
        let operator = Resolved {
            coordinator: addr.to_string(),
            server_name: COORDINATOR_SERVER_NAME.into(),
            ca: ops.ca,
            cert: ops.cert,
            key: ops.key,
        };
        let mut c = Self {
            child,
            pid,
            addr,
            log,
            operator,
        };
        c.wait_until_answering(Duration::from_secs(20)).await?;
        Ok(c)
    }

    pub fn pid_str(&self) -> String {
        self.pid.to_string()
    }

    async fn wait_until_answering(&mut self, deadline: Duration) -> Result<()> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the coordinator exited ({status}) before answering; see {}",
                    self.log.display()
                );
            }
            if self.status().await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() > until {
                bail!(
                    "the coordinator did not answer within {deadline:?}; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The fleet summary, over a fresh operator connection (what `drover status --json` does).
    pub async fn status(&self) -> Result<FleetSummary> {
        let mut client = OperatorClient::connect(&self.operator)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let answer = client.request(&OperatorRequest::FleetStatus).await;
        client.close().await;
        match answer.map_err(|e| anyhow::anyhow!("{}", e.message))? {
            OperatorResponse::FleetStatus(s) => Ok(s),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL after the deadline. Returns how it exited.
    pub async fn stop(mut self) -> Result<String> {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        if self.child.try_wait()?.is_none() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        match tokio::time::timeout(STOP_DEADLINE, self.child.wait()).await {
            Ok(status) => Ok(format!("{}", status?)),
            Err(_) => {
                self.child.kill().await?;
                Ok(format!(
                    "did not stop within {STOP_DEADLINE:?} of SIGTERM; killed"
                ))
            }
        }
    }
}
