//! The domain-event outbox in SQLite (SPEC §10): claiming due durable events for delivery,
//! recording delivery outcomes and listing records. Records are written by `finish`, through
//! the journal, in the transaction that commits the result that fired them.

use sqlx::{AssertSqlSafe, SqliteConnection, SqlitePool};

use crate::Result;
use crate::clock::Millis;
use crate::events::{EventFilter, StoredEvent};
use crate::store::rows::{EVENT_COLUMNS as COLUMNS, stored_event as stored};

/// Claims up to `limit` undelivered durable events that are due and not claimed by a live
/// delivery, oldest first, until `claimed_until`.
pub(super) async fn claim_events(
    tx: &mut SqliteConnection,
    limit: usize,
    claimed_until: Millis,
    now: Millis,
) -> Result<Vec<StoredEvent>> {
    let sql = format!(
        "UPDATE domain_events SET claimed_until = ?, delivery_attempts = delivery_attempts + 1
         WHERE seq IN (
            SELECT seq FROM domain_events
            WHERE delivered_at IS NULL AND delivery_mode = 'durable'
              AND next_delivery_at <= ? AND (claimed_until IS NULL OR claimed_until <= ?)
            ORDER BY seq LIMIT {limit})
         RETURNING {COLUMNS}"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(claimed_until)
        .bind(now)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
    let mut events = rows.iter().map(stored).collect::<Result<Vec<_>>>()?;
    events.sort_by_key(|e| e.seq);
    Ok(events)
}

/// Records delivery outcomes `(seq, outcome, retry_at)`: delivered, or due again at `retry_at`
/// with the error kept.
pub(super) async fn record_deliveries(
    tx: &mut SqliteConnection,
    outcomes: &[(i64, std::result::Result<(), String>, Millis)],
    now: Millis,
) -> Result<()> {
    for (seq, outcome, retry_at) in outcomes {
        match outcome {
            Ok(()) => {
                sqlx::query(
                    "UPDATE domain_events SET delivered_at = $1, claimed_until = NULL
                     WHERE seq = $2",
                )
                .bind(now)
                .bind(seq)
                .execute(&mut *tx)
                .await?;
            }
            Err(e) => {
                sqlx::query(
                    "UPDATE domain_events SET claimed_until = NULL, next_delivery_at = $1,
                        last_error = $2 WHERE seq = $3",
                )
                .bind(retry_at)
                .bind(e)
                .bind(seq)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    Ok(())
}

/// Outbox records by filter, in commit order.
pub(super) async fn list_events(pool: &SqlitePool, f: &EventFilter) -> Result<Vec<StoredEvent>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM domain_events
         WHERE ($1 IS NULL OR task_uuid = $1) AND seq > $2
         ORDER BY seq LIMIT $3"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(&f.task_uuid)
        .bind(f.after_seq.unwrap_or(0))
        .bind(i64::from(f.limit.unwrap_or(100).clamp(1, 1000)))
        .fetch_all(pool)
        .await?;
    rows.iter().map(stored).collect()
}

/// The earliest moment an undelivered durable event falls due, if any.
pub(super) async fn next_event_due(pool: &SqlitePool) -> Result<Option<Millis>> {
    Ok(sqlx::query_scalar(
        "SELECT MIN(MAX(next_delivery_at, COALESCE(claimed_until, 0))) FROM domain_events
         WHERE delivered_at IS NULL AND delivery_mode = 'durable'",
    )
    .fetch_one(pool)
    .await?)
}
