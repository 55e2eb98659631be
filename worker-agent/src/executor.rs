//! Runs assigned attempts: a workspace per attempt, the process in the [`Sandbox`], and every
//! event — lifecycle, stdout/stderr chunks, the task's own JSON lines — handed in order to
//! the attempt's streamer ([`crate::stream`]), which spools it on disk and sends it on the
//! attempt's own QUIC stream.
//!
//! Backpressure, not loss: pipe readers feed a bounded channel, and the streamer stops reading
//! it while the attempt's spool is at its bound; a task that floods output blocks on its own
//! write. Nothing is dropped and memory stays bounded on both sides.
//!
//! Inputs and outputs (see [`crate::workspace`]): inputs are unpacked into the workspace
//! before the process starts; outputs are stored after it ends and before `exited` is sent,
//! so a task seen `completed` already has its outputs stored.
//!
//! Acceptance criteria ([`crate::acceptance`]): when the spec has some, the command runs as
//! iteration 1 (or where the assignment says to resume), the criteria run after it exits 0,
//! and while one fails and `max_iterations` allows, the command runs again in the same
//! workspace with `DROVER_ITERATION` and `DROVER_FEEDBACK_FILE`. Outputs are stored once,
//! after the loop. A verdict assignment runs only the verdict's criteria.
//!
//! An attempt's lifetime follows its `on_disconnect` policy ([`Policy`]): with `kill` it dies
//! with the connection that started it; with `keep_running` it outlives connections and is
//! reattached on the next one, until `lost_after` without a connection.

use crate::acceptance::{self, Checks, FEEDBACK_FILE};
use crate::egress::{self, Egress};
use crate::gate::Gate;
use crate::outbox::Outbox;
use crate::redact::{Redactor, StreamRedactor};
use crate::sandbox::{AttemptSpec, Sandbox};
use crate::stream::{self, AttemptKey, Confirmation, ConnWatch, Policy, Registry, StreamEnd};
use crate::workdirs::Workdirs;
use crate::workspace;
use drover_protocol::acceptance::Feedback;
use drover_protocol::task::{ExitClass, Limits, NetworkPolicy, OnDisconnect};
use drover_protocol::{Assignment, AttemptKind};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::stream::MAX_UNACKED;

/// Largest stdout/stderr chunk per event.
pub const CHUNK_BYTES: usize = 16 * 1024;
/// Longest JSON line a task may write to `DROVER_EVENTS_FD` (a checkpoint payload included).
pub const MAX_EVENT_LINE: usize = 256 * 1024;
/// Event types a task may write to `DROVER_EVENTS_FD`.
pub const TASK_EVENT_TYPES: [&str; 5] = [
    "tool_called",
    "file_written",
    "checkpoint",
    "progress",
    "custom",
];

/// Name of the file in the workspace that holds the checkpoint an attempt resumes from
/// (`DROVER_CHECKPOINT_FILE`): the checkpoint event's JSON object as stored.
pub const CHECKPOINT_FILE: &str = ".drover-checkpoint.json";

/// What every attempt needs from the worker.
#[derive(Debug, Clone)]
pub struct ExecContext {
    /// `None` when no cgroup hierarchy is usable; attempts then fail with the reason.
    pub sandbox: Result<Sandbox, String>,
    pub work_dir: PathBuf,
    /// The attempts' workspaces (made or reused when an attempt starts, emptied at its end).
    pub workdirs: Workdirs,
    /// Bound on each attempt's spool, bytes.
    pub spool_max_bytes: u64,
    /// Events an attempt holds in memory before they move to its spool, bytes (see
    /// [`crate::outbox`]).
    pub spool_memory_bytes: u64,
    /// Defaults for specs that do not choose.
    pub on_disconnect: OnDisconnect,
    pub lost_after_ms: u64,
    /// How the egress proxy of `network = proxy` attempts verifies upstream hosts.
    pub egress_upstream: crate::egress::Upstream,
    /// This worker's capacity, shared by its attempts (see [`crate::gate`]).
    pub gate: Gate,
}

impl ExecContext {
    /// The attempt's disconnect policy: its spec's, else this worker's defaults.
    pub fn policy(&self, a: &Assignment) -> Policy {
        Policy::resolve(&a.spec, self.on_disconnect, self.lost_after_ms)
    }
}

/// Where attempts keep their spools.
pub fn spool_root(work_dir: &Path) -> PathBuf {
    work_dir.join("spool")
}

/// Remove spools left by an earlier run of the worker: their attempts died with it (the
/// sandbox's init goes with its parent), so the coordinator reschedules them. Returns how
/// many were removed.
pub fn discard_stale_spools(work_dir: &Path) -> std::io::Result<usize> {
    let root = spool_root(work_dir);
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for entry in entries {
        std::fs::remove_dir_all(entry?.path())?;
        n += 1;
    }
    Ok(n)
}

type Emit = mpsc::Sender<(String, String)>;

/// Run one attempt to its end: every event acknowledged, the attempt fenced, or given up
/// under its [`Policy`]. Removes itself from `registry` when it returns.
pub async fn run_attempt(
    ctx: ExecContext,
    conns: ConnWatch,
    registry: Registry,
    a: Assignment,
    cancel: CancellationToken,
    confirmation: Confirmation,
) {
    let key: AttemptKey = (a.task_id.clone(), a.epoch);
    let policy = ctx.policy(&a);
    let dir = spool_root(&ctx.work_dir).join(format!("{}-{}", a.task_id, a.epoch));
    let outbox = match Outbox::new(&dir, ctx.spool_max_bytes, ctx.spool_memory_bytes) {
        Ok(s) => s,
        Err(e) => {
            // Without a spool nothing can be kept for the coordinator: the attempt is not
            // started, and a fresh report without it makes the coordinator retry it.
            tracing::error!(task = %key.0, epoch = key.1, error = %e, "cannot create the attempt's spool; not running it");
            registry.abandon(&key);
            return;
        }
    };
    let (tx, rx) = mpsc::channel(64);
    // Every event passes the attempt's secrets' redactor before it is spooled; stdout and
    // stderr are also masked as streams in `pump_chunks` (a value split across reads).
    let redactor = Arc::new(Redactor::new(
        a.secrets
            .iter()
            .map(|s| (s.name.as_str(), s.value.expose())),
    ));
    let (rx, masking) = if redactor.is_empty() {
        (rx, None)
    } else {
        let (masked_tx, masked_rx) = mpsc::channel(64);
        (
            masked_rx,
            Some(mask_events(rx, masked_tx, redactor.clone())),
        )
    };
    let masking = async {
        if let Some(m) = masking {
            m.await;
        }
    };
    let process = run_process(
        &ctx,
        &conns,
        &a,
        policy,
        tx,
        cancel.clone(),
        redactor,
        &confirmation,
    );
    let stream = async {
        let end = stream::stream_events(
            &key,
            outbox,
            rx,
            conns.clone(),
            policy,
            &registry,
            &confirmation,
        )
        .await;
        if !end.is_done() {
            // Fenced, given up or disconnected under `kill`: the process tree goes too. Said
            // before the kill, so the log gives the reason by the time the tree is gone.
            tracing::warn!(task = %key.0, epoch = key.1, reason = %end, "attempt stopped");
            cancel.cancel();
        }
        end
    };
    let ((), (), end) = tokio::join!(process, masking, stream);
    // Its processes are gone and its outputs stored (before `exited` was sent).
    ctx.workdirs
        .recycle(ctx.workdirs.path(&a.task_id, a.epoch))
        .await;
    if matches!(end, StreamEnd::Spool(_) | StreamEnd::Unconfirmed) {
        // Its remaining events are lost with the spool (or it never ran): have the coordinator
        // retry it.
        registry.abandon(&key);
    } else {
        registry.remove(&key);
    }
    if end.is_done() {
        // Per attempt: debug, as `attempt assigned` (the session has both; see link.rs).
        tracing::debug!(task = %key.0, epoch = key.1, "attempt done, every event acknowledged");
    }
}

/// The connection to move an attempt's files over: the current one, or under `keep_running`
/// the next one within `lost_after`. `None` when there is none to be had.
async fn transfer_connection(conns: &ConnWatch, policy: Policy) -> Option<quinn::Connection> {
    let mut conns = conns.clone();
    let current = conns.borrow().clone();
    if current.is_some() || !policy.keep_running() {
        return current;
    }
    tokio::time::timeout(policy.lost_after, stream::wait_connection(&mut conns))
        .await
        .ok()
        .flatten()
}

/// Mask secret values in every event's payload between the producers and the spool.
async fn mask_events(mut rx: mpsc::Receiver<(String, String)>, tx: Emit, redactor: Arc<Redactor>) {
    while let Some((kind, payload)) = rx.recv().await {
        let payload = match redactor.redact_str(&payload) {
            std::borrow::Cow::Borrowed(_) => payload,
            std::borrow::Cow::Owned(masked) => masked,
        };
        if tx.send((kind, payload)).await.is_err() {
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_process(
    ctx: &ExecContext,
    conns: &ConnWatch,
    a: &Assignment,
    policy: Policy,
    tx: Emit,
    cancel: CancellationToken,
    redactor: Arc<Redactor>,
    confirmation: &Confirmation,
) {
    let workspace = ctx.workdirs.path(&a.task_id, a.epoch);
    // An assignment sent ahead of a full worker waits here until an earlier attempt's
    // processes are gone; nothing of it has started (no `started` event) until then.
    let room = tokio::select! {
        room = ctx.gate.acquire(&a.spec.requirements) => room,
        () = cancel.cancelled() => {
            let why = "cancelled before it started (it waited for the worker to have room)";
            let cancelled = json!({ "class": ExitClass::Cancelled, "error": why });
            let _ = tx.send(("exited".into(), cancelled.to_string())).await;
            return;
        }
    };
    // The policy goes into the session: the coordinator reads it back to know whether to keep
    // the attempt while its worker is away (and for how long), across its own restarts too.
    let mut started = json!({
        "attempt": a.attempt, "workspace": workspace, "resumed_from_checkpoint": a.checkpoint.is_some(),
        "on_disconnect": policy.on_disconnect.as_str(), "lost_after_ms": policy.lost_after.as_millis() as u64,
    });
    if matches!(a.kind, AttemptKind::Verdict { .. }) {
        started["kind"] = json!("verdict");
    }
    let _ = tx.send(("started".into(), started.to_string())).await;
    let fail =
        |message: String| json!({ "class": ExitClass::Exited(127), "error": message }).to_string();
    let sandbox = match &ctx.sandbox {
        Ok(s) => s,
        Err(why) => {
            let _ = tx
                .send((
                    "exited".into(),
                    fail(format!("this worker cannot run tasks: {why}")),
                ))
                .await;
            return;
        }
    };
    if let Err(e) = ctx.workdirs.make(&workspace) {
        let _ = tx
            .send((
                "exited".into(),
                fail(format!(
                    "cannot create workspace {}: {e}",
                    workspace.display()
                )),
            ))
            .await;
        return;
    }
    let egress = if a.spec.network == NetworkPolicy::Proxy {
        // A verdict goes out through the proxy too, but with no credentials: it checks
        // outputs, it does not act for the task.
        let work = matches!(a.kind, AttemptKind::Work);
        let mut spec = a.spec.clone();
        if !work {
            spec.secrets.clear();
        }
        match Egress::new(
            &a.task_id,
            &spec,
            &a.secrets,
            ctx.egress_upstream.clone(),
            tx.clone(),
            &workspace,
        ) {
            Ok(e) => {
                for event in egress::granted_events(&spec) {
                    let _ = tx.send(event).await;
                }
                Some(e)
            }
            Err(why) => {
                let _ = tx.send(("exited".into(), fail(why))).await;
                return;
            }
        }
    } else {
        None
    };
    let egress = egress.as_ref();
    if let AttemptKind::Verdict { outputs_epoch } = a.kind {
        // A prepared attempt starts no process before its confirm (for the task's own run,
        // the sandbox holds the spawn: see `run_main`).
        if !confirmation.wait().await {
            return;
        }
        let limits = resolved_limits(a);
        let iteration = [("DROVER_VERDICT".to_owned(), "1".to_owned())];
        let checks = Checks {
            sandbox,
            a,
            workspace: &workspace,
            limits: &limits,
            extra_env: &iteration,
            cancel: &cancel,
            tx: &tx,
            egress,
        };
        let conn = transfer_connection(conns, policy).await;
        let exited = acceptance::run_verdict(conn, &ctx.work_dir, &checks, outputs_epoch).await;
        drop(room);
        let _ = tx.send(("exited".into(), exited)).await;
        return;
    }
    if !a.spec.inputs.is_empty() {
        let fetched = match transfer_connection(conns, policy).await {
            Some(conn) => workspace::prepare_inputs(&conn, &ctx.work_dir, a, &workspace, &tx).await,
            None => Err("no connection to the coordinator to fetch the inputs from".into()),
        };
        if let Err(why) = fetched {
            let _ = tx.send(("exited".into(), fail(why))).await;
            return;
        }
    }
    let limits = resolved_limits(a);
    let checkpoint_file = workspace.join(CHECKPOINT_FILE);
    if let Some(checkpoint) = &a.checkpoint {
        if let Err(e) = std::fs::write(&checkpoint_file, checkpoint) {
            let why = format!(
                "cannot write the checkpoint to {}: {e}",
                checkpoint_file.display()
            );
            let _ = tx.send(("exited".into(), fail(why))).await;
            return;
        }
    }
    let checkpoint = a.checkpoint.is_some().then_some(checkpoint_file.as_path());
    let criteria = &a.spec.acceptance;
    let mut iteration = a.iteration.max(1);
    let mut feedback = a.feedback.clone();
    let feedback_file = workspace.join(FEEDBACK_FILE);
    let outcome = loop {
        let mut extra_env = Vec::new();
        if !criteria.is_empty() {
            let payload = json!({ "n": iteration, "max": a.spec.max_iterations });
            let _ = tx
                .send(("iteration_started".into(), payload.to_string()))
                .await;
            extra_env.push(("DROVER_ITERATION".to_owned(), iteration.to_string()));
            if let Err(why) = place_feedback(&feedback_file, feedback.as_deref(), &mut extra_env) {
                let _ = tx.send(("exited".into(), fail(why))).await;
                return;
            }
        }
        let run = Run {
            sandbox,
            a,
            workspace: &workspace,
            limits: &limits,
            checkpoint_file: checkpoint,
            extra_env: &extra_env,
            egress,
            redactor: &redactor,
            confirmation,
        };
        let outcome = match run_main(run, &tx, &cancel).await {
            Ok(o) => o,
            Err(why) => {
                let _ = tx.send(("exited".into(), fail(why))).await;
                return;
            }
        };
        if criteria.is_empty() || !outcome.class.is_success() || cancel.is_cancelled() {
            break outcome;
        }
        extra_env.retain(|(k, _)| k == "DROVER_ITERATION");
        let checks = Checks {
            sandbox,
            a,
            workspace: &workspace,
            limits: &limits,
            extra_env: &extra_env,
            cancel: &cancel,
            tx: &tx,
            egress,
        };
        let results = checks.run(criteria, iteration, false).await;
        let passed = results.iter().all(|r| r.passed);
        if passed || iteration >= a.spec.max_iterations || cancel.is_cancelled() {
            break outcome;
        }
        feedback = Feedback::from_results(iteration, &results)
            .and_then(|f| serde_json::to_string(&f).ok());
        iteration += 1;
    };
    // Every process of the attempt is gone: the next attempt may start while this one's
    // outputs travel and its end is reported.
    drop(room);
    if !a.spec.outputs.is_empty() {
        match transfer_connection(conns, policy).await {
            Some(conn) => workspace::finish_outputs(&conn, &ctx.work_dir, a, &workspace, &tx).await,
            None => {
                let error = "no connection to the coordinator to store the outputs on";
                let payload = json!({ "error": error }).to_string();
                let _ = tx.send(("outputs_failed".into(), payload)).await;
            }
        }
    }
    let exited = json!({
        "class": outcome.class,
        "peak_memory_bytes": outcome.peak_memory_bytes,
        "memory_limit_bytes": outcome.memory_limit_bytes,
        "oom_kills": outcome.oom_kills,
        "duration_ms": outcome.duration.as_millis() as u64,
    });
    let _ = tx.send(("exited".into(), exited.to_string())).await;
}

/// Write the feedback file (or remove a stale one) and name it in the environment.
fn place_feedback(
    file: &Path,
    feedback: Option<&str>,
    env: &mut Vec<(String, String)>,
) -> Result<(), String> {
    let Some(feedback) = feedback else {
        let _ = std::fs::remove_file(file);
        return Ok(());
    };
    std::fs::write(file, feedback)
        .map_err(|e| format!("cannot write the feedback to {}: {e}", file.display()))?;
    let path = file
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", file.display()))?;
    env.push(("DROVER_FEEDBACK_FILE".to_owned(), path.to_owned()));
    Ok(())
}

/// What one run of the task's command needs.
struct Run<'a> {
    sandbox: &'a Sandbox,
    a: &'a Assignment,
    workspace: &'a Path,
    limits: &'a Limits,
    checkpoint_file: Option<&'a Path>,
    extra_env: &'a [(String, String)],
    egress: Option<&'a Egress>,
    redactor: &'a Arc<Redactor>,
    /// Whether it may start (a prepared attempt: once confirmed).
    confirmation: &'a Confirmation,
}

/// Spawn the task's command once and pump its output until the whole tree is gone; `Err`
/// with the message for `exited` when it could not start.
async fn run_main(
    run: Run<'_>,
    tx: &Emit,
    cancel: &CancellationToken,
) -> Result<crate::sandbox::AttemptOutcome, String> {
    let Run {
        sandbox,
        a,
        workspace,
        limits,
        checkpoint_file,
        extra_env,
        egress,
        redactor,
        confirmation,
    } = run;
    let spec = AttemptSpec {
        task_id: &a.task_id,
        attempt: a.attempt,
        argv: &a.spec.command,
        env: &a.spec.env,
        workspace,
        limits,
        network: a.spec.network,
        isolation: a.spec.isolation,
        checkpoint_file,
        extra_env,
        egress,
        confirmation: Some(confirmation),
    };
    let mut attempt = sandbox
        .spawn(spec)
        .await
        .map_err(|e| format!("could not start the task: {e}"))?;
    let out = pump_chunks(attempt.stdout.take(), "stdout", tx.clone(), redactor);
    let err = pump_chunks(attempt.stderr.take(), "stderr", tx.clone(), redactor);
    let events = pump_lines(attempt.events.take(), tx.clone());
    let wait = attempt.wait(cancel.clone());
    let (outcome, (), (), ()) = tokio::join!(wait, out, err, events);
    Ok(outcome)
}

/// A memory limit defaults to the memory the task reserves.
fn resolved_limits(a: &Assignment) -> Limits {
    let mut limits = a.spec.limits.clone();
    if limits.memory_bytes.is_none() && a.spec.requirements.memory_bytes > 0 {
        limits.memory_bytes = Some(a.spec.requirements.memory_bytes);
    }
    limits
}

async fn pump_chunks<R: AsyncRead + Unpin>(
    pipe: Option<R>,
    kind: &str,
    tx: Emit,
    redactor: &Arc<Redactor>,
) {
    let Some(mut pipe) = pipe else { return };
    let mut masker = (!redactor.is_empty()).then(|| StreamRedactor::new(redactor.clone()));
    let mut buf = vec![0u8; CHUNK_BYTES];
    let send = |bytes: &[u8]| {
        let payload = json!({ "data": String::from_utf8_lossy(bytes) }).to_string();
        tx.send((kind.to_owned(), payload))
    };
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let masked;
                let chunk = match &mut masker {
                    Some(m) => {
                        masked = m.push(&buf[..n]);
                        if masked.is_empty() {
                            continue;
                        }
                        &masked[..]
                    }
                    None => &buf[..n],
                };
                // A full channel blocks here, so the task blocks on its own write: backpressure.
                if send(chunk).await.is_err() {
                    return;
                }
            }
        }
    }
    if let Some(rest) = masker.map(|mut m| m.finish()).filter(|r| !r.is_empty()) {
        let _ = send(&rest).await;
    }
}

async fn pump_lines<R: AsyncRead + Unpin>(pipe: Option<R>, tx: Emit) {
    let Some(pipe) = pipe else { return };
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_EVENT_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let event = if n > MAX_EVENT_LINE && !line.ends_with(b"\n") {
            // Skip the rest of the oversized line.
            let mut rest = Vec::new();
            let _ = reader.read_until(b'\n', &mut rest).await;
            error_event(
                format!("event line longer than {MAX_EVENT_LINE} bytes"),
                &line,
            )
        } else {
            parse_task_event(&line)
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

/// Turn one line from `DROVER_EVENTS_FD` into (kind, payload); malformed lines become `error`
/// events, never a crash.
pub fn parse_task_event(line: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return error_event(format!("not JSON: {e}"), line),
    };
    let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
        return error_event("no \"type\" field".into(), line);
    };
    if !TASK_EVENT_TYPES.contains(&kind) {
        return error_event(
            format!(
                "unknown type {kind:?}; expected one of {}",
                TASK_EVENT_TYPES.join(", ")
            ),
            line,
        );
    }
    (kind.to_owned(), value.to_string())
}

fn error_event(message: String, line: &[u8]) -> (String, String) {
    let excerpt: String = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
    (
        "error".into(),
        json!({ "message": message, "line": excerpt }).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::task::TaskSpec;
    use std::time::Duration;

    /// Bound on each wait below (polls, never a timing assertion).
    const DEADLINE: Duration = Duration::from_secs(30);

    async fn eventually(what: &str, cond: impl FnMut() -> bool) {
        let held = crate::sandbox::cgroup::poll_until(DEADLINE, cond).await;
        assert!(held, "not within {DEADLINE:?}: {what}");
    }

    /// A prepared attempt makes its workspace but starts no process until confirmed; dropped
    /// unconfirmed (its connection ended), nothing of it ever runs.
    #[tokio::test]
    async fn a_prepared_attempt_runs_nothing_before_its_confirm() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("\n*** SKIPPED: needs root (cgroups) ***\n");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (workdirs, _) = Workdirs::open(dir.path()).expect("workdirs");
        let gate = Gate::default();
        gate.set_totals(drover_protocol::Capacity {
            cpus: 64,
            memory_bytes: 1 << 40,
            gpus: 0,
        });
        let ctx = ExecContext {
            sandbox: Sandbox::detect(None).map_err(|e| e.to_string()),
            work_dir: dir.path().to_owned(),
            workdirs,
            spool_max_bytes: 1 << 20,
            spool_memory_bytes: 1 << 16,
            on_disconnect: OnDisconnect::KeepRunning,
            lost_after_ms: 600_000,
            egress_upstream: Err("not used".into()),
            gate,
        };
        let registry = Registry::default();
        let (_conn_tx, conns) = tokio::sync::watch::channel(None::<quinn::Connection>);
        // The task leaves a file in its workspace (the one place a sandboxed task can write
        // that the test sees).
        let start = |task: &str, kind: AttemptKind, isolation: &str| {
            let touch = json!(["touch", "ran"]);
            let spec: TaskSpec = serde_json::from_value(json!({
                "name": task,
                "command": touch,
                "env": { "PATH": "/usr/bin:/bin" },
                "isolation": isolation,
                "outputs": ["out/"],
                "verdict": { "criteria": [{ "name": "v", "command": touch }] },
            }))
            .expect("spec");
            let a = Assignment {
                task_id: task.into(),
                epoch: 1,
                attempt: 1,
                spec,
                checkpoint: None,
                kind,
                iteration: 0,
                feedback: None,
                secrets: vec![],
            };
            let key = (task.to_owned(), 1);
            let token = CancellationToken::new();
            let policy = ctx.policy(&a);
            let confirmation = registry.prepare(key, token.clone(), policy);
            let run = run_attempt(
                ctx.clone(),
                conns.clone(),
                registry.clone(),
                a,
                token.clone(),
                confirmation,
            );
            let workspace = ctx.workdirs.path(task, 1);
            (tokio::spawn(run), token, workspace.join("ran"), workspace)
        };
        // Long enough for a spawn to get as far as it goes (milliseconds); not a timing check.
        let settle = || tokio::time::sleep(Duration::from_millis(300));

        let verdict = AttemptKind::Verdict {
            outputs_epoch: None,
        };
        for (isolation, kinds) in [
            ("process", vec![AttemptKind::Work, verdict]),
            ("sandbox", vec![AttemptKind::Work]),
        ] {
            // Dropped before its confirm: made ready (a sandbox built), never run, and gone
            // from the report. The same for a verdict, whose criteria are its processes.
            for kind in kinds {
                let what = if kind == AttemptKind::Work {
                    "work"
                } else {
                    "verdict"
                };
                let task = format!("dropped-{isolation}-{what}");
                let (run, _token, marker, workspace) = start(&task, kind, isolation);
                eventually("the workspace is made", || workspace.exists()).await;
                settle().await;
                assert!(!marker.exists(), "{task}: ran before its confirm");
                assert_eq!(registry.drop_killable(), 1);
                tokio::time::timeout(DEADLINE, run)
                    .await
                    .expect("it ends once dropped")
                    .expect("join");
                assert!(registry.is_empty());
            }

            // Confirmed: it runs.
            let task = format!("confirmed-{isolation}");
            let (run, token, marker, workspace) = start(&task, AttemptKind::Work, isolation);
            eventually("the workspace is made", || workspace.exists()).await;
            settle().await;
            assert!(!marker.exists(), "{task}: ran before its confirm");
            assert!(registry.confirm(&(task.clone(), 1)));
            eventually("the confirmed attempt runs", || marker.exists()).await;
            // Its events wait for a connection (keep_running) that never comes: stop it.
            token.cancel();
            run.abort();
            registry.remove(&(task, 1));
        }
    }

    #[test]
    fn task_events_parse_or_become_errors() {
        let (k, p) = parse_task_event(br#"{"type":"progress","pct":50}"#);
        assert_eq!(k, "progress");
        assert!(p.contains("50"));
        assert_eq!(parse_task_event(b"not json").0, "error");
        assert_eq!(parse_task_event(br#"{"pct":1}"#).0, "error");
        let (k, p) = parse_task_event(br#"{"type":"rm -rf"}"#);
        assert_eq!(k, "error");
        assert!(p.contains("unknown type"));
    }
}
