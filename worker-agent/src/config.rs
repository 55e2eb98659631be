//! The worker's typed configuration (`/etc/drover/worker.toml`): defaults < file < flags.
//! Unknown keys are errors that name the file and key.

use drover_protocol::task::OnDisconnect;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the worker looks for its config when none is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/drover/worker.toml";

/// How long a `keep_running` attempt may stay disconnected by default, ms (5 minutes).
pub const DEFAULT_LOST_AFTER_MS: u64 = 300_000;

/// Worker configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// The coordinator's address, `host:port`. Default `127.0.0.1:7070`.
    pub coordinator: String,
    /// The name the coordinator's certificate must carry. Default `drover-coordinator`, which
    /// every coordinator certificate has, so workers can use any address.
    pub server_name: String,
    /// Where task attempts get their workspaces; disk figures are reported for its filesystem.
    /// Default `/var/lib/drover-worker`.
    pub work_dir: PathBuf,
    /// Labels to advertise besides the detected ones (`browser`, `gpu`).
    pub labels: Vec<String>,
    /// Heartbeat interval in milliseconds; default (unset): the interval the coordinator asks for.
    pub heartbeat_interval_ms: Option<u64>,
    /// First reconnect delay in milliseconds. Default 200.
    pub reconnect_initial_ms: u64,
    /// Longest reconnect delay in milliseconds (the backoff doubles up to this). Default 10000.
    pub reconnect_max_ms: u64,
    /// Most bytes of events one attempt may hold on disk unacknowledged (its spool, under
    /// `work_dir/spool`). When full, the attempt's output is read no further, so the task
    /// blocks on its own writes until the coordinator catches up; nothing is dropped.
    /// Default 64 MiB; at least 4 MiB.
    pub spool_max_bytes: u64,
    /// Most bytes of an attempt's unacknowledged events held in the worker's memory before
    /// they move to its on-disk spool (where they stay for the rest of the attempt). Most
    /// attempts' events are acknowledged long before; 0 puts every attempt's events on disk
    /// from the first. Default 262144 (256 KiB); at most `spool_max_bytes`.
    pub spool_memory_bytes: u64,
    /// What happens to running attempts when the link to the coordinator drops, for tasks
    /// whose spec does not say: `kill` (default) or `keep_running`.
    pub on_disconnect: OnDisconnect,
    /// With `keep_running`: how long, in milliseconds, an attempt may stay disconnected before
    /// the worker stops it (the coordinator reschedules it then), for tasks whose spec does not
    /// say. Default 300000 (5 minutes).
    pub lost_after_ms: u64,
    /// A join token from `drover token create`: when the certificate in `tls.cert` does not
    /// exist yet, the worker enrolls with it (makes its key, gets a certificate), then removes
    /// this key from the config file. Needs `ca_fingerprint`.
    pub join_token: Option<String>,
    /// SHA-256 fingerprint of the fleet CA certificate (`drover token create` prints it): the
    /// only coordinator CA the worker accepts while enrolling.
    pub ca_fingerprint: Option<String>,
    /// The name to ask for when enrolling. Default: this host's name.
    pub name: Option<String>,
    pub tls: TlsPaths,
    pub egress: EgressConfig,
    /// The file this config was loaded from (not a key): hidden from sandboxed tasks with the
    /// other private paths.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// Certificate paths; relative paths resolve against the config file's directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsPaths {
    /// Default `/etc/drover/tls/ca.crt`.
    pub ca: PathBuf,
    /// This worker's certificate (role worker; its name is the worker's identity).
    /// Default `/etc/drover/tls/worker.crt`.
    pub cert: PathBuf,
    /// Default `/etc/drover/tls/worker.key`.
    pub key: PathBuf,
}

/// The egress proxy of `network = "proxy"` tasks (see docs/operations.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// PEM files of the certificate authorities the proxy trusts for upstream hosts; a host
    /// that cannot prove its name with one of them gets no request (and no credential).
    /// Default: Debian's system bundle, `/etc/ssl/certs/ca-certificates.crt`.
    pub upstream_ca: Vec<PathBuf>,
}

/// Where Debian (and Ubuntu) keep the system's trusted roots.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            upstream_ca: vec![SYSTEM_CA_BUNDLE.into()],
        }
    }
}

impl Default for TlsPaths {
    fn default() -> Self {
        Self {
            ca: "/etc/drover/tls/ca.crt".into(),
            cert: "/etc/drover/tls/worker.crt".into(),
            key: "/etc/drover/tls/worker.key".into(),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            coordinator: "127.0.0.1:7070".into(),
            server_name: drover_protocol::identity::COORDINATOR_SERVER_NAME.into(),
            work_dir: "/var/lib/drover-worker".into(),
            labels: Vec::new(),
            heartbeat_interval_ms: None,
            reconnect_initial_ms: 200,
            reconnect_max_ms: 10_000,
            spool_max_bytes: crate::spool::DEFAULT_SPOOL_BYTES,
            spool_memory_bytes: crate::outbox::DEFAULT_MEMORY_BYTES,
            on_disconnect: OnDisconnect::Kill,
            lost_after_ms: DEFAULT_LOST_AFTER_MS,
            join_token: None,
            ca_fingerprint: None,
            name: None,
            tls: TlsPaths::default(),
            egress: EgressConfig::default(),
            file: None,
        }
    }
}

/// A config the worker cannot run with (exit code 64 at the edge).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; pass --config PATH or create it")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

impl WorkerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut cfg: WorkerConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: toml_message(&e),
        })?;
        resolve_relative(
            path,
            [
                &mut cfg.tls.ca,
                &mut cfg.tls.cert,
                &mut cfg.tls.key,
                &mut cfg.work_dir,
            ]
            .into_iter()
            .chain(cfg.egress.upstream_ca.iter_mut()),
        );
        cfg.file = Some(path.to_path_buf());
        // An empty value (as in the shipped config with the line uncommented) means unset.
        for v in [&mut cfg.join_token, &mut cfg.ca_fingerprint, &mut cfg.name] {
            if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
                *v = None;
            }
        }
        let invalid = |key, message: String| ConfigError::Invalid {
            path: path.into(),
            key,
            message,
        };
        if !cfg.coordinator.contains(':') {
            return Err(invalid(
                "coordinator",
                format!("{:?} has no port; expected host:port", cfg.coordinator),
            ));
        }
        if let Some(hb) = cfg.heartbeat_interval_ms {
            if hb < 50 {
                return Err(invalid(
                    "heartbeat_interval_ms",
                    format!("{hb} is below the minimum of 50"),
                ));
            }
        }
        if cfg.reconnect_initial_ms == 0 || cfg.reconnect_max_ms < cfg.reconnect_initial_ms {
            return Err(invalid(
                "reconnect_max_ms",
                format!(
                    "must be at least reconnect_initial_ms ({}), which must be above 0",
                    cfg.reconnect_initial_ms
                ),
            ));
        }
        if cfg.spool_max_bytes < crate::spool::MIN_SPOOL_BYTES {
            return Err(invalid(
                "spool_max_bytes",
                format!(
                    "{} is below the minimum of {} (4 MiB)",
                    cfg.spool_max_bytes,
                    crate::spool::MIN_SPOOL_BYTES
                ),
            ));
        }
        if cfg.spool_memory_bytes > cfg.spool_max_bytes {
            return Err(invalid(
                "spool_memory_bytes",
                format!(
                    "{} is above spool_max_bytes ({})",
                    cfg.spool_memory_bytes, cfg.spool_max_bytes
                ),
            ));
        }
        if cfg.lost_after_ms == 0 {
            return Err(invalid(
                "lost_after_ms",
                "must be more than 0, e.g. 300000 for 5 minutes".into(),
            ));
        }
        if let Some(fp) = &cfg.ca_fingerprint {
            if crate::pki::parse_fingerprint(fp).is_none() {
                return Err(invalid(
                    "ca_fingerprint",
                    format!("{fp:?} is not a SHA-256 fingerprint (64 hex digits, as `drover token create` prints it)"),
                ));
            }
        }
        if cfg.join_token.is_some() && cfg.ca_fingerprint.is_none() {
            return Err(invalid(
                "ca_fingerprint",
                "is needed with join_token: copy it from `drover token create`".into(),
            ));
        }
        if let Some(bad) = cfg
            .labels
            .iter()
            .find(|l| !drover_protocol::identity::valid_name(l))
        {
            return Err(invalid(
                "labels",
                format!(
                    "{bad:?} is not a valid label: {}",
                    drover_protocol::identity::NAME_RULE
                ),
            ));
        }
        Ok(cfg)
    }

    pub fn reconnect_initial(&self) -> Duration {
        Duration::from_millis(self.reconnect_initial_ms)
    }

    pub fn reconnect_max(&self) -> Duration {
        Duration::from_millis(self.reconnect_max_ms)
    }
}

/// Make relative paths in a config file relative to the file's directory, as operators expect.
pub fn resolve_relative<'a>(file: &Path, paths: impl IntoIterator<Item = &'a mut PathBuf>) {
    let base = file.parent().unwrap_or(Path::new("."));
    for p in paths {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
}

/// toml's message with its line and column, on one line.
pub fn toml_message(e: &toml::de::Error) -> String {
    let mut msg = e.message().trim().to_owned();
    if let Some(line) = e.to_string().lines().next() {
        if let Some(pos) = line.strip_prefix("TOML parse error ") {
            msg = format!("{msg} ({})", pos.trim());
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<WorkerConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("worker.toml");
        std::fs::write(&p, text).unwrap();
        WorkerConfig::load(&p)
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load("coordinator = \"a:1\"\nlabel = [\"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("label") && e.contains("worker.toml") && e.contains("line 2"),
            "{e}"
        );
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = load(
            "coordinator = \"10.0.0.1:7070\"\nlabels = [\"browser\"]\n[tls]\ncert = \"w.crt\"\n",
        )
        .unwrap();
        assert!(c.tls.cert.ends_with("w.crt") && c.tls.cert.is_absolute());
        assert_eq!(c.tls.ca, PathBuf::from("/etc/drover/tls/ca.crt"));
        assert_eq!(c.reconnect_max_ms, 10_000);
    }

    #[test]
    fn enrollment_keys() {
        let e = load("join_token = \"a.b\"\n").unwrap_err().to_string();
        assert!(e.contains("`ca_fingerprint`"), "{e}");
        let e = load("join_token = \"a.b\"\nca_fingerprint = \"xyz\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`ca_fingerprint`") && e.contains("xyz"), "{e}");
        let fp = "AB".repeat(32);
        let c = load(&format!(
            "join_token = \"a.b\"\nca_fingerprint = \"{fp}\"\n"
        ))
        .unwrap();
        assert_eq!(c.join_token.as_deref(), Some("a.b"));
        // Empty values (the shipped config, uncommented) mean unset.
        let c = load("join_token = \"\"\nca_fingerprint = \"\"\nname = \"\"\n").unwrap();
        assert_eq!((c.join_token, c.ca_fingerprint, c.name), (None, None, None));
    }

    #[test]
    fn bad_values_are_named() {
        assert!(load("coordinator = \"nohost\"\n")
            .unwrap_err()
            .to_string()
            .contains("`coordinator`"));
        assert!(load("labels = [\"a b\"]\n")
            .unwrap_err()
            .to_string()
            .contains("`labels`"));
        assert!(load("spool_max_bytes = 1000\n")
            .unwrap_err()
            .to_string()
            .contains("`spool_max_bytes`"));
        assert!(load("lost_after_ms = 0\n")
            .unwrap_err()
            .to_string()
            .contains("`lost_after_ms`"));
        let c = load("on_disconnect = \"keep_running\"\nlost_after_ms = 60000\n").unwrap();
        assert_eq!(c.on_disconnect, OnDisconnect::KeepRunning);
        assert_eq!(c.spool_max_bytes, 64 << 20);
        assert!(load("on_disconnect = \"pause\"\n").is_err());
        assert!(load("reconnect_initial_ms = 500\nreconnect_max_ms = 100\n")
            .unwrap_err()
            .to_string()
            .contains("reconnect"));
    }
}
