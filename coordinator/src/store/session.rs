//! Task sessions on disk: the `tasks` table (one row per submitted task, its spec), the
//! append-only `events` table (every event of every session), and `event_runs`, which finds a
//! session's events by position.
//!
//! Layout: `events` is a rowid table in insertion order (`id`), so a group commit, which holds
//! events of many sessions, appends to a few pages instead of dirtying one per session. An
//! index by (task, position) would put each event's entry on a page of its session — with 64
//! sessions streaming, three quarters of the pages a commit wrote, and the cost that set the
//! ack latency. Instead the writer keeps each session's newest (position → id) entries in
//! memory ([`Positions`]) and writes them as one row of `event_runs` — `(task_id,
//! first_pos) → ids`, the ids packed — once it has [`RUN`] of them or they are [`LAG_ROWS`]
//! events old; a commit writes about as many entries as it appended. After each commit the
//! writer publishes, per session with entries waiting, the id of its first one ([`Waiting`]).
//! A read of a session takes its events below that id through the runs and the rest by a scan
//! of the rows from it — at most [`LAG_ROWS`] events plus a commit's; for a session with
//! nothing waiting, only the rows committed since the read looked. The meta row
//! `event_runs_through` says how far the runs go for every session (every event with `id` ≤
//! it is in a run; it trails by up to [`LAG_ROWS`] more, as it is moved on in steps of that);
//! at start-up the entries not yet in a run are read back from the rows after it.
//!
//! Invariants, enforced here and by the schema:
//! - events are only ever inserted (triggers abort any UPDATE or DELETE);
//! - positions of a session run from 0 without gaps (the caller assigns them); an event at a
//!   position at or below the session's last stored one is skipped and logged, never written
//!   twice, and the rest of its batch commits;
//! - a worker event is stored at most once per (task, epoch, seq): the task state machine
//!   accepts one only at the next seq of the current epoch (anything lower is a duplicate,
//!   acknowledged again without a write), and rebuilds that from this log at start-up;
//! - events are read back exactly as stored, by position.

use super::StoreError;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// A session's entries wait in memory until there are this many, then go into one run.
pub const RUN: usize = 128;

/// Most entries in one run (8 bytes each), so a row stays within a page.
const RUN_MAX: usize = 256;

/// Entries wait no longer than this many events: a read of a session with entries waiting
/// scans at most these rows (plus a commit's) beyond the runs.
pub const LAG_ROWS: i64 = 1_024;

/// The meta key under which every event with a lower or equal id is in a run.
const THROUGH_KEY: &str = "event_runs_through";

/// What readers need from the writer to split a read between the runs and the rows: as of the
/// last commit, each session's first entry not yet in a run, and the highest event id.
/// Published after the commit, never before, so a reader that looks here and then opens its
/// snapshot finds in that snapshot's runs every event of the session below the bound.
#[derive(Debug, Default)]
pub struct Waiting {
    first: HashMap<String, i64>,
    last_id: i64,
}

impl Waiting {
    /// Every event of `task_id` with a lower id is in a run (and committed).
    fn bound(&self, task_id: &str) -> i64 {
        self.first.get(task_id).copied().unwrap_or(self.last_id + 1)
    }
}

/// [`Waiting`], shared by the writer and the readers.
pub type SharedWaiting = std::sync::Arc<std::sync::Mutex<Waiting>>;

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

/// The writer's view of `event_runs`: per session, the entries not yet in a run.
#[derive(Debug, Default)]
pub(super) struct Positions {
    /// Per session, its events not yet in a run, oldest first: (pos, id).
    pending: HashMap<String, Vec<(u64, i64)>>,
    /// The sessions of `pending` by the id of their first entry (ids are unique: one session
    /// per key), so that a commit finds the entries due for their age, and the mark, without
    /// a pass over every session waiting (hundreds when many short tasks run).
    by_first: BTreeMap<i64, String>,
    /// The sessions of `pending` with at least [`RUN`] entries.
    full: HashSet<String>,
    /// Every event with an id up to this is in a run (as stored in meta).
    through: i64,
    /// The highest event id written.
    last_id: i64,
    /// Events appended since the last [`Positions::write_due`].
    appended: usize,
    /// Sessions whose first waiting entry changed since the last [`Positions::publish`].
    touched: Vec<String>,
}

impl Positions {
    /// Reads back where the runs stand, and the entries they lack, from the database.
    pub(super) fn load(conn: &Connection) -> rusqlite::Result<Positions> {
        let through = read_through(conn)?;
        let mut positions = Positions {
            through,
            last_id: through,
            ..Positions::default()
        };
        let mut stmt =
            conn.prepare("SELECT task_id, pos, id FROM events WHERE id > ?1 ORDER BY id")?;
        let mut rows = stmt.query([through])?;
        while let Some(r) = rows.next()? {
            positions.record(
                &r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get(2)?,
            );
        }
        // Some may be in a run already (a session's run went in while an older entry of
        // another held the mark back).
        for (task, v) in &mut positions.pending {
            let covered = runs_end(conn, task)?;
            v.retain(|&(pos, _)| pos >= covered);
        }
        positions.pending.retain(|_, v| !v.is_empty());
        positions.reindex();
        Ok(positions)
    }

    /// `by_first` and `full` as `pending` makes them.
    fn index(&self) -> (BTreeMap<i64, String>, HashSet<String>) {
        let by_first = self
            .pending
            .iter()
            .filter_map(|(task, v)| v.first().map(|&(_, id)| (id, task.clone())))
            .collect();
        let full = self
            .pending
            .iter()
            .filter(|(_, v)| v.len() >= RUN)
            .map(|(task, _)| task.clone())
            .collect();
        (by_first, full)
    }

    /// `by_first` and `full` made again from `pending`.
    fn reindex(&mut self) {
        (self.by_first, self.full) = self.index();
    }

    /// Whether `by_first` and `full` say what `pending` does (checked in debug builds).
    fn index_holds(&self) -> bool {
        let (by_first, full) = self.index();
        by_first == self.by_first && full == self.full
    }

    /// [`Positions::load`], then writes the runs already due (after an upgrade, every
    /// session's but the short recent ones), so reads do not scan a long tail.
    pub(super) fn load_and_write(conn: &mut Connection) -> rusqlite::Result<Positions> {
        let mut positions = Positions::load(conn)?;
        let tx = conn.transaction()?;
        positions.write_due(&tx)?;
        tx.commit()?;
        Ok(positions)
    }

    /// After a commit: tells readers where each changed session's waiting entries start.
    pub(super) fn publish(&mut self, waiting: &SharedWaiting) {
        let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
        for task in self.touched.drain(..) {
            match self.pending.get(&task).and_then(|v| v.first()) {
                Some(&(_, id)) => w.first.insert(task, id),
                None => w.first.remove(&task),
            };
        }
        w.last_id = self.last_id;
    }

    fn record(&mut self, task_id: &str, pos: u64, id: i64) {
        match self.pending.get_mut(task_id) {
            Some(v) => {
                v.push((pos, id));
                if v.len() == RUN {
                    self.full.insert(task_id.to_owned());
                }
            }
            None => {
                self.pending.insert(task_id.to_owned(), vec![(pos, id)]);
                self.by_first.insert(id, task_id.to_owned());
                self.touched.push(task_id.to_owned());
            }
        }
        self.last_id = self.last_id.max(id);
        self.appended += 1;
    }

    /// The position a session's next event must have at least.
    fn next_pos(&self, tx: &Transaction<'_>, task_id: &str) -> rusqlite::Result<u64> {
        match self.pending.get(task_id).and_then(|v| v.last()) {
            Some(&(pos, _)) => Ok(pos + 1),
            // Nothing waiting: every event of the session is in a run.
            None => runs_end(tx, task_id),
        }
    }

    /// Before the commit: writes the runs that are due and moves `event_runs_through` on
    /// (in steps of [`LAG_ROWS`]).
    /// Sessions streaming side by side fill their runs at the same pace; written all in the
    /// commit where they fill, they would make that commit many times longer than the others
    /// (its acks waiting), so each commit writes about as many entries as it appended, plus
    /// one run: entries held back for age first (they hold the mark back), then the fullest.
    pub(super) fn write_due(&mut self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let old = self.last_id - LAG_ROWS;
        let len = |task: &String| self.pending.get(task).map_or(0, Vec::len);
        let mut due: Vec<(bool, usize, &String)> = self
            .by_first
            .range(..=old)
            .map(|(_, task)| (true, len(task), task))
            .collect();
        due.extend(
            self.full
                .iter()
                .filter(|task| {
                    let first = self.pending.get(*task).and_then(|v| v.first());
                    first.is_some_and(|&(_, id)| id > old)
                })
                .map(|task| (false, len(task), task)),
        );
        if !due.is_empty() {
            due.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
            let mut budget = self.appended + RUN;
            let mut chosen = Vec::new();
            for (_, n, task) in due {
                if budget == 0 {
                    break;
                }
                budget = budget.saturating_sub(n);
                chosen.push(task.clone());
            }
            let mut insert = tx.prepare_cached(
                "INSERT INTO event_runs (task_id, first_pos, ids) VALUES (?1, ?2, ?3)",
            )?;
            for task in chosen {
                let entries = self.pending.remove(&task).unwrap_or_default();
                if let Some(&(_, first)) = entries.first() {
                    self.by_first.remove(&first);
                }
                self.full.remove(&task);
                self.touched.push(task.clone());
                // A run holds consecutive positions (a gap, which the caller never leaves,
                // starts another), at most RUN_MAX.
                let mut rest = &entries[..];
                while let Some(&(first, _)) = rest.first() {
                    let n = rest
                        .iter()
                        .take(RUN_MAX)
                        .enumerate()
                        .take_while(|&(i, &(pos, _))| pos == first + i as u64)
                        .count();
                    let ids: Vec<u8> = rest[..n]
                        .iter()
                        .flat_map(|&(_, id)| id.to_le_bytes())
                        .collect();
                    insert.execute(params![task, first as i64, ids])?;
                    rest = &rest[n..];
                }
            }
        }
        self.appended = 0;
        debug_assert!(self.index_holds(), "the index of waiting sessions drifted");
        let through = self
            .by_first
            .first_key_value()
            .map_or(self.last_id, |(&id, _)| id - 1);
        // Only start-up reads the mark (readers use what `publish` gives them), and a lower
        // one is still right there: moved on a step at a time, it costs a commit its page
        // only once per LAG_ROWS events, and start-up reads back at most that many more rows.
        if through >= self.through + LAG_ROWS {
            tx.prepare_cached("UPDATE meta SET value = ?2 WHERE key = ?1")?
                .execute(params![THROUGH_KEY, through.to_string()])?;
            self.through = through;
        }
        Ok(())
    }
}

/// The position after a session's last run (0 without one).
fn runs_end(conn: &Connection, task_id: &str) -> rusqlite::Result<u64> {
    let end: Option<i64> = conn
        .prepare_cached(
            "SELECT first_pos + length(ids) / 8 FROM event_runs WHERE task_id = ?1
             ORDER BY first_pos DESC LIMIT 1",
        )?
        .query_row([task_id], |r| r.get(0))
        .optional()?;
    Ok(end.map_or(0, |e| e as u64))
}

fn read_through(conn: &Connection) -> rusqlite::Result<i64> {
    let v: String = conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([THROUGH_KEY], |r| r.get(0))?;
    v.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

const INSERT_EVENT: &str = "INSERT INTO events (task_id, pos, epoch, seq, ts_ms, kind, payload)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

/// Inserts one event row as it is; returns its id.
fn insert_with(insert: &mut rusqlite::CachedStatement<'_>, e: &NewEvent) -> rusqlite::Result<i64> {
    insert.insert(params![
        e.task_id,
        e.pos as i64,
        e.epoch as i64,
        e.seq.map(|s| s as i64),
        e.ts_ms as i64,
        e.kind,
        e.payload
    ])
}

/// Inserts one event row as it is (for tests of older schemas).
#[cfg(test)]
pub(super) fn insert_event(tx: &Transaction<'_>, e: &NewEvent) -> rusqlite::Result<i64> {
    insert_with(&mut tx.prepare_cached(INSERT_EVENT)?, e)
}

pub(super) fn append_events(
    tx: &Transaction<'_>,
    positions: &mut Positions,
    events: &[NewEvent],
) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(INSERT_EVENT)?;
    let mut next: Option<(&str, u64)> = None;
    for e in events {
        let at_least = match next {
            Some((task, n)) if task == e.task_id => n,
            _ => positions.next_pos(tx, &e.task_id)?,
        };
        if e.pos < at_least {
            tracing::error!(
                task = %e.task_id, pos = e.pos, epoch = e.epoch, seq = ?e.seq,
                "duplicate session event skipped (its position is already stored)"
            );
            next = Some((&e.task_id, at_least));
            continue;
        }
        let id = insert_with(&mut insert, e)?;
        positions.record(&e.task_id, e.pos, id);
        next = Some((&e.task_id, e.pos + 1));
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
    waiting: SharedWaiting,
}

impl Reader {
    pub(super) fn open(path: &Path, waiting: SharedWaiting) -> Result<Self, StoreError> {
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
            waiting,
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
        let to = to.unwrap_or(i64::MAX as u64).min(i64::MAX as u64);
        let limit = limit as usize;
        self.read(task_id, |conn, bound| {
            // Below `bound` by the runs, then the rows from it: disjoint, and in a session every
            // event of the first part precedes every one of the second.
            let mut ids = Vec::new();
            let mut runs = conn.prepare_cached(
                "SELECT first_pos, ids FROM event_runs WHERE task_id = ?1 AND first_pos < ?3
                 AND first_pos >= (SELECT COALESCE(MAX(first_pos), 0) FROM event_runs
                                   WHERE task_id = ?1 AND first_pos <= ?2)
                 ORDER BY first_pos",
            )?;
            let mut rows = runs.query(params![task_id, from as i64, to as i64])?;
            'runs: while let Some(r) = rows.next()? {
                let first = r.get::<_, i64>(0)? as u64;
                let packed = r.get_ref(1)?.as_blob()?;
                for (i, id) in packed.chunks_exact(8).enumerate() {
                    let pos = first + i as u64;
                    let id = i64::from_le_bytes(id.try_into().expect("chunks of 8"));
                    if pos >= to || id >= bound || ids.len() == limit {
                        break 'runs;
                    }
                    if pos >= from {
                        ids.push(id);
                    }
                }
            }
            let mut by_id =
                conn.prepare_cached(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = ?1"))?;
            let mut events = Vec::with_capacity(ids.len());
            for id in ids {
                events.push(by_id.query_row([id], row_event)?);
            }
            let left = limit - events.len();
            if left > 0 {
                let tail = conn
                    .prepare_cached(&format!(
                        "SELECT {EVENT_COLUMNS} FROM events
                         WHERE id >= ?4 AND task_id = ?1 AND pos >= ?2 AND pos < ?3
                         ORDER BY id LIMIT ?5"
                    ))?
                    .query_map(
                        params![task_id, from as i64, to as i64, bound, left as i64],
                        row_event,
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                events.extend(tail);
            }
            Ok(events)
        })
    }

    /// How many events a session has (its next position).
    pub fn len(&self, task_id: &str) -> Result<u64, StoreError> {
        self.read(task_id, |conn, bound| {
            let tail: Option<i64> = conn
                .prepare_cached("SELECT MAX(pos) FROM events WHERE id >= ?2 AND task_id = ?1")?
                .query_row(params![task_id, bound], |r| r.get(0))?;
            if let Some(max) = tail {
                return Ok(max as u64 + 1);
            }
            // The last entry of the runs below the bound: in the last run, or (when that one
            // was written after the bound was taken) an earlier one.
            let mut runs = conn.prepare_cached(
                "SELECT first_pos, ids FROM event_runs WHERE task_id = ?1 ORDER BY first_pos DESC",
            )?;
            let mut rows = runs.query([task_id])?;
            while let Some(r) = rows.next()? {
                let first = r.get::<_, i64>(0)? as u64;
                let below = r
                    .get_ref(1)?
                    .as_blob()?
                    .chunks_exact(8)
                    .map(|id| i64::from_le_bytes(id.try_into().expect("chunks of 8")))
                    .take_while(|&id| id < bound)
                    .count();
                if below > 0 {
                    return Ok(first + below as u64);
                }
            }
            Ok(0)
        })
    }

    /// Runs `f` in one read transaction, with the session's bound ([`Waiting::bound`]), taken
    /// before the transaction's snapshot.
    fn read<T>(
        &self,
        task_id: &str,
        f: impl FnOnce(&Connection, i64) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let bound = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bound(task_id);
        let run = || {
            let tx = self.conn.unchecked_transaction()?;
            let out = f(&tx, bound)?;
            tx.finish()?;
            Ok(out)
        };
        run().map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
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
        let (store, thread) = store_with_tasks(dir.path(), &["b", "a", "c"]).await;
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

    /// A store in `dir` with a task for each of `ids`, submitted in that order.
    async fn store_with_tasks(
        dir: &Path,
        ids: &[impl AsRef<str>],
    ) -> (Store, super::super::StoreThread) {
        let (store, thread, _) = Store::open(dir).unwrap();
        for (n, id) in ids.iter().enumerate() {
            store
                .put_task(task(id.as_ref(), n as u64 + 1))
                .await
                .unwrap()
                .unwrap();
        }
        (store, thread)
    }

    /// (task, pos) → id of every entry in a run; no position twice.
    fn run_entries(conn: &Connection) -> HashMap<(String, u64), i64> {
        let mut entries = HashMap::new();
        let mut stmt = conn
            .prepare("SELECT task_id, first_pos, ids FROM event_runs")
            .unwrap();
        let mut rows = stmt.query([]).unwrap();
        while let Some(r) = rows.next().unwrap() {
            let (task, first): (String, i64) = (r.get(0).unwrap(), r.get(1).unwrap());
            let ids: Vec<u8> = r.get(2).unwrap();
            for (i, id) in ids.chunks_exact(8).enumerate() {
                let id = i64::from_le_bytes(id.try_into().unwrap());
                let old = entries.insert((task.clone(), first as u64 + i as u64), id);
                assert_eq!(old, None, "{task} {first}+{i} in two runs");
            }
        }
        entries
    }

    /// Every event with an id up to `event_runs_through` is in a run, at its position; no
    /// run names an event that is not there.
    fn assert_through_holds(path: &Path) {
        let conn = Connection::open(path).unwrap();
        let through = read_through(&conn).unwrap();
        let mut entries = run_entries(&conn);
        let mut stmt = conn.prepare("SELECT task_id, pos, id FROM events").unwrap();
        let mut rows = stmt.query([]).unwrap();
        while let Some(r) = rows.next().unwrap() {
            let (task, pos, id): (String, i64, i64) =
                (r.get(0).unwrap(), r.get(1).unwrap(), r.get(2).unwrap());
            match entries.remove(&(task.clone(), pos as u64)) {
                Some(run_id) => assert_eq!(run_id, id, "{task} {pos}"),
                None => assert!(
                    id > through,
                    "{task} {pos} (id {id} <= {through}) in no run"
                ),
            }
        }
        assert!(entries.is_empty(), "runs name missing events: {entries:?}");
    }

    fn run_count(conn: &Connection, task: &str) -> usize {
        run_entries(conn).keys().filter(|(t, _)| t == task).count()
    }

    /// Sessions whose entries are partly in runs and partly still waiting (a run not
    /// yet full, a run written while an older entry of another session holds the mark back,
    /// an entry written for its age) read back whole and by any slice, before and after a
    /// restart; duplicates are skipped on either side of the mark.
    #[tokio::test]
    async fn positions_read_back_on_both_sides_of_the_written_runs() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(super::super::DB_FILE);
        let ids = ["quiet", "busy", "mid"];
        let mut want: Vec<Vec<NewEvent>> = vec![Vec::new(); 3];
        let (store, thread) = store_with_tasks(dir.path(), &ids).await;
        // The next `k` events of session `s`, remembered in `want`.
        let append = |store: &Store, s: usize, k: usize, want: &mut Vec<Vec<NewEvent>>| {
            let batch: Vec<NewEvent> = (0..k)
                .map(|_| {
                    let pos = want[s].len() as u64;
                    want[s].push(ev(ids[s], pos, 1, Some(pos)));
                    ev(ids[s], pos, 1, Some(pos))
                })
                .collect();
            store.append_events(batch)
        };
        // "quiet" gets 3 events first, then "busy" RUN * 2 + 5 and "mid" RUN - 1, interleaved.
        append(&store, 0, 3, &mut want).await.unwrap().unwrap();
        for _ in 0..(RUN * 2 + 5) / 5 {
            let a = append(&store, 1, 5, &mut want);
            let b = append(&store, 2, 1, &mut want);
            a.await.unwrap().unwrap();
            b.await.unwrap().unwrap();
        }
        let check = |reader: &super::super::PooledReader, want: &Vec<Vec<NewEvent>>| {
            for (s, id) in ids.iter().enumerate() {
                let w = &want[s];
                let len = w.len() as u64;
                assert_eq!(reader.len(id).unwrap(), len, "{id}");
                assert_eq!(&reader.slice(id, 0, None, 100_000).unwrap(), w, "{id}");
                for (from, to) in [(0, 1), (1, 3), (100, 140), (120, 260), (255, 300)] {
                    let (f, t) = (from.min(len), (to as u64).min(len));
                    assert_eq!(
                        reader.slice(id, f, Some(t), 1000).unwrap(),
                        w[f as usize..t as usize].to_vec(),
                        "{id} {f}..{t}"
                    );
                }
                // A limit that ends inside either part.
                for limit in [1u32, 50, 127, 129, 200] {
                    let got = reader.slice(id, 2.min(len), None, limit).unwrap();
                    let end = (2 + limit as usize).min(w.len()).max(2.min(w.len()));
                    assert_eq!(got, w[2.min(w.len())..end].to_vec(), "{id} limit {limit}");
                }
            }
        };
        check(&store.reader().unwrap(), &want);
        // "busy" has had runs written, while "quiet"'s entries still wait (too few, not old
        // enough). The mark moves only in steps of LAG_ROWS, so it has not moved yet; what it
        // promises is checked by `assert_through_holds`.
        let conn = Connection::open(&db).unwrap();
        let written = run_count(&conn, "busy");
        assert!(written >= RUN, "busy's runs: {written}");
        assert_eq!(run_count(&conn, "quiet"), 0, "quiet's entries still wait");
        assert_through_holds(&db);
        // Duplicates: one in "busy"'s written part, one among "mid"'s waiting entries.
        let mut dup = want[1][10].clone();
        dup.payload = "\"other\"".into();
        let mut dup2 = want[2][want[2].len() - 1].clone();
        dup2.payload = "\"other\"".into();
        store.append_events(vec![dup, dup2]).await.unwrap().unwrap();
        check(&store.reader().unwrap(), &want);
        drop(store);
        thread.join();

        // After a restart the waiting entries are read back: reads, appends and the
        // duplicate check carry on.
        let (store, thread, loaded) = Store::open(dir.path()).unwrap();
        for (s, t) in loaded.tasks.iter().enumerate() {
            assert_eq!(t.events, want[s]);
        }
        check(&store.reader().unwrap(), &want);
        let mut dup = want[2][0].clone();
        dup.payload = "\"other\"".into();
        store.append_events(vec![dup]).await.unwrap().unwrap();
        append(&store, 2, 2, &mut want).await.unwrap().unwrap();
        check(&store.reader().unwrap(), &want);
        // Enough events from "busy" for "quiet"'s entries to be written for their age.
        for _ in 0..(LAG_ROWS as usize / 500 + 1) {
            append(&store, 1, 500, &mut want).await.unwrap().unwrap();
        }
        check(&store.reader().unwrap(), &want);
        assert_eq!(run_count(&conn, "quiet"), 3, "written for their age");
        let through = read_through(&conn).unwrap();
        assert!(through >= LAG_ROWS, "the mark moved a step: {through}");
        assert_through_holds(&db);
        drop(store);
        thread.join();
    }

    /// Many short sessions, as when hundreds of no-op tasks a second run: each is written as a
    /// run once its entries are LAG_ROWS events old, the oldest first; the mark follows the
    /// oldest still waiting; after a restart the rest follow. (In debug builds every commit also
    /// checks the index of waiting sessions against them.)
    #[tokio::test]
    async fn many_short_sessions_are_written_for_their_age_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(super::super::DB_FILE);
        let ids: Vec<String> = (0..600).map(|i| format!("s{i:04}")).collect();
        let batch = |chunk: &[String], from: u64| -> Vec<NewEvent> {
            chunk
                .iter()
                .flat_map(|id| (from..from + 4).map(move |p| ev(id, p, 1, Some(p))))
                .collect()
        };
        let (store, thread) = store_with_tasks(dir.path(), &ids).await;
        // Four events each, three sessions a commit: 2,400 events.
        for chunk in ids.chunks(3) {
            store.append_events(batch(chunk, 0)).await.unwrap().unwrap();
        }
        let conn = Connection::open(&db).unwrap();
        let written: Vec<bool> = ids.iter().map(|id| run_count(&conn, id) > 0).collect();
        let k = written.iter().take_while(|w| **w).count();
        assert!(!written[k..].contains(&true), "oldest first: {written:?}");
        // Those whose first event is LAG_ROWS older than the last commit's newest (2,400).
        let aged = (2_400 - LAG_ROWS as usize).div_ceil(4);
        assert!((aged - 3..=aged).contains(&k), "written {k}, aged {aged}");
        let through = read_through(&conn).unwrap();
        assert!(through >= LAG_ROWS, "the mark moved a step: {through}");
        assert_through_holds(&db);
        let reader = store.reader().unwrap();
        for id in &ids {
            assert_eq!(
                reader.slice(id, 0, None, 100).unwrap(),
                batch(std::slice::from_ref(id), 0)
            );
        }
        drop((store, reader));
        thread.join();

        // After a restart the waiting ones are read back and, once old, written in turn.
        let (store, thread, _) = Store::open(dir.path()).unwrap();
        for chunk in ids.chunks(3) {
            store.append_events(batch(chunk, 4)).await.unwrap().unwrap();
        }
        assert!(ids.iter().all(|id| run_count(&conn, id) > 0), "all written");
        assert_through_holds(&db);
        let reader = store.reader().unwrap();
        for id in &ids {
            let mut want = batch(std::slice::from_ref(id), 0);
            want.extend(batch(std::slice::from_ref(id), 4));
            assert_eq!(reader.slice(id, 0, None, 100).unwrap(), want);
        }
        drop((store, reader));
        thread.join();
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
