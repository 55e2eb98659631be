//! The operator's connection to the coordinator: QUIC + mutual TLS with an operator
//! certificate, the hello handshake, then request/response on one stream. This is the Rust
//! API the CLI sits on (and a harness can embed): [`OperatorClient::request`] for any
//! request, and typed calls for the ones that move archives — [`OperatorClient::submit`]
//! (with an inputs archive), [`OperatorClient::list_outputs`], [`OperatorClient::fetch_outputs`].
//! Archives travel in chunks of at most 256 KiB, never in one frame.

use super::settings::Resolved;
use super::{exit, CliError};
use crate::pki::{self, TlsFiles};
use crate::wire::{self, FramedRecv};
use drover_protocol::task::{OutputsInfo, TaskSpec};
use drover_protocol::{
    close_code, Hello, HelloReply, OperatorRequest, OperatorResponse, Role, SUPPORTED_VERSIONS,
};
use drover_worker::transfer::{recv_chunks, send_chunks};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// How long to wait for the coordinator to answer before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An authenticated operator session.
#[derive(Debug)]
pub struct OperatorClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: FramedRecv,
}

fn resolve_addr(addr: &str) -> Result<SocketAddr, CliError> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            CliError::new(
                exit::CONFIG,
                format!("cannot resolve coordinator address {addr:?}: expected host:port"),
            )
        })
}

impl OperatorClient {
    pub async fn connect(s: &Resolved) -> Result<Self, CliError> {
        let files = TlsFiles {
            ca: s.ca.clone(),
            cert: s.cert.clone(),
            key: s.key.clone(),
        };
        let tls = pki::client_config(&files, Role::Operator)
            .map_err(|e| CliError::new(exit::CONFIG, e.to_string()))?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| CliError::new(exit::CONFIG, e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(Arc::new(crate::server::transport_config(
            Duration::from_secs(30),
        )));
        let addr = resolve_addr(&s.coordinator)?;
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse()
        } else {
            "0.0.0.0:0".parse()
        }
        .map_err(|_| CliError::new(exit::FAILURE, "bad bind address"))?;
        let endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
        let unreachable = |why: String| {
            CliError::new(
                exit::UNAVAILABLE,
                format!("cannot reach the coordinator at {}: {why}", s.coordinator),
            )
        };
        let connecting = endpoint
            .connect_with(cfg, addr, &s.server_name)
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => {
                return Err(unreachable(
                    "no answer within 5s; is `drover serve` running there?".into(),
                ))
            }
            Ok(Err(e)) => return Err(connect_error(&s.coordinator, e)),
            Ok(Ok(c)) => c,
        };
        check_coordinator_role(&conn)?;
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut recv = FramedRecv::new(recv);
        let hello = Hello {
            versions: SUPPORTED_VERSIONS,
            role: Role::Operator,
            software: crate::server::core::software(),
        };
        wire::send(&mut send, &hello)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        match tokio::time::timeout(CONNECT_TIMEOUT, recv.next::<HelloReply>()).await {
            Err(_) => Err(unreachable("no handshake reply within 5s".into())),
            Ok(Err(e)) => Err(unreachable(format!("handshake failed: {e}"))),
            Ok(Ok(None)) => Err(unreachable(
                "the coordinator closed the handshake stream".into(),
            )),
            Ok(Ok(Some(HelloReply::Refused(r)))) => {
                conn.close(close_code::GOODBYE.into(), b"refused");
                Err(CliError::new(
                    exit::REFUSED,
                    format!("the coordinator refused this connection: {r}"),
                ))
            }
            Ok(Ok(Some(HelloReply::Accepted { .. }))) => Ok(Self {
                endpoint,
                conn,
                send,
                recv,
            }),
        }
    }

    /// Send one request and wait for its answer.
    pub async fn request(&mut self, req: &OperatorRequest) -> Result<OperatorResponse, CliError> {
        let lost =
            |e: String| CliError::new(exit::UNAVAILABLE, format!("lost the coordinator: {e}"));
        wire::send(&mut self.send, req)
            .await
            .map_err(|e| lost(e.to_string()))?;
        match self.recv.next::<OperatorResponse>().await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(lost("it closed the stream".into())),
            Err(e) => Err(lost(e.to_string())),
        }
    }

    /// Like [`OperatorClient::request`], with an error answer turned into the [`CliError`]
    /// (and exit code) it stands for.
    pub async fn ask(&mut self, req: &OperatorRequest) -> Result<OperatorResponse, CliError> {
        match self.request(req).await? {
            OperatorResponse::Error { kind, message } => {
                Err(super::run::error_response(kind, message))
            }
            other => Ok(other),
        }
    }

    /// Submit a spec and return the new task's id. `inputs` is the packed inputs archive and
    /// its length, required when the spec lists inputs: the coordinator stores it durably
    /// before it answers.
    pub async fn submit(
        &mut self,
        spec: TaskSpec,
        inputs: Option<(&mut tokio::fs::File, u64)>,
    ) -> Result<String, CliError> {
        let answer = match inputs {
            None => self.ask(&OperatorRequest::Submit { spec }).await?,
            Some((file, archive_bytes)) => {
                let lost = |e: String| {
                    CliError::new(exit::UNAVAILABLE, format!("lost the coordinator: {e}"))
                };
                let header = OperatorRequest::SubmitWithInputs {
                    spec,
                    archive_bytes,
                };
                wire::send(&mut self.send, &header)
                    .await
                    .map_err(|e| lost(e.to_string()))?;
                send_chunks(&mut self.send, file, archive_bytes, |data| {
                    OperatorRequest::Chunk { data }
                })
                .await
                .map_err(|e| lost(e.to_string()))?;
                match self.recv.next::<OperatorResponse>().await {
                    Ok(Some(OperatorResponse::Error { kind, message })) => {
                        return Err(super::run::error_response(kind, message))
                    }
                    Ok(Some(r)) => r,
                    Ok(None) => return Err(lost("it closed the stream".into())),
                    Err(e) => return Err(lost(e.to_string())),
                }
            }
        };
        match answer {
            OperatorResponse::Submitted { id } => Ok(id),
            other => Err(super::run::unexpected(other)),
        }
    }

    /// The outputs each attempt of task `id` stored, oldest first.
    pub async fn list_outputs(&mut self, id: &str) -> Result<Vec<OutputsInfo>, CliError> {
        let req = OperatorRequest::ListOutputs { id: id.to_owned() };
        match self.ask(&req).await? {
            OperatorResponse::Outputs(list) => Ok(list),
            other => Err(super::run::unexpected(other)),
        }
    }

    /// Write the outputs archive of attempt `attempt` of task `id` (`None`: the last attempt
    /// that stored any) into `out`; checks its SHA-256 and returns its record.
    pub async fn fetch_outputs<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        id: &str,
        attempt: Option<u32>,
        out: &mut W,
    ) -> Result<OutputsInfo, CliError> {
        let req = OperatorRequest::FetchOutputs {
            id: id.to_owned(),
            attempt,
        };
        let info = match self.ask(&req).await? {
            OperatorResponse::OutputsArchive(info) => info,
            other => return Err(super::run::unexpected(other)),
        };
        let sha = recv_chunks(&mut self.recv, out, info.archive_bytes, |m| match m {
            OperatorResponse::Chunk { data } => Ok(data),
            other => Err(other),
        })
        .await
        .map_err(|e| {
            CliError::new(
                exit::UNAVAILABLE,
                format!("lost the coordinator while fetching outputs: {e}"),
            )
        })?;
        if sha != info.sha256 {
            return Err(CliError::new(
                exit::FAILURE,
                format!(
                    "the outputs archive of {id} arrived damaged (SHA-256 {sha}, expected {})",
                    info.sha256
                ),
            ));
        }
        Ok(info)
    }

    /// Close politely and wait for the close to be sent.
    pub async fn close(mut self) {
        let _ = self.send.finish();
        self.conn.close(close_code::GOODBYE.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
    }
}

fn connect_error(addr: &str, e: quinn::ConnectionError) -> CliError {
    match &e {
        quinn::ConnectionError::TransportError(t) if t.to_string().contains("certificate") => CliError::new(
            exit::REFUSED,
            format!("TLS with the coordinator at {addr} failed: {e}; check that --ca is the fleet CA and the certificate is valid"),
        ),
        quinn::ConnectionError::ConnectionClosed(_) | quinn::ConnectionError::ApplicationClosed(_) => {
            CliError::new(exit::REFUSED, format!("the coordinator at {addr} closed the connection: {e}"))
        }
        _ => CliError::new(exit::UNAVAILABLE, format!("cannot reach the coordinator at {addr}: {e}")),
    }
}

/// The server's certificate must carry the coordinator role, not just chain to the CA.
fn check_coordinator_role(conn: &quinn::Connection) -> Result<(), CliError> {
    crate::pki::peer_role_is_coordinator(&wire::peer_certs(conn))
        .map(drop)
        .map_err(|e| {
            conn.close(close_code::REFUSED.into(), b"not a coordinator");
            CliError::new(
                exit::REFUSED,
                format!("the server is not a drover coordinator: {e}"),
            )
        })
}
