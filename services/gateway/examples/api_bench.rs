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

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nanobox_core::{ImageConfig, TemplateName, TemplateState};
use nanobox_proto::v1;
use nanobox_proto::v1::sandboxes_client::SandboxesClient;
use nanobox_store::metadata::TemplateRecord;
use nanobox_store::rootfs::{rootfs_keys, RootfsInfo};
use nanobox_store::{LocalFsStore, MetadataStore, ObjectStore};
use nanobox_testkit::postgres::Postgres;
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

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child process, killed on drop (SIGTERM first so a node agent destroys its VMs).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `bin --config <config>` and reads its `listening on <addr>` line.
fn spawn(bin: &str, config: &Path) -> (Proc, String) {
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .env_remove("NANOBOX_CONFIG")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {bin}: {e}"));
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{bin} did not start: {line:?}"))
        .to_owned();
    (Proc(child), addr)
}

/// Publishes `rootfs` as a READY template, the way the template-builder does.
async fn publish(meta: &MetadataStore, objects_dir: &Path, rootfs: &Path) {
    let objects = LocalFsStore::open(objects_dir).unwrap();
    let data = std::fs::read(rootfs).unwrap();
    let digest = format!("sha256:{}", nanobox_store::sha256_hex(&data));
    let keys = rootfs_keys(&digest, "bench").unwrap();
    let stored = objects.put_file(&keys.ext4, rootfs).await.unwrap();
    let info = RootfsInfo {
        manifest_digest: digest.clone(),
        init_version: "bench".into(),
        size_bytes: stored.size,
        sha256: stored.sha256.clone().unwrap(),
        config: ImageConfig::default(),
    };
    objects
        .put_bytes(&keys.info, serde_json::to_vec(&info).unwrap().into())
        .await
        .unwrap();
    meta.upsert_template(&TemplateRecord {
        name: TemplateName::new(TEMPLATE).unwrap(),
        image_ref: "bench/busybox".into(),
        manifest_digest: Some(digest),
        rootfs_key: Some(keys.ext4.to_string()),
        size_bytes: Some(stored.size),
        image_config: ImageConfig::default(),
        state: TemplateState::Ready,
    })
    .await
    .unwrap();
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
    publish(&meta, &work.join("objects"), Path::new(rootfs)).await;
    let common = format!(
        r#"
[database]
url = "host={socket} user=postgres dbname={dbname}"

[object_store]
location = "file://{objects}"

[scheduler]
heartbeat_interval_ms = 300
node_lost_after_sec = 10

[auth]
service_token = "{TOKEN}"
"#,
        socket = pg.socket_dir().display(),
        dbname = db.get_dbname().unwrap(),
        objects = work.join("objects").display(),
    );

    let scheduler_config = work.join("scheduler.toml");
    std::fs::write(
        &scheduler_config,
        format!("[api]\ngrpc_addr = \"127.0.0.1:0\"\n{common}"),
    )
    .unwrap();
    let (_scheduler, scheduler_addr) = spawn(scheduler_bin, &scheduler_config);

    // The node's "host" namespace, private to the benchmark, with a veth kept inside it
    // as the host interface.
    let host_ns = format!("nba{:08x}-host", std::process::id());
    sh(&["ip", "netns", "add", &host_ns]);
    let _ns = NetnsGuard(host_ns.clone());
    sh(&[
        "ip", "-n", &host_ns, "link", "add", "wan0", "type", "veth", "peer", "name", "wan1",
    ]);
    sh(&["ip", "-n", &host_ns, "link", "set", "wan0", "up"]);
    let agent_config = work.join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            r#"
[agent]
node_id = "bench"
listen_addr = "127.0.0.1:0"
scheduler_addr = "{scheduler_addr}"
state_dir = "{state}"
capacity_vcpus = 64
capacity_memory_mb = 16384
[qemu]
kernel = "{kernel}"
[network]
bridge_name = "nbxbr0"
subnet = "10.100.0.0/16"
host_iface = "wan0"
dns_server = "10.100.0.1"
host_netns = "{host_ns}"
netns_prefix = "{host_ns}-s-"
{common}
[pool]
replenish_interval_sec = 1
max_idle_sec = 3600
[[pool.templates]]
name = "{TEMPLATE}"
min_ready = {POOL}
max_ready = {POOL}
vcpus = 1
memory_mb = 128
"#,
            state = work.join("state").display(),
        ),
    )
    .unwrap();
    let agent = spawn(agent_bin, &agent_config).0;

    let gateway_config = work.join("gateway.toml");
    std::fs::write(
        &gateway_config,
        format!(
            "[api]\nlisten_addr = \"127.0.0.1:0\"\napi_keys = [\"{KEY}\"]\nrequest_timeout_sec = 120\n\n\
             [agent]\nscheduler_addr = \"{scheduler_addr}\"\n"
        ),
    )
    .unwrap();
    let (gateway, gateway_addr) = spawn(gateway_bin, &gateway_config);

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

/// Deletes the benchmark's network namespaces (the host one and every sandbox one).
struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.0) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
        }
    }
}
