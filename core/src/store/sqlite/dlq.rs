//! The dead-letter record in SQLite: list, get, stats and resolve (entries are inserted by the
//! lifecycle check, `lifecycle.rs`).

use sqlx::{Sqlite, SqliteConnection, SqlitePool};

use crate::clock::Millis;
use crate::dlq::{DlqEntry, DlqFilter, DlqResolution, DlqStats};
use crate::store::rows::{DLQ_COLUMNS as COLUMNS, DLQ_STATS, dlq_entry, dlq_stats};
use crate::{Error, Result};

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
    rows.iter().map(|r| dlq_entry(r, false)).collect()
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
    dlq_entry(&row, true)
}

pub(super) async fn get(pool: &SqlitePool, dlq_entry_uuid: &str) -> Result<DlqEntry> {
    fetch(pool, dlq_entry_uuid).await
}

pub(super) async fn stats(pool: &SqlitePool) -> Result<DlqStats> {
    let rows = sqlx::query(DLQ_STATS).fetch_all(pool).await?;
    dlq_stats(&rows)
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
