//! Node agent measurements for `cargo xtask bench node`, through the agent's gRPC API
//! against a release-built agent with real guests.
//!
//! `node_bench <node-agent> <boot_bench> <kernel> <rootfs> <work dir>` prints one JSON
//! object with raw samples:
//! - `pool_create_ms`: 50 creates served by the warm pool (concurrency 1), and
//!   `destroy_ms` for destroying each;
//! - `cold_create_ms` (create with no pool VM to take, until the first exec's result) and,
//!   alternating with it, `bare_boot_ms` (`boot_bench bare`: QEMU with the same kernel and
//!   rootfs until the init's READY marker);
//! - `idle_pss_mib`: the PSS of each VMM with 10 idle cold-booted 128 MiB sandboxes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nanobox_proto::node::v1 as node;
use nanobox_proto::node::v1::node_agent_client::NodeAgentClient;
use nanobox_proto::v1;
use nanobox_store::{LocalFsStore, MetadataStore};
use nanobox_testkit::config::{pool_sections, storage_sections, AgentConfig};
use nanobox_testkit::netns::NodeNet;
use nanobox_testkit::postgres::Postgres;
use nanobox_testkit::process::{service_command, Process};
use nanobox_testkit::template::publish_template;
use tonic::transport::Channel;

const POOL_CREATES: usize = 50;
const COLD_ROUNDS: usize = 5;
const IDLE_SANDBOXES: usize = 10;
const TEMPLATE: &str = "bench";

fn request(memory_mb: u32) -> node::CreateSandboxRequest {
    node::CreateSandboxRequest {
        template: TEMPLATE.into(),
        resources: Some(v1::Resources {
            vcpu: 1,
            memory_mb,
            disk_mb: 0,
        }),
        ..Default::default()
    }
}

async fn pool_ready(client: &mut NodeAgentClient<Channel>) -> u32 {
    let status = client
        .get_node_status(node::GetNodeStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    status.pools.first().map_or(0, |p| p.ready)
}

async fn exec_true(client: &mut NodeAgentClient<Channel>, id: &str) {
    let mut stream = client
        .exec(v1::ExecRequest {
            id: id.into(),
            command: "true".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(event) = stream.message().await.unwrap() {
        if let Some(v1::exec_event::Event::Exit(x)) = event.event {
            assert_eq!(x.exit_code, 0);
        }
    }
}

async fn destroy(client: &mut NodeAgentClient<Channel>, id: &str) {
    client
        .destroy_sandbox(node::DestroySandboxRequest {
            sandbox_id: id.into(),
        })
        .await
        .unwrap();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pss_mib(pid: u32) -> f64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let kib: f64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, agent_bin, boot_bench, kernel, rootfs, work] = args.as_slice() else {
        panic!("usage: node_bench <node-agent> <boot_bench> <kernel> <rootfs> <work dir>");
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

    // The node's "host" namespace, private to the benchmark; its host interface leads
    // nowhere (the benchmark's sandboxes are isolated). Removed on drop, with every
    // sandbox namespace the agent made.
    let net = NodeNet::isolated("nbb");
    let config = AgentConfig {
        node_id: "bench",
        scheduler_addr: None,
        state_dir: &work.join("state"),
        capacity_vcpus: 64,
        capacity_memory_mb: 16384,
        run_as_user: None,
        kernel: Path::new(kernel),
        rest: &format!(
            "{}\n{}",
            storage_sections(&pg, &db, &work.join("objects")),
            pool_sections(TEMPLATE, 2, 3600)
        ),
    }
    .to_toml(&net);
    let config_path = work.join("nanobox.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut agent = Process::spawn(
        "node-agent",
        service_command(agent_bin, &config_path).env("RUST_LOG", "warn"),
    );
    let mut client = NodeAgentClient::connect(format!("http://{}", agent.addr))
        .await
        .unwrap();

    // Warm pool creates at concurrency 1, each destroyed again.
    let mut pool_create = Vec::new();
    let mut destroys = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(1800);
    while pool_create.len() < POOL_CREATES {
        while pool_ready(&mut client).await == 0 {
            assert!(Instant::now() < deadline, "the pool never refilled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = Instant::now();
        let created = client
            .create_sandbox(request(128))
            .await
            .unwrap()
            .into_inner();
        let took = started.elapsed();
        let id = created.sandbox.unwrap().id;
        if created.from_pool {
            pool_create.push(ms(took));
        }
        exec_true(&mut client, &id).await;
        let started = Instant::now();
        destroy(&mut client, &id).await;
        destroys.push(ms(started.elapsed()));
        eprint!(".");
    }
    eprintln!();

    // Cold create to first exec result, alternating with a bare boot of the same guest.
    let mut cold = Vec::new();
    let mut bare = Vec::new();
    for round in 0..COLD_ROUNDS {
        let mut cold_round = async |client: &mut NodeAgentClient<Channel>| {
            let started = Instant::now();
            // 192 MiB: no pooled VM has that size, so this boots.
            let created = client
                .create_sandbox(request(192))
                .await
                .unwrap()
                .into_inner();
            assert!(!created.from_pool);
            let id = created.sandbox.unwrap().id;
            exec_true(client, &id).await;
            cold.push(ms(started.elapsed()));
            destroy(client, &id).await;
        };
        let bare_round = || -> f64 {
            let out = Command::new(boot_bench)
                .args(["bare", kernel, rootfs])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        if round % 2 == 0 {
            cold_round(&mut client).await;
            bare.push(bare_round());
        } else {
            bare.push(bare_round());
            cold_round(&mut client).await;
        }
        eprint!(".");
    }
    eprintln!();

    // Idle memory: 10 cold-booted 128 MiB sandboxes, left alone for a while.
    let mut ids = Vec::new();
    for _ in 0..IDLE_SANDBOXES {
        // Pooled VMs are cold-booted too (ahead of time); either kind counts.
        let created = client
            .create_sandbox(request(128))
            .await
            .unwrap()
            .into_inner();
        ids.push(created.sandbox.unwrap().id);
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut pss = Vec::new();
    for entry in std::fs::read_dir(work.join("state/vms")).unwrap().flatten() {
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
        if record["sandbox_id"].is_string() {
            pss.push(pss_mib(record["pid"].as_u64().unwrap() as u32));
        }
    }
    // Pause each idle sandbox into a snapshot and resume it, timing both calls; a
    // resumed sandbox answers an exec before it counts.
    let mut pause = Vec::new();
    let mut resume = Vec::new();
    let mut snapshot_mib = Vec::new();
    for id in &ids {
        let started = Instant::now();
        let paused = client
            .pause_sandbox(node::PauseSandboxRequest {
                sandbox_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pause.push(ms(started.elapsed()));
        snapshot_mib.push(paused.size_bytes as f64 / f64::from(1 << 20));
        let started = Instant::now();
        client
            .resume_sandbox(node::ResumeSandboxRequest {
                sandbox_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        exec_true(&mut client, id).await;
        resume.push(ms(started.elapsed()));
    }
    for id in &ids {
        destroy(&mut client, id).await;
    }
    agent.terminate();
    drop(net);

    println!(
        "{}",
        serde_json::json!({
            "pool_create_ms": pool_create,
            "destroy_ms": destroys,
            "cold_create_ms": cold,
            "bare_boot_ms": bare,
            "idle_pss_mib": pss,
            "pause_ms": pause,
            "resume_ms": resume,
            "snapshot_mib": snapshot_mib,
        })
    );
}
