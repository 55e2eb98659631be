//! The versioned handshake that opens every connection.
//!
//! The connecting peer sends [`Hello`] as the first frame of its first bidirectional stream; the
//! coordinator answers [`HelloReply`]. The coordinator picks the highest version both ranges
//! contain; with none in common it refuses with both ranges, so each side can name them in its
//! error message. A refused connection is closed by the coordinator after the reply.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks best.
pub const PROTOCOL_VERSION: u16 = 6;

/// Every protocol version this build can speak. v1 (the fleet link without tasks) was never
/// released; v3 added the OOM policy and `on_disconnect`/`lost_after_ms` to the task spec;
/// v4 added acceptance criteria, iterations and verdicts to the spec, task info and
/// assignments, and certificate renewal and revocation messages; v5 added the egress proxy
/// network, egress hosts and secret grants to the spec, secret values to assignments and the
/// secret requests; v6 added `Prepare` and `Confirm` (an attempt made ready while its epoch
/// is written). v6 changed no earlier encoding, but a v5 worker cannot decode what a v6
/// coordinator sends it for every attempt. So the newest is the floor: a fleet upgrades
/// coordinator and workers together.
pub const SUPPORTED_VERSIONS: VersionRange = VersionRange {
    min: 6,
    max: PROTOCOL_VERSION,
};

/// An inclusive range of protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    pub min: u16,
    pub max: u16,
}

impl core::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.min == self.max {
            write!(f, "v{}", self.min)
        } else {
            write!(f, "v{}..=v{}", self.min, self.max)
        }
    }
}

/// What a peer is allowed to do, as stated in its certificate and claimed in its [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Coordinator,
    Worker,
    Operator,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Coordinator, Role::Worker, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
            Role::Operator => "operator",
        }
    }
}

impl core::fmt::Display for Role {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: expected coordinator, worker or operator"))
    }
}

/// First frame on a connection, from the connecting peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the peer can speak.
    pub versions: VersionRange,
    /// The role the peer means to act in; must match the role in its certificate.
    pub role: Role,
    /// The peer's software, e.g. `drover-worker 0.1.0`.
    pub software: String,
}

/// The coordinator's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Go ahead, speaking `version`. `peer_name` is the identity taken from the certificate.
    Accepted {
        version: u16,
        software: String,
        peer_name: String,
    },
    /// The connection is refused; the coordinator closes it after sending this.
    Refused(Refusal),
}

/// Why the coordinator refused a connection. Each carries what the operator needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// No protocol version in common.
    UnsupportedVersion {
        coordinator: VersionRange,
        peer: VersionRange,
    },
    /// The claimed role is not the one the certificate carries.
    RoleMismatch { certificate: Role, claimed: Role },
    /// The certificate's role may not use this service (e.g. a worker certificate running
    /// operator commands, or a coordinator certificate registering as a worker).
    RoleNotAllowed { role: Role },
    /// The certificate has no usable drover identity (name or role missing).
    BadIdentity { reason: String },
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Refusal::UnsupportedVersion { coordinator, peer } => write!(
                f,
                "unsupported protocol version: coordinator speaks {coordinator}, this peer speaks {peer}; \
                 upgrade the older side"
            ),
            Refusal::RoleMismatch { certificate, claimed } => write!(
                f,
                "role mismatch: the certificate is for role {certificate} but the peer connected as {claimed}"
            ),
            Refusal::RoleNotAllowed { role } => write!(
                f,
                "a certificate with role {role} may not do this; use a certificate with the right role \
                 (drover tls cert create --role ...)"
            ),
            Refusal::BadIdentity { reason } => write!(f, "certificate has no usable drover identity: {reason}"),
        }
    }
}

/// Pick the version to speak: the highest one in both ranges.
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Result<u16, Refusal> {
    let low = ours.min.max(theirs.min);
    let high = ours.max.min(theirs.max);
    if low <= high && theirs.min <= theirs.max {
        Ok(high)
    } else {
        Err(Refusal::UnsupportedVersion {
            coordinator: ours,
            peer: theirs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_highest_common() {
        let a = VersionRange { min: 1, max: 3 };
        let b = VersionRange { min: 2, max: 5 };
        assert_eq!(negotiate(a, b), Ok(3));
    }

    #[test]
    fn disjoint_ranges_name_both() {
        let ours = VersionRange { min: 1, max: 1 };
        let theirs = VersionRange { min: 2, max: 4 };
        let err = negotiate(ours, theirs).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("v1") && text.contains("v2..=v4"), "{text}");
    }

    #[test]
    fn inverted_range_is_refused() {
        let theirs = VersionRange { min: 1, max: 0 };
        assert!(negotiate(SUPPORTED_VERSIONS, theirs).is_err());
    }

    #[test]
    fn role_parses() {
        assert_eq!("worker".parse::<Role>(), Ok(Role::Worker));
        assert!("admin".parse::<Role>().is_err());
    }
}
