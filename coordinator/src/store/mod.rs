//! The coordinator's embedded database: one SQLite file (WAL mode) for the fleet registry
//! ([`registry`]) and the task sessions ([`session`]).
//!
//! One writer thread owns the connection. Writers send commands over a channel; the thread
//! takes every command waiting, applies them in one transaction and commits once (group
//! commit), then answers each. `synchronous=FULL` makes a commit durable (WAL fsync) before any
//! caller hears "ok". Readers at start-up use the same connection before the thread starts;
//! later reads (session slices) use their own read-only connections, which WAL lets run beside
//! the writer. WAL checkpoints run beside the writer too, on a thread of their own, and the
//! WAL file's length is bounded: see [`checkpoint`].
//!
//! Schema changes go through [`MIGRATIONS`]; `meta.schema_version` records how far a file got.
//!
//! Task file archives (inputs, outputs) live beside the database as content-addressed files,
//! with their rows here: see [`blobs`].

pub mod batch;
pub mod blobs;
pub mod checkpoint;
pub mod registry;
pub mod secrets;
pub mod session;
pub mod trust;

use crate::fleet::WorkerRecord;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "drover.db";

/// Ordered schema migrations; entry N moves a database from version N to N+1.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: fleet registry.
    "CREATE TABLE workers (
        name TEXT PRIMARY KEY NOT NULL,
        state TEXT NOT NULL,
        address TEXT NOT NULL,
        version TEXT NOT NULL,
        protocol_version INTEGER NOT NULL,
        first_seen_ms INTEGER NOT NULL,
        registered_ms INTEGER NOT NULL,
        state_changed_ms INTEGER NOT NULL,
        last_heartbeat_ms INTEGER NOT NULL,
        resources TEXT NOT NULL
    ) STRICT;",
    // 1 -> 2: task sessions. `events` is append-only: rows are inserted, never updated or
    // deleted. `pos` is the event's position in its session, from 0 without gaps. Worker
    // events carry their attempt (epoch, seq) and are unique by it; coordinator events have
    // seq NULL.
    "CREATE TABLE tasks (
        id TEXT PRIMARY KEY NOT NULL,
        submit_seq INTEGER NOT NULL UNIQUE,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        submitted_ms INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE events (
        task_id TEXT NOT NULL REFERENCES tasks(id),
        pos INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        seq INTEGER,
        ts_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        PRIMARY KEY (task_id, pos)
    ) STRICT, WITHOUT ROWID;
    CREATE UNIQUE INDEX events_attempt_seq ON events (task_id, epoch, seq) WHERE seq IS NOT NULL;
    CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'session events are append-only'); END;
    CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'session events are append-only'); END;",
    // 2 -> 3: task file archives (files under blobs/sha256/, named by SHA-256). One inputs
    // archive per task, written with the task; one outputs archive per attempt.
    "CREATE TABLE task_inputs (
        task_id TEXT PRIMARY KEY NOT NULL REFERENCES tasks(id),
        sha256 TEXT NOT NULL,
        archive_bytes INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE attempt_outputs (
        task_id TEXT NOT NULL REFERENCES tasks(id),
        epoch INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        files INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        archive_bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        stored_ms INTEGER NOT NULL,
        PRIMARY KEY (task_id, epoch)
    ) STRICT;",
    // 3 -> 4: a worker's drain (issue 5), kept until undrained. NULL since: not drained.
    "ALTER TABLE workers ADD COLUMN drain_since_ms INTEGER;
    ALTER TABLE workers ADD COLUMN drain_deadline_ms INTEGER;",
    // 4 -> 5: enrollment and the certificate lifecycle (issue 8). Join tokens keep only the
    // SHA-256 of their secret; issued_certs lists what this coordinator signed (revoked_ms set
    // when revoked); revoked_workers holds names refused until reinstated.
    "CREATE TABLE join_tokens (
        id TEXT PRIMARY KEY NOT NULL,
        hash BLOB NOT NULL,
        label TEXT,
        name TEXT,
        max_uses INTEGER NOT NULL,
        uses INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        revoked INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE issued_certs (
        fingerprint TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL,
        serial TEXT NOT NULL,
        not_after_ms INTEGER NOT NULL,
        issued_ms INTEGER NOT NULL,
        revoked_ms INTEGER
    ) STRICT;
    CREATE INDEX issued_certs_name ON issued_certs (name);
    CREATE TABLE revoked_workers (
        name TEXT PRIMARY KEY NOT NULL,
        revoked_ms INTEGER NOT NULL
    ) STRICT;",
    // 5 -> 6: task secrets (issue 8), AES-256-GCM ciphertexts under the secrets key; the
    // name is the associated data.
    "CREATE TABLE secrets (
        name TEXT PRIMARY KEY NOT NULL,
        nonce BLOB NOT NULL,
        ciphertext BLOB NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        version INTEGER NOT NULL
    ) STRICT;",
    // 6 -> 7: session events in insertion order. Clustered by (task_id, pos), with a second
    // index by (task_id, epoch, seq), a group commit holding events of ~64 sessions dirtied a
    // leaf page per session in the table and another in that index: ~130 pages written to the
    // WAL (and again by the checkpoint) for ~120 small events. Rows now go at the end of a
    // rowid table, so a commit fills a few pages, plus one leaf per session in the one index,
    // (task_id, pos), which serves slices and refuses a second row at a position. No index
    // keeps (task, epoch, seq) unique: the task state machine (tasks/lifecycle.rs) accepts a
    // worker event only at the next seq of the current epoch, so a duplicate never reaches the
    // store. Every event is copied, session by session; DROP TABLE fires no DELETE trigger.
    "CREATE TABLE events_by_id (
        id INTEGER PRIMARY KEY,
        task_id TEXT NOT NULL REFERENCES tasks(id),
        pos INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        seq INTEGER,
        ts_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL
    ) STRICT;
    INSERT INTO events_by_id (task_id, pos, epoch, seq, ts_ms, kind, payload)
        SELECT task_id, pos, epoch, seq, ts_ms, kind, payload FROM events ORDER BY task_id, pos;
    DROP TABLE events;
    ALTER TABLE events_by_id RENAME TO events;
    CREATE UNIQUE INDEX events_pos ON events (task_id, pos);
    CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'session events are append-only'); END;
    CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'session events are append-only'); END;",
    // 7 -> 8: positions found through runs written by the writer, not an index. `events_pos`
    // put an entry per event on a page of its session: with 64 sessions streaming, a commit
    // wrote ~105 pages to the WAL, ~80 of them index leaves, and ingestion without the index
    // ran at 1.4x the rate with half the p99 ack latency. `event_runs` holds a session's
    // (position -> id) entries a run at a time (see session.rs); `event_runs_through` says
    // how far. Nothing is in a run yet: the first start after the upgrade writes the runs
    // that are due (sessions with RUN or more entries, entries older than LAG_ROWS) and
    // keeps the rest in memory until they are.
    "DROP INDEX events_pos;
    CREATE TABLE event_runs (
        task_id TEXT NOT NULL,
        first_pos INTEGER NOT NULL,
        ids BLOB NOT NULL,
        PRIMARY KEY (task_id, first_pos)
    ) STRICT, WITHOUT ROWID;
    INSERT INTO meta (key, value) VALUES ('event_runs_through', '0');",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database {path} has schema version {found}, newer than this build knows ({known}); run a newer drover")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error("corrupt row for worker {name:?} in {path}: {reason}")]
    Corrupt {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("the database writer has stopped")]
    Closed,
    #[error(transparent)]
    Blobs(#[from] blobs::BlobError),
}

/// One write, with whoever waits for it to be durable.
enum Command {
    PutWorkers(Vec<WorkerRecord>, Reply),
    PutTask(session::NewTask, Reply),
    AppendEvents(Vec<session::NewEvent>, Reply),
    /// A task and its inputs archive's row, in one transaction.
    PutTaskWithInputs(session::NewTask, blobs::InputsRow, Reply),
    PutOutputs(blobs::OutputsRow, Reply),
    Trust(Vec<crate::trust::TrustWrite>, Reply),
    Secrets(Vec<crate::secrets::SecretWrite>, Reply),
}

impl Command {
    fn into_reply(self) -> Reply {
        match self {
            Command::PutWorkers(_, r)
            | Command::PutTask(_, r)
            | Command::AppendEvents(_, r)
            | Command::PutTaskWithInputs(_, _, r)
            | Command::PutOutputs(_, r)
            | Command::Trust(_, r)
            | Command::Secrets(_, r) => r,
        }
    }
}

type Reply = oneshot::Sender<Result<(), String>>;

/// Resolves once a queued write is durable, or says why it is not.
pub type Durable = oneshot::Receiver<Result<(), String>>;

/// Handle to the writer thread. Dropping every handle stops the thread after it drains.
#[derive(Debug, Clone)]
pub struct Store {
    /// Commands for the writer, a core step's at once (see [`batch`]); each send is committed
    /// whole, in one transaction with whatever else is queued.
    tx: mpsc::Sender<Vec<Command>>,
    path: PathBuf,
    blobs: blobs::BlobStore,
    /// Read-only connections handed back after use: opening one parses the schema, which cost
    /// more than the read itself when every `Events` request opened its own.
    readers: Arc<Mutex<Vec<session::Reader>>>,
    /// Set (with why) once a commit has failed; see [`Store::failed`].
    failed: tokio::sync::watch::Receiver<Option<String>>,
    /// Where each session's events not yet in a run start, for readers.
    waiting: session::SharedWaiting,
}

/// Read-only connections kept for reuse (more are opened when more reads run at once).
const KEPT_READERS: usize = 4;

/// A read-only connection borrowed from the [`Store`]; goes back to its pool when dropped.
#[derive(Debug)]
pub struct PooledReader {
    reader: Option<session::Reader>,
    pool: Arc<Mutex<Vec<session::Reader>>>,
}

impl std::ops::Deref for PooledReader {
    type Target = session::Reader;
    fn deref(&self) -> &session::Reader {
        self.reader.as_ref().expect("present until drop")
    }
}

impl Drop for PooledReader {
    fn drop(&mut self) {
        if let (Some(reader), Ok(mut pool)) = (self.reader.take(), self.pool.lock()) {
            if pool.len() < KEPT_READERS {
                pool.push(reader);
            }
        }
    }
}

/// The writer thread; join it on shutdown so the last batch is committed.
#[derive(Debug)]
pub struct StoreThread(JoinHandle<()>);

impl StoreThread {
    pub fn join(self) {
        let _ = self.0.join();
    }
}

/// What a coordinator needs from the database at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    pub workers: Vec<WorkerRecord>,
    pub tasks: Vec<session::StoredTask>,
    pub trust: crate::trust::LoadedTrust,
    pub secrets: Vec<crate::secrets::StoredSecret>,
}

impl Store {
    /// Open (creating and migrating) the database in `dir`; returns the handle, the writer
    /// thread and the registry and sessions to rebuild state from.
    pub fn open(dir: &Path) -> Result<(Store, StoreThread, Loaded), StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.into(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let sq = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(sq)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sq)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sq)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(sq)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sq)?;
        migrate(&mut conn, &path)?;
        let blob_store = blobs::BlobStore::open(dir)?;
        let loaded = Loaded {
            workers: registry::load_workers(&conn, &path)?,
            tasks: session::load_tasks(&conn, &path)?,
            trust: trust::load(&conn, &path, crate::clock::wall_ms())?,
            secrets: secrets::load(&conn, &path)?,
        };
        let mut positions = session::Positions::load_and_write(&mut conn).map_err(sq)?;
        let waiting = session::SharedWaiting::default();
        positions.publish(&waiting);
        let wal = checkpoint::Wal::start(&conn, &path, checkpoint::Limits::default())?;
        let (tx, rx) = mpsc::channel();
        let (failure, failed) = tokio::sync::watch::channel(None);
        let thread_path = path.clone();
        let thread = std::thread::Builder::new()
            .name("drover-store".into())
            .spawn({
                let waiting = waiting.clone();
                move || writer(conn, positions, waiting, wal, rx, thread_path, failure)
            })
            .map_err(|source| StoreError::Thread {
                name: "drover-store",
                source,
            })?;
        let store = Store {
            tx,
            path,
            blobs: blob_store,
            readers: Arc::default(),
            failed,
            waiting,
        };
        Ok((store, StoreThread(thread), loaded))
    }

    /// Resolves with why once a commit has failed (a full or failing disk). Every write after
    /// it is refused: the state machines moved on when they queued the lost writes, so their
    /// state is ahead of the log, and the only sound state is the log's. The server stops on
    /// this, and the next start rebuilds from what is durable; nothing acknowledged is lost, as
    /// nothing of the failed commit was acknowledged.
    ///
    /// The future holds only the failure signal, not the store: the writer still stops once
    /// every handle is dropped.
    pub fn failed(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut failed = self.failed.clone();
        async move {
            let why = failed
                .wait_for(Option::is_some)
                .await
                .map(|why| why.clone().unwrap_or_default());
            match why {
                Ok(why) => why,
                // The writer is gone without a failure: the store is closing.
                Err(_) => std::future::pending().await,
            }
        }
    }

    fn submit(&self, make: impl FnOnce(Reply) -> Command) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.send(vec![make(tx)]);
        rx
    }

    /// Hands commands to the writer; if it has stopped, every reply says so.
    fn send(&self, cmds: Vec<Command>) {
        if let Err(mpsc::SendError(cmds)) = self.tx.send(cmds) {
            for cmd in cmds {
                let _ = cmd.into_reply().send(Err(StoreError::Closed.to_string()));
            }
        }
    }

    /// Queue registry records for the next group commit.
    pub fn put_workers(&self, records: Vec<WorkerRecord>) -> Durable {
        self.submit(|r| Command::PutWorkers(records, r))
    }

    /// Queue a new task for the next group commit.
    pub fn put_task(&self, task: session::NewTask) -> Durable {
        self.submit(|r| Command::PutTask(task, r))
    }

    /// Queue session events for the next group commit. The caller (the task state machine)
    /// assigns positions and has already refused stale, duplicate and out-of-order events; an
    /// event at a position already stored is skipped (and logged), never written twice.
    pub fn append_events(&self, events: Vec<session::NewEvent>) -> Durable {
        self.submit(|r| Command::AppendEvents(events, r))
    }

    /// Queue a new task with the row of its (already durable) inputs archive.
    pub fn put_task_with_inputs(
        &self,
        task: session::NewTask,
        inputs: blobs::InputsRow,
    ) -> Durable {
        self.submit(|r| Command::PutTaskWithInputs(task, inputs, r))
    }

    /// Queue the row of an attempt's (already durable) outputs archive.
    pub fn put_outputs(&self, row: blobs::OutputsRow) -> Durable {
        self.submit(|r| Command::PutOutputs(row, r))
    }

    /// Queue changes to join tokens, issued certificates and revocations.
    pub fn put_trust(&self, writes: Vec<crate::trust::TrustWrite>) -> Durable {
        self.submit(|r| Command::Trust(writes, r))
    }

    /// Queue changes to the secrets table.
    pub fn put_secrets(&self, writes: Vec<crate::secrets::SecretWrite>) -> Durable {
        self.submit(|r| Command::Secrets(writes, r))
    }

    /// The archive files beside the database.
    pub fn blobs(&self) -> &blobs::BlobStore {
        &self.blobs
    }

    /// A read-only connection for archive rows beside the writer.
    pub fn blob_index(&self) -> Result<blobs::BlobIndex, StoreError> {
        blobs::BlobIndex::open(&self.path)
    }

    /// A read-only connection for session reads beside the writer (a kept one if any is
    /// free). Each read runs in its own transaction, so a kept connection sees every commit.
    pub fn reader(&self) -> Result<PooledReader, StoreError> {
        let kept = self.readers.lock().ok().and_then(|mut pool| pool.pop());
        let reader = match kept {
            Some(r) => r,
            None => session::Reader::open(&self.path, self.waiting.clone())?,
        };
        Ok(PooledReader {
            reader: Some(reader),
            pool: self.readers.clone(),
        })
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    migrate_to(conn, path, MIGRATIONS.len())
}

/// Apply the migrations a database lacks, up to schema version `target`.
fn migrate_to(conn: &mut Connection, path: &Path, target: usize) -> Result<(), StoreError> {
    let sq = |source| StoreError::Sqlite {
        path: path.into(),
        source,
    };
    conn.execute_batch("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL) STRICT;")
        .map_err(sq)?;
    let version: i64 = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()
        .map_err(sq)?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if version as usize > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            path: path.into(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target)
        .skip(version as usize)
    {
        let tx = conn.transaction().map_err(sq)?;
        tx.execute_batch(sql).map_err(sq)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![(i + 1).to_string()],
        )
        .map_err(sq)?;
        tx.commit().map_err(sq)?;
        tracing::info!(db = %path.display(), schema_version = i + 1, "migrated database");
    }
    Ok(())
}

fn writer(
    mut conn: Connection,
    mut positions: session::Positions,
    waiting: session::SharedWaiting,
    mut wal: checkpoint::Wal,
    rx: mpsc::Receiver<Vec<Command>>,
    path: PathBuf,
    failure: tokio::sync::watch::Sender<Option<String>>,
) {
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut batch = first;
        for cmds in rx.try_iter() {
            batch.extend(cmds);
        }
        // After a failed commit nothing more is written (see `Store::failed`).
        let result = match &failed {
            Some(why) => Err(why.clone()),
            None => commit_batch(&mut conn, &mut positions, &batch).map_err(|e| {
                let why = format!("database {}: commit failed: {e}", path.display());
                tracing::error!(db = %path.display(), error = %e, "database commit failed; refusing every later write and stopping, so that the coordinator starts again from what is durable");
                failed = Some(why.clone());
                failure.send_replace(Some(why.clone()));
                why
            }),
        };
        if result.is_ok() {
            positions.publish(&waiting);
        }
        for cmd in batch {
            let _ = cmd.into_reply().send(result.clone());
        }
        // Between batches, never inside a commit: what waits for it is the next batch only.
        wal.committed(&conn);
    }
    wal.stop();
}

/// Apply a whole batch in one transaction: one fsync for every write waiting. (After a failed
/// one `positions` may be ahead of the file; nothing is written after it.)
fn commit_batch(
    conn: &mut Connection,
    positions: &mut session::Positions,
    batch: &[Command],
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for cmd in batch {
        apply(&tx, positions, cmd)?;
    }
    positions.write_due(&tx)?;
    tx.commit()
}

fn apply(
    tx: &rusqlite::Transaction<'_>,
    positions: &mut session::Positions,
    cmd: &Command,
) -> rusqlite::Result<()> {
    match cmd {
        Command::PutWorkers(records, _) => registry::put_workers(tx, records),
        Command::PutTask(task, _) => session::put_task(tx, task),
        Command::AppendEvents(events, _) => session::append_events(tx, positions, events),
        Command::PutTaskWithInputs(task, inputs, _) => {
            session::put_task(tx, task)?;
            blobs::put_inputs(tx, inputs)
        }
        Command::PutOutputs(row, _) => blobs::put_outputs(tx, row),
        Command::Trust(writes, _) => trust::apply(tx, writes),
        Command::Secrets(writes, _) => secrets::apply(tx, writes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::tests::report;
    use drover_protocol::WorkerState;

    fn record(name: &str, state: WorkerState) -> WorkerRecord {
        WorkerRecord {
            name: name.into(),
            state,
            address: "127.0.0.1:1".into(),
            version: "drover-worker 0.1.0".into(),
            protocol_version: 1,
            first_seen_ms: 1,
            registered_ms: 2,
            state_changed_ms: 3,
            last_heartbeat_ms: 4,
            resources: report(2, &["gpu"]),
            drain: None,
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_and_upsert() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread, initial) = Store::open(dir.path()).unwrap();
        assert!(initial.workers.is_empty());
        let a = store.put_workers(vec![
            record("a", WorkerState::Ready),
            record("b", WorkerState::Ready),
        ]);
        let mut drained = record("b", WorkerState::Draining);
        drained.drain = Some(drover_protocol::DrainInfo {
            since_ms: 5,
            deadline_ms: Some(600_005),
        });
        let b = store.put_workers(vec![record("a", WorkerState::Lost), drained.clone()]);
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        drop(store);
        thread.join();
        let (_s, _t, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(
            loaded.workers,
            vec![record("a", WorkerState::Lost), drained]
        );
    }

    /// A database at schema version 6 (events clustered by (task_id, pos), with the seq
    /// index) holding sessions: after the upgrade every event reads back as it was.
    #[tokio::test]
    async fn upgrade_to_insertion_ordered_events_keeps_every_event() {
        use session::NewEvent;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let mut want: Vec<(String, Vec<NewEvent>)> = Vec::new();
        {
            let mut conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            migrate_to(&mut conn, &path, 6).unwrap();
            let tx = conn.transaction().unwrap();
            // Submitted in an order that is not the ids' order; events written interleaved.
            for (n, id) in ["t2", "t10", "t1"].iter().enumerate() {
                tx.execute(
                    "INSERT INTO tasks (id, submit_seq, name, spec, submitted_ms)
                     VALUES (?1, ?2, 'n', '{}', 1)",
                    params![id, n as i64 + 1],
                )
                .unwrap();
                want.push((id.to_string(), Vec::new()));
            }
            for pos in 0..40u64 {
                for (id, events) in want.iter_mut() {
                    let e = NewEvent {
                        task_id: id.clone(),
                        pos,
                        epoch: 1 + pos / 20,
                        seq: (pos % 5 != 0).then_some(pos % 20),
                        ts_ms: 1_700_000_000_000 + pos,
                        kind: if pos % 5 == 0 { "assigned" } else { "stdout" }.into(),
                        payload: match pos {
                            7 => format!("{{\"big\":\"{}\"}}", "é".repeat(6000)),
                            8 => String::new(),
                            _ => format!("{{\"n\":{pos},\"s\":\"ü\\n\"}}"),
                        },
                    };
                    session::insert_event(&tx, &e).unwrap();
                    events.push(e);
                }
            }
            tx.commit().unwrap();
        }
        let (store, thread, loaded) = Store::open(dir.path()).unwrap();
        let got: Vec<(String, Vec<NewEvent>)> = loaded
            .tasks
            .into_iter()
            .map(|t| (t.task.id, t.events))
            .collect();
        assert_eq!(got, want, "load_tasks after the upgrade");
        let reader = store.reader().unwrap();
        for (id, events) in &want {
            assert_eq!(reader.len(id).unwrap(), events.len() as u64);
            assert_eq!(&reader.slice(id, 0, None, 1000).unwrap(), events);
            assert_eq!(reader.slice(id, 6, Some(9), 1000).unwrap(), events[6..9]);
        }
        // Appends continue at the next position; a second row at a position is still refused.
        let next = NewEvent {
            pos: 40,
            ..want[0].1[1].clone()
        };
        let mut dup = want[0].1[3].clone();
        dup.payload = "\"other\"".into();
        store
            .append_events(vec![dup, next.clone()])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reader.slice("t2", 39, None, 10).unwrap()[1], next);
        assert_eq!(reader.slice("t2", 3, Some(4), 10).unwrap(), want[0].1[3..4]);
        drop((store, reader));
        thread.join();
        let conn = Connection::open(&path).unwrap();
        let version: String = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(version, MIGRATIONS.len().to_string());
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'events' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(indexes.is_empty(), "{indexes:?}");
        let runs: i64 = conn
            .query_row("SELECT COUNT(*) FROM event_runs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            runs, 0,
            "sessions shorter than a run, and recent, wait in memory"
        );
        session::tests::assert_append_only(&conn);
    }

    /// A failed commit stops the store: that write and every later one are refused, and
    /// `failed` says why (the server stops on it; the next start rebuilds from the log).
    #[tokio::test]
    async fn a_failed_commit_refuses_every_later_write() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread, _) = Store::open(dir.path()).unwrap();
        let task = |id: &str, n: u64| session::NewTask {
            id: id.into(),
            submit_seq: n,
            name: "t".into(),
            spec_json: "{}".into(),
            submitted_ms: 1,
        };
        store.put_task(task("t1", 1)).await.unwrap().unwrap();
        // The same id again: the primary key refuses it, so the commit fails.
        let e = store.put_task(task("t1", 2)).await.unwrap().unwrap_err();
        assert!(e.contains("commit failed"), "{e}");
        let why = tokio::time::timeout(std::time::Duration::from_secs(5), store.failed())
            .await
            .expect("failed() resolves");
        assert_eq!(why, e);
        let later = store.put_task(task("t2", 3)).await.unwrap();
        assert_eq!(later, Err(e), "nothing is written after a failed commit");
        drop(store);
        thread.join();
        let (_s, _t, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.tasks.len(), 1, "only what was durable");
    }

    /// Waiting on `failed` does not keep the store open: once every handle is gone the writer
    /// stops (the server waits on both; a held handle made every shutdown hang).
    #[tokio::test]
    async fn waiting_for_a_failure_does_not_keep_the_writer_alive() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread, _) = Store::open(dir.path()).unwrap();
        let failed = store.failed();
        drop(store);
        let joined = tokio::task::spawn_blocking(move || thread.join());
        tokio::time::timeout(std::time::Duration::from_secs(10), joined)
            .await
            .expect("the writer stops once the last handle is dropped")
            .unwrap();
        drop(failed);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute(
            "UPDATE meta SET value = '99' WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
        let e = Store::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("99") && e.contains("newer"), "{e}");
    }
}
