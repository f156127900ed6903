//! The sections and keys of `nanobox.toml`, with their defaults.
//!
//! Every struct denies unknown keys, so a typo is an error rather than a silently ignored
//! setting, and every key has a default, so a missing section or key takes the value that
//! makes a single machine work. Durations are whole seconds (`_sec`) or milliseconds
//! (`_ms`), sizes integers with the unit in the key name (`_bytes`, `_mb`).
//!
//! Defaults that are paths put NanoBox's data under the cache directory
//! ([`nanobox_core::cache_dir`]: `$NANOBOX_CACHE_DIR`, else `$XDG_CACHE_HOME/nanobox`, else
//! `~/.cache/nanobox`), read when the default is made; the exception is the node agent's
//! `state_dir`, `/var/lib/nanobox/agent`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use nanobox_core::TemplateName;
use nanobox_telemetry::TelemetryConfig;
use serde::{Deserialize, Serialize};

use crate::error::Location;
use crate::types::{Accel, CowMode, IpCidr, Ipv4Cidr, Secret, Vmm};

/// The whole configuration: one `nanobox.toml`, read by every NanoBox service (each uses
/// the sections it needs).
///
/// Get one with [`Config::load`] (file, environment, validation); `Config::default()` is
/// the embedded single-machine configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The public API: REST gateway and scheduler gRPC addresses, API keys, limits.
    pub api: ApiConfig,
    /// The node agent, one per KVM host.
    pub agent: AgentConfig,
    /// The Firecracker backend: kernel, boot arguments, jailer.
    pub firecracker: FirecrackerConfig,
    /// The QEMU `-M microvm` backend.
    pub qemu: QemuConfig,
    /// Sandbox networking on a node: bridge, subnet, DNS, limits.
    pub network: NetworkConfig,
    /// OCI images: blob cache, guest init, registries.
    pub oci: OciConfig,
    /// Warm pools of booted VMs per template.
    pub pool: PoolConfig,
    /// The Postgres metadata database.
    pub database: DatabaseConfig,
    /// The object store for template images and snapshot parts.
    pub object_store: ObjectStoreConfig,
    /// Scheduler timing.
    pub scheduler: SchedulerConfig,
    /// The template-builder service.
    pub builder: BuilderConfig,
    /// The snapshot-store service.
    pub snapshot_store: SnapshotStoreConfig,
    /// Authentication between services.
    pub auth: AuthConfig,
    /// Logs and trace export (`nanobox_telemetry`).
    pub telemetry: TelemetryConfig,
    /// Where the values came from, for error messages.
    #[serde(skip)]
    pub(crate) origin: Origin,
}

/// Where a loaded configuration came from: the file and, per key, its line or the
/// environment variable that set it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Origin {
    pub(crate) file: Option<PathBuf>,
    pub(crate) locations: std::collections::BTreeMap<crate::KeyPath, Location>,
}

impl Config {
    /// The configuration file this configuration was loaded from, if any.
    pub fn source_file(&self) -> Option<&Path> {
        self.origin.file.as_deref()
    }

    /// Where the value of `key` came from: its line in the file, the environment variable
    /// that set it, or the default. A key that is not in the file takes the location of the
    /// nearest enclosing table that is.
    pub fn location(&self, key: &crate::KeyPath) -> Location {
        let mut path = Some(key.clone());
        while let Some(p) = path {
            if let Some(location) = self.origin.locations.get(&p) {
                return location.clone();
            }
            path = p.parent();
        }
        Location::Default {
            file: self.origin.file.clone(),
        }
    }

    /// The DNS server sandboxes are given: `[network] dns_server`, else the seed's
    /// `[oci] dns_server`, else the bridge's address (the first host of the subnet).
    pub fn dns_server(&self) -> IpAddr {
        self.network
            .dns_server
            .or(self.oci.dns_server)
            .unwrap_or_else(|| {
                IpAddr::V4(
                    self.network
                        .subnet
                        .first_host()
                        .unwrap_or(self.network.subnet.network()),
                )
            })
    }

    /// The kernel QEMU boots: `[qemu] kernel`, else `[firecracker] kernel`.
    pub fn qemu_kernel(&self) -> &Path {
        self.qemu
            .kernel
            .as_deref()
            .unwrap_or(&self.firecracker.kernel)
    }

    /// Where node agents (and the gateway) reach the scheduler, as a gRPC endpoint URI:
    /// `[agent] scheduler_addr`, else `[api] grpc_addr` (an unspecified address such as
    /// `0.0.0.0` replaced by loopback).
    pub fn scheduler_endpoint(&self) -> String {
        endpoint(self.agent.scheduler_addr.as_deref(), self.api.grpc_addr)
    }

    /// Where the gateway reaches the template-builder, as a gRPC endpoint URI.
    pub fn builder_endpoint(&self) -> String {
        endpoint(
            self.builder.advertise_addr.as_deref(),
            self.builder.listen_addr,
        )
    }

    /// Where node agents reach the snapshot-store, as a gRPC endpoint URI.
    pub fn snapshot_store_endpoint(&self) -> String {
        endpoint(
            self.snapshot_store.advertise_addr.as_deref(),
            self.snapshot_store.listen_addr,
        )
    }
}

/// `http://<addr>` for a configured `host:port` (kept as is when it already has a scheme),
/// else for a listen address made connectable.
fn endpoint(configured: Option<&str>, listen: SocketAddr) -> String {
    match configured {
        Some(addr) if addr.contains("://") => addr.to_owned(),
        Some(addr) => format!("http://{addr}"),
        None => format!("http://{}", connectable(listen)),
    }
}

/// A listen address made into one a client on the same machine can connect to.
pub(crate) fn connectable(addr: SocketAddr) -> SocketAddr {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        });
    }
    addr
}

fn cache(sub: &str) -> PathBuf {
    nanobox_core::cache_dir().join(sub)
}

/// A loopback address with `port`.
fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// `[api]`: the public API, served by the REST gateway and the scheduler's gRPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// The REST gateway's listen address. Default `127.0.0.1:8080`.
    pub listen_addr: SocketAddr,
    /// The scheduler's public gRPC listen address (`nanobox.v1`). Default
    /// `127.0.0.1:50051`.
    pub grpc_addr: SocketAddr,
    /// API keys clients present as `Authorization: Bearer <key>`. With none here and no
    /// `api_keys_file`, the API is open: serve it on loopback only.
    pub api_keys: Vec<Secret>,
    /// A file of further API keys, one per line (blank lines and `#` comments ignored),
    /// read by [`ApiConfig::load_api_keys`]; absolute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_keys_file: Option<PathBuf>,
    /// The largest request body accepted, in bytes. Default 16 MiB.
    pub max_body_bytes: u64,
    /// How long a unary API call may take before it fails, in seconds (streams such as exec
    /// are bounded by their own timeouts). Default 60.
    pub request_timeout_sec: u64,
    /// Where the REST gateway serves Prometheus metrics (`GET /metrics`), a listener of
    /// its own. Default: none (no metrics listener).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen_addr: loopback(8080),
            grpc_addr: loopback(50051),
            api_keys: Vec::new(),
            api_keys_file: None,
            max_body_bytes: 16 << 20,
            request_timeout_sec: 60,
            metrics_addr: None,
        }
    }
}

/// `[agent]`: the node agent on one KVM host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// This node's id, unique in the cluster: 1 to 63 of `[A-Za-z0-9._-]`, starting with a
    /// letter or digit. Default: the host name.
    pub node_id: String,
    /// The Firecracker binary: a name looked up in `PATH` or an absolute path. Default
    /// `firecracker`.
    pub firecracker_bin: PathBuf,
    /// Where sandboxes' copy-on-write root disks are kept; absolute, on the same
    /// filesystem as `template_cache_dir` for reflinks. Default `<cache>/rootfs`.
    pub rootfs_dir: PathBuf,
    /// Where snapshots are written locally before upload; absolute. Default
    /// `<cache>/snapshots`.
    pub snapshot_dir: PathBuf,
    /// The agent's gRPC listen address (`nanobox.node.v1.NodeAgent`). Default
    /// `127.0.0.1:50071`.
    pub listen_addr: SocketAddr,
    /// The `host:port` the scheduler reaches this agent at. Default: `listen_addr`;
    /// required when `listen_addr` is unspecified (`0.0.0.0:...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<String>,
    /// The scheduler's `host:port` (or `http://host:port`). Default: `[api] grpc_addr` on
    /// this machine (see [`Config::scheduler_endpoint`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler_addr: Option<String>,
    /// Where the agent keeps its sandbox records across restarts; absolute. Default
    /// `/var/lib/nanobox/agent`.
    pub state_dir: PathBuf,
    /// The VMM: `qemu`, `firecracker` or `auto`. Default `auto`.
    pub vmm: Vmm,
    /// Where template images fetched from the object store are cached; absolute. Default
    /// `<cache>/templates`.
    pub template_cache_dir: PathBuf,
    /// The most bytes the template cache may hold (least recently used go first). Default
    /// 20 GiB.
    pub template_cache_bytes: u64,
    /// How each sandbox gets its copy of a template's disk: `auto`, `reflink`, `qcow2` or
    /// `copy`. Default `auto`.
    pub cow: CowMode,
    /// A sandbox's lifetime when its request names none, in seconds. Default 300.
    pub default_timeout_sec: u64,
    /// The longest lifetime a request may ask for, in seconds. Default 86400 (the most).
    pub max_timeout_sec: u64,
    /// vCPUs this node offers to sandboxes. Default: the host's CPUs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_vcpus: Option<u32>,
    /// Memory this node offers to sandboxes, in MiB. Default: the host's memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_memory_mb: Option<u64>,
    /// The most sandboxes (warm pool VMs included) on this node. Default 1024.
    pub max_sandboxes: u32,
    /// Free disk space kept on the agent's filesystems: no new sandbox or template is put
    /// there when less would remain, in MiB. Default 1024.
    pub disk_headroom_mb: u64,
    /// The cgroup (relative to the agent's cgroup root) under which each VM gets its own.
    /// Default `nanobox`.
    pub cgroup_parent: String,
    /// The unprivileged user QEMU runs as (a name or a numeric uid). Default: the agent's
    /// own user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<String>,
    /// Where the node agent serves Prometheus metrics (`GET /metrics`), a listener of its
    /// own. Default: none (no metrics listener).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_id: host_name(),
            firecracker_bin: PathBuf::from("firecracker"),
            rootfs_dir: cache("rootfs"),
            snapshot_dir: cache("snapshots"),
            listen_addr: loopback(50071),
            advertise_addr: None,
            scheduler_addr: None,
            state_dir: PathBuf::from("/var/lib/nanobox/agent"),
            vmm: Vmm::Auto,
            template_cache_dir: cache("templates"),
            template_cache_bytes: 20 << 30,
            cow: CowMode::Auto,
            default_timeout_sec: 300,
            max_timeout_sec: 86_400,
            capacity_vcpus: None,
            capacity_memory_mb: None,
            max_sandboxes: 1024,
            disk_headroom_mb: 1024,
            cgroup_parent: "nanobox".to_owned(),
            run_as_user: None,
            metrics_addr: None,
        }
    }
}

/// The resources a node offers to sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mb: u64,
}

impl AgentConfig {
    /// The address the scheduler reaches this agent at: `advertise_addr`, else
    /// `listen_addr` (made connectable).
    pub fn advertised_addr(&self) -> String {
        self.advertise_addr
            .clone()
            .unwrap_or_else(|| connectable(self.listen_addr).to_string())
    }

    /// The capacity this node offers: the configured values, else the host's CPUs
    /// (`available_parallelism`) and memory (`MemTotal` in `/proc/meminfo`; 0 if it cannot
    /// be read).
    pub fn capacity(&self) -> Capacity {
        let vcpus = self.capacity_vcpus.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                .unwrap_or(1)
        });
        let memory_mb = self.capacity_memory_mb.unwrap_or_else(host_memory_mb);
        Capacity { vcpus, memory_mb }
    }
}

fn host_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kib| kib / 1024)
}

/// The host name, made into a valid node id (lowercase, other characters as `-`, at most
/// 63), or `node-1` when there is none.
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let name = name.trim_start_matches(['.', '_', '-']);
    if name.is_empty() {
        "node-1".to_owned()
    } else {
        name.to_owned()
    }
}

/// `[firecracker]`: the Firecracker backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FirecrackerConfig {
    /// The guest kernel (uncompressed `vmlinux`); absolute. Also QEMU's unless `[qemu]
    /// kernel` is set. Default `<cache>/vmlinux`, what `cargo xtask setup` builds.
    pub kernel: PathBuf,
    /// The kernel command line. Default: NanoBox's own (console, `reboot=k`, `panic=1`,
    /// `pci=off`, `init=/sbin/nanobox-init`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Firecracker's jailer: a name in `PATH` or an absolute path. When set, every VM runs
    /// jailed (chroot, own uid/gid, cgroups, seccomp); `uid` and `gid` are then required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jailer_bin: Option<PathBuf>,
    /// The jailer's chroot base; absolute. Default `/srv/jailer` (the jailer's own).
    pub chroot_base_dir: PathBuf,
    /// The uid jailed Firecracker runs as (not 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The gid jailed Firecracker runs as (not 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        Self {
            kernel: cache("vmlinux"),
            boot_args: None,
            jailer_bin: None,
            chroot_base_dir: PathBuf::from("/srv/jailer"),
            uid: None,
            gid: None,
        }
    }
}

/// `[qemu]`: the QEMU `-M microvm` backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuConfig {
    /// The QEMU binary: a name in `PATH` or an absolute path. Default
    /// `qemu-system-x86_64`.
    pub binary: PathBuf,
    /// The accelerator: `auto` (KVM if a probe boot works, else TCG), `kvm` or `tcg`.
    /// Default `auto`.
    pub accel: Accel,
    /// The guest kernel; absolute. Default: `[firecracker] kernel` (see
    /// [`Config::qemu_kernel`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Run QEMU with its own seccomp sandbox (`-sandbox on,...`). Default true.
    pub seccomp_sandbox: bool,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            kernel: None,
            seccomp_sandbox: true,
        }
    }
}

/// `[network]`: sandbox networking on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// The bridge sandboxes' TAP devices join (a Linux interface name, at most 15
    /// characters). Default `nanobox-br0`.
    pub bridge_name: String,
    /// The IPv4 network sandboxes get addresses from; the bridge has the first host
    /// address. Must have room for `[agent] max_sandboxes`. Default `10.100.0.0/16`.
    pub subnet: Ipv4Cidr,
    /// The interface internet traffic leaves by (NAT). Default: the default route's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_iface: Option<String>,
    /// The DNS server sandboxes are told to use. Default: the bridge address. The seed
    /// format put this key under `[oci]`; it is still read there, and `[network]` wins
    /// when both are set (see [`Config::dns_server`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_server: Option<IpAddr>,
    /// Addresses and networks (`10.0.0.5`, `10.96.0.0/12`, `fd00::/8`) that
    /// internal-mode sandboxes may reach. Default none.
    pub internal_services: Vec<IpCidr>,
    /// The egress limit of internet-mode sandboxes whose request sets none, in Mbit/s.
    /// Default: unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_rate_limit_mbps: Option<u64>,
    /// The network namespace the bridge lives in: a name (`/run/netns/<name>`) or an
    /// absolute path. Default: the agent's own namespace. Tests use a private one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_netns: Option<String>,
    /// Sandbox network namespaces are named `<netns_prefix><vm id>`; only names with
    /// this prefix are ever cleaned up, so two agents sharing a host (tests) need
    /// different prefixes. Default `nbx-`.
    pub netns_prefix: String,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            bridge_name: "nanobox-br0".to_owned(),
            subnet: Ipv4Cidr::DEFAULT_SUBNET,
            host_iface: None,
            dns_server: None,
            internal_services: Vec::new(),
            default_rate_limit_mbps: None,
            host_netns: None,
            netns_prefix: "nbx-".to_owned(),
        }
    }
}

/// `[oci]`: OCI images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OciConfig {
    /// The layer blob cache (an OCI layout shared by all pulls); absolute. Default
    /// `<cache>/oci`, the same cache `nanobox template build` uses.
    pub cache_dir: PathBuf,
    /// The static guest init injected into every template; absolute. Default
    /// `<cache>/nanobox-init`, where `cargo xtask setup` puts it.
    pub init_binary: PathBuf,
    /// Read for the seed's format; prefer `[network] dns_server`, which wins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_server: Option<IpAddr>,
    /// Registries (`host:port`) that may be reached over plain HTTP; loopback only.
    /// Default none.
    pub plain_http_registries: Vec<String>,
    /// A Docker `config.json` with registry credentials; absolute. Default none
    /// (anonymous pulls).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_config: Option<PathBuf>,
    /// Images converted at the same time. Default 2.
    pub max_parallel: u32,
}

impl Default for OciConfig {
    fn default() -> Self {
        Self {
            cache_dir: cache("oci"),
            init_binary: cache("nanobox-init"),
            dns_server: None,
            plain_http_registries: Vec::new(),
            docker_config: None,
            max_parallel: 2,
        }
    }
}

/// `[pool]`: warm pools of booted VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// How often pools are topped up, in seconds. Default 5.
    pub replenish_interval_sec: u64,
    /// How long a warm VM may wait unused before it is recycled, in seconds. Default 600.
    pub max_idle_sec: u64,
    /// Pool VMs booted at once; 0 picks one per four host cores (at least one). Refills
    /// are background work: they also wait (a moment, never long) while creates are in
    /// flight on the node. Default 0.
    pub max_parallel_boots: u32,
    /// One entry per pooled template (`[[pool.templates]]`). Default none.
    pub templates: Vec<PoolTemplate>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            replenish_interval_sec: 5,
            max_idle_sec: 600,
            max_parallel_boots: 0,
            templates: Vec::new(),
        }
    }
}

/// `[[pool.templates]]`: a warm pool for one template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolTemplate {
    /// The template (a valid template name). Required.
    #[serde(with = "template_name")]
    pub name: TemplateName,
    /// Booted VMs kept ready at least. Required.
    pub min_ready: u32,
    /// Booted VMs kept ready at most (at least 1, at least `min_ready`). Required.
    pub max_ready: u32,
    /// vCPUs of the pooled VMs. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Memory of the pooled VMs, in MiB. Default 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
}

impl PoolTemplate {
    /// The pooled VMs' size, the defaults of [`nanobox_core::Resources`] filling what is
    /// unset; `None` if out of range (which [`Config::validate`] reports).
    pub fn resources(&self) -> Option<nanobox_core::Resources> {
        let default = nanobox_core::Resources::DEFAULT;
        nanobox_core::Resources::new(
            self.vcpus.unwrap_or(default.vcpu()),
            self.memory_mb.unwrap_or(default.memory_mb()),
            None,
        )
        .ok()
    }
}

mod template_name {
    use nanobox_core::TemplateName;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        name: &TemplateName,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(name.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<TemplateName, D::Error> {
        deserializer.deserialize_str(crate::types::ParseVisitor::new("a template name", |text| {
            TemplateName::new(text).map_err(|_| {
                format!(
                    "{text:?} is not a template name (1 to 63 of [a-z0-9._-], starting \
                         with a letter or digit)"
                )
            })
        }))
    }
}

/// `[database]`: the Postgres metadata database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// A libpq connection string or URL (`host=/run/postgresql dbname=nanobox`,
    /// `postgres://user:password@host/db`); secret, as it may hold a password. Default
    /// `host=/run/postgresql dbname=nanobox` (the local server over its socket).
    pub url: Secret,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("host=/run/postgresql dbname=nanobox"),
        }
    }
}

/// `[object_store]`: where template images and snapshot parts are stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectStoreConfig {
    /// `file:///absolute/path` (a local directory) or
    /// `s3://bucket?endpoint=http://host:port&region=us-east-1&path_style=true`
    /// (credentials from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`); what
    /// `nanobox_store::open_object_store` opens. Default `file://<cache>/objects`.
    pub location: String,
}

impl Default for ObjectStoreConfig {
    fn default() -> Self {
        Self {
            location: format!("file://{}", cache("objects").display()),
        }
    }
}

/// `[scheduler]`: node liveness, and the scheduler's metrics listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// How often node agents heartbeat, in milliseconds (at least 100). Default 2000.
    pub heartbeat_interval_ms: u64,
    /// A node with no heartbeat for this long is lost, in seconds (at least three
    /// heartbeat intervals). Default 10.
    pub node_lost_after_sec: u64,
    /// Where the scheduler serves Prometheus metrics (`GET /metrics`), a listener of its
    /// own. Default: none (no metrics listener).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 2000,
            node_lost_after_sec: 10,
            metrics_addr: None,
        }
    }
}

/// `[builder]`: the template-builder service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuilderConfig {
    /// The gRPC listen address (`nanobox.v1.Templates`). Default `127.0.0.1:50061`.
    pub listen_addr: SocketAddr,
    /// The `host:port` other services reach the builder at. Default: `listen_addr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<String>,
    /// Local working space for images being built; absolute. Default `<cache>/builder`.
    pub work_dir: PathBuf,
    /// Free space left in each root filesystem beyond its contents, in MiB. Default 256.
    pub rootfs_headroom_mb: u64,
    /// The most file data (MiB, holes not counted) one template's layers may write. The
    /// other conversion budgets (decompressed bytes, entries, time) are sized from it:
    /// an image that would cost more is refused, naming the budget. Default 16384.
    pub max_image_mb: u64,
    /// Where the template-builder serves Prometheus metrics (`GET /metrics`), a listener
    /// of its own. Default: none (no metrics listener).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for BuilderConfig {
    fn default() -> Self {
        Self {
            listen_addr: loopback(50061),
            advertise_addr: None,
            work_dir: cache("builder"),
            rootfs_headroom_mb: 256,
            max_image_mb: 16384,
            metrics_addr: None,
        }
    }
}

/// `[snapshot_store]`: the snapshot-store service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotStoreConfig {
    /// The gRPC listen address (`nanobox.snapshot.v1.SnapshotStore`). Default
    /// `127.0.0.1:50081`.
    pub listen_addr: SocketAddr,
    /// The `host:port` node agents reach it at. Default: `listen_addr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<String>,
    /// Where the snapshot-store will serve Prometheus metrics (`GET /metrics`), a
    /// listener of its own; reserved until the service exists. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for SnapshotStoreConfig {
    fn default() -> Self {
        Self {
            listen_addr: loopback(50081),
            advertise_addr: None,
            metrics_addr: None,
        }
    }
}

/// `[auth]`: authentication of calls between NanoBox services.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The token services present to each other (at least 16 characters). Default none:
    /// internal calls are not authenticated (single machine, loopback only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_token: Option<Secret>,
    /// A file holding the token (its first line); absolute. Not together with
    /// `service_token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_token_file: Option<PathBuf>,
}
