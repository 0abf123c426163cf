//! The OpenAPI document, generated from the handlers' annotations and the types they use.

use std::sync::OnceLock;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa::openapi::HttpMethod;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};

use super::{dlq, events, health, metrics, steps, tasks, templates};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tasker REST API",
        description = "Create, follow and operate Tasker workflow tasks. Every `/v1` path is \
                       also served under `/api/v1`. Errors are `{\"error\": {\"code\", \
                       \"message\", \"details\"?}}`. Send an API key as `Authorization: Bearer \
                       KEY` or `X-API-Key: KEY`; each operation's security requirement names \
                       the permission it needs (a key holding it, its `resource:*` or `*` \
                       qualifies). Health checks need no key."
    ),
    paths(
        tasks::create, tasks::list, tasks::get, tasks::cancel, tasks::act, tasks::wait,
        tasks::transitions, events::stream,
        steps::list, steps::get, steps::act, steps::audit,
        templates::list, templates::get, templates::register, templates::validate,
        dlq::list, dlq::get, dlq::stats, dlq::resolve,
        health::health, health::live, health::ready, metrics::metrics,
    ),
    modifiers(&Security),
    tags(
        (name = "tasks", description = "Tasks: create, list, read, wait, follow, cancel, give up, resolve (permissions tasks:create, tasks:list, tasks:read, tasks:cancel)"),
        (name = "steps", description = "A task's steps, operator fixes and audit trails (steps:read, steps:resolve)"),
        (name = "templates", description = "Task templates (templates:read, templates:write)"),
        (name = "dlq", description = "The dead-letter record (dlq:read, dlq:update)"),
        (name = "health", description = "Health checks (no credentials needed)"),
    )
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("tsk_<id>_<secret>")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
        // Each operation's permission comes from the table the server enforces.
        for (path, item) in openapi.paths.paths.iter_mut() {
            for (method, op) in [
                (HttpMethod::Get, &mut item.get),
                (HttpMethod::Post, &mut item.post),
                (HttpMethod::Patch, &mut item.patch),
                (HttpMethod::Delete, &mut item.delete),
            ] {
                let (Some(op), Some(permission)) = (op.as_mut(), permission_of(&method, path))
                else {
                    continue;
                };
                op.security = Some(vec![
                    SecurityRequirement::new("bearer", [permission]),
                    SecurityRequirement::new("api_key", [permission]),
                ]);
            }
        }
    }
}

fn permission_of(method: &HttpMethod, path: &str) -> Option<&'static str> {
    let method = match method {
        HttpMethod::Get => axum::http::Method::GET,
        HttpMethod::Post => axum::http::Method::POST,
        HttpMethod::Patch => axum::http::Method::PATCH,
        HttpMethod::Delete => axum::http::Method::DELETE,
        _ => return None,
    };
    super::security::permission_for(&method, path)
}

/// The OpenAPI document of the REST API.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The OpenAPI document as pretty JSON with a final newline (what `docs/openapi.json` holds).
pub fn openapi_json() -> String {
    let mut s = document()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    s.push('\n');
    s
}

/// Serves the document (permission `system:read`).
pub(crate) async fn serve() -> Response {
    static DOC: OnceLock<String> = OnceLock::new();
    let doc = DOC.get_or_init(openapi_json);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        doc.as_str(),
    )
        .into_response()
}
