//! Task file archives: inputs (one per task, sent with the submit) and outputs (one per
//! attempt that stored any), kept as content-addressed files beside the database, with a row
//! in SQLite naming which task or attempt each belongs to.
//!
//! Layout, in the state directory:
//! - `blobs/sha256/<hex>`: an archive named by the SHA-256 of its bytes, written once;
//! - `blobs/tmp/`: archives being received; emptied at start-up.
//!
//! Durability: a blob is written to `tmp/`, fsynced, renamed into `sha256/`, and the directory
//! fsynced, all before its row is queued; the row goes through the group-committed writer like
//! every other write. So a row never names a blob that is not on disk, and an acknowledgement
//! (a submitted task's id, `OutputsStored`) is sent only once both are durable. A crash in
//! between leaves at most an unreferenced blob.
//!
//! Why files and not SQLite BLOBs: a 64 MiB input or 256 MiB output in the database would pass
//! through the single writer thread and the WAL (written twice, checkpointed), stalling every
//! session append queued behind it. Files are written by the receiving connection task, in
//! parallel with everything else, and only a small row reaches the writer.

use super::StoreError;
use drover_protocol::task::OutputsInfo;
use drover_worker::transfer::hex;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// A task's inputs archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputsRow {
    pub task_id: String,
    pub sha256: String,
    pub archive_bytes: u64,
}

/// An attempt's outputs archive, as stored and as the operator sees it.
pub type OutputsRow = OutputsInfo;

/// A blob on disk: its name and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub sha256: String,
    pub bytes: u64,
}

/// Why a blob could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the archive is larger than the {limit} byte limit")]
    TooLarge { limit: u64 },
}

/// The `blobs/` directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl BlobStore {
    /// Make the directories under `state_dir` and empty `tmp/` of what a crash left there.
    pub fn open(state_dir: &Path) -> Result<Self, BlobError> {
        let dir = state_dir.join("blobs");
        for sub in ["sha256", "tmp"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        let tmp = dir.join("tmp");
        for item in std::fs::read_dir(&tmp).map_err(io(&tmp))?.flatten() {
            let _ = std::fs::remove_file(item.path());
        }
        Ok(BlobStore { dir })
    }

    /// Where the blob named `sha256` lives.
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join("sha256").join(sha256)
    }

    /// Start writing a new blob of at most `limit` bytes.
    pub async fn writer(&self, limit: u64) -> Result<BlobWriter, BlobError> {
        let tmp = self.dir.join("tmp").join(format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        ));
        let file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp,
            file: Some(file),
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
            limit,
        })
    }
}

/// A blob being received; removed unless [`BlobWriter::commit`] succeeds.
pub struct BlobWriter {
    store: BlobStore,
    tmp: PathBuf,
    file: Option<tokio::fs::File>,
    hash: ring::digest::Context,
    bytes: u64,
    limit: u64,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("tmp", &self.tmp)
            .field("bytes", &self.bytes)
            .field("limit", &self.limit)
            .finish()
    }
}

impl BlobWriter {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        self.bytes += data.len() as u64;
        if self.bytes > self.limit {
            return Err(BlobError::TooLarge { limit: self.limit });
        }
        self.hash.update(data);
        if let Some(f) = self.file.as_mut() {
            f.write_all(data).await.map_err(io(&self.tmp))?;
        }
        Ok(())
    }

    /// Hand every write to the OS (tokio's file buffers them): needed before the temporary
    /// file is read back through another handle.
    pub async fn flush(&mut self) -> Result<(), BlobError> {
        if let Some(f) = self.file.as_mut() {
            f.flush().await.map_err(io(&self.tmp))?;
        }
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The temporary file, for reading it back before committing (e.g. to check it; call
    /// [`BlobWriter::flush`] first).
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Flush and fsync the file, name it by its hash, and fsync the directory.
    pub async fn commit(mut self) -> Result<BlobRef, BlobError> {
        let Some(mut file) = self.file.take() else {
            return Err(io(&self.tmp)(std::io::Error::other("already committed")));
        };
        file.flush().await.map_err(io(&self.tmp))?;
        file.sync_all().await.map_err(io(&self.tmp))?;
        drop(file);
        let sha256 = hex(self.hash.clone().finish().as_ref());
        let dest = self.store.path(&sha256);
        tokio::fs::rename(&self.tmp, &dest)
            .await
            .map_err(io(&dest))?;
        let parent = self.store.dir.join("sha256");
        let dir = tokio::fs::File::open(&parent).await.map_err(io(&parent))?;
        dir.sync_all().await.map_err(io(&parent))?;
        Ok(BlobRef {
            sha256,
            bytes: self.bytes,
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

pub(super) fn put_inputs(tx: &Transaction<'_>, row: &InputsRow) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO task_inputs (task_id, sha256, archive_bytes) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![row.task_id, row.sha256, row.archive_bytes as i64])?;
    Ok(())
}

pub(super) fn put_outputs(tx: &Transaction<'_>, row: &OutputsRow) -> rusqlite::Result<()> {
    // One archive per attempt: a second store for the same (task, epoch) keeps the first.
    tx.prepare_cached(
        "INSERT INTO attempt_outputs (task_id, epoch, attempt, files, bytes, archive_bytes, sha256, stored_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
    )?
    .execute(params![
        row.task_id,
        row.epoch as i64,
        row.attempt as i64,
        row.files as i64,
        row.bytes as i64,
        row.archive_bytes as i64,
        row.sha256,
        row.stored_ms as i64
    ])?;
    Ok(())
}

/// A read-only connection for blob rows, beside the writer.
#[derive(Debug)]
pub struct BlobIndex {
    conn: Connection,
    path: PathBuf,
}

impl BlobIndex {
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Sqlite {
            path: path.into(),
            source,
        })?;
        Ok(Self {
            conn,
            path: path.into(),
        })
    }

    fn sq(&self) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// The inputs archive of a task, if it was submitted with one.
    pub fn inputs(&self, task_id: &str) -> Result<Option<InputsRow>, StoreError> {
        self.conn
            .query_row(
                "SELECT sha256, archive_bytes FROM task_inputs WHERE task_id = ?1",
                [task_id],
                |r| {
                    Ok(InputsRow {
                        task_id: task_id.to_owned(),
                        sha256: r.get(0)?,
                        archive_bytes: r.get::<_, i64>(1)? as u64,
                    })
                },
            )
            .optional()
            .map_err(self.sq())
    }

    /// Every attempt's stored outputs of a task, oldest first.
    pub fn outputs(&self, task_id: &str) -> Result<Vec<OutputsRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT epoch, attempt, files, bytes, archive_bytes, sha256, stored_ms
                 FROM attempt_outputs WHERE task_id = ?1 ORDER BY epoch",
            )
            .map_err(self.sq())?;
        let rows = stmt
            .query_map([task_id], |r| {
                Ok(OutputsInfo {
                    task_id: task_id.to_owned(),
                    epoch: r.get::<_, i64>(0)? as u64,
                    attempt: r.get::<_, i64>(1)? as u32,
                    files: r.get::<_, i64>(2)? as u64,
                    bytes: r.get::<_, i64>(3)? as u64,
                    archive_bytes: r.get::<_, i64>(4)? as u64,
                    sha256: r.get(5)?,
                    stored_ms: r.get::<_, i64>(6)? as u64,
                })
            })
            .map_err(self.sq())?;
        let out = rows.collect::<Result<Vec<_>, _>>().map_err(self.sq())?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::session::NewTask;
    use super::super::Store;
    use super::*;

    #[tokio::test]
    async fn blobs_are_content_addressed_durable_rows_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread, _) = Store::open(dir.path()).unwrap();
        let blobs = store.blobs().clone();
        let mut w = blobs.writer(100).await.unwrap();
        w.write(b"hello ").await.unwrap();
        w.write(b"world").await.unwrap();
        let tmp = w.tmp_path().to_path_buf();
        let blob = w.commit().await.unwrap();
        assert_eq!(
            blob.sha256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert_eq!(
            std::fs::read(blobs.path(&blob.sha256)).unwrap(),
            b"hello world"
        );
        assert!(!tmp.exists());

        // Over the limit: refused, and nothing left behind.
        let mut w = blobs.writer(4).await.unwrap();
        let tmp = w.tmp_path().to_path_buf();
        assert!(matches!(
            w.write(b"12345").await,
            Err(BlobError::TooLarge { limit: 4 })
        ));
        drop(w);
        assert!(!tmp.exists());

        let task = NewTask {
            id: "t1".into(),
            submit_seq: 1,
            name: "n".into(),
            spec_json: "{}".into(),
            submitted_ms: 1,
        };
        let inputs = InputsRow {
            task_id: "t1".into(),
            sha256: blob.sha256.clone(),
            archive_bytes: blob.bytes,
        };
        store
            .put_task_with_inputs(task, inputs.clone())
            .await
            .unwrap()
            .unwrap();
        let out = OutputsInfo {
            task_id: "t1".into(),
            attempt: 1,
            epoch: 1,
            files: 2,
            bytes: 11,
            archive_bytes: 3072,
            sha256: blob.sha256.clone(),
            stored_ms: 5,
        };
        store.put_outputs(out.clone()).await.unwrap().unwrap();
        let mut again = out.clone();
        again.files = 99;
        store.put_outputs(again).await.unwrap().unwrap();
        drop(store);
        thread.join();
        let (store, _t, _) = Store::open(dir.path()).unwrap();
        let index = store.blob_index().unwrap();
        assert_eq!(index.inputs("t1").unwrap(), Some(inputs));
        assert_eq!(index.inputs("t2").unwrap(), None);
        assert_eq!(index.outputs("t1").unwrap(), vec![out], "first store kept");
    }
}
