//! The fleet PKI: a private CA per fleet, the certificates it issues, and the rustls
//! configurations built from them.
//!
//! Every drover certificate is ECDSA P-256, names its holder in the subject CN and carries its
//! role as a SAN URI (`urn:drover:role:<role>`, see [`drover_protocol::identity`]). The CA
//! lives in one directory as [`CA_CERT_FILE`] and [`CA_KEY_FILE`]; leaf material is written as
//! `<name>.crt` / `<name>.key`.
//!
//! Invariants kept here:
//! - private keys are created with mode 0600 from the first byte (never chmod-ed afterwards);
//!   certificates are 0644;
//! - nothing is overwritten unless the caller asks (and the CA key never is);
//! - a TLS config is only built from a certificate that chains to the fleet CA and carries the
//!   role the caller expects, so a misconfigured peer fails at start-up with a message naming
//!   the file instead of at its first handshake;
//! - every rustls config uses an explicit ring provider and TLS 1.3 only (QUIC requires it), so
//!   nothing depends on a process-wide default provider.
//!
//! Layout: `files` holds file I/O (PEM loading, mode-aware writing), `issue` creates the CA
//! and issues leaves, `csr` makes and signs certificate signing requests (enrollment,
//! renewal), `tls` builds the rustls configs and checks peer identities.

mod csr;
mod files;
mod issue;
mod tls;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use drover_protocol::identity::{IdentityError, NAME_RULE};
use drover_protocol::Role;

pub use csr::{
    csr_name, enroll_client_config, fingerprint, is_enrollment_cert, make_csr, parse_fingerprint,
    Issued, KeyAndCsr, Signer, ENROLL_CN,
};
pub use files::{cert_not_after, cert_window, install_ca, install_leaf, load_certs, load_key};
pub use issue::{create_ca, issue_cert};
pub use tls::{
    client_config, own_identity, peer_identity, peer_role_is_coordinator, server_config,
    server_config_with, RevocationCheck,
};

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// ALPN protocol id every drover connection negotiates.
pub const ALPN: &[u8] = b"drover/1";
/// ALPN protocol id of the enrollment connection (join token + CSR, nothing else).
pub const ENROLL_ALPN: &[u8] = b"drover-enroll/1";
/// Lifetime of a new fleet CA, in days (about ten years).
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// How far in the past a new certificate's `notBefore` is placed, so that peers whose clocks
/// run a little behind still accept it.
pub const BACKDATE: time::Duration = time::Duration::minutes(5);

/// Where [`create_ca`] wrote the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where [`issue_cert`] wrote a leaf certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where a peer's TLS material lives: the fleet CA certificate(s) it trusts, its own
/// certificate (leaf first, optionally followed by intermediates) and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Options for issuing a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRequest {
    /// The role carried in the certificate's SAN URI.
    pub role: Role,
    /// Holder name, written as the subject CN and used for the file names; must satisfy
    /// [`NAME_RULE`].
    pub name: String,
    pub validity: Validity,
    /// Additional subject alternative names: DNS names (`host.example`, `*.example`) or IP
    /// addresses (`10.0.0.5`, `fd00::1`). Coordinator certificates also get the defaults listed
    /// on [`issue_cert`].
    pub extra_sans: Vec<String>,
}

/// How long an issued certificate is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validity {
    /// From a few minutes ago ([`BACKDATE`]) until this many days from now. Must be at least 1.
    Days(u32),
    /// An explicit window; lets tests make certificates that are already expired or not yet
    /// valid. `not_after` must be after `not_before`.
    Window {
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    },
}

/// Everything that can go wrong creating, issuing or loading fleet certificates. Each message
/// names the file involved and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} already exists; refusing to overwrite a fleet CA key. Use another directory, or \
         remove the existing CA files if you really mean to replace the CA (every certificate \
         it issued will stop working)",
        path.display()
    )]
    CaExists { path: PathBuf },
    #[error(
        "{} already exists; refusing to overwrite it. Remove it or ask to overwrite (--force)",
        path.display()
    )]
    FileExists { path: PathBuf },
    #[error("invalid name {name:?}: names must be {NAME_RULE}")]
    InvalidName { name: String },
    #[error("invalid subject alternative name {san:?}: expected a DNS name or an IP address")]
    InvalidSan { san: String },
    #[error("invalid validity: a certificate must be valid for at least 1 day")]
    ZeroDays,
    #[error(
        "invalid validity window: not_after ({not_after}) is not after not_before ({not_before})"
    )]
    EmptyWindow {
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    },
    #[error("cannot {action}: {source}")]
    Generate {
        action: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{}: no usable PEM {what}: {source}", path.display())]
    Pem {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: not a usable private key: {source}", path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{}: not a valid X.509 certificate: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{}: not a CA certificate (no CA:TRUE basic constraint); pass the fleet CA's {CA_CERT_FILE}", path.display())]
    NotACa { path: PathBuf },
    #[error("{}: the private key does not belong to the certificate {}; they must come from the same `issue`/`init` run", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: {source}; issue it again with the fleet CA", path.display())]
    Identity {
        path: PathBuf,
        #[source]
        source: IdentityError,
    },
    #[error("{}: certificate has role {found}, but this program needs a certificate with role {expected}; point it at one or issue one with `drover tls cert create --role {expected}`", path.display())]
    WrongRole {
        path: PathBuf,
        expected: Role,
        found: Role,
    },
    #[error("{}: certificate was not issued by the fleet CA in {}; issue it again with that CA or point to the CA that issued it", cert.display(), ca.display())]
    NotIssuedByCa { cert: PathBuf, ca: PathBuf },
    #[error("{}: certificate expired at {not_after}; issue a new one", path.display())]
    Expired {
        path: PathBuf,
        not_after: time::OffsetDateTime,
    },
    #[error("{}: certificate lifetime ({not_before} .. {not_after}) is outside the fleet CA's lifetime ({ca_not_before} .. {ca_not_after}) in {}; issue it again", cert.display(), ca.display())]
    OutsideCaLifetime {
        cert: PathBuf,
        ca: PathBuf,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
        ca_not_before: time::OffsetDateTime,
        ca_not_after: time::OffsetDateTime,
    },
    #[error("{}: certificate is not accepted under the fleet CA in {}: {source}", cert.display(), ca.display())]
    CertRejected {
        cert: PathBuf,
        ca: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the TLS configuration: {source}")]
    Tls {
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the client certificate verifier from {}: {source}", ca.display())]
    Verifier {
        ca: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer's certificate carries no usable drover identity: {0}")]
    PeerIdentity(#[source] IdentityError),
    #[error("the certificate signing request is not valid: {source}")]
    BadCsr {
        #[source]
        source: rcgen::Error,
    },
    #[error("the peer {name:?} has role {role}, not coordinator; check the coordinator address")]
    PeerNotCoordinator { name: String, role: Role },
}

impl PkiError {
    /// The file this error is mainly about, if any, so callers can name the config key that
    /// pointed at it.
    pub fn path(&self) -> Option<&std::path::Path> {
        use PkiError::*;
        match self {
            Io { path, .. }
            | CaExists { path }
            | FileExists { path }
            | Pem { path, .. }
            | BadKey { path, .. } => Some(path),
            BadCertificate { path, .. }
            | NotACa { path }
            | Identity { path, .. }
            | WrongRole { path, .. } => Some(path),
            Expired { path, .. } => Some(path),
            KeyMismatch { key, .. } => Some(key),
            NotIssuedByCa { cert, .. }
            | OutsideCaLifetime { cert, .. }
            | CertRejected { cert, .. } => Some(cert),
            Verifier { ca, .. } => Some(ca),
            _ => None,
        }
    }

    /// Which of the `[tls]` config keys (`tls.ca`, `tls.cert`, `tls.key`) led to this error.
    pub fn config_key(&self, files: &TlsFiles) -> Option<&'static str> {
        let p = self.path()?;
        [
            (&files.ca, "tls.ca"),
            (&files.cert, "tls.cert"),
            (&files.key, "tls.key"),
        ]
        .into_iter()
        .find(|(f, _)| f.as_path() == p)
        .map(|(_, k)| k)
    }
}
