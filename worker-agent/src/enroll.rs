//! Joining a fleet with a join token: make a key locally, connect to the coordinator's
//! enrollment endpoint (same QUIC port, ALPN `drover-enroll/1`) trusting only the CA with the
//! pinned fingerprint, send a CSR with the token, and install the certificate, key (0600) and
//! CA certificate it gets. Then forget the token: remove `join_token` from the config file.

use crate::config::WorkerConfig;
use crate::pki::{self, PkiError};
use crate::wire::{self, FramedRecv};
use drover_protocol::{close_code, EnrollReply, EnrollRequest, SUPPORTED_VERSIONS};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(
        "{0:?} is not a SHA-256 fingerprint (64 hex digits, as `drover token create` prints it)"
    )]
    BadFingerprint(String),
    #[error("invalid worker name {0:?}: {rule}; pass --name", rule = drover_protocol::identity::NAME_RULE)]
    BadName(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot resolve the coordinator address {0:?}")]
    Resolve(String),
    #[error("cannot reach the coordinator at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the coordinator refused the enrollment: {0}")]
    Refused(String),
    #[error("the enrollment exchange failed: {0}")]
    Exchange(String),
    #[error("the CA certificate the coordinator sent does not match the pinned fingerprint")]
    CaMismatch,
}

impl EnrollError {
    /// Exit status: 69 when the coordinator could not be reached, 77 when it refused, 64 for
    /// bad input, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            EnrollError::BadFingerprint(_) | EnrollError::BadName(_) => 64,
            EnrollError::Resolve(_) | EnrollError::Connect { .. } => 69,
            EnrollError::Refused(_) | EnrollError::CaMismatch => 77,
            _ => 1,
        }
    }
}

/// The name to ask for: the configured one, else the host name.
pub fn default_name(config: &WorkerConfig) -> String {
    config.name.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    })
}

/// Enroll and install the certificate at the config's `tls.*` paths; returns the name the
/// certificate carries.
pub async fn enroll(
    config: &WorkerConfig,
    ca_fingerprint: &str,
    token: &str,
    name: &str,
) -> Result<String, EnrollError> {
    let fingerprint = pki::parse_fingerprint(ca_fingerprint)
        .ok_or_else(|| EnrollError::BadFingerprint(ca_fingerprint.to_owned()))?;
    if !drover_protocol::identity::valid_name(name) {
        return Err(EnrollError::BadName(name.to_owned()));
    }
    let material = pki::make_csr(name)?;
    let tls = pki::enroll_client_config(&material.key_pem, &fingerprint)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| EnrollError::Exchange(e.to_string()))?;
    let client = quinn::ClientConfig::new(Arc::new(quic));
    let addr: SocketAddr = config
        .coordinator
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| EnrollError::Resolve(config.coordinator.clone()))?;
    let endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
        .map_err(|e| EnrollError::Exchange(e.to_string()))?;
    let connect_err = |reason: String| EnrollError::Connect {
        addr: config.coordinator.clone(),
        reason,
    };
    let connecting = endpoint
        .connect_with(client, addr, &config.server_name)
        .map_err(|e| connect_err(e.to_string()))?;
    let conn = match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Err(_) => return Err(connect_err("no answer within 10s".into())),
        Ok(Err(e)) => return Err(connect_err(e.to_string())),
        Ok(Ok(c)) => c,
    };
    let exchange = |e: &dyn std::fmt::Display| EnrollError::Exchange(e.to_string());
    let (mut send, recv) = conn.open_bi().await.map_err(|e| exchange(&e))?;
    let req = EnrollRequest {
        versions: SUPPORTED_VERSIONS,
        token: token.trim().to_owned(),
        csr_pem: material.csr_pem.clone(),
        software: crate::link::software(),
    };
    wire::send(&mut send, &req)
        .await
        .map_err(|e| exchange(&e))?;
    let _ = send.finish();
    let mut recv = FramedRecv::new(recv);
    let reply = tokio::time::timeout(Duration::from_secs(15), recv.next::<EnrollReply>()).await;
    conn.close(close_code::GOODBYE.into(), b"enrolled");
    endpoint.wait_idle().await;
    let (name, cert_pem, ca_pem) = match reply {
        Err(_) => return Err(EnrollError::Exchange("no reply within 15s".into())),
        Ok(Err(e)) => return Err(exchange(&e)),
        Ok(Ok(None)) => {
            return Err(EnrollError::Exchange(
                "the coordinator sent no reply".into(),
            ))
        }
        Ok(Ok(Some(EnrollReply::Refused { reason }))) => return Err(EnrollError::Refused(reason)),
        Ok(Ok(Some(EnrollReply::Issued {
            name,
            cert_pem,
            ca_pem,
            ..
        }))) => (name, cert_pem, ca_pem),
    };
    // The TLS handshake already pinned the CA; check the file we are about to trust too.
    use rustls::pki_types::pem::PemObject;
    let ca_ok = rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .filter_map(Result::ok)
        .any(|der| pki::fingerprint(&der) == fingerprint);
    if !ca_ok {
        return Err(EnrollError::CaMismatch);
    }
    pki::install_ca(&config.tls.ca, &ca_pem)?;
    pki::install_leaf(
        &config.tls.key,
        &material.key_pem,
        &config.tls.cert,
        &cert_pem,
    )?;
    tracing::info!(worker = %name, cert = %config.tls.cert.display(), "enrolled: certificate installed");
    Ok(name)
}

/// Remove the `join_token` line from the config file (the token is used up and must not stay
/// on disk). Comments and every other line are kept; the file keeps its mode.
pub fn forget_token(file: &Path) -> std::io::Result<bool> {
    let text = std::fs::read_to_string(file)?;
    let mut removed = false;
    let kept: Vec<String> = text
        .lines()
        .map(|line| {
            let key = line.trim_start();
            if key.starts_with("join_token")
                && key["join_token".len()..].trim_start().starts_with('=')
            {
                removed = true;
                "# join_token: removed after enrolling".to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect();
    if !removed {
        return Ok(false);
    }
    let mut out = kept.join("\n");
    out.push('\n');
    let tmp = file.with_extension("toml.tmp");
    let mode = std::fs::metadata(file)?.permissions();
    std::fs::write(&tmp, out)?;
    std::fs::set_permissions(&tmp, mode)?;
    std::fs::rename(&tmp, file)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forget_token_removes_only_that_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.toml");
        std::fs::write(
            &p,
            "coordinator = \"a:1\"\njoin_token = \"abc.def\"\n# join_token = \"x\"\n[tls]\n",
        )
        .unwrap();
        assert!(forget_token(&p).unwrap());
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(!t.contains("abc.def"), "{t}");
        assert!(
            t.contains("coordinator = \"a:1\"") && t.contains("[tls]"),
            "{t}"
        );
        assert!(!forget_token(&p).unwrap());
    }
}
