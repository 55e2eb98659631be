//! Liveness probe: is anything still listening on a worker's UDP port?
//!
//! A worker SIGKILLed (or crashed) on a host that stays up closes its QUIC socket without a
//! word; only the lease would notice, seconds later. But the host's kernel answers a datagram
//! to a closed UDP port with ICMP "port unreachable". quinn's endpoint socket discards such
//! errors, so when a worker's heartbeat is late the core sends one byte from a fresh,
//! connected socket with `IP_RECVERR` and reads the error queue: a port-unreachable whose
//! sender (the ICMP "offender") is the worker's own address is a positive sign that no process
//! holds the worker's socket any more.
//!
//! No false positives from slowness: a busy, swapping or SIGSTOPped worker still owns its
//! socket, so the kernel queues the byte (quinn drops it as too short to be a QUIC packet) and
//! nothing comes back. Nor from a partition or a dead host: either nothing answers, or a
//! router or the hypervisor's network does — and an answer from anyone but the worker's
//! address is ignored (the chaos suite's partition scenario met exactly that: a virtual network
//! answering "port unreachable" for an address it could no longer route). The lease decides in
//! all those cases, as before. Cost: one datagram per late worker per heartbeat interval, and a
//! blocking-pool thread for up to `wait`.

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage,
};
use std::io::{ErrorKind, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// ICMP "destination unreachable", code "port unreachable" (v4), and its ICMPv6 equivalent.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP6_DST_UNREACH: u8 = 1;
const ICMP6_DST_UNREACH_NOPORT: u8 = 4;

/// `true` when the host at `addr` itself answers a datagram to `addr` with "port unreachable"
/// within `wait`. Blocking: run it on the blocking pool.
pub fn port_closed(addr: SocketAddr, wait: Duration) -> bool {
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let Ok(sock) = UdpSocket::bind(local) else {
        return false;
    };
    let recv_err = if addr.is_ipv4() {
        setsockopt(&sock, sockopt::Ipv4RecvErr, &true)
    } else {
        setsockopt(&sock, sockopt::Ipv6RecvErr, &true)
    };
    if recv_err.is_err()
        || sock.connect(addr).is_err()
        || sock.set_read_timeout(Some(wait)).is_err()
    {
        return false;
    }
    if sock.send(&[0]).is_err() {
        // Refused at once: the error is queued all the same; read it below.
    } else {
        let mut buf = [0u8; 64];
        match sock.recv(&mut buf) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            _ => return false,
        }
    }
    refused_by(&sock, addr.ip())
}

/// Whether the socket's error queue holds a port-unreachable sent by `peer` itself.
fn refused_by(sock: &UdpSocket, peer: IpAddr) -> bool {
    let mut data = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut data)];
    let mut cmsg = nix::cmsg_space!(nix::libc::sock_extended_err, nix::libc::sockaddr_in6);
    let Ok(msg) = recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_ERRQUEUE,
    ) else {
        return false;
    };
    let Ok(cmsgs) = msg.cmsgs() else {
        return false;
    };
    for c in cmsgs {
        match c {
            ControlMessageOwned::Ipv4RecvErr(err, Some(from)) => {
                let from = Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr));
                if err.ee_origin == nix::libc::SO_EE_ORIGIN_ICMP
                    && err.ee_type == ICMP_DEST_UNREACH
                    && err.ee_code == ICMP_PORT_UNREACH
                    && IpAddr::V4(from) == peer
                {
                    return true;
                }
            }
            ControlMessageOwned::Ipv6RecvErr(err, Some(from)) => {
                let from = Ipv6Addr::from(from.sin6_addr.s6_addr);
                if err.ee_origin == nix::libc::SO_EE_ORIGIN_ICMP6
                    && err.ee_type == ICMP6_DST_UNREACH
                    && err.ee_code == ICMP6_DST_UNREACH_NOPORT
                    && IpAddr::V6(from) == peer
                {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_port_is_refused_open_port_is_not() {
        let open = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let open_addr = open.local_addr().expect("addr");
        let closed_addr = {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
            s.local_addr().expect("addr")
        };
        let wait = Duration::from_millis(300);
        assert!(
            port_closed(closed_addr, wait),
            "nothing listens there any more"
        );
        assert!(
            !port_closed(open_addr, wait),
            "a live socket (even one never read) is not refused"
        );
    }
}
