//! Fuzz the frame decoder with every message type on the wire.
//!
//! Input layout: the first byte picks the chunk size (1..=256) the rest is pushed in; the rest
//! is the byte stream. The stream is decoded once as each message type, draining after every
//! push until `None` or an error, and once more rotating through all ten types frame by frame:
//! the control stream (`WorkerMessage`, `CoordinatorMessage`), attempt streams (`AttemptUp`,
//! `AttemptDown`), operator streams, the handshake and enrollment.
//!
//! Besides "no panic, no runaway allocation" (libFuzzer's `-rss_limit_mb`/`-malloc_limit_mb`),
//! it checks the decoder's contract:
//! - after a push, at most one in-limit frame plus that push is buffered; after draining, less
//!   than one frame; after an error, nothing, and every later call returns the same error;
//! - a decoded message re-encodes to a frame that decodes to the same message.

#![no_main]

use std::fmt::Debug;

use drover_protocol::{
    encode_frame, AttemptDown, AttemptUp, CoordinatorMessage, DecodeError, EnrollReply,
    EnrollRequest, FrameDecoder, Hello, HelloReply, OperatorRequest, OperatorResponse,
    WorkerMessage, FRAME_HEADER_LEN,
};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

/// Small enough that frames at and over the limit fit in a fuzz input.
const LIMIT: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk) + 1;
    drain_all::<WorkerMessage>(stream, chunk);
    drain_all::<CoordinatorMessage>(stream, chunk);
    drain_all::<OperatorRequest>(stream, chunk);
    drain_all::<OperatorResponse>(stream, chunk);
    drain_all::<Hello>(stream, chunk);
    drain_all::<HelloReply>(stream, chunk);
    drain_all::<AttemptUp>(stream, chunk);
    drain_all::<AttemptDown>(stream, chunk);
    drain_all::<EnrollRequest>(stream, chunk);
    drain_all::<EnrollReply>(stream, chunk);
    rotate(stream, chunk);
});

/// Push `stream` in `chunk`-sized pieces, taking every complete `T` after each push.
fn drain_all<T>(stream: &[u8], chunk: usize)
where
    T: Serialize + DeserializeOwned + Debug,
{
    let mut decoder = FrameDecoder::new(LIMIT);
    for piece in stream.chunks(chunk) {
        if !push(&mut decoder, piece) {
            return;
        }
        loop {
            match decoder.next::<T>() {
                Ok(Some(msg)) => check_reencode(&msg),
                Ok(None) => break,
                Err(e) => return check_poisoned(&mut decoder, &e),
            }
        }
        assert!(decoder.buffered() < LIMIT + FRAME_HEADER_LEN);
    }
}

/// Like [`drain_all`], but asking for a different type for each frame.
fn rotate(stream: &[u8], chunk: usize) {
    let mut decoder = FrameDecoder::new(LIMIT);
    let mut frame = 0usize;
    for piece in stream.chunks(chunk) {
        if !push(&mut decoder, piece) {
            return;
        }
        loop {
            let got = match frame % 10 {
                0 => next_checked::<WorkerMessage>(&mut decoder),
                1 => next_checked::<CoordinatorMessage>(&mut decoder),
                2 => next_checked::<OperatorRequest>(&mut decoder),
                3 => next_checked::<OperatorResponse>(&mut decoder),
                4 => next_checked::<Hello>(&mut decoder),
                5 => next_checked::<HelloReply>(&mut decoder),
                6 => next_checked::<AttemptUp>(&mut decoder),
                7 => next_checked::<AttemptDown>(&mut decoder),
                8 => next_checked::<EnrollRequest>(&mut decoder),
                _ => next_checked::<EnrollReply>(&mut decoder),
            };
            match got {
                Ok(true) => frame += 1,
                Ok(false) => break,
                Err(e) => return check_poisoned(&mut decoder, &e),
            }
        }
    }
}

fn next_checked<T>(decoder: &mut FrameDecoder) -> Result<bool, DecodeError>
where
    T: Serialize + DeserializeOwned + Debug,
{
    Ok(match decoder.next::<T>()? {
        Some(msg) => {
            check_reencode(&msg);
            true
        }
        None => false,
    })
}

/// Push one piece; on error check the poisoned state and return false.
fn push(decoder: &mut FrameDecoder, piece: &[u8]) -> bool {
    let before = decoder.buffered();
    match decoder.push(piece) {
        Ok(()) => {
            assert!(decoder.buffered() <= before + piece.len());
            assert!(decoder.buffered() <= LIMIT + FRAME_HEADER_LEN + piece.len());
            assert!(decoder.wanted() >= 1);
            true
        }
        Err(e) => {
            check_poisoned(decoder, &e);
            false
        }
    }
}

fn check_poisoned(decoder: &mut FrameDecoder, e: &DecodeError) {
    assert_eq!(decoder.buffered(), 0, "bytes kept after {e}");
    assert_eq!(decoder.push(&[0, 0, 0, 1, 0]).as_ref(), Err(e));
    assert_eq!(decoder.buffered(), 0);
    assert_eq!(decoder.next::<Hello>().err().as_ref(), Some(e));
}

/// A decoded message must survive encode + decode (compared as Debug text: floats may be NaN).
fn check_reencode<T>(msg: &T)
where
    T: Serialize + DeserializeOwned + Debug,
{
    // A decoded frame was at most LIMIT bytes; canonical re-encoding is never longer.
    let frame = encode_frame(msg, LIMIT).expect("a decoded message re-encodes within the limit");
    let mut decoder = FrameDecoder::new(LIMIT);
    decoder.push(&frame).expect("re-encoded frame is accepted");
    let again: T = decoder
        .next()
        .expect("re-encoded frame decodes")
        .expect("re-encoded frame is complete");
    assert_eq!(format!("{again:?}"), format!("{msg:?}"));
    assert_eq!(decoder.buffered(), 0);
}
