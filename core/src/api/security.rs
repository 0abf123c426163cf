//! Authentication (API keys) and authorization (`resource:action` per route).
//!
//! Every route under `/v1` and `/api/v1` needs a permission, looked up by method and route
//! pattern in [`permission_for`]; a route missing from that table is refused to everyone, so
//! a new endpoint cannot be served unprotected by accident.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::json;

use super::AppState;
use super::error::ApiError;

/// Whether the server asks for credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Every request needs an API key with the route's permission.
    Required,
    /// No credentials are asked for (loopback development, or `--insecure`).
    Disabled,
}

/// Who is calling: recorded as the actor of operator actions.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// `api_key:<name>`, or `api` when authentication is off.
    pub(crate) actor: String,
}

/// The permission a route needs, by method and route pattern (without the `/api` prefix).
pub(crate) fn permission_for(method: &Method, route: &str) -> Option<&'static str> {
    let m = method.as_str();
    Some(match (m, route) {
        ("POST", "/v1/tasks") => "tasks:create",
        ("GET", "/v1/tasks") => "tasks:list",
        ("GET", "/v1/tasks/{uuid}")
        | ("GET", "/v1/tasks/{uuid}/wait")
        | ("GET", "/v1/tasks/{uuid}/events")
        | ("GET", "/v1/tasks/{uuid}/transitions") => "tasks:read",
        // Giving up on or resolving a task ends it, as cancelling does.
        ("DELETE", "/v1/tasks/{uuid}") | ("PATCH", "/v1/tasks/{uuid}") => "tasks:cancel",
        ("GET", "/v1/tasks/{uuid}/workflow_steps")
        | ("GET", "/v1/tasks/{uuid}/workflow_steps/{step}")
        | ("GET", "/v1/tasks/{uuid}/workflow_steps/{step}/audit") => "steps:read",
        ("PATCH", "/v1/tasks/{uuid}/workflow_steps/{step}") => "steps:resolve",
        ("GET", "/v1/templates")
        | ("GET", "/v1/templates/{namespace}/{name}/{version}")
        | ("POST", "/v1/templates/validate") => "templates:read",
        ("POST", "/v1/templates") => "templates:write",
        ("GET", "/v1/dlq") | ("GET", "/v1/dlq/stats") | ("GET", "/v1/dlq/entry/{id}") => "dlq:read",
        ("PATCH", "/v1/dlq/entry/{id}") => "dlq:update",
        ("GET", "/v1/openapi.json") | ("GET", "/metrics") => "system:read",
        _ => return None,
    })
}

/// The credential a request carries: `Authorization: Bearer KEY` or `X-API-Key: KEY`.
fn presented_key(req: &Request) -> Option<&str> {
    let h = req.headers();
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    h.get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// Route middleware: authenticates the caller and checks the route's permission.
pub(crate) async fn authorize(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let route = route.strip_prefix("/api").unwrap_or(&route);
    let Some(permission) = permission_for(req.method(), route) else {
        tracing::error!("route {} {route} has no permission assigned", req.method());
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this route is not open to any key",
        ));
    };
    let caller = match state.auth {
        AuthMode::Disabled => Caller {
            actor: "api".into(),
        },
        AuthMode::Required => {
            let Some(token) = presented_key(&req) else {
                return Err(unauthorized(
                    "an API key is required: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
                ));
            };
            let invalid =
                || unauthorized("the API key is not valid (unknown, revoked or mistyped)");
            let (key_id, secret) = crate::auth::split_token(token).ok_or_else(invalid)?;
            let (key, hash) = state
                .tasker
                .store()
                .find_api_key(key_id)
                .await?
                .ok_or_else(invalid)?;
            if key.revoked_at.is_some() || !crate::auth::secret_matches(secret, &hash) {
                return Err(invalid());
            }
            if !key.allows(permission) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "the API key `{}` lacks the permission {permission}",
                        key.name
                    ),
                )
                .with_details(json!({ "required_permission": permission })));
            }
            Caller {
                actor: format!("api_key:{}", key.name),
            }
        }
    };
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_permission_is_used_by_some_route_and_known() {
        let routes = [
            ("POST", "/v1/tasks"),
            ("GET", "/v1/tasks"),
            ("GET", "/v1/tasks/{uuid}"),
            ("DELETE", "/v1/tasks/{uuid}"),
            ("GET", "/v1/tasks/{uuid}/workflow_steps/{step}"),
            ("PATCH", "/v1/tasks/{uuid}/workflow_steps/{step}"),
            ("GET", "/v1/templates"),
            ("POST", "/v1/templates"),
            ("GET", "/v1/dlq"),
            ("PATCH", "/v1/dlq/entry/{id}"),
            ("GET", "/v1/openapi.json"),
        ];
        let used: Vec<&str> = routes
            .iter()
            .map(|(m, r)| permission_for(&m.parse().unwrap(), r).unwrap())
            .collect();
        for p in crate::auth::PERMISSIONS {
            assert!(used.contains(p), "{p} guards no route");
        }
        assert_eq!(permission_for(&Method::PUT, "/v1/tasks"), None);
    }
}
