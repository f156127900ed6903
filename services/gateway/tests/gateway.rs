//! The gateway process on its own and with upstreams that are down or hang: 503 for an
//! upstream that refuses connections, 504 for one that never answers, the OpenAPI document
//! covering the seed's REST table, and an open API when no keys are configured.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{assert_error, start_gateway, Client, GatewayConfig, KEY};
use serde_json::Value;

/// The REST table of the seed README (`/work/shared/seed/nanobox-readme.txt`): method,
/// path.
const SEED_TABLE: &[(&str, &str)] = &[
    ("POST", "/api/v1/sandboxes"),
    ("GET", "/api/v1/sandboxes/{id}"),
    ("GET", "/api/v1/sandboxes"),
    ("DELETE", "/api/v1/sandboxes/{id}"),
    ("POST", "/api/v1/sandboxes/{id}/exec"),
    ("POST", "/api/v1/sandboxes/{id}/keepalive"),
    ("POST", "/api/v1/sandboxes/{id}/pause"),
    ("POST", "/api/v1/sandboxes/{id}/resume"),
    ("POST", "/api/v1/templates/warmup"),
    ("GET", "/api/v1/templates"),
    ("GET", "/api/v1/templates/{name}/status"),
    ("DELETE", "/api/v1/templates/{name}"),
    ("GET", "/api/v1/nodes"),
    ("GET", "/api/v1/stats"),
];

/// Upstreams that refuse connections: every route answers 503 UNAVAILABLE naming the
/// service (never an address or OS error), unary and exec alike, and fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_503() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start_gateway(dir.path(), &GatewayConfig::default());
    let client = Client::new(&gateway, Some(KEY));
    let started = Instant::now();
    for (method, path, body) in [
        ("GET", "/api/v1/templates", None),
        (
            "POST",
            "/api/v1/templates/warmup",
            Some(r#"{"name": "a", "image": "b"}"#),
        ),
        ("GET", "/api/v1/stats", None),
        ("GET", "/api/v1/nodes", None),
        ("POST", "/api/v1/sandboxes", Some(r#"{"template": "a"}"#)),
        ("GET", "/api/v1/sandboxes/sb-1", None),
        (
            "POST",
            "/api/v1/sandboxes/sb-1/exec",
            Some(r#"{"command": "true"}"#),
        ),
        (
            "POST",
            "/api/v1/sandboxes/sb-1/exec?stream=true",
            Some(r#"{"command": "true"}"#),
        ),
    ] {
        let answer = client.send(method, path, body).await;
        assert_error(&answer, 503, "UNAVAILABLE", "is unavailable");
        let message = answer.json["message"].as_str().unwrap();
        assert!(
            !message.contains("127.0.0.1") && !message.contains("refused"),
            "internal details leak: {message}"
        );
    }
    let templates = client.get("/api/v1/templates").await;
    assert_error(&templates, 503, "UNAVAILABLE", "nanobox.v1.Templates");
    let stats = client.get("/api/v1/stats").await;
    assert_error(&stats, 503, "UNAVAILABLE", "nanobox.v1.Cluster");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

/// An upstream that accepts connections and never answers: the call ends at
/// `[api] request_timeout_sec` with 504 DEADLINE_EXCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_upstream_is_504_at_the_request_timeout() {
    // Accepts and holds connections, reading nothing and writing nothing.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hole.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        while let Ok((conn, _)) = hole.accept() {
            conns.push(conn);
            if conns.len() >= 8 {
                break;
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let gateway = start_gateway(
        dir.path(),
        &GatewayConfig {
            scheduler: addr.clone(),
            builder: addr,
            request_timeout_sec: 2,
            ..GatewayConfig::default()
        },
    );
    let client = Client::new(&gateway, Some(KEY));
    for path in ["/api/v1/stats", "/api/v1/templates"] {
        let started = Instant::now();
        let answer = client.get(path).await;
        let took = started.elapsed();
        assert_error(&answer, 504, "DEADLINE_EXCEEDED", "within 2 s");
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
            "{path}: {took:?}"
        );
    }
    // An aggregated exec without its own timeout_ms is bounded the same way.
    let answer = client
        .post("/api/v1/sandboxes/sb-1/exec", r#"{"command": "sleep"}"#)
        .await;
    assert_error(&answer, 504, "DEADLINE_EXCEEDED", "within 2 s");
    drop(gateway);
    drop(held);
}

/// The OpenAPI document is served without a key, is OpenAPI 3, has every path of the
/// seed's REST table with its method, and every `$ref` in it resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_the_seed_table() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start_gateway(dir.path(), &GatewayConfig::default());
    let answer = Client::new(&gateway, None)
        .get("/api/v1/openapi.json")
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.content_type.starts_with("application/json"));
    let doc = answer.json;
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in SEED_TABLE {
        let op = &paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} is not in the document: {:?}", paths.keys()))
            [method.to_ascii_lowercase()];
        assert!(op.is_object(), "{method} {path} is not in the document");
        assert!(op["operationId"].is_string(), "{method} {path}");
        assert!(op["responses"]["200"].is_object(), "{method} {path}");
    }
    let operations: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        operations,
        SEED_TABLE.len(),
        "exactly the seed's table: {:?}",
        paths.keys()
    );

    // Path parameters, query parameters, bodies and responses as bound.
    let get = &paths["/api/v1/sandboxes/{id}"]["get"];
    assert_eq!(get["parameters"][0]["name"], "id");
    assert_eq!(get["parameters"][0]["in"], "path");
    let list = &paths["/api/v1/sandboxes"]["get"]["parameters"];
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for name in [
        "template",
        "state",
        "node_id",
        "metadata",
        "page_size",
        "page_token",
    ] {
        assert!(names.contains(&name), "{name} not in {names:?}");
    }
    let create = &paths["/api/v1/sandboxes"]["post"];
    assert_eq!(
        create["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/nanobox.v1.Sandbox",
        "response_body: sandbox"
    );
    let exec = &paths["/api/v1/sandboxes/{id}/exec"]["post"];
    let content = &exec["responses"]["200"]["content"];
    assert_eq!(
        content["application/json"]["schema"]["$ref"],
        "#/components/schemas/ExecOutput"
    );
    assert!(content["application/x-ndjson"].is_object(), "{exec}");
    let body = &exec["requestBody"]["content"]["application/json"]["schema"];
    assert!(body["properties"]["command"].is_object(), "{body}");
    assert!(
        body["properties"].get("id").is_none(),
        "id is the path's: {body}"
    );
    let sandbox = &doc["components"]["schemas"]["nanobox.v1.Sandbox"];
    assert_eq!(sandbox["additionalProperties"], false);
    assert!(
        sandbox["description"].as_str().unwrap().contains("microVM"),
        "proto comments become descriptions: {sandbox}"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );

    // Every reference resolves.
    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(r)) = o.get("$ref") {
                    out.push(r);
                }
                o.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{r} does not resolve"
        );
    }
}

/// A body sent without `Content-Length` (chunked) is cut off at `[api] max_body_bytes`
/// too: 413 as soon as the limit is passed, before anything goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_is_413() {
    use std::io::{Read as _, Write as _};

    let dir = tempfile::tempdir().unwrap();
    let gateway = start_gateway(
        dir.path(),
        &GatewayConfig {
            max_body_bytes: 1024,
            ..GatewayConfig::default()
        },
    );
    let mut conn = std::net::TcpStream::connect(&gateway.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let chunk = format!(r#"{{"name": "a", "image": "{}"}}"#, "x".repeat(600));
    let mut request = format!(
        "POST /api/v1/templates/warmup HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    // Two chunks: the second passes the limit.
    for _ in 0..2 {
        request.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    request.push_str("0\r\n\r\n");
    conn.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = conn.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(
        response.contains(r#""code":"RESOURCE_EXHAUSTED""#)
            && response.contains("larger than the limit of 1024 bytes"),
        "{response}"
    );
}

/// With no keys configured the API is open: a request without a key reaches the upstream
/// (here: down, so 503 rather than 401).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_keys_means_an_open_api() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start_gateway(
        dir.path(),
        &GatewayConfig {
            keys: Vec::new(),
            ..GatewayConfig::default()
        },
    );
    let answer = Client::new(&gateway, None).get("/api/v1/templates").await;
    assert_error(&answer, 503, "UNAVAILABLE", "is unavailable");
}
