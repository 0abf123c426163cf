//! Export settings, from the OpenTelemetry environment variables.

use std::time::Duration;

use hyper::Uri;
use hyper::header::{HeaderName, HeaderValue};

use super::{DEFAULT_SERVICE_NAME, MAX_FLUSH};

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// The full URL spans are POSTed to (`http://host:4318/v1/traces`).
    pub endpoint: String,
    /// Extra request headers (authentication for a hosted collector).
    pub headers: Vec<(String, String)>,
    /// `service.name` of the resource.
    pub service_name: String,
    /// Other resource attributes.
    pub resource: Vec<(String, String)>,
    /// How long one export request may take.
    pub timeout: Duration,
    /// How often queued spans are exported.
    pub export_every: Duration,
    /// Spans waiting for export at most; more are dropped and counted.
    pub queue_size: usize,
    /// Spans per request at most (a full batch is sent at once).
    pub batch_size: usize,
}

impl OtlpConfig {
    /// Exports to `endpoint` (the full traces URL) with the default settings.
    pub fn new(endpoint: impl Into<String>) -> Self {
        OtlpConfig {
            endpoint: endpoint.into(),
            headers: Vec::new(),
            service_name: DEFAULT_SERVICE_NAME.into(),
            resource: Vec::new(),
            timeout: Duration::from_secs(10),
            export_every: Duration::from_secs(1),
            queue_size: 2048,
            batch_size: 512,
        }
    }

    /// Reads the standard variables; `Ok(None)` when no endpoint is set (export is off).
    ///
    /// - `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or `OTEL_EXPORTER_OTLP_ENDPOINT`
    ///   (`/v1/traces` appended); `http://` only.
    /// - `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TRACES_HEADERS`: `k=v,k2=v2`,
    ///   values percent-decoded.
    /// - `OTEL_SERVICE_NAME` (default `tasker`), `OTEL_RESOURCE_ATTRIBUTES` (`k=v,...`).
    /// - `OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT` (ms, default 10000).
    /// - `OTEL_BSP_SCHEDULE_DELAY` (ms, default 1000), `OTEL_BSP_MAX_QUEUE_SIZE` (2048),
    ///   `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (512).
    /// - `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn export off.
    ///
    /// An unusable value (an `https://` endpoint, `grpc` protocol, a malformed header list or
    /// number) is an error naming the variable.
    pub fn from_env() -> Result<Option<Self>, String> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`OtlpConfig::from_env`] over any source of variables.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let var = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            return Ok(None);
        }
        let endpoint = match (
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            var("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(url), _) => url,
            (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
            (None, None) => return Ok(None),
        };
        let uri: Uri = endpoint
            .parse()
            .map_err(|e| format!("OTLP endpoint {endpoint}: not a URL ({e})"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "OTLP endpoint {endpoint}: https is not supported; export to a collector \
                     over http:// (it can forward over TLS)"
                ));
            }
            _ => return Err(format!("OTLP endpoint {endpoint}: must start with http://")),
        }
        if uri.host().is_none() {
            return Err(format!("OTLP endpoint {endpoint}: no host"));
        }
        for k in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(p) = var(k)
                && p != "http/json"
                && p != "http/protobuf"
            {
                return Err(format!(
                    "{k}={p}: only OTLP over HTTP is supported (http/json)"
                ));
            }
        }
        let mut config = OtlpConfig::new(endpoint);
        for k in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(v) = var(k) {
                for (name, value) in parse_pairs(&v).map_err(|e| format!("{k}: {e}"))? {
                    HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| format!("{k}: `{name}` is not a header name"))?;
                    HeaderValue::from_str(&value)
                        .map_err(|_| format!("{k}: the value of `{name}` is not a header value"))?;
                    config
                        .headers
                        .retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
                    config.headers.push((name, value));
                }
            }
        }
        if let Some(v) = var("OTEL_RESOURCE_ATTRIBUTES") {
            for (k, v) in parse_pairs(&v).map_err(|e| format!("OTEL_RESOURCE_ATTRIBUTES: {e}"))? {
                if k == "service.name" {
                    config.service_name = v;
                } else {
                    config.resource.push((k, v));
                }
            }
        }
        if let Some(name) = var("OTEL_SERVICE_NAME") {
            config.service_name = name;
        }
        let number = |k: &str| -> Result<Option<u64>, String> {
            var(k)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| format!("{k}={v}: not a whole number"))
                })
                .transpose()
        };
        if let Some(ms) =
            number("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")?.or(number("OTEL_EXPORTER_OTLP_TIMEOUT")?)
        {
            config.timeout = Duration::from_millis(ms.max(1));
        }
        if let Some(ms) = number("OTEL_BSP_SCHEDULE_DELAY")? {
            config.export_every = Duration::from_millis(ms.max(1));
        }
        if let Some(n) = number("OTEL_BSP_MAX_QUEUE_SIZE")? {
            config.queue_size = (n as usize).max(1);
        }
        if let Some(n) = number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")? {
            config.batch_size = (n as usize).max(1);
        }
        config.batch_size = config.batch_size.min(config.queue_size);
        Ok(Some(config))
    }

    /// How long the shutdown flush may take: the export timeout, at most [`MAX_FLUSH`].
    pub fn flush_deadline(&self) -> Duration {
        self.timeout.min(MAX_FLUSH)
    }
}

/// `k=v,k2=v2` with percent-encoded values (the W3C baggage form the OpenTelemetry variables
/// use).
fn parse_pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(format!("`{item}` is not key=value"));
        };
        let k = percent_decode(k.trim())?;
        if k.is_empty() {
            return Err(format!("`{item}` has an empty key"));
        }
        out.push((k, percent_decode(v.trim())?));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("`{s}` has a bad percent escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Option<OtlpConfig>, String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OtlpConfig::from_lookup(|k| vars.get(k).cloned())
    }

    #[test]
    fn export_is_off_without_an_endpoint() {
        assert_eq!(config(&[]).unwrap(), None);
        assert_eq!(
            config(&[
                ("OTEL_SERVICE_NAME", "x"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", " ")
            ])
            .unwrap(),
            None
        );
        assert_eq!(
            config(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", "true")
            ])
            .unwrap(),
            None
        );
    }

    #[test]
    fn the_standard_variables_configure_export() {
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=abc%3D%3D, x-team = core ",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "API-KEY=override"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod,service.name=r",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(
            c.headers,
            vec![
                ("x-team".to_string(), "core".to_string()),
                ("API-KEY".to_string(), "override".to_string()),
            ]
        );
        assert_eq!(c.service_name, "r");
        assert_eq!(
            c.resource,
            vec![("deployment.environment".into(), "prod".into())]
        );
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.flush_deadline(), Duration::from_millis(2500));
        assert_eq!((c.queue_size, c.batch_size), (2048, 512));

        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:9999/custom"),
            ("OTEL_SERVICE_NAME", "billing"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "k=a%2Cb"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://c:9999/custom");
        assert_eq!(c.service_name, "billing");
        assert_eq!(c.headers, vec![("k".to_string(), "a,b".to_string())]);
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.flush_deadline(), MAX_FLUSH);
    }

    #[test]
    fn unusable_settings_are_refused_by_name() {
        let e = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")]).unwrap_err();
        assert!(e.contains("https is not supported"), "{e}");
        let e = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap_err();
        assert!(e.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc"), "{e}");
        let e = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
        ])
        .unwrap_err();
        assert!(
            e.contains("OTEL_EXPORTER_OTLP_HEADERS") && e.contains("novalue"),
            "{e}"
        );
        let e = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "many"),
        ])
        .unwrap_err();
        assert!(e.contains("OTEL_BSP_MAX_QUEUE_SIZE=many"), "{e}");
    }
}
