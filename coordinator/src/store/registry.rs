//! The fleet registry's table: one row per worker, upserted on every state change and
//! registration, loaded whole at start-up.

use super::StoreError;
use crate::fleet::WorkerRecord;
use drover_protocol::{DrainInfo, ResourceReport, WorkerState};
use rusqlite::{params, Connection, Transaction};
use std::path::Path;

pub(super) fn load_workers(
    conn: &Connection,
    path: &Path,
) -> Result<Vec<WorkerRecord>, StoreError> {
    let sq = |source| StoreError::Sqlite {
        path: path.into(),
        source,
    };
    let mut stmt = conn
        .prepare(
            "SELECT name, state, address, version, protocol_version, first_seen_ms, registered_ms,
                    state_changed_ms, last_heartbeat_ms, resources, drain_since_ms,
                    drain_deadline_ms FROM workers ORDER BY name",
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
                (r.get::<_, Option<i64>>(10)?, r.get::<_, Option<i64>>(11)?),
            ))
        })
        .map_err(sq)?;
    let mut out = Vec::new();
    for row in rows {
        let (name, state, address, version, proto, times, resources, drain) = row.map_err(sq)?;
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
            drain: drain.0.map(|since| DrainInfo {
                since_ms: since.max(0) as u64,
                deadline_ms: drain.1.map(|d| d.max(0) as u64),
            }),
        });
    }
    Ok(out)
}

pub(super) fn put_workers(tx: &Transaction<'_>, records: &[WorkerRecord]) -> rusqlite::Result<()> {
    let mut put = tx.prepare_cached(
        "INSERT INTO workers (name, state, address, version, protocol_version, first_seen_ms,
                 registered_ms, state_changed_ms, last_heartbeat_ms, resources, drain_since_ms,
                 drain_deadline_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT(name) DO UPDATE SET state = excluded.state, address = excluded.address,
                 version = excluded.version, protocol_version = excluded.protocol_version,
                 registered_ms = excluded.registered_ms, state_changed_ms = excluded.state_changed_ms,
                 last_heartbeat_ms = excluded.last_heartbeat_ms, resources = excluded.resources,
                 drain_since_ms = excluded.drain_since_ms,
                 drain_deadline_ms = excluded.drain_deadline_ms",
    )?;
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
            resources,
            r.drain.map(|d| d.since_ms as i64),
            r.drain.and_then(|d| d.deadline_ms).map(|d| d as i64),
        ])?;
    }
    Ok(())
}
