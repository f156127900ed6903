//! `gateway`: the NanoBox REST API. Serves the public `nanobox.v1` services as HTTP/JSON
//! under `/api/v1/...`, with the routes derived from the protos' `google.api.http` rules
//! (`nanobox_rest`), forwarding `Templates` calls to the template-builder and `Sandboxes`
//! and `Cluster` calls to the scheduler.
//!
//! It reads `nanobox.toml` (`[api]`: listen address, API keys, body limit, request
//! timeout, metrics address; `[builder]` and `[agent] scheduler_addr` / `[api]
//! grpc_addr`: where the upstreams are) with `NANOBOX__SECTION__KEY` overrides. With
//! `[api].metrics_addr` set it serves Prometheus metrics there (`/metrics`): REST requests
//! by method, route and status.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use nanobox_config::Config;
use nanobox_rest::{ApiKeys, Gateway, GatewayOptions, Upstream};

#[derive(Debug, Parser)]
#[command(name = "nanobox-gateway", version, about = "NanoBox REST gateway")]
struct Args {
    /// The configuration file (`nanobox.toml`). Default: `$NANOBOX_CONFIG`, else
    /// `/etc/nanobox/nanobox.toml` if it exists, else the built-in defaults. Every key can
    /// be overridden by `NANOBOX__<SECTION>__<KEY>` variables.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// The service of `nanobox.v1` the template-builder serves; the scheduler serves the rest.
const TEMPLATES_SERVICE: &str = "nanobox.v1.Templates";

/// How long calls in flight may take to finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The protobuf package the gateway exposes.
const PUBLIC_PACKAGE: &str = "nanobox.v1";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(args.config.as_deref()).context("loading the configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let _telemetry = nanobox_telemetry::init("nanobox-gateway", &config.telemetry)
        .context("setting up telemetry")?;
    let metrics_endpoint =
        nanobox_telemetry::metrics::serve(config.api.metrics_addr, "nanobox-gateway")
            .await
            .context("serving metrics ([api].metrics_addr)")?;
    nanobox_rest::metrics::describe();

    let keys = config.api.load_api_keys().context("reading the API keys")?;
    let api_keys = ApiKeys::new(keys.iter().map(|k| k.expose()));
    if api_keys.is_open() {
        tracing::warn!(
            "no API keys configured ([api] api_keys, api_keys_file): the REST API is open to anyone who can reach {}",
            config.api.listen_addr
        );
    }

    let builder = Upstream::new("template-builder", &config.builder_endpoint())?;
    let scheduler = Upstream::new("scheduler", &config.scheduler_endpoint())?;
    let pool = nanobox_rest::nanobox_descriptors()?;
    let options = GatewayOptions {
        api_keys,
        max_body_bytes: usize::try_from(config.api.max_body_bytes)
            .context("[api] max_body_bytes does not fit in memory")?,
        request_timeout: Duration::from_secs(config.api.request_timeout_sec),
        ..GatewayOptions::default()
    };
    let upstreams = vec![builder, scheduler];
    let gateway = Gateway::new(
        &pool,
        upstreams,
        |service| match service.full_name() {
            TEMPLATES_SERVICE => Some(0),
            _ if service.package_name() == PUBLIC_PACKAGE => Some(1),
            _ => None,
        },
        options,
    )
    .context("deriving the REST routes from the protos")?;
    for route in gateway.routes().routes() {
        tracing::debug!(method = %route.http_method, path = route.template.as_str(), rpc = %route.rpc_name(), "route");
    }

    let listener = tokio::net::TcpListener::bind(config.api.listen_addr)
        .await
        .with_context(|| format!("listening on {}", config.api.listen_addr))?;
    let local = listener.local_addr().context("reading the bound address")?;
    tracing::info!(
        address = %local,
        routes = gateway.routes().routes().len(),
        builder = %config.builder_endpoint(),
        scheduler = %config.scheduler_endpoint(),
        keys = keys.len(),
        "gateway serving"
    );
    // Lines for supervisors and tests that asked for port 0.
    println!("listening on {local}");
    if let Some(endpoint) = &metrics_endpoint {
        println!("metrics on {}", endpoint.local_addr());
    }

    // On SIGTERM the server stops accepting and lets calls in flight finish, but no longer
    // than DRAIN_TIMEOUT: a streamed exec could otherwise hold the exit for hours.
    let (stopping, mut stopped) = tokio::sync::watch::channel(false);
    // Nagle off: a reply's head and body are separate writes, and the body would
    // otherwise wait for the client's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    let server = axum::serve(listener, gateway.router()).with_graceful_shutdown(async move {
        nanobox_telemetry::shutdown_signal().await;
        let _ = stopping.send(true);
    });
    tokio::select! {
        result = server => result.context("serving HTTP")?,
        _ = async {
            let _ = stopped.changed().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => tracing::warn!("calls still in flight after {} s; exiting", DRAIN_TIMEOUT.as_secs()),
    }
    Ok(())
}
