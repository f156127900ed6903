//! The seed's Quick Start over REST with every process real: Postgres, a registry, the
//! template-builder, the scheduler, one node agent (in its own network namespace, booting
//! real guests under QEMU) and the gateway. A busybox image is warmed up, a sandbox
//! created, commands run in it (aggregated, streamed, with stdin, with output past the
//! limit), kept alive, listed, counted and deleted, all through `/api/v1/...`.
//!
//! Needs the guest kernel (`NANOBOX_TEST_KERNEL`) and init (`NANOBOX_INIT`) that `cargo
//! xtask test` exports, and the scheduler and node-agent binaries (built by `cargo xtask
//! test`; by hand, `cargo build -p nanobox-scheduler -p nanobox-node-agent`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{assert_error, start_builder, start_gateway, Client, GatewayConfig, KEY};
use nanobox_testkit::config::{cluster_sections, storage_sections, AgentConfig};
use nanobox_testkit::env_file;
use nanobox_testkit::images::busybox_layout;
use nanobox_testkit::netns::NodeNet;
use nanobox_testkit::node_agent::NodeAgent;
use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::process::{service_command, workspace_bin, Process};
use nanobox_testkit::registry::{PushFormat, Registry};
use serde_json::Value;

const TOKEN: &str = "test-service-token-0123456789";

/// Polls `GET path` until `done` holds for the answer.
async fn wait_for(client: &Client, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    client
        .wait_for(path, what, Duration::from_secs(120), done)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_start_over_rest_with_real_guests() {
    let pg = Postgres::start().await;
    let db = pg.create_database().await;
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let builder = start_builder(&pg, &db, &registry, dir.path());
    let common = format!(
        "{}\n{}",
        storage_sections(&pg, &db, &dir.path().join("objects")),
        cluster_sections(TOKEN, 3)
    );

    let scheduler_config = dir.path().join("scheduler.toml");
    std::fs::write(
        &scheduler_config,
        format!("[api]\ngrpc_addr = \"127.0.0.1:0\"\n\n{common}"),
    )
    .unwrap();
    let bin = workspace_bin("nanobox-scheduler", "nanobox-scheduler-service");
    let scheduler = Process::spawn("scheduler", &mut service_command(bin, &scheduler_config));

    let config = AgentConfig {
        node_id: "node-1",
        scheduler_addr: Some(&scheduler.addr),
        state_dir: &dir.path().join("agent-state"),
        capacity_vcpus: 2,
        capacity_memory_mb: 1024,
        run_as_user: Some("nobody"),
        kernel: &env_file("NANOBOX_TEST_KERNEL"),
        rest: &common,
    };
    let agent = NodeAgent::start(
        &workspace_bin("nanobox-node-agent", "nanobox-node-agent"),
        &dir.path().join("agent.toml"),
        &config,
        NodeNet::with_internet("nbg"),
    );

    let gateway = start_gateway(
        dir.path(),
        &GatewayConfig {
            builder: builder.addr.clone(),
            scheduler: scheduler.addr.clone(),
            request_timeout_sec: 120,
            ..GatewayConfig::default()
        },
    );
    let client = Client::new(&gateway, Some(KEY));

    // Warm the image up over REST.
    let work = tempfile::tempdir().unwrap();
    registry.push(
        &busybox_layout(work.path(), "box"),
        "v1",
        "box",
        "v1",
        PushFormat::Oci,
    );
    let warmup = client
        .post(
            "/api/v1/templates/warmup",
            &format!(r#"{{"name": "box", "image": "{}/box:v1"}}"#, registry.host),
        )
        .await;
    assert_eq!(warmup.status, 200, "{warmup:?}");
    let (task, _) = client.wait_template("box").await;
    assert_eq!(task["state"], "TEMPLATE_STATE_READY", "{task}");

    // The node registered.
    let nodes = wait_for(&client, "/api/v1/nodes", "node-1 READY", |v| {
        v["nodes"][0]["state"] == "NODE_STATE_READY"
    })
    .await;
    assert_eq!(nodes["nodes"][0]["id"], "node-1", "{nodes}");

    // Create: the body is the Sandbox itself, with the seed's fields.
    let created = client
        .post(
            "/api/v1/sandboxes",
            r#"{"template": "box", "resources": {"vcpu": 1, "memory_mb": 128}, "metadata": {"team": "ml"}}"#,
        )
        .await;
    assert_eq!(created.status, 200, "{created:?}");
    let sandbox = &created.json;
    let id = sandbox["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("sb-"), "{sandbox}");
    assert_eq!(sandbox["state"], "SANDBOX_STATE_RUNNING", "{sandbox}");
    assert_eq!(sandbox["template"], "box");
    assert!(sandbox["ip"].is_string(), "{sandbox}");
    assert!(sandbox["boot_time_ms"].as_u64().unwrap() > 0, "{sandbox}");
    assert_eq!(sandbox["node_id"], "node-1");
    assert_eq!(sandbox["metadata"]["team"], "ml");

    let got = client.get(&format!("/api/v1/sandboxes/{id}")).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.json["id"], id);
    let listed = client
        .get("/api/v1/sandboxes?state=SANDBOX_STATE_RUNNING&metadata[team]=ml")
        .await;
    assert_eq!(listed.status, 200, "{listed:?}");
    assert_eq!(listed.json["sandboxes"][0]["id"], id, "{listed:?}");
    let none = client.get("/api/v1/sandboxes?metadata[team]=web").await;
    assert_eq!(none.json["sandboxes"], serde_json::json!([]), "{none:?}");

    // Exec, aggregated: text output, the command's own exit code.
    let exec = format!("/api/v1/sandboxes/{id}/exec");
    let ran = client
        .post(
            &exec,
            r#"{"command": "/bin/sh", "args": ["-c", "echo '{\"ok\":true}'; echo oops >&2; exit 3"]}"#,
        )
        .await;
    assert_eq!(ran.status, 200, "{ran:?}");
    assert_eq!(ran.json["stdout"], "{\"ok\":true}\n", "{ran:?}");
    assert_eq!(ran.json["stderr"], "oops\n");
    assert_eq!(ran.json["exit_code"], 3);
    assert_eq!(ran.json["signal"], 0);
    assert_eq!(ran.json["timed_out"], false);
    assert!(ran.json["duration_ms"].is_u64(), "{ran:?}");
    assert_eq!(ran.json["stdout_truncated"], false);

    // Stdin (bytes are base64 in the request).
    let stdin = base64::engine::general_purpose::STANDARD.encode("hello from stdin");
    let cat = client
        .post(
            &exec,
            &format!(r#"{{"command": "/bin/busybox", "args": ["cat"], "stdin": "{stdin}"}}"#),
        )
        .await;
    assert_eq!(cat.json["stdout"], "hello from stdin", "{cat:?}");

    // More output than the aggregated answer keeps: cut at 1 MiB and said so; the
    // command still ran to its end.
    let big = client
        .post(
            &exec,
            r#"{"command": "/bin/sh", "args": ["-c", "/bin/busybox yes | /bin/busybox head -c 1500000; echo done >&2"]}"#,
        )
        .await;
    assert_eq!(big.status, 200, "{}", big.text.len());
    assert_eq!(big.json["stdout"].as_str().unwrap().len(), 1 << 20);
    assert_eq!(big.json["stdout_truncated"], true);
    assert_eq!(big.json["stderr"], "done\n");
    assert_eq!(big.json["exit_code"], 0);

    // The command's own timeout comes back as such (and bounds the gateway's wait);
    // `?stream=false` is the aggregated form.
    let slow = client
        .post(
            &format!("{exec}?stream=false"),
            r#"{"command": "/bin/busybox", "args": ["sleep", "30"], "timeout_ms": 500}"#,
        )
        .await;
    assert_eq!(slow.status, 200, "{slow:?}");
    assert_eq!(slow.json["timed_out"], true, "{slow:?}");
    assert_ne!(slow.json["exit_code"], 0, "{slow:?}");

    // Streamed: newline-delimited JSON events, by query and by Accept.
    for (path, headers) in [
        (format!("{exec}?stream=true"), vec![]),
        (exec.clone(), vec![("accept", "application/x-ndjson")]),
    ] {
        let streamed = client
            .send_with(
                "POST",
                &path,
                Some(r#"{"command": "/bin/sh", "args": ["-c", "echo one; echo two >&2; exit 4"]}"#),
                &headers,
            )
            .await;
        assert_eq!(streamed.status, 200, "{streamed:?}");
        assert_eq!(streamed.content_type, "application/x-ndjson");
        let lines: Vec<Value> = streamed
            .text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let decode = |v: &Value| {
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap())
                    .unwrap(),
            )
            .unwrap()
        };
        let stdout: String = lines
            .iter()
            .filter_map(|l| l["result"].get("stdout"))
            .map(decode)
            .collect();
        let stderr: String = lines
            .iter()
            .filter_map(|l| l["result"].get("stderr"))
            .map(decode)
            .collect();
        assert_eq!(
            (stdout.as_str(), stderr.as_str()),
            ("one\n", "two\n"),
            "{lines:?}"
        );
        let last = lines.last().unwrap();
        assert_eq!(last["result"]["exit"]["exit_code"], 4, "{lines:?}");
        // The proto3 mapping inside the stream: uint64 as a string.
        assert!(last["result"]["exit"]["duration_ms"].is_string(), "{last}");
    }

    // Errors from the scheduler, mapped.
    let unknown = client
        .post(
            "/api/v1/sandboxes/sb-00000000000000000000000000/exec",
            r#"{"command": "true"}"#,
        )
        .await;
    assert_error(&unknown, 404, "NOT_FOUND", "sb-00000000000000000000000000");
    let missing_template = client
        .post("/api/v1/sandboxes", r#"{"template": "nope"}"#)
        .await;
    assert_error(&missing_template, 404, "NOT_FOUND", "nope");

    // Keepalive, stats.
    let kept = client
        .post(
            &format!("/api/v1/sandboxes/{id}/keepalive"),
            r#"{"timeout_sec": 600}"#,
        )
        .await;
    assert_eq!(kept.status, 200, "{kept:?}");
    assert!(
        kept.json["expires_at"].as_str().unwrap().ends_with('Z'),
        "{kept:?}"
    );
    let stats = client.get("/api/v1/stats").await;
    assert_eq!(stats.status, 200, "{stats:?}");
    assert_eq!(stats.json["sandboxes_by_state"]["RUNNING"], 1, "{stats:?}");
    assert_eq!(stats.json["nodes_ready"], 1, "{stats:?}");

    // Delete; then it is gone for exec.
    let deleted = client.delete(&format!("/api/v1/sandboxes/{id}")).await;
    assert_eq!(deleted.status, 200, "{deleted:?}");
    let state = deleted.json["sandbox"]["state"].as_str().unwrap();
    assert!(
        state == "SANDBOX_STATE_STOPPING" || state == "SANDBOX_STATE_STOPPED",
        "{deleted:?}"
    );
    let after = client.post(&exec, r#"{"command": "true"}"#).await;
    assert!(
        after.status == 404 || after.status == 400,
        "exec after delete: {after:?}"
    );

    drop(agent);
}
