//! Where operator commands find the coordinator and their certificate: flags, then
//! environment, then the CLI config file (`cli.toml`), then defaults.

use super::{exit, CliError, ConnArgs};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The CLI config file (`~/.config/drover/cli.toml` or `/etc/drover/cli.toml`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CliConfig {
    /// Coordinator address, host:port.
    pub coordinator: Option<String>,
    /// Name to verify in the coordinator's certificate. Default `drover-coordinator`.
    pub server_name: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Resolved connection settings.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub coordinator: String,
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn default_config_file() -> Option<PathBuf> {
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))
        .map(|d| d.join("drover/cli.toml"));
    user.into_iter()
        .chain([PathBuf::from("/etc/drover/cli.toml")])
        .find(|p| p.exists())
}

/// Read a CLI config file; relative paths in it resolve against its directory.
pub fn load_file(path: &Path) -> Result<CliConfig, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::new(
            exit::CONFIG,
            format!("cannot read CLI config {}: {e}", path.display()),
        )
    })?;
    let mut cfg: CliConfig = toml::from_str(&text).map_err(|e| {
        CliError::new(
            exit::CONFIG,
            format!(
                "invalid CLI config {}: {}",
                path.display(),
                crate::config::toml_message(&e)
            ),
        )
    })?;
    crate::config::resolve_relative(
        path,
        [&mut cfg.ca, &mut cfg.cert, &mut cfg.key]
            .into_iter()
            .flatten(),
    );
    Ok(cfg)
}

/// Apply precedence: flags > env > file > defaults.
pub fn resolve(args: &ConnArgs) -> Result<Resolved, CliError> {
    let file = match args.config.clone().or_else(|| env_path("DROVER_CONFIG")) {
        Some(p) => load_file(&p)?,
        None => match default_config_file() {
            Some(p) => load_file(&p)?,
            None => CliConfig::default(),
        },
    };
    let coordinator = args
        .coordinator
        .clone()
        .or_else(|| std::env::var("DROVER_ADDR").ok().filter(|v| !v.is_empty()))
        .or(file.coordinator)
        .unwrap_or_else(|| "127.0.0.1:7070".into());
    let pick = |flag: &Option<PathBuf>, env: &str, from_file: Option<PathBuf>, what: &str| {
        flag.clone()
            .or_else(|| env_path(env))
            .or(from_file)
            .ok_or_else(|| {
                CliError::new(
                    exit::CONFIG,
                    format!(
                    "no {what} given: pass --{} PATH, set {env}, or set `{}` in a CLI config file \
                     (~/.config/drover/cli.toml); `drover dev` prints ready-made settings",
                    env.trim_start_matches("DROVER_").to_lowercase(),
                    env.trim_start_matches("DROVER_").to_lowercase()
                ),
                )
            })
    };
    Ok(Resolved {
        ca: pick(&args.ca, "DROVER_CA", file.ca, "fleet CA certificate")?,
        cert: pick(&args.cert, "DROVER_CERT", file.cert, "operator certificate")?,
        key: pick(&args.key, "DROVER_KEY", file.key, "operator key")?,
        coordinator,
        server_name: file
            .server_name
            .unwrap_or_else(|| drover_protocol::identity::COORDINATOR_SERVER_NAME.into()),
    })
}
