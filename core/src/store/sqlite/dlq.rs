//! The dead-letter record in SQLite: list, get, stats and resolve (entries are inserted by the
//! lifecycle check, `lifecycle.rs`).

use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, SqliteConnection, SqlitePool};

use super::write::decode;
use crate::clock::Millis;
use crate::dlq::{DlqEntry, DlqFilter, DlqResolution, DlqStats};
use crate::{Error, Result};

const COLUMNS: &str = "dlq_entry_uuid, task_uuid, namespace, name, version, reason, message,
    original_state, resolution_status, resolution_notes, resolved_by, resolved_at, created_at,
    updated_at";

fn parse<T: std::str::FromStr>(s: &str, what: &str) -> Result<T> {
    s.parse()
        .map_err(|_| Error::internal(format!("unknown {what} {s:?} in the database")))
}

fn entry(r: &SqliteRow, snapshot: Option<Value>) -> Result<DlqEntry> {
    Ok(DlqEntry {
        dlq_entry_uuid: r.try_get("dlq_entry_uuid")?,
        task_uuid: r.try_get("task_uuid")?,
        namespace: r.try_get("namespace")?,
        name: r.try_get("name")?,
        version: r.try_get("version")?,
        reason: parse(&r.try_get::<String, _>("reason")?, "DLQ reason")?,
        message: r.try_get("message")?,
        original_state: parse(&r.try_get::<String, _>("original_state")?, "task state")?,
        snapshot,
        resolution_status: parse(
            &r.try_get::<String, _>("resolution_status")?,
            "DLQ resolution status",
        )?,
        resolution_notes: r.try_get("resolution_notes")?,
        resolved_by: r.try_get("resolved_by")?,
        resolved_at: r.try_get("resolved_at")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

pub(super) async fn list(pool: &SqlitePool, f: &DlqFilter) -> Result<Vec<DlqEntry>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM dlq_entries
         WHERE ($1 IS NULL OR resolution_status = $1) AND ($2 IS NULL OR namespace = $2)
           AND ($3 IS NULL OR task_uuid = $3) AND ($4 IS NULL OR reason = $4)
         ORDER BY created_at DESC, rowid DESC LIMIT $5 OFFSET $6"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(f.status.map(DlqResolution::as_str))
        .bind(f.namespace.as_deref())
        .bind(f.task_uuid.as_deref())
        .bind(f.reason.map(|r| r.as_str()))
        .bind(i64::from(f.limit.unwrap_or(50).clamp(1, 1000)))
        .bind(i64::from(f.offset.unwrap_or(0)))
        .fetch_all(pool)
        .await?;
    rows.iter().map(|r| entry(r, None)).collect()
}

/// One entry with its snapshot, read through any connection (the pool, or the transaction
/// that just changed it).
async fn fetch<'e>(
    e: impl sqlx::Executor<'e, Database = Sqlite>,
    dlq_entry_uuid: &str,
) -> Result<DlqEntry> {
    let sql = format!("SELECT {COLUMNS}, snapshot FROM dlq_entries WHERE dlq_entry_uuid = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(dlq_entry_uuid)
        .fetch_optional(e)
        .await?
        .ok_or_else(|| Error::not_found(format!("no DLQ entry {dlq_entry_uuid}")))?;
    let snapshot: Value = decode(&row.try_get::<String, _>("snapshot")?)?;
    entry(&row, Some(snapshot))
}

pub(super) async fn get(pool: &SqlitePool, dlq_entry_uuid: &str) -> Result<DlqEntry> {
    fetch(pool, dlq_entry_uuid).await
}

pub(super) async fn stats(pool: &SqlitePool) -> Result<DlqStats> {
    let rows = sqlx::query(
        "SELECT 'reason' AS k, reason AS v, COUNT(*) AS n FROM dlq_entries GROUP BY reason
         UNION ALL SELECT 'status', resolution_status, COUNT(*) FROM dlq_entries
           GROUP BY resolution_status
         UNION ALL SELECT 'state', original_state, COUNT(*) FROM dlq_entries
           GROUP BY original_state
         UNION ALL SELECT 'namespace', namespace, COUNT(*) FROM dlq_entries GROUP BY namespace
         UNION ALL SELECT 'total', NULL, COUNT(*) FROM dlq_entries
         UNION ALL SELECT 'oldest_pending', NULL, MIN(created_at) FROM dlq_entries
           WHERE resolution_status = 'pending'",
    )
    .fetch_all(pool)
    .await?;
    let mut s = DlqStats::default();
    for r in rows {
        let key: String = r.try_get("k")?;
        let value: Option<String> = r.try_get("v")?;
        let n: Option<i64> = r.try_get("n")?;
        let count = n.unwrap_or(0).max(0) as u64;
        let bucket = match key.as_str() {
            "total" => {
                s.total = count;
                continue;
            }
            "oldest_pending" => {
                s.oldest_pending_at = n;
                continue;
            }
            "reason" => &mut s.by_reason,
            "status" => &mut s.by_resolution_status,
            "state" => &mut s.by_original_state,
            _ => &mut s.by_namespace,
        };
        bucket.insert(value.unwrap_or_default(), count);
    }
    Ok(s)
}

pub(super) async fn resolve(
    tx: &mut SqliteConnection,
    dlq_entry_uuid: &str,
    status: DlqResolution,
    notes: Option<&str>,
    by: &str,
    now: Millis,
) -> Result<DlqEntry> {
    if by.trim().is_empty() {
        return Err(Error::validation(
            "a DLQ resolution must name who records it (`by`)",
        ));
    }
    // Re-opening (`pending`) clears who resolved it and when; the notes stay unless replaced.
    let reopened = status == DlqResolution::Pending;
    let changed = sqlx::query(
        "UPDATE dlq_entries SET resolution_status = $1,
            resolution_notes = COALESCE($2, resolution_notes),
            resolved_by = $3, resolved_at = $4, updated_at = $5
         WHERE dlq_entry_uuid = $6",
    )
    .bind(status.as_str())
    .bind(notes)
    .bind((!reopened).then_some(by))
    .bind((!reopened).then_some(now))
    .bind(now)
    .bind(dlq_entry_uuid)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if changed == 0 {
        return Err(Error::not_found(format!("no DLQ entry {dlq_entry_uuid}")));
    }
    fetch(&mut *tx, dlq_entry_uuid).await
}
