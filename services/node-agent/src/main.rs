//! `node-agent`: runs sandboxes on one machine and serves `nanobox.node.v1.NodeAgent`
//! (plus gRPC health and reflection).
//!
//! It wires a [`nanobox_node::Node`] to its parts: the VM backend (QEMU here; Firecracker
//! on KVM hosts), the metadata database (read only: which templates are READY), and the
//! object store (template root filesystems). On start it recovers: every VM a previous run
//! left is destroyed and its sandbox reported lost.

mod grpc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use nanobox_core::TemplateName;
use nanobox_node::{Capacity, Node, NodeConfig, PoolConfig, PoolTarget};
use nanobox_node_storage::{CowMethod, CowPreference};
use nanobox_proto::node::v1::node_agent_server::NodeAgentServer;
use nanobox_store::metadata::PoolOptions;
use nanobox_store::MetadataStore;
use nanobox_vmm::qemu::{QemuBackend, QemuConfig};

#[derive(Debug, Parser)]
#[command(name = "node-agent", version, about = "NanoBox node agent")]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "NANOBOX_LISTEN", default_value = "127.0.0.1:50071")]
    listen: SocketAddr,
    /// This node's id in the cluster.
    #[arg(long, env = "NANOBOX_NODE_ID", default_value = "node-01")]
    node_id: String,
    /// Sandbox records, disks, VMM run directories and the template cache.
    #[arg(long, env = "NANOBOX_STATE_DIR")]
    state_dir: PathBuf,
    /// The guest kernel.
    #[arg(long, env = "NANOBOX_KERNEL")]
    kernel: PathBuf,
    /// The metadata database (libpq connection string or URL).
    #[arg(long, env = "NANOBOX_DATABASE_URL")]
    database_url: String,
    /// The object store: `file:///path` or `s3://bucket?endpoint=...`.
    #[arg(long, env = "NANOBOX_OBJECT_STORE")]
    object_store: String,
    /// vCPUs to hand out.
    #[arg(long, default_value_t = 64)]
    capacity_vcpus: u32,
    /// Guest memory to hand out, MiB.
    #[arg(long, default_value_t = 16384)]
    capacity_memory_mb: u64,
    /// Sandboxes at once.
    #[arg(long, default_value_t = 256)]
    max_sandboxes: u32,
    /// A sandbox's lifetime when the request gives none, seconds.
    #[arg(long, default_value_t = 300)]
    default_timeout_sec: u64,
    /// How disks are cloned: auto, reflink, qcow2 or copy.
    #[arg(long, default_value = "auto")]
    cow: String,
    /// A warm pool: `template:min_ready:max_ready[:vcpus:memory_mb]`. Repeatable.
    #[arg(long = "pool")]
    pools: Vec<String>,
    /// Seconds between pool top-ups.
    #[arg(long, default_value_t = 5)]
    replenish_interval_sec: u64,
    /// Seconds a pooled VM may stay unused before it is retired.
    #[arg(long, default_value_t = 600)]
    max_idle_sec: u64,
}

fn parse_pool(s: &str) -> anyhow::Result<PoolTarget> {
    let parts: Vec<&str> = s.split(':').collect();
    let number = |i: usize, what: &str| -> anyhow::Result<u32> {
        parts[i]
            .parse()
            .with_context(|| format!("--pool {s}: {what} {:?} is not a number", parts[i]))
    };
    anyhow::ensure!(
        parts.len() == 3 || parts.len() == 5,
        "--pool {s}: expected template:min_ready:max_ready[:vcpus:memory_mb]"
    );
    let target = PoolTarget {
        template: TemplateName::new(parts[0]).with_context(|| format!("--pool {s}"))?,
        min_ready: number(1, "min_ready")?,
        max_ready: number(2, "max_ready")?,
        vcpus: if parts.len() == 5 {
            number(3, "vcpus")?
        } else {
            1
        },
        memory_mb: if parts.len() == 5 {
            number(4, "memory_mb")?
        } else {
            nanobox_core::Resources::DEFAULT.memory_mb()
        },
    };
    anyhow::ensure!(
        target.min_ready <= target.max_ready,
        "--pool {s}: min_ready must be at most max_ready"
    );
    Ok(target)
}

fn parse_cow(s: &str) -> anyhow::Result<CowPreference> {
    Ok(match s {
        "auto" => CowPreference::Auto { qcow2: true },
        "reflink" => CowPreference::Only(CowMethod::Reflink),
        "qcow2" => CowPreference::Only(CowMethod::Qcow2),
        "copy" => CowPreference::Only(CowMethod::SparseCopy),
        other => anyhow::bail!("--cow {other:?}: expected auto, reflink, qcow2 or copy"),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let _telemetry = nanobox_telemetry::init(
        "nanobox-node-agent",
        &nanobox_telemetry::TelemetryConfig::default(),
    )
    .context("setting up telemetry")?;

    let mut config = NodeConfig::new(
        args.node_id.clone(),
        args.state_dir.clone(),
        args.kernel.clone(),
    );
    config.capacity = Capacity {
        vcpus: args.capacity_vcpus,
        memory_mb: args.capacity_memory_mb,
        max_sandboxes: args.max_sandboxes,
    };
    config.default_timeout = Duration::from_secs(args.default_timeout_sec);
    config.cow = parse_cow(&args.cow)?;
    config.pool = PoolConfig {
        replenish_interval: Duration::from_secs(args.replenish_interval_sec.max(1)),
        max_idle: Duration::from_secs(args.max_idle_sec),
        targets: args
            .pools
            .iter()
            .map(|p| parse_pool(p))
            .collect::<anyhow::Result<_>>()?,
    };
    anyhow::ensure!(
        config.kernel.is_file(),
        "--kernel {} does not exist",
        config.kernel.display()
    );

    let db: tokio_postgres::Config = args
        .database_url
        .parse()
        .context("--database-url is not a valid Postgres connection string")?;
    let meta = MetadataStore::open(db, PoolOptions::default())
        .await
        .context("opening the metadata database")?;
    let objects =
        nanobox_store::open_object_store(&args.object_store).context("opening the object store")?;
    let qemu = QemuConfig {
        accel_cache: Some(nanobox_core::cache_dir().join("accel-probe")),
        ..QemuConfig::default()
    };
    let backend = Arc::new(QemuBackend::new(qemu));

    let node = Node::start(config, backend, meta, objects)
        .await
        .context("starting the node")?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<NodeAgentServer<grpc::NodeAgentService>>()
        .await;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr().context("reading the bound address")?;
    tracing::info!(address = %local, node = %args.node_id, "node-agent serving");
    println!("listening on {local}");

    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(nanobox_proto::reflection_service().context("building reflection")?)
        .add_service(nanobox_proto::reflection_service_v1alpha().context("building reflection")?)
        .add_service(NodeAgentServer::new(grpc::NodeAgentService::new(
            node.clone(),
        )))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown(),
        )
        .await
        .context("serving gRPC")?;
    node.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}
