//! `nanobox.toml` text for the services tests and benchmarks start: a node agent's own
//! sections ([`AgentConfig`]) and the sections every service of a test cluster shares
//! ([`storage_sections`], [`cluster_sections`]), and a node's warm pool
//! ([`pool_sections`]).
//!
//! Strings are written as TOML basic strings by Rust's debug quoting, which escapes what
//! TOML needs escaped in the paths, addresses and names used here.

use std::path::Path;

use crate::netns::{NodeNet, WAN_FAR, WAN_IFACE};
use crate::postgres::Postgres;

/// The bridge every test node makes in its host namespace.
pub const BRIDGE_NAME: &str = "nbxbr0";
/// The sandbox subnet of every test node (private to its host namespace).
pub const SUBNET: &str = "10.100.0.0/16";
/// The bridge's address: the subnet's gateway.
pub const BRIDGE_ADDRESS: &str = "10.100.0.1";

/// A node agent's `[agent]`, `[qemu]` and `[network]` sections, and whatever follows.
#[derive(Debug, Clone, Copy)]
pub struct AgentConfig<'a> {
    /// `[agent] node_id`.
    pub node_id: &'a str,
    /// `[agent] scheduler_addr`: the scheduler it registers with, if any.
    pub scheduler_addr: Option<&'a str>,
    /// `[agent] state_dir`.
    pub state_dir: &'a Path,
    /// `[agent] capacity_vcpus`.
    pub capacity_vcpus: u32,
    /// `[agent] capacity_memory_mb`.
    pub capacity_memory_mb: u64,
    /// `[agent] run_as_user`: the user every VMM drops to once its devices are open.
    pub run_as_user: Option<&'a str>,
    /// `[qemu] kernel`.
    pub kernel: &'a Path,
    /// The rest of the file, verbatim: `[database]`, `[object_store]`, pools...
    pub rest: &'a str,
}

impl AgentConfig<'_> {
    /// The file's text, for a node in the namespaces `net` (its `host_netns`, `netns_prefix`
    /// and host interface).
    pub fn to_toml(&self, net: &NodeNet) -> String {
        let mut agent = format!(
            "[agent]\nnode_id = {:?}\nlisten_addr = \"127.0.0.1:0\"\n",
            self.node_id
        );
        if let Some(addr) = self.scheduler_addr {
            agent.push_str(&format!("scheduler_addr = {addr:?}\n"));
        }
        agent.push_str(&format!(
            "state_dir = {:?}\ncapacity_vcpus = {}\ncapacity_memory_mb = {}\n",
            self.state_dir.display().to_string(),
            self.capacity_vcpus,
            self.capacity_memory_mb,
        ));
        if let Some(user) = self.run_as_user {
            agent.push_str(&format!("run_as_user = {user:?}\n"));
        }
        // Guests resolve through the far end when there is one, else through the bridge
        // (where nothing answers: an isolated node has nothing to resolve).
        let dns_server = match net.internet {
            Some(_) => WAN_FAR.to_string(),
            None => BRIDGE_ADDRESS.to_owned(),
        };
        format!(
            "{agent}\n[qemu]\nkernel = {kernel:?}\n\n\
             [network]\nbridge_name = \"{BRIDGE_NAME}\"\nsubnet = \"{SUBNET}\"\n\
             host_iface = \"{WAN_IFACE}\"\ndns_server = \"{dns_server}\"\n\
             host_netns = {host:?}\nnetns_prefix = {prefix:?}\n\n{rest}\n",
            kernel = self.kernel.display().to_string(),
            host = net.host,
            prefix = net.sandbox_prefix(),
            rest = self.rest,
        )
    }
}

/// `[database]` (database `db` of `pg`) and `[object_store]` (a local store in
/// `objects`).
pub fn storage_sections(pg: &Postgres, db: &tokio_postgres::Config, objects: &Path) -> String {
    format!(
        "[database]\nurl = {url:?}\n\n[object_store]\nlocation = {location:?}\n",
        url = pg.url(db),
        location = format!("file://{}", objects.display()),
    )
}

/// `[scheduler]` and `[auth]` of a test cluster: heartbeats every 300 ms, a node lost
/// after `node_lost_after_sec` without one, and the service token `token`.
pub fn cluster_sections(token: &str, node_lost_after_sec: u32) -> String {
    format!(
        "[scheduler]\nheartbeat_interval_ms = 300\nnode_lost_after_sec = {node_lost_after_sec}\n\n\
         [auth]\nservice_token = {token:?}\n"
    )
}

/// `[pool]` keeping `ready` VMs (1 vCPU, 128 MiB) of `template` booted ahead, refilled
/// every second and retired after `max_idle_sec` unused.
pub fn pool_sections(template: &str, ready: u32, max_idle_sec: u64) -> String {
    format!(
        "[pool]\nreplenish_interval_sec = 1\nmax_idle_sec = {max_idle_sec}\n\n\
         [[pool.templates]]\nname = {template:?}\nmin_ready = {ready}\nmax_ready = {ready}\n\
         vcpus = 1\nmemory_mb = 128\n"
    )
}
