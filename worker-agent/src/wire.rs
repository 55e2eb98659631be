//! Framed messages over QUIC streams: the thin async shell around `drover_protocol`'s
//! sans-IO frame codec, used by the server and the operator client.

use drover_protocol::{encode_frame, DecodeError, EncodeError, FrameDecoder, MAX_FRAME_LEN};
use serde::{de::DeserializeOwned, Serialize};

/// Why a framed read or write failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("peer closed the stream in the middle of a frame ({0} bytes buffered)")]
    Truncated(usize),
}

impl WireError {
    /// Whether the peer broke the framing or message rules (as opposed to the transport failing).
    pub fn is_protocol_violation(&self) -> bool {
        matches!(self, WireError::Decode(_) | WireError::Truncated(_))
    }

    /// The connection error under a transport failure, if any.
    pub fn connection_error(&self) -> Option<&quinn::ConnectionError> {
        match self {
            WireError::Read(quinn::ReadError::ConnectionLost(e)) => Some(e),
            WireError::Write(quinn::WriteError::ConnectionLost(e)) => Some(e),
            _ => None,
        }
    }
}

/// Reads whole messages from a receive stream, never buffering past the frame limit.
///
/// Reads take quinn's own received segments (`read_chunk`), at most what the decoder wants
/// next, so there is no per-stream scratch buffer: an idle stream holds only the decoder. A
/// length prefix over the limit fails in the decoder before a byte of its payload is buffered.
#[derive(Debug)]
pub struct FramedRecv {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    /// Bytes pushed into the decoder since it last yielded a message and was empty.
    since_empty: usize,
}

/// A decoder that has held a frame larger than this is replaced by a fresh one once it is
/// empty, so a stream that once carried a large message (a registration, an event chunk) does
/// not keep the capacity for as long as it lives.
const KEEP_DECODER_CAPACITY: usize = 1024;

impl FramedRecv {
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(MAX_FRAME_LEN),
            since_empty: 0,
        }
    }

    /// The next message, or `None` when the peer finished the stream between frames.
    ///
    /// Cancel-safe: dropped between polls, no byte read from the stream is lost (each chunk
    /// is pushed into the decoder in the same poll that reads it).
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, WireError> {
        loop {
            if let Some(msg) = self.decoder.next::<T>()? {
                if self.decoder.buffered() == 0 {
                    if self.since_empty > KEEP_DECODER_CAPACITY {
                        self.decoder = FrameDecoder::new(MAX_FRAME_LEN);
                    }
                    self.since_empty = 0;
                }
                return Ok(Some(msg));
            }
            let want = self.decoder.wanted();
            match self.recv.read_chunk(want, true).await? {
                Some(chunk) => {
                    self.since_empty += chunk.bytes.len();
                    self.decoder.push(&chunk.bytes)?;
                }
                None if self.decoder.buffered() == 0 => return Ok(None),
                None => return Err(WireError::Truncated(self.decoder.buffered())),
            }
        }
    }
}

/// Write one message as a frame.
pub async fn send<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), WireError> {
    let frame = encode_frame(msg, MAX_FRAME_LEN)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// The certificate chain the peer presented on `conn` (leaf first; empty if none). The TLS
/// layer has already verified it against the fleet CA.
pub fn peer_certs(conn: &quinn::Connection) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .map(|b| *b)
        .unwrap_or_default()
}
