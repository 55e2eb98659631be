//! Files over framed QUIC streams: an archive of known length sent as a run of chunk
//! messages, each at most [`ARCHIVE_CHUNK_BYTES`], so no frame comes near the 1 MiB limit and
//! neither side holds more than one chunk in memory. The receiver writes to a file, hashes
//! as it goes (SHA-256) and refuses a stream longer than announced.
//!
//! Used by both daemons and the CLI: inputs coordinator → worker, outputs worker →
//! coordinator, inputs CLI → coordinator and outputs coordinator → CLI. The message that
//! wraps each chunk differs per direction, so callers pass how to wrap and unwrap one.

use crate::wire::{self, FramedRecv, WireError};
use drover_protocol::task::ARCHIVE_CHUNK_BYTES;
use serde::{de::DeserializeOwned, Serialize};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("file I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("the peer finished the stream after {got} of {want} bytes")]
    Short { got: u64, want: u64 },
    #[error("the peer sent more than the {want} bytes it announced")]
    Long { want: u64 },
    #[error("unexpected message in the middle of a transfer: {0}")]
    Unexpected(String),
}

/// SHA-256 as lowercase hex.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Send `len` bytes from `file` as chunk messages made by `wrap`.
pub async fn send_chunks<M: Serialize, R: AsyncRead + Unpin>(
    send: &mut quinn::SendStream,
    file: &mut R,
    len: u64,
    wrap: impl Fn(Vec<u8>) -> M,
) -> Result<(), TransferError> {
    let mut left = len;
    while left > 0 {
        let want = (left.min(ARCHIVE_CHUNK_BYTES as u64)) as usize;
        let mut data = vec![0u8; want];
        file.read_exact(&mut data).await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                TransferError::Short {
                    got: len - left,
                    want: len,
                }
            } else {
                TransferError::Io(e)
            }
        })?;
        wire::send(send, &wrap(data)).await?;
        left -= want as u64;
    }
    Ok(())
}

/// Receive exactly `len` bytes of chunk messages (`unwrap` returns the bytes of a chunk, or
/// the message back when it is something else) into `out`; returns the SHA-256 of the bytes.
pub async fn recv_chunks<M: DeserializeOwned + std::fmt::Debug, W: AsyncWrite + Unpin>(
    recv: &mut FramedRecv,
    out: &mut W,
    len: u64,
    unwrap: impl Fn(M) -> Result<Vec<u8>, M>,
) -> Result<String, TransferError> {
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0u64;
    while got < len {
        let msg = match recv.next::<M>().await? {
            Some(m) => m,
            None => return Err(TransferError::Short { got, want: len }),
        };
        let data = unwrap(msg).map_err(|m| TransferError::Unexpected(format!("{m:?}")))?;
        got += data.len() as u64;
        if got > len {
            return Err(TransferError::Long { want: len });
        }
        hash.update(&data);
        out.write_all(&data).await?;
    }
    out.flush().await?;
    Ok(hex(hash.finish().as_ref()))
}
