//! JSON bodies and query strings whose errors are client errors that name the field at fault,
//! in the API's error shape (axum's own extractors answer in plain text, some with a 500).

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON request body (extractor) or response body (with status 200, or another through
/// [`Json::with_status`]).
#[derive(Debug, Clone)]
pub struct Json<T>(pub T);

impl<T: Serialize> Json<T> {
    /// The body with `status`.
    pub fn with_status(self, status: StatusCode) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(bytes) => {
                (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
            }
            Err(e) => {
                tracing::error!("cannot serialize a response: {e}");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        self.with_status(StatusCode::OK)
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
            let essence = ct.split(';').next().unwrap_or("").trim();
            if !(essence == "application/json" || essence.ends_with("+json")) {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    format!("expected a JSON body (Content-Type: application/json), got {essence}"),
                ));
            }
        }
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(Json)
    }
}

/// The whole request body; a body over the configured limit is a 413.
pub(crate) async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is larger than this server accepts",
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {}", r.body_text()))
        }
    })
}

/// Parses a JSON body: a syntax error is a 400 with line and column, a value of the wrong
/// shape a 422 naming the field (as a dotted path).
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the request body is empty; expected a JSON object",
        ));
    }
    // Every body of this API is an object; anything else would otherwise be read as a
    // struct's fields in order, with errors about `[0]`.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| malformed(&e))?;
        return Err(ApiError::invalid_field(
            "(body)",
            format!(
                "the request body must be a JSON object, got {}",
                crate::orchestrator::json_kind(&value)
            ),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| {
        let field = field_name(&e.path().to_string(), &e.inner().to_string());
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            malformed(&inner)
        } else {
            let message = strip_position(&inner.to_string());
            ApiError::invalid_field(&field, format!("body field `{field}`: {message}"))
        }
    })?;
    de.end().map_err(|e| malformed(&e))?;
    Ok(value)
}

fn malformed(e: &serde_json::Error) -> ApiError {
    ApiError::bad_request(format!("malformed JSON body: {e}"))
        .with_details(serde_json::json!({"line": e.line(), "column": e.column()}))
}

/// The field an error is about: the path serde tracked, or for a missing or unknown member
/// (which serde reports on the enclosing object) that member's name appended to it.
fn field_name(path: &str, message: &str) -> String {
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|p| message.split_once(p))
        .and_then(|(_, rest)| rest.split('`').next());
    let base = if path == "." { "" } else { path };
    match named {
        // serde_path_to_error already ends the path with an unknown member's name.
        Some(name) if base == name || base.ends_with(&format!(".{name}")) => base.to_string(),
        Some(name) if base.is_empty() => name.to_string(),
        Some(name) => format!("{base}.{name}"),
        None if base.is_empty() => "(body)".to_string(),
        None => base.to_string(),
    }
}

/// serde_json appends ` at line 1 column 17`; the field name says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// A query string (extractor). A bad value is a 422 naming the parameter.
#[derive(Debug, Clone)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded_parse(query));
        serde_path_to_error::deserialize::<_, T>(de)
            .map(Query)
            .map_err(|e| {
                let field = field_name(&e.path().to_string(), &e.inner().to_string());
                let field = if field == "(body)" {
                    "(query)".to_string()
                } else {
                    field
                };
                ApiError::invalid_field(
                    &field,
                    format!("query parameter `{field}`: {}", e.into_inner()),
                )
            })
    }
}

fn form_urlencoded_parse(query: &str) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(query.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        inner: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_json::<Body>(br#"{"name": 3}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.details.unwrap()["field"], "name");
        let e = parse_json::<Body>(br#"{"name": "x", "inner": {"n": "no"}}"#).unwrap_err();
        assert_eq!(e.details.unwrap()["field"], "inner.n");
        let e = parse_json::<Body>(br#"{}"#).unwrap_err();
        assert_eq!(e.details.unwrap()["field"], "name");
        let e = parse_json::<Body>(br#"{"name": "x", "bogus": 1}"#).unwrap_err();
        assert_eq!(e.details.unwrap()["field"], "bogus");
        let e = parse_json::<Body>(br#"{"name": "#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse_json::<Body>(br#"{"name": "x"} trailing"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse_json::<Body>(b"  ").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
