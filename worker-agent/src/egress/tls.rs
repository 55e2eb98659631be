//! TLS on both sides of the egress proxy.
//!
//! Toward the sandbox: each attempt gets its own throw-away CA ([`AttemptCa`], ECDSA P-256,
//! valid for a day, made when the attempt starts and never written anywhere but memory — only
//! its certificate goes into the workspace, for the task to trust). For every host the task
//! CONNECTs to, the proxy presents a leaf for that name signed by it, reads the request in
//! clear, adds the credential and sends it on. A task can only ever make that CA sign for
//! itself: its key stays in the worker.
//!
//! Toward the upstream: a normal verifying rustls client with the roots of the worker's
//! `egress.upstream_ca` files (the system bundle by default), so the proxy never sends a
//! credential to a host that cannot prove its name.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use time::{Duration, OffsetDateTime};

/// Why the proxy's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make the attempt's proxy CA: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot build the proxy's TLS config: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("no certificate could be loaded from egress.upstream_ca ({}); the proxy cannot verify any upstream host", list(.0))]
    NoRoots(Vec<PathBuf>),
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Most leaf certificates cached per attempt (one per host it talks to).
const MAX_LEAVES: usize = 256;

/// One attempt's proxy CA and the server configs made from it.
pub struct AttemptCa {
    key: KeyPair,
    cert: rcgen::Certificate,
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for AttemptCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttemptCa").finish_non_exhaustive()
    }
}

impl AttemptCa {
    pub fn new(task_id: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("drover egress proxy for task {task_id}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(1);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            key,
            cert,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate (PEM) the task trusts.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A server config presenting a certificate for `host` (a DNS name or an IP address).
    pub fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = leaves.get(host) {
            return Ok(c.clone());
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec![host.to_owned()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(1);
        let leaf = params.signed_by(&key, &self.cert, &self.key)?;
        let chain = vec![CertificateDer::from(leaf.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(host.to_owned(), config.clone());
        Ok(config)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client config for upstream connections: roots from every readable PEM file in
/// `files` (files that cannot be read are logged and skipped).
pub fn upstream_config(files: &[PathBuf]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for file in files {
        match crate::pki::load_certs(file) {
            Ok(certs) => {
                let (added, ignored) = roots.add_parsable_certificates(certs);
                tracing::debug!(file = %file.display(), added, ignored, "egress proxy roots");
            }
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "egress.upstream_ca: cannot load; skipped")
            }
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots(files.to_vec()));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
