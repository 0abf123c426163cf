//! Read-outs and helpers the Python conformance runner needs beyond the engine handle: YAML
//! parsed by the core's own parser (so the tests need no YAML package), child tasks, DLQ
//! entries, outbox records, a subscriber that records delivered event ids, and scratch
//! PostgreSQL databases. Everything crosses as JSON text, like the rest of the module.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use serde_json::Value;
use tasker_core::{DlqFilter, TaskFilter};

use crate::convert::to_json;
use crate::engine::Engine;
use crate::error::{IntoPyResult, invalid_argument};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<EventRecorder>()?;
    m.add_function(wrap_pyfunction!(yaml_to_json, m)?)?;
    m.add_function(wrap_pyfunction!(child_tasks, m)?)?;
    m.add_function(wrap_pyfunction!(dlq_entries, m)?)?;
    m.add_function(wrap_pyfunction!(domain_events, m)?)?;
    m.add_function(wrap_pyfunction!(record_events, m)?)?;
    m.add_function(wrap_pyfunction!(create_scratch_database, m)?)?;
    m.add_function(wrap_pyfunction!(drop_database, m)?)?;
    Ok(())
}

/// Runs `f(tasker)` on `engine`'s runtime with the GIL released.
fn on_engine<T: Send, F>(
    py: Python<'_>,
    engine: &Engine,
    f: impl FnOnce(tasker_core::Tasker) -> F + Send,
) -> PyResult<T>
where
    F: Future<Output = tasker_core::Result<T>>,
{
    engine.check_process()?;
    let tasker = engine.tasker().clone();
    let runtime = crate::runtime::handle()?;
    py.detach(move || runtime.block_on(f(tasker))).py()
}

/// YAML text (one document) as JSON text, parsed by the same parser as the engine's templates.
#[pyfunction]
fn yaml_to_json(text: &str) -> PyResult<String> {
    let value: Value = serde_yaml_ng::from_str(text)
        .map_err(|e| invalid_argument(format!("invalid YAML: {e}")))?;
    to_json(&value)
}

/// Every child task that workflow steps of task `uuid` started, each read in full (steps,
/// `parent` link, `parent_correlation_id`), as a JSON list.
#[pyfunction]
fn child_tasks(py: Python<'_>, engine: PyRef<'_, Engine>, uuid: String) -> PyResult<String> {
    let tasks = on_engine(py, &engine, move |t| async move {
        let filter = TaskFilter {
            parent_task_uuid: Some(uuid),
            limit: Some(1000),
            ..TaskFilter::default()
        };
        let mut children = Vec::new();
        for c in t.list_tasks(&filter).await? {
            children.push(t.get_task(&c.uuid).await?);
        }
        Ok(children)
    })?;
    to_json(&tasks)
}

/// The DLQ entries of task `uuid`, each read with its snapshot (a listing omits them), as a
/// JSON list.
#[pyfunction]
fn dlq_entries(py: Python<'_>, engine: PyRef<'_, Engine>, uuid: String) -> PyResult<String> {
    let entries = on_engine(py, &engine, move |t| async move {
        let filter = DlqFilter {
            task_uuid: Some(uuid),
            ..DlqFilter::default()
        };
        let mut entries = Vec::new();
        for e in t.dlq_list(&filter).await? {
            entries.push(t.dlq_get(&e.dlq_entry_uuid).await?);
        }
        Ok(entries)
    })?;
    to_json(&entries)
}

/// The outbox records of task `uuid` (SPEC §10), as a JSON list.
#[pyfunction]
fn domain_events(py: Python<'_>, engine: PyRef<'_, Engine>, uuid: String) -> PyResult<String> {
    let records = on_engine(py, &engine, move |t| async move {
        let filter = tasker_core::events::EventFilter {
            task_uuid: Some(uuid),
            limit: Some(1000),
            ..Default::default()
        };
        t.domain_events(&filter).await
    })?;
    to_json(&records)
}

/// The ids of the domain events a subscriber on every event name received.
#[pyclass(frozen, module = "tasker_core._native")]
pub(crate) struct EventRecorder {
    seen: Arc<Mutex<HashSet<String>>>,
}

#[pymethods]
impl EventRecorder {
    /// The event ids delivered so far.
    fn ids(&self) -> Vec<String> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<String> = seen.iter().cloned().collect();
        ids.sort_unstable();
        ids
    }
}

/// Subscribes to every domain event of `engine` and records the ids delivered.
#[pyfunction]
fn record_events(engine: PyRef<'_, Engine>) -> PyResult<EventRecorder> {
    engine.check_process()?;
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sink = seen.clone();
    engine.tasker().subscribe(
        "*",
        tasker_core::events::subscriber_fn(move |e| {
            let sink = sink.clone();
            async move {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(e.event_id);
                Ok(())
            }
        }),
    );
    Ok(EventRecorder { seen })
}

/// Creates a fresh, empty database on the PostgreSQL server `server_url` names and returns
/// its URL.
#[pyfunction]
fn create_scratch_database(py: Python<'_>, server_url: String, prefix: String) -> PyResult<String> {
    let runtime = crate::runtime::handle()?;
    py.detach(move || {
        runtime.block_on(tasker_core::store::postgres::create_scratch_database(
            &server_url,
            &prefix,
        ))
    })
    .py()
}

/// Drops the database `database_url` names (connected to through `server_url`), closing its
/// remaining connections first.
#[pyfunction]
fn drop_database(py: Python<'_>, server_url: String, database_url: String) -> PyResult<()> {
    let name = database_url
        .split('?')
        .next()
        .and_then(|base| base.rsplit_once('/'))
        .map(|(_, name)| name.to_string())
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .ok_or_else(|| invalid_argument(format!("no database name in {database_url:?}")))?;
    let runtime = crate::runtime::handle()?;
    py.detach(move || {
        runtime.block_on(async move {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&server_url)
                .await
                .map_err(|e| format!("cannot connect to {server_url}: {e}"))?;
            let dropped = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| format!("cannot drop database {name}: {e}"));
            let _ = conn.close().await;
            dropped
        })
    })
    .map_err(|e| crate::error::raise("StoreError", "store_error", &e, None))
}
