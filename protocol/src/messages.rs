//! Message types for every direction on the link.
//!
//! - Worker control stream: the worker sends [`WorkerMessage`], the coordinator sends
//!   [`CoordinatorMessage`].
//! - Operator streams: one [`OperatorRequest`] per stream, answered by one [`OperatorResponse`].
//!
//! The operator-facing records ([`WorkerInfo`], [`FleetSummary`], [`ResourceReport`], ...) are
//! also the CLI's `--json` schema (see docs/json-schema.md), so field names are part of the
//! stable interface: add fields only at the end, and only with a protocol version bump.
//! Times are milliseconds since the Unix epoch (`*_ms`), sizes are bytes (`*_bytes`).

use serde::{Deserialize, Serialize};

/// The cgroup hierarchy a worker found at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupVersion {
    /// Unified hierarchy only (cgroup2 at /sys/fs/cgroup).
    V2,
    /// Legacy controllers (memory at /sys/fs/cgroup/memory), possibly with a cgroup2 mount beside.
    V1,
    /// No usable cgroup hierarchy.
    None,
}

/// Who made a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuVendor {
    Nvidia,
    /// NVIDIA Jetson / Tegra integrated GPU, found from the device tree.
    NvidiaTegra,
    Other,
}

/// One GPU on a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub vendor: GpuVendor,
    pub model: String,
    /// Dedicated memory when known (integrated GPUs share system memory: `None`).
    pub memory_bytes: Option<u64>,
}

/// Load averages over 1, 5 and 15 minutes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct LoadAvg {
    pub one: f32,
    pub five: f32,
    pub fifteen: f32,
}

/// What a worker has, sent once at registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceReport {
    /// `x86_64`, `aarch64`, ... (as `uname -m` prints it).
    pub arch: String,
    /// Operating system name and version, e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub os: String,
    pub kernel: String,
    pub hostname: String,
    pub cpu_count: u32,
    pub cpu_model: String,
    pub load: LoadAvg,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// The filesystem holding the worker's work directory.
    pub work_dir: String,
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub gpus: Vec<Gpu>,
    pub cgroup: CgroupVersion,
    /// Whether the worker could create user/pid/mount/net namespaces when it started.
    pub namespaces: bool,
    /// Labels from the worker's config plus detected ones (`browser`, `gpu`), sorted, unique.
    pub labels: Vec<String>,
}

/// Current usage, sent with every heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Usage {
    pub load: LoadAvg,
    /// Whole-machine CPU use since the previous heartbeat, 0-100 per machine (not per core).
    pub cpu_percent: f32,
    pub memory_available_bytes: u64,
    pub disk_free_bytes: u64,
}

/// Worker → coordinator, on the worker's control stream (after the handshake).
#[allow(clippy::large_enum_variant)] // Register is sent once per connection; boxing buys nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerMessage {
    /// First message after the handshake. The worker's name comes from its certificate.
    Register { resources: ResourceReport },
    /// Liveness and current usage; renews the worker's lease.
    Heartbeat { seq: u64, usage: Usage },
    /// The worker is stopping on purpose: mark it `down`, not `lost`.
    Goodbye { reason: String },
    /// Sent right after registration: the attempts (task id, epoch) this worker is running
    /// (those kept through a disconnect are reattached); again later whenever an attempt ended
    /// without delivering its events. Attempts the coordinator had assigned to it that are not
    /// listed are over; listed ones that are not current are to be killed.
    Attempts { running: Vec<(String, u64)> },
    /// Ask for a new certificate before the current one expires: a CSR (PEM) for a new key,
    /// with the worker's own name. Answered by [`CoordinatorMessage::Renewed`] or
    /// [`CoordinatorMessage::RenewRefused`]; the new certificate is used from the next
    /// connection on.
    Renew { csr_pem: String },
}

/// Worker → coordinator on an attempt stream: one bidirectional stream per running attempt,
/// opened by the worker, so a chatty task never stalls another or the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptUp {
    /// First frame: which attempt this stream carries.
    Open { task_id: String, epoch: u64 },
    /// One event of the attempt, in `seq` order from 0. After a reconnect the worker resends
    /// every event not yet acknowledged; the coordinator stores each (task, epoch, seq) once.
    Event(AttemptEvent),
    /// First frame of an *inputs* stream (one per attempt whose spec has inputs): send this
    /// attempt's inputs archive. Answered by [`AttemptDown::Inputs`] and its chunks, or by
    /// [`AttemptDown::Fenced`] / [`AttemptDown::Refused`].
    FetchInputs { task_id: String, epoch: u64 },
    /// First frame of an *outputs* stream: the attempt's outputs archive (a tar stream of
    /// `archive_bytes` bytes) follows in [`AttemptUp::Chunk`] frames. Answered by
    /// [`AttemptDown::OutputsStored`] once durable, or [`AttemptDown::Fenced`] (stale epoch) /
    /// [`AttemptDown::Refused`].
    PutOutputs {
        task_id: String,
        epoch: u64,
        archive_bytes: u64,
    },
    /// Part of an archive, at most [`crate::task::ARCHIVE_CHUNK_BYTES`] bytes.
    Chunk {
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
}

/// One event produced on a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptEvent {
    pub seq: u64,
    pub ts_ms: u64,
    /// `started`, `stdout`, `stderr`, `exited`, or a task-written type (`tool_called`,
    /// `file_written`, `checkpoint`, `progress`, `custom`), or `error` for a malformed line.
    pub kind: String,
    /// Type-specific JSON text.
    pub payload: String,
}

/// Coordinator → worker on an attempt stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptDown {
    /// Every event with a seq up to and including this one is durable.
    Ack { seq: u64 },
    /// This attempt is no longer current (a newer epoch exists, or it was never assigned to
    /// this worker): stop it, and send nothing more for it.
    Fenced { reason: String },
    /// The inputs archive of the attempt follows in [`AttemptDown::Chunk`] frames:
    /// `archive_bytes` bytes whose SHA-256 is `sha256` (lowercase hex).
    Inputs { archive_bytes: u64, sha256: String },
    /// Part of an archive, at most [`crate::task::ARCHIVE_CHUNK_BYTES`] bytes.
    Chunk {
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    /// The outputs archive is durable on the coordinator: `files` regular files holding
    /// `bytes` bytes, stored as the archive with this SHA-256.
    OutputsStored {
        files: u64,
        bytes: u64,
        sha256: String,
    },
    /// The transfer was refused for a reason other than fencing (over a limit, not a valid
    /// archive, no inputs stored, the store failed); the reason is for the operator.
    Refused { reason: String },
}

/// Coordinator → worker, on the worker's control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorMessage {
    /// Registration accepted. The worker heartbeats at `heartbeat_interval_ms` (or faster) and
    /// is declared lost after `lease_ms` without one.
    Registered {
        name: String,
        heartbeat_interval_ms: u64,
        lease_ms: u64,
    },
    /// Acknowledges the heartbeat with this `seq`; lets the worker measure its lease renewal.
    HeartbeatAck { seq: u64 },
    /// Run an attempt. The epoch is durable on the coordinator before this is sent.
    Assign(Box<Assignment>),
    /// Stop this attempt (cancelled, or fenced by a newer epoch).
    Cancel { task_id: String, epoch: u64 },
    /// The renewed certificate (PEM) and its expiry, ms since the Unix epoch.
    Renewed { cert_pem: String, not_after_ms: u64 },
    /// Renewal refused (no CA key on the coordinator, bad request); the worker retries later.
    RenewRefused { reason: String },
    /// Get an attempt ready, but run nothing of it: its epoch is not durable yet (v6). The
    /// worker may make the workspace, fetch inputs and so on, but starts no process and sends
    /// no event until [`CoordinatorMessage::Confirm`] for it arrives on the same connection.
    /// If the connection ends first, or no confirm comes within the worker's bound, the
    /// attempt is dropped without a trace (the coordinator may not know its epoch after a
    /// restart, and may give that epoch to another attempt).
    Prepare(Box<Assignment>),
    /// The epoch of a prepared attempt is durable now: run it (v6).
    Confirm { task_id: String, epoch: u64 },
}

/// One attempt to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub task_id: String,
    /// Fences this attempt: events of an older epoch are refused.
    pub epoch: u64,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub spec: crate::task::TaskSpec,
    /// Payload of the last checkpoint event of earlier attempts, if any.
    pub checkpoint: Option<String>,
    /// A task's own work, or the independent verdict on it.
    pub kind: AttemptKind,
    /// The acceptance loop's iteration to start at (from the session, so an attempt that
    /// replaces a dead one resumes where it was); 0 or 1 for the first.
    pub iteration: u32,
    /// The feedback file of that iteration (JSON [`crate::acceptance::Feedback`]), if it is
    /// not the first.
    pub feedback: Option<String>,
    /// The values of the secrets the spec grants, for the worker's egress proxy (work
    /// attempts only; never spooled, logged or shown to the task).
    pub secrets: Vec<crate::secrets::SecretValue>,
}

/// What an attempt is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptKind {
    /// Run the task's command (and its acceptance loop).
    #[default]
    Work,
    /// Run only the verdict's criteria, in a workspace holding the outputs that attempt
    /// `outputs_epoch` stored (fetched like inputs); `None`: an empty workspace.
    Verdict { outputs_epoch: Option<u64> },
}

/// A worker's state in the fleet registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Connected and heartbeating; eligible for new work.
    Ready,
    /// Connected, finishing what it has, taking nothing new.
    Draining,
    /// Missed heartbeats for longer than its lease.
    Lost,
    /// Disconnected cleanly (it said goodbye).
    Down,
}

impl WorkerState {
    pub const ALL: [WorkerState; 4] = [
        WorkerState::Ready,
        WorkerState::Draining,
        WorkerState::Lost,
        WorkerState::Down,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
            WorkerState::Lost => "lost",
            WorkerState::Down => "down",
        }
    }
}

impl core::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::str::FromStr for WorkerState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WorkerState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown worker state {s:?}: expected ready, draining, lost or down")
            })
    }
}

/// Everything the coordinator knows of one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Identity, from the worker's certificate.
    pub name: String,
    pub state: WorkerState,
    /// Whether a control connection is open right now.
    pub connected: bool,
    /// Remote address of the latest connection, `ip:port`.
    pub address: String,
    /// The worker's software, e.g. `drover-worker 0.1.0`.
    pub version: String,
    pub protocol_version: u16,
    pub first_seen_ms: u64,
    /// When the worker last registered.
    pub registered_ms: u64,
    pub state_changed_ms: u64,
    /// When the last heartbeat (or registration) arrived.
    pub last_heartbeat_ms: u64,
    /// Age of the last heartbeat when this record was produced.
    pub last_heartbeat_age_ms: u64,
    pub resources: ResourceReport,
    /// Latest usage from a heartbeat (the registration's figures until the first one).
    pub usage: Usage,
}

/// Totals over a set of workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Capacity {
    pub cpus: u64,
    pub memory_bytes: u64,
    pub gpus: u64,
}

/// Worker counts by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StateCounts {
    pub ready: u32,
    pub draining: u32,
    pub lost: u32,
    pub down: u32,
}

/// The answer to `drover status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSummary {
    pub coordinator_version: String,
    pub now_ms: u64,
    pub workers: StateCounts,
    /// Capacity of ready and draining workers.
    pub total: Capacity,
    /// Of `total`, what is not reserved by running attempts (memory: what workers report
    /// available).
    pub free: Capacity,
}

/// Operator → coordinator: one request per bidirectional stream.
#[allow(clippy::large_enum_variant)] // One request per stream; boxing Submit's spec buys nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorRequest {
    FleetStatus,
    ListWorkers {
        state: Option<WorkerState>,
        label: Option<String>,
    },
    ShowWorker {
        name: String,
    },
    Submit {
        spec: crate::task::TaskSpec,
    },
    ListTasks {
        state: Option<crate::task::TaskState>,
    },
    ShowTask {
        id: String,
    },
    /// Events `from..to` of a session (end exclusive; `None`: to the end), at most `limit`.
    Events {
        id: String,
        from: u64,
        to: Option<u64>,
        limit: u32,
    },
    Cancel {
        id: String,
    },
    /// Submit a spec with its inputs: a tar archive of `archive_bytes` bytes follows in
    /// [`OperatorRequest::Chunk`] frames on the same stream; the answer
    /// ([`OperatorResponse::Submitted`] or an error) comes after the last one.
    SubmitWithInputs {
        spec: crate::task::TaskSpec,
        archive_bytes: u64,
    },
    /// Part of an archive sent after [`OperatorRequest::SubmitWithInputs`].
    Chunk {
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    /// The outputs each attempt of a task stored (answered by [`OperatorResponse::Outputs`]).
    ListOutputs {
        id: String,
    },
    /// One attempt's outputs archive (`None`: the last attempt that stored outputs). Answered
    /// by [`OperatorResponse::OutputsArchive`] followed by [`OperatorResponse::Chunk`] frames
    /// holding its `archive_bytes` bytes, or by an error.
    FetchOutputs {
        id: String,
        attempt: Option<u32>,
    },
    /// Stop placing work on a worker; attempts still running `deadline_in_ms` from now (`None`:
    /// no deadline) are rescheduled elsewhere without counting against their retry budget.
    Drain {
        name: String,
        /// How long running attempts may take from now, ms.
        deadline_in_ms: Option<u64>,
    },
    /// Make a drained worker eligible for work again.
    Undrain {
        name: String,
    },
    /// What needs an operator's eye: lost and draining workers, retrying tasks.
    Attention,
    /// Make a join token valid for `ttl_ms` and `max_uses` enrollments; `name` fixes the
    /// worker name it enrolls. Answered by [`OperatorResponse::TokenCreated`].
    CreateToken {
        ttl_ms: u64,
        max_uses: u32,
        label: Option<String>,
        name: Option<String>,
    },
    /// Every join token not yet expired or used up (answered by [`OperatorResponse::Tokens`]).
    ListTokens,
    /// Make a join token unusable.
    RevokeToken {
        id: String,
    },
    /// Refuse a worker's certificates from now on and close its connection.
    RevokeWorker {
        name: String,
    },
    /// Let a revoked worker name enroll again (its old certificates stay refused).
    ReinstateWorker {
        name: String,
    },
    /// Store a secret (encrypted at rest), replacing one of the same name. Answered by
    /// [`OperatorResponse::SecretSet`]; the value is never sent back by any request.
    SetSecret {
        name: String,
        value: crate::secrets::Secret,
    },
    /// Names and dates of the stored secrets (answered by [`OperatorResponse::Secrets`]).
    ListSecrets,
    /// Forget a secret; tasks that grant it fail to start from then on.
    RemoveSecret {
        name: String,
    },
}

/// A worker's drain, as the registry keeps it (it survives coordinator restarts and the
/// worker's reconnects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainInfo {
    /// When the drain was asked for.
    pub since_ms: u64,
    /// When attempts still running are rescheduled; `None`: they may run to their end.
    pub deadline_ms: Option<u64>,
}

/// The answer to `drover drain` and `drover undrain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    pub name: String,
    /// The worker's state before the command.
    pub previous: WorkerState,
    /// Its state now (a lost or down worker keeps its state; the drain applies when it
    /// comes back).
    pub state: WorkerState,
    /// The drain in force now (`None` after an undrain).
    pub drain: Option<DrainInfo>,
    /// Whether anything changed (false: it was already so).
    pub changed: bool,
    /// Tasks with an attempt running on the worker now.
    pub running: Vec<String>,
    pub now_ms: u64,
}

/// A lost or draining worker, for `drover status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerNote {
    pub name: String,
    pub state: WorkerState,
    pub state_changed_ms: u64,
    pub last_heartbeat_ms: u64,
    pub connected: bool,
    pub drain: Option<DrainInfo>,
    /// Tasks with an attempt running there.
    pub running: Vec<String>,
}

/// A queued task whose earlier attempt ended without success, for `drover status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryingTask {
    pub id: String,
    pub name: String,
    /// Attempts started so far.
    pub attempts: u32,
    pub max_attempts: u32,
    /// Why the last attempt ended and what happens next.
    pub reason: String,
    /// The retry does not start before this time.
    pub not_before_ms: u64,
}

/// The answer to [`OperatorRequest::Attention`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attention {
    pub now_ms: u64,
    /// Lost and draining workers (and down workers with a pending drain), by name.
    pub workers: Vec<WorkerNote>,
    /// Retrying tasks in submission order.
    pub retrying: Vec<RetryingTask>,
}

/// What kind of failure an [`OperatorResponse::Error`] is; the CLI maps it to an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    InvalidRequest,
    Internal,
}

/// Coordinator → operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OperatorResponse {
    FleetStatus(FleetSummary),
    Workers(Vec<WorkerInfo>),
    Worker(Box<WorkerInfo>),
    Error {
        kind: ErrorKind,
        message: String,
    },
    Submitted {
        id: String,
    },
    Tasks(Vec<crate::task::TaskInfo>),
    Task(Box<crate::task::TaskInfo>),
    /// A slice of a session; `len` is the session's length when answered.
    Events {
        events: Vec<crate::task::SessionEvent>,
        len: u64,
    },
    /// The task was asked to stop (or had already ended: `already_final`).
    CancelRequested {
        id: String,
        already_final: bool,
    },
    /// Stored outputs of a task, one record per attempt that stored any, oldest first.
    Outputs(Vec<crate::task::OutputsInfo>),
    /// The outputs archive described here follows in [`OperatorResponse::Chunk`] frames.
    OutputsArchive(crate::task::OutputsInfo),
    /// Part of an archive.
    Chunk {
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    /// The worker's drain after `Drain` or `Undrain`.
    Drain(DrainReport),
    Attention(Attention),
    /// A new join token: `token` is shown once and never stored; `ca_fingerprint` is the
    /// SHA-256 of the fleet CA certificate (DER, lowercase hex) a new worker pins.
    TokenCreated {
        token: String,
        info: Box<crate::enroll::TokenInfo>,
        ca_fingerprint: String,
    },
    Tokens(Vec<crate::enroll::TokenInfo>),
    /// After `RevokeToken`.
    TokenRevoked {
        id: String,
        changed: bool,
    },
    /// After `RevokeWorker` or `ReinstateWorker`.
    Revocation(crate::enroll::RevocationReport),
    /// After `SetSecret`: `created` is false when an existing secret was replaced.
    SecretSet {
        info: crate::secrets::SecretInfo,
        created: bool,
    },
    Secrets(Vec<crate::secrets::SecretInfo>),
    /// After `RemoveSecret`.
    SecretRemoved {
        name: String,
        changed: bool,
    },
}

/// QUIC application close codes. Part of the wire contract.
pub mod close_code {
    /// The peer is stopping on purpose (worker shutdown, CLI done).
    pub const GOODBYE: u32 = 0;
    /// The handshake was refused; the reason went in [`crate::HelloReply::Refused`] or the log.
    pub const REFUSED: u32 = 1;
    /// The peer broke the protocol (malformed or oversized frame, unexpected message).
    pub const PROTOCOL_ERROR: u32 = 2;
    /// A newer connection with the same identity replaced this one.
    pub const REPLACED: u32 = 3;
    /// The coordinator is shutting down; workers reconnect with backoff.
    pub const SHUTDOWN: u32 = 4;
    /// The peer's certificate was revoked (`drover worker revoke`); it must not reconnect.
    pub const REVOKED: u32 = 5;
}
