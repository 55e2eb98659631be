//! Liveness probe: is anything still listening on a worker's UDP port?
//!
//! A worker SIGKILLed (or crashed) on a host that stays up closes its QUIC socket without a
//! word; only the lease would notice, seconds later. But the host's kernel answers a datagram
//! to a closed UDP port with ICMP "port unreachable", which a *connected* UDP socket reports
//! as `ECONNREFUSED` (quinn's unconnected endpoint socket discards it). So when a worker's
//! heartbeat is late, the core sends one byte from a fresh connected socket to the worker's
//! address and waits briefly: a refusal is a positive sign that no process holds the socket.
//!
//! No false positives from slowness: a busy, swapping or SIGSTOPped worker still owns its
//! socket, so the kernel queues the byte (quinn drops it as too short to be a QUIC packet) and
//! nothing comes back — the lease decides as before. Nor from a partition, a dead host or a
//! NAT: no answer either. The cost is one datagram per late worker per heartbeat interval.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// `true` when a datagram to `addr` is refused (port unreachable) within `wait`.
pub async fn port_closed(addr: SocketAddr, wait: Duration) -> bool {
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let Ok(sock) = tokio::net::UdpSocket::bind(local).await else {
        return false;
    };
    if sock.connect(addr).await.is_err() {
        return false;
    }
    match sock.send(&[0]).await {
        Err(e) => return e.kind() == ErrorKind::ConnectionRefused,
        Ok(_) => {}
    }
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, sock.recv(&mut buf)).await,
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closed_port_is_refused_open_port_is_not() {
        let open = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let open_addr = open.local_addr().expect("addr");
        let closed_addr = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            s.local_addr().expect("addr")
        };
        let wait = Duration::from_millis(300);
        assert!(port_closed(closed_addr, wait).await, "nothing listens there any more");
        assert!(!port_closed(open_addr, wait).await, "a live socket (even one never read) is not refused");
    }
}
