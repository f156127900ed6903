//! `template-builder`: the NanoBox service that warms OCI images up into templates.
//!
//! It serves `nanobox.v1.Templates` (plus gRPC health and reflection) over a
//! [`nanobox_warmup::Warmer`]: metadata in Postgres, root filesystems in the object store
//! (a local directory or S3), layers cached in its work directory. On start it applies
//! the schema migrations and resumes the warmups a previous run left unfinished.
//!
//! Configured by `nanobox.toml` (`--config`, with `NANOBOX__<SECTION>__<KEY>` overrides)
//! like the other services. With `[builder].metrics_addr` set it serves Prometheus
//! metrics there (`/metrics`): gRPC calls, warmup durations and failures. `Templates` calls need a bearer API key from `[api].api_keys`
//! when any is configured, the same keys the scheduler and the REST gateway accept.

mod grpc;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use nanobox_config::Config;
use nanobox_oci::{
    ApplyOptions, ConvertOptions, DockerConfig, Ext4Options, Limits, RegistryOptions,
};
use nanobox_proto::v1::templates_server::TemplatesServer;
use nanobox_scheduler::auth::ApiKeys;
use nanobox_store::metadata::PoolOptions;
use nanobox_store::MetadataStore;
use nanobox_warmup::{Warmer, WarmupConfig};

#[derive(Debug, Parser)]
#[command(
    name = "nanobox-template-builder",
    version,
    about = "NanoBox template builder"
)]
struct Args {
    /// The configuration file (`nanobox.toml`): `[builder]` (listen_addr, work_dir,
    /// rootfs_headroom_mb, max_image_mb, metrics_addr), `[oci]` (init_binary, plain_http_registries,
    /// docker_config, max_parallel), `[database]`, `[object_store]`, `[api]` (api_keys),
    /// `[telemetry]`.
    /// Default: `$NANOBOX_CONFIG`, else `/etc/nanobox/nanobox.toml` if it exists, else the
    /// built-in defaults. Every key can be overridden by `NANOBOX__<SECTION>__<KEY>`
    /// variables.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// The NanoBox services this process serves: what reflection lists (with health and
/// reflection themselves).
const SERVED: [&str; 1] = ["nanobox.v1.Templates"];

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
    let _telemetry = nanobox_telemetry::init("nanobox-template-builder", &config.telemetry)
        .context("setting up telemetry")?;
    let metrics_endpoint =
        nanobox_telemetry::metrics::serve(config.builder.metrics_addr, "nanobox-template-builder")
            .await
            .context("serving metrics ([builder].metrics_addr)")?;
    nanobox_warmup::metrics::describe();

    let db: tokio_postgres::Config = config
        .database
        .url
        .expose()
        .parse()
        .context("[database].url is not a valid Postgres connection string")?;
    let meta = MetadataStore::open(db, PoolOptions::default())
        .await
        .context("opening the metadata database")?;
    let objects = nanobox_store::open_object_store(&config.object_store.location)
        .context("opening the object store ([object_store].location)")?;

    let mut registry = RegistryOptions {
        plain_http: config.oci.plain_http_registries.clone(),
        ..RegistryOptions::default()
    };
    if let Some(path) = &config.oci.docker_config {
        registry.docker_config = Some(
            DockerConfig::load(path)
                .with_context(|| format!("reading [oci].docker_config {}", path.display()))?,
        );
    }
    let api_keys = ApiKeys::new(
        config
            .api
            .load_api_keys()
            .context("reading [api] API keys")?
            .iter()
            .map(|k| k.expose()),
    );
    let listen = config.builder.listen_addr;
    if api_keys.is_open() {
        tracing::warn!(
            "no [api].api_keys configured: Templates is open to anyone who can reach {listen}"
        );
    }
    let warmup = WarmupConfig {
        work_dir: config.builder.work_dir.clone(),
        init: config.oci.init_binary.clone(),
        registry,
        convert: ConvertOptions {
            apply: ApplyOptions {
                limits: Limits::for_image_bytes(
                    config.builder.max_image_mb.saturating_mul(1 << 20),
                ),
                ..ApplyOptions::default()
            },
            ext4: Ext4Options {
                headroom_bytes: config.builder.rootfs_headroom_mb.saturating_mul(1 << 20),
                ..Ext4Options::default()
            },
            ..ConvertOptions::default()
        },
        max_parallel: usize::try_from(config.oci.max_parallel)
            .context("[oci].max_parallel does not fit this machine")?,
    };
    let warmer = Warmer::new(meta, Arc::clone(&objects), warmup).context("setting up")?;
    let resumed = warmer
        .resume()
        .await
        .context("resuming unfinished warmups")?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<TemplatesServer<grpc::TemplatesService>>()
        .await;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen} ([builder].listen_addr)"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    tracing::info!(address = %local, resumed, init = warmer.init_version(), "template-builder serving");
    // Lines for supervisors and tests that asked for port 0.
    println!("listening on {local}");
    if let Some(endpoint) = &metrics_endpoint {
        println!("metrics on {}", endpoint.local_addr());
    }

    tonic::transport::Server::builder()
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
        // Templates needs an API key; health and reflection stay open for probes and tools.
        .add_service(TemplatesServer::with_interceptor(
            grpc::TemplatesService::new(warmer),
            api_keys,
        ))
        .serve_with_incoming_shutdown(
            nanobox_proto::incoming(listener),
            nanobox_telemetry::shutdown_signal(),
        )
        .await
        .context("serving gRPC")?;
    Ok(())
}
