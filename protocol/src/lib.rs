//! Drover's wire protocol, with no I/O: message types for every direction, length-prefixed
//! postcard framing with a hard frame limit, and the versioned handshake that opens each
//! connection.
//!
//! This crate owns the bytes on the wire and nothing else. It has no tokio, no quinn and no
//! filesystem dependency, so it can be golden-tested and fuzzed alone; the coordinator and the
//! worker wrap it in their own async shells.
//!
//! Wire compatibility rules (postcard is not self-describing: field order *is* the format):
//! - never reorder or remove fields or enum variants; add new variants at the end;
//! - any change to an existing message bumps [`PROTOCOL_VERSION`]; the golden tests in
//!   `tests/golden.rs` fail on any accidental change.

pub mod acceptance;
pub mod bytes;
pub mod enroll;
pub mod frame;
pub mod handshake;
pub mod identity;
pub mod messages;
pub mod secrets;
pub mod task;

pub use enroll::{EnrollReply, EnrollRequest, RevocationReport, TokenInfo};
pub use frame::{
    encode_frame, DecodeError, EncodeError, FrameDecoder, FRAME_HEADER_LEN, MAX_FRAME_LEN,
};
pub use handshake::{
    negotiate, Hello, HelloReply, Refusal, Role, VersionRange, PROTOCOL_VERSION, SUPPORTED_VERSIONS,
};
pub use messages::*;
pub use secrets::{Secret, SecretGrant, SecretInfo, SecretScheme, SecretValue};
