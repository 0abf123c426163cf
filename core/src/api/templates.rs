//! `/v1/templates`: list, read, register and validate task templates (SPEC §2).

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{Json, Query, body_bytes, parse_json};
use crate::store::TemplatePut;
use crate::template::{LoadedTemplate, TemplateErrors, parse_str};

/// A registered template, in listings.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct TemplateSummary {
    /// Namespace.
    pub(crate) namespace: String,
    /// Name.
    pub(crate) name: String,
    /// Version.
    pub(crate) version: String,
    /// Description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) description: Option<String>,
    /// Steps declared.
    pub(crate) step_count: usize,
}

/// Registered templates.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct TemplateList {
    /// Sorted by namespace, name and version.
    pub(crate) templates: Vec<TemplateSummary>,
}

/// Filters of `GET /v1/templates`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this namespace.
    namespace: Option<String>,
}

/// Lists registered templates.
#[utoipa::path(
    get, path = "/v1/templates", tag = "templates", params(ListQuery),
    responses((status = 200, description = "The templates", body = TemplateList)),
)]
pub(crate) async fn list(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<TemplateList>> {
    let mut templates: Vec<TemplateSummary> = s
        .tasker
        .store()
        .list_templates()
        .await?
        .into_iter()
        .filter(|t| q.namespace.as_ref().is_none_or(|ns| &t.namespace == ns))
        .map(|t| TemplateSummary {
            step_count: t.steps.len(),
            namespace: t.namespace,
            name: t.name,
            version: t.version,
            description: t.description,
        })
        .collect();
    templates.sort_by(|a, b| {
        (&a.namespace, &a.name, &a.version).cmp(&(&b.namespace, &b.name, &b.version))
    });
    Ok(Json(TemplateList { templates }))
}

/// One registered template, as the engine holds it (current dialect, as JSON).
#[utoipa::path(
    get, path = "/v1/templates/{namespace}/{name}/{version}", tag = "templates",
    params(
        ("namespace" = String, Path, description = "Namespace"),
        ("name" = String, Path, description = "Template name"),
        ("version" = String, Path, description = "Version"),
    ),
    responses(
        (status = 200, description = "The template", body = Object),
        (status = 404, description = "Unknown template", body = ErrorBody),
    ),
)]
pub(crate) async fn get(
    State(s): State<AppState>,
    Path((namespace, name, version)): Path<(String, String, String)>,
) -> ApiResult<Json<crate::template::TaskTemplate>> {
    Ok(Json(
        s.tasker
            .store()
            .get_template(&namespace, &name, Some(&version))
            .await?,
    ))
}

/// A template to register or validate, as YAML text or as a JSON object (either dialect).
/// Raw YAML may also be sent as the whole body with `Content-Type: application/yaml`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TemplateBody {
    /// The template as YAML text.
    #[serde(default)]
    pub(crate) yaml: Option<String>,
    /// The template as a JSON object.
    #[serde(default)]
    pub(crate) template: Option<Value>,
    /// Replace a registered template of the same namespace/name/version whose content
    /// differs (tasks already running keep the content they started with).
    #[serde(default)]
    pub(crate) force: bool,
}

/// Reads the template out of a request: a JSON [`TemplateBody`] or raw YAML.
async fn template_text(s: &AppState, req: Request) -> ApiResult<(String, bool)> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let force_query = req.uri().query().is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "force" && v == "true")
    });
    let bytes = body_bytes(req, s).await?;
    if content_type.contains("yaml") {
        let text = String::from_utf8(bytes.to_vec())
            .map_err(|_| ApiError::bad_request("the YAML body is not UTF-8"))?;
        return Ok((text, force_query));
    }
    if !(content_type == "application/json" || content_type.ends_with("+json")) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected application/json or application/yaml, got {content_type}"),
        ));
    }
    let body: TemplateBody = parse_json(&bytes)?;
    let text = match (body.yaml, body.template) {
        (Some(y), None) => y,
        (None, Some(t)) if t.is_object() => serde_yaml_ng::to_string(&t).map_err(|e| {
            ApiError::invalid_field("template", format!("body field `template`: {e}"))
        })?,
        (None, Some(_)) => {
            return Err(ApiError::invalid_field(
                "template",
                "body field `template`: expected a JSON object",
            ));
        }
        _ => {
            return Err(ApiError::invalid_field(
                "yaml",
                "give the template as exactly one of `yaml` (text) or `template` (object)",
            ));
        }
    };
    Ok((text, body.force || force_query))
}

/// One problem in a template.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct TemplateProblem {
    /// The step concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) step: Option<String>,
    /// Dotted path of the field.
    pub(crate) field: String,
    /// What is wrong.
    pub(crate) message: String,
}

fn problems(e: &TemplateErrors) -> Vec<TemplateProblem> {
    e.0.iter()
        .map(|e| TemplateProblem {
            step: e.step.clone(),
            field: e.field.clone(),
            message: e.message.clone(),
        })
        .collect()
}

fn parse(s: &AppState, text: &str) -> Result<LoadedTemplate, TemplateErrors> {
    parse_str(text, None, &s.tasker.config().environment)
}

/// What a registration did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Registered {
    /// Namespace.
    pub(crate) namespace: String,
    /// Name.
    pub(crate) name: String,
    /// Version.
    pub(crate) version: String,
    /// `inserted`, `unchanged` or `replaced`.
    pub(crate) status: String,
    /// Warnings (unknown keys, odd values).
    pub(crate) warnings: Vec<String>,
}

/// Registers a template. Different content under a registered namespace/name/version is a
/// 409 unless `force` is set.
#[utoipa::path(
    post, path = "/v1/templates", tag = "templates",
    request_body(content = TemplateBody, description = "JSON, or raw YAML with Content-Type application/yaml (then `?force=true`)"),
    responses(
        (status = 201, description = "Registered (new or replaced)", body = Registered),
        (status = 200, description = "Already registered with the same content", body = Registered),
        (status = 409, description = "Registered with different content", body = ErrorBody),
        (status = 422, description = "Invalid template: `details.errors` lists every problem", body = ErrorBody),
    ),
)]
pub(crate) async fn register(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let (text, force) = template_text(&s, req).await?;
    let loaded = parse(&s, &text).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            crate::ErrorKind::Template.code(),
            format!("the template is invalid: {} problem(s)", e.0.len()),
        )
        .with_details(json!({ "errors": problems(&e) }))
    })?;
    let t = &loaded.template;
    let put = if force {
        s.tasker
            .store()
            .put_template(t, true, s.tasker.now())
            .await?
    } else {
        s.tasker.register_template(t).await?
    };
    let (status, code) = match put {
        TemplatePut::Inserted => ("inserted", StatusCode::CREATED),
        TemplatePut::Replaced => ("replaced", StatusCode::CREATED),
        TemplatePut::Unchanged => ("unchanged", StatusCode::OK),
    };
    Ok(Json(Registered {
        namespace: t.namespace.clone(),
        name: t.name.clone(),
        version: t.version.clone(),
        status: status.into(),
        warnings: loaded.warnings.clone(),
    })
    .with_status(code))
}

/// The outcome of validating a template.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Validation {
    /// True when the template has no error.
    pub(crate) valid: bool,
    /// `namespace/name/version`, when the template is valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<String>,
    /// Every problem found.
    pub(crate) errors: Vec<TemplateProblem>,
    /// Warnings.
    pub(crate) warnings: Vec<String>,
}

/// Validates a template without registering it. The answer is 200 either way; `valid` says.
#[utoipa::path(
    post, path = "/v1/templates/validate", tag = "templates",
    request_body(content = TemplateBody, description = "JSON, or raw YAML with Content-Type application/yaml"),
    responses(
        (status = 200, description = "The validation report", body = Validation),
        (status = 400, description = "Unreadable body", body = ErrorBody),
    ),
)]
pub(crate) async fn validate(
    State(s): State<AppState>,
    req: Request,
) -> ApiResult<Json<Validation>> {
    let (text, _) = template_text(&s, req).await?;
    Ok(Json(match parse(&s, &text) {
        Ok(l) => Validation {
            valid: true,
            key: Some(format!(
                "{}/{}/{}",
                l.template.namespace, l.template.name, l.template.version
            )),
            errors: Vec::new(),
            warnings: l.warnings,
        },
        Err(e) => Validation {
            valid: false,
            key: None,
            errors: problems(&e),
            warnings: Vec::new(),
        },
    }))
}
