//! `node-agent`: runs sandboxes on one machine and serves `nanobox.node.v1.NodeAgent`
//! (plus gRPC health and reflection), and with `[agent].metrics_addr` set, Prometheus
//! metrics (`/metrics`: creates, boots, pools, execs, capacity, gRPC calls).
//!
//! It wires a [`nanobox_node::Node`] to its parts: the VM backend (QEMU here; Firecracker
//! on KVM hosts), the metadata database (it only reads which templates are READY, but it
//! opens the database as every service does, applying pending migrations, so its
//! credentials must be able to write; issue 11 takes the node agents off the database),
//! and the object store (template root filesystems). On start it recovers: every VM a
//! previous run left is destroyed and its sandbox reported lost; paused sandboxes are kept
//! (issue 11 makes a restart keep running ones too).

mod grpc;
mod registration;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use nanobox_config::{Config, CowMode, Vmm};
use nanobox_node::{Capacity, Node, NodeConfig, PoolConfig, PoolTarget};
use nanobox_node_storage::{CowMethod, CowPreference};
use nanobox_proto::node::v1::node_agent_server::NodeAgentServer;
use nanobox_store::metadata::PoolOptions;
use nanobox_store::MetadataStore;
use nanobox_vmm::firecracker::{FirecrackerBackend, FirecrackerConfig, JailerConfig};
use nanobox_vmm::qemu::{QemuBackend, QemuConfig};
use nanobox_vmm::VmBackend;

#[derive(Debug, Parser)]
#[command(name = "nanobox-node-agent", version, about = "NanoBox node agent")]
struct Args {
    /// The configuration file (`nanobox.toml`). Default: `$NANOBOX_CONFIG`, else
    /// `/etc/nanobox/nanobox.toml` if it exists, else the built-in defaults. Every key can
    /// be overridden by `NANOBOX__<SECTION>__<KEY>` variables.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// How long the agent waits at start for a control-plane service to migrate a database
/// that is not migrated yet.
const SCHEMA_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

fn cow(mode: CowMode) -> CowPreference {
    match mode {
        CowMode::Auto => CowPreference::Auto { qcow2: true },
        CowMode::Reflink => CowPreference::Only(CowMethod::Reflink),
        CowMode::Qcow2 => CowPreference::Only(CowMethod::Qcow2),
        CowMode::Copy => CowPreference::Only(CowMethod::SparseCopy),
    }
}

fn v4_cidr(key: &str, addr: IpAddr, prefix: u8) -> anyhow::Result<nanobox_net::Ipv4Cidr> {
    match addr {
        IpAddr::V4(v4) => nanobox_net::Ipv4Cidr::new(v4, prefix)
            .with_context(|| format!("{key}: {addr}/{prefix}")),
        IpAddr::V6(_) => anyhow::bail!("{key}: {addr}/{prefix}: sandbox networking is IPv4 only"),
    }
}

/// The interface of the default route in this namespace (`/proc/net/route`).
fn default_route_iface() -> Option<String> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    routes.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&"00000000") && fields.get(7) == Some(&"00000000"))
            .then(|| fields[0].to_owned())
    })
}

fn network_config(config: &Config) -> anyhow::Result<nanobox_net::NodeNetworkConfig> {
    let net = &config.network;
    let host_iface = match &net.host_iface {
        Some(iface) => iface.clone(),
        None => default_route_iface().context(
            "[network].host_iface is not set and this namespace has no default route to take it from",
        )?,
    };
    let dns_server = match config.dns_server() {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => {
            anyhow::bail!("[network].dns_server {v6}: sandbox networking is IPv4 only")
        }
    };
    let internal_services = net
        .internal_services
        .iter()
        .map(|c| v4_cidr("[network].internal_services", c.network(), c.prefix()))
        .collect::<anyhow::Result<_>>()?;
    let host_netns = net.host_netns.as_ref().map(|ns| {
        if ns.contains('/') {
            PathBuf::from(ns)
        } else {
            nanobox_net::netns::path(ns)
        }
    });
    Ok(nanobox_net::NodeNetworkConfig {
        bridge_name: net.bridge_name.clone(),
        subnet: v4_cidr(
            "[network].subnet",
            IpAddr::V4(net.subnet.network()),
            net.subnet.prefix(),
        )?,
        host_iface,
        dns_server,
        internal_services,
        host_netns,
        netns_prefix: net.netns_prefix.clone(),
        state_dir: config.agent.state_dir.join("net"),
        rate_limiter: nanobox_net::RateLimiter::Tc,
    })
}

fn node_config(config: &Config) -> anyhow::Result<NodeConfig> {
    let agent = &config.agent;
    let mut node = NodeConfig::new(
        agent.node_id.clone(),
        agent.state_dir.clone(),
        config.qemu_kernel().to_owned(),
    );
    let capacity = agent.capacity();
    node.capacity = Capacity {
        vcpus: capacity.vcpus,
        memory_mb: capacity.memory_mb,
        max_sandboxes: agent.max_sandboxes,
    };
    node.default_timeout = Duration::from_secs(agent.default_timeout_sec);
    node.max_timeout = Duration::from_secs(agent.max_timeout_sec);
    node.cow = cow(agent.cow);
    // A sandbox's writable space is the free space its template was built with
    // (`[builder].rootfs_headroom_mb`): clones are not grown, so qcow2 overlays stay
    // possible. (`[agent].disk_headroom_mb` is host disk space to keep free.)
    node.disk_headroom_bytes = 0;
    node.template_cache_bytes = agent.template_cache_bytes;
    node.cgroup_parent = agent.cgroup_parent.clone();
    node.pool = PoolConfig {
        replenish_interval: Duration::from_secs(config.pool.replenish_interval_sec.max(1)),
        max_idle: Duration::from_secs(config.pool.max_idle_sec),
        max_parallel_boots: match config.pool.max_parallel_boots {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).max(1)),
            n => n as usize,
        },
        targets: config
            .pool
            .templates
            .iter()
            .map(|t| PoolTarget {
                template: t.name.clone(),
                min_ready: t.min_ready,
                max_ready: t.max_ready,
                vcpus: t.vcpus.unwrap_or(nanobox_core::Resources::DEFAULT.vcpu()),
                memory_mb: t
                    .memory_mb
                    .unwrap_or(nanobox_core::Resources::DEFAULT.memory_mb()),
                network_mode: nanobox_core::NetworkMode::Isolated,
            })
            .collect(),
    };
    node.network = Some(network_config(config)?);
    node.default_rate_limit = config
        .network
        .default_rate_limit_mbps
        .map(|mbps| mbps * 1_000_000 / 8);
    anyhow::ensure!(
        node.kernel.is_file(),
        "the guest kernel {} does not exist ([qemu].kernel or [firecracker].kernel)",
        node.kernel.display()
    );
    Ok(node)
}

/// The VM backend `[agent].vmm` asks for: Firecracker where it can run (KVM and the
/// binary present; `auto` checks with a probe boot and falls back to QEMU, saying why),
/// else QEMU. Firecracker opens only raw disks and enforces rate limits itself, so the
/// node's clone and rate-limit settings follow the choice.
async fn choose_backend(
    config: &Config,
    mut node: NodeConfig,
) -> anyhow::Result<(Arc<dyn VmBackend>, NodeConfig)> {
    let fc = &config.firecracker;
    let firecracker = FirecrackerBackend::new(FirecrackerConfig {
        binary: config.agent.firecracker_bin.clone(),
        jailer: fc.jailer_bin.as_ref().map(|binary| JailerConfig {
            binary: binary.clone(),
            chroot_base: fc.chroot_base_dir.clone(),
            ..JailerConfig::new(fc.uid.unwrap_or(65534), fc.gid.unwrap_or(65534))
        }),
        boot_args: match &fc.boot_args {
            Some(args) => args.split_whitespace().map(str::to_owned).collect(),
            None => FirecrackerConfig::default().boot_args,
        },
        ..FirecrackerConfig::default()
    });
    let use_firecracker = match config.agent.vmm {
        Vmm::Qemu => false,
        Vmm::Firecracker => {
            firecracker
                .availability(Some(&node.kernel))
                .await
                .map_err(|why| anyhow::anyhow!("[agent].vmm = \"firecracker\": {why}"))?;
            true
        }
        Vmm::Auto => match firecracker.availability(Some(&node.kernel)).await {
            Ok(()) => true,
            Err(why) => {
                tracing::info!(reason = %why, "Firecracker is not usable here; using QEMU");
                false
            }
        },
    };
    if use_firecracker {
        if let CowPreference::Auto { .. } = node.cow {
            node.cow = CowPreference::Auto { qcow2: false };
        }
        if let Some(net) = &mut node.network {
            net.rate_limiter = nanobox_net::RateLimiter::Vmm;
        }
        tracing::info!("VM backend: Firecracker");
        return Ok((Arc::new(firecracker), node));
    }
    let qemu = QemuConfig {
        binary: config.qemu.binary.clone(),
        seccomp: config.qemu.seccomp_sandbox,
        run_as: config.agent.run_as_user.clone(),
        accel_cache: Some(nanobox_core::cache_dir().join("accel-probe")),
        ..QemuConfig::default()
    };
    tracing::info!("VM backend: QEMU");
    Ok((Arc::new(QemuBackend::new(qemu)), node))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(args.config.as_deref()).context("reading the configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let _telemetry = nanobox_telemetry::init("nanobox-node-agent", &config.telemetry)
        .context("setting up telemetry")?;
    // Before the node starts, so its first numbers are recorded.
    let metrics_endpoint =
        nanobox_telemetry::metrics::serve(config.agent.metrics_addr, "nanobox-node-agent")
            .await
            .context("serving metrics ([agent].metrics_addr)")?;
    nanobox_node::metrics::describe();
    let node_config = node_config(&config)?;

    let db: tokio_postgres::Config = config
        .database
        .url
        .expose()
        .parse()
        .context("[database].url is not a valid Postgres connection string")?;
    // Read-only: the agent only reads which templates are READY, applies no migrations,
    // and needs no rights to write (MetadataStore::open_read_only). Started beside a new
    // control plane, it waits a while for the scheduler or the template-builder to
    // migrate a fresh database instead of failing at once.
    let waited_since = std::time::Instant::now();
    let meta = loop {
        match MetadataStore::open_read_only(db.clone(), PoolOptions::default()).await {
            Err(e @ nanobox_store::MetadataError::SchemaTooOld { .. })
                if waited_since.elapsed() < SCHEMA_WAIT =>
            {
                tracing::warn!(error = %e, "waiting for the database schema");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            other => break other.context("opening the metadata database (read-only)")?,
        }
    };
    let objects = nanobox_store::open_object_store(&config.object_store.location)
        .context("opening the object store")?;
    let (backend, node_config) = choose_backend(&config, node_config).await?;

    let node = Node::start(node_config, backend, meta, objects)
        .await
        .context("starting the node")?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<NodeAgentServer<grpc::NodeAgentService>>()
        .await;
    let listen = config.agent.listen_addr;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen} ([agent].listen_addr)"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    tracing::info!(address = %local, node = %config.agent.node_id, "node-agent serving");
    // Lines for supervisors and tests that asked for port 0.
    println!("listening on {local}");
    if let Some(endpoint) = &metrics_endpoint {
        println!("metrics on {}", endpoint.local_addr());
    }
    let token = config
        .auth
        .load_service_token()
        .context("reading the [auth] service token")?;
    let token = token.as_ref().map(|t| t.expose());
    if let Some(scheduler) = &config.agent.scheduler_addr {
        let advertise = config
            .agent
            .advertise_addr
            .clone()
            .unwrap_or_else(|| local.to_string());
        registration::spawn(node.clone(), scheduler, advertise, token)
            .map_err(anyhow::Error::msg)?;
    }

    tonic::transport::Server::builder()
        .layer(nanobox_telemetry::grpc::GrpcServerLayer)
        .add_service(health_service)
        .add_service(
            nanobox_proto::reflection(&["nanobox.node.v1.NodeAgent"])
                .build_v1()
                .context("building reflection")?,
        )
        .add_service(
            nanobox_proto::reflection(&["nanobox.node.v1.NodeAgent"])
                .build_v1alpha()
                .context("building reflection")?,
        )
        .add_service(NodeAgentServer::with_interceptor(
            grpc::NodeAgentService::new(node.clone()),
            nanobox_scheduler::auth::ServerAuth::new(token),
        ))
        .serve_with_incoming_shutdown(
            nanobox_proto::incoming(listener),
            nanobox_telemetry::shutdown_signal(),
        )
        .await
        .context("serving gRPC")?;
    node.shutdown().await;
    Ok(())
}
