//! Length-prefixed postcard frames.
//!
//! A frame is a 4-byte big-endian payload length followed by that many bytes of postcard.
//! The length is checked against the decoder's limit *before* any buffer grows for it, so a
//! peer can never make us allocate more than `limit + FRAME_HEADER_LEN` bytes per stream.

use serde::{de::DeserializeOwned, Serialize};

/// Bytes of the length prefix that starts every frame.
pub const FRAME_HEADER_LEN: usize = 4;

/// Largest payload a frame may carry by default: 1 MiB. Event chunks and resource reports are
/// far smaller; anything larger is a bug or an attack and closes the stream.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Why bytes from a peer could not be turned into a message.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The length prefix announces more than the limit; the stream must be closed.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { len: usize, limit: usize },
    /// A zero-length frame: no message encodes to zero bytes.
    #[error("empty frame")]
    EmptyFrame,
    /// The payload is not a valid postcard encoding of the expected type.
    #[error("malformed {what} frame ({len} bytes): {reason}")]
    Malformed {
        what: &'static str,
        len: usize,
        reason: String,
    },
    /// The payload decoded but left bytes over.
    #[error("{what} frame has {extra} trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
}

/// Why a message could not be framed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("message encodes to {len} bytes, over the frame limit of {limit} bytes")]
    FrameTooLarge { len: usize, limit: usize },
    #[error("message cannot be encoded: {0}")]
    Serialize(String),
}

/// Encode `msg` as one frame (length prefix + postcard payload), refusing payloads over `limit`.
pub fn encode_frame<T: Serialize>(msg: &T, limit: usize) -> Result<Vec<u8>, EncodeError> {
    // `to_allocvec` copies byte strings with one `extend_from_slice`; `to_extend` goes byte by
    // byte, which made a 256 KiB archive chunk cost ~10 ms to encode in a debug build.
    let body = postcard::to_allocvec(msg).map_err(|e| EncodeError::Serialize(e.to_string()))?;
    let len = body.len();
    if len > limit {
        return Err(EncodeError::FrameTooLarge { len, limit });
    }
    let prefix = u32::try_from(len).map_err(|_| EncodeError::FrameTooLarge { len, limit })?;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + len);
    out.extend_from_slice(&prefix.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decode one complete payload (without its length prefix) as `T`.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    let what = short_type_name::<T>();
    if payload.is_empty() {
        return Err(DecodeError::EmptyFrame);
    }
    let (msg, rest) =
        postcard::take_from_bytes::<T>(payload).map_err(|e| DecodeError::Malformed {
            what,
            len: payload.len(),
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            what,
            extra: rest.len(),
        });
    }
    Ok(msg)
}

fn short_type_name<T>() -> &'static str {
    let full = core::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Incremental frame decoder for a byte stream: push what the transport delivers, pull
/// complete messages out.
///
/// After an error the decoder is poisoned (every later call returns the same error): the
/// stream has lost its framing and must be closed.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    limit: usize,
    failed: Option<DecodeError>,
    /// A bad header found behind complete frames: returned by `next` once they are taken.
    /// Nothing from it on is buffered.
    pending: Option<DecodeError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

#[allow(clippy::should_implement_trait)] // `next::<T>()` is generic over the message type.
impl FrameDecoder {
    /// A decoder that refuses payloads over `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
            failed: None,
            pending: None,
        }
    }

    /// How many more bytes the decoder wants before it can yield the next frame (at least 1).
    /// Transports use this to read exactly one frame at a time.
    pub fn wanted(&self) -> usize {
        match self.announced_len() {
            Some(len) => (FRAME_HEADER_LEN + len)
                .saturating_sub(self.buf.len())
                .max(1),
            None => FRAME_HEADER_LEN - self.buf.len(),
        }
    }

    fn announced_len(&self) -> Option<usize> {
        let head: [u8; FRAME_HEADER_LEN] = self.buf.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        Some(u32::from_be_bytes(head) as usize)
    }

    /// Append bytes from the transport. Bytes past the current frame are kept for the next.
    /// Fails, without buffering, as soon as a length prefix over the limit is seen.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.pending.is_some() {
            // The stream is already known to be broken after the queued frames.
            return Ok(());
        }
        let mut rest = bytes;
        while !rest.is_empty() {
            // Never buffer more than one header plus one in-limit payload ahead of the reader.
            let room = match self.announced_len() {
                None => FRAME_HEADER_LEN - self.buf.len(),
                Some(len) => (FRAME_HEADER_LEN + len).saturating_sub(self.buf.len()),
            };
            if room == 0 {
                // A complete frame is waiting; keep the remainder for after it is taken, up to
                // the first bad header in it.
                self.buf.extend_from_slice(rest);
                self.check_queued_headers();
                return Ok(());
            }
            let take = room.min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            self.check_header()?;
        }
        Ok(())
    }

    fn check_header(&mut self) -> Result<(), DecodeError> {
        if let Some(len) = self.announced_len() {
            if len > self.limit {
                return Err(self.fail(DecodeError::FrameTooLarge {
                    len,
                    limit: self.limit,
                }));
            }
            if len == 0 {
                return Err(self.fail(DecodeError::EmptyFrame));
            }
        }
        Ok(())
    }

    /// Check the header of every frame queued behind the first; cut the buffer at the first
    /// bad one and remember its error for when the reader gets there.
    fn check_queued_headers(&mut self) {
        let mut at = 0;
        while let Some(head) = self.buf.get(at..at + FRAME_HEADER_LEN) {
            let mut prefix = [0; FRAME_HEADER_LEN];
            prefix.copy_from_slice(head);
            let len = u32::from_be_bytes(prefix) as usize;
            let bad = if len > self.limit {
                DecodeError::FrameTooLarge {
                    len,
                    limit: self.limit,
                }
            } else if len == 0 {
                DecodeError::EmptyFrame
            } else {
                at += FRAME_HEADER_LEN + len;
                continue;
            };
            self.buf.truncate(at);
            self.pending = Some(bad);
            return;
        }
    }

    fn fail(&mut self, e: DecodeError) -> DecodeError {
        self.buf = Vec::new();
        self.failed = Some(e.clone());
        e
    }

    /// Take the next complete message, if one is buffered.
    pub fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.buf.is_empty() {
            if let Some(e) = self.pending.take() {
                return Err(self.fail(e));
            }
        }
        self.check_header()?;
        let Some(len) = self.announced_len() else {
            return Ok(None);
        };
        if self.buf.len() < FRAME_HEADER_LEN + len {
            return Ok(None);
        }
        let result = decode_payload::<T>(&self.buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len]);
        self.buf.drain(..FRAME_HEADER_LEN + len);
        match result {
            Ok(msg) => Ok(Some(msg)),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Bytes buffered and not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_prefix_fails_before_buffering() {
        let mut d = FrameDecoder::new(16);
        let err = d.push(&[0, 0, 0, 17, 1, 2, 3]).unwrap_err();
        assert_eq!(err, DecodeError::FrameTooLarge { len: 17, limit: 16 });
        assert_eq!(d.buffered(), 0);
        assert!(d.next::<u8>().is_err(), "decoder stays poisoned");
    }

    #[test]
    fn frames_split_anywhere_reassemble() {
        let a = encode_frame(&(7u32, String::from("hello")), MAX_FRAME_LEN).unwrap();
        let b = encode_frame(&(8u32, String::from("world")), MAX_FRAME_LEN).unwrap();
        let all = [a, b].concat();
        for split in 0..all.len() {
            let mut d = FrameDecoder::default();
            d.push(&all[..split]).unwrap();
            d.push(&all[split..]).unwrap();
            assert_eq!(
                d.next::<(u32, String)>().unwrap(),
                Some((7, "hello".into()))
            );
            assert_eq!(
                d.next::<(u32, String)>().unwrap(),
                Some((8, "world".into()))
            );
            assert_eq!(d.next::<(u32, String)>().unwrap(), None);
        }
    }

    #[test]
    fn encode_refuses_over_limit() {
        let big = vec![0u8; 100];
        assert!(matches!(
            encode_frame(&big, 10),
            Err(EncodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn empty_and_trailing_are_errors() {
        let mut d = FrameDecoder::default();
        assert_eq!(d.push(&[0, 0, 0, 0]).unwrap_err(), DecodeError::EmptyFrame);
        let mut d = FrameDecoder::default();
        d.push(&[0, 0, 0, 2, 5, 6]).unwrap();
        assert!(matches!(
            d.next::<u8>(),
            Err(DecodeError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn wanted_reads_one_frame_at_a_time() {
        let f = encode_frame(&42u64, MAX_FRAME_LEN).unwrap();
        let mut d = FrameDecoder::default();
        assert_eq!(d.wanted(), 4);
        d.push(&f[..4]).unwrap();
        assert_eq!(d.wanted(), f.len() - 4);
        d.push(&f[4..]).unwrap();
        assert_eq!(d.next::<u64>().unwrap(), Some(42));
        assert_eq!(d.wanted(), 4);
    }
}
