//! One QUIC connection, from TLS handshake to close: identity from the certificate, the
//! versioned [`Hello`] handshake with its role checks, then the worker control session or the
//! operator request loop.
//!
//! A peer that breaks the protocol (malformed or oversized frame, wrong first message) has its
//! connection closed with [`close_code::PROTOCOL_ERROR`]; nothing else is affected.

use super::core::{software, AttemptReply, CoreHandle, CoreMsg, Durable};
use super::outbound::OutboundRx;
use super::transfer;
use crate::fleet::{ConnId, Registration};
use crate::store::Store;
use crate::wire::{self, FramedRecv, WireError};
use drover_protocol::identity::PeerIdentity;
use drover_protocol::{
    close_code, negotiate, AttemptDown, AttemptEvent, AttemptUp, CoordinatorMessage, ErrorKind,
    Hello, HelloReply, OperatorRequest, OperatorResponse, Refusal, Role, WorkerMessage,
    SUPPORTED_VERSIONS,
};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::timeout;

/// How long a connected peer has to open its stream and say hello, and a worker to register.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings every connection task needs.
#[derive(Debug, Clone)]
pub struct ConnCtx {
    pub core: CoreHandle,
    pub store: Store,
    pub heartbeat_interval_ms: u64,
    pub lease_ms: u64,
    /// Join tokens, certificate signing and revocation.
    pub trust: crate::trust::service::TrustService,
    /// Stored task secrets: operator requests, and masking worker events.
    pub secrets: crate::secrets::Secrets,
}

/// Serve one incoming connection to its end. `handshake_slot` is held until the TLS handshake
/// and the hello are done (see [`super::MAX_HANDSHAKES`]).
///
/// Each phase runs boxed, so the task itself stays a few bytes: the handshake's state is freed
/// when it ends, and a worker's session holds only what its loop needs. With one task per
/// worker, this is memory per worker.
pub async fn serve(
    incoming: quinn::Incoming,
    id: ConnId,
    ctx: ConnCtx,
    handshake_slot: tokio::sync::OwnedSemaphorePermit,
) {
    let shaken = boxed(handshake(incoming, id, ctx)).await;
    drop(handshake_slot);
    let Some((session, send, recv, role)) = shaken else {
        return;
    };
    match role {
        Role::Worker => boxed(session.worker(send, recv)).await,
        Role::Operator => boxed(session.operator(send, recv)).await,
        Role::Coordinator => unreachable!("check_hello refuses coordinator peers"),
    }
}

/// `fut` on the heap, behind a pointer. A plain function, so the future is built in its frame:
/// one built in an `async fn` (even straight into `Box::pin`) can take room in that
/// function's own future as well.
fn boxed<'a, T>(
    fut: impl Future<Output = T> + Send + 'a,
) -> Pin<Box<dyn Future<Output = T> + Send + 'a>> {
    Box::pin(fut)
}

/// TLS identity and the hello exchange; `None` when the connection ended or was refused.
async fn handshake(
    incoming: quinn::Incoming,
    id: ConnId,
    ctx: ConnCtx,
) -> Option<(Session, quinn::SendStream, FramedRecv, Role)> {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, reason = %e, "refused connection: TLS handshake failed");
            return None;
        }
    };
    if is_enrollment(&conn) {
        boxed(enroll(conn, remote, ctx)).await;
        return None;
    }
    let identity = match peer_identity(&conn) {
        Ok(id) => id,
        Err(reason) => {
            tracing::warn!(%remote, %reason, "refused connection: bad certificate identity");
            conn.close(close_code::REFUSED.into(), reason.as_bytes());
            return None;
        }
    };
    // The TLS verifier checks revocation already; this covers a revocation that landed
    // during the handshake.
    if let Some(reason) = wire::peer_certs(&conn)
        .first()
        .and_then(|c| ctx.trust.refused(c))
    {
        tracing::warn!(%remote, peer = %identity.name, %reason, "refused a revoked certificate");
        conn.close(close_code::REVOKED.into(), b"certificate revoked");
        return None;
    }
    let (mut send, recv) = match timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%remote, peer = %identity.name, error = %e, "connection closed before its first stream");
            return None;
        }
        Err(_) => {
            tracing::warn!(%remote, peer = %identity.name, "closing connection: no stream opened within 10s");
            conn.close(close_code::PROTOCOL_ERROR.into(), b"handshake timeout");
            return None;
        }
    };
    let mut recv = FramedRecv::new(recv);
    let hello = match timeout(HANDSHAKE_TIMEOUT, recv.next::<Hello>()).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            protocol_error(&conn, remote, &identity.name, &e);
            return None;
        }
        Err(_) => {
            tracing::warn!(%remote, peer = %identity.name, "closing connection: no hello within 10s");
            conn.close(close_code::PROTOCOL_ERROR.into(), b"handshake timeout");
            return None;
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
            return None;
        }
    };
    let accepted = HelloReply::Accepted {
        version,
        software: software(),
        peer_name: identity.name.clone(),
    };
    if let Err(e) = wire::send(&mut send, &accepted).await {
        tracing::debug!(%remote, peer = %identity.name, error = %e, "peer left during handshake");
        return None;
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
    Some((session, send, recv, identity.role))
}

/// Whether the peer negotiated the enrollment ALPN: then the connection may only enroll,
/// whatever certificate it presented.
fn is_enrollment(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == crate::pki::ENROLL_ALPN)
}

/// An enrollment connection: one stream, one [`drover_protocol::EnrollRequest`], one reply.
async fn enroll(conn: quinn::Connection, remote: SocketAddr, ctx: ConnCtx) {
    let stream = timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await;
    let Ok(Ok((mut send, recv))) = stream else {
        conn.close(close_code::PROTOCOL_ERROR.into(), b"enrollment timeout");
        return;
    };
    let mut recv = FramedRecv::new(recv);
    let req = match timeout(
        HANDSHAKE_TIMEOUT,
        recv.next::<drover_protocol::EnrollRequest>(),
    )
    .await
    {
        Ok(Ok(Some(req))) => req,
        Ok(Err(e)) => return protocol_error(&conn, remote, "(enrolling)", &e),
        _ => {
            conn.close(close_code::PROTOCOL_ERROR.into(), b"enrollment timeout");
            return;
        }
    };
    let reply = ctx.trust.enroll(&ctx.store, &ctx.core, remote, req).await;
    if wire::send(&mut send, &reply).await.is_ok() {
        let _ = send.finish();
        // The worker closes once it has the reply.
        let _ = timeout(Duration::from_secs(2), conn.closed()).await;
    }
    conn.close(close_code::GOODBYE.into(), b"enrollment done");
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

/// How [`Session::register`] ended.
enum Registered {
    /// In the registry, on disk; messages for the worker arrive here.
    Yes(OutboundRx),
    /// Entered but not stored: the connection is closed and the core must hear it ended.
    NotStored,
    /// Never entered (refused, timed out, or the core is gone).
    No,
}

/// How many heartbeats one `HeartbeatAck` answers: enough that a worker hears at least three
/// acks per lease, so its self-check (it drops a connection with no ack for a whole lease)
/// keeps two intervals of slack, and never fewer than one. 3 with the defaults (1 s, 10 s), 2
/// with the LAN ones (500 ms, 3 s).
///
/// Every ack is a datagram out and, for the worker's QUIC ACK of it, one more in; a heartbeat
/// that is not acknowledged costs the heartbeat and the coordinator's delayed QUIC ACK. At one
/// ack in three the coordinator handles 2.3 datagrams per heartbeat instead of 3. The lease
/// itself is renewed by every heartbeat, acknowledged or not.
fn heartbeats_per_ack(heartbeat_ms: u64, lease_ms: u64) -> u64 {
    (lease_ms / heartbeat_ms.max(1).saturating_mul(3)).max(1)
}

/// Outbound messages a worker connection may have queued before it lags too far behind.
const OUTBOUND_QUEUE: usize = 1024;

/// Send `msg` to the core from a long-lived loop. The send is boxed (a heap allocation per
/// message) so that the loop's own state does not reserve room for a core message, which is
/// sized for the largest (a registration with its resource report).
fn to_core(core: &CoreHandle, msg: CoreMsg) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
    boxed(core.send(msg))
}

/// Wait for a write to be durable; `Err` names why it is not.
async fn durable(after: Option<Durable>) -> Result<(), String> {
    match after {
        None => Ok(()),
        Some(rx) => rx
            .await
            .unwrap_or_else(|_| Err("database writer stopped".into())),
    }
}

impl Session {
    async fn worker(self, mut send: quinn::SendStream, mut recv: FramedRecv) {
        // Two boxed phases: the registration's state (the resource report, the core message)
        // is freed before the long-lived loop starts.
        let clean = match boxed(self.register(&mut recv)).await {
            Registered::No => return,
            Registered::NotStored => false,
            Registered::Yes(outbound_rx) => {
                boxed(self.worker_loop(&mut send, &mut recv, outbound_rx)).await
            }
        };
        let disconnect = CoreMsg::Disconnect {
            conn: self.id,
            name: self.name.clone(),
            clean,
        };
        to_core(&self.ctx.core, disconnect).await;
    }

    /// Read `Register`, enter the worker in the registry and wait until that is on disk.
    async fn register(&self, recv: &mut FramedRecv) -> Registered {
        let resources = match timeout(HANDSHAKE_TIMEOUT, recv.next::<WorkerMessage>()).await {
            Ok(Ok(Some(WorkerMessage::Register { resources }))) => resources,
            Ok(Ok(Some(other))) => {
                tracing::warn!(remote = %self.remote, peer = %self.name, message = ?other, "closing connection: expected Register first");
                self.conn
                    .close(close_code::PROTOCOL_ERROR.into(), b"expected register");
                return Registered::No;
            }
            Ok(Ok(None)) => return Registered::No,
            Ok(Err(e)) => {
                protocol_error(&self.conn, self.remote, &self.name, &e);
                return Registered::No;
            }
            Err(_) => {
                self.conn
                    .close(close_code::PROTOCOL_ERROR.into(), b"register timeout");
                return Registered::No;
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
        let (outbound, outbound_rx) = super::outbound::queue(OUTBOUND_QUEUE);
        let (reply, stored) = oneshot::channel();
        let register = CoreMsg::Register {
            reg,
            conn: self.conn.clone(),
            outbound,
            reply,
        };
        if !self.ctx.core.send(register).await {
            return Registered::No;
        }
        // Acknowledge only once the registry change is on disk.
        let stored = match stored.await {
            Ok(rx) => durable(Some(rx)).await,
            Err(_) => Err("coordinator shutting down".into()),
        };
        match stored {
            Err(e) => {
                tracing::error!(peer = %self.name, error = %e, "could not store registration; closing connection");
                self.conn
                    .close(close_code::SHUTDOWN.into(), b"registry unavailable");
                Registered::NotStored
            }
            Ok(()) => Registered::Yes(outbound_rx),
        }
    }

    /// Heartbeats, outbound messages and attempt streams until the connection ends; returns
    /// whether it ended cleanly.
    async fn worker_loop(
        &self,
        send: &mut quinn::SendStream,
        recv: &mut FramedRecv,
        mut outbound: OutboundRx,
    ) -> bool {
        let registered = CoordinatorMessage::Registered {
            name: self.name.clone(),
            heartbeat_interval_ms: self.ctx.heartbeat_interval_ms,
            lease_ms: self.ctx.lease_ms,
        };
        if wire::send(send, &registered).await.is_err() {
            return false;
        }
        tracing::info!(remote = %self.remote, worker = %self.name, software = %self.software, "worker registered");
        // Attempt streams are owned here: they end with the connection.
        let mut streams = JoinSet::new();
        let per_ack = heartbeats_per_ack(self.ctx.heartbeat_interval_ms, self.ctx.lease_ms);
        // Heartbeats since the last one acknowledged (the first is acknowledged at once).
        let mut unacked = 0u64;
        let mut budget = super::StreamBudget::registered(&self.conn);
        loop {
            tokio::select! {
                msg = recv.next::<WorkerMessage>() => match msg {
                    Ok(Some(WorkerMessage::Heartbeat { seq, usage })) => {
                        let hb = CoreMsg::Heartbeat { conn: self.id, usage };
                        if !to_core(&self.ctx.core, hb).await {
                            return false;
                        }
                        let ack = unacked == 0;
                        unacked = (unacked + 1) % per_ack;
                        if ack && wire::send(send, &CoordinatorMessage::HeartbeatAck { seq }).await.is_err() {
                            return self.closed_cleanly();
                        }
                    }
                    Ok(Some(WorkerMessage::Attempts { running })) => {
                        // Attempts it kept across a reconnect reopen their streams now.
                        budget.reattaching(&self.conn, running.len(), streams.len());
                        let msg = CoreMsg::Attempts { conn: self.id, name: self.name.clone(), running };
                        if !to_core(&self.ctx.core, msg).await {
                            return false;
                        }
                    }
                    Ok(Some(WorkerMessage::Goodbye { reason })) => {
                        tracing::info!(worker = %self.name, %reason, "worker said goodbye");
                        self.conn.close(close_code::GOODBYE.into(), b"goodbye");
                        return true;
                    }
                    Ok(Some(WorkerMessage::Renew { csr_pem })) => {
                        let answer = self.ctx.trust.renew(&self.ctx.store, &self.name, &csr_pem).await;
                        if wire::send(send, &answer).await.is_err() {
                            return self.closed_cleanly();
                        }
                    }
                    Ok(Some(WorkerMessage::Register { .. })) => {
                        tracing::warn!(worker = %self.name, "closing connection: second Register on one connection");
                        self.conn.close(close_code::PROTOCOL_ERROR.into(), b"duplicate register");
                        return false;
                    }
                    Ok(None) => return self.closed_cleanly(),
                    Err(e) => {
                        protocol_error(&self.conn, self.remote, &self.name, &e);
                        return !e.is_protocol_violation() && self.closed_cleanly();
                    }
                },
                out = outbound.recv() => {
                    if let Err(e) = durable(out.after).await {
                        tracing::error!(worker = %self.name, error = %e, "not sending a message whose write failed");
                        continue;
                    }
                    if matches!(*out.msg, CoordinatorMessage::Assign(_) | CoordinatorMessage::Prepare(_)) {
                        budget.assigning(&self.conn, streams.len());
                    }
                    if wire::send(send, &*out.msg).await.is_err() {
                        return self.closed_cleanly();
                    }
                }
                stream = self.conn.accept_bi() => match stream {
                    Ok((s, r)) => {
                        budget.opened();
                        streams.spawn(attempt_stream(self.conn.clone(), self.name.clone(), self.ctx.clone(), s, FramedRecv::new(r)));
                    }
                    Err(_) => return self.closed_cleanly(),
                },
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
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
            let answer = match req {
                OperatorRequest::Events {
                    id,
                    from,
                    to,
                    limit,
                } => read_events(&self.ctx.store, id, from, to, limit).await,
                OperatorRequest::SubmitWithInputs {
                    spec,
                    archive_bytes,
                } => {
                    let (answer, in_step) =
                        transfer::submit_with_inputs(&self.ctx, &mut recv, spec, archive_bytes)
                            .await;
                    if wire::send(&mut send, &answer).await.is_err() || !in_step {
                        let _ = send.finish();
                        return;
                    }
                    continue;
                }
                OperatorRequest::ListOutputs { id } => transfer::list_outputs(&self.ctx, id).await,
                OperatorRequest::FetchOutputs { id, attempt } => {
                    if transfer::send_outputs(&self.ctx, &mut send, id, attempt)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                OperatorRequest::Chunk { .. } => {
                    tracing::warn!(operator = %self.name, "closing connection: archive chunk outside a transfer");
                    self.conn.close(
                        close_code::PROTOCOL_ERROR.into(),
                        b"chunk outside a transfer",
                    );
                    return;
                }
                req @ (OperatorRequest::SetSecret { .. }
                | OperatorRequest::ListSecrets
                | OperatorRequest::RemoveSecret { .. }) => self
                    .ctx
                    .secrets
                    .operator(&self.ctx.store, &self.name, &req)
                    .await
                    .unwrap_or_else(|| OperatorResponse::Error {
                        kind: ErrorKind::Internal,
                        message: "not a secrets request".into(),
                    }),
                req => match self
                    .ctx
                    .trust
                    .operator(&self.ctx.store, &self.ctx.core, &self.name, &req)
                    .await
                {
                    Some(answer) => answer,
                    None => {
                        let (reply, answer) = oneshot::channel();
                        if !self.ctx.core.send(CoreMsg::Operator { req, reply }).await {
                            return;
                        }
                        let Ok((answer, after)) = answer.await else {
                            return;
                        };
                        match durable(after).await {
                            Ok(()) => answer,
                            Err(e) => OperatorResponse::Error {
                                kind: ErrorKind::Internal,
                                message: e,
                            },
                        }
                    }
                },
            };
            if wire::send(&mut send, &answer).await.is_err() {
                return;
            }
        }
    }
}

/// Mask stored secret values in a worker's event (a no-op while none is stored).
fn mask(redactor: &drover_worker::redact::Redactor, event: &mut drover_protocol::AttemptEvent) {
    if redactor.is_empty() {
        return;
    }
    if let std::borrow::Cow::Owned(masked) = redactor.redact_str(&event.payload) {
        event.payload = masked;
    }
}

/// Most events one `Events` request returns.
pub const MAX_EVENTS_PER_READ: u32 = 1000;
/// Most payload bytes one `Events` answer carries (always at least one event): a thousand
/// 16 KiB output chunks would not fit in one frame (`MAX_FRAME_LEN`, 1 MiB).
pub const MAX_EVENT_BYTES_PER_READ: usize = 512 * 1024;

/// A session slice, read beside the writer on a blocking thread.
async fn read_events(
    store: &Store,
    id: String,
    from: u64,
    to: Option<u64>,
    limit: u32,
) -> OperatorResponse {
    let store = store.clone();
    let limit = limit.clamp(1, MAX_EVENTS_PER_READ);
    let read = tokio::task::spawn_blocking(move || -> Result<OperatorResponse, String> {
        let reader = store.reader().map_err(|e| e.to_string())?;
        let len = reader.len(&id).map_err(|e| e.to_string())?;
        if len == 0 {
            return Ok(OperatorResponse::Error {
                kind: ErrorKind::NotFound,
                message: format!("no task {id:?}; `drover tasks` lists them"),
            });
        }
        let mut events = reader
            .slice(&id, from, to, limit)
            .map_err(|e| e.to_string())?;
        let mut bytes = 0;
        let fits = events
            .iter()
            .take_while(|e| {
                bytes += e.payload.len() + e.kind.len() + e.task_id.len() + 64;
                bytes <= MAX_EVENT_BYTES_PER_READ
            })
            .count();
        events.truncate(fits.max(1));
        Ok(OperatorResponse::Events { events, len })
    })
    .await;
    match read {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => OperatorResponse::Error {
            kind: ErrorKind::Internal,
            message: e,
        },
        Err(e) => OperatorResponse::Error {
            kind: ErrorKind::Internal,
            message: e.to_string(),
        },
    }
}

/// One attempt stream: `Open`, then events, each acknowledged once durable (duplicates at
/// once); a stale attempt is told it is fenced and the stream ends. A stream whose first frame
/// asks for inputs or carries outputs is an archive transfer instead (see [`transfer`]).
async fn attempt_stream(
    conn: quinn::Connection,
    worker: String,
    ctx: ConnCtx,
    mut send: quinn::SendStream,
    mut recv: FramedRecv,
) {
    let core = ctx.core.clone();
    let (task_id, epoch) = match timeout(HANDSHAKE_TIMEOUT, recv.next::<AttemptUp>()).await {
        Ok(Ok(Some(AttemptUp::Open { task_id, epoch }))) => (task_id, epoch),
        // Archive transfers have streams of their own.
        Ok(Ok(Some(AttemptUp::FetchInputs { task_id, epoch }))) => {
            return transfer::serve_inputs(&ctx, &worker, task_id, epoch, send).await
        }
        Ok(Ok(Some(AttemptUp::PutOutputs {
            task_id,
            epoch,
            archive_bytes,
        }))) => {
            return transfer::receive_outputs(
                &ctx,
                &worker,
                task_id,
                epoch,
                archive_bytes,
                send,
                recv,
            )
            .await
        }
        Ok(Ok(None)) => return,
        _ => {
            tracing::warn!(%worker, "closing connection: attempt stream did not start with Open");
            conn.close(
                close_code::PROTOCOL_ERROR.into(),
                b"attempt stream without open",
            );
            return;
        }
    };
    // Events read but not yet answered, bounded: when full the stream is read no further.
    let room = tokio::sync::Semaphore::new(ATTEMPT_PIPELINE);
    let (pending_tx, mut pending) =
        mpsc::channel::<(usize, oneshot::Receiver<Vec<AttemptReply>>)>(ATTEMPT_PIPELINE);
    // Reads events and hands them to the core — every event already received in one message
    // — and ends (dropping `pending_tx`, which lets the writer drain and stop) when the worker
    // finishes the stream or breaks the rules.
    let reader = {
        let (task_id, worker, room) = (task_id.clone(), worker.clone(), &room);
        let secrets = ctx.secrets.clone();
        async move {
            loop {
                let Ok(first) = room.acquire().await else {
                    return;
                };
                first.forget();
                let (mut events, end) = read_batch(&mut recv, room).await;
                if !events.is_empty() {
                    // The worker masked its attempt's own secrets; this masks every stored
                    // one, whatever the worker did.
                    let redactor = secrets.redactor();
                    for event in &mut events {
                        mask(&redactor, event);
                    }
                    let (reply, answer) = oneshot::channel();
                    let n = events.len();
                    let msg = CoreMsg::AttemptEvents {
                        name: worker.clone(),
                        task_id: task_id.clone(),
                        epoch,
                        events,
                        reply,
                    };
                    if !core.send(msg).await || pending_tx.send((n, answer)).await.is_err() {
                        return;
                    }
                } else {
                    room.add_permits(1);
                }
                match end {
                    None => {}
                    Some(StreamEnd::Closed) => return,
                    Some(StreamEnd::Violation) => {
                        tracing::warn!(%worker, task = %task_id, epoch, "closing connection: bad frame on an attempt stream");
                        conn.close(close_code::PROTOCOL_ERROR.into(), b"bad attempt stream");
                        return;
                    }
                }
            }
        }
    };
    // Sends the answers in order, each once its write is durable: one cumulative ack per batch.
    let writer = async {
        while let Some((n, answer)) = pending.recv().await {
            let Ok(answers) = answer.await else {
                return;
            };
            for answer in answers {
                let down = match answer {
                    AttemptReply::Ack { seq, after } => match durable(after).await {
                        Ok(()) => AttemptDown::Ack { seq },
                        // Not durable: no ack. The worker resends after reconnecting.
                        Err(e) => {
                            return tracing::error!(task = %task_id, error = %e, "event not stored; not acknowledging")
                        }
                    },
                    AttemptReply::Fenced(reason) => AttemptDown::Fenced { reason },
                };
                let fenced = matches!(down, AttemptDown::Fenced { .. });
                if wire::send(&mut send, &down).await.is_err() || fenced {
                    let _ = send.finish();
                    return;
                }
            }
            room.add_permits(n);
        }
    };
    let mut writer = std::pin::pin!(writer);
    tokio::select! {
        // Fenced, failed, or every answer sent after the reader ended: done.
        () = &mut writer => return,
        () = reader => {}
    }
    writer.await;
}

/// Events one attempt stream may have read but not yet acknowledged. The real worker keeps at
/// most 256 unacknowledged; past this bound the stream stops being read and QUIC flow control
/// holds the peer back.
const ATTEMPT_PIPELINE: usize = 1024;

/// How an attempt stream ended while a batch was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    /// The worker finished the stream, or the connection went away (a worker reconnecting
    /// resends on a new stream).
    Closed,
    /// A frame that is not an event, or a malformed one: the connection is closed.
    Violation,
}

impl StreamEnd {
    fn of(e: &WireError) -> StreamEnd {
        if e.is_protocol_violation() {
            StreamEnd::Violation
        } else {
            StreamEnd::Closed
        }
    }
}

/// The first event of an attempt stream (the caller holds a `room` permit for it), then every
/// further one already received, each taking a permit, without waiting; and how the stream
/// ended, if it did.
async fn read_batch(
    recv: &mut FramedRecv,
    room: &tokio::sync::Semaphore,
) -> (Vec<AttemptEvent>, Option<StreamEnd>) {
    let mut events = Vec::new();
    let mut frame = match recv.next::<AttemptUp>().await {
        Ok(Some(frame)) => frame,
        Ok(None) => return (events, Some(StreamEnd::Closed)),
        Err(e) => return (events, Some(StreamEnd::of(&e))),
    };
    loop {
        let AttemptUp::Event(e) = frame else {
            return (events, Some(StreamEnd::Violation));
        };
        events.push(e);
        let Ok(permit) = room.try_acquire() else {
            return (events, None);
        };
        // `next` is cancel-safe: polled once and dropped, it loses nothing.
        match poll_once(recv.next::<AttemptUp>()) {
            Some(Ok(Some(next))) => {
                permit.forget();
                frame = next;
            }
            None => return (events, None),
            Some(Ok(None)) => return (events, Some(StreamEnd::Closed)),
            Some(Err(e)) => return (events, Some(StreamEnd::of(&e))),
        }
    }
}

/// `fut`'s output if it is ready on the first poll.
fn poll_once<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
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
    fn at_least_three_heartbeat_acks_per_lease() {
        assert_eq!(heartbeats_per_ack(1000, 10_000), 3);
        assert_eq!(heartbeats_per_ack(500, 3000), 2);
        assert_eq!(heartbeats_per_ack(1000, 2000), 1);
        for (hb, lease) in [(1000, 10_000), (500, 3000), (250, 1000), (1000, 30_000)] {
            let gap = heartbeats_per_ack(hb, lease) * hb;
            assert!(
                3 * gap <= lease,
                "{hb} ms / {lease} ms: an ack every {gap} ms"
            );
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
            Ok(drover_protocol::PROTOCOL_VERSION)
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
