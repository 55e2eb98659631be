//! WAL checkpoints beside the writer, so that no commit waits for one, and a bound on the WAL
//! file's size.
//!
//! SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold: that
//! commit (and every ack waiting for it, and every batch queued behind it) waited for the
//! pages of ~15 commits to be copied into the database file and fsynced. The writer's
//! connection has it off (`wal_autocheckpoint=0`); instead:
//!
//! - **The checkpointer thread** owns a connection of its own and, each time the writer has
//!   written [`CHECKPOINT_FRAMES`] more WAL frames (or once it has been quiet for [`QUIET`]),
//!   runs a PASSIVE checkpoint — it copies committed frames into the database file without
//!   blocking the writer or readers — and then fsyncs the database file. While commits keep
//!   coming such a checkpoint never reaches the end of the WAL, and SQLite starts the WAL
//!   over only once one has.
//! - **The writer** therefore finishes the job when the WAL has grown past [`WRAP_FRAMES`]
//!   (the checkpointer says so, right after a second pass that leaves little behind): after
//!   answering a batch it runs a PASSIVE checkpoint itself, between its own commits, so it
//!   reaches the end — copying only the frames of the last few commits and one fsync of the
//!   database file, 1–4 ms under load on a 2-core VM — and its next commit writes the WAL from
//!   the start.
//! - **Bound:** the writer also does that after any commit that leaves the WAL file longer
//!   than [`WAL_LIMIT_BYTES`] (the checkpointer fell behind), and `journal_size_limit` cuts the
//!   file back to that length when the WAL starts over. So the WAL file stays within
//!   [`WAL_LIMIT_BYTES`] plus one batch, as long as no reader keeps a read transaction open
//!   across commits (ours hold one for the few statements of one read); in steady state it
//!   cycles at about [`WRAP_FRAMES`] frames (~34 MB with 4 KiB pages).
//!
//! Durability is SQLite's own: a checkpoint fsyncs the WAL before copying and the database
//! file before it lets the WAL start over; commits stay `synchronous=FULL`.

use super::StoreError;
use rusqlite::Connection;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// WAL frames the writer writes between background checkpoints (~512 KiB). Larger copies a
/// page rewritten by several commits (the table's last leaf) once instead of several times;
/// smaller spreads the copying, and the checkpointer's writes and fsync that the writer's own
/// fsync queues behind, into small pieces. Counted in frames, not commits: every 32 commits,
/// as before, was ~500 frames under ingestion (one burst in 32 set the p99 ack) but ~130 for
/// the small commits of short tasks; every 8 commits fixed the first and cost the second
/// ~0.1 ms of coordinator CPU per task (docs/benchmarks.md).
pub const CHECKPOINT_FRAMES: u64 = 128;

/// A writer quiet for this long gets its WAL checkpointed in full by the checkpointer (the next
/// commit then starts the WAL over at no cost to the writer).
pub const QUIET: Duration = Duration::from_millis(50);

/// WAL frames (pages, 4 KiB each, plus a 24-byte header) after which the writer brings the
/// checkpoint to the end of the WAL so that it starts over. Each time costs the writer 1–4 ms
/// between two batches; at 150,000 events/s that is every ~0.1 s. Larger makes that rarer for
/// a longer WAL file (16,384 measured no better).
pub const WRAP_FRAMES: i64 = 8192;

/// Longest the WAL file may grow (`journal_size_limit` too): past it the writer finishes a
/// checkpoint after every commit until the WAL starts over.
pub const WAL_LIMIT_BYTES: u64 = 64 << 20;

/// When to checkpoint and how long the WAL may grow; the constants above, but for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// [`CHECKPOINT_FRAMES`].
    pub checkpoint_frames: u64,
    /// [`WRAP_FRAMES`].
    pub wrap_frames: i64,
    /// [`WAL_LIMIT_BYTES`].
    pub wal_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            checkpoint_frames: CHECKPOINT_FRAMES,
            wrap_frames: WRAP_FRAMES,
            wal_bytes: WAL_LIMIT_BYTES,
        }
    }
}

/// What `PRAGMA wal_checkpoint` reported.
#[derive(Debug, Clone, Copy)]
struct Pass {
    /// Another checkpoint was running, or a writer or reader was in the way.
    busy: bool,
    /// Frames in the WAL.
    log: i64,
    /// Frames of it now in the database file.
    done: i64,
}

impl Pass {
    fn reached_end(&self) -> bool {
        !self.busy && self.done == self.log
    }
}

fn passive(conn: &Connection) -> rusqlite::Result<Pass> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok(Pass {
            busy: r.get::<_, i64>(0)? != 0,
            log: r.get(1)?,
            done: r.get(2)?,
        })
    })
}

/// The writer's side: tells the checkpointer about commits, and finishes checkpoints.
#[derive(Debug)]
pub(super) struct Wal {
    /// Frames each commit wrote, to the checkpointer.
    commits: Option<mpsc::Sender<u64>>,
    /// Set by the checkpointer: the WAL is past [`WRAP_FRAMES`].
    wrap: Arc<AtomicBool>,
    wal_path: PathBuf,
    db_path: PathBuf,
    wal_bytes: u64,
    thread: Option<JoinHandle<()>>,
}

impl Wal {
    /// Set the writer's connection up (no automatic checkpoints, the WAL length bound), empty
    /// the WAL (a migration may have filled it) and start the checkpointer on a connection of
    /// its own.
    pub(super) fn start(
        writer: &Connection,
        db_path: &Path,
        limits: Limits,
    ) -> Result<Wal, StoreError> {
        let sq = |source| StoreError::Sqlite {
            path: db_path.into(),
            source,
        };
        writer
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(sq)?;
        writer
            .pragma_update(None, "journal_size_limit", limits.wal_bytes as i64)
            .map_err(sq)?;
        writer
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(sq)?;
        let conn = Connection::open(db_path).map_err(sq)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sq)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(sq)?;
        let db = File::open(db_path).map_err(|source| StoreError::Open {
            path: db_path.into(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        let wrap = Arc::new(AtomicBool::new(false));
        let thread = {
            let (wrap, path) = (wrap.clone(), db_path.to_path_buf());
            std::thread::Builder::new()
                .name("drover-checkpoint".into())
                .spawn(move || checkpointer(conn, db, rx, wrap, path, limits))
                .map_err(|source| StoreError::Thread {
                    name: "drover-checkpoint",
                    source,
                })?
        };
        let mut wal_path = db_path.as_os_str().to_owned();
        wal_path.push("-wal");
        Ok(Wal {
            commits: Some(tx),
            wrap,
            wal_path: wal_path.into(),
            db_path: db_path.into(),
            wal_bytes: limits.wal_bytes,
            thread: Some(thread),
        })
    }

    /// After a commit, once its callers have their answers.
    pub(super) fn committed(&mut self, writer: &Connection) {
        if let Some(tx) = &self.commits {
            // One that wrote nothing still counts towards the next pass.
            let _ = tx.send(frames_written(writer).max(1));
        }
        let too_long = std::fs::metadata(&self.wal_path).is_ok_and(|m| m.len() > self.wal_bytes);
        if !(too_long || self.wrap.load(Ordering::Relaxed)) {
            return;
        }
        match passive(writer) {
            // The next commit starts the WAL over.
            Ok(pass) if pass.reached_end() => self.wrap.store(false, Ordering::Relaxed),
            // A reader still reads frames near the end, or the checkpointer is mid-pass: again
            // after the next commit.
            Ok(pass) => {
                tracing::debug!(db = %self.db_path.display(), ?pass, "WAL checkpoint did not reach the end")
            }
            Err(e) => {
                tracing::warn!(db = %self.db_path.display(), error = %e, "WAL checkpoint failed")
            }
        }
    }

    /// Stop the checkpointer (it checkpoints what is left first).
    pub(super) fn stop(&mut self) {
        self.commits = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.stop();
    }
}

/// WAL frames (pages) the connection wrote since the last call.
#[allow(unsafe_code)]
fn frames_written(conn: &Connection) -> u64 {
    let (mut written, mut highwater) = (0, 0);
    // SAFETY: the handle is valid while `conn` is borrowed, this thread is the only one using
    // the connection, and sqlite3_db_status writes only the two integers it is given.
    // SQLITE_DBSTATUS_CACHE_WRITE counts pages written to the WAL in WAL mode; the last
    // argument resets it.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_db_status(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBSTATUS_CACHE_WRITE,
            &mut written,
            &mut highwater,
            1,
        )
    };
    if rc == rusqlite::ffi::SQLITE_OK {
        written.max(0) as u64
    } else {
        0
    }
}

/// The checkpointer thread: until the writer is gone, a PASSIVE checkpoint every
/// [`CHECKPOINT_FRAMES`] frames the writer wrote, or once its commits pause.
fn checkpointer(
    conn: Connection,
    db: File,
    commits: mpsc::Receiver<u64>,
    wrap: Arc<AtomicBool>,
    path: PathBuf,
    limits: Limits,
) {
    let pass = || -> Result<Pass, String> {
        let pass = passive(&conn).map_err(|e| e.to_string())?;
        // SQLite fsyncs the database file only when a checkpoint reaches the end of the WAL;
        // done here, the writer's final pass has only its last pages left to flush.
        db.sync_data().map_err(|e| e.to_string())?;
        Ok(pass)
    };
    loop {
        let Ok(first) = commits.recv() else {
            return;
        };
        let (mut frames, mut writer_gone) = (first, false);
        while frames < limits.checkpoint_frames {
            match commits.recv_timeout(QUIET) {
                Ok(n) => frames += n,
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    writer_gone = true;
                    break;
                }
            }
        }
        // Once the WAL is long, ask the writer to start it over, after a second pass copying
        // what came in during the first. Even a pass that reached the end does not let the
        // writer start over by itself: its transaction already open then reads frames it
        // copied, so the WAL goes on growing until a checkpoint ends between two of them.
        let result = pass().and_then(|first| {
            if first.log < limits.wrap_frames {
                return Ok(());
            }
            if !first.reached_end() {
                pass()?;
            }
            wrap.store(true, Ordering::Relaxed);
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!(db = %path.display(), error = %e, "background WAL checkpoint failed");
        }
        if writer_gone {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    const PAGE: u64 = 4096 + 24;

    fn db(dir: &Path) -> (Connection, PathBuf) {
        let path = dir.join("t.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, s INTEGER NOT NULL, v TEXT NOT NULL) STRICT;
             CREATE INDEX t_s ON t (s, id);",
        )
        .unwrap();
        (conn, path)
    }

    /// `commits` commits of 8 rows over 8 "sessions" (~10 pages each), `committed` after each;
    /// returns the longest the WAL file got.
    fn write(conn: &mut Connection, wal: &mut Wal, path: &Path, commits: i64) -> u64 {
        let mut longest = 0;
        for c in 0..commits {
            let tx = conn.transaction().unwrap();
            for s in 0..8 {
                tx.execute(
                    "INSERT INTO t (s, v) VALUES (?1, ?2)",
                    params![s, format!("{c}:{}", "x".repeat(300))],
                )
                .unwrap();
            }
            tx.commit().unwrap();
            wal.committed(conn);
            let mut p = path.as_os_str().to_owned();
            p.push("-wal");
            longest = longest.max(std::fs::metadata(&p).map_or(0, |m| m.len()));
        }
        longest
    }

    fn rows(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn frames_written_counts_the_pages_a_commit_put_in_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, path) = db(dir.path());
        frames_written(&conn);
        let wal_frames = || {
            let mut p = path.as_os_str().to_owned();
            p.push("-wal");
            std::fs::metadata(&p).map_or(0, |m| m.len()) / PAGE
        };
        let before = wal_frames();
        let tx = conn.transaction().unwrap();
        for s in 0..40 {
            tx.execute(
                "INSERT INTO t (s, v) VALUES (?1, ?2)",
                params![s, "x".repeat(1000)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        let wrote = frames_written(&conn);
        assert_eq!(wrote, wal_frames() - before, "as the WAL file grew");
        assert!(wrote >= 10, "40 KB of rows in {wrote} frames");
        assert_eq!(frames_written(&conn), 0, "reset by the call before");
    }

    #[test]
    fn the_wal_starts_over_once_past_wrap_frames() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, path) = db(dir.path());
        // No length bound to fall back on: only the wrap keeps the WAL short.
        let limits = Limits {
            checkpoint_frames: 40,
            wrap_frames: 100,
            wal_bytes: 1 << 40,
        };
        let mut wal = Wal::start(&conn, &path, limits).unwrap();
        // ~6,000 frames written in all; the WAL starts over every ~100 (give or take the
        // commits a busy machine lets through before the checkpointer's next pass).
        let longest = write(&mut conn, &mut wal, &path, 600);
        assert!(longest <= 1500 * PAGE, "WAL grew to {longest} bytes");
        wal.stop();
        drop(conn);
        let conn = Connection::open(&path).unwrap();
        assert_eq!(rows(&conn), 600 * 8);
    }

    #[test]
    fn a_checkpointer_that_falls_behind_does_not_let_the_wal_grow_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, path) = db(dir.path());
        // The background pass never comes while commits keep coming: only the writer's bound.
        let limits = Limits {
            checkpoint_frames: u64::MAX,
            wrap_frames: i64::MAX,
            wal_bytes: 200 * PAGE,
        };
        let mut wal = Wal::start(&conn, &path, limits).unwrap();
        let longest = write(&mut conn, &mut wal, &path, 300);
        // One commit's frames past the limit at most (the commit that crossed it).
        assert!(
            longest <= limits.wal_bytes + 30 * PAGE,
            "WAL grew to {longest} bytes"
        );
        assert_eq!(rows(&conn), 300 * 8);
    }

    #[test]
    fn a_quiet_writer_gets_its_wal_checkpointed_in_full() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, path) = db(dir.path());
        let mut wal = Wal::start(&conn, &path, Limits::default()).unwrap();
        write(&mut conn, &mut wal, &path, 20);
        // Pages the database has (the WAL's newer ones included) against what the database
        // file holds: equal once every frame is copied in. Asking SQLite for a checkpoint
        // here would do the checkpointer's work for it.
        let want: u64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))
            .unwrap() as u64
            * 4096;
        let on_disk = || std::fs::metadata(&path).unwrap().len();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while on_disk() < want {
            assert!(
                std::time::Instant::now() < deadline,
                "not checkpointed: {} of {want} bytes",
                on_disk()
            );
            std::thread::sleep(QUIET);
        }
    }
}
