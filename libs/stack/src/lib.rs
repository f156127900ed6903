//! The whole NanoBox stack on one machine, as `nanobox up` runs it: a private PostgreSQL,
//! the local-filesystem object store, the scheduler, the template-builder, one node agent
//! and the REST gateway, each a supervised child process configured by one generated
//! `nanobox.toml`, with sandbox networking inside a network namespace of its own.
//!
//! The life of a stack:
//! 1. [`Stack::new`] takes the data directory's lock ([`lock`]) and removes what a killed
//!    earlier run left ([`leftovers`], [`network`]);
//! 2. [`Stack::start`] starts PostgreSQL ([`postgres`]), writes the configuration
//!    ([`config`]), starts the services in dependency order ([`service`]) and waits until
//!    each one answers its health check and the node is registered ([`readiness`]);
//! 3. [`Stack::wait`] returns when a service exits (the stack is broken) or never;
//! 4. [`Stack::shutdown`] stops everything it started and removes what it created.
//!
//! Every step is bounded in time, and a cancelled [`Stack::start`] (Ctrl-C while it
//! starts) leaves the stack in a state [`Stack::shutdown`] cleans up.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::expect_used, clippy::unwrap_used, clippy::panic))]

mod config;
mod error;
pub mod leftovers;
pub mod lock;
pub mod network;
pub mod postgres;
mod readiness;
mod secrets;
pub mod service;
mod tool;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use error::StackError;
use network::NodeNetwork;
use postgres::Postgres;
use service::{Outputs, Service};

/// The node id of the stack's one node agent.
pub const NODE_ID: &str = "local";

/// How long a service may take to print its address.
const START_LIMIT: Duration = Duration::from_secs(120);

/// How long the stack may take, after the services started, to be ready (the node agent
/// probes the accelerator and registers within a few heartbeats).
const READY_LIMIT: Duration = Duration::from_secs(180);

/// How long each service may take to stop after SIGTERM. The node agent destroys its
/// VMs on the way out.
const STOP_GRACE: Duration = Duration::from_secs(15);
const AGENT_STOP_GRACE: Duration = Duration::from_secs(90);

/// Default ports: the seed's REST port and the services' own defaults.
pub const DEFAULT_API_PORT: u16 = 8080;
pub const DEFAULT_GRPC_PORT: u16 = 50051;
pub const DEFAULT_TEMPLATES_PORT: u16 = 50061;
pub const DEFAULT_AGENT_PORT: u16 = 50071;
/// The first of the four Prometheus ports (gateway, scheduler, template-builder, node
/// agent, in that order).
pub const DEFAULT_METRICS_PORT: u16 = 9180;

/// How a stack is made. Ports of 0 take any free port.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Everything the stack keeps: database, object store, logs, keys, VM disks.
    pub data_dir: PathBuf,
    /// Where the service binaries are (`nanobox-scheduler`, ...).
    pub bin_dir: PathBuf,
    pub api_port: u16,
    pub grpc_port: u16,
    pub templates_port: u16,
    pub agent_port: u16,
    /// The first metrics port (four in a row), or `None` for no metrics listeners.
    pub metrics_port: Option<u16>,
    /// The guest kernel and init; `None`: the services' defaults (the cache).
    pub kernel: Option<PathBuf>,
    pub init: Option<PathBuf>,
    /// The node's capacity; `None`: the host's (memory), [`default_vcpus`] (vCPUs).
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u64>,
    pub max_sandboxes: Option<u32>,
    /// Warm pools: template name and size.
    pub pools: Vec<(String, u32)>,
    /// An uplink out of the node's namespace through this machine's (NAT).
    pub internet: bool,
    /// The sandboxes' DNS server; `None`: the node's default (the bridge).
    pub dns_server: Option<Ipv4Addr>,
    /// Registries reached over plain HTTP (loopback only).
    pub plain_http_registries: Vec<String>,
    /// The unprivileged user the VMMs run as.
    pub vmm_user: Option<String>,
    /// An OTLP collector for the services' spans.
    pub otlp_endpoint: Option<String>,
    /// Stream every service's log to stderr.
    pub verbose: bool,
}

impl StackOptions {
    /// The defaults for a data directory and the directory of the binaries.
    pub fn new(data_dir: PathBuf, bin_dir: PathBuf) -> Self {
        Self {
            data_dir,
            bin_dir,
            api_port: DEFAULT_API_PORT,
            grpc_port: DEFAULT_GRPC_PORT,
            templates_port: DEFAULT_TEMPLATES_PORT,
            agent_port: DEFAULT_AGENT_PORT,
            metrics_port: Some(DEFAULT_METRICS_PORT),
            kernel: None,
            init: None,
            vcpus: Some(default_vcpus()),
            memory_mb: None,
            max_sandboxes: None,
            pools: Vec::new(),
            internet: false,
            dns_server: None,
            plain_http_registries: vec!["127.0.0.1:5000".into(), "localhost:5000".into()],
            vmm_user: Some("nobody".into()),
            otlp_endpoint: None,
            verbose: false,
        }
    }
}

/// The node's vCPUs by default: four per core of this machine. A sandbox's vCPU is a
/// thread that mostly waits, and on a small development machine a node offering only its
/// cores would refuse the second two-vCPU sandbox of the Quick Start.
pub fn default_vcpus() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    u32::try_from(cores.saturating_mul(4)).unwrap_or(u32::MAX)
}

/// The default data directory: `/var/lib/nanobox/up` for root (the stack needs root for
/// its namespaces, and PostgreSQL's own user must reach its files, which it cannot under
/// root's home), else `<cache>/up`.
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/var/lib/nanobox/up")
    } else {
        nanobox_core::cache_dir().join("up")
    }
}

/// Where clients reach a ready stack.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub rest: String,
    pub grpc: String,
    pub templates_grpc: String,
    pub api_key: String,
    /// Prometheus endpoints: gateway, scheduler, template-builder, node agent.
    pub metrics: Option<[String; 4]>,
}

impl Endpoints {
    /// The shell-sourceable `NAME=value` lines `nanobox up` prints.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![
            format!("NANOBOX_URL=http://{}", self.rest),
            format!("NANOBOX_GRPC={}", self.grpc),
            format!("NANOBOX_TEMPLATES_GRPC={}", self.templates_grpc),
            format!("NANOBOX_API_KEY={}", self.api_key),
        ];
        if let Some(m) = &self.metrics {
            for (name, addr) in ["GATEWAY", "SCHEDULER", "TEMPLATE_BUILDER", "NODE_AGENT"]
                .iter()
                .zip(m)
            {
                lines.push(format!("NANOBOX_METRICS_{name}=http://{addr}/metrics"));
            }
        }
        lines
    }
}

/// A stack being started, running, or stopped.
#[derive(Debug)]
pub struct Stack {
    options: StackOptions,
    network: NodeNetwork,
    postgres: Postgres,
    /// Started services, in start order.
    services: Vec<Service>,
    endpoints: Option<Endpoints>,
    postgres_started: bool,
    _lock: lock::UpLock,
}

/// The data directory's layout.
struct Layout<'a>(&'a Path);

impl Layout<'_> {
    fn logs(&self) -> PathBuf {
        self.0.join("logs")
    }
    fn run(&self) -> PathBuf {
        self.0.join("run")
    }
    fn agent_state(&self) -> PathBuf {
        self.0.join("agent")
    }
    fn config(&self) -> PathBuf {
        self.0.join("nanobox.toml")
    }
    fn api_key(&self) -> PathBuf {
        self.0.join("api-key")
    }
    fn service_token(&self) -> PathBuf {
        self.0.join("service-token")
    }
    fn endpoints(&self) -> PathBuf {
        self.0.join("endpoints.env")
    }
}

/// The file a running stack writes its endpoint lines to (mode 0600: it holds the API
/// key), for clients on the same machine.
pub fn endpoints_file(data_dir: &Path) -> PathBuf {
    Layout(data_dir).endpoints()
}

impl Stack {
    /// Takes the data directory (refusing when another `nanobox up` holds it) and removes
    /// what a killed earlier run of it left: services, VMMs, namespaces.
    pub async fn new(options: StackOptions) -> Result<Self, StackError> {
        // Namespaces, bridges, cgroups and /dev/kvm: say so before anything is made.
        if !nix::unistd::geteuid().is_root() {
            return Err(StackError::Missing {
                what: "root".into(),
                hint: "nanobox up makes network namespaces and runs VMs: run it as root (sudo)"
                    .into(),
            });
        }
        let data = options.data_dir.clone();
        std::fs::create_dir_all(&data)
            .map_err(|e| StackError::io("creating the data directory", &data, e))?;
        let data = std::fs::canonicalize(&data)
            .map_err(|e| StackError::io("resolving the data directory", &data, e))?;
        let options = StackOptions {
            data_dir: data.clone(),
            ..options
        };
        let lock = lock::UpLock::acquire(&data)?;
        let layout = Layout(&data);
        for dir in [layout.logs(), layout.run(), layout.agent_state()] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| StackError::io("creating a directory", &dir, e))?;
        }
        let stopped = leftovers::stop_services(&layout.run()).await;
        if !stopped.is_empty() {
            tracing::warn!(services = ?stopped, "stopped services an earlier nanobox up left running");
        }
        let vmms = leftovers::kill_vmms(&layout.agent_state());
        if vmms > 0 {
            tracing::warn!(vmms, "killed VMMs an earlier nanobox up left running");
        }
        let _ = std::fs::remove_file(layout.endpoints());
        let network = NodeNetwork::new(&data, options.internet);
        network.remove().await?;
        let postgres = Postgres::new(data.join("pg"))?;
        Ok(Self {
            options,
            network,
            postgres,
            services: Vec::new(),
            endpoints: None,
            postgres_started: false,
            _lock: lock,
        })
    }

    /// The data directory, resolved.
    pub fn data_dir(&self) -> &Path {
        &self.options.data_dir
    }

    /// The log files of PostgreSQL and of each service started so far.
    pub fn logs(&self) -> Vec<PathBuf> {
        std::iter::once(self.postgres.log().to_owned())
            .chain(self.services.iter().map(|s| s.log().to_owned()))
            .collect()
    }

    /// The sandbox network (namespace names), for tests and tools.
    pub fn network(&self) -> &NodeNetwork {
        &self.network
    }

    /// Starts everything and returns once the stack answers as a client would use it.
    pub async fn start(&mut self) -> Result<Endpoints, StackError> {
        let o = self.options.clone();
        let data = o.data_dir.as_path();
        let layout = Layout(data);
        let kernel = o
            .kernel
            .clone()
            .unwrap_or_else(|| nanobox_core::cache_dir().join("vmlinux"));
        let init = o
            .init
            .clone()
            .unwrap_or_else(|| nanobox_core::cache_dir().join("nanobox-init"));
        for (what, path, flag) in [
            ("the guest kernel", &kernel, "--kernel"),
            ("the guest init", &init, "--init"),
        ] {
            if !path.is_file() {
                return Err(StackError::Missing {
                    what: format!("{what} {}", path.display()),
                    hint: format!("build it with `cargo xtask setup`, or pass {flag}"),
                });
            }
        }
        let bins = [
            "nanobox-scheduler",
            "nanobox-template-builder",
            "nanobox-node-agent",
            "nanobox-gateway",
        ];
        for bin in bins {
            if !o.bin_dir.join(bin).is_file() {
                return Err(StackError::Missing {
                    what: format!("{bin} in {}", o.bin_dir.display()),
                    hint: "build the services (`cargo build --release`) or pass --bin-dir".into(),
                });
            }
        }
        let api_port = pick_port(o.api_port, "--api-port")?;
        let grpc_port = pick_port(o.grpc_port, "--grpc-port")?;
        let templates_port = pick_port(o.templates_port, "--templates-port")?;
        let agent_port = pick_port(o.agent_port, "--agent-port")?;
        let metrics_ports = match o.metrics_port {
            None => None,
            Some(0) => Some([
                pick_port(0, "--metrics-port")?,
                pick_port(0, "--metrics-port")?,
                pick_port(0, "--metrics-port")?,
                pick_port(0, "--metrics-port")?,
            ]),
            Some(base) => {
                let mut ports = [0u16; 4];
                for (i, port) in ports.iter_mut().enumerate() {
                    let p = base.checked_add(i as u16).ok_or(StackError::Invalid {
                        flag: "--metrics-port",
                        message: format!("{base} leaves no room for four ports"),
                    })?;
                    *port = pick_port(p, "--metrics-port")?;
                }
                Some(ports)
            }
        };

        let api_key = secrets::load_or_create(&layout.api_key(), "nbx_")?;
        secrets::load_or_create(&layout.service_token(), "nbxsvc_")?;

        tracing::info!(log = %self.postgres.log().display(), "starting PostgreSQL");
        self.postgres_started = true;
        self.postgres.start().await?;

        self.network.create().await?;
        let dns_server = match (o.dns_server, self.network.has_uplink()) {
            (Some(dns), _) => Some(dns),
            (None, true) => Some(host_resolver().unwrap_or(Ipv4Addr::new(1, 1, 1, 1))),
            (None, false) => None,
        };
        let host_netns = self.network.host_netns();
        let netns_prefix = self.network.sandbox_prefix();
        let database_url = self.postgres.url();
        let config = config::StackConfig {
            api_port,
            grpc_port,
            templates_port,
            agent_port,
            metrics_ports,
            node_id: NODE_ID,
            data_dir: data,
            database_url: &database_url,
            api_keys_file: &layout.api_key(),
            service_token_file: &layout.service_token(),
            kernel: &kernel,
            init: &init,
            host_netns: &host_netns,
            netns_prefix: &netns_prefix,
            host_iface: network::HOST_IFACE,
            dns_server,
            vcpus: o.vcpus,
            memory_mb: o.memory_mb,
            max_sandboxes: o.max_sandboxes,
            vmm_user: o.vmm_user.as_deref(),
            plain_http_registries: &o.plain_http_registries,
            pools: &o.pools,
            otlp_endpoint: o.otlp_endpoint.as_deref(),
        }
        .write(&layout.config())?;

        let outputs = Outputs {
            log_dir: layout.logs(),
            run_dir: layout.run(),
            verbose: o.verbose,
        };
        // The scheduler first: it applies the schema migrations the others expect.
        let bin = |name: &str| o.bin_dir.join(name);
        let scheduler = Service::start(
            "scheduler",
            &bin("nanobox-scheduler"),
            &config,
            &outputs,
            START_LIMIT,
        )
        .await?;
        let grpc = scheduler.addr.clone();
        self.services.push(scheduler);
        let (builder_bin, agent_bin, gateway_bin) = (
            bin("nanobox-template-builder"),
            bin("nanobox-node-agent"),
            bin("nanobox-gateway"),
        );
        let (builder, agent, gateway) = tokio::join!(
            Service::start(
                "template-builder",
                &builder_bin,
                &config,
                &outputs,
                START_LIMIT
            ),
            Service::start("node-agent", &agent_bin, &config, &outputs, START_LIMIT),
            Service::start("gateway", &gateway_bin, &config, &outputs, START_LIMIT),
        );
        // Keep every one that started, so that a failure of another still stops it.
        let mut first_error = None;
        for started in [builder, agent, gateway] {
            match started {
                Ok(service) => self.services.push(service),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let addr = |name: &str| {
            self.services
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.addr.clone())
                .unwrap_or_default()
        };
        let (templates_grpc, agent_addr, rest) = (
            addr("template-builder"),
            addr("node-agent"),
            addr("gateway"),
        );

        let deadline = Instant::now() + READY_LIMIT;
        for (service, addr) in [
            ("scheduler", &grpc),
            ("template-builder", &templates_grpc),
            ("node-agent", &agent_addr),
        ] {
            self.wait_ready(service, deadline, || readiness::grpc_serving(addr))
                .await?;
        }
        self.wait_ready("gateway", deadline, || readiness::http_ok(&rest))
            .await?;
        self.wait_ready("node-agent", deadline, || {
            readiness::node_ready(&grpc, &api_key, NODE_ID)
        })
        .await?;

        let endpoints = Endpoints {
            rest,
            grpc,
            templates_grpc,
            api_key,
            metrics: metrics_ports.map(|p| p.map(|port| format!("127.0.0.1:{port}"))),
        };
        write_private(&layout.endpoints(), &(endpoints.lines().join("\n") + "\n"))?;
        self.endpoints = Some(endpoints.clone());
        Ok(endpoints)
    }

    /// Polls `probe` until it passes, failing at `deadline` or as soon as a service exits.
    async fn wait_ready<F, Fut>(
        &mut self,
        service: &'static str,
        deadline: Instant,
        mut probe: F,
    ) -> Result<(), StackError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), readiness::NotYet>>,
    {
        let started = Instant::now();
        loop {
            let why = match probe().await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if let Some(e) = self.exited_service() {
                return Err(e);
            }
            if Instant::now() >= deadline {
                let log = self
                    .services
                    .iter()
                    .find(|s| s.name == service)
                    .map(|s| s.log().to_owned())
                    .unwrap_or_default();
                return Err(StackError::NotReady {
                    service,
                    waited: started.elapsed(),
                    detail: why,
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A service that has exited, as an error.
    fn exited_service(&mut self) -> Option<StackError> {
        self.services.iter_mut().find_map(|s| {
            let status = s.try_exit_status()?;
            Some(s.exited(status))
        })
    }

    /// Waits until a service exits, and says which; a healthy stack never returns.
    pub async fn wait(&mut self) -> StackError {
        if self.services.is_empty() {
            return std::future::pending().await;
        }
        let waits = self.services.iter_mut().map(|s| {
            Box::pin(async move {
                let status = s.wait().await;
                (s.name, status, s.log().to_owned())
            })
        });
        let ((service, status, log), _, _) = futures::future::select_all(waits).await;
        StackError::ServiceExited {
            service,
            status,
            log,
        }
    }

    /// Stops every service (in reverse start order; the node agent destroys its VMs),
    /// kills any VMM still running, removes the namespaces and the uplink, and stops
    /// PostgreSQL. Tries every step; returns the first failure.
    pub async fn shutdown(&mut self) -> Result<(), StackError> {
        let layout = Layout(&self.options.data_dir);
        let _ = std::fs::remove_file(layout.endpoints());
        while let Some(mut service) = self.services.pop() {
            let grace = if service.name == "node-agent" {
                AGENT_STOP_GRACE
            } else {
                STOP_GRACE
            };
            if !service.stop(grace).await {
                tracing::warn!(
                    service = service.name,
                    "did not stop within {grace:?}; killed"
                );
            }
        }
        let vmms = leftovers::kill_vmms(&layout.agent_state());
        if vmms > 0 {
            tracing::warn!(vmms, "killed VMMs the node agent left");
        }
        let mut first_error = self.network.remove().await.err();
        if self.postgres_started {
            if let Err(e) = self.postgres.stop().await {
                first_error.get_or_insert(e);
            }
            self.postgres_started = false;
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Resolves a port flag: 0 takes a free port, anything else must be free now.
fn pick_port(port: u16, flag: &'static str) -> Result<u16, StackError> {
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(listener) => listener
            .local_addr()
            .map(|a| a.port())
            .map_err(|e| StackError::io("reading a bound address", "127.0.0.1", e)),
        Err(_) => Err(StackError::PortInUse { port, flag }),
    }
}

/// The first IPv4 name server of `/etc/resolv.conf` that a sandbox can reach (not on
/// loopback: a local stub resolver answers only this machine).
fn host_resolver() -> Option<Ipv4Addr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .find(|a| !a.is_loopback() && !a.is_unspecified())
}

fn write_private(path: &Path, text: &str) -> Result<(), StackError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StackError::io("writing", path, e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| StackError::io("writing", path, e))
}
