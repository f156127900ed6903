//! A checker for request bodies against Firecracker's published API schema (a copy of its
//! definitions in tests/data), shared by the Firecracker test files (`#[path]` module).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;

use nanobox_vmm::firecracker::plan::PlannedRequest;

pub fn definitions() -> Value {
    let text = include_str!("data/firecracker-definitions.json");
    serde_json::from_str(text).expect("schema copy is JSON")
}

/// Validates `value` against definition `name`: required fields present, no field the
/// schema does not know (Firecracker denies unknown fields), types, enums and bounds.
pub fn validate(defs: &Value, name: &str, value: &Value, at: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let Some(def) = defs.get(name) else {
        return vec![format!("{at}: no definition {name}")];
    };
    let Some(obj) = value.as_object() else {
        return vec![format!("{at}: {name} must be an object, got {value}")];
    };
    let props = def["properties"].as_object().expect("properties");
    for req in def["required"].as_array().expect("required") {
        let req = req.as_str().expect("name");
        if !obj.contains_key(req) {
            errors.push(format!("{at}: {name} lacks required field {req}"));
        }
    }
    for (key, v) in obj {
        let Some(prop) = props.get(key) else {
            errors.push(format!("{at}: {name} has no field {key}"));
            continue;
        };
        errors.extend(validate_prop(defs, prop, v, &format!("{at}.{key}")));
    }
    errors
}

fn validate_prop(defs: &Value, prop: &Value, v: &Value, at: &str) -> Vec<String> {
    if let Some(r) = prop.get("$ref").and_then(Value::as_str) {
        return validate(defs, r, v, at);
    }
    let mut errors = Vec::new();
    let ok = match prop["type"].as_str().expect("type") {
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        "array" => {
            if let Some(items) = v.as_array() {
                for (i, item) in items.iter().enumerate() {
                    errors.extend(validate_prop(
                        defs,
                        &prop["items"],
                        item,
                        &format!("{at}[{i}]"),
                    ));
                }
                true
            } else {
                false
            }
        }
        other => panic!("schema type {other} not handled"),
    };
    if !ok {
        errors.push(format!("{at}: {v} is not a {}", prop["type"]));
    }
    if let Some(allowed) = prop.get("enum").and_then(Value::as_array) {
        if !allowed.contains(v) {
            errors.push(format!("{at}: {v} is not one of {allowed:?}"));
        }
    }
    if let (Some(min), Some(n)) = (prop.get("minimum").and_then(Value::as_i64), v.as_i64()) {
        if n < min {
            errors.push(format!("{at}: {n} < minimum {min}"));
        }
    }
    if let (Some(max), Some(n)) = (prop.get("maximum").and_then(Value::as_i64), v.as_i64()) {
        if n > max {
            errors.push(format!("{at}: {n} > maximum {max}"));
        }
    }
    errors
}

pub fn check(request: &PlannedRequest) {
    let errors = validate(
        &definitions(),
        request.definition,
        &request.body,
        request.definition,
    );
    assert!(
        errors.is_empty(),
        "{} {}:\n{}",
        request.method.as_str(),
        request.path,
        errors.join("\n")
    );
}
