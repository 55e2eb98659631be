//! Secrets on the wire: how a task spec grants a secret for a use (never as a value), the
//! values the coordinator hands to the worker that runs such an attempt, and what an operator
//! sees of stored secrets (never a value either).
//!
//! A secret's value crosses the link twice at most: operator → coordinator when it is set
//! (`drover secret set`), and coordinator → worker inside the [`crate::Assignment`] of an
//! attempt whose spec grants it. Both ride on mutual TLS. [`Secret`] keeps values out of
//! `Debug` output, so logging a message never prints one.

use serde::{Deserialize, Serialize};

/// Shortest value `drover secret set` accepts: masking a shorter one in every event would
/// mask ordinary text too.
pub const MIN_SECRET_BYTES: usize = 8;
/// Longest value accepted (an API token or a private key fits).
pub const MAX_SECRET_BYTES: usize = 16 * 1024;
/// Longest secret name.
pub const MAX_SECRET_NAME: usize = 64;

/// A secret value. `Debug` prints `<redacted>`, never the value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl core::fmt::Debug for Secret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The value of one granted secret, sent to the worker with an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretValue {
    pub name: String,
    pub value: Secret,
}

/// How the egress proxy presents a secret to the upstream host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretScheme {
    /// `<header>: Bearer <value>`.
    Bearer,
    /// `<header>: Basic base64(<username>:<value>)` — what git hosts take for HTTPS pushes.
    Basic { username: String },
    /// `<header>: <value>` as it is.
    Raw,
}

/// A grant of one stored secret to a task, for requests to the named hosts only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretGrant {
    /// The stored secret's name (`drover secret set NAME`).
    pub name: String,
    /// Hosts (`host`, `host:port` or `*.domain`) whose requests get the credential; each must
    /// also be allowed by the spec's `egress` list.
    pub hosts: Vec<String>,
    /// The request header that carries it, e.g. `Authorization`.
    pub header: String,
    pub scheme: SecretScheme,
}

/// A stored secret as operators see it (`drover secret list --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretInfo {
    pub name: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// How many times it was set (1 after the first `set`).
    pub version: u32,
}

/// Whether `name` may name a secret: 1 to [`MAX_SECRET_NAME`] ASCII letters, digits, `_`, `-`
/// or `.`, starting with a letter or digit. Returns what is wrong otherwise.
pub fn check_secret_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_SECRET_NAME {
        return Err(format!(
            "secret names are 1 to {MAX_SECRET_NAME} characters; {name:?} has {}",
            name.len()
        ));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) || !name.chars().all(ok) {
        return Err(format!(
            "{name:?} is not a valid secret name: use letters, digits, '_', '-' and '.', \
             starting with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_value() {
        let v = SecretValue {
            name: "gh".into(),
            value: Secret("hunter2-very-secret".into()),
        };
        let shown = format!("{v:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("gh"));
    }

    #[test]
    fn names() {
        assert!(check_secret_name("github-token").is_ok());
        assert!(check_secret_name("a.b_c-1").is_ok());
        assert!(check_secret_name("").is_err());
        assert!(check_secret_name("-x").is_err());
        assert!(check_secret_name("a b").is_err());
        assert!(check_secret_name(&"x".repeat(65)).is_err());
    }
}
