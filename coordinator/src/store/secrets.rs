//! The `secrets` table of [`crate::secrets`]: one row per secret, its value only as an
//! AES-256-GCM ciphertext with its nonce. Loaded whole at start-up; written through the group
//! commit. Unlike the session log, rows are replaced and deleted (`drover secret set|rm`).

use super::StoreError;
use crate::secrets::{SecretWrite, StoredSecret};
use rusqlite::{params, Connection, Transaction};
use std::path::Path;

pub(super) fn load(conn: &Connection, path: &Path) -> Result<Vec<StoredSecret>, StoreError> {
    let sq = |source| StoreError::Sqlite {
        path: path.into(),
        source,
    };
    let mut stmt = conn
        .prepare(
            "SELECT name, nonce, ciphertext, created_ms, updated_ms, version FROM secrets
             ORDER BY name",
        )
        .map_err(sq)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(StoredSecret {
                name: r.get(0)?,
                nonce: r.get(1)?,
                ciphertext: r.get(2)?,
                created_ms: r.get::<_, i64>(3)?.max(0) as u64,
                updated_ms: r.get::<_, i64>(4)?.max(0) as u64,
                version: r.get::<_, i64>(5)?.clamp(0, u32::MAX.into()) as u32,
            })
        })
        .map_err(sq)?;
    rows.collect::<Result<_, _>>().map_err(sq)
}

pub(super) fn apply(tx: &Transaction<'_>, writes: &[SecretWrite]) -> rusqlite::Result<()> {
    for w in writes {
        match w {
            SecretWrite::Put(s) => {
                tx.prepare_cached(
                    "INSERT INTO secrets (name, nonce, ciphertext, created_ms, updated_ms, version)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(name) DO UPDATE SET nonce = excluded.nonce,
                       ciphertext = excluded.ciphertext, updated_ms = excluded.updated_ms,
                       version = excluded.version",
                )?
                .execute(params![
                    s.name,
                    s.nonce,
                    s.ciphertext,
                    s.created_ms as i64,
                    s.updated_ms as i64,
                    i64::from(s.version)
                ])?;
            }
            SecretWrite::Delete(name) => {
                tx.prepare_cached("DELETE FROM secrets WHERE name = ?1")?
                    .execute(params![name])?;
            }
        }
    }
    Ok(())
}
