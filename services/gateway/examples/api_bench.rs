//! Public API measurements for `cargo xtask bench api`: the whole stack with release
//! binaries (Postgres, the scheduler, one node agent booting real guests in a private
//! network namespace, the REST gateway), driven over HTTP like a user would.
//!
//! `api_bench <scheduler> <node-agent> <gateway> <kernel> <rootfs> <work dir>` prints one
//! JSON object with raw samples:
//! - `pool_create_ms_c1`: creates served by the warm pool, one client, through REST;
//! - `pool_create_ms_c20` and `wave_s_c20`: waves of 20 concurrent creates (the pool full
//!   before each wave), every create's latency and each wave's wall time;
//! - `exec_rtt_ms`: REST exec of `true` (aggregated answer) in running sandboxes;
//! - `rest_get_ms` and `grpc_get_ms`: the same sandbox fetched through the gateway and
//!   straight from the scheduler's gRPC `Get`, alternating.
//!
//! The template is the test rootfs published as READY directly (no template-builder).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nanobox_proto::v1;
use nanobox_proto::v1::sandboxes_client::SandboxesClient;
use nanobox_store::{LocalFsStore, MetadataStore};
use nanobox_testkit::config::{cluster_sections, pool_sections, storage_sections, AgentConfig};
use nanobox_testkit::netns::NodeNet;
use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::process::{service_command, Process};
use nanobox_testkit::template::publish_template;
use serde_json::Value;

const TEMPLATE: &str = "bench";
const KEY: &str = "bench-key-0123456789abcdef";
const TOKEN: &str = "bench-service-token-0123456789";
/// Warm pool size: room for a wave of 20 concurrent creates.
const POOL: u32 = 24;
const C1_CREATES: usize = 20;
const WAVE: usize = 20;
const WAVES: usize = 3;
const EXECS: usize = 100;
const GETS: usize = 200;
/// Hang guard for the pool to fill.
const POOL_FILL: Duration = Duration::from_secs(900);

/// How long a service may take to stop in order (a node agent destroys its VMs) before it
/// is killed.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// Starts `bin --config <config>` and waits for its address; stopped in order on drop.
fn spawn(name: &str, bin: &str, config: &Path) -> Process {
    Process::spawn(name, service_command(bin, config).env("RUST_LOG", "warn"))
        .stop_on_drop(STOP_GRACE)
}

#[derive(Clone)]
struct Rest {
    http: reqwest::Client,
    base: String,
}

impl Rest {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&str>) -> Value {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(KEY);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn create(&self) -> (f64, String) {
        let started = Instant::now();
        let created = self
            .call(
                reqwest::Method::POST,
                "/api/v1/sandboxes",
                Some(&format!(
                    r#"{{"template": "{TEMPLATE}", "resources": {{"vcpu": 1, "memory_mb": 128}}}}"#
                )),
            )
            .await;
        let took = ms(started.elapsed());
        (took, created["id"].as_str().unwrap().to_owned())
    }

    async fn delete(&self, id: &str) {
        self.call(
            reqwest::Method::DELETE,
            &format!("/api/v1/sandboxes/{id}"),
            None,
        )
        .await;
    }

    async fn ready_pool(&self) -> u64 {
        let nodes = self.call(reqwest::Method::GET, "/api/v1/nodes", None).await;
        nodes["nodes"][0]["ready_pool"][TEMPLATE]
            .as_u64()
            .unwrap_or(0)
    }

    /// Waits until the node reports a full pool.
    async fn wait_pool_full(&self) {
        let deadline = Instant::now() + POOL_FILL;
        while self.ready_pool().await < u64::from(POOL) {
            assert!(Instant::now() < deadline, "the warm pool never filled");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, scheduler_bin, agent_bin, gateway_bin, kernel, rootfs, work] = args.as_slice() else {
        panic!("usage: api_bench <scheduler> <node-agent> <gateway> <kernel> <rootfs> <work dir>");
    };
    let work = PathBuf::from(work);
    std::fs::create_dir_all(&work).unwrap();
    let pg = Postgres::start().await;
    let db = pg.create_database().await;
    let meta = MetadataStore::open(db.clone(), Default::default())
        .await
        .unwrap();
    let objects = LocalFsStore::open(work.join("objects")).unwrap();
    publish_template(&meta, &objects, TEMPLATE, Path::new(rootfs)).await;
    let common = format!(
        "{}\n{}",
        storage_sections(&pg, &db, &work.join("objects")),
        cluster_sections(TOKEN, 10)
    );

    let scheduler_config = work.join("scheduler.toml");
    std::fs::write(
        &scheduler_config,
        format!("[api]\ngrpc_addr = \"127.0.0.1:0\"\n{common}"),
    )
    .unwrap();
    let scheduler = spawn("scheduler", scheduler_bin, &scheduler_config);
    let scheduler_addr = scheduler.addr.clone();

    // The node's "host" namespace, private to the benchmark, with a veth kept inside it
    // as the host interface. Removed last, with every sandbox namespace.
    let net = NodeNet::isolated("nba");
    let agent_config = work.join("agent.toml");
    let text = AgentConfig {
        node_id: "bench",
        scheduler_addr: Some(&scheduler_addr),
        state_dir: &work.join("state"),
        capacity_vcpus: 64,
        capacity_memory_mb: 16384,
        run_as_user: None,
        kernel: Path::new(kernel),
        rest: &format!("{common}\n{}", pool_sections(TEMPLATE, POOL, 3600)),
    }
    .to_toml(&net);
    std::fs::write(&agent_config, text).unwrap();
    let agent = spawn("node-agent", agent_bin, &agent_config);

    let gateway_config = work.join("gateway.toml");
    std::fs::write(
        &gateway_config,
        format!(
            "[api]\nlisten_addr = \"127.0.0.1:0\"\napi_keys = [\"{KEY}\"]\nrequest_timeout_sec = 120\n\n\
             [agent]\nscheduler_addr = \"{scheduler_addr}\"\n"
        ),
    )
    .unwrap();
    let gateway = spawn("gateway", gateway_bin, &gateway_config);
    let gateway_addr = gateway.addr.clone();

    let rest = Rest {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap(),
        base: format!("http://{gateway_addr}"),
    };
    let mut grpc = SandboxesClient::connect(format!("http://{scheduler_addr}"))
        .await
        .unwrap();

    eprint!("booting the pool ({POOL} VMs)");
    let started = Instant::now();
    rest.wait_pool_full().await;
    eprintln!(" {:.1} s", started.elapsed().as_secs_f64());

    // One client: creates in a row, each from the full-ish pool.
    let mut c1 = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..C1_CREATES {
        let (took, id) = rest.create().await;
        c1.push(took);
        ids.push(id);
    }
    eprintln!("c1 creates done; waiting for the pool to refill");
    rest.wait_pool_full().await;

    // Exec round trips, round robin over the running sandboxes.
    let mut exec = Vec::new();
    for i in 0..EXECS {
        let path = format!("/api/v1/sandboxes/{}/exec", ids[i % ids.len()]);
        let started = Instant::now();
        let ran = rest
            .call(reqwest::Method::POST, &path, Some(r#"{"command": "true"}"#))
            .await;
        exec.push(ms(started.elapsed()));
        assert_eq!(ran["exit_code"], 0, "{ran}");
    }

    // REST get against direct gRPC Get of the same sandbox, alternating.
    let mut rest_get = Vec::new();
    let mut grpc_get = Vec::new();
    let id = ids[0].clone();
    let path = format!("/api/v1/sandboxes/{id}");
    for i in 0..GETS {
        let rest_round = async || {
            let started = Instant::now();
            let got = rest.call(reqwest::Method::GET, &path, None).await;
            assert_eq!(got["id"], id.as_str());
            ms(started.elapsed())
        };
        let mut grpc_round = async || {
            let started = Instant::now();
            let got = grpc
                .get(v1::GetSandboxRequest { id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(got.sandbox.unwrap().id, id);
            ms(started.elapsed())
        };
        if i % 2 == 0 {
            rest_get.push(rest_round().await);
            grpc_get.push(grpc_round().await);
        } else {
            grpc_get.push(grpc_round().await);
            rest_get.push(rest_round().await);
        }
    }
    for id in ids.drain(..) {
        rest.delete(&id).await;
    }
    eprintln!("exec and get done");

    // Waves of 20 concurrent creates, each against a full pool.
    let mut c20 = Vec::new();
    let mut waves = Vec::new();
    for wave in 0..WAVES {
        rest.wait_pool_full().await;
        let started = Instant::now();
        let tasks: Vec<_> = (0..WAVE)
            .map(|_| {
                let rest = rest.clone();
                tokio::spawn(async move { rest.create().await })
            })
            .collect();
        let mut wave_ids = Vec::new();
        for task in tasks {
            let (took, id) = task.await.unwrap();
            c20.push(took);
            wave_ids.push(id);
        }
        waves.push(started.elapsed().as_secs_f64());
        for id in &wave_ids {
            rest.delete(id).await;
        }
        eprintln!("wave {} done", wave + 1);
    }

    drop(gateway);
    drop(agent);
    drop(grpc);

    println!(
        "{}",
        serde_json::json!({
            "pool_create_ms_c1": c1,
            "pool_create_ms_c20": c20,
            "wave_s_c20": waves,
            "wave_size": WAVE,
            "exec_rtt_ms": exec,
            "rest_get_ms": rest_get,
            "grpc_get_ms": grpc_get,
        })
    );
}
