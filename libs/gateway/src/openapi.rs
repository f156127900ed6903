//! The OpenAPI 3.0 document of the REST API, generated from the same routes and message
//! descriptors the gateway serves (so it cannot drift from what is served), with the proto
//! comments as descriptions. Served at `/api/v1/openapi.json`.

use std::collections::{BTreeMap, HashMap};

use prost_reflect::{
    DescriptorPool, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor,
};
use serde_json::{json, Map, Value};

use crate::routes::{BodyRule, Route, RouteTable};
use crate::stream::{EXEC_EVENT, NDJSON};

/// The path the document is served at.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

/// How deep query parameters are flattened into nested messages (`a.b.c`).
const MAX_QUERY_DEPTH: usize = 3;

/// Proto comments by (file, source path).
struct Comments(HashMap<(String, Vec<i32>), String>);

impl Comments {
    fn new(pool: &DescriptorPool) -> Self {
        let mut map = HashMap::new();
        for file in pool.files() {
            let proto = file.file_descriptor_proto();
            let Some(info) = &proto.source_code_info else {
                continue;
            };
            for location in &info.location {
                if let Some(text) = &location.leading_comments {
                    let text = text
                        .lines()
                        .map(str::trim)
                        .collect::<Vec<_>>()
                        .join("\n")
                        .trim()
                        .to_owned();
                    if !text.is_empty() {
                        map.insert((file.name().to_owned(), location.path.clone()), text);
                    }
                }
            }
        }
        Self(map)
    }

    fn get(&self, file: &str, path: &[i32]) -> Option<&str> {
        self.0
            .get(&(file.to_owned(), path.to_vec()))
            .map(String::as_str)
    }

    fn message(&self, m: &MessageDescriptor) -> Option<&str> {
        self.get(m.parent_file().name(), m.path())
    }

    fn field(&self, f: &FieldDescriptor) -> Option<&str> {
        self.get(f.parent_file().name(), f.path())
    }

    fn method(&self, m: &MethodDescriptor) -> Option<&str> {
        self.get(m.parent_file().name(), m.path())
    }

    fn enumeration(&self, e: &EnumDescriptor) -> Option<&str> {
        self.get(e.parent_file().name(), e.path())
    }
}

/// Builds the document for `routes`. `version` is the API's version string.
pub fn document(pool: &DescriptorPool, routes: &RouteTable, version: &str) -> Value {
    let comments = Comments::new(pool);
    let mut schemas = Schemas {
        comments: &comments,
        done: BTreeMap::new(),
    };
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for route in routes.routes() {
        let operation = operation(route, &mut schemas);
        paths
            .entry(route.template.openapi_path())
            .or_default()
            .insert(route.http_method.as_str().to_ascii_lowercase(), operation);
    }
    let mut components = std::mem::take(&mut schemas.done);
    components.insert(
        "Error".to_owned(),
        json!({
            "type": "object",
            "description": "A failed call. `code` is the gRPC status code name; the HTTP status is mapped from it (see docs/api-spec.md).",
            "properties": {
                "code": {"type": "string", "example": "NOT_FOUND"},
                "message": {"type": "string", "example": "template node22 not found"}
            },
            "required": ["code", "message"]
        }),
    );
    components.insert(
        "ExecOutput".to_owned(),
        json!({
            "type": "object",
            "description": "The aggregated result of `Sandboxes.Exec`: the command's output (UTF-8, invalid sequences replaced by U+FFFD; at most the gateway's limit per stream, the rest dropped and `*_truncated` set) and how it ended.",
            "properties": {
                "stdout": {"type": "string"},
                "stderr": {"type": "string"},
                "exit_code": {"type": "integer", "format": "int32", "description": "The exit code; 128 + signal when killed by one."},
                "signal": {"type": "integer", "format": "int32", "description": "The signal that killed it, or 0."},
                "timed_out": {"type": "boolean", "description": "Killed at its `timeout_ms`."},
                "duration_ms": {"type": "integer", "format": "int64", "description": "Wall-clock run time."},
                "stdout_truncated": {"type": "boolean"},
                "stderr_truncated": {"type": "boolean"}
            },
            "required": ["stdout", "stderr", "exit_code", "signal", "timed_out", "duration_ms", "stdout_truncated", "stderr_truncated"]
        }),
    );
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "NanoBox API",
            "version": version,
            "description": "NanoBox runs OCI images as microVM sandboxes. This REST API is the gRPC API `nanobox.v1` (Sandboxes, Templates, Cluster) served by the gateway, bound by the protos' google.api.http rules: JSON in the proto3 mapping with proto field names, unknown fields rejected with 400. Errors are `{\"code\", \"message\"}`.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "tags": tags(routes, &comments),
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from `[api] api_keys` (or `api_keys_file`) of nanobox.toml. Not needed when the operator configured none."
                }
            },
            "schemas": components,
        }
    })
}

fn tags(routes: &RouteTable, comments: &Comments) -> Value {
    let mut seen = Vec::new();
    let mut tags = Vec::new();
    for route in routes.routes() {
        let service = route.method.parent_service();
        if seen.contains(&service.full_name().to_owned()) {
            continue;
        }
        seen.push(service.full_name().to_owned());
        let mut tag = json!({"name": service.name()});
        if let Some(text) = comments.get(service.parent_file().name(), service.path()) {
            tag["description"] = Value::from(text);
        }
        tags.push(tag);
    }
    Value::Array(tags)
}

fn operation(route: &Route, schemas: &mut Schemas<'_>) -> Value {
    let method = &route.method;
    let input = method.input();
    let description = schemas.comments.method(method).unwrap_or_default();
    let summary = description
        .split(['.', '\n'])
        .next()
        .unwrap_or_default()
        .trim();
    let path_fields: Vec<&str> = route
        .template
        .variables()
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    let mut parameters = Vec::new();
    for variable in route.template.variables() {
        let field = field_at(&input, &variable.field);
        let mut p = json!({
            "name": variable.field,
            "in": "path",
            "required": true,
            "schema": field.as_ref().map_or(json!({"type": "string"}), |f| schemas.field(f)),
        });
        if let Some(text) = field.as_ref().and_then(|f| schemas.comments.field(f)) {
            p["description"] = Value::from(text);
        }
        parameters.push(p);
    }
    match &route.body {
        BodyRule::All => {}
        BodyRule::None => {
            query_parameters(&input, "", &path_fields, None, 0, schemas, &mut parameters)
        }
        BodyRule::Field(body) => query_parameters(
            &input,
            "",
            &path_fields,
            Some(body.name()),
            0,
            schemas,
            &mut parameters,
        ),
    }
    let is_exec = method.output().full_name() == EXEC_EVENT;
    if method.is_server_streaming() {
        parameters.push(json!({
            "name": "stream",
            "in": "query",
            "required": false,
            "schema": {"type": "boolean"},
            "description": if is_exec {
                "Stream the events as newline-delimited JSON (the same as `Accept: application/x-ndjson`) instead of one aggregated answer."
            } else {
                "Accepted for symmetry with exec; this method always streams newline-delimited JSON."
            }
        }));
    }

    let mut op = json!({
        "operationId": format!("{}_{}", method.parent_service().name(), method.name()),
        "tags": [method.parent_service().name()],
        "summary": summary,
        "description": format!("{description}\n\ngRPC: `{}`", route.grpc_path()),
        "parameters": parameters,
        "responses": responses(route, schemas, is_exec),
    });
    let body_schema = match &route.body {
        BodyRule::None => None,
        BodyRule::All => Some(schemas.body(&input, &path_fields)),
        BodyRule::Field(f) => Some(schemas.field(f)),
    };
    if let Some(schema) = body_schema {
        op["requestBody"] = json!({
            "required": false,
            "content": {"application/json": {"schema": schema}}
        });
    }
    op
}

fn responses(route: &Route, schemas: &mut Schemas<'_>, is_exec: bool) -> Value {
    let method = &route.method;
    let error = json!({
        "description": "An error; see the mapping of gRPC codes to HTTP statuses in docs/api-spec.md.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    });
    let ok = if method.is_server_streaming() {
        let event = schemas.message_ref(&method.output());
        let line = json!({
            "type": "object",
            "description": "One line per message: `result`, or `error` if the stream failed after it started (then it ends).",
            "properties": {
                "result": event,
                "error": {"$ref": "#/components/schemas/Error"}
            }
        });
        let mut content = Map::new();
        if is_exec {
            content.insert(
                "application/json".to_owned(),
                json!({"schema": {"$ref": "#/components/schemas/ExecOutput"}}),
            );
        }
        content.insert(NDJSON.to_owned(), json!({"schema": line}));
        json!({"description": "OK", "content": content})
    } else {
        let schema = match &route.response_body {
            // The field's type, not the field: its comment describes it inside the
            // response, not as the whole answer.
            Some(f) if !f.is_list() && !f.is_map() => schemas.kind(&f.kind()),
            Some(f) => schemas.field(f),
            None => schemas.message_ref(&method.output()),
        };
        json!({"description": "OK", "content": {"application/json": {"schema": schema}}})
    };
    json!({
        "200": ok,
        "400": error.clone(),
        "401": error.clone(),
        "default": error,
    })
}

/// The query parameters for the fields of `message` not bound elsewhere, flattened into
/// singular nested messages (`a.b`), repeated scalars exploded, maps as `field[key]`.
fn query_parameters(
    message: &MessageDescriptor,
    prefix: &str,
    path_fields: &[&str],
    body: Option<&str>,
    depth: usize,
    schemas: &mut Schemas<'_>,
    out: &mut Vec<Value>,
) {
    for field in message.fields() {
        let name = if prefix.is_empty() {
            field.name().to_owned()
        } else {
            format!("{prefix}.{}", field.name())
        };
        if path_fields.contains(&name.as_str()) || (depth == 0 && body == Some(field.name())) {
            continue;
        }
        let description = schemas
            .comments
            .field(&field)
            .unwrap_or_default()
            .to_owned();
        match field.kind() {
            Kind::Message(inner)
                if !field.is_map() && !field.is_list() && !is_well_known(&inner) =>
            {
                if depth < MAX_QUERY_DEPTH {
                    query_parameters(&inner, &name, path_fields, body, depth + 1, schemas, out);
                }
            }
            Kind::Message(_) if field.is_list() => {}
            _ if field.is_map() => out.push(json!({
                "name": name,
                "in": "query",
                "style": "deepObject",
                "explode": true,
                "schema": schemas.field(&field),
                "description": format!("{description}\n\nAs `{name}[key]=value`, once per entry."),
            })),
            _ => {
                let mut p = json!({
                    "name": name,
                    "in": "query",
                    "required": false,
                    "schema": schemas.field(&field),
                    "description": description,
                });
                if field.is_list() {
                    p["explode"] = Value::Bool(true);
                }
                out.push(p);
            }
        }
    }
}

fn field_at(message: &MessageDescriptor, path: &str) -> Option<FieldDescriptor> {
    let mut current = message.clone();
    let mut found = None;
    for part in path.split('.') {
        let field = current.get_field_by_name(part)?;
        if let Kind::Message(m) = field.kind() {
            current = m;
        }
        found = Some(field);
    }
    found
}

fn is_well_known(message: &MessageDescriptor) -> bool {
    message.package_name() == "google.protobuf"
}

/// The component schemas, built as they are referenced.
struct Schemas<'a> {
    comments: &'a Comments,
    done: BTreeMap<String, Value>,
}

impl Schemas<'_> {
    /// A `$ref` to a message's schema (adding it and what it references), or the inline
    /// schema of a well-known type.
    fn message_ref(&mut self, message: &MessageDescriptor) -> Value {
        if let Some(schema) = well_known(message) {
            return schema;
        }
        let name = message.full_name().to_owned();
        if !self.done.contains_key(&name) {
            // Placeholder first, so recursive messages terminate.
            self.done.insert(name.clone(), Value::Null);
            let schema = self.object(message, &[]);
            self.done.insert(name.clone(), schema);
        }
        json!({"$ref": format!("#/components/schemas/{name}")})
    }

    /// The request body of a `body: "*"` rule: the message less its path fields.
    fn body(&mut self, message: &MessageDescriptor, path_fields: &[&str]) -> Value {
        if path_fields.is_empty() {
            return self.message_ref(message);
        }
        self.object(message, path_fields)
    }

    fn object(&mut self, message: &MessageDescriptor, skip: &[&str]) -> Value {
        let mut properties = Map::new();
        for field in message.fields() {
            if skip.contains(&field.name()) {
                continue;
            }
            properties.insert(field.name().to_owned(), self.field(&field));
        }
        let mut schema = json!({
            "type": "object",
            "properties": properties,
            // Unknown fields are rejected with 400.
            "additionalProperties": false,
        });
        let mut description = self
            .comments
            .message(message)
            .unwrap_or_default()
            .to_owned();
        let oneofs: Vec<String> = message
            .oneofs()
            .filter(|o| !o.is_synthetic())
            .map(|o| {
                let names: Vec<String> = o.fields().map(|f| format!("`{}`", f.name())).collect();
                format!("At most one of {} is set.", names.join(", "))
            })
            .collect();
        if !oneofs.is_empty() {
            if !description.is_empty() {
                description.push_str("\n\n");
            }
            description.push_str(&oneofs.join(" "));
        }
        if !description.is_empty() {
            schema["description"] = Value::from(description);
        }
        schema
    }

    fn field(&mut self, field: &FieldDescriptor) -> Value {
        let mut schema = if field.is_map() {
            let value = match field.kind() {
                Kind::Message(entry) => self.kind(&entry.map_entry_value_field().kind()),
                other => self.kind(&other),
            };
            json!({"type": "object", "additionalProperties": value})
        } else if field.is_list() {
            json!({"type": "array", "items": self.kind(&field.kind())})
        } else {
            self.kind(&field.kind())
        };
        if let Some(text) = self.comments.field(field) {
            if schema.get("$ref").is_some() {
                // OpenAPI 3.0 ignores siblings of `$ref`; wrap it to keep the description.
                schema = json!({"allOf": [schema]});
            }
            schema["description"] = Value::from(text);
        }
        schema
    }

    fn kind(&mut self, kind: &Kind) -> Value {
        match kind {
            Kind::Double => json!({"type": "number", "format": "double"}),
            Kind::Float => json!({"type": "number", "format": "float"}),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                json!({"type": "integer", "format": "int32"})
            }
            Kind::Uint32 | Kind::Fixed32 => {
                json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                json!({"type": "string", "format": "int64", "description": "A 64-bit integer as a decimal string."})
            }
            Kind::Uint64 | Kind::Fixed64 => {
                json!({"type": "string", "format": "uint64", "description": "A 64-bit integer as a decimal string."})
            }
            Kind::Bool => json!({"type": "boolean"}),
            Kind::String => json!({"type": "string"}),
            Kind::Bytes => json!({"type": "string", "format": "byte"}),
            Kind::Enum(e) => self.enum_ref(e),
            Kind::Message(m) => self.message_ref(m),
        }
    }

    fn enum_ref(&mut self, e: &EnumDescriptor) -> Value {
        let name = e.full_name().to_owned();
        if !self.done.contains_key(&name) {
            let values: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
            let mut schema = json!({"type": "string", "enum": values});
            let mut description = self.comments.enumeration(e).unwrap_or_default().to_owned();
            let documented: Vec<String> = e
                .values()
                .filter_map(|v| {
                    self.comments
                        .get(v.parent_file().name(), v.path())
                        .map(|c| format!("- `{}`: {}", v.name(), c.replace('\n', " ")))
                })
                .collect();
            if !documented.is_empty() {
                description.push_str("\n\n");
                description.push_str(&documented.join("\n"));
            }
            if !description.is_empty() {
                schema["description"] = Value::from(description);
            }
            self.done.insert(name.clone(), schema);
        }
        json!({"$ref": format!("#/components/schemas/{name}")})
    }
}

/// The JSON form of a well-known type, per the proto3 JSON mapping.
fn well_known(message: &MessageDescriptor) -> Option<Value> {
    Some(match message.full_name() {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => {
            json!({"type": "string", "description": "Seconds with up to 9 fractional digits and an `s` suffix (`1.5s`)."})
        }
        "google.protobuf.FieldMask" => json!({"type": "string"}),
        "google.protobuf.Empty" | "google.protobuf.Struct" | "google.protobuf.Any" => {
            json!({"type": "object"})
        }
        "google.protobuf.ListValue" => json!({"type": "array", "items": {}}),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.BoolValue" => json!({"type": "boolean", "nullable": true}),
        "google.protobuf.StringValue" | "google.protobuf.BytesValue" => {
            json!({"type": "string", "nullable": true})
        }
        "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => {
            json!({"type": "integer", "nullable": true})
        }
        "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => {
            json!({"type": "string", "nullable": true})
        }
        "google.protobuf.FloatValue" | "google.protobuf.DoubleValue" => {
            json!({"type": "number", "nullable": true})
        }
        _ => return None,
    })
}
