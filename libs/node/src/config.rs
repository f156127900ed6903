//! What a node is configured with (the service builds this from `nanobox.toml`).

use std::path::PathBuf;
use std::time::Duration;

use nanobox_core::TemplateName;

/// How much of the host sandboxes may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// vCPUs to hand out (may exceed the host's cores: vCPUs are time-shared).
    pub vcpus: u32,
    /// Guest memory to hand out, in MiB.
    pub memory_mb: u64,
    /// Sandboxes at once (pooled VMs not counted).
    pub max_sandboxes: u32,
}

/// A warm pool for one template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolTarget {
    pub template: TemplateName,
    /// VMs kept booted and ready.
    pub min_ready: u32,
    /// Never more than this many ready VMs.
    pub max_ready: u32,
    /// The size of pooled VMs; creates asking for another size boot cold.
    pub vcpus: u32,
    pub memory_mb: u32,
    /// The network mode pooled VMs are booted with (their device and firewall exist
    /// from boot); creates asking for another mode boot cold.
    pub network_mode: nanobox_core::NetworkMode,
}

/// Warm pool settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// How often pools are topped up (and also right after a VM is taken).
    pub replenish_interval: Duration,
    /// A ready VM unused for this long is retired (and replaced while under min_ready).
    pub max_idle: Duration,
    /// Pool VMs booted at once (at least one).
    pub max_parallel_boots: usize,
    pub targets: Vec<PoolTarget>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            replenish_interval: Duration::from_secs(5),
            max_idle: Duration::from_secs(600),
            max_parallel_boots: 1,
            targets: Vec::new(),
        }
    }
}

/// Everything a [`crate::Node`] needs to know.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    /// Records (`vms/`), copy-on-write disks (`disks/`), VMM run directories (`run/`) and
    /// the template cache (`templates/`) live here.
    pub state_dir: PathBuf,
    /// Where paused sandboxes' snapshots (memory and device state) are kept.
    pub snapshot_dir: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    pub capacity: Capacity,
    /// A sandbox's lifetime when the request gives none.
    pub default_timeout: Duration,
    /// The longest lifetime a request (or keepalive) may ask for.
    pub max_timeout: Duration,
    /// How sandbox disks are cloned from templates.
    pub cow: nanobox_node_storage::CowPreference,
    /// Extra writable space added to each sandbox's disk, in bytes.
    pub disk_headroom_bytes: u64,
    /// Local template cache budget, in bytes.
    pub template_cache_bytes: u64,
    /// cgroup parent (a path segment under the cgroup root) for VMM processes.
    pub cgroup_parent: String,
    /// Memory a VMM process may use beyond its guest's RAM (device emulation, the TCG
    /// translation cache), for its cgroup limit.
    pub vmm_overhead_mb: u64,
    /// How long a guest may take to boot before the create fails.
    pub boot_timeout: Duration,
    pub pool: PoolConfig,
    /// Sandbox networking; `None` runs VMs without network namespaces and allows only
    /// isolated sandboxes.
    pub network: Option<nanobox_net::NodeNetworkConfig>,
    /// The egress limit of internet-mode sandboxes whose request sets none, bytes/s.
    pub default_rate_limit: Option<u64>,
}

impl NodeConfig {
    /// Defaults for one machine, with state under `state_dir`.
    pub fn new(node_id: impl Into<String>, state_dir: PathBuf, kernel: PathBuf) -> Self {
        Self {
            node_id: node_id.into(),
            snapshot_dir: state_dir.join("snapshots"),
            state_dir,
            kernel,
            capacity: Capacity {
                vcpus: 64,
                memory_mb: 16 * 1024,
                max_sandboxes: 256,
            },
            default_timeout: Duration::from_secs(300),
            max_timeout: nanobox_core::MAX_SANDBOX_TIMEOUT,
            cow: nanobox_node_storage::CowPreference::Auto { qcow2: true },
            disk_headroom_bytes: 0,
            template_cache_bytes: 20 << 30,
            cgroup_parent: "nanobox".to_owned(),
            vmm_overhead_mb: 192,
            boot_timeout: Duration::from_secs(120),
            pool: PoolConfig::default(),
            network: None,
            default_rate_limit: None,
        }
    }
}
