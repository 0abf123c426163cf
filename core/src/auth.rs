//! API keys and `resource:action` permissions (SPEC §11 "Auth").
//!
//! A key is `tsk_<id>_<secret>`: the id finds the stored record, the secret proves possession.
//! Only the SHA-256 of the secret is stored, so a leaked database does not leak usable keys;
//! the full key is shown once, when it is created. Secrets are 32 bytes from the operating
//! system's random source, so a fast unsalted hash is enough (there is nothing to brute-force
//! that a salt or a slow hash would protect).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::Millis;
use crate::{Error, Result};

/// Every permission a key can hold, as `resource:action`.
pub const PERMISSIONS: &[&str] = &[
    "tasks:create",
    "tasks:read",
    "tasks:list",
    "tasks:cancel",
    "steps:read",
    "steps:resolve",
    "templates:read",
    "templates:write",
    "dlq:read",
    "dlq:update",
    "system:read",
];

/// A stored API key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ApiKey {
    /// The public part of the key (`tsk_<key_id>_...`).
    pub key_id: String,
    /// A label for people.
    pub name: String,
    /// Granted permissions: `resource:action`, `resource:*` or `*`.
    pub permissions: Vec<String>,
    /// When it was created (ms since epoch).
    pub created_at: Millis,
    /// When it was revoked; a revoked key authenticates nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Millis>,
}

impl ApiKey {
    /// Whether the key grants `permission` (an exact `resource:action` from [`PERMISSIONS`]).
    pub fn allows(&self, permission: &str) -> bool {
        self.revoked_at.is_none() && grants(&self.permissions, permission)
    }
}

/// Whether `granted` covers `wanted`: an exact match, `resource:*` or `*`.
pub fn grants(granted: &[String], wanted: &str) -> bool {
    let resource = wanted.split(':').next().unwrap_or(wanted);
    granted
        .iter()
        .any(|g| g == "*" || g == wanted || g.strip_suffix(":*").is_some_and(|r| r == resource))
}

/// Checks permission names given by an operator: each must be a known permission, a known
/// resource followed by `:*`, or `*`. Returns them trimmed, de-duplicated, in input order.
pub fn parse_permissions<S: AsRef<str>>(items: &[S]) -> Result<Vec<String>> {
    let resources: Vec<&str> = PERMISSIONS
        .iter()
        .filter_map(|p| p.split(':').next())
        .collect();
    let mut out: Vec<String> = Vec::new();
    let mut unknown = Vec::new();
    for item in items {
        let p = item.as_ref().trim();
        if p.is_empty() {
            continue;
        }
        let known = p == "*"
            || PERMISSIONS.contains(&p)
            || p.strip_suffix(":*").is_some_and(|r| resources.contains(&r));
        if !known {
            unknown.push(p.to_string());
        } else if !out.iter().any(|o| o == p) {
            out.push(p.to_string());
        }
    }
    if !unknown.is_empty() {
        return Err(Error::validation(format!(
            "unknown permission(s) {}; expected `*`, `resource:*` or one of {}",
            unknown.join(", "),
            PERMISSIONS.join(", ")
        ))
        .with_details(serde_json::json!({"unknown": unknown})));
    }
    if out.is_empty() {
        return Err(Error::validation("a key needs at least one permission"));
    }
    Ok(out)
}

/// A freshly generated key: the record to store, the hash of its secret, and the full key
/// for the user (shown once).
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    /// The record to store.
    pub key: ApiKey,
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    /// `tsk_<id>_<secret>`: what clients send.
    pub token: String,
}

/// Makes a new key named `name` with `permissions` (already checked by
/// [`parse_permissions`]).
pub fn generate_key(name: &str, permissions: Vec<String>, now: Millis) -> Result<GeneratedKey> {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    getrandom::fill(&mut id)
        .and_then(|()| getrandom::fill(&mut secret))
        .map_err(|e| Error::internal(format!("no randomness available for a key: {e}")))?;
    let key_id = hex(&id);
    let secret = hex(&secret);
    Ok(GeneratedKey {
        token: format!("tsk_{key_id}_{secret}"),
        secret_hash: hash_secret(&secret),
        key: ApiKey {
            key_id,
            name: name.to_string(),
            permissions,
            created_at: now,
            revoked_at: None,
        },
    })
}

/// Splits a presented key into `(key_id, secret)`; `None` when it is not shaped like one.
pub fn split_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("tsk_")?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// SHA-256 of a secret, lowercase hex.
pub fn hash_secret(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` hashes to `stored_hash`, comparing in constant time so response timing
/// reveals nothing about how much of a guess was right.
pub fn secret_matches(secret: &str, stored_hash: &str) -> bool {
    let computed = hash_secret(secret);
    let (a, b) = (computed.as_bytes(), stored_hash.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(perms: &[&str]) -> ApiKey {
        ApiKey {
            key_id: "k".into(),
            name: "n".into(),
            permissions: perms.iter().map(|s| s.to_string()).collect(),
            created_at: 0,
            revoked_at: None,
        }
    }

    #[test]
    fn wildcards_cover_what_they_name_and_nothing_else() {
        assert!(key(&["*"]).allows("dlq:update"));
        assert!(key(&["tasks:*"]).allows("tasks:cancel"));
        assert!(!key(&["tasks:*"]).allows("steps:read"));
        assert!(key(&["tasks:read"]).allows("tasks:read"));
        assert!(!key(&["tasks:read"]).allows("tasks:list"));
        assert!(!key(&["task:*"]).allows("tasks:read"));
        let mut revoked = key(&["*"]);
        revoked.revoked_at = Some(1);
        assert!(!revoked.allows("tasks:read"));
    }

    #[test]
    fn permission_names_are_checked() {
        assert_eq!(
            parse_permissions(&["tasks:read", " dlq:* ", "tasks:read", "*"]).unwrap(),
            vec!["tasks:read", "dlq:*", "*"]
        );
        let e = parse_permissions(&["tasks:fly", "nope:*"]).unwrap_err();
        assert!(e.message.contains("tasks:fly, nope:*"), "{}", e.message);
        assert!(parse_permissions::<&str>(&[]).is_err());
    }

    #[test]
    fn generated_keys_verify_and_split() {
        let g = generate_key("ci", vec!["*".into()], 5).unwrap();
        let (id, secret) = split_token(&g.token).unwrap();
        assert_eq!(id, g.key.key_id);
        assert!(secret_matches(secret, &g.secret_hash));
        assert!(!secret_matches("wrong", &g.secret_hash));
        assert_ne!(g.secret_hash, secret, "the secret itself is never stored");
        assert_eq!(split_token("tsk__x"), None);
        assert_eq!(split_token("Bearer x"), None);
    }
}
