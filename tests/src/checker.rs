//! An independent checker of the coordinator's sessions, for the fault-injection suite.
//!
//! It reads the coordinator's SQLite database directly (read-only; safe while the coordinator
//! runs, thanks to WAL, and after it was SIGKILLed) rather than trusting the coordinator's own
//! query code, and the workers' logs for what each worker saw acknowledged (the worker logs
//! every ack at debug level under the target `drover_worker::acks` — start workers with
//! [`ACK_LOG_FILTER`]). After a scenario, [`check`] reports every violation of:
//!
//! - positions contiguous from 0 in each session;
//! - worker events (those with a seq) contiguous from 0 within each epoch, each stored once;
//! - epochs of `assigned` events strictly growing, and no worker event of an epoch stored after
//!   a later epoch was assigned (fencing);
//! - every event a worker saw acknowledged is stored (acks are cumulative: an ack of seq `n`
//!   covers `0..=n` of that epoch);
//! - for tasks expected final: exactly one `completed`, and it is the last event.
//!
//! It returns violations as strings instead of panicking, so a scenario can print the seed and
//! the fleet's logs with them.

use rusqlite::{Connection, OpenFlags};
use std::collections::BTreeMap;
use std::path::Path;

/// A `DROVER_LOG` filter for workers that keeps the default level and logs every ack.
pub const ACK_LOG_FILTER: &str = "info,drover_worker::acks=debug";

/// One stored session event, as the `events` table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub pos: u64,
    pub epoch: u64,
    pub seq: Option<u64>,
    pub ts_ms: u64,
    pub kind: String,
    pub payload: String,
}

impl StoredEvent {
    /// The payload parsed as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

/// Every session in the database at `db`, by task id, each ordered by position.
pub fn read_sessions(db: &Path) -> anyhow::Result<BTreeMap<String, Vec<StoredEvent>>> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| anyhow::anyhow!("open {} read-only: {e}", db.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mut stmt = conn.prepare(
        "SELECT task_id, pos, epoch, seq, ts_ms, kind, payload FROM events ORDER BY task_id, pos",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            StoredEvent {
                pos: r.get::<_, i64>(1)? as u64,
                epoch: r.get::<_, i64>(2)? as u64,
                seq: r.get::<_, Option<i64>>(3)?.map(|s| s as u64),
                ts_ms: r.get::<_, i64>(4)? as u64,
                kind: r.get(5)?,
                payload: r.get(6)?,
            },
        ))
    })?;
    let mut out: BTreeMap<String, Vec<StoredEvent>> = BTreeMap::new();
    for row in rows {
        let (task, ev) = row?;
        out.entry(task).or_default().push(ev);
    }
    Ok(out)
}

/// Highest acknowledged seq per (task, epoch), from worker logs written with
/// [`ACK_LOG_FILTER`]. Lines look like `<time> DEBUG acked task=T epoch=E seq=S`.
pub fn acks_from_log(log: &str) -> BTreeMap<(String, u64), u64> {
    let mut out = BTreeMap::new();
    // The stderr format prints no target: match the message word `acked` instead.
    for line in log
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == "acked"))
    {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .map(|v| v.trim_matches('"').to_owned())
        };
        let (Some(task), Some(epoch), Some(seq)) = (field("task"), field("epoch"), field("seq"))
        else {
            continue;
        };
        let (Ok(epoch), Ok(seq)) = (epoch.parse::<u64>(), seq.parse::<u64>()) else {
            continue;
        };
        let max = out.entry((task, epoch)).or_insert(seq);
        *max = (*max).max(seq);
    }
    out
}

/// Merge ack maps (several workers' logs), keeping the highest seq.
pub fn merge_acks(
    maps: impl IntoIterator<Item = BTreeMap<(String, u64), u64>>,
) -> BTreeMap<(String, u64), u64> {
    let mut out = BTreeMap::new();
    for m in maps {
        for (k, v) in m {
            let max = out.entry(k).or_insert(v);
            *max = (*max).max(v);
        }
    }
    out
}

/// Every violation of the invariants in the module doc. `final_tasks` are the tasks that
/// must have ended (exactly one `completed`, last); `acks` is what workers saw acknowledged.
pub fn check(
    sessions: &BTreeMap<String, Vec<StoredEvent>>,
    final_tasks: &[String],
    acks: &BTreeMap<(String, u64), u64>,
) -> Vec<String> {
    let mut bad = Vec::new();
    for (task, events) in sessions {
        check_session(task, events, &mut bad);
    }
    for task in final_tasks {
        let Some(events) = sessions.get(task) else {
            bad.push(format!(
                "{task}: expected a final state, but no session is stored"
            ));
            continue;
        };
        let completed = events.iter().filter(|e| e.kind == "completed").count();
        if completed != 1 {
            bad.push(format!(
                "{task}: {completed} `completed` events, want exactly 1"
            ));
        }
        if events.last().map(|e| e.kind.as_str()) != Some("completed") {
            bad.push(format!(
                "{task}: last event is {:?}, want `completed`",
                events.last().map(|e| &e.kind)
            ));
        }
    }
    for ((task, epoch), &acked) in acks {
        let stored: Vec<u64> = sessions
            .get(task)
            .map(|evs| {
                evs.iter()
                    .filter(|e| e.epoch == *epoch)
                    .filter_map(|e| e.seq)
                    .collect()
            })
            .unwrap_or_default();
        let have = stored.iter().filter(|&&s| s <= acked).count() as u64;
        if have != acked + 1 {
            bad.push(format!(
                "{task}/{epoch}: a worker saw seq 0..={acked} acknowledged, but only {have} of them are stored"
            ));
        }
    }
    bad
}

fn check_session(task: &str, events: &[StoredEvent], bad: &mut Vec<String>) {
    for (i, e) in events.iter().enumerate() {
        if e.pos != i as u64 {
            bad.push(format!(
                "{task}: position {} at index {i}: not contiguous from 0",
                e.pos
            ));
            return;
        }
    }
    let mut next_seq: BTreeMap<u64, u64> = BTreeMap::new();
    let mut current = 0;
    for e in events {
        if e.kind == "assigned" {
            if e.epoch <= current {
                bad.push(format!(
                    "{task}: assigned epoch {} at pos {} does not grow past {current}",
                    e.epoch, e.pos
                ));
            }
            current = e.epoch;
        }
        let Some(seq) = e.seq else { continue };
        if e.epoch != current {
            bad.push(format!(
                "{task}: worker event of epoch {} (seq {seq}, {}) stored at pos {} while epoch {current} is current",
                e.epoch, e.kind, e.pos
            ));
        }
        let want = next_seq.entry(e.epoch).or_insert(0);
        if seq != *want {
            bad.push(format!(
                "{task}: epoch {} seq {seq} at pos {}, want {want} (contiguous, each once)",
                e.epoch, e.pos
            ));
        }
        *want = seq + 1;
    }
}

/// What a task printed on stdout in `epoch`, joined (output arrives in chunks that may split
/// lines).
pub fn stdout_of(events: &[StoredEvent], epoch: u64) -> String {
    events
        .iter()
        .filter(|e| e.epoch == epoch && e.kind == "stdout")
        .filter_map(|e| e.json()["data"].as_str().map(str::to_owned))
        .collect()
}

/// Epochs of a session's attempts, in order.
pub fn epochs(events: &[StoredEvent]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e.kind == "assigned")
        .map(|e| e.epoch)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(pos: u64, epoch: u64, seq: Option<u64>, kind: &str) -> StoredEvent {
        StoredEvent {
            pos,
            epoch,
            seq,
            ts_ms: 0,
            kind: kind.into(),
            payload: "{}".into(),
        }
    }

    #[test]
    fn finds_each_kind_of_violation() {
        let good = vec![
            ev(0, 0, None, "submitted"),
            ev(1, 1, None, "assigned"),
            ev(2, 1, Some(0), "started"),
            ev(3, 2, None, "assigned"),
            ev(4, 2, Some(0), "started"),
            ev(5, 2, None, "completed"),
        ];
        let mut s = BTreeMap::from([("t".to_owned(), good.clone())]);
        let acks = BTreeMap::from([(("t".to_owned(), 1), 0), (("t".to_owned(), 2), 0)]);
        assert!(check(&s, &["t".into()], &acks).is_empty());
        // An ack beyond what is stored.
        let lost = BTreeMap::from([(("t".to_owned(), 2), 1)]);
        assert_eq!(check(&s, &["t".into()], &lost).len(), 1);
        // A stale epoch's event after the next epoch was assigned.
        let mut stale = good.clone();
        stale.insert(5, ev(5, 1, Some(1), "stdout"));
        stale[6].pos = 6;
        s.insert("t".into(), stale);
        assert!(check(&s, &["t".into()], &BTreeMap::new())[0].contains("epoch 1"));
        // A duplicate seq, and two completions.
        let mut dup = good.clone();
        dup.insert(5, ev(5, 2, Some(0), "stdout"));
        dup[6].pos = 6;
        dup.push(ev(7, 2, None, "completed"));
        s.insert("t".into(), dup);
        let v = check(&s, &["t".into()], &BTreeMap::new());
        assert!(v.iter().any(|m| m.contains("want 1")), "{v:?}");
        assert!(v.iter().any(|m| m.contains("2 `completed`")), "{v:?}");
    }

    #[test]
    fn parses_ack_lines() {
        let log = "2026-11-25T14:00:00Z DEBUG acked task=abc epoch=2 seq=7\n\
                   2026-11-25T14:00:00Z DEBUG drover_worker::acks: acked task=abc epoch=2 seq=3\n\
                   x INFO other: task=abc epoch=3 seq=9\n";
        assert_eq!(
            acks_from_log(log),
            BTreeMap::from([(("abc".to_owned(), 2), 7)])
        );
    }
}
