//! Tables of [`crate::trust`]: join tokens (hashed), the certificates this coordinator
//! issued, and revoked worker names. Loaded whole at start-up; written through the group
//! commit like everything else.

use super::StoreError;
use crate::trust::{IssuedRecord, LoadedTrust, TokenRecord, TrustWrite};
use rusqlite::{params, Connection, Transaction};
use std::path::Path;

pub(super) fn load(conn: &Connection, path: &Path, now_ms: u64) -> Result<LoadedTrust, StoreError> {
    let sq = |source| StoreError::Sqlite {
        path: path.into(),
        source,
    };
    let u = |v: i64| v.max(0) as u64;
    let mut out = LoadedTrust::default();
    let mut stmt = conn
        .prepare(
            "SELECT id, hash, label, name, max_uses, uses, created_ms, expires_ms, revoked
             FROM join_tokens",
        )
        .map_err(sq)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(TokenRecord {
                id: r.get(0)?,
                hash: r.get(1)?,
                label: r.get(2)?,
                name: r.get(3)?,
                max_uses: r.get::<_, i64>(4)?.clamp(0, u32::MAX.into()) as u32,
                uses: r.get::<_, i64>(5)?.clamp(0, u32::MAX.into()) as u32,
                created_ms: u(r.get(6)?),
                expires_ms: u(r.get(7)?),
                revoked: r.get::<_, i64>(8)? != 0,
            })
        })
        .map_err(sq)?;
    for row in rows {
        out.tokens.push(row.map_err(sq)?);
    }
    // Expired certificates are refused by TLS anyway; only live ones matter.
    let mut stmt = conn
        .prepare(
            "SELECT fingerprint, name, serial, not_after_ms, issued_ms, revoked_ms
             FROM issued_certs WHERE not_after_ms > ?1",
        )
        .map_err(sq)?;
    let rows = stmt
        .query_map(params![now_ms as i64], |r| {
            Ok(IssuedRecord {
                fingerprint: r.get(0)?,
                name: r.get(1)?,
                serial: r.get(2)?,
                not_after_ms: u(r.get(3)?),
                issued_ms: u(r.get(4)?),
                revoked_ms: r.get::<_, Option<i64>>(5)?.map(u),
            })
        })
        .map_err(sq)?;
    for row in rows {
        out.issued.push(row.map_err(sq)?);
    }
    let mut stmt = conn
        .prepare("SELECT name, revoked_ms FROM revoked_workers")
        .map_err(sq)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, u(r.get(1)?))))
        .map_err(sq)?;
    for row in rows {
        out.revoked_names.push(row.map_err(sq)?);
    }
    Ok(out)
}

pub(super) fn apply(tx: &Transaction<'_>, writes: &[TrustWrite]) -> rusqlite::Result<()> {
    for w in writes {
        match w {
            TrustWrite::Token(t) => {
                tx.prepare_cached(
                    "INSERT INTO join_tokens (id, hash, label, name, max_uses, uses, created_ms,
                         expires_ms, revoked) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT(id) DO UPDATE SET uses = excluded.uses, revoked = excluded.revoked",
                )?
                .execute(params![
                    t.id,
                    t.hash,
                    t.label,
                    t.name,
                    t.max_uses,
                    t.uses,
                    t.created_ms as i64,
                    t.expires_ms as i64,
                    t.revoked as i64
                ])?;
            }
            TrustWrite::Issued(c) => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO issued_certs (fingerprint, name, serial, not_after_ms,
                         issued_ms, revoked_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    c.fingerprint,
                    c.name,
                    c.serial,
                    c.not_after_ms as i64,
                    c.issued_ms as i64,
                    c.revoked_ms.map(|v| v as i64)
                ])?;
            }
            TrustWrite::RevokeName { name, at_ms } => {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO revoked_workers (name, revoked_ms) VALUES (?1, ?2)",
                )?
                .execute(params![name, *at_ms as i64])?;
                tx.prepare_cached(
                    "UPDATE issued_certs SET revoked_ms = ?2 WHERE name = ?1 AND revoked_ms IS NULL",
                )?
                .execute(params![name, *at_ms as i64])?;
            }
            TrustWrite::ReinstateName { name } => {
                tx.prepare_cached("DELETE FROM revoked_workers WHERE name = ?1")?
                    .execute(params![name])?;
            }
        }
    }
    Ok(())
}
