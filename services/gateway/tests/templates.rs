//! The gateway in front of a real template-builder (real Postgres, real registry): the
//! Templates API over REST from warmup to delete, and the error answers a client gets for
//! bad requests, wrong keys and unknown templates.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{assert_error, start_builder, start_gateway, Client, GatewayConfig, KEY};
use nanobox_testkit::images::busybox_layout;
use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::process::Process;
use nanobox_testkit::registry::{PushFormat, Registry};

/// Everything behind one gateway.
struct Stack {
    _pg: Postgres,
    registry: Registry,
    _builder: Process,
    gateway: Process,
    _dir: tempfile::TempDir,
}

async fn stack(max_body_bytes: u64) -> Stack {
    let pg = Postgres::start().await;
    let db = pg.create_database().await;
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let builder = start_builder(&pg, &db, &registry, dir.path());
    let gateway = start_gateway(
        dir.path(),
        &GatewayConfig {
            builder: builder.addr.clone(),
            max_body_bytes,
            ..GatewayConfig::default()
        },
    );
    Stack {
        _pg: pg,
        registry,
        _builder: builder,
        gateway,
        _dir: dir,
    }
}

/// The seed's Quick Start for templates, over REST: warmup returns the task at once,
/// status polling sees it go READY, the list shows the template in the proto3 JSON mapping,
/// delete removes it and its status is then 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warmup_status_list_delete_over_rest() {
    let stack = stack(64 << 10).await;
    let work = tempfile::tempdir().unwrap();
    stack.registry.push(
        &busybox_layout(work.path(), "app"),
        "v1",
        "app",
        "v1",
        PushFormat::Oci,
    );
    let image = format!("{}/app:v1", stack.registry.host);
    let client = Client::new(&stack.gateway, Some(KEY));

    // `response_body: "task"`: the body is the WarmupTask itself, proto field names.
    let submitted = client
        .post(
            "/api/v1/templates/warmup",
            &format!(r#"{{"name": "app", "image": "{image}"}}"#),
        )
        .await;
    assert_eq!(submitted.status, 200, "{submitted:?}");
    assert!(submitted.content_type.starts_with("application/json"));
    assert_eq!(submitted.json["name"], "app");
    assert_eq!(submitted.json["image"], image);
    let state = submitted.json["state"].as_str().unwrap();
    assert!(
        state == "TEMPLATE_STATE_QUEUED" || state == "TEMPLATE_STATE_PULLING",
        "warmup returns at once: {submitted:?}"
    );
    // Defaults are written out: every field is there.
    assert_eq!(submitted.json["message"], "");
    assert!(submitted.json["progress"].is_object(), "{submitted:?}");

    let (task, seen) = client.wait_template("app").await;
    assert_eq!(
        task["state"], "TEMPLATE_STATE_READY",
        "{task} after {seen:?}"
    );
    assert_eq!(task["message"], "");
    assert!(
        task["digest"].as_str().unwrap().starts_with("sha256:"),
        "{task}"
    );
    assert_eq!(task["progress"]["layers_done"], 2, "{task}");
    assert_eq!(task["progress"]["layers_total"], 2, "{task}");
    // uint64 is a JSON string in the proto3 mapping.
    assert!(task["progress"]["bytes_total"].is_string(), "{task}");
    // Timestamps are RFC 3339.
    assert!(
        task["created_at"].as_str().unwrap().ends_with('Z'),
        "{task}"
    );

    let list = client.get("/api/v1/templates").await;
    assert_eq!(list.status, 200, "{list:?}");
    let templates = list.json["templates"].as_array().unwrap();
    assert_eq!(templates.len(), 1, "{list:?}");
    let template = &templates[0];
    assert_eq!(template["name"], "app");
    assert_eq!(template["image"], image);
    assert_eq!(template["state"], "TEMPLATE_STATE_READY");
    assert_eq!(template["digest"], task["digest"]);
    let size: u64 = template["size_bytes"].as_str().unwrap().parse().unwrap();
    assert!(size > 0, "{template}");
    assert_eq!(template["config"]["working_dir"], "/etc", "{template}");
    assert!(
        template["config"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "MARKER=app"),
        "{template}"
    );

    // A query parameter, typed by its field: the enum by name and by number.
    let ready = client
        .get("/api/v1/templates?state=TEMPLATE_STATE_READY")
        .await;
    assert_eq!(
        ready.json["templates"].as_array().unwrap().len(),
        1,
        "{ready:?}"
    );
    let failed = client.get("/api/v1/templates?state=7").await;
    assert_eq!(failed.status, 200, "{failed:?}");
    assert_eq!(
        failed.json["templates"],
        serde_json::json!([]),
        "{failed:?}"
    );

    let deleted = client.delete("/api/v1/templates/app").await;
    assert_eq!(deleted.status, 200, "{deleted:?}");
    assert_eq!(deleted.json, serde_json::json!({}));
    let gone = client.get("/api/v1/templates/app/status").await;
    assert_error(&gone, 404, "NOT_FOUND", "app");
    let list = client.get("/api/v1/templates").await;
    assert_eq!(list.json["templates"], serde_json::json!([]), "{list:?}");
    // Deleting again: the builder's NOT_FOUND, mapped.
    let again = client.delete("/api/v1/templates/app").await;
    assert_error(&again, 404, "NOT_FOUND", "app");
}

/// Every bad request gets the right status and a `{code, message}` body naming the
/// problem; requests without a valid key reach nothing upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_mapped_and_named() {
    let stack = stack(4096).await;
    let client = Client::new(&stack.gateway, Some(KEY));
    let image = format!("{}/app:v1", stack.registry.host);

    // Unknown template: the builder's NOT_FOUND.
    let answer = client.get("/api/v1/templates/nope/status").await;
    assert_error(&answer, 404, "NOT_FOUND", "nope");

    // Malformed JSON, named by position.
    let answer = client
        .post("/api/v1/templates/warmup", r#"{"name": "app", "image": "#)
        .await;
    assert_error(&answer, 400, "INVALID_ARGUMENT", "malformed JSON");
    assert_error(&answer, 400, "INVALID_ARGUMENT", "line 1 column");

    // Unknown fields are rejected and named, nested ones with their path.
    let answer = client
        .post(
            "/api/v1/templates/warmup",
            &format!(r#"{{"name": "app", "image": "{image}", "platfrom": "linux/amd64"}}"#),
        )
        .await;
    assert_error(&answer, 400, "INVALID_ARGUMENT", "unknown field `platfrom`");
    let answer = client
        .post(
            "/api/v1/sandboxes",
            r#"{"template": "app", "resources": {"vcpu": 1, "memory": 512}}"#,
        )
        .await;
    assert_error(
        &answer,
        400,
        "INVALID_ARGUMENT",
        "unknown field `resources.memory`",
    );
    // A wrong type names the field and its type.
    let answer = client
        .post("/api/v1/templates/warmup", r#"{"name": 5}"#)
        .await;
    assert_error(&answer, 400, "INVALID_ARGUMENT", "invalid `name` (string)");
    // Unknown query parameters too.
    let answer = client.get("/api/v1/templates?colour=red").await;
    assert_error(
        &answer,
        400,
        "INVALID_ARGUMENT",
        "unknown query parameter `colour`",
    );

    // The builder's own validation comes back as 400 with its message.
    let answer = client
        .post(
            "/api/v1/templates/warmup",
            &format!(r#"{{"name": "Not A Name", "image": "{image}"}}"#),
        )
        .await;
    assert_error(&answer, 400, "INVALID_ARGUMENT", "name");

    // Oversized bodies: 413, whether declared by Content-Length or not.
    let big = format!(r#"{{"name": "app", "image": "{}"}}"#, "x".repeat(8192));
    let answer = client.post("/api/v1/templates/warmup", &big).await;
    assert_error(
        &answer,
        413,
        "RESOURCE_EXHAUSTED",
        "larger than the limit of 4096 bytes",
    );

    // No route, wrong method.
    let answer = client.get("/api/v1/nope").await;
    assert_error(&answer, 404, "NOT_FOUND", "no route for GET /api/v1/nope");
    let answer = client.send("PUT", "/api/v1/templates/app", None).await;
    assert_error(&answer, 405, "UNIMPLEMENTED", "allowed: DELETE");
    assert_eq!(answer.headers["allow"], "DELETE");

    // Missing and wrong keys: 401, and the warmup they carried never reached the builder.
    let warmup = format!(r#"{{"name": "sneaky", "image": "{image}"}}"#);
    let anonymous = Client::new(&stack.gateway, None);
    let answer = anonymous.post("/api/v1/templates/warmup", &warmup).await;
    assert_error(&answer, 401, "UNAUTHENTICATED", "missing API key");
    assert!(answer.headers.contains_key("www-authenticate"));
    let wrong = Client::new(&stack.gateway, Some("test-key-0123456789abcdeX"));
    let answer = wrong.post("/api/v1/templates/warmup", &warmup).await;
    assert_error(&answer, 401, "UNAUTHENTICATED", "invalid API key");
    let answer = anonymous.get("/api/v1/nope").await;
    assert_error(&answer, 401, "UNAUTHENTICATED", "missing API key");
    let answer = client.get("/api/v1/templates/sneaky/status").await;
    assert_error(&answer, 404, "NOT_FOUND", "sneaky");
    let list = client.get("/api/v1/templates").await;
    assert_eq!(list.json["templates"], serde_json::json!([]), "{list:?}");

    // Health and the API description stay open.
    let health = anonymous.get("/healthz").await;
    assert_eq!(health.status, 200, "{health:?}");
    let openapi = anonymous.get("/api/v1/openapi.json").await;
    assert_eq!(openapi.status, 200, "{openapi:?}");
}
