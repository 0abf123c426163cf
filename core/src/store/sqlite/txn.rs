//! Transactions that cost no round trips of their own.

use sqlx::pool::PoolConnection;
use sqlx::sqlite::SqlitePool;
use sqlx::{Sqlite, SqliteConnection};

use crate::Result;

/// A transaction whose `BEGIN` and `COMMIT` travel with the first and last statement
/// batches instead of as round trips of their own; sqlx does not know about it.
/// If it is dropped unfinished (its future cancelled mid-way), the connection is closed rather
/// than returned to the pool, which rolls the transaction back.
pub(super) struct Txn {
    conn: PoolConnection<Sqlite>,
    finished: bool,
}

impl Txn {
    /// Opens a write transaction (taking the write lock at once).
    pub(super) const BEGIN: &'static str = "BEGIN IMMEDIATE;\n";
    /// Opens a read transaction: one snapshot for every statement until the commit.
    pub(super) const BEGIN_READ: &'static str = "BEGIN;\n";
    pub(super) const COMMIT: &'static str = "COMMIT;\n";

    pub(super) async fn acquire(pool: &SqlitePool) -> Result<Txn> {
        Ok(Txn {
            conn: pool.acquire().await?,
            finished: false,
        })
    }

    pub(super) fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }

    pub(super) fn committed(mut self) {
        self.finished = true;
    }

    /// Settles the transaction by the outcome of the work done in it: committed (the work
    /// ran the commit) or rolled back.
    pub(super) async fn finish<T>(self, r: Result<T>) -> Result<T> {
        match r {
            Ok(v) => {
                self.committed();
                Ok(v)
            }
            Err(e) => {
                self.rollback().await;
                Err(e)
            }
        }
    }

    /// Rolls back whatever part ran. When that fails for another reason than there being no
    /// transaction (it failed to begin, or SQLite already rolled it back), the connection is
    /// closed on drop.
    pub(super) async fn rollback(mut self) {
        match sqlx::query("ROLLBACK").execute(&mut *self.conn).await {
            Ok(_) => self.finished = true,
            Err(e) if e.to_string().contains("no transaction is active") => self.finished = true,
            Err(e) => tracing::warn!("rollback failed, closing the connection: {e}"),
        }
    }
}

impl Drop for Txn {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.close_on_drop();
        }
    }
}
