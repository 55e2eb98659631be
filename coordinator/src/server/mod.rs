//! The coordinator daemon's runtime: loads TLS and the database, binds the QUIC endpoint,
//! runs the core task and one task per connection, and drains them on shutdown.
//!
//! Every task it starts is owned (a `JoinSet` or a handle kept here) and stopped with a
//! deadline; nothing is detached.

pub mod conn;
pub mod core;
pub mod outbound;
pub mod probe;
pub mod transfer;

use crate::clock::Clock;
use crate::config::CoordinatorConfig;
use crate::fleet::Fleet;
use crate::pki::{self, PkiError, TlsFiles};
use crate::store::{Store, StoreError};
use drover_protocol::close_code;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long connections get to finish after shutdown starts.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Connections in their TLS handshake and hello at once; more are refused at once (QUIC
/// `CONNECTION_REFUSED`, before any TLS work) and their peers retry with backoff.
///
/// A handshake holds much more memory than an established connection (TLS state, both
/// certificate chains, crypto buffers) and is the coordinator's largest CPU cost per
/// connection. When a whole fleet connects at once on a busy machine, unbounded handshakes
/// queue for the CPU until their peers time out and retry: CPU goes to handshakes that are
/// thrown away, and the heap peaks — and stays, fragmented — far above what the connected
/// fleet needs (10,000 workers ramping at 1,000/s on a busy machine: 376 MiB without this
/// limit, 272 MiB with it; docs/benchmarks.md). Refusing the excess early bounds both. An
/// operator command refused during such a storm fails and can be run again.
pub const MAX_HANDSHAKES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS setup failed: {0}")]
    Tls(#[from] PkiError),
    #[error("cannot use the QUIC/TLS configuration: {0}")]
    Quic(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot keep the stateless-reset key {path}: {source}")]
    ResetKey {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}; set `secrets_key` in the config to use another file")]
    SecretsKey(#[from] crate::secrets::KeyError),
    #[error("cannot listen on {addr}: {source}; is another coordinator running, or pick another `listen` address")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("stopped because a database write failed ({0}); nothing acknowledged was lost: fix the disk (space, errors in the kernel log) and start again, and the state is rebuilt from the database")]
    WriteFailed(String),
}

impl ServeError {
    /// Exit code for the daemon: 64 for configuration the operator must fix, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ServeError::Tls(_) | ServeError::Quic(_) | ServeError::SecretsKey(_) => 64,
            // EX_IOERR
            ServeError::WriteFailed(_) => 74,
            _ => 1,
        }
    }
}

/// File in the state directory holding the QUIC stateless-reset key.
const RESET_KEY_FILE: &str = "quic-reset.key";

/// The HMAC key for QUIC stateless resets, kept across restarts: a restarted coordinator can
/// then reset its predecessor's connections at their next packet, so workers reconnect at
/// once instead of waiting for an idle timeout.
fn reset_key(state_dir: &std::path::Path) -> Result<ring::hmac::Key, ServeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join(RESET_KEY_FILE);
    let err = |source| ServeError::ResetKey {
        path: path.clone(),
        source,
    };
    let secret = match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => bytes,
        Ok(_) | Err(_) => {
            std::fs::create_dir_all(state_dir).map_err(err)?;
            let bytes: [u8; 32] = rand::random();
            let tmp = state_dir.join(format!(".{RESET_KEY_FILE}.tmp"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(err)?;
            f.write_all(&bytes)
                .and_then(|()| f.sync_all())
                .map_err(err)?;
            std::fs::rename(&tmp, &path).map_err(err)?;
            bytes.to_vec()
        }
    };
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret))
}

/// QUIC transport settings sized for many mostly idle worker connections.
///
/// quinn keeps state for every stream a peer may open, so a connection starts with
/// [`STREAMS_BEFORE_REGISTER`] (the control stream); a worker's connection is raised to what it
/// needs once it registers ([`StreamBudget`]).
pub fn transport_config(idle_timeout: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    t.max_concurrent_bidi_streams(STREAMS_BEFORE_REGISTER.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.datagram_receive_buffer_size(None);
    // Small windows: control traffic is tiny, and per-connection memory is what limits fleet size.
    t.stream_receive_window((256u32 * 1024).into());
    t.receive_window((1024u32 * 1024).into());
    t.send_window(1024 * 1024);
    t
}

/// Bidirectional streams a peer may have open before it registers: its control stream.
pub const STREAMS_BEFORE_REGISTER: u32 = 1;
/// Streams a registered worker may open beyond those of the attempts it was assigned: room
/// for the short-lived transfer streams (inputs fetched before a process starts, outputs
/// stored after it ends), which each attempt opens beside its event stream.
const SPARE_STREAMS: u64 = 4;

/// The bidirectional-stream limit of one worker connection: the control stream, a few spare,
/// and one for every attempt assigned and not finished, raised *before* the assignment is
/// sent, so a worker never waits to open the stream of an attempt it was given. quinn keeps
/// a slot for every stream the peer may open, so the limit follows what the worker runs rather
/// than what it might (tasks may reserve no CPU, so its CPU count is no bound). It only grows.
#[derive(Debug)]
pub struct StreamBudget {
    limit: u64,
    /// Attempts assigned whose stream the worker has not opened yet.
    unopened: u64,
}

impl StreamBudget {
    /// Raise `conn`'s limit from the handshake's to a registered worker's.
    pub fn registered(conn: &quinn::Connection) -> Self {
        let mut budget = Self {
            limit: u64::from(STREAMS_BEFORE_REGISTER),
            unopened: 0,
        };
        budget.ensure(conn, 1 + SPARE_STREAMS);
        budget
    }

    /// An attempt is about to be assigned while `open` attempt streams are open.
    pub fn assigning(&mut self, conn: &quinn::Connection, open: usize) {
        self.unopened += 1;
        let need = 1 + open as u64 + self.unopened + SPARE_STREAMS;
        self.ensure(conn, need);
    }

    /// The worker reports `running` attempts it kept across a reconnect, while `open` streams
    /// are open: each reopens its event stream on this connection.
    pub fn reattaching(&mut self, conn: &quinn::Connection, running: usize, open: usize) {
        let need = 1 + open as u64 + running as u64 + self.unopened + SPARE_STREAMS;
        self.ensure(conn, need);
    }

    /// The worker opened an attempt stream.
    pub fn opened(&mut self) {
        self.unopened = self.unopened.saturating_sub(1);
    }

    fn ensure(&mut self, conn: &quinn::Connection, need: u64) {
        if need > self.limit {
            if let Ok(n) = quinn::VarInt::from_u64(need) {
                conn.set_max_concurrent_bi_streams(n);
                self.limit = need;
            }
        }
    }
}

/// Receive buffer asked for the coordinator's UDP socket. The kernel default (208 KiB) holds
/// only some 20–30 ms of a 10,000-worker fleet's heartbeats, so a scheduling hiccup drops
/// datagrams (which QUIC then resends). The kernel caps it at `net.core.rmem_max`; the
/// memory is the kernel's and is used only while datagrams wait.
const UDP_RECV_BUFFER: usize = 4 << 20;

/// Ask for [`UDP_RECV_BUFFER`]; say what the kernel granted.
fn socket_buffers(socket: &std::net::UdpSocket) {
    let granted = quinn::udp::UdpSocketState::new(socket.into()).and_then(|state| {
        state.set_recv_buffer_size(socket.into(), UDP_RECV_BUFFER)?;
        state.recv_buffer_size(socket.into())
    });
    match granted {
        // Linux reports twice the size asked for (the doubling covers its bookkeeping).
        Ok(bytes) if bytes / 2 < UDP_RECV_BUFFER => tracing::info!(
            granted = bytes / 2,
            asked = UDP_RECV_BUFFER,
            "UDP receive buffer capped by net.core.rmem_max; raise it for large fleets"
        ),
        Ok(bytes) => tracing::debug!(bytes = bytes / 2, "UDP receive buffer"),
        Err(e) => tracing::warn!(error = %e, "cannot size the UDP receive buffer"),
    }
}

/// A running coordinator. Drop-in for tests: bind, then `run` until `shutdown` fires.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    config: CoordinatorConfig,
    trust: crate::trust::service::TrustService,
    secrets: crate::secrets::Secrets,
}

impl Server {
    /// Load TLS material, then bind. Fails before binding on bad certificates.
    pub fn bind(config: CoordinatorConfig) -> Result<Self, ServeError> {
        let files = TlsFiles {
            ca: config.tls.ca.clone(),
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
        };
        let signer = match &config.tls.ca_key {
            Some(key) => Some(pki::Signer::load(&config.tls.ca, key)?),
            None => None,
        };
        match &signer {
            Some(s) => {
                tracing::info!(ca_fingerprint = %s.ca_fingerprint(), "CA key loaded: workers may enroll with join tokens and renew their certificates")
            }
            None => tracing::info!(
                "no CA key configured (tls.ca_key): enrollment and certificate renewal are off"
            ),
        }
        let secrets_key = crate::secrets::SecretsKey::load_or_create(&config.secrets_key_path())?;
        let secrets = crate::secrets::Secrets::restore(secrets_key, Vec::new());
        let trust = crate::trust::service::TrustService::new(signer, config.worker_cert_ttl());
        let tls = pki::server_config_with(&files, Some(trust.revocation_check()))?;
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| ServeError::Quic(e.to_string()))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let idle = (config.lease() * 4).max(Duration::from_secs(10));
        server_config.transport_config(Arc::new(transport_config(idle)));
        let reset_key = reset_key(&config.state_dir)?;
        let bind = |source| ServeError::Bind {
            addr: config.listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(config.listen).map_err(bind)?;
        socket_buffers(&socket);
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::new(Arc::new(reset_key)),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind)?;
        Ok(Self {
            endpoint,
            config,
            trust,
            secrets,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap_or(self.config.listen)
    }

    /// Serve until `shutdown` is cancelled, then drain within a deadline.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServeError> {
        let clock = Clock::start();
        let (store, store_thread, loaded) = Store::open(&self.config.state_dir)?;
        tracing::info!(
            workers = loaded.workers.len(), tasks = loaded.tasks.len(),
            state_dir = %self.config.state_dir.display(), "state loaded"
        );
        self.trust.restore(loaded.trust);
        self.secrets.load(loaded.secrets);
        let secrets = self.secrets.clone();
        let fleet = Fleet::restore(loaded.workers, self.config.lease_ms, clock.now_ms());
        let (core_handle, core_rx) = core::Core::channel();
        let mut tasks = crate::tasks::lifecycle::Tasks::restore(loaded.tasks);
        tasks.set_assign_ahead(self.config.assign_ahead);
        let core_task = tokio::spawn(
            core::Core::new(
                fleet,
                tasks,
                store.clone(),
                clock,
                self.config.heartbeat_interval_ms,
                self.config.liveness_probe,
                secrets.clone(),
            )
            .run(core_rx),
        );
        let store_failed = store.failed();
        tokio::pin!(store_failed);
        let mut write_failed = None;
        let ctx = conn::ConnCtx {
            core: core_handle,
            store,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            lease_ms: self.config.lease_ms,
            trust: self.trust.clone(),
            secrets,
        };
        tracing::info!(listen = %self.local_addr(), "coordinator listening");
        crate::notify::ready();
        let mut conns = JoinSet::new();
        let mut next_id = 0u64;
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let mut refused = 0u64;
        let mut watchdog = tokio::time::interval(
            crate::notify::watchdog_interval().unwrap_or(Duration::from_secs(3600)),
        );
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                why = &mut store_failed => {
                    write_failed = Some(why);
                    break;
                }
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let Ok(slot) = handshakes.clone().try_acquire_owned() else {
                        refused += 1;
                        if refused % 1000 == 1 {
                            tracing::info!(refused, limit = MAX_HANDSHAKES, "refusing connections while the handshake limit is reached; peers retry with backoff");
                        }
                        incoming.refuse();
                        continue;
                    };
                    next_id += 1;
                    conns.spawn(conn::serve(incoming, next_id, ctx.clone(), slot));
                }
                Some(res) = conns.join_next(), if !conns.is_empty() => {
                    if let Err(e) = res {
                        if e.is_panic() {
                            tracing::error!(error = %e, "connection task panicked");
                        }
                    }
                }
                _ = watchdog.tick() => crate::notify::watchdog(),
            }
        }
        tracing::info!(connections = conns.len(), "shutting down");
        crate::notify::stopping();
        self.endpoint
            .close(close_code::SHUTDOWN.into(), b"coordinator shutting down");
        drop(ctx);
        if tokio::time::timeout(DRAIN_DEADLINE, async {
            while conns.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!(
                left = conns.len(),
                "connections did not finish within the deadline; aborting them"
            );
            conns.shutdown().await;
        }
        // The core stops when the last handle (held by connection tasks) is gone.
        let _ = tokio::time::timeout(DRAIN_DEADLINE, core_task).await;
        let _ = tokio::time::timeout(DRAIN_DEADLINE, self.endpoint.wait_idle()).await;
        // The writer commits what is queued and stops once the last store handle is gone.
        let writer = tokio::task::spawn_blocking(move || store_thread.join());
        if tokio::time::timeout(DRAIN_DEADLINE, writer).await.is_err() {
            tracing::warn!("the store writer did not stop within the deadline; exiting without it");
        }
        tracing::info!("coordinator stopped");
        match write_failed {
            Some(why) => Err(ServeError::WriteFailed(why)),
            None => Ok(()),
        }
    }
}
