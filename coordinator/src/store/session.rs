//! Task sessions on disk: the `tasks` table (one row per submitted task, its spec) and the
//! append-only `events` table (every event of every session).
//!
//! Layout: `events` is a rowid table in insertion order (`id`), so a group commit, which holds
//! events of many sessions, appends to a few pages instead of dirtying one per session; the
//! unique index `events_pos (task_id, pos)` finds a session's events by position (slices,
//! lengths) and is the only per-session page a commit touches.
//!
//! Invariants, enforced here and by the schema:
//! - events are only ever inserted (triggers abort any UPDATE or DELETE);
//! - positions of a session run from 0 without gaps (the caller assigns them; `events_pos`
//!   refuses a second row at one position: such an event is skipped and logged, never written
//!   twice, and the rest of its batch commits);
//! - a worker event is stored at most once per (task, epoch, seq): the task state machine
//!   accepts one only at the next seq of the current epoch (anything lower is a duplicate,
//!   acknowledged again without a write), and rebuilds that from this log at start-up;
//! - events are read back exactly as stored, by position.

use super::StoreError;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction};
use std::path::{Path, PathBuf};

/// A task to record at submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTask {
    pub id: String,
    /// Submission order, from 1; never reused.
    pub submit_seq: u64,
    pub name: String,
    /// The `TaskSpec` as JSON (readable with sqlite3 at 3 a.m.).
    pub spec_json: String,
    pub submitted_ms: u64,
}

/// One event of a session, as appended and as stored: the protocol's record, so what the
/// operator reads is exactly what is on disk.
pub use drover_protocol::task::SessionEvent as NewEvent;

/// An event as stored.
pub type StoredEvent = NewEvent;

/// A task and its whole session, as loaded at start-up to rebuild state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTask {
    pub task: NewTask,
    pub events: Vec<StoredEvent>,
}

pub(super) fn put_task(tx: &Transaction<'_>, t: &NewTask) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO tasks (id, submit_seq, name, spec, submitted_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        t.id,
        t.submit_seq as i64,
        t.name,
        t.spec_json,
        t.submitted_ms as i64
    ])?;
    Ok(())
}

pub(super) fn append_events(tx: &Transaction<'_>, events: &[NewEvent]) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO events (task_id, pos, epoch, seq, ts_ms, kind, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
    )?;
    for e in events {
        let changed = insert.execute(params![
            e.task_id,
            e.pos as i64,
            e.epoch as i64,
            e.seq.map(|s| s as i64),
            e.ts_ms as i64,
            e.kind,
            e.payload
        ])?;
        if changed == 0 {
            tracing::error!(
                task = %e.task_id, pos = e.pos, epoch = e.epoch, seq = ?e.seq,
                "duplicate session event skipped (its position is already stored)"
            );
        }
    }
    Ok(())
}

fn row_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(NewEvent {
        task_id: r.get(0)?,
        pos: r.get::<_, i64>(1)? as u64,
        epoch: r.get::<_, i64>(2)? as u64,
        seq: r.get::<_, Option<i64>>(3)?.map(|s| s as u64),
        ts_ms: r.get::<_, i64>(4)? as u64,
        kind: r.get(5)?,
        payload: r.get(6)?,
    })
}

const EVENT_COLUMNS: &str = "task_id, pos, epoch, seq, ts_ms, kind, payload";

/// Every task with its whole session, in submission order.
pub(super) fn load_tasks(conn: &Connection, path: &Path) -> Result<Vec<StoredTask>, StoreError> {
    let sq = |source| StoreError::Sqlite {
        path: path.into(),
        source,
    };
    let mut tasks = conn
        .prepare("SELECT id, submit_seq, name, spec, submitted_ms FROM tasks ORDER BY submit_seq")
        .map_err(sq)?
        .query_map([], |r| {
            Ok(StoredTask {
                task: NewTask {
                    id: r.get(0)?,
                    submit_seq: r.get::<_, i64>(1)? as u64,
                    name: r.get(2)?,
                    spec_json: r.get(3)?,
                    submitted_ms: r.get::<_, i64>(4)? as u64,
                },
                events: Vec::new(),
            })
        })
        .map_err(sq)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sq)?;
    let index: std::collections::HashMap<String, usize> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.task.id.clone(), i))
        .collect();
    // In insertion order, a scan of the table (by (task_id, pos) it would be a lookup per row
    // through the index); each session comes out by position since its events are appended
    // in position order, and the sort below (linear on sorted input) makes sure of it.
    let mut stmt = conn
        .prepare(&format!("SELECT {EVENT_COLUMNS} FROM events ORDER BY id"))
        .map_err(sq)?;
    for event in stmt.query_map([], row_event).map_err(sq)? {
        let event = event.map_err(sq)?;
        if let Some(&i) = index.get(&event.task_id) {
            tasks[i].events.push(event);
        }
    }
    for t in &mut tasks {
        t.events.sort_by_key(|e| e.pos);
    }
    Ok(tasks)
}

/// A read-only connection for session slices, beside the writer (WAL readers never block it).
#[derive(Debug)]
pub struct Reader {
    conn: Connection,
    path: PathBuf,
}

impl Reader {
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

    /// Events `from..to` (end exclusive; `None`: to the end) of one session, by position, at
    /// most `limit` of them.
    pub fn slice(
        &self,
        task_id: &str,
        from: u64,
        to: Option<u64>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let sq = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let to = to.map(|t| t as i64).unwrap_or(i64::MAX);
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE task_id = ?1 AND pos >= ?2 AND pos < ?3 ORDER BY pos LIMIT ?4"
            ))
            .map_err(sq)?;
        let rows = stmt
            .query_map(params![task_id, from as i64, to, limit], row_event)
            .map_err(sq)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sq)
    }

    /// How many events a session has (its next position).
    pub fn len(&self, task_id: &str) -> Result<u64, StoreError> {
        let sq = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let n: Option<i64> = self
            .conn
            .query_row(
                "SELECT MAX(pos) + 1 FROM events WHERE task_id = ?1",
                [task_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(sq)?
            .flatten();
        Ok(n.unwrap_or(0) as u64)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::Store;
    use super::*;

    fn task(id: &str, n: u64) -> NewTask {
        NewTask {
            id: id.into(),
            submit_seq: n,
            name: "t".into(),
            spec_json: "{}".into(),
            submitted_ms: 1,
        }
    }

    fn ev(task: &str, pos: u64, epoch: u64, seq: Option<u64>) -> NewEvent {
        NewEvent {
            task_id: task.into(),
            pos,
            epoch,
            seq,
            ts_ms: 10 + pos,
            kind: "stdout".into(),
            payload: format!("{{\"n\":{pos}}}"),
        }
    }

    #[tokio::test]
    async fn append_read_slices_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread, _) = Store::open(dir.path()).unwrap();
        store.put_task(task("a", 1)).await.unwrap().unwrap();
        store.put_task(task("b", 2)).await.unwrap().unwrap();
        let first = store.append_events(vec![ev("a", 0, 0, None), ev("a", 1, 1, Some(0))]);
        let second = store.append_events(vec![ev("a", 2, 1, Some(1)), ev("b", 0, 0, None)]);
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        let reader = store.reader().unwrap();
        assert_eq!(reader.len("a").unwrap(), 3);
        assert_eq!(reader.len("nosuch").unwrap(), 0);
        let mid = reader.slice("a", 1, Some(2), 100).unwrap();
        assert_eq!(mid, vec![ev("a", 1, 1, Some(0))]);
        assert_eq!(
            reader.slice("a", 0, None, 2).unwrap().len(),
            2,
            "limit applies"
        );
        drop((store, reader));
        thread.join();
        let (_s, _t, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.tasks.len(), 2);
        assert_eq!(loaded.tasks[0].events.len(), 3);
        assert_eq!(loaded.tasks[1].events, vec![ev("b", 0, 0, None)]);
    }

    #[tokio::test]
    async fn a_second_row_at_a_position_is_skipped_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _thread, _) = Store::open(dir.path()).unwrap();
        store.put_task(task("a", 1)).await.unwrap().unwrap();
        store
            .append_events(vec![ev("a", 0, 1, Some(0))])
            .await
            .unwrap()
            .unwrap();
        let mut again = ev("a", 0, 1, Some(0));
        again.payload = "\"other\"".into();
        // A position already stored, and a new event in the same batch: the first is skipped,
        // the batch still commits.
        store
            .append_events(vec![again, ev("a", 1, 1, Some(1))])
            .await
            .unwrap()
            .unwrap();
        let got = store.reader().unwrap().slice("a", 0, None, 10).unwrap();
        assert_eq!(got, vec![ev("a", 0, 1, Some(0)), ev("a", 1, 1, Some(1))]);
    }

    #[tokio::test]
    async fn sessions_interleaved_in_commits_read_back_by_position() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread, _) = Store::open(dir.path()).unwrap();
        for (n, id) in ["b", "a", "c"].iter().enumerate() {
            store
                .put_task(task(id, n as u64 + 1))
                .await
                .unwrap()
                .unwrap();
        }
        // Commits hold events of several sessions, as under load.
        let mut want: Vec<Vec<NewEvent>> = vec![Vec::new(); 3];
        for round in 0..50u64 {
            let mut batch = Vec::new();
            for (s, id) in ["b", "a", "c"].iter().enumerate() {
                for k in 0..(s as u64 + 1) {
                    let pos = want[s].len() as u64;
                    let e = ev(id, pos, 1, Some(pos).filter(|_| (round + k) % 7 != 0));
                    want[s].push(e.clone());
                    batch.push(e);
                }
            }
            store.append_events(batch).await.unwrap().unwrap();
        }
        let reader = store.reader().unwrap();
        for (s, id) in ["b", "a", "c"].iter().enumerate() {
            let len = want[s].len() as u64;
            assert_eq!(reader.len(id).unwrap(), len);
            assert_eq!(reader.slice(id, 0, None, 10_000).unwrap(), want[s]);
            assert_eq!(
                reader.slice(id, 5, Some(9), 10_000).unwrap(),
                want[s][5..9].to_vec()
            );
            assert_eq!(reader.slice(id, len, None, 10).unwrap(), vec![]);
        }
        drop((store, reader));
        thread.join();
        let (_s, _t, loaded) = Store::open(dir.path()).unwrap();
        let ids: Vec<&str> = loaded.tasks.iter().map(|t| t.task.id.as_str()).collect();
        assert_eq!(ids, ["b", "a", "c"], "in submission order");
        for (s, t) in loaded.tasks.iter().enumerate() {
            assert_eq!(t.events, want[s]);
        }
    }

    #[tokio::test]
    async fn events_cannot_be_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _thread, _) = Store::open(dir.path()).unwrap();
        store.put_task(task("a", 1)).await.unwrap().unwrap();
        store
            .append_events(vec![ev("a", 0, 0, None)])
            .await
            .unwrap()
            .unwrap();
        let conn = Connection::open(dir.path().join(super::super::DB_FILE)).unwrap();
        assert_append_only(&conn);
    }

    /// The triggers refuse to change or remove a stored event.
    pub(crate) fn assert_append_only(conn: &Connection) {
        let e = conn
            .execute("UPDATE events SET payload = 'x'", [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("append-only"), "{e}");
        assert!(conn.execute("DELETE FROM events", []).is_err());
    }
}
