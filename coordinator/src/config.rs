//! The coordinator's typed configuration: defaults < file < flags.
//!
//! Unknown keys are an error, so a typo in `/etc/drover/coordinator.toml` is reported with the
//! file and key instead of silently running with a default.

pub use drover_worker::config::{resolve_relative, toml_message};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the coordinator looks for its config when none is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/drover/coordinator.toml";

/// Coordinator configuration (`coordinator.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// UDP address to listen on for QUIC. Default `0.0.0.0:7070`.
    pub listen: SocketAddr,
    /// Directory of the embedded database. Default `/var/lib/drover`.
    pub state_dir: PathBuf,
    pub tls: TlsConfig,
    /// How often workers should heartbeat, in milliseconds. Default 500.
    pub heartbeat_interval_ms: u64,
    /// A worker that sends no heartbeat for this long is `lost`, in milliseconds. Default 3000.
    /// Raise it for flaky links; it must be at least twice the heartbeat interval.
    pub lease_ms: u64,
    /// When a worker's heartbeat is 1.5 intervals late, send one datagram to its address from a
    /// connected socket: an ICMP "port unreachable" answer means no process holds its socket
    /// any more, and the worker is lost at once instead of at the end of its lease (failover
    /// in well under a second after a worker dies on a host that stays up). A slow, stalled or
    /// partitioned worker is never declared lost by it. Default true.
    pub liveness_probe: bool,
    /// Lifetime of the worker certificates this coordinator signs (enrollment and renewal), in
    /// seconds. Workers renew at half of it over their link. Default 604800 (7 days); at
    /// least 10.
    pub worker_cert_ttl_s: u64,
    /// The 32-byte key that encrypts stored task secrets (`drover secret set`); made (mode
    /// 0600) on first start if missing. Back it up with the database: without it the stored
    /// secrets cannot be read. Default `<state_dir>/secrets.key`.
    pub secrets_key: Option<PathBuf>,
    /// Give a worker whose capacity is taken one more task, which it holds and starts the
    /// moment one of its attempts ends, so a slot does not wait for the coordinator to hear of
    /// the end and answer with the next task (the dispatch round trip and its fsync). At most
    /// one such task per worker; it counts as running there (cancel, drain and worker loss
    /// treat it so). Needs workers that hold assignments they have no room for, as this
    /// release's do: turn it off while older workers are in the fleet. Default true.
    pub assign_ahead: bool,
}

/// Certificate paths. Relative paths are resolved against the config file's directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The fleet CA certificate. Default `/etc/drover/tls/ca.crt`.
    pub ca: PathBuf,
    /// This coordinator's certificate (role coordinator). Default `/etc/drover/tls/coordinator.crt`.
    pub cert: PathBuf,
    /// Its private key. Default `/etc/drover/tls/coordinator.key`.
    pub key: PathBuf,
    /// The fleet CA's private key, to sign worker certificates (enrollment with join tokens,
    /// renewal). Unset (default): the coordinator signs nothing; workers need certificates
    /// made with `drover tls cert create`, and tokens cannot be created.
    pub ca_key: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            ca: "/etc/drover/tls/ca.crt".into(),
            cert: "/etc/drover/tls/coordinator.crt".into(),
            key: "/etc/drover/tls/coordinator.key".into(),
            ca_key: None,
        }
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7070)),
            state_dir: "/var/lib/drover".into(),
            tls: TlsConfig::default(),
            heartbeat_interval_ms: 500,
            lease_ms: 3000,
            liveness_probe: true,
            worker_cert_ttl_s: 7 * 24 * 3600,
            secrets_key: None,
            assign_ahead: true,
        }
    }
}

/// A config that could not be used. Exit code 64 at the edge.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; pass --config PATH or create it")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {origin}: key `{key}`: {message}")]
    Invalid {
        origin: String,
        key: &'static str,
        message: String,
    },
}

impl CoordinatorConfig {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut cfg: CoordinatorConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: toml_message(&e),
        })?;
        resolve_relative(
            path,
            [
                &mut cfg.tls.ca,
                &mut cfg.tls.cert,
                &mut cfg.tls.key,
                &mut cfg.state_dir,
            ],
        );
        if let Some(k) = cfg.tls.ca_key.as_mut() {
            resolve_relative(path, [k]);
        }
        if let Some(k) = cfg.secrets_key.as_mut() {
            resolve_relative(path, [k]);
        }
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// Check values that parse but make no sense.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            key,
            message,
        };
        if self.heartbeat_interval_ms < 50 {
            return Err(invalid(
                "heartbeat_interval_ms",
                format!("{} is below the minimum of 50", self.heartbeat_interval_ms),
            ));
        }
        if self.lease_ms < 2 * self.heartbeat_interval_ms {
            return Err(invalid(
                "lease_ms",
                format!(
                    "{} must be at least twice heartbeat_interval_ms ({}), or every worker would flap to lost",
                    self.lease_ms, self.heartbeat_interval_ms
                ),
            ));
        }
        if self.worker_cert_ttl_s < 10 {
            return Err(invalid(
                "worker_cert_ttl_s",
                format!(
                    "{} is below the minimum of 10 seconds",
                    self.worker_cert_ttl_s
                ),
            ));
        }
        Ok(())
    }

    /// Where the secrets key is.
    pub fn secrets_key_path(&self) -> PathBuf {
        self.secrets_key
            .clone()
            .unwrap_or_else(|| self.state_dir.join(crate::secrets::KEY_FILE))
    }

    /// Lifetime of signed worker certificates.
    pub fn worker_cert_ttl(&self) -> Duration {
        Duration::from_secs(self.worker_cert_ttl_s)
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "listen = \"127.0.0.1:1\"\nheartbeat_intervall_ms = 5\n").unwrap();
        let e = CoordinatorConfig::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("heartbeat_intervall_ms") && e.contains("c.toml") && e.contains("line 2"),
            "{e}"
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "state_dir = \"state\"\n[tls]\nca = \"ca.crt\"\n").unwrap();
        let c = CoordinatorConfig::load(&p).unwrap();
        assert_eq!(c.state_dir, dir.path().join("state"));
        assert_eq!(c.tls.ca, dir.path().join("ca.crt"));
    }

    #[test]
    fn ca_key_resolves_and_cert_lifetime_has_a_floor() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "worker_cert_ttl_s = 30\n[tls]\nca_key = \"ca.key\"\n").unwrap();
        let c = CoordinatorConfig::load(&p).unwrap();
        assert_eq!(c.tls.ca_key, Some(dir.path().join("ca.key")));
        assert_eq!(c.worker_cert_ttl(), Duration::from_secs(30));
        std::fs::write(&p, "worker_cert_ttl_s = 5\n").unwrap();
        let e = CoordinatorConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("worker_cert_ttl_s"), "{e}");
    }

    #[test]
    fn lease_must_exceed_two_heartbeats() {
        let c = CoordinatorConfig {
            lease_ms: 600,
            ..Default::default()
        };
        let e = c.validate("x").unwrap_err().to_string();
        assert!(e.contains("lease_ms"), "{e}");
    }
}
