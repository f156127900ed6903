//! `template-builder`: the NanoBox service that warms OCI images up into templates.
//!
//! It serves `nanobox.v1.Templates` (plus gRPC health and reflection) over a
//! [`nanobox_warmup::Warmer`]: metadata in Postgres, root filesystems in the object store
//! (a local directory or S3), layers cached in its work directory. On start it applies
//! the schema migrations and resumes the warmups a previous run left unfinished.

mod grpc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use nanobox_oci::{ConvertOptions, DockerConfig, Ext4Options, RegistryOptions};
use nanobox_proto::v1::templates_server::TemplatesServer;
use nanobox_store::metadata::PoolOptions;
use nanobox_store::MetadataStore;
use nanobox_warmup::{Warmer, WarmupConfig};

#[derive(Debug, Parser)]
#[command(name = "template-builder", version, about = "NanoBox template builder")]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "NANOBOX_LISTEN", default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// The metadata database: a libpq connection string or URL
    /// (`host=/run/postgresql dbname=nanobox`, `postgres://user@host/db`).
    #[arg(long, env = "NANOBOX_DATABASE_URL")]
    database_url: String,
    /// The object store: `file:///var/lib/nanobox/objects` or
    /// `s3://bucket?endpoint=http://host:port&region=us-east-1&path_style=true`.
    #[arg(long, env = "NANOBOX_OBJECT_STORE")]
    object_store: String,
    /// Local working space: the layer cache and builds in progress.
    #[arg(long, env = "NANOBOX_WORK_DIR")]
    work_dir: PathBuf,
    /// The guest init to inject into every root filesystem.
    #[arg(long, env = "NANOBOX_INIT")]
    init: PathBuf,
    /// A registry (`host:port`) that may be reached over plain HTTP; loopback only.
    /// Repeatable.
    #[arg(
        long = "plain-http-registry",
        env = "NANOBOX_PLAIN_HTTP_REGISTRIES",
        value_delimiter = ','
    )]
    plain_http: Vec<String>,
    /// A Docker `config.json` with registry credentials.
    #[arg(long, env = "NANOBOX_DOCKER_CONFIG")]
    docker_config: Option<PathBuf>,
    /// Images converted at the same time.
    #[arg(long, default_value_t = 2)]
    max_parallel: usize,
    /// Free space left in each root filesystem beyond its contents, in MiB.
    #[arg(long, default_value_t = 256)]
    headroom_mb: u64,
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
        "nanobox-template-builder",
        &nanobox_telemetry::TelemetryConfig::default(),
    )
    .context("setting up telemetry")?;

    let db: tokio_postgres::Config = args
        .database_url
        .parse()
        .context("--database-url is not a valid Postgres connection string")?;
    let meta = MetadataStore::open(db, PoolOptions::default())
        .await
        .context("opening the metadata database")?;
    let objects =
        nanobox_store::open_object_store(&args.object_store).context("opening the object store")?;

    let mut registry = RegistryOptions {
        plain_http: args.plain_http.clone(),
        ..RegistryOptions::default()
    };
    if let Some(path) = &args.docker_config {
        registry.docker_config =
            Some(DockerConfig::load(path).with_context(|| format!("reading {}", path.display()))?);
    }
    let config = WarmupConfig {
        work_dir: args.work_dir.clone(),
        init: args.init.clone(),
        registry,
        convert: ConvertOptions {
            ext4: Ext4Options {
                headroom_bytes: args.headroom_mb << 20,
                ..Ext4Options::default()
            },
            ..ConvertOptions::default()
        },
        max_parallel: args.max_parallel,
    };
    let warmer = Warmer::new(meta, Arc::clone(&objects), config).context("setting up")?;
    let resumed = warmer
        .resume()
        .await
        .context("resuming unfinished warmups")?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<TemplatesServer<grpc::TemplatesService>>()
        .await;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr().context("reading the bound address")?;
    tracing::info!(address = %local, resumed, init = warmer.init_version(), "template-builder serving");
    // A line for supervisors and tests that asked for port 0.
    println!("listening on {local}");

    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(nanobox_proto::reflection_service().context("building reflection")?)
        .add_service(nanobox_proto::reflection_service_v1alpha().context("building reflection")?)
        .add_service(TemplatesServer::new(grpc::TemplatesService::new(warmer)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            nanobox_telemetry::shutdown_signal(),
        )
        .await
        .context("serving gRPC")?;
    Ok(())
}
