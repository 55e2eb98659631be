//! Enrollment and certificate-lifecycle messages: what a new worker sends on the enrollment
//! connection (a join token and a certificate signing request) and gets back, and the records
//! the operator sees for join tokens and revocations.
//!
//! The enrollment connection is the only one a peer may open without a client certificate:
//! it negotiates its own ALPN, carries exactly one [`EnrollRequest`] and one [`EnrollReply`] on
//! one stream, and nothing else is reachable on it.

use serde::{Deserialize, Serialize};

use crate::handshake::VersionRange;

/// Worker → coordinator: the only message on an enrollment connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// Protocol versions the worker speaks (checked like [`crate::Hello::versions`]).
    pub versions: VersionRange,
    /// The join token as `drover token create` printed it (`<id>.<secret>`).
    pub token: String,
    /// A PKCS#10 certificate signing request (PEM) for the key the worker made locally; its
    /// subject CN is the name the worker asks for (the token's name, if it has one, wins).
    pub csr_pem: String,
    /// The worker's software string, for logs.
    pub software: String,
}

/// Coordinator → worker: the answer to an [`EnrollRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollReply {
    /// The worker certificate (PEM), the name it carries, the fleet CA certificate (PEM) and
    /// the certificate's expiry (ms since the Unix epoch).
    Issued {
        name: String,
        cert_pem: String,
        ca_pem: String,
        not_after_ms: u64,
    },
    /// Enrollment refused; `reason` says why and what to do. The coordinator does not say
    /// whether a token exists, only that it was not accepted.
    Refused { reason: String },
}

/// A join token as the coordinator keeps it (never its secret, which is stored hashed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Public id: the part of the token before the dot.
    pub id: String,
    pub label: Option<String>,
    /// The worker name the token enrolls (`None`: the name in the worker's request).
    pub name: Option<String>,
    /// How many enrollments the token allows in all.
    pub max_uses: u32,
    /// How many it has done.
    pub uses: u32,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// Revoked by the operator before it was used up or expired.
    pub revoked: bool,
}

/// The answer to a worker revocation or reinstatement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationReport {
    pub name: String,
    /// Whether the name is revoked now.
    pub revoked: bool,
    /// Whether anything changed (false: it already was so).
    pub changed: bool,
    /// Whether a live connection of the worker was closed.
    pub disconnected: bool,
    /// Certificates issued to the name by this coordinator that are now refused.
    pub certificates: u32,
}
