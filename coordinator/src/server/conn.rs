//! One QUIC connection, from TLS handshake to close: identity from the certificate, the
//! versioned [`Hello`] handshake with its role checks, then the worker control session or the
//! operator request loop.
//!
//! A peer that breaks the protocol (malformed or oversized frame, wrong first message) has its
//! connection closed with [`close_code::PROTOCOL_ERROR`]; nothing else is affected.

use super::core::{software, CoreHandle, CoreMsg};
use crate::fleet::{ConnId, Registration};
use crate::wire::{self, FramedRecv, WireError};
use drover_protocol::identity::PeerIdentity;
use drover_protocol::{
    close_code, negotiate, CoordinatorMessage, Hello, HelloReply, OperatorRequest, Refusal, Role,
    WorkerMessage, SUPPORTED_VERSIONS,
};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::timeout;

/// How long a connected peer has to open its stream and say hello, and a worker to register.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings every connection task needs.
#[derive(Debug, Clone)]
pub struct ConnCtx {
    pub core: CoreHandle,
    pub heartbeat_interval_ms: u64,
    pub lease_ms: u64,
}

/// Serve one incoming connection to its end.
pub async fn serve(incoming: quinn::Incoming, id: ConnId, ctx: ConnCtx) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, reason = %e, "refused connection: TLS handshake failed");
            return;
        }
    };
    let identity = match peer_identity(&conn) {
        Ok(id) => id,
        Err(reason) => {
            tracing::warn!(%remote, %reason, "refused connection: bad certificate identity");
            conn.close(close_code::REFUSED.into(), reason.as_bytes());
            return;
        }
    };
    let (mut send, recv) = match timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%remote, peer = %identity.name, error = %e, "connection closed before its first stream");
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, peer = %identity.name, "closing connection: no stream opened within 10s");
            conn.close(close_code::PROTOCOL_ERROR.into(), b"handshake timeout");
            return;
        }
    };
    let mut recv = FramedRecv::new(recv);
    let hello = match timeout(HANDSHAKE_TIMEOUT, recv.next::<Hello>()).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return protocol_error(&conn, remote, &identity.name, &e),
        Err(_) => {
            tracing::warn!(%remote, peer = %identity.name, "closing connection: no hello within 10s");
            conn.close(close_code::PROTOCOL_ERROR.into(), b"handshake timeout");
            return;
        }
    };
    let version = match check_hello(&identity, &hello) {
        Ok(v) => v,
        Err(refusal) => {
            tracing::warn!(
                %remote, peer = %identity.name, certificate_role = %identity.role, software = %hello.software,
                reason = %refusal, "refused connection"
            );
            if wire::send(&mut send, &HelloReply::Refused(refusal))
                .await
                .is_ok()
            {
                let _ = send.finish();
                // Let the reply reach the peer before the close does; the peer closes first.
                let _ = timeout(Duration::from_secs(2), conn.closed()).await;
            }
            conn.close(close_code::REFUSED.into(), b"refused");
            return;
        }
    };
    let accepted = HelloReply::Accepted {
        version,
        software: software(),
        peer_name: identity.name.clone(),
    };
    if let Err(e) = wire::send(&mut send, &accepted).await {
        tracing::debug!(%remote, peer = %identity.name, error = %e, "peer left during handshake");
        return;
    }
    tracing::debug!(%remote, peer = %identity.name, role = %identity.role, version, software = %hello.software, "handshake done");
    let session = Session {
        conn,
        id,
        remote,
        name: identity.name,
        version,
        software: hello.software,
        ctx,
    };
    match identity.role {
        Role::Worker => session.worker(send, recv).await,
        Role::Operator => session.operator(send, recv).await,
        Role::Coordinator => unreachable!("check_hello refuses coordinator peers"),
    }
}

/// The certificate's identity (the TLS layer has already verified the chain and validity).
fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, String> {
    crate::pki::peer_identity(&wire::peer_certs(conn)).map_err(|e| e.to_string())
}

/// Version negotiation and role checks for a hello from a peer with `identity`.
pub fn check_hello(identity: &PeerIdentity, hello: &Hello) -> Result<u16, Refusal> {
    let version = negotiate(SUPPORTED_VERSIONS, hello.versions)?;
    if hello.role != identity.role {
        return Err(Refusal::RoleMismatch {
            certificate: identity.role,
            claimed: hello.role,
        });
    }
    if identity.role == Role::Coordinator {
        return Err(Refusal::RoleNotAllowed {
            role: identity.role,
        });
    }
    Ok(version)
}

fn protocol_error(conn: &quinn::Connection, remote: SocketAddr, name: &str, e: &WireError) {
    if e.is_protocol_violation() {
        tracing::warn!(%remote, peer = %name, error = %e, "closing connection: protocol violation");
        conn.close(close_code::PROTOCOL_ERROR.into(), b"protocol violation");
    } else {
        tracing::debug!(%remote, peer = %name, error = %e, "connection ended");
    }
}

struct Session {
    conn: quinn::Connection,
    id: ConnId,
    remote: SocketAddr,
    name: String,
    version: u16,
    software: String,
    ctx: ConnCtx,
}

impl Session {
    async fn worker(self, mut send: quinn::SendStream, mut recv: FramedRecv) {
        let resources = match timeout(HANDSHAKE_TIMEOUT, recv.next::<WorkerMessage>()).await {
            Ok(Ok(Some(WorkerMessage::Register { resources }))) => resources,
            Ok(Ok(Some(other))) => {
                tracing::warn!(remote = %self.remote, peer = %self.name, message = ?other, "closing connection: expected Register first");
                self.conn
                    .close(close_code::PROTOCOL_ERROR.into(), b"expected register");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return protocol_error(&self.conn, self.remote, &self.name, &e),
            Err(_) => {
                self.conn
                    .close(close_code::PROTOCOL_ERROR.into(), b"register timeout");
                return;
            }
        };
        let reg = Registration {
            conn: self.id,
            name: self.name.clone(),
            address: self.remote.to_string(),
            version: self.software.clone(),
            protocol_version: self.version,
            resources,
        };
        let (reply, durable) = oneshot::channel();
        if !self
            .ctx
            .core
            .send(CoreMsg::Register {
                reg,
                conn: self.conn.clone(),
                reply,
            })
            .await
        {
            return;
        }
        // Acknowledge only once the registry change is on disk.
        let stored = match durable.await {
            Ok(rx) => rx
                .await
                .unwrap_or_else(|_| Err("database writer stopped".into())),
            Err(_) => Err("coordinator shutting down".into()),
        };
        let clean = match stored {
            Err(e) => {
                tracing::error!(peer = %self.name, error = %e, "could not store registration; closing connection");
                self.conn
                    .close(close_code::SHUTDOWN.into(), b"registry unavailable");
                false
            }
            Ok(()) => self.worker_loop(&mut send, &mut recv).await,
        };
        self.ctx
            .core
            .send(CoreMsg::Disconnect {
                conn: self.id,
                name: self.name.clone(),
                clean,
            })
            .await;
    }

    /// Heartbeats until the connection ends; returns whether it ended cleanly.
    async fn worker_loop(&self, send: &mut quinn::SendStream, recv: &mut FramedRecv) -> bool {
        let registered = CoordinatorMessage::Registered {
            name: self.name.clone(),
            heartbeat_interval_ms: self.ctx.heartbeat_interval_ms,
            lease_ms: self.ctx.lease_ms,
        };
        if wire::send(send, &registered).await.is_err() {
            return false;
        }
        tracing::info!(remote = %self.remote, worker = %self.name, software = %self.software, "worker registered");
        loop {
            match recv.next::<WorkerMessage>().await {
                Ok(Some(WorkerMessage::Heartbeat { seq, usage })) => {
                    let hb = CoreMsg::Heartbeat {
                        conn: self.id,
                        name: self.name.clone(),
                        usage,
                    };
                    if !self.ctx.core.send(hb).await {
                        return false;
                    }
                    if wire::send(send, &CoordinatorMessage::HeartbeatAck { seq })
                        .await
                        .is_err()
                    {
                        return self.closed_cleanly();
                    }
                }
                Ok(Some(WorkerMessage::Goodbye { reason })) => {
                    tracing::info!(worker = %self.name, %reason, "worker said goodbye");
                    self.conn.close(close_code::GOODBYE.into(), b"goodbye");
                    return true;
                }
                Ok(Some(WorkerMessage::Register { .. })) => {
                    tracing::warn!(worker = %self.name, "closing connection: second Register on one connection");
                    self.conn
                        .close(close_code::PROTOCOL_ERROR.into(), b"duplicate register");
                    return false;
                }
                Ok(None) => return self.closed_cleanly(),
                Err(e) => {
                    protocol_error(&self.conn, self.remote, &self.name, &e);
                    return !e.is_protocol_violation() && self.closed_cleanly();
                }
            }
        }
    }

    /// Whether the peer closed the connection with the goodbye code.
    fn closed_cleanly(&self) -> bool {
        matches!(
            self.conn.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(ref c)) if c.error_code == close_code::GOODBYE.into()
        )
    }

    async fn operator(self, mut send: quinn::SendStream, mut recv: FramedRecv) {
        loop {
            let req = match recv.next::<OperatorRequest>().await {
                Ok(Some(req)) => req,
                Ok(None) => return,
                Err(e) => return protocol_error(&self.conn, self.remote, &self.name, &e),
            };
            tracing::debug!(operator = %self.name, request = ?req, "operator request");
            let (reply, answer) = oneshot::channel();
            if !self.ctx.core.send(CoreMsg::Operator { req, reply }).await {
                return;
            }
            let Ok(answer) = answer.await else { return };
            if wire::send(&mut send, &answer).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::VersionRange;

    fn hello(role: Role, versions: VersionRange) -> Hello {
        Hello {
            versions,
            role,
            software: "t".into(),
        }
    }

    #[test]
    fn role_and_version_checks() {
        let worker = PeerIdentity {
            name: "w".into(),
            role: Role::Worker,
        };
        assert_eq!(
            check_hello(&worker, &hello(Role::Worker, SUPPORTED_VERSIONS)),
            Ok(1)
        );
        assert_eq!(
            check_hello(&worker, &hello(Role::Operator, SUPPORTED_VERSIONS)),
            Err(Refusal::RoleMismatch {
                certificate: Role::Worker,
                claimed: Role::Operator
            })
        );
        let coord = PeerIdentity {
            name: "c".into(),
            role: Role::Coordinator,
        };
        assert!(matches!(
            check_hello(&coord, &hello(Role::Coordinator, SUPPORTED_VERSIONS)),
            Err(Refusal::RoleNotAllowed { .. })
        ));
        let future = VersionRange { min: 9, max: 9 };
        assert!(matches!(
            check_hello(&worker, &hello(Role::Worker, future)),
            Err(Refusal::UnsupportedVersion { .. })
        ));
    }
}
