//! API keys in SQLite (see `crate::auth`).

use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::Result;
use crate::auth::ApiKey;
use crate::clock::Millis;

use crate::store::rows::{API_KEY_COLUMNS as COLUMNS, api_key as key};

pub(super) async fn create(c: &mut SqliteConnection, k: &ApiKey, secret_hash: &str) -> Result<()> {
    let permissions =
        serde_json::to_string(&k.permissions).map_err(|e| crate::Error::internal(e.to_string()))?;
    let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM api_keys WHERE key_id = $1")
        .bind(&k.key_id)
        .fetch_optional(&mut *c)
        .await?;
    if exists.is_some() {
        return Err(crate::Error::new(
            crate::ErrorKind::Conflict,
            format!("an API key {} exists already", k.key_id),
        ));
    }
    sqlx::query(
        "INSERT INTO api_keys (key_id, name, secret_hash, permissions, created_at, revoked_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&k.key_id)
    .bind(&k.name)
    .bind(secret_hash)
    .bind(permissions)
    .bind(k.created_at)
    .bind(k.revoked_at)
    .execute(c)
    .await?;
    Ok(())
}

pub(super) async fn list(pool: &SqlitePool) -> Result<Vec<ApiKey>> {
    let sql = format!("SELECT {COLUMNS} FROM api_keys ORDER BY created_at, key_id");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await?;
    rows.iter().map(key).collect()
}

pub(super) async fn revoke(c: &mut SqliteConnection, key_id: &str, now: Millis) -> Result<ApiKey> {
    // Revoking twice keeps the first revocation time.
    sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE key_id = $1")
        .bind(key_id)
        .bind(now)
        .execute(&mut *c)
        .await?;
    let sql = format!("SELECT {COLUMNS} FROM api_keys WHERE key_id = $1");
    match sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(key_id)
        .fetch_optional(c)
        .await?
    {
        Some(r) => key(&r),
        None => Err(crate::Error::not_found(format!("no API key {key_id}"))),
    }
}

pub(super) async fn find(pool: &SqlitePool, key_id: &str) -> Result<Option<(ApiKey, String)>> {
    let sql = format!("SELECT {COLUMNS}, secret_hash FROM api_keys WHERE key_id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(key_id)
        .fetch_optional(pool)
        .await?;
    row.map(|r| Ok((key(&r)?, r.try_get("secret_hash")?)))
        .transpose()
}
