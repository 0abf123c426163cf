//! The one typed configuration: defaults in code, overridden by `TASKER_*` environment
//! variables.

use std::time::Duration;

/// How hard SQLite syncs commits to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqliteSync {
    /// WAL + `synchronous=NORMAL`: survives a process crash, may lose the last commits on a
    /// power cut.
    Normal,
    /// `synchronous=FULL`: survives a power cut, slower commits.
    Full,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Environment whose `environments.<env>` template blocks apply (`TASKER_ENV`).
    pub environment: String,
    /// Lease length of a claimed attempt (`TASKER_LEASE_MS`).
    pub lease: Duration,
    /// How often held leases are renewed (`TASKER_LEASE_RENEW_MS`).
    pub lease_renew_every: Duration,
    /// Attempt timeout when a step sets none (`TASKER_DEFAULT_TIMEOUT_SECONDS`).
    pub default_step_timeout: Duration,
    /// Fallback poll interval when no wake-up arrives (`TASKER_POLL_INTERVAL_MS`).
    pub poll_interval: Duration,
    /// In-process handler concurrency (`TASKER_CONCURRENCY`).
    pub concurrency: usize,
    /// Steps claimed per claim statement at most (`TASKER_CLAIM_BATCH`).
    pub claim_batch: usize,
    /// Largest accepted context or result, in bytes of JSON (`TASKER_MAX_PAYLOAD_BYTES`).
    pub max_payload_bytes: usize,
    /// SQLite durability (`TASKER_SQLITE_SYNC=normal|full`).
    pub sqlite_sync: SqliteSync,
    /// Namespaces whose steps this process's Rust handlers take (`TASKER_NAMESPACES`, comma
    /// separated); empty means every namespace.
    pub namespaces: Vec<String>,
    /// PostgreSQL connections per process at most (`TASKER_PG_MAX_CONNECTIONS`).
    pub pg_max_connections: u32,
    /// Migrate the database schema on open (`TASKER_MIGRATE=false` refuses a schema that is
    /// not current instead; `tasker-ctl migrate` applies it). SQLite always migrates.
    pub migrate: bool,
    /// Fail steps whose callable no handler in this process knows (`handler_not_found`) instead
    /// of leaving them for another worker. True for the embedded one-process engine.
    pub fail_unknown_callables: bool,
    /// How long a step whose callable nobody in this process serves stays claimable before it
    /// is failed with `handler_not_found` (`TASKER_UNKNOWN_CALLABLE_GRACE_MS`): a host may
    /// create tasks before it has started the worker that serves them.
    pub unknown_callable_grace: Duration,
    /// How long a task may go without progress in any non-terminal state before it is moved
    /// to `error` with a DLQ entry (`TASKER_STALENESS_THRESHOLD_MINUTES`, fractions allowed;
    /// `0` disables). Template `lifecycle` limits apply as well (see [`crate::lifecycle`]).
    pub staleness_threshold: Duration,
    /// How often the engine looks for tasks past their lifecycle limits or the staleness
    /// threshold (`TASKER_LIFECYCLE_CHECK_MS`).
    pub lifecycle_check_every: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            environment: "development".into(),
            lease: Duration::from_secs(30),
            lease_renew_every: Duration::from_secs(10),
            default_step_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
            concurrency: 32,
            claim_batch: 64,
            max_payload_bytes: 1 << 20,
            sqlite_sync: SqliteSync::Normal,
            namespaces: Vec::new(),
            pg_max_connections: 10,
            migrate: true,
            fail_unknown_callables: true,
            unknown_callable_grace: Duration::from_secs(2),
            staleness_threshold: Duration::from_secs(24 * 3600),
            lifecycle_check_every: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Defaults with `TASKER_*` overrides from the environment. Unparseable values are
    /// reported, not ignored.
    pub fn from_env() -> crate::Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`Config::from_env`] but reading variables through `get` (testable).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> crate::Result<Self> {
        let mut c = Config::default();
        let num = |key: &str| -> crate::Result<Option<u64>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
                    crate::Error::validation(format!("{key}={v:?} is not a whole number"))
                }),
            }
        };
        if let Some(env) = get("TASKER_ENV") {
            c.environment = env;
        }
        // Bounds keep every `now + duration` far from integer overflow.
        if let Some(v) = num("TASKER_LEASE_MS")? {
            c.lease = Duration::from_millis(v.clamp(100, 24 * 3600 * 1000));
            c.lease_renew_every = c.lease / 3;
        }
        if let Some(v) = num("TASKER_LEASE_RENEW_MS")? {
            c.lease_renew_every = Duration::from_millis(v.max(10)).min(c.lease / 2);
        }
        if let Some(v) = num("TASKER_DEFAULT_TIMEOUT_SECONDS")? {
            c.default_step_timeout = Duration::from_secs(v.clamp(1, 7 * 24 * 3600));
        }
        if let Some(v) = num("TASKER_POLL_INTERVAL_MS")? {
            c.poll_interval = Duration::from_millis(v.max(10));
        }
        if let Some(v) = num("TASKER_CONCURRENCY")? {
            c.concurrency = (v as usize).max(1);
        }
        if let Some(v) = num("TASKER_CLAIM_BATCH")? {
            c.claim_batch = (v as usize).max(1);
        }
        if let Some(v) = num("TASKER_UNKNOWN_CALLABLE_GRACE_MS")? {
            c.unknown_callable_grace = Duration::from_millis(v);
        }
        if let Some(v) = num("TASKER_MAX_PAYLOAD_BYTES")? {
            c.max_payload_bytes = v as usize;
        }
        if let Some(v) = get("TASKER_STALENESS_THRESHOLD_MINUTES") {
            let key = "TASKER_STALENESS_THRESHOLD_MINUTES";
            let minutes = v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|m| m.is_finite() && *m >= 0.0)
                .ok_or_else(|| {
                    crate::Error::validation(format!(
                        "{key}={v:?} is not a number of minutes (0 disables the threshold)"
                    ))
                })?;
            // At most a year, so `now + threshold` stays far from overflow.
            c.staleness_threshold = Duration::from_millis(crate::lifecycle::minutes_to_ms(
                minutes.min(525_600.0),
            ) as u64);
        }
        if let Some(v) = num("TASKER_LIFECYCLE_CHECK_MS")? {
            c.lifecycle_check_every = Duration::from_millis(v.max(10));
        }
        if let Some(v) = get("TASKER_NAMESPACES") {
            c.namespaces = v
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect();
        }
        if let Some(v) = num("TASKER_PG_MAX_CONNECTIONS")? {
            c.pg_max_connections = v.clamp(2, 1000) as u32;
        }
        if let Some(v) = get("TASKER_MIGRATE") {
            c.migrate = match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    return Err(crate::Error::validation(format!(
                        "TASKER_MIGRATE={v:?}: expected `true` or `false`"
                    )));
                }
            };
        }
        if let Some(v) = get("TASKER_SQLITE_SYNC") {
            c.sqlite_sync = match v.to_ascii_lowercase().as_str() {
                "normal" => SqliteSync::Normal,
                "full" => SqliteSync::Full,
                _ => {
                    return Err(crate::Error::validation(format!(
                        "TASKER_SQLITE_SYNC={v:?}: expected `normal` or `full`"
                    )));
                }
            };
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_apply_and_bad_values_are_reported() {
        let c = Config::from_lookup(|k| match k {
            "TASKER_LEASE_MS" => Some("3000".into()),
            "TASKER_SQLITE_SYNC" => Some("FULL".into()),
            "TASKER_STALENESS_THRESHOLD_MINUTES" => Some("90".into()),
            "TASKER_LIFECYCLE_CHECK_MS" => Some("250".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.staleness_threshold, Duration::from_secs(90 * 60));
        assert_eq!(c.lifecycle_check_every, Duration::from_millis(250));
        let d = Config::default();
        assert_eq!(
            (d.staleness_threshold, d.lifecycle_check_every),
            (Duration::from_secs(24 * 3600), Duration::from_secs(10))
        );
        let fraction = Config::from_lookup(|k| {
            (k == "TASKER_STALENESS_THRESHOLD_MINUTES").then(|| "0.5".into())
        })
        .unwrap();
        assert_eq!(fraction.staleness_threshold, Duration::from_secs(30));
        let off = Config::from_lookup(|k| {
            (k == "TASKER_STALENESS_THRESHOLD_MINUTES").then(|| "0".into())
        })
        .unwrap();
        assert_eq!(off.staleness_threshold, Duration::ZERO);
        let e = Config::from_lookup(|k| {
            (k == "TASKER_STALENESS_THRESHOLD_MINUTES").then(|| "-1".into())
        })
        .unwrap_err();
        assert!(
            e.message.contains("TASKER_STALENESS_THRESHOLD_MINUTES"),
            "{e}"
        );
        assert_eq!(c.lease, Duration::from_secs(3));
        assert_eq!(c.lease_renew_every, Duration::from_secs(1));
        assert_eq!(c.sqlite_sync, SqliteSync::Full);
        let e = Config::from_lookup(|k| (k == "TASKER_CONCURRENCY").then(|| "many".into()))
            .unwrap_err();
        assert!(e.message.contains("TASKER_CONCURRENCY"), "{e}");
    }
}
