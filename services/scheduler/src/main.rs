//! `scheduler`: the NanoBox control plane. Serves the public `nanobox.v1.Sandboxes` and
//! `nanobox.v1.Cluster` APIs and the internal `nanobox.node.v1.NodeRegistry` (node agents
//! register and heartbeat), plus gRPC health and reflection, on `[api].grpc_addr`. The
//! public APIs require a bearer API key from `[api].api_keys` (open when none is
//! configured); `NodeRegistry` requires the service token.
//!
//! With `[scheduler].metrics_addr` set it serves Prometheus metrics there (`/metrics`):
//! gRPC calls, recorded sandboxes by state, each node's capacity and allocation.
//!
//! Sandboxes are recorded in Postgres with their desired and observed state; a reconcile
//! loop marks silent nodes and their sandboxes LOST, deletes sandboxes past their deadline
//! and retries deletes that did not reach their node, so a restart loses nothing.

mod error;
mod grpc;
mod metrics;
mod nodes;
mod scheduler;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use nanobox_config::Config;
use nanobox_proto::node::v1::node_registry_server::NodeRegistryServer;
use nanobox_proto::v1::cluster_server::ClusterServer;
use nanobox_proto::v1::sandboxes_server::SandboxesServer;
use nanobox_scheduler::auth::{ApiKeys, ClientAuth, ServerAuth};
use nanobox_store::metadata::PoolOptions;
use nanobox_store::MetadataStore;

#[derive(Debug, Parser)]
#[command(name = "nanobox-scheduler", version, about = "NanoBox scheduler")]
struct Args {
    /// The configuration file (`nanobox.toml`). Default: `$NANOBOX_CONFIG`, else
    /// `/etc/nanobox/nanobox.toml` if it exists, else the built-in defaults. Every key can
    /// be overridden by `NANOBOX__<SECTION>__<KEY>` variables.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// A create waits this long for its node at least (a cold boot under TCG on a busy host
/// takes tens of seconds).
const MIN_CREATE_DEADLINE: Duration = Duration::from_secs(180);

/// The NanoBox services this process serves: what reflection lists (with health and
/// reflection themselves).
const SERVED: [&str; 3] = [
    "nanobox.v1.Sandboxes",
    "nanobox.v1.Cluster",
    "nanobox.node.v1.NodeRegistry",
];

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
    let _telemetry = nanobox_telemetry::init("nanobox-scheduler", &config.telemetry)
        .context("setting up telemetry")?;
    let metrics_endpoint =
        nanobox_telemetry::metrics::serve(config.scheduler.metrics_addr, "nanobox-scheduler")
            .await
            .context("serving metrics ([scheduler].metrics_addr)")?;
    metrics::describe();
    let db: tokio_postgres::Config = config
        .database
        .url
        .expose()
        .parse()
        .context("[database].url is not a valid Postgres connection string")?;
    let meta = MetadataStore::open(db, PoolOptions::default())
        .await
        .context("opening the metadata database")?;
    let token = config
        .auth
        .load_service_token()
        .context("reading [auth] service token")?;
    let token = token.as_ref().map(|t| t.expose());
    let client_auth = ClientAuth::new(token).context("[auth] service token")?;
    let server_auth = ServerAuth::new(token);
    let api_keys = ApiKeys::new(
        config
            .api
            .load_api_keys()
            .context("reading [api] API keys")?
            .iter()
            .map(|k| k.expose()),
    );
    if api_keys.is_open() {
        tracing::warn!(
            "no [api].api_keys configured: Sandboxes and Cluster are open to anyone who can reach {}",
            config.api.grpc_addr
        );
    }

    let request_timeout = Duration::from_secs(config.api.request_timeout_sec.max(1));
    let settings = scheduler::Settings {
        heartbeat_interval: Duration::from_millis(config.scheduler.heartbeat_interval_ms),
        lost_after: Duration::from_secs(config.scheduler.node_lost_after_sec),
        default_timeout: Duration::from_secs(config.agent.default_timeout_sec),
        max_timeout: Duration::from_secs(config.agent.max_timeout_sec),
        create_deadline: request_timeout.max(MIN_CREATE_DEADLINE),
        call_deadline: request_timeout,
    };
    let scheduler = Arc::new(scheduler::Scheduler {
        meta,
        nodes: nodes::Nodes::new(client_auth, settings.lost_after),
        settings,
    });
    let reconciler = tokio::spawn(reconcile_loop(
        Arc::clone(&scheduler),
        metrics_endpoint.is_some(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SandboxesServer<grpc::Api>>().await;
    health.set_serving::<ClusterServer<grpc::Api>>().await;
    health.set_serving::<NodeRegistryServer<grpc::Api>>().await;
    let listen = config.api.grpc_addr;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen} ([api].grpc_addr)"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    tracing::info!(address = %local, "scheduler serving");
    // Lines for supervisors and tests that asked for port 0.
    println!("listening on {local}");
    if let Some(endpoint) = &metrics_endpoint {
        println!("metrics on {}", endpoint.local_addr());
    }

    let api = grpc::Api::new(Arc::clone(&scheduler));
    let result = tonic::transport::Server::builder()
        .layer(nanobox_telemetry::grpc::GrpcServerLayer)
        .add_service(health_service)
        .add_service(
            nanobox_proto::reflection(&SERVED)
                .build_v1()
                .context("building reflection")?,
        )
        .add_service(
            nanobox_proto::reflection(&SERVED)
                .build_v1alpha()
                .context("building reflection")?,
        )
        // The public APIs need an API key; health and reflection stay open for probes and
        // tools, and NodeRegistry takes the service token instead.
        .add_service(SandboxesServer::with_interceptor(
            api.clone(),
            api_keys.clone(),
        ))
        .add_service(ClusterServer::with_interceptor(api.clone(), api_keys))
        .add_service(NodeRegistryServer::with_interceptor(api, server_auth))
        .serve_with_incoming_shutdown(
            nanobox_proto::incoming(listener),
            nanobox_telemetry::shutdown_signal(),
        )
        .await
        .context("serving gRPC");
    reconciler.abort();
    result
}

/// Runs a reconcile pass every heartbeat interval (at most every second apart), for ever;
/// with `metrics`, refreshes the series that come from the database after each pass.
async fn reconcile_loop(scheduler: Arc<scheduler::Scheduler>, metrics: bool) {
    let period = scheduler
        .settings
        .heartbeat_interval
        .min(Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = scheduler.reconcile().await {
            tracing::warn!(error = %e, "reconcile pass failed; next one in {period:?}");
        }
        if metrics {
            if let Err(e) = scheduler.publish_metrics().await {
                tracing::debug!(error = %e, "sandbox counts not refreshed");
            }
        }
    }
}
