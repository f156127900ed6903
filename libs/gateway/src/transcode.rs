//! HTTP/JSON to gRPC messages and back, in the proto3 JSON mapping, for any message in the
//! descriptor pool (prost-reflect's `DynamicMessage` serde; nothing is written per field).
//!
//! A request message is assembled as JSON first, grpc-gateway style: the body (the whole
//! message for `body: "*"`, one field for `body: "field"`), then query parameters (typed by
//! the field they name), then the path variables; the result is checked for unknown fields,
//! so the error can name the field and where it was, and then deserialized. Responses use
//! the proto field names (`boot_time_ms`) and include fields at their default values, so a
//! client always sees every field.

use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage,
    SerializeOptions,
};
use serde_json::{Map, Value};

use crate::routes::{BodyRule, Route};
use crate::status::ApiError;

/// Query parameters the gateway itself reads (never request fields).
pub const RESERVED_QUERY: &[&str] = &["stream"];

/// The JSON form of responses: proto field names, defaults included.
pub fn serialize_options() -> SerializeOptions {
    SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false)
}

/// Builds the request message of `route` from the path variables, the raw query string
/// and the body bytes (already bounded by the caller). Every error is `INVALID_ARGUMENT`
/// and names the field or the problem.
pub fn build_request(
    route: &Route,
    bindings: &[(String, String)],
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, ApiError> {
    let input = route.method.input();
    let mut root = Map::new();

    let body_text = trim_ascii(body);
    match &route.body {
        BodyRule::None => {
            if !body_text.is_empty() {
                return Err(ApiError::invalid(format!(
                    "{} {} takes no request body (its fields are path and query parameters)",
                    route.http_method,
                    route.template.as_str()
                )));
            }
        }
        BodyRule::All => {
            if !body_text.is_empty() {
                match parse_json(body_text)? {
                    Value::Object(map) => root = map,
                    other => {
                        return Err(ApiError::invalid(format!(
                            "the request body must be a JSON object ({}), not {}",
                            input.full_name(),
                            json_kind(&other)
                        )))
                    }
                }
            }
        }
        BodyRule::Field(field) => {
            if !body_text.is_empty() {
                root.insert(field.name().to_owned(), parse_json(body_text)?);
            }
        }
    }

    if let Some(query) = query {
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            if RESERVED_QUERY.contains(&key.as_ref()) && route.method.is_server_streaming() {
                continue;
            }
            add_query_param(route, &input, &mut root, &key, &value)?;
        }
    }

    for (path, value) in bindings {
        add_path_binding(&input, &mut root, path, value)?;
    }

    let root = Value::Object(root);
    check_fields(&input, &root, "")?;
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(&root, &mut track);
    DynamicMessage::deserialize_with_options(
        input.clone(),
        de,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| {
        let segments = track.path();
        let path = segments.to_string();
        if path.is_empty() || path == "." {
            return ApiError::invalid(format!("invalid {}: {e}", input.full_name()));
        }
        // Name the expected type where the path leads to a field (through list indices;
        // map keys are not field names).
        let fields: Vec<String> = segments
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                _ => None,
            })
            .collect();
        match resolve(&input, &fields.join(".")) {
            Ok((_, field)) => {
                ApiError::invalid(format!("invalid `{path}` ({}): {e}", type_name(&field)))
            }
            Err(_) => ApiError::invalid(format!("invalid `{path}`: {e}")),
        }
    })
}

/// The proto type of a field, for messages (`uint32`, `repeated string`,
/// `nanobox.v1.NetworkMode`).
fn type_name(field: &FieldDescriptor) -> String {
    let kind = match field.kind() {
        Kind::Enum(e) => e.full_name().to_owned(),
        Kind::Message(m) if field.is_map() => {
            return format!(
                "map<{}, {}>",
                kind_name(&m.map_entry_key_field().kind()),
                kind_name(&m.map_entry_value_field().kind())
            )
        }
        other => kind_name(&other),
    };
    if field.is_list() {
        format!("repeated {kind}")
    } else {
        kind
    }
}

fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 => "int32".into(),
        Kind::Int64 => "int64".into(),
        Kind::Uint32 => "uint32".into(),
        Kind::Uint64 => "uint64".into(),
        Kind::Sint32 => "sint32".into(),
        Kind::Sint64 => "sint64".into(),
        Kind::Fixed32 => "fixed32".into(),
        Kind::Fixed64 => "fixed64".into(),
        Kind::Sfixed32 => "sfixed32".into(),
        Kind::Sfixed64 => "sfixed64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes (base64)".into(),
        Kind::Enum(e) => e.full_name().to_owned(),
        Kind::Message(m) => m.full_name().to_owned(),
    }
}

/// The JSON of a response: the `response_body` field if the route has one, else the
/// whole message.
pub fn response_json(route: &Route, response: &DynamicMessage) -> Result<Value, ApiError> {
    match &route.response_body {
        Some(field) => match field.kind() {
            Kind::Message(_) if !field.is_list() && !field.is_map() => {
                // An unset message field reads as its default message, so the client still
                // gets every field (at its default) rather than nothing.
                let value = response.get_field(field);
                match value.as_message() {
                    Some(message) => message_json(message),
                    None => Ok(Value::Null),
                }
            }
            _ => {
                let mut whole = message_json(response)?;
                Ok(whole
                    .as_object_mut()
                    .and_then(|o| o.remove(field.name()))
                    .unwrap_or(Value::Null))
            }
        },
        None => message_json(response),
    }
}

/// A message as JSON ([`serialize_options`]).
pub fn message_json(message: &DynamicMessage) -> Result<Value, ApiError> {
    message
        .serialize_with_options(serde_json::value::Serializer, &serialize_options())
        .map_err(|e| {
            ApiError::new(
                tonic::Code::Internal,
                format!(
                    "the {} response cannot be written as JSON: {e}",
                    message.descriptor().full_name()
                ),
            )
        })
}

fn parse_json(text: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(text)
        .map_err(|e| ApiError::invalid(format!("malformed JSON in the request body: {e}")))
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Finds a field by its proto name or its JSON (lowerCamelCase) name, as the proto3 JSON
/// mapping accepts both.
fn field_named(message: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    message
        .get_field_by_name(name)
        .or_else(|| message.get_field_by_json_name(name))
}

/// Whether a message type has a JSON form that is not an object (so its contents are not
/// fields to check or set one by one).
fn is_well_known(message: &MessageDescriptor) -> bool {
    message.package_name() == "google.protobuf"
}

/// Rejects fields the message type does not have, naming the field with its full path
/// (`resources.vpcu`) and the message type.
fn check_fields(message: &MessageDescriptor, value: &Value, at: &str) -> Result<(), ApiError> {
    let Value::Object(map) = value else {
        // Type mismatches are reported by the deserializer, with their path.
        return Ok(());
    };
    for (key, child) in map {
        let path = join(at, key);
        let Some(field) = field_named(message, key) else {
            return Err(ApiError::invalid(format!(
                "unknown field `{path}`: {} has no field `{key}`",
                message.full_name()
            )));
        };
        if let Kind::Message(inner) = field.kind() {
            if field.is_map() {
                let value_field = inner.map_entry_value_field();
                if let (Kind::Message(v), Value::Object(entries)) = (value_field.kind(), child) {
                    if !is_well_known(&v) {
                        for (k, entry) in entries {
                            check_fields(&v, entry, &format!("{path}[{k}]"))?;
                        }
                    }
                }
            } else if is_well_known(&inner) {
                continue;
            } else if field.is_list() {
                if let Value::Array(items) = child {
                    for (i, item) in items.iter().enumerate() {
                        check_fields(&inner, item, &format!("{path}[{i}]"))?;
                    }
                }
            } else {
                check_fields(&inner, child, &path)?;
            }
        }
    }
    Ok(())
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

/// Sets the field a query parameter names: `a.b=v` (nested), `tags=x&tags=y` (repeated),
/// `metadata[key]=v` (map entries).
fn add_query_param(
    route: &Route,
    input: &MessageDescriptor,
    root: &mut Map<String, Value>,
    key: &str,
    value: &str,
) -> Result<(), ApiError> {
    let unknown =
        |why: String| ApiError::invalid(format!("unknown query parameter `{key}`: {why}"));
    if matches!(route.body, BodyRule::All) {
        return Err(unknown(format!(
            "{} {} takes its fields in the JSON body",
            route.http_method,
            route.template.as_str()
        )));
    }
    let (path, map_key) = match key.split_once('[') {
        Some((path, rest)) => match rest.strip_suffix(']') {
            Some(k) if !k.is_empty() && !k.contains(['[', ']']) => (path, Some(k)),
            _ => return Err(unknown("expected `field[key]` for a map entry".to_owned())),
        },
        None => (key, None),
    };
    if route.template.variables().iter().any(|v| v.field == path) {
        return Err(unknown(format!("`{path}` is set by the URL path")));
    }
    if let BodyRule::Field(body) = &route.body {
        let top = path.split('.').next().unwrap_or(path);
        if field_named(input, top).is_some_and(|f| f.number() == body.number()) {
            return Err(unknown(format!("`{top}` is the request body")));
        }
    }
    let (parents, field) = resolve(input, path).map_err(unknown)?;
    let slot = slot_for(root, &parents, &field, key)?;
    if field.is_map() {
        let Some(map_key) = map_key else {
            return Err(unknown(format!(
                "`{path}` is a map: set entries as `{path}[key]=value`"
            )));
        };
        let Kind::Message(entry) = field.kind() else {
            return Err(unknown(format!("`{path}` is not a map")));
        };
        let converted = scalar_json(&entry.map_entry_value_field(), value, key)?;
        let object = slot
            .entry(field.name().to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        match object {
            Value::Object(o) => {
                if o.insert(map_key.to_owned(), converted).is_some() {
                    return Err(ApiError::invalid(format!(
                        "query parameter `{key}` is given twice"
                    )));
                }
            }
            _ => return Err(ApiError::invalid(format!("`{path}` is given twice"))),
        }
        return Ok(());
    }
    if map_key.is_some() {
        return Err(unknown(format!("`{path}` is not a map")));
    }
    let converted = scalar_json(&field, value, key)?;
    if field.is_list() {
        let list = slot
            .entry(field.name().to_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        match list {
            Value::Array(items) => items.push(converted),
            _ => return Err(ApiError::invalid(format!("`{path}` is given twice"))),
        }
    } else if slot.insert(field.name().to_owned(), converted).is_some() {
        return Err(ApiError::invalid(format!(
            "query parameter `{key}` is given twice"
        )));
    }
    Ok(())
}

/// Sets a path variable's field; a body that set it to something else is an error.
fn add_path_binding(
    input: &MessageDescriptor,
    root: &mut Map<String, Value>,
    path: &str,
    value: &str,
) -> Result<(), ApiError> {
    let (parents, field) = resolve(input, path).map_err(|why| {
        ApiError::new(
            tonic::Code::Internal,
            format!("path variable `{path}`: {why}"),
        )
    })?;
    let converted = scalar_json(&field, value, path)?;
    let slot = slot_for(root, &parents, &field, path)?;
    let existing = slot
        .get(field.name())
        .or_else(|| slot.get(field.json_name()))
        .cloned();
    match existing {
        Some(body) if body != converted && !body.is_null() => Err(ApiError::invalid(format!(
            "`{path}` is {body} in the body but {converted} in the URL path"
        ))),
        _ => {
            slot.remove(field.json_name());
            slot.insert(field.name().to_owned(), converted);
            Ok(())
        }
    }
}

/// Resolves a dotted field path to the singular message fields leading to it and the
/// field itself.
fn resolve(
    message: &MessageDescriptor,
    path: &str,
) -> Result<(Vec<FieldDescriptor>, FieldDescriptor), String> {
    let mut current = message.clone();
    let mut parents = Vec::new();
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let field = field_named(&current, part)
            .ok_or_else(|| format!("{} has no field `{part}`", current.full_name()))?;
        if i + 1 == parts.len() {
            return Ok((parents, field));
        }
        match field.kind() {
            Kind::Message(inner) if !field.is_list() && !field.is_map() => {
                parents.push(field);
                current = inner;
            }
            _ => return Err(format!("`{part}` has no fields")),
        }
    }
    Err("empty field path".to_owned())
}

/// The JSON object holding `field`, creating the parent objects on the way.
fn slot_for<'a>(
    root: &'a mut Map<String, Value>,
    parents: &[FieldDescriptor],
    field: &FieldDescriptor,
    key: &str,
) -> Result<&'a mut Map<String, Value>, ApiError> {
    let mut slot = root;
    for parent in parents {
        // The body may use the JSON name; move it under the proto name so there is one.
        if parent.json_name() != parent.name() {
            if let Some(v) = slot.remove(parent.json_name()) {
                slot.insert(parent.name().to_owned(), v);
            }
        }
        let next = slot
            .entry(parent.name().to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if next.is_null() {
            *next = Value::Object(Map::new());
        }
        slot = next.as_object_mut().ok_or_else(|| {
            ApiError::invalid(format!(
                "`{key}`: `{}` is not an object in the body",
                parent.name()
            ))
        })?;
    }
    if field.json_name() != field.name() {
        if let Some(v) = slot.remove(field.json_name()) {
            slot.insert(field.name().to_owned(), v);
        }
    }
    Ok(slot)
}

/// A query or path value as the JSON the proto3 mapping expects for the field's type.
fn scalar_json(field: &FieldDescriptor, value: &str, key: &str) -> Result<Value, ApiError> {
    let bad =
        |expected: &str| ApiError::invalid(format!("invalid `{key}`: `{value}` is not {expected}"));
    Ok(match field.kind() {
        Kind::Bool => match value {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => return Err(bad("true or false")),
        },
        Kind::Enum(e) => match value.parse::<i32>() {
            Ok(n) => Value::from(n),
            Err(_) if e.get_value_by_name(value).is_some() => Value::String(value.to_owned()),
            Err(_) => {
                return Err(bad(&format!(
                    "a value of {} ({})",
                    e.full_name(),
                    e.values()
                        .map(|v| v.name().to_owned())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        },
        // Numbers stay strings: the proto3 JSON mapping accepts them quoted, and the
        // deserializer then reports range and syntax errors with the field's path.
        Kind::Message(m) if !is_well_known(&m) => {
            return Err(ApiError::invalid(format!(
                "`{key}` is a message ({}): set its fields as `{key}.<field>`",
                m.full_name()
            )))
        }
        _ => Value::String(value.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use axum::http::Method;
    use prost_reflect::DescriptorPool;

    use super::*;
    use crate::routes::{RouteMatch, RouteTable};

    fn table() -> RouteTable {
        let pool = DescriptorPool::decode(nanobox_proto::FILE_DESCRIPTOR_SET).unwrap();
        RouteTable::build(&pool, |s| (s.package_name() == "nanobox.v1").then_some(0)).unwrap()
    }

    fn request(method: Method, uri: &str, body: &str) -> Result<Value, ApiError> {
        let table = table();
        let (path, query) = match uri.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (uri, None),
        };
        let RouteMatch::Found(route, bindings) = table.find(&method, path) else {
            panic!("no route for {method} {uri}");
        };
        let message = build_request(route, &bindings, query, body.as_bytes())?;
        message_json(&message)
    }

    #[test]
    fn body_path_and_query_make_the_request() {
        let v = request(
            Method::POST,
            "/api/v1/sandboxes/sb-1/exec",
            r#"{"command": "sh", "args": ["-c", "true"], "timeoutMs": 5, "stdin": "aGk=", "uid": 0}"#,
        )
        .unwrap();
        assert_eq!(v["id"], "sb-1");
        assert_eq!(v["command"], "sh");
        assert_eq!(v["args"], serde_json::json!(["-c", "true"]));
        assert_eq!(v["timeout_ms"], 5);
        assert_eq!(v["stdin"], "aGk=");
        assert_eq!(v["uid"], 0, "optional fields keep presence: {v}");

        let v = request(
            Method::GET,
            "/api/v1/sandboxes?state=SANDBOX_STATE_RUNNING&page_size=50&metadata[team]=a%20b&metadata[x]=y",
            "",
        )
        .unwrap();
        assert_eq!(v["state"], "SANDBOX_STATE_RUNNING");
        assert_eq!(v["page_size"], 50);
        assert_eq!(v["metadata"], serde_json::json!({"team": "a b", "x": "y"}));

        let v = request(Method::GET, "/api/v1/sandboxes?state=3", "").unwrap();
        assert_eq!(v["state"], "SANDBOX_STATE_RUNNING");

        let v = request(Method::DELETE, "/api/v1/templates/t1?force=true", "").unwrap();
        assert_eq!(v, serde_json::json!({"name": "t1", "force": true}));

        // An empty body is the empty message.
        let v = request(Method::POST, "/api/v1/sandboxes/sb-1/keepalive", "  ").unwrap();
        assert_eq!(v, serde_json::json!({"id": "sb-1", "timeout_sec": 0}));
        // The same id in body and path is fine.
        request(
            Method::POST,
            "/api/v1/sandboxes/sb-1/keepalive",
            r#"{"id":"sb-1"}"#,
        )
        .unwrap();
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let cases = [
            (Method::POST, "/api/v1/templates/warmup", r#"{"name": "x", "imgae": "y"}"#,
             "unknown field `imgae`: nanobox.v1.WarmupRequest has no field `imgae`"),
            (Method::POST, "/api/v1/sandboxes", r#"{"template": "x", "resources": {"vpcu": 2}}"#,
             "unknown field `resources.vpcu`: nanobox.v1.Resources has no field `vpcu`"),
            (Method::POST, "/api/v1/sandboxes", r#"{"template": "x""#,
             "malformed JSON in the request body: EOF while parsing an object at line 1 column 16"),
            (Method::POST, "/api/v1/sandboxes", "[1]",
             "must be a JSON object (nanobox.v1.CreateSandboxRequest), not an array"),
            (Method::POST, "/api/v1/sandboxes", r#"{"resources": {"vcpu": "many"}}"#,
             "invalid `resources.vcpu`"),
            (Method::POST, "/api/v1/sandboxes", r#"{"resources": {"vcpu": -1}}"#,
             "invalid `resources.vcpu` (uint32): out of range"),
            (Method::POST, "/api/v1/sandboxes/sb-1/exec", r#"{"args": ["a", 1]}"#,
             "invalid `args[1]` (repeated string)"),
            (Method::POST, "/api/v1/sandboxes/sb-1/exec", r#"{"stdin": "%%"}"#,
             "invalid `stdin` (bytes (base64))"),
            (Method::POST, "/api/v1/sandboxes", r#"{"network": {"mode": "NETWORK_MODE_SPACE"}}"#,
             "invalid `network.mode` (nanobox.v1.NetworkMode): unrecognized enum value 'NETWORK_MODE_SPACE'"),
            (Method::POST, "/api/v1/sandboxes/sb-1/keepalive", r#"{"id": "sb-2"}"#,
             r#"`id` is "sb-2" in the body but "sb-1" in the URL path"#),
            (Method::POST, "/api/v1/sandboxes/sb-1/keepalive?timeout_sec=3", "",
             "unknown query parameter `timeout_sec`: POST /api/v1/sandboxes/{id}/keepalive takes its fields in the JSON body"),
            (Method::GET, "/api/v1/sandboxes?colour=red", "",
             "unknown query parameter `colour`: nanobox.v1.ListSandboxesRequest has no field `colour`"),
            (Method::GET, "/api/v1/sandboxes?state=BOGUS", "",
             "invalid `state`: `BOGUS` is not a value of nanobox.v1.SandboxState"),
            (Method::GET, "/api/v1/sandboxes?page_size=x", "", "invalid `page_size`"),
            (Method::GET, "/api/v1/sandboxes?metadata=x", "", "is a map"),
            (Method::GET, "/api/v1/sandboxes/sb-1?id=sb-2", "", "`id` is set by the URL path"),
            (Method::GET, "/api/v1/sandboxes/sb-1", "{}", "takes no request body"),
            (Method::DELETE, "/api/v1/templates/t?force=maybe", "", "`maybe` is not true or false"),
        ];
        for (method, uri, body, want) in cases {
            let e = request(method.clone(), uri, body).unwrap_err();
            assert_eq!(e.code, tonic::Code::InvalidArgument, "{uri}");
            assert!(
                e.message.contains(want),
                "{method} {uri} {body}:\n got {}\nwant {want}",
                e.message
            );
        }
    }

    #[test]
    fn responses_use_proto_names_defaults_and_response_body() {
        let table = table();
        let RouteMatch::Found(route, _) = table.find(&Method::POST, "/api/v1/templates/warmup")
        else {
            panic!()
        };
        let mut response = DynamicMessage::new(route.method.output());
        let json = response_json(route, &response).unwrap();
        // Unset task: its defaults, every field present.
        assert_eq!(json["state"], "TEMPLATE_STATE_UNSPECIFIED");
        assert_eq!(json["name"], "");
        let task = serde_json::json!({"task": {"name": "t", "state": "TEMPLATE_STATE_READY",
            "progress": {"bytes_done": "5"}, "created_at": "2025-06-01T12:00:00Z"}});
        response = DynamicMessage::deserialize(route.method.output(), task).unwrap();
        let json = response_json(route, &response).unwrap();
        assert_eq!(json["name"], "t");
        assert_eq!(
            json["progress"]["bytes_done"], "5",
            "64-bit integers are strings"
        );
        assert_eq!(json["progress"]["layers_done"], 0);
        assert_eq!(json["created_at"], "2025-06-01T12:00:00Z");
        assert!(
            json.get("updated_at").is_none(),
            "unset messages are left out: {json}"
        );
    }
}
