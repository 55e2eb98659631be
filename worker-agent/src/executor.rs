//! Runs assigned attempts: a workspace per attempt, the process in the [`Sandbox`], and every
//! event — lifecycle, stdout/stderr chunks, the task's own JSON lines — streamed in `seq`
//! order on the attempt's own QUIC stream.
//!
//! Backpressure, not loss: pipe readers feed a bounded channel, the streamer holds at most
//! [`MAX_UNACKED`] events the coordinator has not acknowledged, and QUIC flow control does the
//! rest. A task that floods output blocks on its own write; nothing is dropped and memory stays
//! bounded on both sides.
//!
//! Inputs and outputs (see [`crate::workspace`]): inputs are unpacked into the workspace
//! before the process starts; outputs are stored after it ends and before `exited` is sent,
//! so a task seen `completed` already has its outputs stored.
//!
//! An attempt lives as long as the connection that started it: when the link drops, the
//! attempt task is aborted and its process tree killed (the sandbox guarantees it); the
//! coordinator learns this at re-registration (`WorkerMessage::Attempts`) and reschedules.
//! Keeping attempts running across reconnects, with an on-disk spool, is issue 5's
//! `on_disconnect = "keep_running"`.

use crate::sandbox::{AttemptSpec, Sandbox};
use crate::wire::{self, FramedRecv};
use crate::workspace;
use drover_protocol::task::{ExitClass, Limits};
use drover_protocol::{Assignment, AttemptDown, AttemptEvent, AttemptUp};
use serde_json::json;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Largest stdout/stderr chunk per event.
pub const CHUNK_BYTES: usize = 16 * 1024;
/// Longest JSON line a task may write to `DROVER_EVENTS_FD` (a checkpoint payload included).
pub const MAX_EVENT_LINE: usize = 256 * 1024;
/// Events sent but not yet acknowledged before the streamer waits for acks.
pub const MAX_UNACKED: usize = 256;
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
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type Emit = mpsc::Sender<(String, String)>;

/// Run one attempt to its end on `conn`. Returns when every event is acknowledged, the
/// attempt is fenced, or the connection is gone.
pub async fn run_attempt(
    ctx: ExecContext,
    conn: quinn::Connection,
    a: Assignment,
    cancel: CancellationToken,
) {
    let (task_id, epoch) = (a.task_id.clone(), a.epoch);
    let (mut send, recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            return tracing::warn!(task = %task_id, epoch, error = %e, "cannot open attempt stream")
        }
    };
    let mut recv = FramedRecv::new(recv);
    if wire::send(
        &mut send,
        &AttemptUp::Open {
            task_id: task_id.clone(),
            epoch,
        },
    )
    .await
    .is_err()
    {
        return;
    }
    let (tx, rx) = mpsc::channel(64);
    let process = run_process(&ctx, &conn, &a, tx, cancel.clone());
    let stream = stream_events(&mut send, &mut recv, rx, cancel.clone());
    let ((), streamed) = tokio::join!(process, stream);
    match streamed {
        Ok(()) => {
            let _ = send.finish();
            tracing::info!(task = %task_id, epoch, "attempt done, every event acknowledged");
        }
        Err(why) => {
            tracing::warn!(task = %task_id, epoch, reason = %why, "attempt stream ended early")
        }
    }
}

/// Send events as they come, track acknowledgements; on failure, cancel the attempt.
async fn stream_events(
    send: &mut quinn::SendStream,
    recv: &mut FramedRecv,
    mut rx: mpsc::Receiver<(String, String)>,
    cancel: CancellationToken,
) -> Result<(), String> {
    let result = async {
        let mut unacked: VecDeque<u64> = VecDeque::new();
        let mut next_seq = 0u64;
        let mut producing = true;
        loop {
            if !producing && unacked.is_empty() {
                return Ok(());
            }
            tokio::select! {
                item = rx.recv(), if producing && unacked.len() < MAX_UNACKED => match item {
                    Some((kind, payload)) => {
                        let ev = AttemptEvent { seq: next_seq, ts_ms: now_ms(), kind, payload };
                        wire::send(send, &AttemptUp::Event(ev)).await.map_err(|e| e.to_string())?;
                        unacked.push_back(next_seq);
                        next_seq += 1;
                    }
                    None => producing = false,
                },
                reply = recv.next::<AttemptDown>() => match reply {
                    Ok(Some(AttemptDown::Ack { seq })) => {
                        while unacked.front().is_some_and(|s| *s <= seq) {
                            unacked.pop_front();
                        }
                    }
                    Ok(Some(AttemptDown::Fenced { reason })) => return Err(format!("fenced: {reason}")),
                    Ok(Some(other)) => return Err(format!("unexpected message on the attempt stream: {other:?}")),
                    Ok(None) => return Err("coordinator closed the attempt stream".into()),
                    Err(e) => return Err(e.to_string()),
                },
            }
        }
    }
    .await;
    if result.is_err() {
        cancel.cancel();
    }
    result
}

async fn run_process(
    ctx: &ExecContext,
    conn: &quinn::Connection,
    a: &Assignment,
    tx: Emit,
    cancel: CancellationToken,
) {
    let workspace = ctx
        .work_dir
        .join("tasks")
        .join(format!("{}-{}", a.task_id, a.epoch));
    let started = json!({ "attempt": a.attempt, "workspace": workspace, "resumed_from_checkpoint": a.checkpoint.is_some() });
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
    if let Err(e) = std::fs::create_dir_all(&workspace) {
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
    if let Err(why) = workspace::prepare_inputs(conn, &ctx.work_dir, a, &workspace, &tx).await {
        let _ = tx.send(("exited".into(), fail(why))).await;
        return;
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
    let spec = AttemptSpec {
        task_id: &a.task_id,
        attempt: a.attempt,
        argv: &a.spec.command,
        env: &a.spec.env,
        workspace: &workspace,
        limits: &limits,
        network: a.spec.network,
        isolation: a.spec.isolation,
        checkpoint_file: a.checkpoint.is_some().then_some(checkpoint_file.as_path()),
    };
    let mut attempt = match sandbox.spawn(spec).await {
        Ok(at) => at,
        Err(e) => {
            let _ = tx
                .send((
                    "exited".into(),
                    fail(format!("could not start the task: {e}")),
                ))
                .await;
            return;
        }
    };
    let out = pump_chunks(attempt.stdout.take(), "stdout", tx.clone());
    let err = pump_chunks(attempt.stderr.take(), "stderr", tx.clone());
    let events = pump_lines(attempt.events.take(), tx.clone());
    let wait = attempt.wait(cancel);
    let (outcome, (), (), ()) = tokio::join!(wait, out, err, events);
    workspace::finish_outputs(conn, &ctx.work_dir, a, &workspace, &tx).await;
    let exited = json!({
        "class": outcome.class,
        "peak_memory_bytes": outcome.peak_memory_bytes,
        "memory_limit_bytes": outcome.memory_limit_bytes,
        "oom_kills": outcome.oom_kills,
        "duration_ms": outcome.duration.as_millis() as u64,
    });
    let _ = tx.send(("exited".into(), exited.to_string())).await;
}

/// A memory limit defaults to the memory the task reserves.
fn resolved_limits(a: &Assignment) -> Limits {
    let mut limits = a.spec.limits.clone();
    if limits.memory_bytes.is_none() && a.spec.requirements.memory_bytes > 0 {
        limits.memory_bytes = Some(a.spec.requirements.memory_bytes);
    }
    limits
}

async fn pump_chunks<R: AsyncRead + Unpin>(pipe: Option<R>, kind: &str, tx: Emit) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let payload = json!({ "data": String::from_utf8_lossy(&buf[..n]) }).to_string();
                // A full channel blocks here, so the task blocks on its own write: backpressure.
                if tx.send((kind.to_owned(), payload)).await.is_err() {
                    return;
                }
            }
        }
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
