//! The gateway as a real process in front of real upstreams: a private Postgres, a local
//! registry, the real template-builder binary, and an HTTP client.
//!
//! The template-builder binary is another package's, so cargo does not build it for these
//! tests: `cargo xtask test` (nextest over the workspace) builds every binary; by hand, run
//! `cargo build -p nanobox-template-builder` first (or point `NANOBOX_TEMPLATE_BUILDER` at
//! one). `NANOBOX_INIT` names the guest init the builder injects (set by `cargo xtask
//! test`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::process::{service_command, workspace_bin, Process};
use nanobox_testkit::registry::Registry;
use nanobox_testkit::{guest_init, wait_until};
use serde_json::Value;

/// The API key the test gateways accept.
pub const KEY: &str = "test-key-0123456789abcdef";

/// How long a warmup of the small busybox image may take (a hang guard).
pub const WARMUP_TIMEOUT: Duration = Duration::from_secs(300);

/// The template-builder binary: `$NANOBOX_TEMPLATE_BUILDER`, else the one in this target
/// directory.
pub fn template_builder_bin() -> PathBuf {
    std::env::var_os("NANOBOX_TEMPLATE_BUILDER")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_bin("nanobox-template-builder", "nanobox-template-builder"))
}

/// Starts a template-builder against `db` with a local object store under `dir`, its
/// `nanobox.toml` written there too.
pub fn start_builder(
    pg: &Postgres,
    db: &tokio_postgres::Config,
    registry: &Registry,
    dir: &Path,
) -> Process {
    let toml = format!(
        "[builder]\nlisten_addr = \"127.0.0.1:0\"\nwork_dir = {work:?}\n\n\
         [oci]\ninit_binary = {init:?}\nplain_http_registries = [{registry:?}]\n\n\
         [database]\nurl = {url:?}\n\n[object_store]\nlocation = {objects:?}\n",
        work = dir.join("work").display().to_string(),
        init = guest_init().display().to_string(),
        registry = registry.host,
        url = pg.url(db),
        objects = format!("file://{}", dir.join("objects").display()),
    );
    let file = dir.join("template-builder.toml");
    std::fs::write(&file, toml).unwrap();
    Process::spawn(
        "template-builder",
        &mut service_command(template_builder_bin(), &file),
    )
}

/// Gateway settings for a test.
pub struct GatewayConfig {
    /// `[api] api_keys`.
    pub keys: Vec<String>,
    /// `[builder] advertise_addr`.
    pub builder: String,
    /// `[agent] scheduler_addr`.
    pub scheduler: String,
    /// `[api] max_body_bytes`.
    pub max_body_bytes: u64,
    /// `[api] request_timeout_sec`.
    pub request_timeout_sec: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            keys: vec![KEY.to_owned()],
            // Port 1 on loopback: nothing listens, connections are refused.
            builder: "127.0.0.1:1".to_owned(),
            scheduler: "127.0.0.1:1".to_owned(),
            max_body_bytes: 64 << 10,
            request_timeout_sec: 30,
        }
    }
}

/// Starts the gateway binary with a `nanobox.toml` written into `dir`.
pub fn start_gateway(dir: &Path, config: &GatewayConfig) -> Process {
    let keys: Vec<String> = config.keys.iter().map(|k| format!("{k:?}")).collect();
    let toml = format!(
        "[api]\nlisten_addr = \"127.0.0.1:0\"\napi_keys = [{}]\nmax_body_bytes = {}\nrequest_timeout_sec = {}\n\n\
         [builder]\nadvertise_addr = \"{}\"\n\n[agent]\nscheduler_addr = \"{}\"\n",
        keys.join(", "),
        config.max_body_bytes,
        config.request_timeout_sec,
        config.builder,
        config.scheduler,
    );
    let file = dir.join("nanobox.toml");
    std::fs::write(&file, toml).unwrap();
    Process::spawn(
        "gateway",
        &mut service_command(env!("CARGO_BIN_EXE_nanobox-gateway"), &file),
    )
}

/// An HTTP answer: status, content type and the body as JSON (`Value::Null` if it is
/// not JSON; the raw text is kept).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub json: Value,
    pub text: String,
    pub headers: reqwest::header::HeaderMap,
}

/// A REST client for one gateway.
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    pub fn new(gateway: &Process, key: Option<&str>) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            base: format!("http://{}", gateway.addr),
            key: key.map(str::to_owned),
        }
    }

    /// Sends a request; `body` is sent as is (so malformed JSON can be sent).
    pub async fn send(&self, method: &str, path: &str, body: Option<&str>) -> Answer {
        self.send_with(method, path, body, &[]).await
    }

    pub async fn send_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let method: reqwest::Method = method.parse().unwrap();
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            status,
            content_type,
            json,
            text,
            headers,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &str) -> Answer {
        self.send("POST", path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.send("DELETE", path, None).await
    }

    /// Polls `GET path` until it answers 200 with a body `done` holds for, and returns
    /// that body (hang guard: `limit`).
    pub async fn wait_for(
        &self,
        path: &str,
        what: &str,
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let every = Duration::from_millis(200);
        let probe = async || self.get(path).await;
        wait_until(what, limit, every, probe, |a| {
            a.status == 200 && done(&a.json)
        })
        .await
        .json
    }

    /// Polls `GET /api/v1/templates/{name}/status` until the task is READY or FAILED;
    /// returns the last task and every state seen.
    pub async fn wait_template(&self, name: &str) -> (Value, Vec<String>) {
        let deadline = Instant::now() + WARMUP_TIMEOUT;
        let mut seen: Vec<String> = Vec::new();
        loop {
            let answer = self.get(&format!("/api/v1/templates/{name}/status")).await;
            assert_eq!(answer.status, 200, "{answer:?}");
            let state = answer.json["state"].as_str().unwrap_or_default().to_owned();
            if seen.last() != Some(&state) {
                seen.push(state.clone());
            }
            if state == "TEMPLATE_STATE_READY" || state == "TEMPLATE_STATE_FAILED" {
                return (answer.json, seen);
            }
            assert!(
                Instant::now() < deadline,
                "warmup of {name} hangs: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Asserts an error answer: HTTP status, JSON content type, `code`, and a message
/// containing `needle`.
pub fn assert_error(answer: &Answer, status: u16, code: &str, needle: &str) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert!(
        answer.content_type.starts_with("application/json"),
        "{answer:?}"
    );
    assert_eq!(answer.json["code"], code, "{answer:?}");
    let message = answer.json["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "message {message:?} does not contain {needle:?}"
    );
}
