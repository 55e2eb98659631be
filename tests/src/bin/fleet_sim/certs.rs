//! The fleet PKI for a simulated fleet: a CA, the coordinator's and an operator's
//! certificates, and one worker certificate per simulated worker (identity = CN, so every
//! worker needs its own), all made with the same `drover::pki` functions `drover tls` uses.
//!
//! Worker certificates are issued on all cores and kept in the state directory, so a second
//! run with the same `--state-dir` only issues what is missing. Each worker's rustls config is
//! built by `pki::client_config`, exactly as a real `drover-worker` builds its own.

use anyhow::{Context, Result};
use drover::pki::{self, CertRequest, TlsFiles, Validity};
use drover_protocol::Role;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const COORDINATOR_NAME: &str = "sim-coordinator";
pub const OPERATOR_NAME: &str = "sim-operator";

/// The name of simulated worker `i` (0-based): `sim-worker-00001`, ...
pub fn worker_name(i: usize) -> String {
    format!("sim-worker-{:05}", i + 1)
}

/// Paths of the CA and of the coordinator's and operator's material.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// Create the CA, coordinator and operator certificates in `dir` unless they exist.
    pub fn ensure(dir: &Path) -> Result<Self> {
        if !dir.join(pki::CA_CERT_FILE).exists() {
            pki::create_ca(dir, "fleet-sim").context("creating the sim CA")?;
        }
        let pki = Self { dir: dir.into() };
        pki.ensure_leaf(Role::Coordinator, COORDINATOR_NAME)?;
        pki.ensure_leaf(Role::Operator, OPERATOR_NAME)?;
        Ok(pki)
    }

    fn ensure_leaf(&self, role: Role, name: &str) -> Result<()> {
        if self.dir.join(format!("{name}.crt")).exists() {
            return Ok(());
        }
        let req = CertRequest {
            role,
            name: name.into(),
            validity: Validity::Days(30),
            extra_sans: Vec::new(),
        };
        pki::issue_cert(&self.dir, &self.dir, &req, true)
            .with_context(|| format!("issuing the {role} certificate {name}"))?;
        Ok(())
    }

    pub fn files(&self, name: &str) -> TlsFiles {
        TlsFiles {
            ca: self.dir.join(pki::CA_CERT_FILE),
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
        }
    }

    /// One QUIC client config per worker, issuing missing certificates on `threads` threads.
    /// Reports progress on stderr.
    pub fn worker_configs(&self, n: usize, threads: usize) -> Result<Vec<quinn::ClientConfig>> {
        let transport = Arc::new(worker_transport());
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let slots: Vec<Mutex<Option<quinn::ClientConfig>>> =
            (0..n).map(|_| Mutex::new(None)).collect();
        std::thread::scope(|s| -> Result<()> {
            let issuers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        while !failed.load(Ordering::Relaxed) {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= n {
                                break;
                            }
                            let cfg = match self.worker_config(&worker_name(i), &transport) {
                                Ok(cfg) => cfg,
                                Err(e) => {
                                    failed.store(true, Ordering::Relaxed);
                                    return Err(e);
                                }
                            };
                            *slots[i].lock().expect("slot lock") = Some(cfg);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(())
                    })
                })
                .collect();
            s.spawn(|| {
                while done.load(Ordering::Relaxed) < n && !failed.load(Ordering::Relaxed) {
                    eprint!(
                        "\rfleet-sim: worker certificates {}/{n}   ",
                        done.load(Ordering::Relaxed)
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
                eprintln!(
                    "\rfleet-sim: worker certificates {}/{n}   ",
                    done.load(Ordering::Relaxed)
                );
            });
            issuers
                .into_iter()
                .try_for_each(|t| t.join().expect("certificate thread panicked"))
        })?;
        Ok(slots
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .expect("slot lock")
                    .expect("every slot filled")
            })
            .collect())
    }

    fn worker_config(
        &self,
        name: &str,
        transport: &Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig> {
        self.ensure_leaf(Role::Worker, name)?;
        let mut tls = pki::client_config(&self.files(name), Role::Worker)
            .with_context(|| format!("building the TLS config of {name}"))?;
        // Each config would otherwise carry its own 256-entry ticket cache; a simulated
        // worker connects once, so resumption buys nothing and costs the sim memory.
        tls.resumption = rustls::client::Resumption::disabled();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .with_context(|| format!("QUIC TLS config of {name}"))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(transport.clone());
        Ok(cfg)
    }
}

/// The transport settings of a real worker (worker-agent/src/link.rs, `Link::new`).
fn worker_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(30)).ok());
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.stream_receive_window((256u32 * 1024).into());
    t.receive_window((1024u32 * 1024).into());
    t.send_window(1024 * 1024);
    t
}
