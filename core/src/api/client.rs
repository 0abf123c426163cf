//! A small HTTP client for the REST API, used by `tasker-ctl task ... --url` and the tests.
//!
//! Built on hyper's client, which the server side already brings in, so talking to a server
//! adds no dependency tree of its own. Plain `http://` only: put a TLS-terminating proxy in
//! front of the server for other networks.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::{Error, ErrorKind, Result};

/// How long a request may take unless the caller says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A client of one Tasker server.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    api_key: Option<String>,
    http: HttpClient<HttpConnector, Full<Bytes>>,
}

/// A response: status, headers and the whole body.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!(
                    "the server answered {} with a body that is not JSON ({e}): {}",
                    self.status,
                    self.text()
                ),
            )
        })
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value, when present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The engine error an error response describes (`{"error": {code, message, details}}`).
    pub fn error(&self) -> Error {
        let body = self.json().unwrap_or(Value::Null);
        let e = &body["error"];
        let code = e["code"].as_str().unwrap_or("");
        let message = e["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {}: {}", self.status, self.text()));
        let kind = match code {
            "not_found" => ErrorKind::NotFound,
            "conflict" => ErrorKind::Conflict,
            "invalid_transition" => ErrorKind::InvalidTransition,
            "template_error" => ErrorKind::Template,
            "timeout" => ErrorKind::Timeout,
            "store_error" => ErrorKind::Store,
            "shutdown" => ErrorKind::Shutdown,
            "internal_error" => ErrorKind::Internal,
            _ if (400..500).contains(&self.status) => ErrorKind::Validation,
            _ => ErrorKind::Internal,
        };
        let message = match self.status {
            401 => format!("{message} (pass --api-key or set TASKER_API_KEY)"),
            _ => message,
        };
        let mut err = Error::new(kind, message);
        err.details = e.get("details").cloned();
        err
    }
}

/// Percent-encodes one path segment.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string (`?a=1&b=x`) of the pairs whose value is given; empty when none is.
pub fn query<'a>(pairs: impl IntoIterator<Item = (&'a str, Option<String>)>) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (k, v) in pairs {
        if let Some(v) = v {
            q.append_pair(k, &v);
            any = true;
        }
    }
    if any {
        format!("?{}", q.finish())
    } else {
        String::new()
    }
}

impl Client {
    /// A client of the server at `base_url` (`http://host:port`), sending `api_key` when given.
    pub fn new(base_url: &str, api_key: Option<String>) -> Result<Client> {
        let base = base_url.trim().trim_end_matches('/').to_string();
        if base.starts_with("https://") {
            return Err(Error::validation(format!(
                "{base}: this client speaks plain http only; reach the server through a local \
                 TLS-terminating proxy"
            )));
        }
        if !base.starts_with("http://") || base.len() <= "http://".len() {
            return Err(Error::validation(format!(
                "{base_url:?} is not a server URL; expected http://HOST:PORT"
            )));
        }
        let http = HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new());
        Ok(Client {
            base,
            api_key: api_key.filter(|k| !k.trim().is_empty()),
            http,
        })
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sends a request. `path` starts with `/` and may carry a query string; `body` is
    /// `(content type, bytes)`. Any status is returned as a [`Response`]; only failing to
    /// reach the server (or `timeout`) is an error.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        timeout: Option<Duration>,
    ) -> Result<Response> {
        let url = format!("{}{path}", self.base);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(&url)
            .header("accept", "application/json");
        if let Some(key) = &self.api_key {
            let value = HeaderValue::from_str(&format!("Bearer {}", key.trim())).map_err(|_| {
                Error::validation("the API key contains characters a header cannot carry")
            })?;
            req = req.header(AUTHORIZATION, value);
        }
        let payload = match body {
            Some((content_type, bytes)) => {
                req = req.header(CONTENT_TYPE, content_type);
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| Error::validation(format!("bad request to {url}: {e}")))?;
        let unreachable = |e: &dyn std::error::Error| {
            let mut cause = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                cause = s.to_string();
                source = s.source();
            }
            Error::new(
                ErrorKind::Store,
                format!("cannot reach the Tasker server at {}: {cause}", self.base),
            )
        };
        let limit = timeout.unwrap_or(DEFAULT_TIMEOUT);
        let exchange = async {
            let response = self.http.request(req).await.map_err(|e| unreachable(&e))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| unreachable(&e))?
                .to_bytes();
            Ok::<_, Error>(Response {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(limit, exchange).await.map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "the Tasker server at {} did not answer within {limit:?}",
                    self.base
                ),
            )
        })?
    }

    /// Sends a request with an optional JSON body; a 2xx answer's JSON body is returned, any
    /// other answer becomes the error it describes.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        self.call_with_timeout(method, path, body, None).await
    }

    /// [`Client::call`] with a time limit other than the default minute.
    pub async fn call_with_timeout(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Option<Duration>,
    ) -> Result<Value> {
        let body = body.map(|v| ("application/json", v.to_string().into_bytes()));
        let r = self.send(method, path, body, timeout).await?;
        if (200..300).contains(&r.status) {
            r.json()
        } else {
            Err(r.error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_segments_encoded() {
        assert!(Client::new("http://127.0.0.1:8080/", None).is_ok());
        assert!(Client::new("https://x", None).is_err());
        assert!(Client::new("127.0.0.1:8080", None).is_err());
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
        assert_eq!(query([("a", Some("x y".into())), ("b", None)]), "?a=x+y");
        assert_eq!(query([("b", None)]), "");
    }
}
