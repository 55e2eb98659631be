//! Golden bytes for every message type and every enum variant on the wire.
//!
//! IF ONE OF THESE TESTS FAILS, YOU CHANGED THE WIRE FORMAT. postcard is not self-describing:
//! field order, field types and variant order *are* the format, so a reordered field or an
//! enum variant inserted in the middle silently breaks every peer built before the change.
//! If the change is deliberate: bump `PROTOCOL_VERSION` (and `SUPPORTED_VERSIONS` as needed),
//! then regenerate the goldens with
//!
//! ```text
//! DROVER_PRINT_GOLDEN=1 cargo test -p drover-protocol --test golden -- --nocapture
//! ```
//!
//! which prints the new literal for every golden that differs instead of failing on it, and
//! paste them in here in the same commit as the version bump. If the change was not deliberate,
//! undo it.
//!
//! Each golden checks both directions: the fixed sample encodes to exactly the checked-in
//! bytes, and the checked-in bytes decode (through a `FrameDecoder`) to exactly the sample.
//! Floats in the samples are exactly representable so equality is exact.

use std::fmt::Debug;

use drover_protocol::task::{
    ExitClass, Isolation, Limits, NetworkPolicy, OomPolicy, OutputsInfo, Requirements, RetryPolicy,
    SessionEvent, TaskInfo, TaskSpec, TaskState,
};
use drover_protocol::{
    encode_frame, Assignment, AttemptDown, AttemptEvent, AttemptUp, Attention, Capacity,
    CgroupVersion, CoordinatorMessage, DrainInfo, DrainReport, ErrorKind, FleetSummary,
    FrameDecoder, Gpu, GpuVendor, Hello, HelloReply, LoadAvg, OperatorRequest, OperatorResponse,
    Refusal, ResourceReport, RetryingTask, Role, StateCounts, Usage, VersionRange, WorkerInfo,
    WorkerMessage, WorkerNote, WorkerState, MAX_FRAME_LEN, PROTOCOL_VERSION, SUPPORTED_VERSIONS,
};
use drover_protocol::{Secret, SecretGrant, SecretInfo, SecretScheme, SecretValue};
use serde::{de::DeserializeOwned, Serialize};

const PRINT_ENV: &str = "DROVER_PRINT_GOLDEN";

/// Check `value` against its golden frame `expected_hex` (whitespace in the literal is ignored).
fn golden<T>(name: &str, value: &T, expected_hex: &str)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let encoded = encode_frame(value, MAX_FRAME_LEN).expect("sample encodes");
    let actual_hex = to_hex(&encoded);
    let expected_hex: String = expected_hex
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if actual_hex != expected_hex {
        if std::env::var_os(PRINT_ENV).is_some() {
            println!("golden {name}:\n{}", hex_literal(&actual_hex));
            return;
        }
        panic!(
            "wire format of `{name}` changed: bump PROTOCOL_VERSION and update the golden \
             deliberately (see the top of tests/golden.rs)\n  expected {expected_hex}\n  \
             actual   {actual_hex}"
        );
    }

    let bytes = from_hex(&expected_hex);
    let mut decoder = FrameDecoder::default();
    decoder.push(&bytes).expect("golden frame is accepted");
    let decoded: T = decoder
        .next()
        .expect("golden frame decodes")
        .expect("golden frame is complete");
    assert_eq!(
        &decoded, value,
        "golden `{name}` decodes to a different value"
    );
    assert_eq!(decoder.buffered(), 0, "golden `{name}` has bytes left over");
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(hex: &str) -> Vec<u8> {
    assert!(hex.len() % 2 == 0, "odd-length hex literal");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex literal"))
        .collect()
}

/// Format hex as a Rust string literal wrapped at 64 hex digits (32 bytes) per line.
fn hex_literal(hex: &str) -> String {
    let lines: Vec<&str> = hex
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    format!("\"{}\"", lines.join("\\\n         "))
}

// ---- samples -------------------------------------------------------------------------------

fn sample_load() -> LoadAvg {
    LoadAvg {
        one: 0.5,
        five: 1.25,
        fifteen: 2.0,
    }
}

fn sample_usage() -> Usage {
    Usage {
        load: sample_load(),
        cpu_percent: 37.5,
        memory_available_bytes: 6 << 30,
        disk_free_bytes: 120 << 30,
    }
}

/// A resource report with one GPU of every vendor, with and without dedicated memory.
fn sample_resources() -> ResourceReport {
    ResourceReport {
        arch: "x86_64".into(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        kernel: "6.1.0-18-amd64".into(),
        hostname: "gpu-box-1".into(),
        cpu_count: 16,
        cpu_model: "AMD Ryzen 9 5950X".into(),
        load: sample_load(),
        memory_total_bytes: 64 << 30,
        memory_available_bytes: 48 << 30,
        work_dir: "/var/lib/drover/work".into(),
        disk_total_bytes: 1 << 40,
        disk_free_bytes: 512 << 30,
        gpus: vec![
            Gpu {
                vendor: GpuVendor::Nvidia,
                model: "NVIDIA GeForce RTX 3090".into(),
                memory_bytes: Some(24 << 30),
            },
            Gpu {
                vendor: GpuVendor::NvidiaTegra,
                model: "Orin".into(),
                memory_bytes: None,
            },
            Gpu {
                vendor: GpuVendor::Other,
                model: "AMD Radeon".into(),
                memory_bytes: Some(8 << 30),
            },
        ],
        cgroup: CgroupVersion::V2,
        namespaces: true,
        labels: vec!["browser".into(), "gpu".into()],
    }
}

/// A small arm64 report without GPUs, for the other cgroup variants.
fn small_resources(cgroup: CgroupVersion) -> ResourceReport {
    ResourceReport {
        arch: "aarch64".into(),
        os: "Ubuntu 22.04".into(),
        kernel: "5.15.0".into(),
        hostname: "pi".into(),
        cpu_count: 4,
        cpu_model: "Cortex-A72".into(),
        load: LoadAvg::default(),
        memory_total_bytes: 4 << 30,
        memory_available_bytes: 3 << 30,
        work_dir: "/srv/drover".into(),
        disk_total_bytes: 64 << 30,
        disk_free_bytes: 32 << 30,
        gpus: vec![],
        cgroup,
        namespaces: false,
        labels: vec![],
    }
}

fn sample_worker_info(name: &str, state: WorkerState, resources: ResourceReport) -> WorkerInfo {
    WorkerInfo {
        name: name.into(),
        state,
        connected: state == WorkerState::Ready || state == WorkerState::Draining,
        address: "192.0.2.10:40123".into(),
        version: "drover-worker 0.1.0".into(),
        protocol_version: PROTOCOL_VERSION,
        first_seen_ms: 1_700_000_000_000,
        registered_ms: 1_700_000_100_000,
        state_changed_ms: 1_700_000_100_500,
        last_heartbeat_ms: 1_700_000_200_000,
        last_heartbeat_age_ms: 1_500,
        resources,
        usage: sample_usage(),
    }
}

fn sample_summary() -> FleetSummary {
    FleetSummary {
        coordinator_version: "drover-coordinator 0.1.0".into(),
        now_ms: 1_700_000_201_500,
        workers: StateCounts {
            ready: 3,
            draining: 1,
            lost: 2,
            down: 4,
        },
        total: Capacity {
            cpus: 64,
            memory_bytes: 256 << 30,
            gpus: 4,
        },
        free: Capacity {
            cpus: 40,
            memory_bytes: 180 << 30,
            gpus: 1,
        },
    }
}

// ---- handshake -----------------------------------------------------------------------------

#[test]
fn supported_versions_match_goldens() {
    // The goldens below were taken at this version; a bump must come with new goldens.
    assert_eq!(PROTOCOL_VERSION, 6);
    assert_eq!(SUPPORTED_VERSIONS, VersionRange { min: 6, max: 6 });
}

#[test]
fn hello_every_role() {
    let hello = |role| Hello {
        versions: VersionRange { min: 1, max: 3 },
        role,
        software: "drover-worker 0.1.0".into(),
    };
    golden(
        "hello_coordinator",
        &hello(Role::Coordinator),
        "000000170103001364726f7665722d776f726b657220302e312e30",
    );
    golden(
        "hello_worker",
        &hello(Role::Worker),
        "000000170103011364726f7665722d776f726b657220302e312e30",
    );
    golden(
        "hello_operator",
        &hello(Role::Operator),
        "000000170103021364726f7665722d776f726b657220302e312e30",
    );
}

#[test]
fn hello_reply_accepted() {
    let reply = HelloReply::Accepted {
        version: 1,
        software: "drover-coordinator 0.1.0".into(),
        peer_name: "worker-1".into(),
    };
    golden(
        "hello_reply_accepted",
        &reply,
        "0000002400011864726f7665722d636f6f7264696e61746f7220302e312e3008\
            776f726b65722d31",
    );
}

#[test]
fn hello_reply_refused_unsupported_version() {
    let reply = HelloReply::Refused(Refusal::UnsupportedVersion {
        coordinator: VersionRange { min: 1, max: 1 },
        peer: VersionRange { min: 2, max: 300 },
    });
    golden(
        "refused_unsupported_version",
        &reply,
        "000000070100010102ac02",
    );
}

#[test]
fn hello_reply_refused_role_mismatch() {
    let reply = HelloReply::Refused(Refusal::RoleMismatch {
        certificate: Role::Worker,
        claimed: Role::Operator,
    });
    golden("refused_role_mismatch", &reply, "0000000401010102");
}

#[test]
fn hello_reply_refused_role_not_allowed() {
    let reply = HelloReply::Refused(Refusal::RoleNotAllowed {
        role: Role::Coordinator,
    });
    golden("refused_role_not_allowed", &reply, "00000003010200");
}

#[test]
fn hello_reply_refused_bad_identity() {
    let reply = HelloReply::Refused(Refusal::BadIdentity {
        reason: "no drover role".into(),
    });
    golden(
        "refused_bad_identity",
        &reply,
        "0000001101030e6e6f2064726f76657220726f6c65",
    );
}

// ---- worker control stream -----------------------------------------------------------------

#[test]
fn worker_register_full() {
    let msg = WorkerMessage::Register {
        resources: sample_resources(),
    };
    golden(
        "worker_register_full",
        &msg,
        "000000d400067838365f36341e44656269616e20474e552f4c696e7578203132\
            2028626f6f6b776f726d290e362e312e302d31382d616d643634096770752d62\
            6f782d311011414d442052797a656e20392035393530580000003f0000a03f00\
            00004080808080800280808080c001142f7661722f6c69622f64726f7665722f\
            776f726b8080808080208080808080100300174e5649444941204765466f7263\
            6520525458203330393001808080806001044f72696e00020a414d4420526164\
            656f6e0180808080200001020762726f7773657203677075",
    );
}

#[test]
fn worker_register_other_cgroups() {
    let msg = |cgroup| WorkerMessage::Register {
        resources: small_resources(cgroup),
    };
    golden(
        "worker_register_cgroup_v1",
        &msg(CgroupVersion::V1),
        "0000005e0007616172636836340c5562756e74752032322e303406352e31352e\
            30027069040a436f727465782d41373200000000000000000000000080808080\
            10808080800c0b2f7372762f64726f7665728080808080028080808080010001\
            0000",
    );
    golden(
        "worker_register_cgroup_none",
        &msg(CgroupVersion::None),
        "0000005e0007616172636836340c5562756e74752032322e303406352e31352e\
            30027069040a436f727465782d41373200000000000000000000000080808080\
            10808080800c0b2f7372762f64726f7665728080808080028080808080010002\
            0000",
    );
}

#[test]
fn worker_heartbeat() {
    let msg = WorkerMessage::Heartbeat {
        seq: 300,
        usage: sample_usage(),
    };
    golden(
        "worker_heartbeat",
        &msg,
        "0000001e01ac020000003f0000a03f0000004000001642808080801880808080\
            e003",
    );
}

#[test]
fn worker_goodbye() {
    let msg = WorkerMessage::Goodbye {
        reason: "SIGTERM".into(),
    };
    golden("worker_goodbye", &msg, "0000000902075349475445524d");
}

#[test]
fn coordinator_registered() {
    let msg = CoordinatorMessage::Registered {
        name: "worker-1".into(),
        heartbeat_interval_ms: 5_000,
        lease_ms: 15_000,
    };
    golden(
        "coordinator_registered",
        &msg,
        "0000000e0008776f726b65722d3188279875",
    );
}

#[test]
fn coordinator_heartbeat_ack() {
    let msg = CoordinatorMessage::HeartbeatAck { seq: 300 };
    golden("coordinator_heartbeat_ack", &msg, "0000000301ac02");
}

// ---- operator streams ----------------------------------------------------------------------

#[test]
fn operator_request_fleet_status() {
    golden(
        "request_fleet_status",
        &OperatorRequest::FleetStatus,
        "0000000100",
    );
}

#[test]
fn operator_request_list_workers_unfiltered() {
    let req = OperatorRequest::ListWorkers {
        state: None,
        label: None,
    };
    golden("request_list_workers_unfiltered", &req, "00000003010000");
}

#[test]
fn operator_request_list_workers_every_state() {
    let req = |state| OperatorRequest::ListWorkers {
        state: Some(state),
        label: Some("gpu".into()),
    };
    golden(
        "request_list_ready",
        &req(WorkerState::Ready),
        "000000080101000103677075",
    );
    golden(
        "request_list_draining",
        &req(WorkerState::Draining),
        "000000080101010103677075",
    );
    golden(
        "request_list_lost",
        &req(WorkerState::Lost),
        "000000080101020103677075",
    );
    golden(
        "request_list_down",
        &req(WorkerState::Down),
        "000000080101030103677075",
    );
}

#[test]
fn operator_request_show_worker() {
    let req = OperatorRequest::ShowWorker {
        name: "worker-1".into(),
    };
    golden("request_show_worker", &req, "0000000a0208776f726b65722d31");
}

#[test]
fn operator_response_fleet_status() {
    golden(
        "response_fleet_status",
        &OperatorResponse::FleetStatus(sample_summary()),
        "00000034001864726f7665722d636f6f7264696e61746f7220302e312e309cf6\
            a1ffbc310301020440808080808008042880808080d00501",
    );
}

#[test]
fn operator_response_workers() {
    let resp = OperatorResponse::Workers(vec![
        sample_worker_info("gpu-box-1", WorkerState::Ready, sample_resources()),
        sample_worker_info("pi", WorkerState::Lost, small_resources(CgroupVersion::V1)),
    ]);
    golden(
        "response_workers",
        &resp,
        "000001f90102096770752d626f782d310001103139322e302e322e31303a3430\
         3132331364726f7665722d776f726b657220302e312e300680d095ffbc31a0dd\
         9bffbc3194e19bffbc31c0eaa1ffbc31dc0b067838365f36341e44656269616e\
         20474e552f4c696e75782031322028626f6f6b776f726d290e362e312e302d31\
         382d616d643634096770752d626f782d311011414d442052797a656e20392035\
         393530580000003f0000a03f0000004080808080800280808080c001142f7661\
         722f6c69622f64726f7665722f776f726b808080808020808080808010030017\
         4e5649444941204765466f72636520525458203330393001808080806001044f\
         72696e00020a414d4420526164656f6e0180808080200001020762726f777365\
         72036770750000003f0000a03f0000004000001642808080801880808080e003\
         0270690200103139322e302e322e31303a34303132331364726f7665722d776f\
         726b657220302e312e300680d095ffbc31a0dd9bffbc3194e19bffbc31c0eaa1\
         ffbc31dc0b07616172636836340c5562756e74752032322e303406352e31352e\
         30027069040a436f727465782d41373200000000000000000000000080808080\
         10808080800c0b2f7372762f64726f7665728080808080028080808080010001\
         00000000003f0000a03f0000004000001642808080801880808080e003",
    );
    golden(
        "response_workers_empty",
        &OperatorResponse::Workers(vec![]),
        "000000020100",
    );
}

#[test]
fn operator_response_worker() {
    let resp = OperatorResponse::Worker(Box::new(sample_worker_info(
        "gpu-box-1",
        WorkerState::Draining,
        sample_resources(),
    )));
    golden(
        "response_worker",
        &resp,
        "0000013b02096770752d626f782d310101103139322e302e322e31303a343031\
         32331364726f7665722d776f726b657220302e312e300680d095ffbc31a0dd9b\
         ffbc3194e19bffbc31c0eaa1ffbc31dc0b067838365f36341e44656269616e20\
         474e552f4c696e75782031322028626f6f6b776f726d290e362e312e302d3138\
         2d616d643634096770752d626f782d311011414d442052797a656e2039203539\
         3530580000003f0000a03f0000004080808080800280808080c001142f766172\
         2f6c69622f64726f7665722f776f726b8080808080208080808080100300174e\
         5649444941204765466f72636520525458203330393001808080806001044f72\
         696e00020a414d4420526164656f6e0180808080200001020762726f77736572\
         036770750000003f0000a03f0000004000001642808080801880808080e003",
    );
}

#[test]
fn operator_response_error_every_kind() {
    let err = |kind, message: &str| OperatorResponse::Error {
        kind,
        message: message.into(),
    };
    golden(
        "response_error_not_found",
        &err(ErrorKind::NotFound, "no worker named \"x\""),
        "000000160300136e6f20776f726b6572206e616d656420227822",
    );
    golden(
        "response_error_invalid_request",
        &err(ErrorKind::InvalidRequest, "bad label"),
        "0000000c030109626164206c6162656c",
    );
    golden(
        "response_error_internal",
        &err(ErrorKind::Internal, "database is locked"),
        "000000150302126461746162617365206973206c6f636b6564",
    );
}

// ---- QUIC close codes ----------------------------------------------------------------------

#[test]
fn close_codes_are_stable() {
    use drover_protocol::close_code::*;
    assert_eq!(
        [GOODBYE, REFUSED, PROTOCOL_ERROR, REPLACED, SHUTDOWN],
        [0, 1, 2, 3, 4]
    );
}

// ---- tasks (protocol v2) -------------------------------------------------------------------

fn sample_spec() -> TaskSpec {
    let mut env = std::collections::BTreeMap::new();
    env.insert("GREETING".to_owned(), "drover".to_owned());
    TaskSpec {
        name: "hello".into(),
        command: vec!["sh".into(), "-c".into(), "echo hi".into()],
        env,
        inputs: vec!["data".into()],
        outputs: vec!["out/*.json".into()],
        requirements: Requirements {
            arch: Some("aarch64".into()),
            cpus: 2,
            memory_bytes: 1 << 30,
            gpus: 1,
            labels: vec!["browser".into()],
        },
        limits: Limits {
            memory_bytes: Some(2 << 30),
            pids: Some(64),
            wall_time_ms: Some(60_000),
        },
        network: NetworkPolicy::Host,
        isolation: Isolation::Process,
        retry: RetryPolicy {
            max_attempts: 3,
            backoff_ms: 500,
            on_oom: OomPolicy::RetryWithMoreMemory,
            memory_factor_percent: 150,
            memory_ceiling_bytes: Some(8 << 30),
        },
        priority: -2,
        on_disconnect: Some(drover_protocol::task::OnDisconnect::KeepRunning),
        lost_after_ms: Some(120_000),
        acceptance: vec![drover_protocol::task::Criterion {
            name: "tests".into(),
            command: vec!["make".into(), "test".into()],
            timeout_ms: 60_000,
        }],
        max_iterations: 4,
        verdict: Some(drover_protocol::task::VerdictSpec { criteria: vec![] }),
        egress: vec!["api.github.com".into(), "*.example.com:8443".into()],
        secrets: vec![SecretGrant {
            name: "github".into(),
            hosts: vec!["api.github.com".into()],
            header: "Authorization".into(),
            scheme: SecretScheme::Basic {
                username: "x-access-token".into(),
            },
        }],
    }
}

fn sample_task_info(state: TaskState, exit: Option<ExitClass>) -> TaskInfo {
    TaskInfo {
        id: "t7".into(),
        name: "hello".into(),
        state,
        attempts: 2,
        epoch: 2,
        worker: Some("pi-7".into()),
        submitted_ms: 1_700_000_000_000,
        finished_ms: Some(1_700_000_001_000),
        exit,
        reason: Some("attempt 2 of 3 exited with code 3".into()),
        events: 11,
        spec: sample_spec(),
        iteration: 2,
        criteria: vec![drover_protocol::task::CriterionResult {
            name: "tests".into(),
            passed: false,
            exit: Some(1),
            excerpt: "1 failed".into(),
        }],
        verdict: Some(drover_protocol::task::VerdictInfo {
            epoch: 3,
            worker: Some("pi-8".into()),
            work_worker: Some("pi-7".into()),
            outputs_epoch: Some(2),
            passed: None,
        }),
    }
}

#[test]
fn worker_attempts() {
    let msg = WorkerMessage::Attempts {
        running: vec![("t7".into(), 2)],
    };
    golden("worker_attempts", &msg, "00000006030102743702");
}

#[test]
fn coordinator_assign() {
    let msg = CoordinatorMessage::Assign(Box::new(Assignment {
        task_id: "t7".into(),
        epoch: 2,
        attempt: 2,
        spec: sample_spec(),
        checkpoint: Some("{\"step\":3}".into()),
        kind: drover_protocol::AttemptKind::Work,
        iteration: 2,
        feedback: Some("{\"iteration\":1,\"failed\":[]}".into()),
        secrets: vec![SecretValue {
            name: "github".into(),
            value: Secret("ghp_0123456789".into()),
        }],
    }));
    golden(
        "coordinator_assign",
        &msg,
        "0000012b0202743702020568656c6c6f03027368022d63076563686f20686901\
         084752454554494e470664726f766572010464617461010a6f75742f2a2e6a73\
         6f6e01076161726368363402808080800401010762726f777365720180808080\
         08014001e0d403010103f40302960101808080802003010101c0a90701057465\
         73747302046d616b650474657374e0d403040100020e6170692e676974687562\
         2e636f6d122a2e6578616d706c652e636f6d3a38343433010667697468756201\
         0e6170692e6769746875622e636f6d0d417574686f72697a6174696f6e010e78\
         2d6163636573732d746f6b656e010a7b2273746570223a337d0002011b7b2269\
         7465726174696f6e223a312c226661696c6564223a5b5d7d0106676974687562\
         0e6768705f30313233343536373839",
    );
}

#[test]
fn coordinator_assign_verdict() {
    let msg = CoordinatorMessage::Assign(Box::new(Assignment {
        task_id: "t7".into(),
        epoch: 3,
        attempt: 2,
        spec: sample_spec(),
        checkpoint: None,
        kind: drover_protocol::AttemptKind::Verdict {
            outputs_epoch: Some(2),
        },
        iteration: 0,
        feedback: None,
        secrets: vec![],
    }));
    golden(
        "coordinator_assign_verdict",
        &msg,
        "000000f00202743703020568656c6c6f03027368022d63076563686f20686901\
         084752454554494e470664726f766572010464617461010a6f75742f2a2e6a73\
         6f6e01076161726368363402808080800401010762726f777365720180808080\
         08014001e0d403010103f40302960101808080802003010101c0a90701057465\
         73747302046d616b650474657374e0d403040100020e6170692e676974687562\
         2e636f6d122a2e6578616d706c652e636f6d3a38343433010667697468756201\
         0e6170692e6769746875622e636f6d0d417574686f72697a6174696f6e010e78\
         2d6163636573732d746f6b656e00010102000000",
    );
}

#[test]
fn coordinator_prepare_and_confirm() {
    // The assignment's own encoding is pinned by `coordinator_assign`; a small one here.
    let spec: TaskSpec =
        serde_json::from_str(r#"{"name":"p","command":["true"]}"#).expect("a minimal spec");
    let msg = CoordinatorMessage::Prepare(Box::new(Assignment {
        task_id: "t7".into(),
        epoch: 4,
        attempt: 1,
        spec,
        checkpoint: None,
        kind: drover_protocol::AttemptKind::Work,
        iteration: 0,
        feedback: None,
        secrets: vec![],
    }));
    golden(
        "coordinator_prepare",
        &msg,
        "0000003506027437040101700104747275650000000000000000000180040180\
         dddb01000003e80701c8010000000000030000000000000000",
    );
    let msg = CoordinatorMessage::Confirm {
        task_id: "t7".into(),
        epoch: 4,
    };
    golden("coordinator_confirm", &msg, "000000050702743704");
}

#[test]
fn coordinator_cancel() {
    let msg = CoordinatorMessage::Cancel {
        task_id: "t7".into(),
        epoch: 2,
    };
    golden("coordinator_cancel", &msg, "000000050302743702");
}

#[test]
fn attempt_stream_up_and_down() {
    golden(
        "attempt_open",
        &AttemptUp::Open {
            task_id: "t7".into(),
            epoch: 2,
        },
        "000000050002743702",
    );
    let ev = AttemptEvent {
        seq: 4,
        ts_ms: 1_700_000_000_500,
        kind: "stdout".into(),
        payload: "{\"data\":\"hi\\n\"}".into(),
    };
    golden(
        "attempt_event",
        &AttemptUp::Event(ev),
        "0000001f0104f4d395ffbc31067374646f75740f7b2264617461223a2268695c6e227d",
    );
    golden("attempt_ack", &AttemptDown::Ack { seq: 4 }, "000000020004");
    golden(
        "attempt_fenced",
        &AttemptDown::Fenced {
            reason: "stale epoch".into(),
        },
        "0000000d010b7374616c652065706f6368",
    );
}

#[test]
fn operator_task_requests() {
    golden(
        "request_submit",
        &OperatorRequest::Submit {
            spec: sample_spec(),
        },
        "000000e4030568656c6c6f03027368022d63076563686f206869010847524545\
         54494e470664726f766572010464617461010a6f75742f2a2e6a736f6e010761\
         61726368363402808080800401010762726f77736572018080808008014001e0\
         d403010103f40302960101808080802003010101c0a907010574657374730204\
         6d616b650474657374e0d403040100020e6170692e6769746875622e636f6d12\
         2a2e6578616d706c652e636f6d3a383434330106676974687562010e6170692e\
         6769746875622e636f6d0d417574686f72697a6174696f6e010e782d61636365\
         73732d746f6b656e",
    );
    for (i, state) in TaskState::ALL.into_iter().enumerate() {
        let name = format!("request_list_tasks_{i}");
        golden(
            &name,
            &OperatorRequest::ListTasks { state: Some(state) },
            GOLDEN_LIST_TASKS[i],
        );
    }
    golden(
        "request_list_tasks_all",
        &OperatorRequest::ListTasks { state: None },
        "000000020400",
    );
    golden(
        "request_show_task",
        &OperatorRequest::ShowTask { id: "t7".into() },
        "0000000405027437",
    );
    let events = OperatorRequest::Events {
        id: "t7".into(),
        from: 3,
        to: Some(9),
        limit: 1000,
    };
    golden("request_events", &events, "0000000906027437030109e807");
    golden(
        "request_cancel",
        &OperatorRequest::Cancel { id: "t7".into() },
        "0000000407027437",
    );
}

const GOLDEN_LIST_TASKS: [&str; 8] = [
    "00000003040100",
    "00000003040101",
    "00000003040102",
    "00000003040103",
    "00000003040104",
    "00000003040105",
    "00000003040106",
    "00000003040107",
];

#[test]
fn operator_task_responses() {
    golden(
        "response_submitted",
        &OperatorResponse::Submitted { id: "t7".into() },
        "0000000404027437",
    );
    let exits = [
        ExitClass::Exited(3),
        ExitClass::Signaled(15),
        ExitClass::OomKilled,
        ExitClass::TimedOut,
        ExitClass::Cancelled,
    ];
    for (i, exit) in exits.into_iter().enumerate() {
        let name = format!("response_task_exit_{i}");
        let resp =
            OperatorResponse::Task(Box::new(sample_task_info(TaskState::Failed, Some(exit))));
        golden(&name, &resp, GOLDEN_TASK_EXITS[i]);
    }
    let resp = OperatorResponse::Tasks(vec![sample_task_info(TaskState::Queued, None)]);
    golden(
        "response_tasks",
        &resp,
        "0000014e05010274370568656c6c6f000202010470692d3780d095ffbc3101e8\
         d795ffbc31000121617474656d70742032206f66203320657869746564207769\
         746820636f646520330b0568656c6c6f03027368022d63076563686f20686901\
         084752454554494e470664726f766572010464617461010a6f75742f2a2e6a73\
         6f6e01076161726368363402808080800401010762726f777365720180808080\
         08014001e0d403010103f40302960101808080802003010101c0a90701057465\
         73747302046d616b650474657374e0d403040100020e6170692e676974687562\
         2e636f6d122a2e6578616d706c652e636f6d3a38343433010667697468756201\
         0e6170692e6769746875622e636f6d0d417574686f72697a6174696f6e010e78\
         2d6163636573732d746f6b656e02010574657374730001020831206661696c65\
         640103010470692d38010470692d37010200",
    );
    let ev = SessionEvent {
        task_id: "t7".into(),
        pos: 5,
        epoch: 2,
        seq: Some(1),
        ts_ms: 1_700_000_000_600,
        kind: "exited".into(),
        payload: "{\"class\":{\"exited\":3}}".into(),
    };
    golden(
        "response_events",
        &OperatorResponse::Events {
            events: vec![ev],
            len: 11,
        },
        "0000002e070102743705020101d8d495ffbc3106657869746564167b22636c617373223a7b22657869746564223a337d7d0b",
    );
    let resp = OperatorResponse::CancelRequested {
        id: "t7".into(),
        already_final: true,
    };
    golden("response_cancel_requested", &resp, "000000050802743701");
}

#[test]
fn operator_drain_and_attention() {
    golden(
        "request_drain",
        &OperatorRequest::Drain {
            name: "pi-7".into(),
            deadline_in_ms: Some(600_000),
        },
        "0000000a0c0470692d3701c0cf24",
    );
    golden(
        "request_undrain",
        &OperatorRequest::Undrain {
            name: "pi-7".into(),
        },
        "000000060d0470692d37",
    );
    golden(
        "request_attention",
        &OperatorRequest::Attention,
        "000000010e",
    );
    let drain = DrainInfo {
        since_ms: 1_700_000_000_000,
        deadline_ms: Some(1_700_000_600_000),
    };
    let report = DrainReport {
        name: "pi-7".into(),
        previous: WorkerState::Ready,
        state: WorkerState::Draining,
        drain: Some(drain),
        changed: true,
        running: vec!["t7".into()],
        now_ms: 1_700_000_000_000,
    };
    golden(
        "response_drain",
        &OperatorResponse::Drain(report),
        "000000210c0470692d3700010180d095ffbc3101c09fbaffbc31010102743780\
         d095ffbc31",
    );
    let attention = Attention {
        now_ms: 1_700_000_000_500,
        workers: vec![WorkerNote {
            name: "pi-7".into(),
            state: WorkerState::Draining,
            state_changed_ms: 1_700_000_000_000,
            last_heartbeat_ms: 1_700_000_000_400,
            connected: true,
            drain: Some(drain),
            running: vec!["t7".into()],
        }],
        retrying: vec![RetryingTask {
            id: "t8".into(),
            name: "hello".into(),
            attempts: 1,
            max_attempts: 3,
            reason: "retrying after attempt 1 killed for memory (OOM)".into(),
            not_before_ms: 1_700_000_001_000,
        }],
    };
    golden(
        "response_attention",
        &OperatorResponse::Attention(attention),
        "000000700df4d395ffbc31010470692d370180d095ffbc3190d395ffbc310101\
         80d095ffbc3101c09fbaffbc3101027437010274380568656c6c6f0103307265\
         747279696e6720616674657220617474656d70742031206b696c6c656420666f\
         72206d656d6f727920284f4f4d29e8d795ffbc31",
    );
}

const GOLDEN_TASK_EXITS: [&str; 5] = [
    "0000014f060274370568656c6c6f030202010470692d3780d095ffbc3101e8d7\
         95ffbc310100060121617474656d70742032206f662033206578697465642077\
         69746820636f646520330b0568656c6c6f03027368022d63076563686f206869\
         01084752454554494e470664726f766572010464617461010a6f75742f2a2e6a\
         736f6e01076161726368363402808080800401010762726f7773657201808080\
         8008014001e0d403010103f40302960101808080802003010101c0a907010574\
         6573747302046d616b650474657374e0d403040100020e6170692e6769746875\
         622e636f6d122a2e6578616d706c652e636f6d3a383434330106676974687562\
         010e6170692e6769746875622e636f6d0d417574686f72697a6174696f6e010e\
         782d6163636573732d746f6b656e02010574657374730001020831206661696c\
         65640103010470692d38010470692d37010200",
    "0000014f060274370568656c6c6f030202010470692d3780d095ffbc3101e8d7\
         95ffbc3101011e0121617474656d70742032206f662033206578697465642077\
         69746820636f646520330b0568656c6c6f03027368022d63076563686f206869\
         01084752454554494e470664726f766572010464617461010a6f75742f2a2e6a\
         736f6e01076161726368363402808080800401010762726f7773657201808080\
         8008014001e0d403010103f40302960101808080802003010101c0a907010574\
         6573747302046d616b650474657374e0d403040100020e6170692e6769746875\
         622e636f6d122a2e6578616d706c652e636f6d3a383434330106676974687562\
         010e6170692e6769746875622e636f6d0d417574686f72697a6174696f6e010e\
         782d6163636573732d746f6b656e02010574657374730001020831206661696c\
         65640103010470692d38010470692d37010200",
    "0000014e060274370568656c6c6f030202010470692d3780d095ffbc3101e8d7\
         95ffbc3101020121617474656d70742032206f66203320657869746564207769\
         746820636f646520330b0568656c6c6f03027368022d63076563686f20686901\
         084752454554494e470664726f766572010464617461010a6f75742f2a2e6a73\
         6f6e01076161726368363402808080800401010762726f777365720180808080\
         08014001e0d403010103f40302960101808080802003010101c0a90701057465\
         73747302046d616b650474657374e0d403040100020e6170692e676974687562\
         2e636f6d122a2e6578616d706c652e636f6d3a38343433010667697468756201\
         0e6170692e6769746875622e636f6d0d417574686f72697a6174696f6e010e78\
         2d6163636573732d746f6b656e02010574657374730001020831206661696c65\
         640103010470692d38010470692d37010200",
    "0000014e060274370568656c6c6f030202010470692d3780d095ffbc3101e8d7\
         95ffbc3101030121617474656d70742032206f66203320657869746564207769\
         746820636f646520330b0568656c6c6f03027368022d63076563686f20686901\
         084752454554494e470664726f766572010464617461010a6f75742f2a2e6a73\
         6f6e01076161726368363402808080800401010762726f777365720180808080\
         08014001e0d403010103f40302960101808080802003010101c0a90701057465\
         73747302046d616b650474657374e0d403040100020e6170692e676974687562\
         2e636f6d122a2e6578616d706c652e636f6d3a38343433010667697468756201\
         0e6170692e6769746875622e636f6d0d417574686f72697a6174696f6e010e78\
         2d6163636573732d746f6b656e02010574657374730001020831206661696c65\
         640103010470692d38010470692d37010200",
    "0000014e060274370568656c6c6f030202010470692d3780d095ffbc3101e8d7\
         95ffbc3101040121617474656d70742032206f66203320657869746564207769\
         746820636f646520330b0568656c6c6f03027368022d63076563686f20686901\
         084752454554494e470664726f766572010464617461010a6f75742f2a2e6a73\
         6f6e01076161726368363402808080800401010762726f777365720180808080\
         08014001e0d403010103f40302960101808080802003010101c0a90701057465\
         73747302046d616b650474657374e0d403040100020e6170692e676974687562\
         2e636f6d122a2e6578616d706c652e636f6d3a38343433010667697468756201\
         0e6170692e6769746875622e636f6d0d417574686f72697a6174696f6e010e78\
         2d6163636573732d746f6b656e02010574657374730001020831206661696c65\
         640103010470692d38010470692d37010200",
];

#[test]
fn archive_transfers() {
    golden(
        "attempt_fetch_inputs",
        &AttemptUp::FetchInputs {
            task_id: "t7".into(),
            epoch: 2,
        },
        "000000050202743702",
    );
    golden(
        "attempt_put_outputs",
        &AttemptUp::PutOutputs {
            task_id: "t7".into(),
            epoch: 2,
            archive_bytes: 10240,
        },
        "0000000703027437028050",
    );
    golden(
        "attempt_up_chunk",
        &AttemptUp::Chunk {
            data: vec![1, 2, 255],
        },
        "0000000504030102ff",
    );
    golden(
        "attempt_inputs",
        &AttemptDown::Inputs {
            archive_bytes: 10240,
            sha256: "ab".repeat(32),
        },
        "0000004402805040616261626162616261626162616261626162616261626162\
         6162616261626162616261626162616261626162616261626162616261626162\
         6162616261626162",
    );
    golden(
        "attempt_down_chunk",
        &AttemptDown::Chunk { data: vec![0, 7] },
        "0000000403020007",
    );
    golden(
        "attempt_outputs_stored",
        &AttemptDown::OutputsStored {
            files: 3,
            bytes: 300,
            sha256: "cd".repeat(32),
        },
        "000000450403ac02406364636463646364636463646364636463646364636463\
         6463646364636463646364636463646364636463646364636463646364636463\
         646364636463646364",
    );
    golden(
        "attempt_refused",
        &AttemptDown::Refused {
            reason: "too big".into(),
        },
        "000000090507746f6f20626967",
    );
    golden(
        "request_submit_with_inputs",
        &OperatorRequest::SubmitWithInputs {
            spec: sample_spec(),
            archive_bytes: 2048,
        },
        "000000e6080568656c6c6f03027368022d63076563686f206869010847524545\
         54494e470664726f766572010464617461010a6f75742f2a2e6a736f6e010761\
         61726368363402808080800401010762726f77736572018080808008014001e0\
         d403010103f40302960101808080802003010101c0a907010574657374730204\
         6d616b650474657374e0d403040100020e6170692e6769746875622e636f6d12\
         2a2e6578616d706c652e636f6d3a383434330106676974687562010e6170692e\
         6769746875622e636f6d0d417574686f72697a6174696f6e010e782d61636365\
         73732d746f6b656e8010",
    );
    golden(
        "request_chunk",
        &OperatorRequest::Chunk { data: vec![9] },
        "00000003090109",
    );
    golden(
        "request_list_outputs",
        &OperatorRequest::ListOutputs { id: "t7".into() },
        "000000040a027437",
    );
    golden(
        "request_fetch_outputs",
        &OperatorRequest::FetchOutputs {
            id: "t7".into(),
            attempt: Some(2),
        },
        "000000060b0274370102",
    );
    let info = OutputsInfo {
        task_id: "t7".into(),
        attempt: 2,
        epoch: 2,
        files: 3,
        bytes: 300,
        archive_bytes: 4096,
        sha256: "ef".repeat(32),
        stored_ms: 1_700_000_000_700,
    };
    golden(
        "response_outputs",
        &OperatorResponse::Outputs(vec![info.clone()]),
        "000000530901027437020203ac02802040656665666566656665666566656665\
         6665666566656665666566656665666566656665666566656665666566656665\
         6665666566656665666566656665666566bcd595ffbc31",
    );
    golden(
        "response_outputs_archive",
        &OperatorResponse::OutputsArchive(info),
        "000000520a027437020203ac0280204065666566656665666566656665666566\
         6566656665666566656665666566656665666566656665666566656665666566\
         65666566656665666566656665666566bcd595ffbc31",
    );
    golden(
        "response_chunk",
        &OperatorResponse::Chunk { data: vec![5, 6] },
        "000000040b020506",
    );
}

#[test]
fn enrollment_and_certificate_lifecycle() {
    use drover_protocol::{EnrollReply, EnrollRequest, RevocationReport, TokenInfo};
    let req = EnrollRequest {
        versions: SUPPORTED_VERSIONS,
        token: "0a1b.c2d3".into(),
        csr_pem: "CSR".into(),
        software: "w 1".into(),
    };
    golden(
        "enroll_request",
        &req,
        "00000014060609306131622e633264330343535203772031",
    );
    let issued = EnrollReply::Issued {
        name: "pi-7".into(),
        cert_pem: "C".into(),
        ca_pem: "A".into(),
        not_after_ms: 1_700_000_000_000,
    };
    golden(
        "enroll_reply_issued",
        &issued,
        "00000010000470692d370143014180d095ffbc31",
    );
    let refused = EnrollReply::Refused {
        reason: "no".into(),
    };
    golden("enroll_reply_refused", &refused, "0000000401026e6f");
    golden(
        "worker_renew",
        &WorkerMessage::Renew {
            csr_pem: "CSR".into(),
        },
        "000000050403435352",
    );
    golden(
        "coordinator_renewed",
        &CoordinatorMessage::Renewed {
            cert_pem: "C".into(),
            not_after_ms: 1_700_000_000_000,
        },
        "0000000904014380d095ffbc31",
    );
    golden(
        "coordinator_renew_refused",
        &CoordinatorMessage::RenewRefused {
            reason: "no".into(),
        },
        "0000000405026e6f",
    );
    let info = TokenInfo {
        id: "0a1b".into(),
        label: Some("rack".into()),
        name: None,
        max_uses: 2,
        uses: 1,
        created_ms: 1_700_000_000_000,
        expires_ms: 1_700_000_360_000,
        revoked: false,
    };
    golden(
        "operator_create_token",
        &OperatorRequest::CreateToken {
            ttl_ms: 3_600_000,
            max_uses: 1,
            label: Some("rack".into()),
            name: Some("pi-7".into()),
        },
        "000000120f80dddb010101047261636b010470692d37",
    );
    golden(
        "operator_list_tokens",
        &OperatorRequest::ListTokens,
        "0000000110",
    );
    golden(
        "operator_revoke_token",
        &OperatorRequest::RevokeToken { id: "0a1b".into() },
        "00000006110430613162",
    );
    golden(
        "operator_revoke_worker",
        &OperatorRequest::RevokeWorker {
            name: "pi-7".into(),
        },
        "00000006120470692d37",
    );
    golden(
        "operator_reinstate_worker",
        &OperatorRequest::ReinstateWorker {
            name: "pi-7".into(),
        },
        "00000006130470692d37",
    );
    golden(
        "operator_token_created",
        &OperatorResponse::TokenCreated {
            token: "0a1b.c2d3".into(),
            info: Box::new(info.clone()),
            ca_fingerprint: "ff".into(),
        },
        "000000290e09306131622e63326433043061316201047261636b00020180d095ffbc31c0ccabffbc3100026666",
    );
    golden(
        "operator_tokens",
        &OperatorResponse::Tokens(vec![info]),
        "0000001d0f01043061316201047261636b00020180d095ffbc31c0ccabffbc3100",
    );
    golden(
        "operator_token_revoked",
        &OperatorResponse::TokenRevoked {
            id: "0a1b".into(),
            changed: true,
        },
        "0000000710043061316201",
    );
    golden(
        "operator_revocation",
        &OperatorResponse::Revocation(RevocationReport {
            name: "pi-7".into(),
            revoked: true,
            changed: true,
            disconnected: true,
            certificates: 2,
        }),
        "0000000a110470692d3701010102",
    );
}

#[test]
fn secrets_and_egress() {
    for (name, policy, hex) in [
        ("network_none", NetworkPolicy::None, "0000000100"),
        ("network_host", NetworkPolicy::Host, "0000000101"),
        ("network_proxy", NetworkPolicy::Proxy, "0000000102"),
    ] {
        golden(name, &policy, hex);
    }
    for (name, scheme, hex) in [
        ("scheme_bearer", SecretScheme::Bearer, "0000000100"),
        (
            "scheme_basic",
            SecretScheme::Basic {
                username: "u".into(),
            },
            "00000003010175",
        ),
        ("scheme_raw", SecretScheme::Raw, "0000000102"),
    ] {
        golden(name, &scheme, hex);
    }
    golden(
        "operator_set_secret",
        &OperatorRequest::SetSecret {
            name: "github".into(),
            value: Secret("ghp_0123456789".into()),
        },
        "0000001714066769746875620e6768705f30313233343536373839",
    );
    golden(
        "operator_list_secrets",
        &OperatorRequest::ListSecrets,
        "0000000115",
    );
    golden(
        "operator_remove_secret",
        &OperatorRequest::RemoveSecret {
            name: "github".into(),
        },
        "000000081606676974687562",
    );
    let info = SecretInfo {
        name: "github".into(),
        created_ms: 1_700_000_000_000,
        updated_ms: 1_700_000_005_000,
        version: 2,
    };
    golden(
        "operator_secret_set",
        &OperatorResponse::SecretSet {
            info: info.clone(),
            created: false,
        },
        "00000016120667697468756280d095ffbc3188f795ffbc310200",
    );
    golden(
        "operator_secrets",
        &OperatorResponse::Secrets(vec![info]),
        "0000001613010667697468756280d095ffbc3188f795ffbc3102",
    );
    golden(
        "operator_secret_removed",
        &OperatorResponse::SecretRemoved {
            name: "github".into(),
            changed: true,
        },
        "00000009140667697468756201",
    );
}
