//! The whole stack with two nodes: Postgres, the scheduler, two real node agents (each in
//! its own network namespace, node-a with a warm pool, both with small capacities), the
//! gateway, real guests under QEMU. Bad input over REST gets the right code and a message
//! naming the problem; creates fill the pooled node and then go to the other; REST and a
//! tonic client see the same sandboxes; a sandbox paused over REST keeps a process and a
//! file that live only in its memory through its resume, frees its node's share while
//! paused, and refuses exec and keepalive meanwhile (400, saying it is paused); the
//! scheduler killed with -9 and restarted while a create is in flight, and with a resume
//! cut short after the node got it, keeps every existing sandbox working, adopts the
//! resumed sandbox from the node's report and leaves no orphan VM. And,
//! with the template-builder and a local registry, the issue's Debian + Node.js image is
//! warmed up over REST and runs `node -e` in a sandbox on one of the two nodes.
//!
//! Needs the guest kernel, init and test rootfs (`NANOBOX_TEST_KERNEL`, `NANOBOX_INIT`,
//! `NANOBOX_TEST_ROOTFS`) that `cargo xtask test` exports, and the scheduler, node-agent
//! and template-builder binaries (built by `cargo xtask test`; by hand, `cargo build -p
//! nanobox-scheduler-service -p nanobox-node-agent -p nanobox-template-builder`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{assert_error, start_gateway, Client, GatewayConfig, KEY};
use nanobox_core::{ImageConfig, TemplateName, TemplateState};
use nanobox_proto::node::v1 as node;
use nanobox_proto::node::v1::node_agent_client::NodeAgentClient;
use nanobox_proto::v1;
use nanobox_proto::v1::sandboxes_client::SandboxesClient;
use nanobox_store::metadata::TemplateRecord;
use nanobox_store::{LocalFsStore, MetadataStore};
use nanobox_testkit::config::{cluster_sections, pool_sections, storage_sections, AgentConfig};
use nanobox_testkit::netns::NodeNet;
use nanobox_testkit::node_agent::NodeAgent;
use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::process::{service_command, workspace_bin, Process};
use nanobox_testkit::template::publish_template;
use nanobox_testkit::GuestArtifacts;
use serde_json::Value;

const TOKEN: &str = "test-service-token-0123456789";
const TEMPLATE: &str = "base";
/// Hang guard for anything that waits on guests booting under TCG.
const SETTLE: Duration = Duration::from_secs(240);

/// A free loopback port (so a restarted scheduler comes back at the same address).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Stack {
    pg: Postgres,
    db: tokio_postgres::Config,
    dir: tempfile::TempDir,
    scheduler_addr: String,
    scheduler: Option<Process>,
}

impl Stack {
    async fn meta(&self) -> MetadataStore {
        MetadataStore::open(self.db.clone(), Default::default())
            .await
            .unwrap()
    }

    fn objects_dir(&self) -> PathBuf {
        self.dir.path().join("objects")
    }

    fn common_config(&self) -> String {
        format!(
            "{}\n{}",
            storage_sections(&self.pg, &self.db, &self.objects_dir()),
            cluster_sections(TOKEN, 5)
        )
    }

    fn start_scheduler(&mut self) {
        let config = self.dir.path().join("scheduler.toml");
        std::fs::write(
            &config,
            format!(
                "[api]\ngrpc_addr = \"{}\"\n\n{}",
                self.scheduler_addr,
                self.common_config()
            ),
        )
        .unwrap();
        let bin = workspace_bin("nanobox-scheduler", "nanobox-scheduler-service");
        let process = Process::spawn("scheduler", &mut service_command(bin, &config));
        assert_eq!(process.addr, self.scheduler_addr);
        self.scheduler = Some(process);
    }

    /// Starts node agent `node_id` (4 vCPUs, `memory_mb`) in namespaces of its own; `extra`
    /// is more `nanobox.toml` text (a pool).
    fn start_agent(&self, node_id: &str, memory_mb: u64, extra: &str) -> NodeAgent {
        let config = AgentConfig {
            node_id,
            scheduler_addr: Some(&self.scheduler_addr),
            state_dir: &self.dir.path().join(node_id).join("state"),
            capacity_vcpus: 4,
            capacity_memory_mb: memory_mb,
            run_as_user: Some("nobody"),
            kernel: &GuestArtifacts::from_env().kernel,
            rest: &format!("{}\n{extra}", self.common_config()),
        };
        NodeAgent::start(
            &workspace_bin("nanobox-node-agent", "nanobox-node-agent"),
            &self.dir.path().join(format!("{node_id}.toml")),
            &config,
            NodeNet::with_internet(&format!("nbf{}", &node_id[node_id.len() - 1..])),
        )
    }

    /// Publishes the test rootfs as a READY template, as the template-builder would.
    async fn publish(&self, name: &str) {
        let objects = LocalFsStore::open(self.objects_dir()).unwrap();
        let rootfs = GuestArtifacts::from_env().rootfs;
        publish_template(&self.meta().await, &objects, name, &rootfs).await;
    }
}

/// Polls `GET path` until `done` holds for the answer (hang guard: [`SETTLE`]).
async fn wait_for(client: &Client, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    client.wait_for(path, what, SETTLE, done).await
}

fn both_ready(nodes: &Value) -> bool {
    nodes["nodes"]
        .as_array()
        .is_some_and(|n| n.len() == 2 && n.iter().all(|n| n["state"] == "NODE_STATE_READY"))
}

async fn create(client: &Client, memory_mb: u32) -> Value {
    let created = client
        .post(
            "/api/v1/sandboxes",
            &format!(r#"{{"template": "{TEMPLATE}", "resources": {{"vcpu": 1, "memory_mb": {memory_mb}}}}}"#),
        )
        .await;
    assert_eq!(created.status, 200, "{created:?}");
    assert_eq!(
        created.json["state"], "SANDBOX_STATE_RUNNING",
        "{created:?}"
    );
    created.json
}

async fn exec_echo(client: &Client, id: &str, word: &str) {
    let ran = client
        .post(
            &format!("/api/v1/sandboxes/{id}/exec"),
            &format!(r#"{{"command": "/bin/sh", "args": ["-c", "echo {word}"]}}"#),
        )
        .await;
    assert_eq!(ran.status, 200, "{ran:?}");
    assert_eq!(ran.json["stdout"], format!("{word}\n"), "{ran:?}");
    assert_eq!(ran.json["exit_code"], 0, "{ran:?}");
}

/// The ids of the sandboxes the scheduler lists, with their states, STOPPED ones left out.
async fn scheduler_sandboxes(client: &Client) -> BTreeMap<String, String> {
    let listed = client.get("/api/v1/sandboxes").await;
    assert_eq!(listed.status, 200, "{listed:?}");
    listed.json["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] != "SANDBOX_STATE_STOPPED")
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn scheduler_ids(client: &Client) -> BTreeSet<String> {
    scheduler_sandboxes(client).await.into_keys().collect()
}

/// The sandboxes a node agent holds (its own `ListSandboxes`, STOPPED ones left out), with
/// their states as the REST API names them.
async fn node_sandboxes(agent: &NodeAgent) -> BTreeMap<String, String> {
    let mut client = NodeAgentClient::connect(format!("http://{}", agent.process.addr))
        .await
        .unwrap();
    let mut request = tonic::Request::new(node::ListSandboxesRequest {});
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    client
        .list_sandboxes(request)
        .await
        .unwrap()
        .into_inner()
        .sandboxes
        .into_iter()
        .filter(|s| s.state() != v1::SandboxState::Stopped)
        .map(|s| (s.id.clone(), s.state().as_str_name().to_owned()))
        .collect()
}

/// The ids of the sandboxes a node agent holds, STOPPED ones left out.
async fn node_ids(agent: &NodeAgent) -> BTreeSet<String> {
    node_sandboxes(agent).await.into_keys().collect()
}

/// Resumes the sandbox of `record` on `agent` directly (a node-agent call with the
/// service token, as the scheduler makes it).
async fn resume_on_node(agent: &NodeAgent, record: &nanobox_store::metadata::SandboxRecord) {
    let mut client = NodeAgentClient::connect(format!("http://{}", agent.process.addr))
        .await
        .unwrap();
    let mut request = tonic::Request::new(node::ResumeSandboxRequest {
        sandbox_id: record.id.to_string(),
        snapshot_id: record.snapshot_id.clone().unwrap(),
        template: record.template.to_string(),
        template_digest: record.template_digest.clone(),
        resources: Some(record.resources.into()),
        network: Some(record.network.clone().into()),
        timeout_sec: 600,
        metadata: Default::default(),
        env: Default::default(),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let resumed = client
        .resume_sandbox(request)
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(resumed.state(), v1::SandboxState::Running, "{resumed:?}");
}

/// Pauses `id` (on node-b, its only sandbox) over REST and resumes it: a process and a
/// tmpfs file that exist only in the guest's memory survive; while paused, exec and
/// keepalive get 400 saying it is paused (REST and gRPC), it is listed, counted and shown
/// with its snapshot, and node-b reports its share free.
async fn pause_and_resume_over_rest(
    client: &Client,
    grpc: &mut SandboxesClient<tonic::transport::Channel>,
    id: &str,
) {
    let started = client
        .post(
            &format!("/api/v1/sandboxes/{id}/exec"),
            r#"{"command": "sh", "args": ["-c", "setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!; echo kept > /dev/shm/x"]}"#,
        )
        .await;
    assert_eq!(started.json["exit_code"], 0, "{started:?}");
    let pid: u32 = started.json["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let allocated_mb = |nodes: &Value| {
        nodes["nodes"][1]["allocated"]["memory_mb"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = allocated_mb(&client.get("/api/v1/nodes").await.json);

    let paused = client
        .post(&format!("/api/v1/sandboxes/{id}/pause"), "{}")
        .await;
    assert_eq!(paused.status, 200, "{paused:?}");
    let sandbox = &paused.json["sandbox"];
    assert_eq!(sandbox["state"], "SANDBOX_STATE_PAUSED", "{paused:?}");
    assert_eq!(sandbox["id"], id, "{paused:?}");
    assert_eq!(sandbox["node_id"], "node-b", "{paused:?}");
    let snapshot = sandbox["snapshot_id"].as_str().unwrap().to_owned();
    assert!(!snapshot.is_empty(), "{paused:?}");
    assert!(sandbox["expires_at"].is_null(), "{paused:?}");
    let size: u64 = match &paused.json["snapshot_size_bytes"] {
        Value::String(s) => s.parse().unwrap(),
        other => other.as_u64().unwrap(),
    };
    assert!(size > 0, "{paused:?}");

    // Exec and keepalive are refused, over REST and gRPC alike.
    let exec = client
        .post(
            &format!("/api/v1/sandboxes/{id}/exec"),
            r#"{"command": "true"}"#,
        )
        .await;
    assert_error(
        &exec,
        400,
        "FAILED_PRECONDITION",
        "is paused; resume it first",
    );
    assert!(
        exec.json["message"].as_str().unwrap().contains(id),
        "{exec:?}"
    );
    let keepalive = client
        .post(
            &format!("/api/v1/sandboxes/{id}/keepalive"),
            r#"{"timeout_sec": 60}"#,
        )
        .await;
    assert_error(
        &keepalive,
        400,
        "FAILED_PRECONDITION",
        "is paused; resume it first",
    );
    let err = grpc
        .exec(v1::ExecRequest {
            id: id.to_owned(),
            command: "true".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("is paused"), "{err:?}");
    let over_grpc = grpc
        .get(v1::GetSandboxRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(over_grpc.state(), v1::SandboxState::Paused);
    assert_eq!(over_grpc.snapshot_id, snapshot);

    // Listed and counted as paused; node-b gives its memory back.
    let listed = client
        .get("/api/v1/sandboxes?state=SANDBOX_STATE_PAUSED")
        .await;
    assert_eq!(listed.status, 200, "{listed:?}");
    assert_eq!(listed.json["sandboxes"][0]["id"], id, "{listed:?}");
    assert_eq!(
        listed.json["sandboxes"].as_array().unwrap().len(),
        1,
        "{listed:?}"
    );
    let stats = client.get("/api/v1/stats").await;
    assert_eq!(stats.json["sandboxes_by_state"]["PAUSED"], 1, "{stats:?}");
    wait_for(client, "/api/v1/nodes", "node-b's share freed", |v| {
        allocated_mb(v) + 128 == before
    })
    .await;

    // Resumed over REST: running on node-b, and what lived in memory is still there.
    let resumed = client
        .post(&format!("/api/v1/sandboxes/{id}/resume"), "{}")
        .await;
    assert_eq!(resumed.status, 200, "{resumed:?}");
    assert_eq!(
        resumed.json["state"], "SANDBOX_STATE_RUNNING",
        "{resumed:?}"
    );
    assert_eq!(resumed.json["node_id"], "node-b", "{resumed:?}");
    assert_eq!(resumed.json["snapshot_id"], snapshot, "{resumed:?}");
    assert!(!resumed.json["expires_at"].is_null(), "{resumed:?}");
    let memory = client
        .post(
            &format!("/api/v1/sandboxes/{id}/exec"),
            &format!(r#"{{"command": "sh", "args": ["-c", "kill -0 {pid} && cat /dev/shm/x"]}}"#),
        )
        .await;
    assert_eq!(memory.status, 200, "{memory:?}");
    assert_eq!(
        (
            memory.json["stdout"].as_str(),
            memory.json["exit_code"].as_i64()
        ),
        (Some("kept\n"), Some(0)),
        "{memory:?}"
    );
    let kept = client
        .post(
            &format!("/api/v1/sandboxes/{id}/keepalive"),
            r#"{"timeout_sec": 600}"#,
        )
        .await;
    assert_eq!(kept.status, 200, "{kept:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_placement_bad_input_and_a_scheduler_restart() {
    let pg = Postgres::start().await;
    let db = pg.create_database().await;
    let mut stack = Stack {
        pg,
        db,
        dir: tempfile::tempdir().unwrap(),
        scheduler_addr: format!("127.0.0.1:{}", free_port()),
        scheduler: None,
    };
    stack.publish(TEMPLATE).await;
    stack
        .meta()
        .await
        .upsert_template(&TemplateRecord {
            name: TemplateName::new("building").unwrap(),
            image_ref: "test/x:1".into(),
            manifest_digest: None,
            rootfs_key: None,
            size_bytes: None,
            image_config: ImageConfig::default(),
            state: TemplateState::Building,
        })
        .await
        .unwrap();
    stack.start_scheduler();
    // node-a holds a warm pool VM and offers room for it and two 128 MiB sandboxes; node-b
    // for two sandboxes. Both offer 4 vCPUs.
    let agent_a = stack.start_agent("node-a", 384, &pool_sections(TEMPLATE, 1, 600));
    let agent_b = stack.start_agent("node-b", 256, "");
    let gateway = start_gateway(
        stack.dir.path(),
        &GatewayConfig {
            scheduler: stack.scheduler_addr.clone(),
            request_timeout_sec: 120,
            ..GatewayConfig::default()
        },
    );
    let client = Client::new(&gateway, Some(KEY));
    let mut grpc = SandboxesClient::connect(format!("http://{}", stack.scheduler_addr))
        .await
        .unwrap();

    let nodes = wait_for(
        &client,
        "/api/v1/nodes",
        "both nodes READY, node-a with its pool VM",
        |v| both_ready(v) && v["nodes"][0]["ready_pool"][TEMPLATE] == 1,
    )
    .await;
    assert_eq!(nodes["nodes"][0]["id"], "node-a", "{nodes}");
    assert_eq!(nodes["nodes"][1]["id"], "node-b", "{nodes}");

    // Bad input, each with its HTTP code and a message naming the problem.
    let not_ready = client
        .post("/api/v1/sandboxes", r#"{"template": "building"}"#)
        .await;
    assert_error(
        &not_ready,
        400,
        "FAILED_PRECONDITION",
        "not ready (BUILDING)",
    );
    let too_many = client
        .post(
            "/api/v1/sandboxes",
            &format!(
                r#"{{"template": "{TEMPLATE}", "resources": {{"vcpu": 33, "memory_mb": 128}}}}"#
            ),
        )
        .await;
    assert_error(&too_many, 400, "INVALID_ARGUMENT", "resources.vcpu");
    let too_big = client
        .post(
            "/api/v1/sandboxes",
            &format!(
                r#"{{"template": "{TEMPLATE}", "resources": {{"vcpu": 1, "memory_mb": 1024}}}}"#
            ),
        )
        .await;
    assert_error(&too_big, 429, "RESOURCE_EXHAUSTED", "no node has capacity");
    assert!(
        too_big.json["message"]
            .as_str()
            .unwrap()
            .contains("node-b: "),
        "{too_big:?}"
    );
    let unknown = nanobox_core::SandboxId::new().to_string();
    let pause_unknown = client
        .post(&format!("/api/v1/sandboxes/{unknown}/pause"), "{}")
        .await;
    assert_error(&pause_unknown, 404, "NOT_FOUND", &unknown);

    // Placement: the pooled node until it is full, then the other. (Each create waits for
    // the refill, so that the pool VM is there to be preferred.)
    // node-a's own report of `running` sandboxes and a ready pool VM: one sent before the
    // last create or refill finished can still show the pool VM of before.
    let pool_refilled = async |running: u32| {
        wait_for(&client, "/api/v1/nodes", "node-a's pool refilled", |v| {
            v["nodes"][0]["ready_pool"][TEMPLATE] == 1
                && v["nodes"][0]["sandboxes_running"] == running
        })
        .await
    };
    let s1 = create(&client, 128).await;
    assert_eq!(s1["node_id"], "node-a", "{s1}");
    pool_refilled(1).await;
    let s2 = create(&client, 128).await;
    assert_eq!(s2["node_id"], "node-a", "{s2}");
    pool_refilled(2).await;
    // node-a's 384 MiB now hold two sandboxes and its pool VM: that VM still serves a
    // create (placement counts a ready pool VM's share as room), and then node-a is full.
    let extra = create(&client, 128).await;
    assert_eq!(extra["node_id"], "node-a", "{extra}");
    // The scheduler places on the nodes' last reports: wait for node-a's report of its
    // three sandboxes and empty pool (one sent before that create would still offer the
    // pool VM's room).
    wait_for(&client, "/api/v1/nodes", "node-a reported full", |v| {
        v["nodes"][0]["sandboxes_running"] == 3 && v["nodes"][0]["ready_pool"][TEMPLATE] == 0
    })
    .await;
    let s3 = create(&client, 128).await;
    assert_eq!(s3["node_id"], "node-b", "{s3}");
    // Deleted again, so that node-a is back to two sandboxes and its pool VM.
    let extra = extra["id"].as_str().unwrap().to_owned();
    let deleted = client.delete(&format!("/api/v1/sandboxes/{extra}")).await;
    assert_eq!(deleted.status, 200, "{deleted:?}");
    pool_refilled(2).await;
    let [id1, id2, id3] = [&s1, &s2, &s3].map(|s| s["id"].as_str().unwrap().to_owned());
    for id in [&id1, &id2, &id3] {
        exec_echo(&client, id, "hi").await;
    }
    let resume_running = client
        .post(&format!("/api/v1/sandboxes/{id1}/resume"), "{}")
        .await;
    assert_error(
        &resume_running,
        400,
        "FAILED_PRECONDITION",
        "RUNNING; resume needs it PAUSED",
    );

    // REST and gRPC see the same sandboxes; nodes and stats tell the truth.
    let over_grpc: BTreeSet<String> = grpc
        .list(v1::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes
        .into_iter()
        .filter(|s| s.state() != v1::SandboxState::Stopped)
        .map(|s| s.id)
        .collect();
    assert_eq!(over_grpc, scheduler_ids(&client).await);
    assert_eq!(
        over_grpc,
        [id1.clone(), id2.clone(), id3.clone()]
            .into_iter()
            .collect()
    );
    let got = grpc
        .get(v1::GetSandboxRequest { id: id3.clone() })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(got.node_id, "node-b");
    let stats = client.get("/api/v1/stats").await;
    assert_eq!(stats.json["sandboxes_by_state"]["RUNNING"], 3, "{stats:?}");
    assert_eq!(stats.json["nodes_ready"], 2, "{stats:?}");

    // Delete; exec on the deleted sandbox names it.
    let deleted = client.delete(&format!("/api/v1/sandboxes/{id2}")).await;
    assert_eq!(deleted.status, 200, "{deleted:?}");
    let after = client
        .post(
            &format!("/api/v1/sandboxes/{id2}/exec"),
            r#"{"command": "true"}"#,
        )
        .await;
    assert_error(&after, 400, "FAILED_PRECONDITION", &id2);
    assert!(
        after.json["message"]
            .as_str()
            .unwrap()
            .contains("exec needs it RUNNING"),
        "exec after delete: {after:?}"
    );

    pause_and_resume_over_rest(&client, &mut grpc, &id3).await;

    // Restart the scheduler (kill -9) with a create in flight, and with a resume cut
    // short between the scheduler recording it and recording its answer.
    let paused = grpc
        .pause(v1::PauseSandboxRequest { id: id3.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.sandbox.unwrap().state(), v1::SandboxState::Paused);
    let in_flight = {
        let gateway_addr = gateway.addr.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let answer = http
                .post(format!("http://{gateway_addr}/api/v1/sandboxes"))
                .bearer_auth(KEY)
                .header("content-type", "application/json")
                // 64 MiB: no pooled VM matches, so this one boots (and takes a while).
                .body(format!(
                    r#"{{"template": "{TEMPLATE}", "resources": {{"vcpu": 1, "memory_mb": 64}}}}"#
                ))
                .timeout(Duration::from_secs(120))
                .send()
                .await;
            match answer {
                Ok(a) => (a.status().as_u16(), a.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.scheduler.as_mut().unwrap().kill();
    // Exactly what a scheduler killed mid-resume leaves: the record STARTING (as Resume
    // writes it before calling the node) and the node, which got the call, running the
    // sandbox again.
    let resuming = stack
        .meta()
        .await
        .begin_resume(&nanobox_core::SandboxId::parse(&id3).unwrap())
        .await
        .unwrap()
        .unwrap();
    resume_on_node(&agent_b, &resuming).await;
    stack.start_scheduler();
    let (status, body) = in_flight.await.unwrap();
    // Either it completed or it failed cleanly (an error answer, not a hang).
    assert!(
        status == 200 || status >= 400 || status == 0,
        "in-flight create: {status} {body}"
    );
    wait_for(
        &client,
        "/api/v1/nodes",
        "both nodes READY again",
        both_ready,
    )
    .await;

    // The restarted scheduler adopts the resume from node-b's report, without waiting
    // out the resume's deadline (180 s at least: this hang guard is shorter).
    let adopted = client
        .wait_for(
            &format!("/api/v1/sandboxes/{id3}"),
            "the interrupted resume adopted as RUNNING",
            Duration::from_secs(90),
            |v| v["state"] == "SANDBOX_STATE_RUNNING",
        )
        .await;
    assert_eq!(
        adopted["snapshot_id"],
        resuming.snapshot_id.clone().unwrap(),
        "{adopted}"
    );
    assert!(!adopted["expires_at"].is_null(), "{adopted}");
    assert_eq!(
        node_sandboxes(&agent_b).await.get(&id3).map(String::as_str),
        Some("SANDBOX_STATE_RUNNING")
    );
    let memory = client
        .post(
            &format!("/api/v1/sandboxes/{id3}/exec"),
            r#"{"command": "cat", "args": ["/dev/shm/x"]}"#,
        )
        .await;
    assert_eq!(memory.json["stdout"], "kept\n", "{memory:?}");

    // Existing sandboxes keep working and are listed after the restart.
    let listed = scheduler_ids(&client).await;
    for id in [&id1, &id3] {
        assert!(listed.contains(id), "{id} not listed: {listed:?}");
        exec_echo(&client, id, "still").await;
    }
    // No orphan VM: every sandbox a node runs is one the scheduler knows, and every
    // sandbox the scheduler calls RUNNING is on a node. (A record of the in-flight create
    // left in a non-terminal state is reported in the message, not failed on here.)
    let deadline = Instant::now() + SETTLE;
    loop {
        let known = scheduler_sandboxes(&client).await;
        let on_nodes: BTreeSet<String> = node_ids(&agent_a)
            .await
            .union(&node_ids(&agent_b).await)
            .cloned()
            .collect();
        let orphans: Vec<_> = on_nodes
            .iter()
            .filter(|id| !known.contains_key(*id))
            .collect();
        let phantoms: Vec<_> = known
            .iter()
            .filter(|(id, state)| *state == "SANDBOX_STATE_RUNNING" && !on_nodes.contains(*id))
            .collect();
        if orphans.is_empty() && phantoms.is_empty() {
            if status == 200 {
                let created: Value = serde_json::from_str(&body).unwrap();
                assert!(on_nodes.contains(created["id"].as_str().unwrap()), "{body}");
            }
            eprintln!("settled: nodes run {on_nodes:?}, the scheduler lists {known:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "orphan VMs {orphans:?}, RUNNING without a VM {phantoms:?}: nodes run {on_nodes:?}, \
             the scheduler lists {known:?} (in-flight create: {status} {body})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut ids = vec![id1, id3];
    if status == 200 {
        let created: Value = serde_json::from_str(&body).unwrap();
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    for id in ids {
        let deleted = client.delete(&format!("/api/v1/sandboxes/{id}")).await;
        assert_eq!(deleted.status, 200, "{deleted:?}");
    }
    drop(agent_a);
    drop(agent_b);
}

/// The issue's Debian + Node.js image, warmed up over REST and run on one of two nodes;
/// the same sandbox seen over REST and gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_node_image_warmed_up_and_run_over_rest_and_grpc() {
    use nanobox_testkit::images::{debian_node_layout, DEBIAN_NODE_TAG};
    use nanobox_testkit::registry::{PushFormat, Registry};

    let pg = Postgres::start().await;
    let db = pg.create_database().await;
    let mut stack = Stack {
        pg,
        db,
        dir: tempfile::tempdir().unwrap(),
        scheduler_addr: format!("127.0.0.1:{}", free_port()),
        scheduler: None,
    };
    let registry = Registry::start();
    let builder = common::start_builder(&stack.pg, &stack.db, &registry, stack.dir.path());
    stack.start_scheduler();
    let agent_a = stack.start_agent("node-a", 1024, "");
    let agent_b = stack.start_agent("node-b", 1024, "");
    let gateway = start_gateway(
        stack.dir.path(),
        &GatewayConfig {
            builder: builder.addr.clone(),
            scheduler: stack.scheduler_addr.clone(),
            request_timeout_sec: 120,
            ..GatewayConfig::default()
        },
    );
    let client = Client::new(&gateway, Some(KEY));
    let mut grpc = SandboxesClient::connect(format!("http://{}", stack.scheduler_addr))
        .await
        .unwrap();

    registry.push(
        &debian_node_layout(),
        DEBIAN_NODE_TAG,
        "library/node",
        "22-bookworm",
        PushFormat::Oci,
    );
    let warmup = client
        .post(
            "/api/v1/templates/warmup",
            &format!(
                r#"{{"name": "node22", "image": "{}/library/node:22-bookworm"}}"#,
                registry.host
            ),
        )
        .await;
    assert_eq!(warmup.status, 200, "{warmup:?}");
    let (task, _) = client.wait_template("node22").await;
    assert_eq!(task["state"], "TEMPLATE_STATE_READY", "{task}");
    wait_for(&client, "/api/v1/nodes", "both nodes READY", both_ready).await;

    let created = client
        .post(
            "/api/v1/sandboxes",
            r#"{"template": "node22", "resources": {"vcpu": 1, "memory_mb": 256}, "metadata": {"app": "node"}}"#,
        )
        .await;
    assert_eq!(created.status, 200, "{created:?}");
    assert_eq!(
        created.json["state"], "SANDBOX_STATE_RUNNING",
        "{created:?}"
    );
    let id = created.json["id"].as_str().unwrap().to_owned();
    let node_id = created.json["node_id"].as_str().unwrap().to_owned();
    assert!(node_id == "node-a" || node_id == "node-b", "{created:?}");

    let ran = client
        .post(
            &format!("/api/v1/sandboxes/{id}/exec"),
            r#"{"command": "node", "args": ["-e", "console.log(JSON.stringify({ok:true}))"], "timeout_ms": 60000}"#,
        )
        .await;
    assert_eq!(ran.status, 200, "{ran:?}");
    assert_eq!(ran.json["stdout"], "{\"ok\":true}\n", "{ran:?}");
    assert_eq!(ran.json["exit_code"], 0, "{ran:?}");

    // List, get, keepalive over REST; the same over gRPC.
    let listed = client.get("/api/v1/sandboxes?metadata[app]=node").await;
    assert_eq!(listed.json["sandboxes"][0]["id"], id, "{listed:?}");
    let got = client.get(&format!("/api/v1/sandboxes/{id}")).await;
    assert_eq!(got.json["template"], "node22", "{got:?}");
    let kept = client
        .post(
            &format!("/api/v1/sandboxes/{id}/keepalive"),
            r#"{"timeout_sec": 600}"#,
        )
        .await;
    assert_eq!(kept.status, 200, "{kept:?}");
    let over_grpc = grpc
        .get(v1::GetSandboxRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    assert_eq!(over_grpc.node_id, node_id);
    assert_eq!(over_grpc.template, "node22");
    // The keepalive's 600 s is what gRPC reports too.
    let expires = std::time::SystemTime::try_from(over_grpc.expires_at.unwrap()).unwrap();
    assert!(
        expires > std::time::SystemTime::now() + Duration::from_secs(500),
        "{over_grpc:?}"
    );
    let listed_grpc = grpc
        .list(v1::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    assert_eq!(listed_grpc.len(), 1, "{listed_grpc:?}");
    assert_eq!(listed_grpc[0].id, id);

    // Nodes and stats tell the truth.
    let nodes = client.get("/api/v1/nodes").await;
    assert_eq!(
        nodes.json["nodes"].as_array().unwrap().len(),
        2,
        "{nodes:?}"
    );
    let stats = client.get("/api/v1/stats").await;
    assert_eq!(stats.json["sandboxes_by_state"]["RUNNING"], 1, "{stats:?}");
    assert_eq!(stats.json["nodes_ready"], 2, "{stats:?}");

    let deleted = client.delete(&format!("/api/v1/sandboxes/{id}")).await;
    assert_eq!(deleted.status, 200, "{deleted:?}");
    let agent = if node_id == "node-a" {
        &agent_a
    } else {
        &agent_b
    };
    let deadline = Instant::now() + SETTLE;
    while node_ids(agent).await.contains(&id) {
        assert!(Instant::now() < deadline, "{id} still runs on {node_id}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(agent_a);
    drop(agent_b);
}
