//! `tasker-ctl auth ...`: API keys of a database, for `tasker-ctl serve` (SPEC §11 "Auth").

use clap::{Args, Subcommand};
use serde_json::json;

use super::table::{Table, time_or_dash};
use super::{
    CliError, CliResult, DbArgs, EXIT_OK, Format, config, open_failed, open_operator, print_json,
};
use crate::auth::{generate_key, parse_permissions, split_token};
use crate::{OpenOptions, Tasker};

/// `tasker-ctl auth ...`
#[derive(Debug, Subcommand)]
pub(crate) enum AuthCommand {
    /// Create an API key; prints the key once (only its hash is stored).
    CreateKey(CreateKeyArgs),
    /// List API keys (never their secrets).
    ListKeys(ListKeysArgs),
    /// Revoke an API key: it authenticates nothing from then on.
    RevokeKey(RevokeKeyArgs),
}

/// `auth create-key`
#[derive(Debug, Args)]
pub(crate) struct CreateKeyArgs {
    /// A label for people (who or what uses the key).
    #[arg(long)]
    name: String,
    /// Comma-separated `resource:action` permissions, `resource:*` or `*`: tasks:create,
    /// tasks:read, tasks:list, tasks:cancel, steps:read, steps:resolve, templates:read,
    /// templates:write, dlq:read, dlq:update, system:read.
    #[arg(long, value_delimiter = ',', required = true)]
    permissions: Vec<String>,
    #[command(flatten)]
    db: DbArgs,
}

/// `auth list-keys`
#[derive(Debug, Args)]
pub(crate) struct ListKeysArgs {
    #[command(flatten)]
    db: DbArgs,
}

/// `auth revoke-key`
#[derive(Debug, Args)]
pub(crate) struct RevokeKeyArgs {
    /// The key's id (or the whole key).
    key_id: String,
    #[command(flatten)]
    db: DbArgs,
}

/// Runs one `auth` subcommand.
pub(crate) async fn dispatch(cmd: AuthCommand) -> CliResult {
    match cmd {
        AuthCommand::CreateKey(a) => create(a).await,
        AuthCommand::ListKeys(a) => list(a).await,
        AuthCommand::RevokeKey(a) => revoke(a).await,
    }
}

async fn create(a: CreateKeyArgs) -> CliResult {
    a.db.target.reject_url()?;
    let permissions = parse_permissions(&a.permissions)
        .map_err(|e| CliError::usage(format!("--permissions: {}", e.message)))?;
    if a.name.trim().is_empty() {
        return Err(CliError::usage("--name: a key needs a name"));
    }
    // A key may be made before the server first starts: the database is created if needed.
    let tasker = Tasker::open_with(
        &a.db.target.db,
        OpenOptions {
            config: config()?,
            background: false,
            ..OpenOptions::default()
        },
    )
    .await
    .map_err(|e| open_failed(&a.db.target.db, e))?;
    let generated = generate_key(a.name.trim(), permissions, tasker.now())?;
    tasker
        .store()
        .create_api_key(&generated.key, &generated.secret_hash)
        .await?;
    let k = &generated.key;
    match a.db.format {
        Format::Json => {
            let mut v = serde_json::to_value(k).map_err(|e| CliError::failed(e.to_string()))?;
            v["key"] = json!(generated.token);
            print_json(&v)?;
        }
        Format::Table => {
            eprintln!(
                "created API key {} ({}) with permissions {}; the key is shown only now:",
                k.key_id,
                k.name,
                k.permissions.join(",")
            );
            outln!("{}", generated.token);
        }
    }
    Ok(EXIT_OK)
}

async fn list(a: ListKeysArgs) -> CliResult {
    let tasker = open_operator(&a.db.target).await?;
    let keys = tasker.store().list_api_keys().await?;
    if a.db.format == Format::Json {
        print_json(&keys)?;
        return Ok(EXIT_OK);
    }
    if keys.is_empty() {
        eprintln!("no API keys (the server runs without authentication on loopback)");
        return Ok(EXIT_OK);
    }
    let mut t = Table::new(&["key_id", "name", "permissions", "created_at", "revoked_at"]);
    for k in &keys {
        t.row(vec![
            k.key_id.clone(),
            k.name.clone(),
            k.permissions.join(","),
            time_or_dash(Some(k.created_at)),
            time_or_dash(k.revoked_at),
        ]);
    }
    t.print();
    Ok(EXIT_OK)
}

async fn revoke(a: RevokeKeyArgs) -> CliResult {
    let tasker = open_operator(&a.db.target).await?;
    let id = split_token(&a.key_id).map_or(a.key_id.as_str(), |(id, _)| id);
    let key = tasker.store().revoke_api_key(id, tasker.now()).await?;
    match a.db.format {
        Format::Json => print_json(&key)?,
        Format::Table => outln!("revoked API key {} ({})", key.key_id, key.name),
    }
    Ok(EXIT_OK)
}
