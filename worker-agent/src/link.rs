//! The worker's link to the coordinator: connect (QUIC + mutual TLS), check the
//! coordinator's role, the hello handshake, registration, then heartbeats with current usage
//! until the connection ends — and again, with capped exponential backoff and jitter, until
//! shutdown. The worker never exits because the coordinator is away.
//!
//! Attempts outlive a single session: they are owned by the link (one `JoinSet` for the
//! worker's life) and find the current connection through a watch the link publishes after
//! each registration. After registering, the link reports the attempts it still runs
//! (`WorkerMessage::Attempts`: `keep_running` attempts that survived the outage); when a session
//! ends it stops every `on_disconnect = "kill"` attempt.

use crate::config::WorkerConfig;
use crate::executor::{self, ExecContext};
use crate::pki::{self, PkiError, TlsFiles};
use crate::resources::Resources;
use crate::stream::{Confirmation, Registry};
use crate::wire::{self, FramedRecv};
use crate::workdirs::Workdirs;
use drover_protocol::{
    close_code, CoordinatorMessage, Hello, HelloReply, Refusal, Role, WorkerMessage,
    SUPPORTED_VERSIONS,
};
use rand::Rng;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

/// How long a connection attempt, the handshake and registration may each take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The software string the worker reports.
pub fn software() -> String {
    format!("drover-worker {}", env!("CARGO_PKG_VERSION"))
}

/// Errors that stop the worker: local configuration it cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("TLS setup failed: {0}")]
    Tls(#[from] PkiError),
    #[error("cannot use the QUIC/TLS configuration: {0}")]
    Quic(String),
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    #[error(
        "cannot set up the attempts' workspaces under {path} (config key `work_dir`): {source}"
    )]
    WorkDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Why one connection ended; each is followed by a reconnect after backoff.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("cannot resolve {0:?}")]
    Resolve(String),
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("the coordinator refused this worker: {0}")]
    Refused(Refusal),
    #[error("the server is not a drover coordinator: {0}")]
    NotCoordinator(String),
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("the coordinator revoked this worker's certificate; it will not be let back in until an operator runs `drover worker reinstate NAME` and it enrolls again with a new token")]
    Revoked,
}

/// Whether the coordinator closed `conn` because this worker's certificate is revoked: the
/// revoke itself (close code `REVOKED`) or a later handshake refused with the TLS alert
/// `certificate_revoked` (44).
fn closed_as_revoked(conn: &quinn::Connection) -> bool {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            c.error_code == close_code::REVOKED.into()
        }
        Some(quinn::ConnectionError::ConnectionClosed(c)) => {
            c.error_code == quinn::TransportErrorCode::crypto(44)
        }
        _ => false,
    }
}

/// Capped exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling up
/// to the cap; a successful registration resets it.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        half + Duration::from_nanos(rng.gen_range(0..=half.as_nanos() as u64))
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// The QUIC client config from the worker's TLS files (loaded and checked again after each
/// certificate renewal).
fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig, LinkError> {
    let rustls = pki::client_config(files, Role::Worker)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(rustls)
        .map_err(|e| LinkError::Quic(e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(30)).ok());
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.stream_receive_window((256u32 * 1024).into());
    transport.receive_window((1024u32 * 1024).into());
    transport.send_window(1024 * 1024);
    client_config.transport_config(Arc::new(transport));
    Ok(client_config)
}

/// How long until the certificate in `path` should be renewed: half-way through its
/// validity window (zero if that has passed; `None` if it cannot be read).
fn renew_in(path: &std::path::Path) -> Option<Duration> {
    let (nb, na) = pki::cert_window(path).ok()?;
    let at = nb + (na - nb) / 2;
    let left = at - time::OffsetDateTime::now_utc();
    Some(Duration::try_from(left).unwrap_or(Duration::ZERO))
}

/// Retry delay after a renewal went unanswered or could not be installed.
const RENEW_RETRY: Duration = Duration::from_secs(5);

/// Retry delay after a refused renewal: a tenth of the certificate's remaining life, between
/// [`RENEW_RETRY`] and an hour, so a coordinator without a CA key is not asked every 5 s for
/// months.
fn refused_retry(path: &std::path::Path) -> Duration {
    let left = pki::cert_not_after(path)
        .ok()
        .and_then(|na| Duration::try_from(na - time::OffsetDateTime::now_utc()).ok())
        .unwrap_or(Duration::ZERO);
    (left / 10).clamp(RENEW_RETRY, Duration::from_secs(3600))
}

/// The link's long-lived parts.
#[derive(Debug)]
pub struct Link {
    config: WorkerConfig,
    exec: ExecContext,
    endpoint: quinn::Endpoint,
    /// Replaced after a certificate renewal; used from the next connection on.
    client_config: std::sync::Mutex<quinn::ClientConfig>,
    name: String,
    /// Attempts running on this worker, whatever the connection.
    registry: Registry,
    /// The registered connection attempts stream on; `None` between sessions.
    conns: watch::Sender<Option<quinn::Connection>>,
}

impl Link {
    /// Load the TLS material and open the UDP socket. Fails only on local problems.
    pub fn new(config: WorkerConfig) -> Result<Self, LinkError> {
        let files = TlsFiles {
            ca: config.tls.ca.clone(),
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
        };
        let name = pki::own_identity(&files.cert)?.name;
        let client_config = client_config(&files)?;
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
            .map_err(LinkError::Socket)?;
        let private = crate::sandbox::private_paths(&config);
        let sandbox =
            crate::sandbox::Sandbox::detect_hiding(None, private).map_err(|e| e.to_string());
        match &sandbox {
            Ok(s) => tracing::info!(sandbox = %s, "sandbox ready"),
            Err(e) => {
                tracing::warn!(error = %e, "no usable sandbox: this worker will refuse tasks")
            }
        }
        match executor::discard_stale_spools(&config.work_dir) {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                spools = n,
                "discarded event spools of attempts that died with an earlier run of this worker; \
                 the coordinator reschedules them"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot clear old event spools"),
        }
        let (workdirs, stale) =
            Workdirs::open(&config.work_dir).map_err(|source| LinkError::WorkDir {
                path: config.work_dir.clone(),
                source,
            })?;
        if stale > 0 {
            tracing::warn!(
                workspaces = stale,
                "removing the workspaces of attempts that died with an earlier run of this worker"
            );
        }
        let exec = ExecContext {
            sandbox,
            work_dir: config.work_dir.clone(),
            workdirs,
            spool_max_bytes: config.spool_max_bytes,
            spool_memory_bytes: config.spool_memory_bytes,
            on_disconnect: config.on_disconnect,
            lost_after_ms: config.lost_after_ms,
            egress_upstream: crate::egress::tls::upstream_config(&config.egress.upstream_ca)
                .map_err(|e| e.to_string()),
            gate: crate::gate::Gate::default(),
        };
        if let Err(e) = &exec.egress_upstream {
            tracing::warn!(error = %e, "network = \"proxy\" tasks can reach no HTTPS host");
        }
        Ok(Self {
            config,
            exec,
            endpoint,
            client_config: std::sync::Mutex::new(client_config),
            name,
            registry: Registry::default(),
            conns: watch::Sender::new(None),
        })
    }

    /// The worker's name, from its certificate.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stay connected until `shutdown`; then say goodbye and return.
    pub async fn run(self, resources: Resources, shutdown: CancellationToken) {
        // Keep systemd's watchdog fed whatever the link is doing: a worker waiting for an
        // absent coordinator is healthy, not hung.
        let watchdog = async {
            match crate::notify::watchdog_interval() {
                Some(every) => {
                    let mut tick = tokio::time::interval(every);
                    loop {
                        tick.tick().await;
                        crate::notify::watchdog();
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = self.run_link(resources, shutdown) => {}
            _ = watchdog => {}
        }
        if let Ok(sandbox) = &self.exec.sandbox {
            let (started, warm) = sandbox.started();
            tracing::info!(
                attempts = started,
                warm_cgroups = warm,
                "attempts started in this run (warm_cgroups: born in a cgroup made ahead)"
            );
        }
    }

    async fn run_link(&self, mut resources: Resources, shutdown: CancellationToken) {
        let mut backoff =
            Backoff::new(self.config.reconnect_initial(), self.config.reconnect_max());
        let mut rng = rand::thread_rng();
        let mut failures = 0u32;
        let mut notified = false;
        // Every attempt of this worker's life; dropped (so aborted, their trees killed) on return.
        let mut attempts = JoinSet::new();
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            let end = self
                .session(&mut resources, &shutdown, &mut notified, &mut attempts)
                .await;
            // Reap attempts that ended while disconnected.
            while attempts.try_join_next().is_some() {}
            let Some(end) = end else { break };
            if started.elapsed() > Duration::from_secs(30) {
                // It was registered and healthy for a while: start the backoff over.
                backoff.reset();
                failures = 0;
            }
            failures += 1;
            let delay = backoff.next_delay(&mut rng);
            // Say every failure at first, then one in ten, so a long outage does not flood the log.
            if failures <= 3 || failures % 10 == 0 {
                let level_error = matches!(
                    end,
                    SessionEnd::Refused(_) | SessionEnd::NotCoordinator(_) | SessionEnd::Revoked
                );
                if level_error {
                    tracing::error!(coordinator = %self.config.coordinator, attempt = failures, retry_in_ms = delay.as_millis() as u64, "{end}");
                } else {
                    tracing::warn!(coordinator = %self.config.coordinator, attempt = failures, retry_in_ms = delay.as_millis() as u64, "{end}");
                }
            }
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = &mut sleep => break,
                    Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
                }
            }
        }
        let running = attempts.len();
        if running > 0 {
            tracing::info!(attempts = running, "stopping the attempts still running");
        }
        attempts.shutdown().await;
        self.endpoint
            .close(close_code::GOODBYE.into(), b"worker stopping");
        let _ = timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    /// One connection. `None` means shutdown was requested and handled.
    async fn session(
        &self,
        resources: &mut Resources,
        shutdown: &CancellationToken,
        notified: &mut bool,
        attempts: &mut JoinSet<()>,
    ) -> Option<SessionEnd> {
        let conn = tokio::select! {
            c = self.connect() => match c {
                Ok(c) => c,
                Err(e) => return Some(e),
            },
            _ = shutdown.cancelled() => return None,
        };
        let served = self
            .serve(&conn, resources, notified, shutdown, attempts)
            .await;
        // Attempts lose their connection here: `kill` ones stop, `keep_running` ones spool on.
        self.conns.send_replace(None);
        let killed = self.registry.drop_killable();
        let kept = self.registry.len();
        if killed + kept > 0 {
            tracing::warn!(
                stopped = killed,
                kept_running = kept,
                "disconnected: stopped the on_disconnect=kill attempts; keep_running ones spool their events"
            );
        }
        match served {
            Ok(()) => None,
            Err(_) if closed_as_revoked(&conn) => Some(SessionEnd::Revoked),
            Err(end) => {
                conn.close(close_code::PROTOCOL_ERROR.into(), b"reconnecting");
                Some(end)
            }
        }
    }

    async fn connect(&self) -> Result<quinn::Connection, SessionEnd> {
        let addr = self
            .config
            .coordinator
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| SessionEnd::Resolve(self.config.coordinator.clone()))?;
        let connecting = self
            .endpoint
            .connect_with(
                self.client_config
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
                addr,
                &self.config.server_name,
            )
            .map_err(|e| SessionEnd::Connect(e.to_string()))?;
        let conn = match timeout(STEP_TIMEOUT, connecting).await {
            Err(_) => return Err(SessionEnd::Connect("no answer within 10s".into())),
            Ok(Err(e)) => return Err(SessionEnd::Connect(e.to_string())),
            Ok(Ok(c)) => c,
        };
        if let Err(e) = pki::peer_role_is_coordinator(&wire::peer_certs(&conn)) {
            conn.close(close_code::REFUSED.into(), b"not a coordinator");
            return Err(SessionEnd::NotCoordinator(e.to_string()));
        }
        Ok(conn)
    }

    /// Handshake, register, heartbeat; returns how the connection ended.
    async fn serve(
        &self,
        conn: &quinn::Connection,
        resources: &mut Resources,
        notified: &mut bool,
        shutdown: &CancellationToken,
        attempts: &mut JoinSet<()>,
    ) -> Result<(), SessionEnd> {
        let lost = |e: &dyn std::fmt::Display| SessionEnd::Lost(e.to_string());
        let (mut send, recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
        let mut recv = FramedRecv::new(recv);
        let hello = Hello {
            versions: SUPPORTED_VERSIONS,
            role: Role::Worker,
            software: software(),
        };
        wire::send(&mut send, &hello).await.map_err(|e| lost(&e))?;
        let reply = tokio::select! {
            r = timeout(STEP_TIMEOUT, recv.next::<HelloReply>()) => r,
            _ = shutdown.cancelled() => return self.goodbye(conn, None).await,
        };
        match reply {
            Err(_) => return Err(SessionEnd::Lost("no handshake reply within 10s".into())),
            Ok(Err(e)) => return Err(lost(&e)),
            Ok(Ok(None)) => {
                return Err(SessionEnd::Lost(
                    "coordinator closed the handshake stream".into(),
                ))
            }
            Ok(Ok(Some(HelloReply::Refused(r)))) => {
                conn.close(close_code::GOODBYE.into(), b"refused");
                return Err(SessionEnd::Refused(r));
            }
            Ok(Ok(Some(HelloReply::Accepted { .. }))) => {}
        }
        let report = resources.report();
        // What the coordinator will place against is what attempts are gated by.
        self.exec.gate.set_totals(crate::gate::totals(&report));
        wire::send(&mut send, &WorkerMessage::Register { resources: report })
            .await
            .map_err(|e| lost(&e))?;
        let registered = tokio::select! {
            r = timeout(STEP_TIMEOUT, recv.next::<CoordinatorMessage>()) => r,
            _ = shutdown.cancelled() => return self.goodbye(conn, Some(&mut send)).await,
        };
        let (interval_ms, lease_ms) = match registered {
            Ok(Ok(Some(CoordinatorMessage::Registered {
                heartbeat_interval_ms,
                lease_ms,
                ..
            }))) => (heartbeat_interval_ms, lease_ms),
            Ok(Ok(Some(other))) => {
                return Err(SessionEnd::Lost(format!(
                    "expected Registered, got {other:?}"
                )))
            }
            Ok(Ok(None)) => return Err(SessionEnd::Lost("coordinator closed the stream".into())),
            Ok(Err(e)) => return Err(lost(&e)),
            Err(_) => return Err(SessionEnd::Lost("no registration reply within 10s".into())),
        };
        let every = Duration::from_millis(
            self.config
                .heartbeat_interval_ms
                .unwrap_or(interval_ms)
                .min(interval_ms)
                .max(50),
        );
        tracing::info!(
            worker = %self.name, coordinator = %self.config.coordinator,
            heartbeat_ms = every.as_millis() as u64, lease_ms, "registered"
        );
        if !*notified {
            crate::notify::ready();
            *notified = true;
        }
        // Publish the connection first, then take the report: an attempt giving up checks
        // for a connection under the registry's lock, so whatever is reported streams again.
        self.conns.send_replace(Some(conn.clone()));
        let running = self.registry.running();
        if !running.is_empty() {
            tracing::info!(
                attempts = running.len(),
                "reporting attempts that kept running while disconnected"
            );
        }
        wire::send(&mut send, &WorkerMessage::Attempts { running })
            .await
            .map_err(|e| lost(&e))?;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        // The lease is renewed only by heartbeats the coordinator acknowledges; when none has
        // been acknowledged for a whole lease, the coordinator is gone (or has declared us
        // lost): drop the connection and reconnect rather than wait for the idle timeout.
        let lease = Duration::from_millis(lease_ms);
        let mut last_ack = Instant::now();
        let mut lease_check = tokio::time::interval(lease / 4);
        // Certificate renewal: a CSR for a new key half-way through the certificate's life;
        // the key waits in `pending` until the coordinator answers.
        let renew =
            tokio::time::sleep(renew_in(&self.config.tls.cert).unwrap_or(Duration::MAX / 4));
        tokio::pin!(renew);
        let mut pending: Option<pki::KeyAndCsr> = None;
        loop {
            tokio::select! {
                _ = &mut renew => {
                    match pki::make_csr(&self.name) {
                        Ok(material) => {
                            tracing::info!(worker = %self.name, "asking the coordinator to renew the certificate");
                            let msg = WorkerMessage::Renew { csr_pem: material.csr_pem.clone() };
                            pending = Some(material);
                            wire::send(&mut send, &msg).await.map_err(|e| lost(&e))?;
                        }
                        Err(e) => tracing::error!(error = %e, "cannot make a key for renewal"),
                    }
                    renew.as_mut().reset(Instant::now() + RENEW_RETRY.max(Duration::from_secs(1)) * 2);
                }
                _ = shutdown.cancelled() => return self.goodbye(conn, Some(&mut send)).await,
                _ = tick.tick() => {
                    seq += 1;
                    let hb = WorkerMessage::Heartbeat { seq, usage: resources.usage() };
                    wire::send(&mut send, &hb).await.map_err(|e| lost(&e))?;
                }
                Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
                _ = self.registry.report_needed() => {
                    let running = self.registry.running();
                    tracing::warn!(attempts = running.len(), "an attempt lost its spool; reporting what still runs so the coordinator retries it");
                    wire::send(&mut send, &WorkerMessage::Attempts { running })
                        .await
                        .map_err(|e| lost(&e))?;
                }
                msg = recv.next::<CoordinatorMessage>() => match msg {
                    Ok(Some(CoordinatorMessage::HeartbeatAck { .. })) => last_ack = Instant::now(),
                    Ok(Some(CoordinatorMessage::Assign(a))) => self.start_attempt(*a, false, attempts),
                    Ok(Some(CoordinatorMessage::Prepare(a))) => self.start_attempt(*a, true, attempts),
                    Ok(Some(CoordinatorMessage::Confirm { task_id, epoch })) => {
                        if !self.registry.confirm(&(task_id.clone(), epoch)) {
                            // Dropped meanwhile (no confirm within the bound): the report
                            // it made has the coordinator assign it again.
                            tracing::debug!(task = %task_id, epoch, "confirm for an attempt not waiting for one");
                        }
                    }
                    Ok(Some(CoordinatorMessage::Cancel { task_id, epoch })) => {
                        tracing::info!(task = %task_id, epoch, "attempt cancelled by the coordinator");
                        self.registry.cancel(&(task_id, epoch));
                    }
                    Ok(Some(CoordinatorMessage::Renewed { cert_pem, not_after_ms })) => {
                        match pending.take() {
                            Some(material) => {
                                let next = self.install_renewed(&material, &cert_pem, not_after_ms);
                                renew.as_mut().reset(Instant::now() + next);
                            }
                            None => tracing::warn!("ignoring a renewed certificate nobody asked for"),
                        }
                    }
                    Ok(Some(CoordinatorMessage::RenewRefused { reason })) => {
                        pending = None;
                        let retry = refused_retry(&self.config.tls.cert);
                        tracing::error!(worker = %self.name, %reason, retry_in_s = retry.as_secs(), "the coordinator refused to renew the certificate");
                        renew.as_mut().reset(Instant::now() + retry);
                    }
                    Ok(Some(other)) => tracing::debug!(message = ?other, "ignoring unexpected message"),
                    Ok(None) => return Err(SessionEnd::Lost("coordinator closed the control stream".into())),
                    Err(e) => return Err(lost(&e)),
                },
                _ = lease_check.tick() => {
                    if last_ack.elapsed() >= lease {
                        return Err(SessionEnd::Lost(format!(
                            "no heartbeat acknowledged for {} ms (the lease); reconnecting", lease_ms
                        )));
                    }
                }
            }
        }
    }

    /// Start an assigned attempt; a `prepared` one gets ready but runs nothing until its
    /// confirm (see `CoordinatorMessage::Prepare`).
    fn start_attempt(
        &self,
        a: drover_protocol::Assignment,
        prepared: bool,
        attempts: &mut JoinSet<()>,
    ) {
        let key = (a.task_id.clone(), a.epoch);
        let policy = self.exec.policy(&a);
        // Per attempt: debug (the session has it; info would flood the journal).
        tracing::debug!(task = %a.task_id, epoch = a.epoch, attempt = a.attempt, name = %a.spec.name, on_disconnect = policy.on_disconnect.as_str(), prepared, "attempt assigned");
        let token = CancellationToken::new();
        let confirmation = if prepared {
            self.registry.prepare(key, token.clone(), policy)
        } else {
            self.registry.insert(key, token.clone(), policy);
            Confirmation::Given
        };
        let run = executor::run_attempt(
            self.exec.clone(),
            self.conns.subscribe(),
            self.registry.clone(),
            a,
            token,
            confirmation,
        );
        attempts.spawn(run);
    }

    /// Write the renewed key and certificate over the old ones and use them from the next
    /// connection on; returns when to renew next.
    fn install_renewed(
        &self,
        material: &pki::KeyAndCsr,
        cert_pem: &str,
        not_after_ms: u64,
    ) -> Duration {
        let tls = &self.config.tls;
        let installed = pki::install_leaf(&tls.key, &material.key_pem, &tls.cert, cert_pem)
            .map_err(LinkError::from)
            .and_then(|()| {
                client_config(&TlsFiles {
                    ca: tls.ca.clone(),
                    cert: tls.cert.clone(),
                    key: tls.key.clone(),
                })
            });
        match installed {
            Ok(config) => {
                *self.client_config.lock().unwrap_or_else(|e| e.into_inner()) = config;
                tracing::info!(worker = %self.name, cert = %tls.cert.display(), not_after_ms, "certificate renewed; used from the next connection on");
                renew_in(&tls.cert).unwrap_or(RENEW_RETRY)
            }
            Err(e) => {
                tracing::error!(worker = %self.name, error = %e, "cannot install the renewed certificate");
                RENEW_RETRY
            }
        }
    }

    /// Leave on purpose: a Goodbye on the control stream (when registered) and the goodbye
    /// close code, so the coordinator marks this worker `down` rather than `lost`.
    async fn goodbye(
        &self,
        conn: &quinn::Connection,
        send: Option<&mut quinn::SendStream>,
    ) -> Result<(), SessionEnd> {
        if let Some(send) = send {
            let bye = WorkerMessage::Goodbye {
                reason: "worker stopping".into(),
            };
            if wire::send(send, &bye).await.is_ok() {
                let _ = send.finish();
                let _ = timeout(Duration::from_secs(1), send.stopped()).await;
            }
        }
        conn.close(close_code::GOODBYE.into(), b"worker stopping");
        tracing::info!(worker = %self.name, "said goodbye to the coordinator");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let bounds = [100u64, 200, 400, 800, 1000, 1000];
        for hi in bounds {
            let d = b.next_delay(&mut rng).as_millis() as u64;
            assert!(d >= hi / 2 && d <= hi, "{d} not in [{}, {hi}]", hi / 2);
        }
        b.reset();
        assert!(b.next_delay(&mut rng) <= Duration::from_millis(100));
    }
}
