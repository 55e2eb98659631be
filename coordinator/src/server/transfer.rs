//! Archive transfers on the coordinator's side, one stream each:
//! - a worker's inputs stream ([`serve_inputs`]): the attempt must be current; its task's
//!   inputs archive goes down in chunks — or, for a verdict attempt, the outputs archive of
//!   the attempt it checks (so the verdict sees exactly what was stored);
//! - a worker's outputs stream ([`receive_outputs`]): the attempt must be current (checked
//!   before receiving and again, atomically with the write, after); the archive is received
//!   into the blob store, checked as a tar archive within the outputs limits, made durable,
//!   its row written, and only then acknowledged with `OutputsStored`;
//! - an operator's submit with inputs ([`submit_with_inputs`]): the archive is durable before
//!   the task is recorded, and the task's id is answered once both are;
//! - an operator's outputs reads ([`list_outputs`], [`send_outputs`]).
//!
//! Archive files never pass through memory whole: chunks go between the stream and a file.

use super::conn::ConnCtx;
use super::core::{CoreMsg, Durable};
use crate::store::blobs::BlobRef;
use crate::wire::{self, FramedRecv};
use drover_protocol::task::{
    OutputsInfo, TaskInfo, TaskSpec, MAX_INPUT_ARCHIVE_BYTES, MAX_INPUT_BYTES,
    MAX_OUTPUT_ARCHIVE_BYTES, MAX_OUTPUT_BYTES, MAX_OUTPUT_FILES,
};
use drover_protocol::{AttemptDown, AttemptUp, ErrorKind, OperatorRequest, OperatorResponse};
use drover_worker::archive;
use drover_worker::transfer::send_chunks;
use drover_worker::workspace::MAX_INPUT_ENTRIES;
use tokio::sync::oneshot;

async fn check_attempt(
    ctx: &ConnCtx,
    worker: &str,
    task_id: &str,
    epoch: u64,
) -> Result<u32, String> {
    let (reply, answer) = oneshot::channel();
    let msg = CoreMsg::CheckAttempt {
        name: worker.to_owned(),
        task_id: task_id.to_owned(),
        epoch,
        reply,
    };
    if !ctx.core.send(msg).await {
        return Err("the coordinator is shutting down".into());
    }
    answer
        .await
        .unwrap_or_else(|_| Err("the coordinator is shutting down".into()))
}

async fn wait_durable(after: Durable) -> Result<(), String> {
    after
        .await
        .unwrap_or_else(|_| Err("database writer stopped".into()))
}

async fn reply_down(send: &mut quinn::SendStream, msg: AttemptDown) {
    let _ = wire::send(send, &msg).await;
    let _ = send.finish();
}

/// Send an attempt's inputs archive down its inputs stream.
pub async fn serve_inputs(
    ctx: &ConnCtx,
    worker: &str,
    task_id: String,
    epoch: u64,
    mut send: quinn::SendStream,
) {
    if let Err(reason) = check_attempt(ctx, worker, &task_id, epoch).await {
        tracing::warn!(%worker, task = %task_id, epoch, %reason, "refused a stale attempt's inputs request");
        return reply_down(&mut send, AttemptDown::Fenced { reason }).await;
    }
    let store = ctx.store.clone();
    let id = task_id.clone();
    let verdict = task_info(ctx, &task_id)
        .await
        .and_then(|t| t.verdict)
        .filter(|v| v.epoch == epoch);
    let row = tokio::task::spawn_blocking(move || -> Result<_, crate::store::StoreError> {
        let index = store.blob_index()?;
        Ok(match verdict {
            // A verdict's workspace holds the outputs it checks.
            Some(v) => index
                .outputs(&id)?
                .into_iter()
                .find(|o| Some(o.epoch) == v.outputs_epoch)
                .map(|o| crate::store::blobs::InputsRow {
                    task_id: id.clone(),
                    sha256: o.sha256,
                    archive_bytes: o.archive_bytes,
                }),
            None => index.inputs(&id)?,
        })
    })
    .await;
    let row = match row {
        Ok(Ok(Some(row))) => row,
        Ok(Ok(None)) => {
            let reason = format!("task {task_id} has no stored inputs archive");
            return reply_down(&mut send, AttemptDown::Refused { reason }).await;
        }
        Ok(Err(e)) => {
            let reason = format!("cannot read the inputs of {task_id}: {e}");
            return reply_down(&mut send, AttemptDown::Refused { reason }).await;
        }
        Err(e) => {
            let reason = e.to_string();
            return reply_down(&mut send, AttemptDown::Refused { reason }).await;
        }
    };
    let path = ctx.store.blobs().path(&row.sha256);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(task = %task_id, path = %path.display(), error = %e, "inputs archive missing");
            let reason =
                format!("the inputs archive of {task_id} is missing on the coordinator ({e})");
            return reply_down(&mut send, AttemptDown::Refused { reason }).await;
        }
    };
    let header = AttemptDown::Inputs {
        archive_bytes: row.archive_bytes,
        sha256: row.sha256.clone(),
    };
    if wire::send(&mut send, &header).await.is_err() {
        return;
    }
    match send_chunks(&mut send, &mut file, row.archive_bytes, |data| {
        AttemptDown::Chunk { data }
    })
    .await
    {
        Ok(()) => {
            let _ = send.finish();
            tracing::debug!(%worker, task = %task_id, epoch, bytes = row.archive_bytes, "inputs sent");
        }
        Err(e) => tracing::warn!(%worker, task = %task_id, epoch, error = %e, "inputs not sent"),
    }
}

/// Receive an attempt's outputs archive (the `PutOutputs` header already read).
pub async fn receive_outputs(
    ctx: &ConnCtx,
    worker: &str,
    task_id: String,
    epoch: u64,
    archive_bytes: u64,
    mut send: quinn::SendStream,
    mut recv: FramedRecv,
) {
    let attempt = match check_attempt(ctx, worker, &task_id, epoch).await {
        Ok(a) => a,
        Err(reason) => {
            tracing::warn!(%worker, task = %task_id, epoch, %reason, "refused a stale attempt's outputs");
            return reply_down(&mut send, AttemptDown::Fenced { reason }).await;
        }
    };
    let refuse = |reason: String| {
        tracing::warn!(%worker, task = %task_id, epoch, %reason, "outputs refused");
        AttemptDown::Refused { reason }
    };
    if archive_bytes > MAX_OUTPUT_ARCHIVE_BYTES {
        let r = refuse(format!(
            "an outputs archive of {archive_bytes} bytes is over the {MAX_OUTPUT_ARCHIVE_BYTES} byte limit"
        ));
        return reply_down(&mut send, r).await;
    }
    let blob = match receive_blob(
        ctx,
        &mut recv,
        archive_bytes,
        MAX_OUTPUT_ARCHIVE_BYTES,
        |m| match m {
            AttemptUp::Chunk { data } => Ok(data),
            other => Err(format!("{other:?}")),
        },
    )
    .await
    {
        Ok(w) => w,
        Err(e) => return reply_down(&mut send, refuse(e)).await,
    };
    // A well-formed archive within the limits, or nothing is stored.
    let tmp = blob.tmp_path().to_path_buf();
    let checked = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&tmp).map_err(|e| e.to_string())?;
        archive::list(
            std::io::BufReader::new(file),
            MAX_OUTPUT_BYTES,
            MAX_OUTPUT_FILES * 4,
        )
        .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let summary = match checked {
        Ok(s) => s,
        Err(e) => {
            return reply_down(
                &mut send,
                refuse(format!("not a valid outputs archive: {e}")),
            )
            .await
        }
    };
    let stored = match blob.commit().await {
        Ok(b) => b,
        Err(e) => return reply_down(&mut send, refuse(format!("cannot store: {e}"))).await,
    };
    let row = OutputsInfo {
        task_id: task_id.clone(),
        attempt,
        epoch,
        files: summary.files,
        bytes: summary.bytes,
        archive_bytes: stored.bytes,
        sha256: stored.sha256.clone(),
        stored_ms: crate::clock::wall_ms(),
    };
    let (reply, answer) = oneshot::channel();
    let msg = CoreMsg::PutOutputs {
        name: worker.to_owned(),
        row,
        reply,
    };
    if !ctx.core.send(msg).await {
        return;
    }
    let down = match answer.await {
        Ok(Ok(after)) => match wait_durable(after).await {
            Ok(()) => {
                tracing::info!(%worker, task = %task_id, epoch, files = summary.files, bytes = summary.bytes, "outputs stored");
                AttemptDown::OutputsStored {
                    files: summary.files,
                    bytes: summary.bytes,
                    sha256: stored.sha256,
                }
            }
            Err(e) => refuse(format!("cannot record the outputs: {e}")),
        },
        Ok(Err(reason)) => AttemptDown::Fenced { reason },
        Err(_) => return,
    };
    reply_down(&mut send, down).await;
}

/// Receive `len` bytes of chunks into a new blob of at most `limit` bytes. On a write error
/// the rest of the announced bytes is still read, so the peer's stream stays in step.
async fn receive_blob<M: serde::de::DeserializeOwned>(
    ctx: &ConnCtx,
    recv: &mut FramedRecv,
    len: u64,
    limit: u64,
    unwrap: impl Fn(M) -> Result<Vec<u8>, String>,
) -> Result<crate::store::blobs::BlobWriter, String> {
    let mut writer = ctx.store.blobs().writer(limit).await;
    let mut got = 0u64;
    let mut failed: Option<String> = None;
    while got < len {
        let msg = match recv.next::<M>().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(format!("the stream ended after {got} of {len} bytes")),
            Err(e) => return Err(format!("transfer failed after {got} of {len} bytes: {e}")),
        };
        let data = unwrap(msg).map_err(|m| format!("expected an archive chunk, got {m}"))?;
        got += data.len() as u64;
        if got > len {
            return Err(format!("more than the {len} bytes announced"));
        }
        if failed.is_none() {
            match writer.as_mut() {
                Ok(w) => {
                    if let Err(e) = w.write(&data).await {
                        failed = Some(e.to_string());
                    }
                }
                Err(e) => failed = Some(e.to_string()),
            }
        }
    }
    match (failed, writer) {
        (Some(e), _) => Err(e),
        (None, Err(e)) => Err(e.to_string()),
        (None, Ok(mut w)) => {
            // The caller reads the file back to check it.
            w.flush().await.map_err(|e| e.to_string())?;
            Ok(w)
        }
    }
}

fn op_error(kind: ErrorKind, message: String) -> OperatorResponse {
    OperatorResponse::Error { kind, message }
}

/// An operator's submit with inputs (the header already read). Returns the answer and
/// whether the request stream is still in step (`false`: close it).
pub async fn submit_with_inputs(
    ctx: &ConnCtx,
    recv: &mut FramedRecv,
    spec: TaskSpec,
    archive_bytes: u64,
) -> (OperatorResponse, bool) {
    if archive_bytes > MAX_INPUT_ARCHIVE_BYTES {
        let message = format!(
            "an inputs archive of {archive_bytes} bytes is over the {MAX_INPUT_ARCHIVE_BYTES} byte limit \
             (inputs may hold {MAX_INPUT_BYTES} bytes of files); nothing was queued"
        );
        return (op_error(ErrorKind::InvalidRequest, message), false);
    }
    let blob = match receive_blob(
        ctx,
        recv,
        archive_bytes,
        MAX_INPUT_ARCHIVE_BYTES,
        |m| match m {
            OperatorRequest::Chunk { data } => Ok(data),
            other => Err(format!("{other:?}")),
        },
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            let message = format!("inputs not received: {e}; nothing was queued");
            return (op_error(ErrorKind::Internal, message), false);
        }
    };
    let tmp = blob.tmp_path().to_path_buf();
    let checked = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&tmp).map_err(|e| e.to_string())?;
        archive::list(
            std::io::BufReader::new(file),
            MAX_INPUT_BYTES,
            MAX_INPUT_ENTRIES,
        )
        .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    if let Err(e) = checked {
        let message = format!("the inputs archive is not acceptable: {e}; nothing was queued");
        return (op_error(ErrorKind::InvalidRequest, message), true);
    }
    let stored: BlobRef = match blob.commit().await {
        Ok(b) => b,
        Err(e) => {
            let message = format!("cannot store the inputs: {e}; nothing was queued");
            return (op_error(ErrorKind::Internal, message), true);
        }
    };
    let (reply, answer) = oneshot::channel();
    let msg = CoreMsg::SubmitWithInputs {
        spec,
        blob: stored,
        reply,
    };
    if !ctx.core.send(msg).await {
        return (
            op_error(ErrorKind::Internal, "coordinator shutting down".into()),
            false,
        );
    }
    let Ok((answer, after)) = answer.await else {
        return (
            op_error(ErrorKind::Internal, "coordinator shutting down".into()),
            false,
        );
    };
    match after {
        None => (answer, true),
        Some(after) => match wait_durable(after).await {
            Ok(()) => (answer, true),
            Err(e) => (op_error(ErrorKind::Internal, e), true),
        },
    }
}

async fn task_info(ctx: &ConnCtx, id: &str) -> Option<TaskInfo> {
    let (reply, answer) = oneshot::channel();
    let req = OperatorRequest::ShowTask { id: id.to_owned() };
    if !ctx.core.send(CoreMsg::Operator { req, reply }).await {
        return None;
    }
    match answer.await {
        Ok((OperatorResponse::Task(t), _)) => Some(*t),
        _ => None,
    }
}

async fn stored_outputs(ctx: &ConnCtx, id: &str) -> Result<Vec<OutputsInfo>, OperatorResponse> {
    let store = ctx.store.clone();
    let task = id.to_owned();
    match tokio::task::spawn_blocking(move || store.blob_index()?.outputs(&task)).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e)) => Err(op_error(ErrorKind::Internal, e.to_string())),
        Err(e) => Err(op_error(ErrorKind::Internal, e.to_string())),
    }
}

fn no_task(id: &str) -> OperatorResponse {
    op_error(
        ErrorKind::NotFound,
        format!("no task {id:?}; `drover tasks` lists them"),
    )
}

/// Every stored outputs record of a task.
pub async fn list_outputs(ctx: &ConnCtx, id: String) -> OperatorResponse {
    let rows = match stored_outputs(ctx, &id).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    if rows.is_empty() && task_info(ctx, &id).await.is_none() {
        return no_task(&id);
    }
    OperatorResponse::Outputs(rows)
}

/// Send one attempt's outputs archive: `OutputsArchive` then its chunks, or an error saying
/// why there is none. `Err` when the stream broke.
pub async fn send_outputs(
    ctx: &ConnCtx,
    send: &mut quinn::SendStream,
    id: String,
    attempt: Option<u32>,
) -> Result<(), ()> {
    let rows = match stored_outputs(ctx, &id).await {
        Ok(r) => r,
        Err(e) => return wire::send(send, &e).await.map_err(drop),
    };
    let chosen = match attempt {
        Some(n) => rows.iter().find(|r| r.attempt == n),
        None => rows.last(),
    };
    let Some(row) = chosen.cloned() else {
        let answer = missing_outputs(ctx, &id, attempt, &rows).await;
        return wire::send(send, &answer).await.map_err(drop);
    };
    let path = ctx.store.blobs().path(&row.sha256);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            let message = format!(
                "the outputs archive of {id} attempt {} is missing on the coordinator ({}: {e})",
                row.attempt,
                path.display()
            );
            return wire::send(send, &op_error(ErrorKind::Internal, message))
                .await
                .map_err(drop);
        }
    };
    let len = row.archive_bytes;
    wire::send(send, &OperatorResponse::OutputsArchive(row))
        .await
        .map_err(drop)?;
    send_chunks(send, &mut file, len, |data| OperatorResponse::Chunk {
        data,
    })
    .await
    .map_err(|e| tracing::warn!(task = %id, error = %e, "outputs not sent"))
}

async fn missing_outputs(
    ctx: &ConnCtx,
    id: &str,
    attempt: Option<u32>,
    rows: &[OutputsInfo],
) -> OperatorResponse {
    let Some(t) = task_info(ctx, id).await else {
        return no_task(id);
    };
    let message = if t.spec.outputs.is_empty() {
        format!(
            "task {id} declares no outputs (its spec has no `outputs` globs), so none are stored"
        )
    } else if let Some(n) = attempt {
        let have: Vec<String> = rows.iter().map(|r| r.attempt.to_string()).collect();
        if have.is_empty() {
            format!(
                "attempt {n} of task {id} stored no outputs; no attempt has stored any yet \
                 (task {}, {} attempts)",
                t.state, t.attempts
            )
        } else {
            format!(
                "attempt {n} of task {id} stored no outputs; attempts with outputs: {}",
                have.join(", ")
            )
        }
    } else {
        format!(
            "task {id} has no stored outputs yet (it is {}, {} attempts so far); outputs are \
             stored when an attempt's process ends",
            t.state, t.attempts
        )
    };
    op_error(ErrorKind::NotFound, message)
}
