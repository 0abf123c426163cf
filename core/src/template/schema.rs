//! Compiled JSON Schemas (task `input_schema`, step `result_schema`) and their violations.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

/// One way an instance fails a schema.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SchemaViolation {
    /// JSON pointer to the offending part of the instance (`""` for the instance itself).
    pub pointer: String,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for SchemaViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pointer.is_empty() {
            write!(f, "(root): {}", self.message)
        } else {
            write!(f, "{}: {}", self.pointer, self.message)
        }
    }
}

/// A JSON Schema compiled once and checked many times; cheap to clone and shareable between
/// threads. The draft comes from `$schema` (2020-12 when absent); remote `$ref`s are not
/// fetched, so a schema that needs one fails to compile instead of reaching the network.
#[derive(Clone)]
pub struct CompiledSchema {
    validator: Arc<jsonschema::Validator>,
}

impl fmt::Debug for CompiledSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledSchema").finish_non_exhaustive()
    }
}

impl CompiledSchema {
    /// Compiles `schema`, checking it against its meta-schema first.
    ///
    /// # Errors
    /// A message saying why `schema` is not a usable JSON Schema.
    pub fn compile(schema: &Value) -> Result<Self, String> {
        let validator = jsonschema::validator_for(schema).map_err(|e| {
            let at = e.instance_path().as_str();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("at {at}: {e}")
            }
        })?;
        Ok(CompiledSchema {
            validator: Arc::new(validator),
        })
    }

    /// Every violation of the schema by `instance` (empty when it conforms), not just the first.
    pub fn violations(&self, instance: &Value) -> Vec<SchemaViolation> {
        self.validator
            .iter_errors(instance)
            .map(|e| SchemaViolation {
                pointer: e.instance_path().as_str().to_string(),
                message: e.to_string(),
            })
            .collect()
    }

    /// Whether `instance` conforms (faster than collecting violations).
    pub fn is_valid(&self, instance: &Value) -> bool {
        self.validator.is_valid(instance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> CompiledSchema {
        let s = json!({
            "type": "object",
            "required": ["order_id", "items"],
            "properties": {
                "order_id": {"type": "integer", "minimum": 1},
                "items": {"type": "array", "items": {"type": "object", "required": ["sku"]}},
                "email": {"type": "string"}
            }
        });
        match CompiledSchema::compile(&s) {
            Ok(c) => c,
            Err(e) => panic!("schema should compile: {e}"),
        }
    }

    #[test]
    fn lists_every_violation_with_its_pointer() {
        let v =
            schema().violations(&json!({"order_id": 0, "items": [{"sku": "a"}, {}], "email": 5}));
        let mut pointers: Vec<&str> = v.iter().map(|x| x.pointer.as_str()).collect();
        pointers.sort_unstable();
        assert_eq!(pointers, ["/email", "/items/1", "/order_id"], "{v:?}");
        assert!(v.iter().all(|x| !x.message.is_empty()));
    }

    #[test]
    fn root_violations_have_an_empty_pointer() {
        let v = schema().violations(&json!({"order_id": 3}));
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].pointer, "");
        assert!(v[0].message.contains("items"), "{}", v[0].message);
        assert_eq!(v[0].to_string(), format!("(root): {}", v[0].message));
    }

    #[test]
    fn a_conforming_instance_has_no_violations() {
        let ok = json!({"order_id": 3, "items": []});
        assert!(schema().violations(&ok).is_empty());
        assert!(schema().is_valid(&ok));
    }

    #[test]
    fn invalid_schemas_do_not_compile() {
        assert!(CompiledSchema::compile(&json!({"type": "strnig"})).is_err());
        assert!(CompiledSchema::compile(&json!({"required": "order_id"})).is_err());
        assert!(CompiledSchema::compile(&json!(42)).is_err());
        assert!(CompiledSchema::compile(&json!(true)).is_ok());
    }

    #[test]
    fn is_send_sync_and_clone() {
        fn assert_traits<T: Send + Sync + Clone>() {}
        assert_traits::<CompiledSchema>();
    }
}
