//! Peer identity as carried in fleet certificates.
//!
//! Every drover certificate names its holder in the subject common name and its role in a
//! subject-alternative-name URI `urn:drover:role:<role>`. Both ends read the identity from the
//! DER certificate the TLS layer already verified against the fleet CA; this module only parses
//! (no I/O), so it is shared by the coordinator, the worker and the CLI.

use crate::handshake::Role;

/// URI prefix of the role SAN.
pub const ROLE_URI_PREFIX: &str = "urn:drover:role:";

/// DNS name every coordinator certificate carries, which clients verify by default. It lets
/// workers reach the coordinator by any address while still checking its certificate.
pub const COORDINATOR_SERVER_NAME: &str = "drover-coordinator";

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub name: String,
    pub role: Role,
}

/// Why a certificate does not carry a usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate is not valid DER X.509: {0}")]
    BadCertificate(String),
    #[error("certificate has no subject common name")]
    NoName,
    #[error("certificate name {0:?} is not valid: {NAME_RULE}")]
    BadName(String),
    #[error("certificate carries no drover role (a SAN URI {ROLE_URI_PREFIX}<role>)")]
    NoRole,
    #[error("certificate carries more than one drover role")]
    SeveralRoles,
    #[error("certificate role {0:?} is unknown")]
    UnknownRole(String),
}

/// Human-readable rule for names, used in error messages.
pub const NAME_RULE: &str =
    "1-63 characters of a-z, A-Z, 0-9, '.', '_' or '-', starting with a letter or digit";

/// Whether `name` is acceptable as a worker/operator/coordinator name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The SAN URI that carries `role`.
pub fn role_uri(role: Role) -> String {
    format!("{ROLE_URI_PREFIX}{role}")
}

/// Read the name and role from a DER-encoded certificate.
pub fn parse_identity(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(IdentityError::NoName)?
        .to_owned();
    if !valid_name(&name) {
        return Err(IdentityError::BadName(name));
    }
    let mut role = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let GeneralName::URI(uri) = gn {
                if let Some(r) = uri.strip_prefix(ROLE_URI_PREFIX) {
                    let parsed: Role = r
                        .parse()
                        .map_err(|_| IdentityError::UnknownRole(r.to_owned()))?;
                    if role.replace(parsed).is_some() {
                        return Err(IdentityError::SeveralRoles);
                    }
                }
            }
        }
    }
    Ok(PeerIdentity {
        name,
        role: role.ok_or(IdentityError::NoRole)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("worker-1"));
        assert!(valid_name("a.b_c"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(64)));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            parse_identity(b"nope"),
            Err(IdentityError::BadCertificate(_))
        ));
    }
}
