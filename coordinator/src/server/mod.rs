//! The coordinator daemon's runtime: loads TLS and the database, binds the QUIC endpoint,
//! runs the core task and one task per connection, and drains them on shutdown.
//!
//! Every task it starts is owned (a `JoinSet` or a handle kept here) and stopped with a
//! deadline; nothing is detached.

pub mod conn;
pub mod core;
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
    #[error("cannot listen on {addr}: {source}; is another coordinator running, or pick another `listen` address")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl ServeError {
    /// Exit code for the daemon: 64 for configuration the operator must fix, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ServeError::Tls(_) | ServeError::Quic(_) => 64,
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
pub fn transport_config(idle_timeout: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    t.max_concurrent_bidi_streams(64u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Small windows: control traffic is tiny, and per-connection memory is what limits fleet size.
    t.stream_receive_window((256u32 * 1024).into());
    t.receive_window((1024u32 * 1024).into());
    t.send_window(1024 * 1024);
    t
}

/// A running coordinator. Drop-in for tests: bind, then `run` until `shutdown` fires.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    config: CoordinatorConfig,
    trust: crate::trust::service::TrustService,
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
        let fleet = Fleet::restore(loaded.workers, self.config.lease_ms, clock.now_ms());
        let (core_handle, core_rx) = core::Core::channel();
        let tasks = crate::tasks::lifecycle::Tasks::restore(loaded.tasks);
        let core_task =
            tokio::spawn(core::Core::new(fleet, tasks, store.clone(), clock).run(core_rx));
        let ctx = conn::ConnCtx {
            core: core_handle,
            store,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            lease_ms: self.config.lease_ms,
            trust: self.trust.clone(),
        };
        tracing::info!(listen = %self.local_addr(), "coordinator listening");
        crate::notify::ready();
        let mut conns = JoinSet::new();
        let mut next_id = 0u64;
        let mut watchdog = tokio::time::interval(
            crate::notify::watchdog_interval().unwrap_or(Duration::from_secs(3600)),
        );
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    next_id += 1;
                    conns.spawn(conn::serve(incoming, next_id, ctx.clone()));
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
        tokio::task::spawn_blocking(move || store_thread.join())
            .await
            .ok();
        tracing::info!("coordinator stopped");
        Ok(())
    }
}
