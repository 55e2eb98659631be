//! The async shell around [`Trust`]: enrollment connections, renewal requests on a worker's
//! control stream, the operator's token and revocation requests, and the revocation check
//! the TLS layer runs on every client certificate.
//!
//! Every change is durable before it is answered: a token's use is on disk before the
//! certificate it paid for leaves, a revocation before the operator hears "revoked".

use super::{EnrollRefusal, IssuedRecord, LoadedTrust, Trust, TrustWrite};
use crate::pki::{self, RevocationCheck, Signer};
use crate::server::core::{CoreHandle, CoreMsg};
use crate::store::Store;
use drover_protocol::identity::parse_identity;
use drover_protocol::{
    close_code, negotiate, CoordinatorMessage, EnrollReply, EnrollRequest, ErrorKind,
    OperatorRequest, OperatorResponse, RevocationReport, Role, SUPPORTED_VERSIONS,
};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

/// Shared by the connection tasks and the TLS revocation check.
#[derive(Debug, Clone)]
pub struct TrustService {
    state: Arc<Mutex<Trust>>,
    signer: Option<Arc<Signer>>,
    lifetime: Duration,
}

/// The revocation check handed to the TLS server config.
#[derive(Debug)]
struct Revocations(Arc<Mutex<Trust>>);

impl RevocationCheck for Revocations {
    fn revoked(&self, cert: &rustls::pki_types::CertificateDer<'_>) -> Option<String> {
        let id = parse_identity(cert).ok()?;
        if id.role != Role::Worker {
            return None;
        }
        let fp = pki::fingerprint(cert);
        lock(&self.0).refusal(&id.name, &fp)
    }
}

fn lock(m: &Mutex<Trust>) -> MutexGuard<'_, Trust> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wall-clock ms since the Unix epoch (token expiry and certificates are wall-clock things).
fn now_ms() -> u64 {
    crate::clock::wall_ms()
}

async fn durable(rx: crate::store::Durable) -> Result<(), String> {
    rx.await
        .unwrap_or_else(|_| Err("database writer stopped".into()))
}

impl TrustService {
    /// An empty service (filled by [`TrustService::restore`] once the database is open), so the
    /// TLS config can hold its revocation check from bind time.
    pub fn new(signer: Option<Signer>, lifetime: Duration) -> Self {
        Self {
            state: Arc::new(Mutex::new(Trust::restore(LoadedTrust::default(), now_ms()))),
            signer: signer.map(Arc::new),
            lifetime,
        }
    }

    pub fn restore(&self, loaded: LoadedTrust) {
        *lock(&self.state) = Trust::restore(loaded, now_ms());
    }

    /// Why the certificate (DER) a peer presented must be refused, if it must.
    pub fn refused(&self, cert: &rustls::pki_types::CertificateDer<'_>) -> Option<String> {
        Revocations(self.state.clone()).revoked(cert)
    }

    pub fn revocation_check(&self) -> Arc<dyn RevocationCheck> {
        Arc::new(Revocations(self.state.clone()))
    }

    /// Answer one enrollment request from `remote`; refusals are logged here.
    pub async fn enroll(
        &self,
        store: &Store,
        core: &CoreHandle,
        remote: SocketAddr,
        req: EnrollRequest,
    ) -> EnrollReply {
        match self.try_enroll(store, core, remote, &req).await {
            Ok(reply) => reply,
            Err(refusal) => {
                // Only the public id (at most 12 characters of whatever was sent) is logged.
                let token_id: String = req
                    .token
                    .split('.')
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(12)
                    .collect();
                tracing::warn!(%remote, %token_id, software = %req.software, reason = %refusal, "refused enrollment");
                EnrollReply::Refused {
                    reason: refusal.to_string(),
                }
            }
        }
    }

    async fn try_enroll(
        &self,
        store: &Store,
        core: &CoreHandle,
        remote: SocketAddr,
        req: &EnrollRequest,
    ) -> Result<EnrollReply, EnrollRefusal> {
        negotiate(SUPPORTED_VERSIONS, req.versions)
            .map_err(|r| EnrollRefusal::Version(r.to_string()))?;
        let signer = self.signer.as_ref().ok_or(EnrollRefusal::NoCaKey)?;
        let requested =
            pki::csr_name(&req.csr_pem).map_err(|e| EnrollRefusal::BadCsr(e.to_string()))?;
        let redeemed = lock(&self.state).redeem(now_ms(), remote.ip(), &req.token, &requested)?;
        let give_back = |this: &Self| {
            let write = lock(&this.state).unredeem(&redeemed.token_id);
            if let Some(w) = write {
                drop(store.put_trust(vec![w]));
            }
        };
        if !redeemed.named_by_token && name_known(core, &redeemed.name).await {
            give_back(self);
            return Err(EnrollRefusal::NameTaken {
                name: redeemed.name,
            });
        }
        let issued = match signer.sign_worker(
            &req.csr_pem,
            &redeemed.name,
            self.lifetime,
            time::OffsetDateTime::now_utc(),
        ) {
            Ok(i) => i,
            Err(e) => {
                give_back(self);
                return Err(EnrollRefusal::BadCsr(e.to_string()));
            }
        };
        let not_after_ms = unix_ms(issued.not_after);
        let record = lock(&self.state).record_issued(IssuedRecord {
            fingerprint: issued.fingerprint.clone(),
            name: issued.name.clone(),
            serial: issued.serial.clone(),
            not_after_ms,
            issued_ms: now_ms(),
            revoked_ms: None,
        });
        durable(store.put_trust(vec![redeemed.write.clone(), record]))
            .await
            .map_err(EnrollRefusal::Store)?;
        tracing::info!(
            %remote, worker = %issued.name, token_id = %redeemed.token_id, serial = %issued.serial,
            not_after = %issued.not_after, "enrolled a worker"
        );
        Ok(EnrollReply::Issued {
            name: issued.name,
            cert_pem: issued.cert_pem,
            ca_pem: signer.ca_pem().to_owned(),
            not_after_ms,
        })
    }

    /// A renewal request from the connected worker `name`.
    pub async fn renew(&self, store: &Store, name: &str, csr_pem: &str) -> CoordinatorMessage {
        let refused = |reason: String| {
            tracing::warn!(worker = %name, %reason, "refused certificate renewal");
            CoordinatorMessage::RenewRefused { reason }
        };
        let Some(signer) = &self.signer else {
            return refused(EnrollRefusal::NoCaKey.to_string());
        };
        match pki::csr_name(csr_pem) {
            Ok(n) if n == name => {}
            Ok(n) => {
                return refused(format!(
                    "the request names {n:?}, but this connection is {name:?}"
                ))
            }
            Err(e) => return refused(e.to_string()),
        }
        if lock(&self.state).is_name_revoked(name) {
            return refused(format!("worker {name:?} is revoked"));
        }
        let issued = match signer.sign_worker(
            csr_pem,
            name,
            self.lifetime,
            time::OffsetDateTime::now_utc(),
        ) {
            Ok(i) => i,
            Err(e) => return refused(e.to_string()),
        };
        let not_after_ms = unix_ms(issued.not_after);
        let record = lock(&self.state).record_issued(IssuedRecord {
            fingerprint: issued.fingerprint.clone(),
            name: name.to_owned(),
            serial: issued.serial.clone(),
            not_after_ms,
            issued_ms: now_ms(),
            revoked_ms: None,
        });
        if let Err(e) = durable(store.put_trust(vec![record])).await {
            return refused(format!("cannot store the new certificate: {e}"));
        }
        tracing::info!(worker = %name, serial = %issued.serial, not_after = %issued.not_after, "renewed a worker certificate");
        CoordinatorMessage::Renewed {
            cert_pem: issued.cert_pem,
            not_after_ms,
        }
    }

    /// Token and revocation requests; `None` for any other request.
    pub async fn operator(
        &self,
        store: &Store,
        core: &CoreHandle,
        operator: &str,
        req: &OperatorRequest,
    ) -> Option<OperatorResponse> {
        let error = |kind, message: String| OperatorResponse::Error { kind, message };
        let stored = |r: Result<(), String>| {
            r.map_err(|e| error(ErrorKind::Internal, format!("cannot store the change: {e}")))
        };
        let answer = match req {
            OperatorRequest::CreateToken {
                ttl_ms,
                max_uses,
                label,
                name,
            } => {
                let Some(signer) = &self.signer else {
                    return Some(error(
                        ErrorKind::InvalidRequest,
                        EnrollRefusal::NoCaKey.to_string(),
                    ));
                };
                if let Some(n) = name
                    .as_deref()
                    .filter(|n| !drover_protocol::identity::valid_name(n))
                {
                    return Some(error(
                        ErrorKind::InvalidRequest,
                        format!(
                            "invalid worker name {n:?}: names must be {}",
                            drover_protocol::identity::NAME_RULE
                        ),
                    ));
                }
                if *ttl_ms == 0 || *max_uses == 0 {
                    return Some(error(
                        ErrorKind::InvalidRequest,
                        "a token needs a ttl above 0 and at least 1 use".into(),
                    ));
                }
                let (token, rec, write) = lock(&self.state).create_token(
                    now_ms(),
                    *ttl_ms,
                    *max_uses,
                    label.clone(),
                    name.clone(),
                    &mut rand::thread_rng(),
                );
                if let Err(e) = stored(durable(store.put_trust(vec![write])).await) {
                    return Some(e);
                }
                tracing::info!(%operator, token_id = %rec.id, uses = rec.max_uses, expires_ms = rec.expires_ms, "created a join token");
                OperatorResponse::TokenCreated {
                    token,
                    info: Box::new(rec.info()),
                    ca_fingerprint: signer.ca_fingerprint().to_owned(),
                }
            }
            OperatorRequest::ListTokens => {
                OperatorResponse::Tokens(lock(&self.state).tokens(now_ms()))
            }
            OperatorRequest::RevokeToken { id } => {
                let change = lock(&self.state).revoke_token(id);
                match change {
                    None => error(
                        ErrorKind::NotFound,
                        format!("no join token {id:?} (drover token list)"),
                    ),
                    Some(write) => {
                        let changed = write.is_some();
                        if let Some(w) = write {
                            if let Err(e) = stored(durable(store.put_trust(vec![w])).await) {
                                return Some(e);
                            }
                            tracing::info!(%operator, token_id = %id, "revoked a join token");
                        }
                        OperatorResponse::TokenRevoked {
                            id: id.clone(),
                            changed,
                        }
                    }
                }
            }
            OperatorRequest::RevokeWorker { name } => {
                let (changed, certificates, write) = lock(&self.state).revoke_name(now_ms(), name);
                let mut writes: Vec<TrustWrite> = write.into_iter().collect();
                if writes.is_empty() && certificates > 0 {
                    // Certificates issued since an earlier revoke-and-reinstate.
                    writes.push(TrustWrite::RevokeName {
                        name: name.clone(),
                        at_ms: now_ms(),
                    });
                }
                if let Err(e) = stored(durable(store.put_trust(writes)).await) {
                    return Some(e);
                }
                let disconnected = close_worker(core, name).await;
                tracing::warn!(%operator, worker = %name, certificates, disconnected, "revoked worker: its certificates are refused from now on");
                OperatorResponse::Revocation(RevocationReport {
                    name: name.clone(),
                    revoked: true,
                    changed,
                    disconnected,
                    certificates,
                })
            }
            OperatorRequest::ReinstateWorker { name } => {
                let write = lock(&self.state).reinstate(name);
                let changed = write.is_some();
                if let Some(w) = write {
                    if let Err(e) = stored(durable(store.put_trust(vec![w])).await) {
                        return Some(e);
                    }
                    tracing::info!(%operator, worker = %name, "reinstated worker name: it may enroll again");
                }
                OperatorResponse::Revocation(RevocationReport {
                    name: name.clone(),
                    revoked: false,
                    changed,
                    disconnected: false,
                    certificates: 0,
                })
            }
            _ => return None,
        };
        Some(answer)
    }
}

async fn name_known(core: &CoreHandle, name: &str) -> bool {
    let (reply, rx) = oneshot::channel();
    let asked = core
        .send(CoreMsg::NameKnown {
            name: name.to_owned(),
            reply,
        })
        .await;
    // If the core is gone, refuse rather than risk two workers with one name.
    !asked || rx.await.unwrap_or(true)
}

async fn close_worker(core: &CoreHandle, name: &str) -> bool {
    let (reply, rx) = oneshot::channel();
    let msg = CoreMsg::CloseWorker {
        name: name.to_owned(),
        code: close_code::REVOKED,
        reason: b"certificate revoked",
        reply,
    };
    core.send(msg).await && rx.await.unwrap_or(false)
}

fn unix_ms(t: time::OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}
