//! What an HTTP exchange means for a step (SPEC §12, the API handler type): which statuses
//! are successes, which failures are worth retrying, how long a `Retry-After` asks to wait,
//! and the outcome a handler hands back. The host packages' API mixins only adapt their HTTP
//! client's response to [`HttpResponse`] and call these, so every language classifies alike.
//!
//! ```
//! use tasker_core::http_outcome::{self, HttpResponse};
//! use tasker_core::{ErrorType, StepOutcome};
//!
//! let response = HttpResponse {
//!     status: 503,
//!     retry_after: Some("2".into()),
//!     ..HttpResponse::default()
//! };
//! let StepOutcome::Failure(f) = http_outcome::failure_outcome(&response, 0, None).unwrap() else {
//!     unreachable!()
//! };
//! assert_eq!(f.error_type, ErrorType::RetryableError);
//! assert_eq!(f.retry_after_seconds, Some(2.0));
//! ```

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::clock::Millis;
use crate::error::{Error, Result};
use crate::job::{ErrorType, StepOutcome};

/// How much of a response body a failure records (characters of text or of compact JSON).
const BODY_EXCERPT_CHARS: usize = 2000;
/// How much of a response body a failure's message quotes.
const MESSAGE_EXCERPT_CHARS: usize = 200;

/// One HTTP response as a handler received it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpResponse {
    /// The status code (100–599).
    pub status: u16,
    /// The request's method (`GET`), for messages and metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The request's URL, for messages and metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The status line's reason phrase (`Service Unavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The raw `Retry-After` header, if the response had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
    /// The body: its JSON value when it parsed as JSON, else its text as a string; `null`
    /// when empty.
    #[serde(default)]
    pub body: Value,
}

/// What a status code says about the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StatusClass {
    /// 2xx: the request succeeded.
    pub ok: bool,
    /// A failure that may succeed later: 5xx, 408 Request Timeout, 429 Too Many Requests.
    pub retryable: bool,
    /// 4xx.
    pub client_error: bool,
    /// 5xx.
    pub server_error: bool,
}

/// Classifies `status` (SPEC §12): 2xx succeed; 4xx fail permanently except 408 and 429;
/// 5xx, 408 and 429 are retryable. Anything else that is not a success (an unfollowed
/// redirect) fails permanently. A status outside 100–599 is refused.
pub fn classify(status: u16) -> Result<StatusClass> {
    if !(100..=599).contains(&status) {
        return Err(Error::validation(format!(
            "{status} is not an HTTP status code (100-599)"
        )));
    }
    let client_error = (400..500).contains(&status);
    let server_error = status >= 500;
    Ok(StatusClass {
        ok: (200..300).contains(&status),
        retryable: server_error || status == 408 || status == 429,
        client_error,
        server_error,
    })
}

/// The wait a `Retry-After` header asks for, in seconds from `now`: delay-seconds (`120`) or
/// an HTTP-date (`Wed, 21 Oct 2015 07:28:00 GMT`, and the obsolete RFC 850 and asctime
/// forms recipients must accept). A date in the past means no wait (`0`); a value that is
/// neither form is `None`.
pub fn retry_after_seconds(header: &str, now: Millis) -> Option<f64> {
    let value = header.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        // RFC 9110 says whole seconds; a fractional value from a lenient server still
        // means what it says.
        return value.parse::<f64>().ok().filter(|s| s.is_finite());
    }
    let at = parse_http_date(value, now)?;
    let millis = at.saturating_mul(1000).saturating_sub(now);
    Some((millis.max(0) as f64) / 1000.0)
}

/// The success outcome of a 2xx response. The result is `result` when given, else the body:
/// a JSON object as it is, an empty body as `{}`, anything else (an array, text) under
/// `data`. The status, method and URL go in the metadata.
pub fn success_outcome(response: &HttpResponse, result: Option<Value>) -> Result<StepOutcome> {
    let class = classify(response.status)?;
    if !class.ok {
        return Err(Error::validation(format!(
            "api_success needs a 2xx response, got {}: use api_failure",
            response.status
        )));
    }
    let result = match result {
        Some(Value::Object(m)) => Value::Object(m),
        Some(other) => {
            return Err(Error::validation(format!(
                "a step result must be a JSON object, got {}",
                json_kind(&other)
            )));
        }
        None => match &response.body {
            Value::Object(m) => Value::Object(m.clone()),
            Value::Null => json!({}),
            other => json!({ "data": other }),
        },
    };
    Ok(StepOutcome::success_with_metadata(
        result,
        Value::Object(exchange_metadata(response)),
    ))
}

/// The failure outcome of a response that is not a success, classified by [`classify`]:
/// `retryable_error` (with the `Retry-After` wait, when the response gives one) or
/// `permanent_error`; error code `HTTP_<status>`; status, method, URL and a body excerpt in
/// the metadata. `message` replaces the generated message.
pub fn failure_outcome(
    response: &HttpResponse,
    now: Millis,
    message: Option<&str>,
) -> Result<StepOutcome> {
    let class = classify(response.status)?;
    if class.ok {
        return Err(Error::validation(format!(
            "api_failure needs a failed response, got {}: use api_success",
            response.status
        )));
    }
    let mut metadata = exchange_metadata(response);
    if !response.body.is_null() {
        metadata.insert("response_body".into(), excerpt(&response.body));
    }
    let wait = response
        .retry_after
        .as_deref()
        .map(|h| (h, retry_after_seconds(h, now)));
    if let Some((raw, _)) = wait {
        metadata.insert("retry_after".into(), Value::String(raw.to_string()));
    }
    let message = match message {
        Some(m) => m.to_string(),
        None => failure_message(response),
    };
    let error_type = if class.retryable {
        ErrorType::RetryableError
    } else {
        ErrorType::PermanentError
    };
    let mut outcome = StepOutcome::failure(message, error_type)
        .with_error_code(format!("HTTP_{}", response.status));
    if class.retryable
        && let Some((_, Some(seconds))) = wait
    {
        metadata.insert("retry_after_seconds".into(), json!(seconds));
        outcome = outcome.with_retry_after(seconds);
    }
    Ok(outcome.with_metadata(Value::Object(metadata)))
}

/// A request that got no response because the connection failed (refused, reset, DNS):
/// `retryable_error`, code `CONNECTION_ERROR`. `operation` says what the handler was doing
/// (`fetching order`).
pub fn connection_failure(detail: &str, operation: Option<&str>) -> StepOutcome {
    transport_failure(
        "connection failed",
        ErrorType::RetryableError,
        "CONNECTION_ERROR",
        detail,
        operation,
    )
}

/// A request that timed out before a response: `timeout` (retryable), code `TIMEOUT`.
pub fn timeout_failure(detail: &str, operation: Option<&str>) -> StepOutcome {
    transport_failure(
        "request timed out",
        ErrorType::Timeout,
        "TIMEOUT",
        detail,
        operation,
    )
}

fn transport_failure(
    what: &str,
    error_type: ErrorType,
    code: &str,
    detail: &str,
    operation: Option<&str>,
) -> StepOutcome {
    let mut message = what.to_string();
    let mut metadata = Map::new();
    if let Some(op) = operation.filter(|o| !o.is_empty()) {
        message.push_str(" while ");
        message.push_str(op);
        metadata.insert("operation".into(), Value::String(op.to_string()));
    }
    if !detail.is_empty() {
        message.push_str(": ");
        message.push_str(detail);
    }
    let outcome = StepOutcome::failure(message, error_type)
        .with_retryable(true)
        .with_error_code(code);
    if metadata.is_empty() {
        outcome
    } else {
        outcome.with_metadata(Value::Object(metadata))
    }
}

fn exchange_metadata(response: &HttpResponse) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("status_code".into(), json!(response.status));
    if let Some(method) = &response.method {
        m.insert("method".into(), json!(method));
    }
    if let Some(url) = &response.url {
        m.insert("url".into(), json!(url));
    }
    m
}

fn failure_message(response: &HttpResponse) -> String {
    let mut message = String::new();
    if let Some(method) = &response.method {
        message.push_str(method);
        message.push(' ');
    }
    if let Some(url) = &response.url {
        message.push_str(url);
        message.push(' ');
    }
    message.push_str(if message.is_empty() {
        "HTTP "
    } else {
        "returned HTTP "
    });
    message.push_str(&response.status.to_string());
    if let Some(reason) = response.reason.as_deref().filter(|r| !r.is_empty()) {
        message.push(' ');
        message.push_str(reason);
    }
    let body = match &response.body {
        Value::Null => String::new(),
        Value::String(s) => s.trim().to_string(),
        other => other.to_string(),
    };
    if !body.is_empty() {
        message.push_str(": ");
        message.push_str(&truncate(&body, MESSAGE_EXCERPT_CHARS));
    }
    message
}

/// The body as recorded with a failure: as it is when short, else its text cut short.
fn excerpt(body: &Value) -> Value {
    let text = match body {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.chars().count() <= BODY_EXCERPT_CHARS {
        body.clone()
    } else {
        Value::String(truncate(&text, BODY_EXCERPT_CHARS))
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An HTTP-date (RFC 9110 §5.6.7) as seconds since the Unix epoch. `now` places the
/// two-digit years of the RFC 850 form.
fn parse_http_date(value: &str, now: Millis) -> Option<i64> {
    let tokens: Vec<&str> = value.split_whitespace().collect();
    let (day, month, year, time) = match tokens.as_slice() {
        // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
        [weekday, day, month, year, time, "GMT"] if weekday.ends_with(',') => {
            if year.len() != 4 {
                return None;
            }
            (
                day.parse().ok()?,
                month_number(month)?,
                year.parse().ok()?,
                *time,
            )
        }
        // RFC 850: Sunday, 06-Nov-94 08:49:37 GMT
        [weekday, date, time, "GMT"] if weekday.ends_with(',') => {
            let mut parts = date.split('-');
            let (d, m, y) = (parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() || y.len() != 2 {
                return None;
            }
            let yy: i64 = y.parse().ok()?;
            (
                d.parse().ok()?,
                month_number(m)?,
                two_digit_year(yy, now),
                *time,
            )
        }
        // asctime: Sun Nov  6 08:49:37 1994
        [_weekday, month, day, time, year] => {
            if year.len() != 4 {
                return None;
            }
            (
                day.parse().ok()?,
                month_number(month)?,
                year.parse().ok()?,
                *time,
            )
        }
        _ => return None,
    };
    let mut hms = time.split(':');
    let (h, m, s) = (hms.next()?, hms.next()?, hms.next()?);
    if hms.next().is_some() || [h, m, s].iter().any(|p| p.len() != 2) {
        return None;
    }
    let (h, m, s): (i64, i64, i64) = (h.parse().ok()?, m.parse().ok()?, s.parse().ok()?);
    // 60 is a leap second.
    if h > 23 || m > 59 || s > 60 || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// RFC 9110: a two-digit year that would be more than 50 years in the future is the most
/// recent past year with those digits.
fn two_digit_year(yy: i64, now: Millis) -> i64 {
    // Counting 365-day years from 1970 lands on this year or the next; step back to the
    // last 1 January not after now.
    let mut this_year = 1970 + now.div_euclid(86_400_000).div_euclid(365);
    while days_from_civil(this_year, 1, 1) * 86_400_000 > now {
        this_year -= 1;
    }
    let year = this_year - this_year.rem_euclid(100) + yy;
    if year > this_year + 50 {
        year - 100
    } else {
        year
    }
}

fn month_number(name: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    MONTHS.iter().position(|m| *m == name).map(|i| i as u32 + 1)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (months from 1).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    // Count from March so that the leap day is the last day of the counted year.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (i64::from(month) + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2015-10-21T07:28:00Z, in milliseconds.
    const OCT_21_2015: Millis = 1_445_412_480_000;

    fn response(status: u16) -> HttpResponse {
        HttpResponse {
            status,
            method: Some("GET".into()),
            url: Some("http://api.test/orders/7".into()),
            ..HttpResponse::default()
        }
    }

    fn failure(outcome: StepOutcome) -> crate::job::StepFailure {
        match outcome {
            StepOutcome::Failure(f) => f,
            other => panic!("not a failure: {other:?}"),
        }
    }

    #[test]
    fn classification_of_every_status_family() {
        for status in [200, 201, 204, 299] {
            let c = classify(status).unwrap();
            assert!(
                c.ok && !c.retryable && !c.client_error && !c.server_error,
                "{status}"
            );
        }
        for status in [400, 401, 403, 404, 409, 410, 422, 499] {
            let c = classify(status).unwrap();
            assert!(!c.ok && !c.retryable && c.client_error, "{status}");
        }
        for status in [408, 429] {
            let c = classify(status).unwrap();
            assert!(
                !c.ok && c.retryable && c.client_error && !c.server_error,
                "{status}"
            );
        }
        for status in [500, 502, 503, 504, 599] {
            let c = classify(status).unwrap();
            assert!(
                !c.ok && c.retryable && c.server_error && !c.client_error,
                "{status}"
            );
        }
        for status in [100, 301, 304] {
            let c = classify(status).unwrap();
            assert!(
                !c.ok && !c.retryable && !c.client_error && !c.server_error,
                "{status}"
            );
        }
        for status in [0, 99, 600, 1000] {
            let e = classify(status).unwrap_err();
            assert_eq!(e.kind, crate::ErrorKind::Validation);
            assert!(e.message.contains(&status.to_string()), "{}", e.message);
        }
    }

    #[test]
    fn retry_after_as_seconds() {
        assert_eq!(retry_after_seconds("120", 0), Some(120.0));
        assert_eq!(retry_after_seconds(" 0 ", 0), Some(0.0));
        assert_eq!(retry_after_seconds("1.5", 0), Some(1.5));
        for bad in ["", "-5", "soon", "1e3", "12 s", "..", "1.2.3"] {
            assert_eq!(retry_after_seconds(bad, 0), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_as_an_http_date_in_all_three_forms() {
        let now = OCT_21_2015 - 90_500;
        for date in [
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "Wednesday, 21-Oct-15 07:28:00 GMT",
            "Wed Oct 21 07:28:00 2015",
        ] {
            assert_eq!(retry_after_seconds(date, now), Some(90.5), "{date}");
        }
        // The past means now.
        assert_eq!(
            retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", OCT_21_2015 + 5_000),
            Some(0.0)
        );
        // asctime pads single-digit days with a space.
        assert_eq!(
            parse_http_date("Sun Nov  6 08:49:37 1994", 0),
            Some(784_111_777)
        );
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT", 0),
            Some(784_111_777)
        );
        assert_eq!(
            parse_http_date("Thu, 29 Feb 2024 00:00:00 GMT", 0),
            Some(1_709_164_800)
        );
    }

    #[test]
    fn rfc850_two_digit_years_are_never_more_than_fifty_years_ahead() {
        // In 2015, "94" is 1994 and "60" is 2060; "70" would be 2070, so it is 1970.
        let at =
            |yy: &str| parse_http_date(&format!("Sunday, 01-Jan-{yy} 00:00:00 GMT"), OCT_21_2015);
        assert_eq!(at("94"), Some(days_from_civil(1994, 1, 1) * 86_400));
        assert_eq!(at("60"), Some(days_from_civil(2060, 1, 1) * 86_400));
        assert_eq!(at("70"), Some(0));
    }

    #[test]
    fn malformed_http_dates_are_refused() {
        for bad in [
            "Wed, 21 Oct 2015 07:28:00",
            "Wed, 21 Oct 2015 07:28:00 UTC",
            "Wed, 32 Oct 2015 07:28:00 GMT",
            "Wed, 29 Feb 2015 07:28:00 GMT",
            "Wed, 21 Okt 2015 07:28:00 GMT",
            "Wed, 21 Oct 15 07:28:00 GMT",
            "Wed, 21 Oct 2015 24:00:00 GMT",
            "Wed, 21 Oct 2015 7:28:00 GMT",
            "Wed, 21 Oct 2015 07:28 GMT",
            "Wednesday, 21-Oct-2015 07:28:00 GMT",
            "2015-10-21T07:28:00Z",
        ] {
            assert_eq!(retry_after_seconds(bad, OCT_21_2015), None, "{bad}");
        }
    }

    #[test]
    fn a_client_error_fails_permanently_with_its_code_and_body() {
        let mut r = response(404);
        r.reason = Some("Not Found".into());
        r.body = json!({"error": "no such order"});
        let f = failure(failure_outcome(&r, 0, None).unwrap());
        assert_eq!(f.error_type, ErrorType::PermanentError);
        assert!(!f.retryable);
        assert_eq!(f.error_code.as_deref(), Some("HTTP_404"));
        assert_eq!(
            f.message,
            r#"GET http://api.test/orders/7 returned HTTP 404 Not Found: {"error":"no such order"}"#
        );
        assert_eq!(f.retry_after_seconds, None);
        assert_eq!(
            f.metadata,
            json!({
                "status_code": 404,
                "method": "GET",
                "url": "http://api.test/orders/7",
                "response_body": {"error": "no such order"},
            })
        );
    }

    #[test]
    fn server_errors_and_408_429_are_retryable_and_honour_retry_after() {
        for status in [500, 503, 408, 429] {
            let mut r = response(status);
            r.retry_after = Some("7".into());
            let f = failure(failure_outcome(&r, 0, None).unwrap());
            assert_eq!(f.error_type, ErrorType::RetryableError, "{status}");
            assert!(f.retryable);
            assert_eq!(f.retry_after_seconds, Some(7.0));
            assert_eq!(f.metadata["retry_after_seconds"], json!(7.0));
            assert_eq!(f.metadata["retry_after"], json!("7"));
        }
        // A date works the same way.
        let mut r = response(503);
        r.retry_after = Some("Wed, 21 Oct 2015 07:28:00 GMT".into());
        let f = failure(failure_outcome(&r, OCT_21_2015 - 3_000, None).unwrap());
        assert_eq!(f.retry_after_seconds, Some(3.0));
        // Without a usable header the engine's backoff applies; the raw value is kept.
        r.retry_after = Some("later".into());
        let f = failure(failure_outcome(&r, 0, None).unwrap());
        assert_eq!(f.retry_after_seconds, None);
        assert_eq!(f.metadata["retry_after"], json!("later"));
        assert!(f.metadata.get("retry_after_seconds").is_none());
    }

    #[test]
    fn a_permanent_failure_ignores_retry_after_and_redirects_fail_permanently() {
        let mut r = response(403);
        r.retry_after = Some("30".into());
        let f = failure(failure_outcome(&r, 0, None).unwrap());
        assert!(!f.retryable);
        assert_eq!(f.retry_after_seconds, None);
        let f = failure(failure_outcome(&response(302), 0, None).unwrap());
        assert_eq!(f.error_type, ErrorType::PermanentError);
        assert_eq!(f.error_code.as_deref(), Some("HTTP_302"));
    }

    #[test]
    fn failure_messages_and_body_excerpts() {
        let bare = HttpResponse {
            status: 500,
            ..HttpResponse::default()
        };
        assert_eq!(
            failure(failure_outcome(&bare, 0, None).unwrap()).message,
            "HTTP 500"
        );
        let f = failure(failure_outcome(&bare, 0, Some("gateway down")).unwrap());
        assert_eq!(f.message, "gateway down");
        let long = HttpResponse {
            status: 500,
            body: Value::String("é".repeat(5000)),
            ..HttpResponse::default()
        };
        let f = failure(failure_outcome(&long, 0, None).unwrap());
        assert_eq!(f.message.chars().count(), "HTTP 500: ".len() + 200 + 1);
        let recorded = f.metadata["response_body"].as_str().unwrap();
        assert_eq!(recorded.chars().count(), 2001);
        assert!(recorded.ends_with('…'));
    }

    #[test]
    fn success_results_from_the_body() {
        let mut r = response(200);
        r.body = json!({"id": 7, "total": 12.5});
        let StepOutcome::Success { result, metadata } = success_outcome(&r, None).unwrap() else {
            panic!()
        };
        assert_eq!(result, json!({"id": 7, "total": 12.5}));
        assert_eq!(
            metadata,
            json!({"status_code": 200, "method": "GET", "url": "http://api.test/orders/7"})
        );
        r.body = json!([1, 2]);
        let StepOutcome::Success { result, .. } = success_outcome(&r, None).unwrap() else {
            panic!()
        };
        assert_eq!(result, json!({"data": [1, 2]}));
        r.body = Value::Null;
        let StepOutcome::Success { result, .. } = success_outcome(&r, None).unwrap() else {
            panic!()
        };
        assert_eq!(result, json!({}));
        let given = success_outcome(&r, Some(json!({"mine": true}))).unwrap();
        assert!(
            matches!(given, StepOutcome::Success { result, .. } if result == json!({"mine": true}))
        );
    }

    #[test]
    fn success_and_failure_refuse_the_wrong_kind_of_response() {
        let e = success_outcome(&response(500), None).unwrap_err();
        assert!(e.message.contains("api_failure"), "{}", e.message);
        let e = failure_outcome(&response(201), 0, None).unwrap_err();
        assert!(e.message.contains("api_success"), "{}", e.message);
        let e = success_outcome(&response(200), Some(json!([1]))).unwrap_err();
        assert!(e.message.contains("an array"), "{}", e.message);
    }

    #[test]
    fn connection_and_timeout_failures_are_retryable() {
        let f = failure(connection_failure(
            "Connection refused",
            Some("fetching order"),
        ));
        assert_eq!(f.error_type, ErrorType::RetryableError);
        assert!(f.retryable);
        assert_eq!(f.error_code.as_deref(), Some("CONNECTION_ERROR"));
        assert_eq!(
            f.message,
            "connection failed while fetching order: Connection refused"
        );
        assert_eq!(f.metadata, json!({"operation": "fetching order"}));
        let f = failure(timeout_failure("read timed out", None));
        assert_eq!(f.error_type, ErrorType::Timeout);
        assert!(f.retryable);
        assert_eq!(f.error_code.as_deref(), Some("TIMEOUT"));
        assert_eq!(f.message, "request timed out: read timed out");
        assert_eq!(f.metadata, Value::Null);
    }

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
    }
}
