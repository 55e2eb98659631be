//! The coordinator's embedded database: one SQLite file (WAL mode) for the fleet registry and,
//! in later schema versions, task sessions.
//!
//! One writer thread owns the connection. Writers send commands over a channel; the thread
//! takes every command waiting, applies them in one transaction and commits once (group
//! commit), then answers each. `synchronous=FULL` makes a commit durable (WAL fsync) before any
//! caller hears "ok". Readers at start-up use the same connection before the thread starts.
//!
//! Schema changes go through [`MIGRATIONS`]; `meta.schema_version` records how far a file got.

use crate::fleet::WorkerRecord;
use drover_protocol::{ResourceReport, WorkerState};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
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
    #[error("the database writer has stopped")]
    Closed,
}

enum Command {
    PutWorkers(Vec<WorkerRecord>, oneshot::Sender<Result<(), String>>),
}

/// Handle to the writer thread. Dropping every handle stops the thread after it drains.
#[derive(Debug, Clone)]
pub struct Store {
    tx: mpsc::Sender<Command>,
}

/// The writer thread; join it on shutdown so the last batch is committed.
#[derive(Debug)]
pub struct StoreThread(JoinHandle<()>);

impl StoreThread {
    pub fn join(self) {
        let _ = self.0.join();
    }
}

impl Store {
    /// Open (creating and migrating) the database in `dir`; returns the handle, the writer
    /// thread and the stored registry.
    pub fn open(dir: &Path) -> Result<(Store, StoreThread, Vec<WorkerRecord>), StoreError> {
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
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sq)?;
        migrate(&mut conn, &path)?;
        let workers = load_workers(&conn, &path)?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("drover-store".into())
            .spawn(move || writer(conn, rx, path))
            .map_err(|source| StoreError::CreateDir {
                path: dir.into(),
                source,
            })?;
        Ok((Store { tx }, StoreThread(thread), workers))
    }

    /// Queue records for the next group commit; the receiver resolves once they are durable.
    pub fn put_workers(&self, records: Vec<WorkerRecord>) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::SendError(Command::PutWorkers(_, tx))) =
            self.tx.send(Command::PutWorkers(records, tx))
        {
            let _ = tx.send(Err(StoreError::Closed.to_string()));
        }
        rx
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
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
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
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

fn load_workers(conn: &Connection, path: &Path) -> Result<Vec<WorkerRecord>, StoreError> {
    let sq = |source| StoreError::Sqlite {
        path: path.into(),
        source,
    };
    let mut stmt = conn
        .prepare(
            "SELECT name, state, address, version, protocol_version, first_seen_ms, registered_ms,
                    state_changed_ms, last_heartbeat_ms, resources FROM workers ORDER BY name",
        )
        .map_err(sq)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                [
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, i64>(8)?,
                ],
                r.get::<_, String>(9)?,
            ))
        })
        .map_err(sq)?;
    let mut out = Vec::new();
    for row in rows {
        let (name, state, address, version, proto, times, resources) = row.map_err(sq)?;
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.into(),
            name: name.clone(),
            reason,
        };
        let state: WorkerState = state.parse().map_err(corrupt)?;
        let resources: ResourceReport =
            serde_json::from_str(&resources).map_err(|e| corrupt(e.to_string()))?;
        let t = times.map(|t| t.max(0) as u64);
        out.push(WorkerRecord {
            name: name.clone(),
            state,
            address,
            version,
            protocol_version: u16::try_from(proto).unwrap_or(0),
            first_seen_ms: t[0],
            registered_ms: t[1],
            state_changed_ms: t[2],
            last_heartbeat_ms: t[3],
            resources,
        });
    }
    Ok(out)
}

fn writer(mut conn: Connection, rx: mpsc::Receiver<Command>, path: PathBuf) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = commit_batch(&mut conn, &batch).map_err(|e| {
            tracing::error!(db = %path.display(), error = %e, "database commit failed");
            format!("database {}: {e}", path.display())
        });
        for Command::PutWorkers(_, reply) in batch {
            let _ = reply.send(result.clone());
        }
    }
}

fn commit_batch(conn: &mut Connection, batch: &[Command]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut put = tx.prepare_cached(
            "INSERT INTO workers (name, state, address, version, protocol_version, first_seen_ms,
                 registered_ms, state_changed_ms, last_heartbeat_ms, resources)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT(name) DO UPDATE SET state = excluded.state, address = excluded.address,
                 version = excluded.version, protocol_version = excluded.protocol_version,
                 registered_ms = excluded.registered_ms, state_changed_ms = excluded.state_changed_ms,
                 last_heartbeat_ms = excluded.last_heartbeat_ms, resources = excluded.resources",
        )?;
        for Command::PutWorkers(records, _) in batch {
            for r in records {
                let resources = serde_json::to_string(&r.resources).unwrap_or_else(|_| "{}".into());
                put.execute(params![
                    r.name,
                    r.state.as_str(),
                    r.address,
                    r.version,
                    r.protocol_version,
                    r.first_seen_ms as i64,
                    r.registered_ms as i64,
                    r.state_changed_ms as i64,
                    r.last_heartbeat_ms as i64,
                    resources
                ])?;
            }
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::tests::report;

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
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_and_upsert() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread, initial) = Store::open(dir.path()).unwrap();
        assert!(initial.is_empty());
        let a = store.put_workers(vec![
            record("a", WorkerState::Ready),
            record("b", WorkerState::Ready),
        ]);
        let b = store.put_workers(vec![record("a", WorkerState::Lost)]);
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        drop(store);
        thread.join();
        let (_s, _t, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(
            loaded,
            vec![
                record("a", WorkerState::Lost),
                record("b", WorkerState::Ready)
            ]
        );
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
