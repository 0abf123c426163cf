//! YAML text → JSON value: syntax errors with their position, merge keys, and the YAML-only
//! constructs (non-string keys, tags, NaN) given a JSON meaning or reported.

use serde_json::{Map, Value};

use super::parse::join;
use super::{TemplateError, TemplateErrors};

/// Parses `yaml` into one JSON value; every problem names `file`.
pub(super) fn read_yaml(yaml: &str, file: Option<&str>) -> Result<Value, TemplateErrors> {
    let syntax = |e: serde_yaml_ng::Error| {
        let message = match e.location() {
            Some(at) if !e.to_string().contains("line") => format!(
                "invalid YAML at line {}, column {}: {e}",
                at.line(),
                at.column()
            ),
            _ => format!("invalid YAML: {e}"),
        };
        TemplateErrors::from(TemplateError::new(file, None, "", message))
    };
    let mut value: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).map_err(&syntax)?;
    // `<<: *anchor` merge keys are common in hand-written YAML; resolve them before mapping.
    value.apply_merge().map_err(&syntax)?;
    let mut problems = Vec::new();
    let json = yaml_to_json(value, "", &mut problems);
    if problems.is_empty() {
        Ok(json)
    } else {
        Err(TemplateErrors(
            problems
                .into_iter()
                .map(|(field, message)| TemplateError::new(file, None, field, message))
                .collect(),
        ))
    }
}

/// YAML allows what JSON does not (non-string keys, tags, NaN); convert what has an obvious
/// JSON spelling and report the rest.
fn yaml_to_json(
    value: serde_yaml_ng::Value,
    path: &str,
    problems: &mut Vec<(String, String)>,
) -> Value {
    use serde_yaml_ng::Value as Y;
    match value {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f).map_or_else(
                    || {
                        problems.push((
                            path.to_string(),
                            format!("{f} cannot be represented in JSON"),
                        ));
                        Value::Null
                    },
                    Value::Number,
                )
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| yaml_to_json(item, &format!("{path}[{i}]"), problems))
                .collect(),
        ),
        Y::Mapping(mapping) => {
            let mut out = Map::new();
            for (key, item) in mapping {
                let key = match key {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    Y::Null => "null".to_string(),
                    _ => {
                        problems.push((path.to_string(), "a mapping key must be a scalar".into()));
                        continue;
                    }
                };
                let child = join(path, &key);
                out.insert(key, yaml_to_json(item, &child, problems));
            }
            Value::Object(out)
        }
        // A tag (`!Foo value`) has no JSON meaning; keep the tagged value.
        Y::Tagged(tagged) => yaml_to_json(tagged.value, path, problems),
    }
}
