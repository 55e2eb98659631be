//! Tasks on the wire: the spec a submitter writes, the requirements placement matches, the
//! limits the sandbox enforces, and the events an attempt produces.
//!
//! The spec is serde-friendly for TOML/JSON files (docs/task-spec.md) and postcard for the
//! wire; for the postcard side the usual rule holds: append fields and variants only.
//! Sizes are bytes, durations milliseconds.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most bytes of file content a task's inputs may hold in all: 64 MiB. Larger data belongs
/// elsewhere (fetched by the task with `network = "host"`, or kept on the worker).
pub const MAX_INPUT_BYTES: u64 = 64 << 20;

/// Most bytes an inputs archive may have on the wire: the content limit plus room for tar
/// headers (512 bytes per entry, padding to 512-byte blocks).
pub const MAX_INPUT_ARCHIVE_BYTES: u64 = MAX_INPUT_BYTES + (8 << 20);

/// Most bytes of file content one attempt's outputs may hold: 256 MiB. Files past it are not
/// stored, and the session says so (`outputs_over_limit`).
pub const MAX_OUTPUT_BYTES: u64 = 256 << 20;

/// Most files one attempt's outputs may hold.
pub const MAX_OUTPUT_FILES: u64 = 10_000;

/// Most bytes an outputs archive may have on the wire: the content limit plus tar headers
/// for [`MAX_OUTPUT_FILES`] files (each at most 3 KiB of headers and padding with a long name).
pub const MAX_OUTPUT_ARCHIVE_BYTES: u64 = MAX_OUTPUT_BYTES + MAX_OUTPUT_FILES * 3 * 1024 + 1024;

/// Largest archive chunk in one frame (well under the 1 MiB frame limit).
pub const ARCHIVE_CHUNK_BYTES: usize = 256 * 1024;

/// Where a task needs to run. Every field is a lower bound or an exact match; empty means
/// "anything".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Requirements {
    /// Exact `uname -m`, e.g. `aarch64`.
    pub arch: Option<String>,
    /// Logical CPUs reserved for the attempt.
    pub cpus: u32,
    /// Memory reserved for the attempt, bytes.
    pub memory_bytes: u64,
    /// GPUs reserved for the attempt.
    pub gpus: u32,
    /// Labels the worker must all carry, e.g. `browser`.
    pub labels: Vec<String>,
}

/// Limits the sandbox enforces on one attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Memory limit (cgroup), bytes; `None`: the requirement's `memory_bytes` if set, else none.
    pub memory_bytes: Option<u64>,
    /// Most processes/threads at once (cgroup pids). Default 512.
    pub pids: Option<u32>,
    /// Wall-clock limit, ms; the attempt is killed and classified `timed_out` past it.
    /// Default one hour.
    pub wall_time_ms: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: None,
            pids: Some(512),
            wall_time_ms: Some(3_600_000),
        }
    }
}

/// Network access of the sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkPolicy {
    /// A new network namespace with only loopback.
    #[default]
    None,
    /// The host's network.
    Host,
    /// A new network namespace whose only way out is the worker's egress proxy on
    /// `127.0.0.1:3128` (`HTTP_PROXY`/`HTTPS_PROXY` point at it): HTTP(S) to the hosts of the
    /// spec's `egress` list, with the credentials its `secrets` grant added on the way out.
    /// Sandbox isolation only.
    Proxy,
}

/// How strongly an attempt is isolated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// New pid, mount, uts, ipc and network namespaces, private /tmp, cgroup limits.
    #[default]
    Sandbox,
    /// A plain child process with cgroup limits, for trusted work.
    Process,
}

/// What an attempt that ends `oom_killed` leads to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OomPolicy {
    /// The task fails at once, whatever attempts are left.
    Fail,
    /// Retried like any other failure, with the same memory.
    #[default]
    Retry,
    /// Retried with the memory limit (and the memory reserved for placement) multiplied by
    /// [`RetryPolicy::memory_factor_percent`], up to [`RetryPolicy::memory_ceiling_bytes`].
    RetryWithMoreMemory,
}

/// Retries after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. Default 3.
    pub max_attempts: u32,
    /// Delay before the second attempt, ms; doubles each time. Default 1000.
    pub backoff_ms: u64,
    /// What an OOM kill leads to. Default [`OomPolicy::Retry`].
    pub on_oom: OomPolicy,
    /// Under [`OomPolicy::RetryWithMoreMemory`], the memory of the next attempt as a percentage
    /// of the last one's (200: twice as much). Default 200.
    pub memory_factor_percent: u32,
    /// Under [`OomPolicy::RetryWithMoreMemory`], the most memory an attempt gets, bytes;
    /// `None`: no ceiling but the workers'.
    pub memory_ceiling_bytes: Option<u64>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_ms: 1000,
            on_oom: OomPolicy::Retry,
            memory_factor_percent: 200,
            memory_ceiling_bytes: None,
        }
    }
}

/// What a submitter asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// A short human name; need not be unique.
    pub name: String,
    /// argv; the first element is looked up on the sandbox's PATH.
    pub command: Vec<String>,
    /// The whole environment of the task besides `DROVER_*`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Files and directories to ship into the workspace (paths relative to the spec file).
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Globs, relative to the workspace, collected when the attempt ends.
    #[serde(default)]
    pub outputs: Vec<String>,
    #[serde(default)]
    pub requirements: Requirements,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub network: NetworkPolicy,
    #[serde(default)]
    pub isolation: Isolation,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Higher runs first. Default 0.
    #[serde(default)]
    pub priority: i32,
    /// What the worker does with the attempt when its link to the coordinator drops;
    /// `None`: the worker's configured default (itself `kill` unless configured).
    #[serde(default)]
    pub on_disconnect: Option<OnDisconnect>,
    /// With `keep_running`: how long, ms, an attempt may stay disconnected before it is given
    /// up (the worker stops it, the coordinator reschedules it); `None`: the worker's default.
    #[serde(default)]
    pub lost_after_ms: Option<u64>,
    /// Acceptance criteria, run in order in the workspace after the main command exits 0;
    /// empty: the task is done when its command exits 0 (see [`crate::acceptance`]).
    #[serde(default)]
    pub acceptance: Vec<Criterion>,
    /// Most iterations of the acceptance loop (the first included), at least 1. Default
    /// [`DEFAULT_MAX_ITERATIONS`]; read only with `acceptance`.
    #[serde(default = "default_max_iterations")]
    pub max_iterations: u32,
    /// An independent check of the declared outputs once the criteria pass on the worker;
    /// `None`: the worker's own check is the last word (the task ends `satisfied`).
    #[serde(default)]
    pub verdict: Option<VerdictSpec>,
    /// With `network = proxy`: the hosts the proxy lets the attempt reach — `host` (ports 443
    /// and 80), `host:port`, or `*.domain` (any name under it); lowercase.
    #[serde(default)]
    pub egress: Vec<String>,
    /// Secrets the egress proxy adds to requests for the hosts each grant names; the task
    /// never sees their values.
    #[serde(default)]
    pub secrets: Vec<crate::secrets::SecretGrant>,
}

/// `max_iterations` when a spec does not say.
pub const DEFAULT_MAX_ITERATIONS: u32 = 3;
/// A criterion's timeout when its spec does not say: 10 minutes.
pub const DEFAULT_CRITERION_TIMEOUT_MS: u64 = 600_000;

fn default_max_iterations() -> u32 {
    DEFAULT_MAX_ITERATIONS
}

fn default_criterion_timeout() -> u64 {
    DEFAULT_CRITERION_TIMEOUT_MS
}

/// One acceptance criterion: a named command run in the task's workspace, in a fresh sandbox
/// configured like the task's; it passes when it exits 0 within its timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criterion {
    /// Unique within the spec; names the criterion in events and feedback.
    pub name: String,
    /// argv, looked up on the task's PATH like the main command.
    pub command: Vec<String>,
    /// Wall-clock limit, ms; past it the criterion is killed and fails.
    #[serde(default = "default_criterion_timeout")]
    pub timeout_ms: u64,
}

/// The independent verdict: criteria re-run by the coordinator's choice of worker (another
/// one when one fits) in a fresh sandbox holding only the task's stored outputs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerdictSpec {
    /// The verdict's criteria; empty: the task's `acceptance` criteria.
    pub criteria: Vec<Criterion>,
}

impl TaskSpec {
    /// The criteria the verdict runs, if the spec asks for a verdict.
    pub fn verdict_criteria(&self) -> Option<&[Criterion]> {
        let v = self.verdict.as_ref()?;
        Some(if v.criteria.is_empty() {
            &self.acceptance
        } else {
            &v.criteria
        })
    }
}

/// What happens to a running attempt when its worker loses the coordinator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDisconnect {
    /// The attempt dies with the connection; the coordinator reschedules it when the worker
    /// comes back without it or its lease runs out.
    #[default]
    Kill,
    /// The attempt keeps running and spooling its events on the worker; on reconnect it is
    /// reattached (not restarted) and its events are replayed, unless `lost_after` passed.
    KeepRunning,
}

impl OnDisconnect {
    pub fn as_str(self) -> &'static str {
        match self {
            OnDisconnect::Kill => "kill",
            OnDisconnect::KeepRunning => "keep_running",
        }
    }
}

/// How an attempt's process tree ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitClass {
    /// The main process exited with this code.
    Exited(i32),
    /// The main process was killed by this signal (not by drover).
    Signaled(i32),
    /// The cgroup's OOM counter rose: the kernel killed something for memory.
    OomKilled,
    /// The wall-time limit passed and drover killed the tree.
    TimedOut,
    /// Cancelled by an operator or the coordinator.
    Cancelled,
}

impl ExitClass {
    /// Whether the attempt succeeded.
    pub fn is_success(self) -> bool {
        self == ExitClass::Exited(0)
    }
}

/// Where a task is in its life. Derived from its session; `succeeded`, `failed` and
/// `cancelled` are final and recorded once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for a worker that fits (or for a retry's backoff).
    Queued,
    /// An attempt is assigned and running.
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Every acceptance criterion passed on the worker (no verdict asked for).
    Satisfied,
    /// The criteria passed on the worker and the independent verdict passed too.
    Verified,
    /// The criteria passed on the worker but the independent verdict failed.
    Rejected,
}

impl TaskState {
    pub const ALL: [TaskState; 8] = [
        TaskState::Queued,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::Satisfied,
        TaskState::Verified,
        TaskState::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Satisfied => "satisfied",
            TaskState::Verified => "verified",
            TaskState::Rejected => "rejected",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, TaskState::Queued | TaskState::Running)
    }

    /// A final state that means the work is done: `succeeded`, `satisfied` or `verified`.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Satisfied | TaskState::Verified
        )
    }
}

impl core::fmt::Display for TaskState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::str::FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
            format!("unknown task state {s:?}: expected queued, running, succeeded, failed, cancelled, satisfied, verified or rejected")
        })
    }
}

/// The operator's view of a task (`drover task show --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub id: String,
    pub name: String,
    pub state: TaskState,
    /// Attempts started so far.
    pub attempts: u32,
    /// The current (or last) attempt's epoch; 0 before the first.
    pub epoch: u64,
    /// The worker of the current (or last) attempt.
    pub worker: Option<String>,
    pub submitted_ms: u64,
    pub finished_ms: Option<u64>,
    /// How the last attempt ended.
    pub exit: Option<ExitClass>,
    /// Why it waits (queued), or why it failed.
    pub reason: Option<String>,
    /// Events in its session.
    pub events: u64,
    pub spec: TaskSpec,
    /// Iteration of the acceptance loop reached (1 for the first), counted apart from
    /// attempts: an attempt that resumes after a failure continues the count. 0 without
    /// acceptance criteria or before the first iteration.
    pub iteration: u32,
    /// The latest result of each criterion in the current iteration, or of the verdict once
    /// it has checked any, in the order they ran.
    pub criteria: Vec<CriterionResult>,
    /// The verdict, once the criteria passed on the worker and the spec asks for one.
    pub verdict: Option<VerdictInfo>,
}

/// One criterion's result (`criterion_checked` in the session, and feedback).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CriterionResult {
    pub name: String,
    pub passed: bool,
    /// Its exit code; `None` when it did not exit by itself (timed out, killed, not started).
    pub exit: Option<i32>,
    /// The tail of its stdout and stderr, at most [`crate::acceptance::MAX_EXCERPT_BYTES`].
    pub excerpt: String,
}

/// Where a task's verdict is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictInfo {
    /// The epoch of the (latest) verdict attempt; 0 while waiting for a worker.
    pub epoch: u64,
    /// The worker it runs or ran on.
    pub worker: Option<String>,
    /// The worker whose work it checks.
    pub work_worker: Option<String>,
    /// The attempt whose stored outputs it checks; `None`: it stored none.
    pub outputs_epoch: Option<u64>,
    /// `None` while it runs; then whether every criterion passed.
    pub passed: Option<bool>,
}

/// One stored event of a session (`drover events --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEvent {
    pub task_id: String,
    /// Position in the session, from 0 without gaps.
    pub pos: u64,
    pub epoch: u64,
    /// The worker's sequence number within the epoch; `None` for coordinator events.
    pub seq: Option<u64>,
    pub ts_ms: u64,
    pub kind: String,
    /// Type-specific JSON text.
    pub payload: String,
}

/// The outputs one attempt stored (`drover outputs --json`, `drover task show --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputsInfo {
    pub task_id: String,
    /// The attempt's number (1 for the first); equal to its epoch.
    pub attempt: u32,
    pub epoch: u64,
    /// Regular files in the archive.
    pub files: u64,
    /// Bytes of those files.
    pub bytes: u64,
    /// Size of the stored tar archive.
    pub archive_bytes: u64,
    /// SHA-256 of the archive, lowercase hex.
    pub sha256: String,
    pub stored_ms: u64,
}
