//! `nanobox up`: the whole stack on this machine, in the foreground, until Ctrl-C or
//! SIGTERM ([`nanobox_stack`] does the work). Stdout carries only the shell-sourceable
//! endpoint lines and `nanobox: ready`; progress and failures go to stderr.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use nanobox_stack::{Stack, StackOptions};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the stack keeps its database, objects, logs, keys and VM disks, across runs.
    /// Default: /var/lib/nanobox/up as root, else <cache>/up.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where the service binaries are. Default: beside this `nanobox` binary.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The REST API's port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = nanobox_stack::DEFAULT_API_PORT)]
    api_port: u16,
    /// The scheduler's public gRPC port (Sandboxes, Cluster).
    #[arg(long, default_value_t = nanobox_stack::DEFAULT_GRPC_PORT)]
    grpc_port: u16,
    /// The template-builder's gRPC port (Templates).
    #[arg(long, default_value_t = nanobox_stack::DEFAULT_TEMPLATES_PORT)]
    templates_port: u16,
    /// The node agent's gRPC port.
    #[arg(long, default_value_t = nanobox_stack::DEFAULT_AGENT_PORT)]
    agent_port: u16,
    /// The first of four Prometheus ports (gateway, scheduler, template-builder, node
    /// agent); 0: any free ports.
    #[arg(long, default_value_t = nanobox_stack::DEFAULT_METRICS_PORT)]
    metrics_port: u16,
    /// No Prometheus listeners.
    #[arg(long)]
    no_metrics: bool,
    /// A warm pool, TEMPLATE=SIZE (repeatable): SIZE VMs of TEMPLATE kept booted once
    /// the template is READY.
    #[arg(long = "pool", value_name = "TEMPLATE=SIZE")]
    pools: Vec<String>,
    /// vCPUs the node offers to sandboxes (default: four per core of this machine).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Memory (MiB) the node offers to sandboxes (default: this machine's).
    #[arg(long)]
    memory_mb: Option<u64>,
    /// Most sandboxes on the node, warm pool VMs included.
    #[arg(long)]
    max_sandboxes: Option<u32>,
    /// Give internet-mode sandboxes a NAT uplink through this machine's network (off: no
    /// sandbox traffic leaves the node's namespace).
    #[arg(long)]
    internet: bool,
    /// The DNS server sandboxes use (default: this machine's resolver with --internet).
    #[arg(long)]
    dns: Option<Ipv4Addr>,
    /// A registry reached over plain HTTP, host:port on loopback (repeatable; default
    /// 127.0.0.1:5000 and localhost:5000).
    #[arg(long = "plain-http-registry", value_name = "HOST:PORT")]
    plain_http_registries: Vec<String>,
    /// The guest kernel (default: <cache>/vmlinux, built by `cargo xtask setup`).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The guest init put into templates (default: <cache>/nanobox-init).
    #[arg(long)]
    init: Option<PathBuf>,
    /// An OTLP gRPC collector for the services' spans.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Stream every service's log to stderr.
    #[arg(short, long)]
    verbose: bool,
}

/// Brings the stack up and keeps it up; the process's exit code.
pub async fn run(args: UpArgs) -> i32 {
    match up(args).await {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("nanobox up: {message}");
            1
        }
    }
}

async fn up(args: UpArgs) -> Result<(), String> {
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(PathBuf::from))
            .ok_or("cannot tell where this binary is: pass --bin-dir")?,
    };
    let mut options = StackOptions::new(
        args.data_dir
            .unwrap_or_else(nanobox_stack::default_data_dir),
        bin_dir,
    );
    options.api_port = args.api_port;
    options.grpc_port = args.grpc_port;
    options.templates_port = args.templates_port;
    options.agent_port = args.agent_port;
    options.metrics_port = (!args.no_metrics).then_some(args.metrics_port);
    for pool in &args.pools {
        let (name, size) = pool
            .split_once('=')
            .and_then(|(n, s)| Some((n.to_owned(), s.parse::<u32>().ok()?)))
            .ok_or_else(|| format!("--pool {pool:?}: expected TEMPLATE=SIZE"))?;
        options.pools.push((name, size));
    }
    if args.vcpus.is_some() {
        options.vcpus = args.vcpus;
    }
    options.memory_mb = args.memory_mb;
    options.max_sandboxes = args.max_sandboxes;
    options.internet = args.internet;
    options.dns_server = args.dns;
    if !args.plain_http_registries.is_empty() {
        options.plain_http_registries = args.plain_http_registries;
    }
    options.kernel = args.kernel;
    options.init = args.init;
    options.otlp_endpoint = args.otlp_endpoint;
    options.verbose = args.verbose;

    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut stack = Stack::new(options).await.map_err(|e| e.to_string())?;
    eprintln!(
        "nanobox up: starting in {} (logs in {}/logs)",
        stack.data_dir().display(),
        stack.data_dir().display()
    );
    let started = tokio::select! {
        started = stack.start() => started.map_err(|e| e.to_string()),
        _ = terminate.recv() => Err("stopped by SIGTERM while starting".to_owned()),
        _ = interrupt.recv() => Err("interrupted while starting".to_owned()),
    };
    let outcome = match started {
        Ok(endpoints) => {
            let mut stdout = std::io::stdout().lock();
            for line in endpoints.lines() {
                let _ = writeln!(stdout, "{line}");
            }
            let _ = writeln!(stdout, "nanobox: ready");
            let _ = stdout.flush();
            drop(stdout);
            for log in stack.logs() {
                eprintln!("nanobox up: log {}", log.display());
            }
            eprintln!("nanobox up: ready; Ctrl-C stops the stack");
            tokio::select! {
                broken = stack.wait() => Err(broken.to_string()),
                _ = terminate.recv() => Ok(()),
                _ = interrupt.recv() => Ok(()),
            }
        }
        Err(e) => Err(e),
    };
    eprintln!("nanobox up: stopping");
    let stopped = stack.shutdown().await;
    match (outcome, stopped) {
        (Ok(()), Ok(())) => {
            eprintln!("nanobox up: stopped");
            Ok(())
        }
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Err(e)) => Err(format!("stopping: {e}")),
        (Err(e), Err(stop)) => Err(format!("{e}; then, stopping: {stop}")),
    }
}
