//! rustls configurations for the coordinator (server) and its peers (clients), and the
//! identity checks on the certificates a connection presents.
//!
//! Both configs trust only the fleet CA, require certificates both ways, speak TLS 1.3 only
//! with ALPN [`ALPN`], and use an explicit ring provider. Before building one, the peer's own
//! certificate is checked the way the other end will check it (role, chain to the CA, usage,
//! expiry), so a misconfiguration is reported at start-up with the file to fix.

use std::path::Path;
use std::sync::Arc;

use drover_protocol::identity::{parse_identity, PeerIdentity, COORDINATOR_SERVER_NAME};
use drover_protocol::Role;
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use time::OffsetDateTime;

use super::files::{self, CertInfo};
use super::{PkiError, TlsFiles, ALPN, ENROLL_ALPN};

/// Server config for the coordinator: requires a client certificate chaining to the fleet CA
/// (none, another CA's or an expired one fails the handshake), presents the coordinator
/// certificate, ALPN `drover/1`.
///
/// Fails if the own certificate is not a coordinator certificate valid for
/// [`COORDINATOR_SERVER_NAME`] under the CA in `files.ca`, or has expired. The role of each
/// client is read after the handshake with [`peer_identity`].
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, PkiError> {
    server_config_with(files, None)
}

/// Decides whether a client certificate that chains to the fleet CA is revoked.
pub trait RevocationCheck: std::fmt::Debug + Send + Sync {
    /// `Some(reason)` if the certificate (DER) must be refused.
    fn revoked(&self, cert: &CertificateDer<'_>) -> Option<String>;
}

/// [`server_config`] with a revocation check run on every client certificate during the
/// handshake (a revoked one fails it with `certificate revoked`), and enrollment: the config
/// also offers ALPN [`ENROLL_ALPN`], accepts the self-signed enrollment certificate
/// ([`super::is_enrollment_cert`]) that new workers present, and sends the CA certificate
/// after its own so a new worker can check it against its pinned fingerprint. A connection
/// with the enrollment certificate carries no identity, so it can do nothing but enroll.
pub fn server_config_with(
    files: &TlsFiles,
    revocation: Option<Arc<dyn RevocationCheck>>,
) -> Result<ServerConfig, PkiError> {
    let own = Material::load(files)?;
    own.check(Role::Coordinator, OffsetDateTime::now_utc())?;
    match revocation {
        None => own.server_config(),
        Some(r) => own.enrolling_server_config(r),
    }
}

/// Client config for workers and the CLI: trusts only the fleet CA, presents the own
/// certificate, ALPN `drover/1`. Clients should connect with server name
/// [`COORDINATOR_SERVER_NAME`], which every coordinator certificate carries.
///
/// Fails if the own certificate's role is not `expected_own_role`, does not chain to the CA in
/// `files.ca`, or has expired. The coordinator's role is checked after connecting with
/// [`peer_role_is_coordinator`].
pub fn client_config(files: &TlsFiles, expected_own_role: Role) -> Result<ClientConfig, PkiError> {
    let own = Material::load(files)?;
    own.check(expected_own_role, OffsetDateTime::now_utc())?;
    own.client_config()
}

/// The identity in the certificate chain a peer presented (leaf first), as quinn's
/// `Connection::peer_identity` yields it after downcasting to `Vec<CertificateDer>`. The chain
/// itself was already verified against the fleet CA during the handshake.
pub fn peer_identity(peer_certs: &[CertificateDer<'_>]) -> Result<PeerIdentity, PkiError> {
    let leaf = peer_certs.first().ok_or(PkiError::NoPeerCertificate)?;
    parse_identity(leaf).map_err(PkiError::PeerIdentity)
}

/// Check that the peer (the server a client connected to) holds a coordinator certificate.
/// Returns its identity, for logs.
pub fn peer_role_is_coordinator(
    peer_certs: &[CertificateDer<'_>],
) -> Result<PeerIdentity, PkiError> {
    let id = peer_identity(peer_certs)?;
    match id.role {
        Role::Coordinator => Ok(id),
        role => Err(PkiError::PeerNotCoordinator {
            name: id.name,
            role,
        }),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One peer's TLS material, loaded and parsed.
pub(super) struct Material {
    files: TlsFiles,
    cas: Vec<(CertificateDer<'static>, CertInfo)>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Material {
    pub(super) fn load(files: &TlsFiles) -> Result<Self, PkiError> {
        let mut cas = Vec::new();
        let mut roots = RootCertStore::empty();
        // Several CA certificates may be listed, e.g. old and new while rotating the CA.
        for der in files::load_certs(&files.ca)? {
            let info = CertInfo::parse(&files.ca, &der)?;
            if !info.is_ca {
                return Err(PkiError::NotACa {
                    path: files.ca.clone(),
                });
            }
            roots
                .add(der.clone())
                .map_err(|e| PkiError::BadCertificate {
                    path: files.ca.clone(),
                    reason: e.to_string(),
                })?;
            cas.push((der, info));
        }
        Ok(Material {
            files: files.clone(),
            cas,
            roots: Arc::new(roots),
            chain: files::load_certs(&files.cert)?,
            key: files::load_key(&files.key)?,
        })
    }

    /// Check the own certificate as the other end will: the role, then the chain to the CA
    /// with the key usage (and, for a coordinator, the server name) that end requires. The
    /// chain is verified at a time inside both lifetimes, so that expiry is reported on its
    /// own, naming the certificate that expired.
    pub(super) fn check(&self, expected: Role, now: OffsetDateTime) -> Result<(), PkiError> {
        let cert_path = &self.files.cert;
        let leaf = &self.chain[0];
        let id = parse_identity(leaf).map_err(|source| PkiError::Identity {
            path: cert_path.clone(),
            source,
        })?;
        if id.role != expected {
            return Err(PkiError::WrongRole {
                path: cert_path.clone(),
                expected,
                found: id.role,
            });
        }
        let info = CertInfo::parse(cert_path, leaf)?;
        let issuers: Vec<&CertInfo> = self
            .cas
            .iter()
            .map(|(_, ca)| ca)
            .filter(|ca| ca.subject == info.issuer)
            .collect();
        if issuers.is_empty() {
            return Err(self.not_issued_by_ca());
        }

        let provider = provider();
        let mut last_err = None;
        for ca in issuers {
            let lo = info.not_before.max(ca.not_before);
            let hi = info.not_after.min(ca.not_after);
            if lo >= hi {
                last_err = Some(PkiError::OutsideCaLifetime {
                    cert: cert_path.clone(),
                    ca: self.files.ca.clone(),
                    not_before: info.not_before,
                    not_after: info.not_after,
                    ca_not_before: ca.not_before,
                    ca_not_after: ca.not_after,
                });
                continue;
            }
            match self.verify_at(expected, lo + (hi - lo) / 2, &provider) {
                Ok(()) => return check_times(cert_path, &info, &self.files.ca, ca, now),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| self.not_issued_by_ca()))
    }

    fn verify_at(
        &self,
        role: Role,
        at: OffsetDateTime,
        provider: &Arc<CryptoProvider>,
    ) -> Result<(), PkiError> {
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(at.unix_timestamp()).unwrap_or(0),
        ));
        let (leaf, intermediates) = (&self.chain[0], &self.chain[1..]);
        let result = if role == Role::Coordinator {
            let verifier =
                WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                    .build()
                    .map_err(|source| self.verifier_error(source))?;
            let name = ServerName::try_from(COORDINATOR_SERVER_NAME)
                .expect("COORDINATOR_SERVER_NAME is a valid DNS name");
            verifier
                .verify_server_cert(leaf, intermediates, &name, &[], at)
                .map(drop)
        } else {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                    .build()
                    .map_err(|source| self.verifier_error(source))?;
            verifier
                .verify_client_cert(leaf, intermediates, at)
                .map(drop)
        };
        result.map_err(|source| match source {
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => self.not_issued_by_ca(),
            source => PkiError::CertRejected {
                cert: self.files.cert.clone(),
                ca: self.files.ca.clone(),
                source,
            },
        })
    }

    pub(super) fn server_config(self) -> Result<ServerConfig, PkiError> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|source| self.verifier_error(source))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| PkiError::Tls { source })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain, self.key)
            .map_err(|source| key_error(&self.files, source))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        // No session resumption: a reconnecting worker does a full handshake (one per
        // reconnect), and every connection would otherwise be sent tickets and leave a session
        // in a server-side cache.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(config)
    }

    fn enrolling_server_config(
        self,
        revocation: Arc<dyn RevocationCheck>,
    ) -> Result<ServerConfig, PkiError> {
        let provider = provider();
        let inner =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|source| self.verifier_error(source))?;
        let verifier = FleetClientVerifier { inner, revocation };
        let mut chain = self.chain.clone();
        let leaf_issuer = CertInfo::parse(&self.files.cert, &chain[0])?.issuer;
        if let Some((ca, _)) = self.cas.iter().find(|(_, i)| i.subject == leaf_issuer) {
            if !chain.contains(ca) {
                chain.push(ca.clone());
            }
        }
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| PkiError::Tls { source })?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(chain, self.key.clone_key())
            .map_err(|source| key_error(&self.files, source))?;
        config.alpn_protocols = vec![ALPN.to_vec(), ENROLL_ALPN.to_vec()];
        // A resumed TLS session skips the client certificate check, and with it the
        // revocation check: no resumption, every connection is verified in full.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }

    pub(super) fn client_config(self) -> Result<ClientConfig, PkiError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| PkiError::Tls { source })?
            .with_root_certificates(self.roots)
            .with_client_auth_cert(self.chain, self.key)
            .map_err(|source| key_error(&self.files, source))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    fn not_issued_by_ca(&self) -> PkiError {
        PkiError::NotIssuedByCa {
            cert: self.files.cert.clone(),
            ca: self.files.ca.clone(),
        }
    }

    fn verifier_error(&self, source: rustls::server::VerifierBuilderError) -> PkiError {
        PkiError::Verifier {
            ca: self.files.ca.clone(),
            source,
        }
    }
}

/// Expiry is an error (someone must issue a new certificate); "not yet valid" only warns,
/// because it usually means this machine's clock is behind (a board without an RTC before
/// NTP has synced) and fixes itself.
fn check_times(
    cert_path: &Path,
    cert: &CertInfo,
    ca_path: &Path,
    ca: &CertInfo,
    now: OffsetDateTime,
) -> Result<(), PkiError> {
    for (path, info) in [(cert_path, cert), (ca_path, ca)] {
        if now > info.not_after {
            return Err(PkiError::Expired {
                path: path.to_owned(),
                not_after: info.not_after,
            });
        }
        if now < info.not_before {
            tracing::warn!(
                path = %path.display(),
                "certificate is not valid before {}, but the clock says {now}; check this \
                 machine's clock (peers will reject the certificate until then)",
                info.not_before,
            );
        }
    }
    Ok(())
}

fn key_error(files: &TlsFiles, source: rustls::Error) -> PkiError {
    match source {
        rustls::Error::InconsistentKeys(_) => PkiError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        },
        source => PkiError::Tls { source },
    }
}

/// The identity in the certificate file at `path` (its first certificate).
pub fn own_identity(path: &Path) -> Result<PeerIdentity, PkiError> {
    let certs = files::load_certs(path)?;
    parse_identity(&certs[0]).map_err(|source| PkiError::Identity {
        path: path.to_owned(),
        source,
    })
}

/// The coordinator's client verifier: the fleet CA's (webpki) plus the revocation check, and
/// the self-signed enrollment certificate let through (it names no one; see
/// [`server_config_with`]).
#[derive(Debug)]
struct FleetClientVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    revocation: Arc<dyn RevocationCheck>,
}

impl rustls::server::danger::ClientCertVerifier for FleetClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(ok) => match self.revocation.revoked(end_entity) {
                None => Ok(ok),
                Some(reason) => {
                    tracing::warn!(%reason, "refused a revoked certificate");
                    Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
                }
            },
            Err(e) if super::csr::is_enrollment_cert(end_entity) => {
                tracing::debug!(error = %e, "client presents an enrollment certificate");
                Ok(rustls::server::danger::ClientCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
