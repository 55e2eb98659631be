//! systemd's notify protocol (READY=1, WATCHDOG=1, STOPPING=1) without libsystemd: one
//! datagram to `$NOTIFY_SOCKET`. Does nothing when not started by systemd.

use std::time::Duration;

fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "sd_notify: cannot create socket"),
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, state, "sd_notify failed");
    }
}

/// Tell systemd the service is up.
pub fn ready() {
    send("READY=1");
}

/// Tell systemd the service is shutting down.
pub fn stopping() {
    send("STOPPING=1");
}

/// Keep-alive for `WatchdogSec=`.
pub fn watchdog() {
    send("WATCHDOG=1");
}

/// Half the watchdog period systemd asked for, if it asked (`$WATCHDOG_USEC`).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    Some(Duration::from_micros(usec / 2)).filter(|d| !d.is_zero())
}
