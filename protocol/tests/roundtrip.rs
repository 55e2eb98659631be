//! Property tests for framing and decoding.
//!
//! - Every message type round-trips unchanged through `encode_frame` and a `FrameDecoder` fed in
//!   arbitrary chunks.
//! - Arbitrary bytes (raw, or built from plausible frames, valid frames and mutated frames) never
//!   make the decoder panic, and it agrees with a straightforward reference model of the framing:
//!   the same messages, then the same error.
//! - Memory stays bounded for a reader that drains after every push: never more than one header
//!   plus one in-limit payload plus the bytes of the latest push; after draining, less than one
//!   frame; after an error, nothing. A length prefix over the limit is always rejected, and one
//!   at the head of the buffer is rejected by the very push that completes it.

use std::fmt::Debug;

use drover_protocol::frame::decode_payload;
use drover_protocol::{
    encode_frame, Attention, Capacity, CgroupVersion, CoordinatorMessage, DecodeError, DrainInfo,
    DrainReport, ErrorKind, FleetSummary, FrameDecoder, Gpu, GpuVendor, Hello, HelloReply, LoadAvg,
    OperatorRequest, OperatorResponse, Refusal, ResourceReport, RetryingTask, Role, StateCounts,
    Usage, VersionRange, WorkerInfo, WorkerMessage, WorkerNote, WorkerState, FRAME_HEADER_LEN,
    MAX_FRAME_LEN,
};
use proptest::prelude::*;
use proptest::sample::Index;
use serde::{de::DeserializeOwned, Serialize};

/// Small limit for the arbitrary-bytes tests, so frames near and over it are cheap to build.
const LIMIT: usize = 4096;

// ---- strategies ----------------------------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..12).prop_map(|chars| chars.into_iter().collect())
}

/// Any finite f32, including zeroes of both signs and subnormals.
fn finite() -> impl Strategy<Value = f32> {
    use prop::num::f32::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Coordinator),
        Just(Role::Worker),
        Just(Role::Operator)
    ]
}

fn version_range() -> impl Strategy<Value = VersionRange> {
    (any::<u16>(), any::<u16>()).prop_map(|(min, max)| VersionRange { min, max })
}

fn hello() -> impl Strategy<Value = Hello> {
    (version_range(), role(), text()).prop_map(|(versions, role, software)| Hello {
        versions,
        role,
        software,
    })
}

fn refusal() -> impl Strategy<Value = Refusal> {
    prop_oneof![
        (version_range(), version_range())
            .prop_map(|(coordinator, peer)| Refusal::UnsupportedVersion { coordinator, peer }),
        (role(), role()).prop_map(|(certificate, claimed)| Refusal::RoleMismatch {
            certificate,
            claimed
        }),
        role().prop_map(|role| Refusal::RoleNotAllowed { role }),
        text().prop_map(|reason| Refusal::BadIdentity { reason }),
    ]
}

fn hello_reply() -> impl Strategy<Value = HelloReply> {
    prop_oneof![
        (any::<u16>(), text(), text()).prop_map(|(version, software, peer_name)| {
            HelloReply::Accepted {
                version,
                software,
                peer_name,
            }
        }),
        refusal().prop_map(HelloReply::Refused),
    ]
}

fn load() -> impl Strategy<Value = LoadAvg> {
    (finite(), finite(), finite()).prop_map(|(one, five, fifteen)| LoadAvg { one, five, fifteen })
}

fn usage() -> impl Strategy<Value = Usage> {
    (load(), finite(), any::<u64>(), any::<u64>()).prop_map(
        |(load, cpu_percent, memory_available_bytes, disk_free_bytes)| Usage {
            load,
            cpu_percent,
            memory_available_bytes,
            disk_free_bytes,
        },
    )
}

fn gpu() -> impl Strategy<Value = Gpu> {
    let vendor = prop_oneof![
        Just(GpuVendor::Nvidia),
        Just(GpuVendor::NvidiaTegra),
        Just(GpuVendor::Other)
    ];
    (vendor, text(), any::<Option<u64>>()).prop_map(|(vendor, model, memory_bytes)| Gpu {
        vendor,
        model,
        memory_bytes,
    })
}

fn cgroup() -> impl Strategy<Value = CgroupVersion> {
    prop_oneof![
        Just(CgroupVersion::V2),
        Just(CgroupVersion::V1),
        Just(CgroupVersion::None)
    ]
}

fn resources() -> impl Strategy<Value = ResourceReport> {
    let host = (text(), text(), text(), text(), any::<u32>(), text(), load());
    let space = (
        any::<u64>(),
        any::<u64>(),
        text(),
        any::<u64>(),
        any::<u64>(),
    );
    let extras = (
        prop::collection::vec(gpu(), 0..3),
        cgroup(),
        any::<bool>(),
        prop::collection::vec(text(), 0..3),
    );
    (host, space, extras).prop_map(
        |(
            (arch, os, kernel, hostname, cpu_count, cpu_model, load),
            (
                memory_total_bytes,
                memory_available_bytes,
                work_dir,
                disk_total_bytes,
                disk_free_bytes,
            ),
            (gpus, cgroup, namespaces, labels),
        )| ResourceReport {
            arch,
            os,
            kernel,
            hostname,
            cpu_count,
            cpu_model,
            load,
            memory_total_bytes,
            memory_available_bytes,
            work_dir,
            disk_total_bytes,
            disk_free_bytes,
            gpus,
            cgroup,
            namespaces,
            labels,
        },
    )
}

fn worker_message() -> impl Strategy<Value = WorkerMessage> {
    prop_oneof![
        resources().prop_map(|resources| WorkerMessage::Register { resources }),
        (any::<u64>(), usage()).prop_map(|(seq, usage)| WorkerMessage::Heartbeat { seq, usage }),
        text().prop_map(|reason| WorkerMessage::Goodbye { reason }),
    ]
}

fn coordinator_message() -> impl Strategy<Value = CoordinatorMessage> {
    prop_oneof![
        (text(), any::<u64>(), any::<u64>()).prop_map(|(name, heartbeat_interval_ms, lease_ms)| {
            CoordinatorMessage::Registered {
                name,
                heartbeat_interval_ms,
                lease_ms,
            }
        }),
        any::<u64>().prop_map(|seq| CoordinatorMessage::HeartbeatAck { seq }),
        (text(), any::<u64>())
            .prop_map(|(task_id, epoch)| CoordinatorMessage::Confirm { task_id, epoch }),
    ]
}

fn worker_state() -> impl Strategy<Value = WorkerState> {
    prop::sample::select(WorkerState::ALL.to_vec())
}

fn worker_info() -> impl Strategy<Value = WorkerInfo> {
    let head = (
        text(),
        worker_state(),
        any::<bool>(),
        text(),
        text(),
        any::<u16>(),
    );
    let times = (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    );
    (head, times, resources(), usage()).prop_map(
        |(
            (name, state, connected, address, version, protocol_version),
            (
                first_seen_ms,
                registered_ms,
                state_changed_ms,
                last_heartbeat_ms,
                last_heartbeat_age_ms,
            ),
            resources,
            usage,
        )| WorkerInfo {
            name,
            state,
            connected,
            address,
            version,
            protocol_version,
            first_seen_ms,
            registered_ms,
            state_changed_ms,
            last_heartbeat_ms,
            last_heartbeat_age_ms,
            resources,
            usage,
        },
    )
}

fn capacity() -> impl Strategy<Value = Capacity> {
    (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(cpus, memory_bytes, gpus)| Capacity {
        cpus,
        memory_bytes,
        gpus,
    })
}

fn fleet_summary() -> impl Strategy<Value = FleetSummary> {
    let counts = (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
        |(ready, draining, lost, down)| StateCounts {
            ready,
            draining,
            lost,
            down,
        },
    );
    (text(), any::<u64>(), counts, capacity(), capacity()).prop_map(
        |(coordinator_version, now_ms, workers, total, free)| FleetSummary {
            coordinator_version,
            now_ms,
            workers,
            total,
            free,
        },
    )
}

fn operator_request() -> impl Strategy<Value = OperatorRequest> {
    prop_oneof![
        Just(OperatorRequest::FleetStatus),
        (prop::option::of(worker_state()), prop::option::of(text()))
            .prop_map(|(state, label)| OperatorRequest::ListWorkers { state, label }),
        text().prop_map(|name| OperatorRequest::ShowWorker { name }),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|data| OperatorRequest::Chunk { data }),
        text().prop_map(|id| OperatorRequest::ListOutputs { id }),
        (text(), prop::option::of(any::<u32>()))
            .prop_map(|(id, attempt)| OperatorRequest::FetchOutputs { id, attempt }),
        (text(), prop::option::of(any::<u64>())).prop_map(|(name, deadline_in_ms)| {
            OperatorRequest::Drain {
                name,
                deadline_in_ms,
            }
        }),
        text().prop_map(|name| OperatorRequest::Undrain { name }),
        Just(OperatorRequest::Attention),
    ]
}

fn drain_info() -> impl Strategy<Value = DrainInfo> {
    (any::<u64>(), prop::option::of(any::<u64>())).prop_map(|(since_ms, deadline_ms)| DrainInfo {
        since_ms,
        deadline_ms,
    })
}

fn drain_report() -> impl Strategy<Value = DrainReport> {
    (
        text(),
        worker_state(),
        worker_state(),
        prop::option::of(drain_info()),
        any::<bool>(),
        prop::collection::vec(text(), 0..3),
        any::<u64>(),
    )
        .prop_map(
            |(name, previous, state, drain, changed, running, now_ms)| DrainReport {
                name,
                previous,
                state,
                drain,
                changed,
                running,
                now_ms,
            },
        )
}

fn attention() -> impl Strategy<Value = Attention> {
    let note = (
        text(),
        worker_state(),
        any::<[u64; 2]>(),
        any::<bool>(),
        prop::option::of(drain_info()),
        prop::collection::vec(text(), 0..3),
    )
        .prop_map(|(name, state, t, connected, drain, running)| WorkerNote {
            name,
            state,
            state_changed_ms: t[0],
            last_heartbeat_ms: t[1],
            connected,
            drain,
            running,
        });
    let retrying = (text(), text(), any::<[u32; 2]>(), text(), any::<u64>()).prop_map(
        |(id, name, a, reason, not_before_ms)| RetryingTask {
            id,
            name,
            attempts: a[0],
            max_attempts: a[1],
            reason,
            not_before_ms,
        },
    );
    (
        any::<u64>(),
        prop::collection::vec(note, 0..3),
        prop::collection::vec(retrying, 0..3),
    )
        .prop_map(|(now_ms, workers, retrying)| Attention {
            now_ms,
            workers,
            retrying,
        })
}

fn operator_response() -> impl Strategy<Value = OperatorResponse> {
    let kind = prop_oneof![
        Just(ErrorKind::NotFound),
        Just(ErrorKind::InvalidRequest),
        Just(ErrorKind::Internal)
    ];
    prop_oneof![
        fleet_summary().prop_map(OperatorResponse::FleetStatus),
        prop::collection::vec(worker_info(), 0..3).prop_map(OperatorResponse::Workers),
        worker_info().prop_map(|info| OperatorResponse::Worker(Box::new(info))),
        (kind, text()).prop_map(|(kind, message)| OperatorResponse::Error { kind, message }),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|data| OperatorResponse::Chunk { data }),
        drain_report().prop_map(OperatorResponse::Drain),
        attention().prop_map(OperatorResponse::Attention),
    ]
}

/// Up to 8 cut points, to split a byte stream into chunks.
fn cuts() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..8)
}

/// Split `bytes` at the given cut points (chunks may be empty).
fn chunks<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

// ---- round trips ---------------------------------------------------------------------------

/// Encode `msgs` as consecutive frames, push them in the given chunks, drain after every push,
/// and check the same messages come out and memory stays within one frame plus the push.
fn round_trip<T>(msgs: &[T], cuts: &[Index]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut stream = Vec::new();
    for msg in msgs {
        stream.extend(encode_frame(msg, MAX_FRAME_LEN).expect("message encodes"));
    }
    let mut decoder = FrameDecoder::default();
    let mut out = Vec::new();
    for chunk in chunks(&stream, cuts) {
        decoder.push(chunk).expect("valid frames are accepted");
        prop_assert!(decoder.buffered() <= MAX_FRAME_LEN + FRAME_HEADER_LEN + chunk.len());
        while let Some(msg) = decoder.next::<T>().expect("valid frames decode") {
            out.push(msg);
        }
        prop_assert!(decoder.buffered() < MAX_FRAME_LEN + FRAME_HEADER_LEN);
        prop_assert!(decoder.wanted() >= 1);
    }
    prop_assert_eq!(&out, &msgs);
    prop_assert_eq!(decoder.buffered(), 0);
    prop_assert_eq!(decoder.wanted(), FRAME_HEADER_LEN);
    Ok(())
}

proptest! {
    #[test]
    fn hellos_round_trip(msgs in prop::collection::vec(hello(), 0..4), cuts in cuts()) {
        round_trip(&msgs, &cuts)?;
    }

    #[test]
    fn hello_replies_round_trip(
        msgs in prop::collection::vec(hello_reply(), 0..4),
        cuts in cuts(),
    ) {
        round_trip(&msgs, &cuts)?;
    }

    #[test]
    fn worker_messages_round_trip(
        msgs in prop::collection::vec(worker_message(), 0..4),
        cuts in cuts(),
    ) {
        round_trip(&msgs, &cuts)?;
    }

    #[test]
    fn coordinator_messages_round_trip(
        msgs in prop::collection::vec(coordinator_message(), 0..4),
        cuts in cuts(),
    ) {
        round_trip(&msgs, &cuts)?;
    }

    #[test]
    fn operator_requests_round_trip(
        msgs in prop::collection::vec(operator_request(), 0..4),
        cuts in cuts(),
    ) {
        round_trip(&msgs, &cuts)?;
    }

    #[test]
    fn operator_responses_round_trip(
        msgs in prop::collection::vec(operator_response(), 0..3),
        cuts in cuts(),
    ) {
        round_trip(&msgs, &cuts)?;
    }
}

// ---- arbitrary bytes -----------------------------------------------------------------------

/// A message type a reader can expect.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Worker,
    Request,
    Hello,
}

const KINDS: [Kind; 3] = [Kind::Worker, Kind::Request, Kind::Hello];

/// Which type the reader asks for, frame by frame: always `KINDS[first]`, or rotating through
/// `KINDS` from there.
#[derive(Debug, Clone, Copy)]
struct Reader {
    first: usize,
    rotate: bool,
}

impl Reader {
    fn kind(self, frame: usize) -> Kind {
        let step = if self.rotate { frame } else { 0 };
        KINDS[(self.first + step) % KINDS.len()]
    }
}

fn reader() -> impl Strategy<Value = Reader> {
    (0..KINDS.len(), any::<bool>()).prop_map(|(first, rotate)| Reader { first, rotate })
}

/// Pull the next message of `kind` from the decoder, as its `Debug` text (NaN-safe equality).
fn next_as(decoder: &mut FrameDecoder, kind: Kind) -> Result<Option<String>, DecodeError> {
    Ok(match kind {
        Kind::Worker => decoder.next::<WorkerMessage>()?.map(|m| format!("{m:?}")),
        Kind::Request => decoder.next::<OperatorRequest>()?.map(|m| format!("{m:?}")),
        Kind::Hello => decoder.next::<Hello>()?.map(|m| format!("{m:?}")),
    })
}

fn payload_as(payload: &[u8], kind: Kind) -> Result<String, DecodeError> {
    Ok(match kind {
        Kind::Worker => format!("{:?}", decode_payload::<WorkerMessage>(payload)?),
        Kind::Request => format!("{:?}", decode_payload::<OperatorRequest>(payload)?),
        Kind::Hello => format!("{:?}", decode_payload::<Hello>(payload)?),
    })
}

/// What a reader of the whole `stream` should see: the messages, then the error that ends the
/// stream (if any). An incomplete last frame is simply not reported.
fn model(stream: &[u8], limit: usize, reader: Reader) -> (Vec<String>, Option<DecodeError>) {
    let mut msgs = Vec::new();
    let mut rest = stream;
    while let Some((head, body)) = rest.split_first_chunk::<FRAME_HEADER_LEN>() {
        let len = u32::from_be_bytes(*head) as usize;
        if len > limit {
            return (msgs, Some(DecodeError::FrameTooLarge { len, limit }));
        }
        if len == 0 {
            return (msgs, Some(DecodeError::EmptyFrame));
        }
        let Some((payload, after)) = body.split_at_checked(len) else {
            break;
        };
        match payload_as(payload, reader.kind(msgs.len())) {
            Ok(msg) => msgs.push(msg),
            Err(e) => return (msgs, Some(e)),
        }
        rest = after;
    }
    (msgs, None)
}

/// Feed `stream` in the given chunks to a decoder with `limit`, draining after every push, and
/// check it never panics, keeps memory bounded, is poisoned and empty after an error, and
/// agrees with [`model`].
fn check_stream(stream: &[u8], cuts: &[Index], reader: Reader) -> Result<(), TestCaseError> {
    let mut decoder = FrameDecoder::new(LIMIT);
    let mut msgs = Vec::new();
    let mut error = None;
    'feed: for chunk in chunks(stream, cuts) {
        let before = decoder.buffered();
        if let Err(e) = decoder.push(chunk) {
            error = Some(e);
            break;
        }
        prop_assert!(decoder.buffered() <= before + chunk.len());
        prop_assert!(decoder.buffered() <= LIMIT + FRAME_HEADER_LEN + chunk.len());
        loop {
            match next_as(&mut decoder, reader.kind(msgs.len())) {
                Ok(Some(msg)) => msgs.push(msg),
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
        }
        // Drained: at most one incomplete, in-limit frame is left.
        prop_assert!(decoder.buffered() < LIMIT + FRAME_HEADER_LEN);
        prop_assert!(decoder.wanted() >= 1);
    }
    if let Some(e) = &error {
        let e = Err(e.clone());
        prop_assert_eq!(decoder.buffered(), 0, "nothing is kept after an error");
        prop_assert_eq!(decoder.push(&[0, 0, 0, 1, 0]), e.clone(), "stays poisoned");
        prop_assert_eq!(decoder.buffered(), 0);
        prop_assert_eq!(
            decoder.next::<Hello>().map(|_| ()),
            e.clone(),
            "stays poisoned"
        );
        prop_assert_eq!(decoder.next::<WorkerMessage>().map(|_| ()), e);
    }
    let (want_msgs, want_error) = model(stream, LIMIT, reader);
    prop_assert_eq!(msgs, want_msgs);
    prop_assert_eq!(error, want_error);
    Ok(())
}

/// A frame with a correct length prefix.
fn framed(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small payload");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn encoded<T: Serialize>(msg: &T) -> Vec<u8> {
    encode_frame(msg, LIMIT).unwrap_or_default()
}

/// A valid frame of `kind`.
fn valid_frame(kind: Kind) -> BoxedStrategy<Vec<u8>> {
    match kind {
        Kind::Worker => worker_message().prop_map(|m| encoded(&m)).boxed(),
        Kind::Request => operator_request().prop_map(|m| encoded(&m)).boxed(),
        Kind::Hello => hello().prop_map(|m| encoded(&m)).boxed(),
    }
}

/// One piece of a plausible-but-hostile stream for a reader expecting `kind`: mostly valid
/// frames of that type, so streams get deep, with noise, bad prefixes and damaged frames.
fn segment(kind: Kind) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Valid frames, mostly of the expected type.
        12 => valid_frame(kind),
        1 => valid_frame(Kind::Worker),
        1 => valid_frame(Kind::Request),
        1 => valid_frame(Kind::Hello),
        // Valid frames with one byte changed (payload or prefix).
        3 => (valid_frame(kind), any::<Index>(), 1..=255u8).prop_map(|(mut f, at, x)| {
            if !f.is_empty() {
                let i = at.index(f.len());
                f[i] ^= x;
            }
            f
        }),
        // Valid frames cut short.
        1 => (valid_frame(kind), any::<Index>()).prop_map(|(mut f, at)| {
            f.truncate(at.index(f.len() + 1));
            f
        }),
        // Raw noise.
        1 => prop::collection::vec(any::<u8>(), 0..16),
        // A well-framed random payload.
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|p| framed(&p)),
        // A bare length prefix: anything, or right around the limit.
        1 => any::<u32>().prop_map(|n| n.to_be_bytes().to_vec()),
        1 => (LIMIT as u32 - 2..=LIMIT as u32 + 2).prop_map(|n| n.to_be_bytes().to_vec()),
        // A frame of exactly the limit.
        1 => any::<u8>().prop_map(|b| framed(&vec![b; LIMIT])),
    ]
}

/// A reader that always expects one type, and a stream aimed at it.
fn hostile_stream() -> impl Strategy<Value = (Reader, Vec<u8>)> {
    (0..KINDS.len()).prop_flat_map(|first| {
        let reader = Reader {
            first,
            rotate: false,
        };
        prop::collection::vec(segment(KINDS[first]), 0..16)
            .prop_map(move |segments| (reader, segments.concat()))
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..8192),
        cuts in cuts(),
        reader in reader(),
    ) {
        check_stream(&bytes, &cuts, reader)?;
    }

    #[test]
    fn hostile_streams_match_model((reader, stream) in hostile_stream(), cuts in cuts()) {
        check_stream(&stream, &cuts, reader)?;
    }

    /// An over-limit prefix at the head of the buffer is refused by the push that completes
    /// it, whatever follows it and however the prefix is split, and nothing stays buffered.
    #[test]
    fn over_limit_prefix_is_rejected_on_push(
        len in (LIMIT as u32 + 1)..=u32::MAX,
        tail in prop::collection::vec(any::<u8>(), 0..64),
        split in 0..=FRAME_HEADER_LEN,
        after_frame in any::<bool>(),
    ) {
        let mut decoder = FrameDecoder::new(LIMIT);
        if after_frame {
            // A good frame first, taken by the reader, so the prefix is not at offset 0.
            let hello = Hello {
                versions: VersionRange { min: 1, max: 1 },
                role: Role::Worker,
                software: "w".into(),
            };
            decoder.push(&encoded(&hello)).expect("good frame");
            prop_assert_eq!(decoder.next::<Hello>().expect("good frame"), Some(hello));
        }
        let expected = DecodeError::FrameTooLarge { len: len as usize, limit: LIMIT };
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(&tail);
        let (first, second) = bytes.split_at(split);
        if split < FRAME_HEADER_LEN {
            decoder.push(first).expect("partial prefix is not judged yet");
            prop_assert!(decoder.buffered() < FRAME_HEADER_LEN);
            prop_assert_eq!(decoder.push(second), Err(expected.clone()));
        } else {
            prop_assert_eq!(decoder.push(first), Err(expected.clone()));
        }
        prop_assert_eq!(decoder.buffered(), 0);
        prop_assert_eq!(decoder.next::<WorkerMessage>(), Err(expected));
    }
}

// ---- fixed cases ---------------------------------------------------------------------------

#[test]
fn u32_max_prefix_fails_immediately_and_buffers_nothing() {
    for limit in [LIMIT, MAX_FRAME_LEN] {
        let expected = DecodeError::FrameTooLarge {
            len: u32::MAX as usize,
            limit,
        };
        let mut decoder = FrameDecoder::new(limit);
        assert_eq!(decoder.push(&[0xff; 4]), Err(expected.clone()));
        assert_eq!(decoder.buffered(), 0);
        assert_eq!(decoder.next::<OperatorRequest>(), Err(expected.clone()));

        // Same with payload bytes in the same push: none of them are kept.
        let mut decoder = FrameDecoder::new(limit);
        let mut bytes = vec![0xff; 4];
        bytes.extend_from_slice(&[7; 1000]);
        assert_eq!(decoder.push(&bytes), Err(expected.clone()));
        assert_eq!(decoder.buffered(), 0);
        assert_eq!(decoder.push(&[0, 0, 0, 1, 0]), Err(expected));
        assert_eq!(decoder.buffered(), 0);
    }
}

#[test]
fn limit_is_inclusive() {
    let mut decoder = FrameDecoder::new(LIMIT);
    decoder
        .push(&(LIMIT as u32).to_be_bytes())
        .expect("a frame of exactly the limit is allowed");
    assert_eq!(decoder.wanted(), LIMIT);
}

/// Regression: `push` used to append everything behind a complete frame unchecked, so 1 MiB
/// behind a `u32::MAX` prefix (4 KiB limit) was buffered until the reader got there. Now the
/// frames before the bad prefix are kept, nothing after it, and `next` returns them and then
/// the error.
#[test]
fn over_limit_prefix_behind_a_complete_frame_is_not_buffered() {
    let too_large = DecodeError::FrameTooLarge {
        len: u32::MAX as usize,
        limit: LIMIT,
    };
    let good = encode_frame(&OperatorRequest::FleetStatus, LIMIT).expect("encodes");
    let mut bytes = good.clone();
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    bytes.extend_from_slice(&vec![0; 1 << 20]);

    let mut decoder = FrameDecoder::new(LIMIT);
    let pushed = decoder.push(&bytes);
    assert!(
        decoder.buffered() <= good.len(),
        "buffered {} bytes behind an over-limit prefix (limit {LIMIT})",
        decoder.buffered()
    );
    match pushed {
        Err(e) => assert_eq!(e, too_large),
        Ok(()) => {
            assert_eq!(
                decoder.next::<OperatorRequest>(),
                Ok(Some(OperatorRequest::FleetStatus))
            );
            assert_eq!(decoder.next::<OperatorRequest>(), Err(too_large));
        }
    }
}
