//! An attempt's files: its inputs, fetched from the coordinator and unpacked into the fresh
//! workspace before the process starts, and its outputs, matched by the spec's globs when the
//! process has ended (however it ended), packed and stored on the coordinator.
//!
//! Each transfer has its own QUIC stream (first frame [`AttemptUp::FetchInputs`] or
//! [`AttemptUp::PutOutputs`]), apart from the attempt's event stream, and moves the archive in
//! chunks (see [`crate::transfer`]). Archives pass through a file under
//! `work_dir/transfers/`, never whole in memory, and the file is removed afterwards.
//!
//! What is collected as outputs, and how, is in [`crate::outputs`].

use crate::archive::{self, UnpackOptions};
use crate::outputs::{collect_outputs, outputs_events, pack};
use crate::transfer::{self, TransferError};
use crate::wire::{self, FramedRecv};
use drover_protocol::task::{MAX_INPUT_ARCHIVE_BYTES, MAX_INPUT_BYTES};
use drover_protocol::{AttemptDown, AttemptUp};
use serde_json::json;
use std::fs;
use std::path::{Path, PathBuf};

/// Most entries an inputs archive may hold.
pub const MAX_INPUT_ENTRIES: u64 = 200_000;

/// Why inputs could not be put in place or outputs could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("cannot open a stream to the coordinator: {0}")]
    Stream(String),
    #[error("transfer failed: {0}")]
    Transfer(#[from] TransferError),
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the coordinator fenced this attempt: {0}")]
    Fenced(String),
    #[error("the coordinator refused: {0}")]
    Refused(String),
    #[error("the inputs archive arrived damaged (SHA-256 {got}, expected {want})")]
    Digest { got: String, want: String },
    #[error("the coordinator announced an inputs archive of {0} bytes, over the limit")]
    TooLarge(u64),
    #[error("unexpected answer from the coordinator: {0}")]
    Unexpected(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WorkspaceError + '_ {
    move |source| WorkspaceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file under `work_dir/transfers/` removed when dropped.
struct TempArchive(PathBuf);

impl TempArchive {
    fn new(work_dir: &Path, task_id: &str, epoch: u64, what: &str) -> Result<Self, WorkspaceError> {
        let dir = work_dir.join("transfers");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(TempArchive(
            dir.join(format!("{task_id}-{epoch}-{what}.tar")),
        ))
    }
}

impl Drop for TempArchive {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// What [`receive_inputs`] put in the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputsReport {
    pub files: u64,
    pub bytes: u64,
    pub archive_bytes: u64,
}

/// Fetch the attempt's inputs and unpack them into `workspace`, which is emptied first so
/// every attempt starts from a fresh copy.
pub async fn receive_inputs(
    conn: &quinn::Connection,
    work_dir: &Path,
    task_id: &str,
    epoch: u64,
    workspace: &Path,
) -> Result<InputsReport, WorkspaceError> {
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| WorkspaceError::Stream(e.to_string()))?;
    let mut recv = FramedRecv::new(recv);
    let ask = AttemptUp::FetchInputs {
        task_id: task_id.to_owned(),
        epoch,
    };
    wire::send(&mut send, &ask)
        .await
        .map_err(TransferError::from)?;
    let _ = send.finish();
    let (archive_bytes, want) = match recv
        .next::<AttemptDown>()
        .await
        .map_err(TransferError::from)?
    {
        Some(AttemptDown::Inputs {
            archive_bytes,
            sha256,
        }) => (archive_bytes, sha256),
        Some(AttemptDown::Fenced { reason }) => return Err(WorkspaceError::Fenced(reason)),
        Some(AttemptDown::Refused { reason }) => return Err(WorkspaceError::Refused(reason)),
        other => return Err(WorkspaceError::Unexpected(format!("{other:?}"))),
    };
    if archive_bytes > MAX_INPUT_ARCHIVE_BYTES {
        return Err(WorkspaceError::TooLarge(archive_bytes));
    }
    let temp = TempArchive::new(work_dir, task_id, epoch, "inputs")?;
    let mut file = tokio::fs::File::create(&temp.0)
        .await
        .map_err(io_err(&temp.0))?;
    let got = transfer::recv_chunks(&mut recv, &mut file, archive_bytes, |m| match m {
        AttemptDown::Chunk { data } => Ok(data),
        other => Err(other),
    })
    .await?;
    drop(file);
    if got != want {
        return Err(WorkspaceError::Digest { got, want });
    }
    let workspace = workspace.to_path_buf();
    let summary = tokio::task::spawn_blocking(move || -> Result<_, WorkspaceError> {
        if workspace.exists() {
            fs::remove_dir_all(&workspace).map_err(io_err(&workspace))?;
        }
        fs::create_dir_all(&workspace).map_err(io_err(&workspace))?;
        let file = fs::File::open(&temp.0).map_err(io_err(&temp.0))?;
        let opts = UnpackOptions {
            overwrite: false,
            max_bytes: MAX_INPUT_BYTES,
            max_entries: MAX_INPUT_ENTRIES,
        };
        Ok(archive::unpack(
            std::io::BufReader::new(file),
            &workspace,
            opts,
        )?)
    })
    .await
    .map_err(|e| WorkspaceError::Unexpected(e.to_string()))??;
    Ok(InputsReport {
        files: summary.files,
        bytes: summary.bytes,
        archive_bytes,
    })
}

/// Collect, pack and store the attempt's outputs; returns the session events that tell what
/// happened (`outputs_stored`, `outputs_over_limit`, or `outputs_failed`).
pub async fn store_outputs(
    conn: &quinn::Connection,
    work_dir: &Path,
    task_id: &str,
    epoch: u64,
    workspace: &Path,
    globs: &[String],
) -> Vec<(String, String)> {
    match try_store_outputs(conn, work_dir, task_id, epoch, workspace, globs).await {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(task = %task_id, epoch, error = %e, "outputs not stored");
            vec![(
                "outputs_failed".into(),
                json!({ "error": e.to_string() }).to_string(),
            )]
        }
    }
}

async fn try_store_outputs(
    conn: &quinn::Connection,
    work_dir: &Path,
    task_id: &str,
    epoch: u64,
    workspace: &Path,
    globs: &[String],
) -> Result<Vec<(String, String)>, WorkspaceError> {
    let temp = TempArchive::new(work_dir, task_id, epoch, "outputs")?;
    let (ws, gl, at) = (workspace.to_path_buf(), globs.to_vec(), temp.0.clone());
    let (collected, archive_bytes) = tokio::task::spawn_blocking(move || {
        let collected = collect_outputs(&ws, &gl)?;
        let size = pack(&collected.files, &at)?;
        Ok::<_, WorkspaceError>((collected, size))
    })
    .await
    .map_err(|e| WorkspaceError::Unexpected(e.to_string()))??;

    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| WorkspaceError::Stream(e.to_string()))?;
    let mut recv = FramedRecv::new(recv);
    let put = AttemptUp::PutOutputs {
        task_id: task_id.to_owned(),
        epoch,
        archive_bytes,
    };
    wire::send(&mut send, &put)
        .await
        .map_err(TransferError::from)?;
    let mut file = tokio::fs::File::open(&temp.0)
        .await
        .map_err(io_err(&temp.0))?;
    let sent = transfer::send_chunks(&mut send, &mut file, archive_bytes, |data| {
        AttemptUp::Chunk { data }
    })
    .await;
    // The coordinator may have refused early; its answer says why better than the write error.
    let reply = recv.next::<AttemptDown>().await;
    let (files, bytes, sha256) = match reply {
        Ok(Some(AttemptDown::OutputsStored {
            files,
            bytes,
            sha256,
        })) => (files, bytes, sha256),
        Ok(Some(AttemptDown::Fenced { reason })) => return Err(WorkspaceError::Fenced(reason)),
        Ok(Some(AttemptDown::Refused { reason })) => return Err(WorkspaceError::Refused(reason)),
        Ok(other) => {
            sent?;
            return Err(WorkspaceError::Unexpected(format!("{other:?}")));
        }
        Err(e) => {
            sent?;
            return Err(TransferError::from(e).into());
        }
    };
    let _ = send.finish();
    Ok(outputs_events(
        &collected,
        globs,
        files,
        bytes,
        archive_bytes,
        &sha256,
    ))
}

/// Where the executor reports events: (kind, JSON payload).
pub type Emit = tokio::sync::mpsc::Sender<(String, String)>;

/// Before the process starts: when the spec has inputs, put them in the workspace and emit
/// `inputs_unpacked`. On failure returns the message for the attempt's `exited` event.
pub async fn prepare_inputs(
    conn: &quinn::Connection,
    work_dir: &Path,
    a: &drover_protocol::Assignment,
    workspace: &Path,
    tx: &Emit,
) -> Result<(), String> {
    if a.spec.inputs.is_empty() {
        return Ok(());
    }
    match receive_inputs(conn, work_dir, &a.task_id, a.epoch, workspace).await {
        Ok(r) => {
            let payload =
                json!({ "files": r.files, "bytes": r.bytes, "archive_bytes": r.archive_bytes });
            let _ = tx
                .send(("inputs_unpacked".into(), payload.to_string()))
                .await;
            Ok(())
        }
        Err(e) => {
            tracing::warn!(task = %a.task_id, epoch = a.epoch, error = %e, "inputs not unpacked");
            Err(format!(
                "could not put the task's inputs in its workspace: {e}"
            ))
        }
    }
}

/// After the process ended (however it ended): when the spec has outputs, store them and
/// emit what happened, before the attempt's `exited` event.
pub async fn finish_outputs(
    conn: &quinn::Connection,
    work_dir: &Path,
    a: &drover_protocol::Assignment,
    workspace: &Path,
    tx: &Emit,
) {
    if a.spec.outputs.is_empty() {
        return;
    }
    for event in store_outputs(
        conn,
        work_dir,
        &a.task_id,
        a.epoch,
        workspace,
        &a.spec.outputs,
    )
    .await
    {
        let _ = tx.send(event).await;
    }
}
