//! Metrics and traces of the whole stack, every process real: Postgres, a registry, the
//! template-builder, the scheduler, one node agent (booting real guests under QEMU in its
//! own network namespace) and the gateway, each exporting spans to an OTLP receiver and
//! serving `/metrics` on a listener of its own.
//!
//! - One REST create is one trace: the gateway's span, the scheduler's as its child, the
//!   node agent's as the scheduler's child, and the guest call under that; a warmup is
//!   one trace through the gateway and the template-builder.
//! - After a short workload (a warmup, two creates, an exec, a delete) every service's
//!   `/metrics` shows the series with the numbers of what was done.
//!
//! Needs the guest kernel (`NANOBOX_TEST_KERNEL`) and init (`NANOBOX_INIT`) that `cargo
//! xtask test` exports, and the other services' binaries (`cargo build -p
//! nanobox-scheduler-service -p nanobox-node-agent -p nanobox-template-builder`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Client, KEY};
use nanobox_testkit::config::{cluster_sections, pool_sections, storage_sections, AgentConfig};
use nanobox_testkit::images::busybox_layout;
use nanobox_testkit::netns::NodeNet;
use nanobox_testkit::node_agent::NodeAgent;
use nanobox_testkit::otlp::{OtlpReceiver, ReceivedSpan, FAST_EXPORT};
use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::process::{service_command, workspace_bin, Process};
use nanobox_testkit::prometheus::{scrape, Scrape};
use nanobox_testkit::registry::{PushFormat, Registry};
use nanobox_testkit::{env_file, guest_init, wait_until};
use serde_json::Value;

const TOKEN: &str = "test-service-token-0123456789";
const MIB: f64 = 1024.0 * 1024.0;
/// A hang guard for spans and metrics to show up.
const SETTLE: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(250);

/// The whole stack, with its metrics addresses.
struct Stack {
    otlp: OtlpReceiver,
    client: Client,
    registry: Registry,
    gateway: Process,
    gateway_metrics: String,
    scheduler_metrics: String,
    builder_metrics: String,
    agent_metrics: String,
    // Dropped in this order: the node agent stops (destroying its VMs) before the
    // services and the databases it talks to.
    _agent: NodeAgent,
    _scheduler: Process,
    _builder: Process,
    _pg: Postgres,
    _dir: tempfile::TempDir,
}

/// The environment of every service: export spans to `otlp` (quickly when `fast`, else
/// at the batch processor's default pace), serve metrics on a free port (`section` is
/// the service's config section).
fn observed(otlp: &OtlpReceiver, section: &str, fast: bool) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "NANOBOX__TELEMETRY__OTLP_ENDPOINT".to_owned(),
            otlp.endpoint(),
        ),
        (
            format!("NANOBOX__{}__METRICS_ADDR", section.to_ascii_uppercase()),
            "127.0.0.1:0".to_owned(),
        ),
    ];
    if fast {
        env.push((FAST_EXPORT.0.to_owned(), FAST_EXPORT.1.to_owned()));
    }
    env
}

fn spawn(name: &str, bin: &Path, config: &Path, env: &[(String, String)]) -> Process {
    let mut command = service_command(bin, config);
    command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Process::spawn(name, &mut command)
}

impl Stack {
    /// Starts everything; the node keeps `pool` VMs of template `box` ready.
    async fn start(netns_prefix: &str, pool: u32) -> Self {
        let otlp = OtlpReceiver::start().await;
        let pg = Postgres::start().await;
        let db = pg.create_database().await;
        let registry = Registry::start();
        let dir = tempfile::tempdir().unwrap();
        let storage = storage_sections(&pg, &db, &dir.path().join("objects"));
        let common = format!("{storage}\n{}", cluster_sections(TOKEN, 3));

        let builder_config = dir.path().join("template-builder.toml");
        std::fs::write(
            &builder_config,
            format!(
                "[builder]\nlisten_addr = \"127.0.0.1:0\"\nwork_dir = {work:?}\n\n\
                 [oci]\ninit_binary = {init:?}\nplain_http_registries = [{registry:?}]\n\n\
                 [api]\napi_keys = [{KEY:?}]\n\n{storage}",
                work = dir.path().join("work").display().to_string(),
                init = guest_init().display().to_string(),
                registry = registry.host,
            ),
        )
        .unwrap();
        let builder = spawn(
            "template-builder",
            &common::template_builder_bin(),
            &builder_config,
            &observed(&otlp, "builder", true),
        );
        let builder_metrics = builder.line_after("metrics on ");

        let scheduler_config = dir.path().join("scheduler.toml");
        std::fs::write(
            &scheduler_config,
            format!("[api]\ngrpc_addr = \"127.0.0.1:0\"\napi_keys = [{KEY:?}]\n\n{common}"),
        )
        .unwrap();
        let scheduler = spawn(
            "scheduler",
            &workspace_bin("nanobox-scheduler", "nanobox-scheduler-service"),
            &scheduler_config,
            &observed(&otlp, "scheduler", true),
        );
        let scheduler_metrics = scheduler.line_after("metrics on ");

        let rest = if pool > 0 {
            format!("{common}\n{}", pool_sections("box", pool, 600))
        } else {
            common.clone()
        };
        let agent_env = observed(&otlp, "agent", true);
        let agent_env: Vec<(&str, &str)> = agent_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let agent = NodeAgent::start_with_env(
            &workspace_bin("nanobox-node-agent", "nanobox-node-agent"),
            &dir.path().join("agent.toml"),
            &AgentConfig {
                node_id: "node-1",
                scheduler_addr: Some(&scheduler.addr),
                state_dir: &dir.path().join("agent-state"),
                capacity_vcpus: 4,
                capacity_memory_mb: 2048,
                run_as_user: Some("nobody"),
                kernel: &env_file("NANOBOX_TEST_KERNEL"),
                rest: &rest,
            },
            NodeNet::isolated(netns_prefix),
            &agent_env,
        );
        let agent_metrics = agent.process.line_after("metrics on ");

        let gateway_config = dir.path().join("gateway.toml");
        std::fs::write(
            &gateway_config,
            format!(
                "[api]\nlisten_addr = \"127.0.0.1:0\"\napi_keys = [{KEY:?}]\nrequest_timeout_sec = 120\n\n\
                 [builder]\nadvertise_addr = {builder:?}\n\n[agent]\nscheduler_addr = {scheduler:?}\n",
                builder = builder.addr,
                scheduler = scheduler.addr,
            ),
        )
        .unwrap();
        let gateway = spawn(
            "gateway",
            Path::new(env!("CARGO_BIN_EXE_nanobox-gateway")),
            &gateway_config,
            // The default batching (every 5 s): what is still batched when the gateway
            // stops must be sent on its way out.
            &observed(&otlp, "api", false),
        );
        let gateway_metrics = gateway.line_after("metrics on ");
        let client = Client::new(&gateway, Some(KEY));

        Self {
            otlp,
            client,
            registry,
            gateway,
            gateway_metrics,
            scheduler_metrics,
            builder_metrics,
            agent_metrics,
            _agent: agent,
            _scheduler: scheduler,
            _builder: builder,
            _pg: pg,
            _dir: dir,
        }
    }

    /// Pushes the busybox image and warms it up as template `box` over REST, sending
    /// `traceparent`; returns once it is READY.
    async fn warm_up(&self, traceparent: &str) {
        let work = tempfile::tempdir().unwrap();
        self.registry.push(
            &busybox_layout(work.path(), "box"),
            "v1",
            "box",
            "v1",
            PushFormat::Oci,
        );
        let body = format!(
            r#"{{"name": "box", "image": "{}/box:v1"}}"#,
            self.registry.host
        );
        let answer = self
            .client
            .send_with(
                "POST",
                "/api/v1/templates/warmup",
                Some(&body),
                &[("traceparent", traceparent)],
            )
            .await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let (task, _) = self.client.wait_template("box").await;
        assert_eq!(task["state"], "TEMPLATE_STATE_READY", "{task}");
    }

    /// Waits until the node is READY in the cluster.
    async fn node_ready(&self) {
        self.client
            .wait_for("/api/v1/nodes", "node-1 READY", SETTLE, |v| {
                v["nodes"][0]["state"] == "NODE_STATE_READY"
            })
            .await;
    }

    /// Creates a sandbox of `box` with `memory_mb` over REST (with `headers`); its JSON.
    async fn create(&self, memory_mb: u32, headers: &[(&str, &str)]) -> Value {
        let body = format!(
            r#"{{"template": "box", "resources": {{"vcpu": 1, "memory_mb": {memory_mb}}}}}"#
        );
        let created = self
            .client
            .send_with("POST", "/api/v1/sandboxes", Some(&body), headers)
            .await;
        assert_eq!(created.status, 200, "{created:?}");
        assert_eq!(
            created.json["state"], "SANDBOX_STATE_RUNNING",
            "{created:?}"
        );
        created.json
    }

    /// The spans received so far of trace `trace_id`.
    fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.otlp
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Waits until trace `trace_id` holds a span of each (service, name) in `wanted`;
    /// returns the trace.
    async fn wait_trace(&self, trace_id: &str, wanted: &[(&str, &str)]) -> Vec<ReceivedSpan> {
        let probe = async || self.trace(trace_id);
        wait_until(
            &format!("spans {wanted:?} of trace {trace_id}"),
            SETTLE,
            POLL,
            probe,
            |spans: &Vec<ReceivedSpan>| {
                wanted
                    .iter()
                    .all(|(service, name)| find(spans, service, name).is_some())
            },
        )
        .await
    }
}

/// The span of `service` named `name`.
fn find<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name)
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// A caller's trace: (trace id, parent span id, the `traceparent` header).
fn caller_trace() -> (String, String, String) {
    let trace = random_hex(16);
    let parent = random_hex(8);
    let header = format!("00-{trace}-{parent}-01");
    (trace, parent, header)
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_gateway_scheduler_and_node_agent_for_a_create() {
    let mut stack = Stack::start("nbot", 0).await;

    // A warmup: the gateway's span under the caller's, the builder's under it, and the
    // warmup task under the builder's.
    let (warmup_trace, caller, traceparent) = caller_trace();
    stack.warm_up(&traceparent).await;
    let spans = stack
        .wait_trace(
            &warmup_trace,
            &[
                ("nanobox-gateway", "POST /api/v1/templates/warmup"),
                ("nanobox-template-builder", "nanobox.v1.Templates/Warmup"),
                ("nanobox-template-builder", "warmup"),
            ],
        )
        .await;
    let gateway = find(&spans, "nanobox-gateway", "POST /api/v1/templates/warmup").unwrap();
    assert_eq!(gateway.parent_span_id, caller, "{gateway:#?}");
    assert_eq!(gateway.kind, SERVER);
    let builder = find(
        &spans,
        "nanobox-template-builder",
        "nanobox.v1.Templates/Warmup",
    )
    .unwrap();
    assert_eq!(builder.parent_span_id, gateway.span_id, "{spans:#?}");
    assert_eq!(builder.kind, SERVER);
    assert_eq!(builder.attribute("template"), Some("box"), "{builder:#?}");
    assert_eq!(
        builder.attribute("rpc.grpc.status_code"),
        Some("OK"),
        "{builder:#?}"
    );
    let task = find(&spans, "nanobox-template-builder", "warmup").unwrap();
    assert_eq!(task.parent_span_id, builder.span_id, "{spans:#?}");
    assert_eq!(task.attribute("template"), Some("box"), "{task:#?}");

    // A create: gateway -> scheduler -> node agent -> guest, one trace.
    stack.node_ready().await;
    let (create_trace, caller, traceparent) = caller_trace();
    let sandbox = stack
        .create(128, &[("traceparent", traceparent.as_str())])
        .await;
    let id = sandbox["id"].as_str().unwrap().to_owned();
    let spans = stack
        .wait_trace(
            &create_trace,
            &[
                ("nanobox-gateway", "POST /api/v1/sandboxes"),
                ("nanobox-scheduler", "nanobox.v1.Sandboxes/Create"),
                (
                    "nanobox-node-agent",
                    "nanobox.node.v1.NodeAgent/CreateSandbox",
                ),
                ("nanobox-node-agent", "guest.configure"),
                ("nanobox-node-agent", "vm.boot"),
            ],
        )
        .await;
    let gateway = find(&spans, "nanobox-gateway", "POST /api/v1/sandboxes").unwrap();
    assert_eq!(gateway.parent_span_id, caller, "{gateway:#?}");
    assert_eq!(gateway.kind, SERVER);
    assert_eq!(gateway.attribute("http.route"), Some("/api/v1/sandboxes"));
    let scheduler = find(&spans, "nanobox-scheduler", "nanobox.v1.Sandboxes/Create").unwrap();
    assert_eq!(scheduler.parent_span_id, gateway.span_id, "{spans:#?}");
    assert_eq!(scheduler.kind, SERVER);
    assert_eq!(
        scheduler.attribute("sandbox_id"),
        Some(id.as_str()),
        "{scheduler:#?}"
    );
    assert_eq!(
        scheduler.attribute("template"),
        Some("box"),
        "{scheduler:#?}"
    );
    assert_eq!(
        scheduler.attribute("node_id"),
        Some("node-1"),
        "{scheduler:#?}"
    );
    assert_eq!(scheduler.attribute("rpc.grpc.status_code"), Some("OK"));
    let node = find(
        &spans,
        "nanobox-node-agent",
        "nanobox.node.v1.NodeAgent/CreateSandbox",
    )
    .unwrap();
    assert_eq!(node.parent_span_id, scheduler.span_id, "{spans:#?}");
    assert_eq!(node.kind, SERVER);
    assert_eq!(node.attribute("sandbox_id"), Some(id.as_str()), "{node:#?}");
    assert_eq!(node.attribute("template"), Some("box"), "{node:#?}");
    assert_eq!(node.attribute("node_id"), Some("node-1"), "{node:#?}");
    let guest = find(&spans, "nanobox-node-agent", "guest.configure").unwrap();
    assert_eq!(guest.parent_span_id, node.span_id, "{spans:#?}");
    assert_eq!(guest.kind, CLIENT);
    let boot = find(&spans, "nanobox-node-agent", "vm.boot").unwrap();
    assert_eq!(boot.parent_span_id, node.span_id, "{spans:#?}");
    // Nothing of the trace hangs off a span outside it.
    let ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for span in &spans {
        assert!(
            span.parent_span_id == caller || ids.contains(&span.parent_span_id.as_str()),
            "{span:#?} has a parent outside the trace: {spans:#?}"
        );
    }

    // A call without a traceparent starts its own trace at the gateway, and the services
    // still continue it.
    let answer = stack.client.get(&format!("/api/v1/sandboxes/{id}")).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let probe = async || stack.otlp.spans();
    let spans = wait_until(
        "the trace of a GET without traceparent",
        SETTLE,
        POLL,
        probe,
        |spans: &Vec<ReceivedSpan>| {
            spans.iter().any(|s| {
                s.service == "nanobox-scheduler"
                    && s.name == "nanobox.v1.Sandboxes/Get"
                    && spans.iter().any(|g| {
                        g.service == "nanobox-gateway"
                            && g.name == "GET /api/v1/sandboxes/{id}"
                            && g.span_id == s.parent_span_id
                            && g.parent_span_id.is_empty()
                    })
            })
        },
    )
    .await;
    let get = find(&spans, "nanobox-scheduler", "nanobox.v1.Sandboxes/Get").unwrap();
    assert_eq!(get.attribute("sandbox_id"), Some(id.as_str()), "{get:#?}");

    // A span the gateway still holds in its batch when asked to stop is exported before
    // it exits: it is there as soon as the process is gone.
    let (last_trace, _, traceparent) = caller_trace();
    let answer = stack
        .client
        .send_with(
            "GET",
            &format!("/api/v1/sandboxes/{id}"),
            None,
            &[("traceparent", traceparent.as_str())],
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    stack.gateway.terminate();
    let spans = stack.trace(&last_trace);
    assert!(
        find(&spans, "nanobox-gateway", "GET /api/v1/sandboxes/{id}").is_some(),
        "the gateway's last span was not flushed at shutdown: {spans:#?}"
    );
    drop(stack);
}

/// Polls `addr`'s `/metrics` until `done` holds; returns that scrape.
async fn metrics_until(what: &str, addr: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let probe = async || scrape(addr);
    wait_until(what, SETTLE, POLL, probe, |s: &Scrape| done(s)).await
}

fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .value(name, labels)
        .unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{}", scrape.text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_each_service_match_a_short_workload() {
    let stack = Stack::start("nbom", 1).await;
    let box_pool = [("template", "box")];

    // The workload: a warmup, a create from the pool, a cold create (another size than
    // the pool's), an exec, a delete.
    let (_, _, traceparent) = caller_trace();
    stack.warm_up(&traceparent).await;
    stack.node_ready().await;
    metrics_until("the pool's VM ready", &stack.agent_metrics, |s| {
        s.value("nanobox_node_pool_ready", &box_pool) == Some(1.0)
    })
    .await;
    let pooled = stack.create(128, &[]).await;
    let pooled_id = pooled["id"].as_str().unwrap().to_owned();
    // The pool refills before the next create, so the numbers below are exact.
    metrics_until("the pool refilled", &stack.agent_metrics, |s| {
        s.value("nanobox_node_pool_ready", &box_pool) == Some(1.0)
    })
    .await;
    let cold = stack.create(256, &[]).await;
    let exec = stack
        .client
        .post(
            &format!("/api/v1/sandboxes/{pooled_id}/exec"),
            r#"{"command": "/bin/sh", "args": ["-c", "echo hi"]}"#,
        )
        .await;
    assert_eq!(exec.status, 200, "{exec:?}");
    assert_eq!(exec.json["exit_code"], 0, "{exec:?}");
    let deleted = stack
        .client
        .delete(&format!("/api/v1/sandboxes/{pooled_id}"))
        .await;
    assert_eq!(deleted.status, 200, "{deleted:?}");

    // The node agent: creates by path, boots by purpose, the exec, pools, capacity and
    // allocation (the cold sandbox and the pool's VM remain, 1 vCPU each).
    let node = metrics_until("the node's numbers settled", &stack.agent_metrics, |s| {
        s.value("nanobox_node_sandboxes", &[]) == Some(1.0)
            && s.value("nanobox_node_allocated_vcpus", &[]) == Some(2.0)
    })
    .await;
    let creates = "nanobox_node_sandbox_creates_total";
    assert_eq!(
        value(&node, creates, &[("path", "pool"), ("result", "ok")]),
        1.0
    );
    assert_eq!(
        value(&node, creates, &[("path", "cold"), ("result", "ok")]),
        1.0
    );
    assert_eq!(
        node.sum(creates, &[("result", "error")]),
        0.0,
        "{}",
        node.text
    );
    let create_count = "nanobox_node_sandbox_create_duration_seconds_count";
    assert_eq!(value(&node, create_count, &[("path", "pool")]), 1.0);
    assert_eq!(value(&node, create_count, &[("path", "cold")]), 1.0);
    let boots = "nanobox_node_vm_boot_duration_seconds_count";
    assert_eq!(value(&node, boots, &[("purpose", "sandbox")]), 1.0);
    assert_eq!(value(&node, boots, &[("purpose", "pool")]), 2.0);
    assert!(
        value(
            &node,
            "nanobox_node_vm_boot_duration_seconds_sum",
            &[("purpose", "sandbox")]
        ) > 0.0
    );
    assert_eq!(
        value(&node, "nanobox_node_execs_total", &[("outcome", "ok")]),
        1.0
    );
    assert_eq!(
        node.sum("nanobox_node_execs_total", &[]),
        1.0,
        "{}",
        node.text
    );
    assert_eq!(
        value(
            &node,
            "nanobox_node_exec_duration_seconds_count",
            &[("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(value(&node, "nanobox_node_pool_ready", &box_pool), 1.0);
    assert_eq!(value(&node, "nanobox_node_pool_target", &box_pool), 1.0);
    assert_eq!(value(&node, "nanobox_node_pool_starting", &box_pool), 0.0);
    assert_eq!(value(&node, "nanobox_node_capacity_vcpus", &[]), 4.0);
    assert_eq!(
        value(&node, "nanobox_node_capacity_memory_bytes", &[]),
        2048.0 * MIB
    );
    assert_eq!(
        value(&node, "nanobox_node_allocated_memory_bytes", &[]),
        (256.0 + 128.0) * MIB
    );
    let node_grpc = |method: &str| {
        value(
            &node,
            "nanobox_grpc_server_requests_total",
            &[
                ("service", "nanobox.node.v1.NodeAgent"),
                ("method", method),
                ("code", "OK"),
            ],
        )
    };
    assert_eq!(node_grpc("CreateSandbox"), 2.0);
    assert_eq!(node_grpc("Exec"), 1.0);
    assert!(node_grpc("DestroySandbox") >= 1.0);
    assert_eq!(
        value(
            &node,
            "nanobox_build_info",
            &[("service", "nanobox-node-agent")]
        ),
        1.0
    );
    assert!(
        node.described("nanobox_node_sandbox_creates_total"),
        "{}",
        node.text
    );

    // The scheduler: its gRPC calls, the sandboxes by state, the node's report.
    let scheduler = metrics_until(
        "the scheduler's numbers settled",
        &stack.scheduler_metrics,
        |s| {
            s.value("nanobox_scheduler_sandboxes", &[("state", "RUNNING")]) == Some(1.0)
                && s.value("nanobox_scheduler_sandboxes", &[("state", "STOPPED")]) == Some(1.0)
                && s.value(
                    "nanobox_scheduler_node_allocated_vcpus",
                    &[("node_id", "node-1")],
                ) == Some(2.0)
        },
    )
    .await;
    let sandboxes_grpc = |method: &str| {
        value(
            &scheduler,
            "nanobox_grpc_server_requests_total",
            &[
                ("service", "nanobox.v1.Sandboxes"),
                ("method", method),
                ("code", "OK"),
            ],
        )
    };
    assert_eq!(sandboxes_grpc("Create"), 2.0);
    assert_eq!(sandboxes_grpc("Exec"), 1.0);
    assert_eq!(sandboxes_grpc("Delete"), 1.0);
    assert_eq!(
        scheduler.sum(
            "nanobox_grpc_server_requests_total",
            &[("service", "nanobox.v1.Sandboxes"), ("method", "Create")]
        ),
        2.0,
        "{}",
        scheduler.text
    );
    assert!(
        value(
            &scheduler,
            "nanobox_grpc_server_requests_total",
            &[
                ("service", "nanobox.node.v1.NodeRegistry"),
                ("method", "Heartbeat"),
                ("code", "OK"),
            ],
        ) >= 1.0
    );
    assert_eq!(
        value(
            &scheduler,
            "nanobox_grpc_server_request_duration_seconds_count",
            &[
                ("service", "nanobox.v1.Sandboxes"),
                ("method", "Create"),
                ("code", "OK")
            ]
        ),
        2.0
    );
    assert_eq!(
        value(
            &scheduler,
            "nanobox_scheduler_sandboxes",
            &[("state", "FAILED")]
        ),
        0.0
    );
    let on_node = [("node_id", "node-1")];
    assert_eq!(
        value(&scheduler, "nanobox_scheduler_node_up", &on_node),
        1.0
    );
    assert_eq!(
        value(
            &scheduler,
            "nanobox_scheduler_node_capacity_vcpus",
            &on_node
        ),
        4.0
    );
    assert_eq!(
        value(
            &scheduler,
            "nanobox_scheduler_node_capacity_memory_bytes",
            &on_node
        ),
        2048.0 * MIB
    );
    assert_eq!(
        value(
            &scheduler,
            "nanobox_scheduler_node_sandboxes_running",
            &on_node
        ),
        1.0
    );

    // The gateway: REST requests by method, route template and status.
    let gateway = scrape(&stack.gateway_metrics);
    let rest = |method: &str, route: &str| {
        value(
            &gateway,
            "nanobox_http_requests_total",
            &[("method", method), ("route", route), ("status", "200")],
        )
    };
    assert_eq!(rest("POST", "/api/v1/sandboxes"), 2.0);
    assert_eq!(rest("POST", "/api/v1/sandboxes/{id}/exec"), 1.0);
    assert_eq!(rest("DELETE", "/api/v1/sandboxes/{id}"), 1.0);
    assert_eq!(rest("POST", "/api/v1/templates/warmup"), 1.0);
    assert!(rest("GET", "/api/v1/templates/{name}/status") >= 1.0);
    assert_eq!(
        value(
            &gateway,
            "nanobox_http_request_duration_seconds_count",
            &[
                ("method", "POST"),
                ("route", "/api/v1/sandboxes"),
                ("status", "200")
            ],
        ),
        2.0
    );
    // Ids never make series of their own.
    assert!(!gateway.text.contains(&pooled_id), "{}", gateway.text);
    assert!(!gateway.text.contains(cold["id"].as_str().unwrap()));

    // The template-builder: the warmup and its call.
    let builder = scrape(&stack.builder_metrics);
    assert_eq!(
        value(&builder, "nanobox_warmups_total", &[("result", "ready")]),
        1.0
    );
    assert_eq!(
        builder.sum("nanobox_warmups_total", &[]),
        1.0,
        "{}",
        builder.text
    );
    assert_eq!(
        value(
            &builder,
            "nanobox_warmup_duration_seconds_count",
            &[("result", "ready")]
        ),
        1.0
    );
    assert_eq!(value(&builder, "nanobox_warmups_running", &[]), 0.0);
    assert_eq!(
        value(
            &builder,
            "nanobox_grpc_server_requests_total",
            &[
                ("service", "nanobox.v1.Templates"),
                ("method", "Warmup"),
                ("code", "OK")
            ],
        ),
        1.0
    );

    // One sample of each, for the record.
    for (service, addr) in [
        ("gateway", &stack.gateway_metrics),
        ("scheduler", &stack.scheduler_metrics),
        ("template-builder", &stack.builder_metrics),
        ("node-agent", &stack.agent_metrics),
    ] {
        let text = scrape(addr).text;
        let nanobox: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("nanobox_") && !l.contains("_bucket{"))
            .collect();
        eprintln!(
            "--- /metrics of the {service} ({addr}):\n{}",
            nanobox.join("\n")
        );
    }
    drop(stack);
}
