//! drover-worker as a library: the lean daemon that reports a host's resources to the
//! coordinator and runs task attempts in sandboxes.
//!
//! - [`archive`]: tar archives of task inputs and outputs, unpacked as hostile input;
//! - [`config`]: typed `worker.toml`;
//! - [`resources`]: what the host has and uses;
//! - [`sandbox`]: namespaces and cgroup limits for one attempt;
//! - [`executor`]: runs assigned attempts in the [`sandbox`] and streams their events, each
//!   once the worker has room for it ([`gate`]);
//!   [`acceptance`]: their acceptance criteria and verdict attempts;
//! - [`outbox`]: each attempt's events not yet acknowledged, in memory while few, else in its
//!   on-disk [`spool`];
//! - [`stream`]: an attempt's events through its outbox to the coordinator, across reconnects;
//! - [`link`]: the connection to the coordinator (handshake, registration, heartbeats,
//!   reconnect with capped exponential backoff and jitter);
//! - [`pki`]: the fleet CA, role-carrying certificates and rustls configs (the worker will
//!   make its own key and CSR when it enrolls);
//! - [`workdirs`]: attempts' workspaces, made or reused at the start and emptied at the end;
//! - [`workspace`]: an attempt's inputs in and outputs out ([`outputs`]: what is collected); [`transfer`]: files as chunks
//!   over framed streams;
//! - [`wire`], [`logging`], [`notify`]: small runtime pieces.
//!
//! The coordinator reuses `pki`, `wire`, `logging` and `notify` from here, so they are written
//! once and the lean worker binary pulls in nothing it does not need.

pub mod acceptance;
pub mod archive;
pub mod config;
pub mod egress;
pub mod enroll;
pub mod executor;
pub mod gate;
pub mod link;
pub mod logging;
pub mod notify;
pub mod outbox;
pub mod outputs;
pub mod pki;
pub mod redact;
pub mod resources;
pub mod sandbox;
pub mod spool;
pub mod stream;
pub mod transfer;
pub mod wire;
pub mod workdirs;
pub mod workspace;

/// Cancel `token` on the first SIGTERM or SIGINT.
pub async fn shutdown_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    token.cancel();
}

use tokio_util::sync::CancellationToken;
