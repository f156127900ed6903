//! The node's side of sandbox networking: the bridge and host rules set up once
//! ([`NodeNetwork::setup`]), and per sandbox a namespace with its TAP, veth, NAT,
//! policy and rate limit ([`NodeNetwork::create`], [`NodeNetwork::destroy`]).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nanobox_core::NetworkMode;
use nanobox_vmm::RateLimit;

use crate::firewall::{self, HostRules, SandboxRules};
use crate::netlink::Netlink;
use crate::registry::{Record, Registry};
use crate::sandbox::{
    host_veth_name, mac_text, RateLimiter, SandboxInterface, SandboxNetwork, GATEWAY_ADDRESS,
    GUEST_ADDRESS, GUEST_MAC, GUEST_PREFIX_LEN, TAP_MAC, TAP_NAME, UPLINK_NAME,
};
use crate::scope::valid_scope;
use crate::{command, netns, shaping, tap, Ipv4Cidr, NetError};

/// The node's network settings. The agent builds them from the `[network]` section of
/// its `nanobox.toml` (`nanobox_config::NetworkConfig`), resolving its defaults (the
/// host interface of the default route, a namespace name to its path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNetworkConfig {
    /// The bridge every sandbox's veth joins, e.g. `nanobox-br0`.
    pub bridge_name: String,
    /// Routable sandbox addresses; the first host address is the bridge's (the gateway).
    pub subnet: Ipv4Cidr,
    /// The interface internet-mode traffic is NATed out of, e.g. `eth0`.
    pub host_iface: String,
    /// The resolver guests' DNS queries are forwarded to.
    pub dns_server: Ipv4Addr,
    /// Addresses or prefixes of the node's internal services, reachable in internal mode
    /// (and internet mode).
    pub internal_services: Vec<Ipv4Cidr>,
    /// The namespace holding the bridge and host rules (`/run/netns/<name>`). `None`: the
    /// agent's own namespace, the root namespace in production. Tests give one they made.
    pub host_netns: Option<PathBuf>,
    /// Sandbox namespaces are `/run/netns/<prefix><sandbox id>` (production: `nbx-`);
    /// only names with this prefix are ever cleaned up.
    pub netns_prefix: String,
    /// Where the lease file lives.
    pub state_dir: PathBuf,
    /// Who enforces rate limits: `tc` (QEMU) or the VMM (Firecracker).
    pub rate_limiter: RateLimiter,
}

impl NodeNetworkConfig {
    /// Checks what can be checked without touching the system.
    pub fn validate(&self) -> Result<(), NetError> {
        let bad = |msg: String| Err(NetError::InvalidConfig(msg));
        for (what, name) in [
            ("bridge_name", &self.bridge_name),
            ("host_iface", &self.host_iface),
        ] {
            if !valid_ifname(name) {
                return bad(format!(
                    "{what} {name:?} is not an interface name (1-15 of [A-Za-z0-9_.-])"
                ));
            }
        }
        let prefix_ok = !self.netns_prefix.is_empty()
            && self.netns_prefix.len() <= 32
            && self
                .netns_prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !prefix_ok {
            return bad(format!(
                "netns_prefix {:?} must be 1-32 of [a-z0-9-]",
                self.netns_prefix
            ));
        }
        if self.subnet.prefix_len() > 29 {
            return bad(format!("subnet {} is too small (at most /29)", self.subnet));
        }
        let subnet = self.subnet;
        for service in &self.internal_services {
            // A service prefix covering sandbox addresses would let every mode reach
            // every sandbox through the services rule.
            if subnet.contains(service.network()) || service.contains(subnet.network()) {
                return bad(format!(
                    "internal service {service} overlaps the subnet {subnet}"
                ));
            }
        }
        Ok(())
    }

    /// The bridge's address: the subnet's first host, the sandboxes' gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.nth(1).unwrap_or(Ipv4Addr::UNSPECIFIED)
    }
}

fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn parse_mode(text: &str) -> NetworkMode {
    match text {
        "internal" => NetworkMode::Internal,
        "internet" => NetworkMode::Internet,
        _ => NetworkMode::Isolated,
    }
}

/// Sandbox networking on one node. Cheap to clone; every method may run concurrently
/// for different sandboxes (the agent serialises calls for one sandbox).
#[derive(Debug, Clone)]
pub struct NodeNetwork {
    config: NodeNetworkConfig,
    registry: Registry,
}

impl NodeNetwork {
    /// Sets up the node: the bridge with the gateway address, forwarding, and the host
    /// rules (rebuilt from the lease file, so an agent restart keeps internet-mode
    /// sandboxes online). Idempotent: run it at every agent start.
    pub async fn setup(config: NodeNetworkConfig) -> Result<Self, NetError> {
        config.validate()?;
        let gateway = config.gateway();
        let mut reserved = vec![gateway];
        if config.subnet.contains(config.dns_server) {
            reserved.push(config.dns_server);
        }
        let registry = {
            let (dir, subnet) = (config.state_dir.clone(), config.subnet);
            blocking(move || Registry::open(&dir, subnet, reserved)).await?
        };
        let node = Self { config, registry };
        let host = node.host_ns();
        let nl = Netlink::connect(host).await?;
        let bridge = nl.ensure_bridge(&node.config.bridge_name).await?;
        nl.add_address(bridge, gateway, node.config.subnet.prefix_len())
            .await?;
        nl.up(bridge).await?;
        netns::sysctl(host, "net.ipv4.ip_forward", "1").await?;
        let records = node.records().await?;
        let internet: Vec<Ipv4Addr> = records
            .values()
            .filter(|r| parse_mode(&r.mode) == NetworkMode::Internet)
            .filter_map(|r| r.address)
            .collect();
        let rules = firewall::host_ruleset(&HostRules {
            bridge: &node.config.bridge_name,
            host_iface: &node.config.host_iface,
            subnet: node.config.subnet,
            dns: node.config.dns_server,
            services: &node.config.internal_services,
            internet: &internet,
        });
        command::run(host, "nft", &["-f", "-"], Some(&rules)).await?;
        tracing::info!(
            bridge = %node.config.bridge_name,
            subnet = %node.config.subnet,
            sandboxes = records.len(),
            "node network ready"
        );
        Ok(node)
    }

    /// The configuration in force.
    pub fn config(&self) -> &NodeNetworkConfig {
        &self.config
    }

    fn host_ns(&self) -> Option<&Path> {
        self.config.host_netns.as_deref()
    }

    /// The namespace name of sandbox `id`.
    pub fn netns_name(&self, id: &str) -> String {
        format!("{}{id}", self.config.netns_prefix)
    }

    /// Creates the network of sandbox `id`: its namespace, and unless `mode` is
    /// isolated a TAP with the fixed guest address behind 1:1 NAT to a leased subnet
    /// address, the mode's firewall, and the rate limit (applied in any mode that has an
    /// interface; `nanobox_core::NetworkSpec` allows one in internet mode only). On
    /// failure everything this call made is removed again. A record left by a create
    /// that crashed half-way is reused, with its address and rate limit.
    ///
    /// `tenant_scope` (`nanobox_core::NetworkSpec::tenant_scope`; an empty one means
    /// none): internal and internet sandboxes of the same scope reach each other, and
    /// no sandbox of another scope or without one. Internal sandboxes without a scope
    /// reach each other, as they did before scopes existed. See the crate docs.
    pub async fn create(
        &self,
        id: &str,
        mode: NetworkMode,
        rate_limit: Option<RateLimit>,
        tenant_scope: Option<&str>,
    ) -> Result<SandboxNetwork, NetError> {
        if !valid_id(id) {
            return Err(NetError::InvalidId(id.to_owned()));
        }
        let scope = tenant_scope.filter(|s| !s.is_empty());
        if let Some(scope) = scope {
            if !valid_scope(scope) {
                return Err(NetError::InvalidScope(scope.to_owned()));
            }
        }
        let name = self.netns_name(id);
        if netns::path(&name).exists() {
            return Err(NetError::AlreadyExists(id.to_owned()));
        }
        let (record, new) = {
            let (reg, id, mode_text) = (self.registry.clone(), id.to_owned(), mode.as_str());
            let rate = rate_limit.map(|r| (r.rate_bytes_per_sec, r.burst_bytes));
            let scope_owned = scope.map(str::to_owned);
            blocking(move || {
                reg.insert(
                    &id,
                    mode_text,
                    mode != NetworkMode::Isolated,
                    rate,
                    scope_owned.as_deref(),
                )
            })
            .await?
        };
        // One for another mode or scope means a caller confused two sandboxes.
        if record.mode != mode.as_str() || record.scope.as_deref() != scope {
            return Err(NetError::AlreadyExists(id.to_owned()));
        }
        let release = || async {
            if new {
                let (reg, key) = (self.registry.clone(), id.to_owned());
                if let Err(e) = blocking(move || reg.remove(&key)).await {
                    tracing::warn!(sandbox_id = id, error = %e, "releasing the lease of a failed create");
                }
            }
        };
        // Outside the clean-up below: a namespace that exists already belongs to a
        // concurrent create of the same id, which this failure must not tear down.
        let path = match netns::create(&name).await {
            Ok(path) => path,
            Err(e) => {
                release().await;
                return Err(match e {
                    NetError::Io { source, .. }
                        if source.kind() == std::io::ErrorKind::AlreadyExists =>
                    {
                        NetError::AlreadyExists(id.to_owned())
                    }
                    e => e,
                });
            }
        };
        match self.build(id, &path, &record).await {
            Ok(network) => {
                tracing::info!(sandbox_id = id, %mode, tenant_scope = ?scope, address = ?record.address, "sandbox network created");
                Ok(network)
            }
            Err(e) => {
                tracing::warn!(sandbox_id = id, error = %e, "sandbox network failed; removing what was made");
                if let Err(cleanup) = self.remove_resources(&name, &record).await {
                    tracing::warn!(sandbox_id = id, error = %cleanup, "cleanup after a failed create");
                }
                release().await;
                Err(e)
            }
        }
    }

    /// Fills the fresh namespace at `path`.
    async fn build(
        &self,
        id: &str,
        path: &Path,
        record: &Record,
    ) -> Result<SandboxNetwork, NetError> {
        let mode = parse_mode(&record.mode);
        let ns = Some(path);
        // The policy is IPv4 (`table ip`): with IPv6 off in the namespace a guest has no
        // IPv6 path at all, not even to the namespace's own link-local addresses. Set
        // before any device exists, so that every device inherits it.
        for scope in ["all", "default"] {
            let key = format!("net.ipv6.conf.{scope}.disable_ipv6");
            match netns::sysctl(ns, &key, "1").await {
                // A kernel without IPv6: nothing to turn off.
                Err(NetError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        let Some(routable) = record.address else {
            return Ok(self.network(id, record));
        };
        // Rules first (they name devices, which need not exist yet): no packet ever
        // crosses the namespace unfiltered.
        let peers = match (mode, &record.scope, record.block) {
            (NetworkMode::Internet, None, _) => None,
            (_, _, Some(block)) => Some(block),
            // A lease from before scopes: its peers were the whole subnet.
            (_, _, None) => Some(self.config.subnet),
        };
        let rules = firewall::sandbox_ruleset(&SandboxRules {
            mode,
            routable,
            subnet: self.config.subnet,
            gateway: self.config.gateway(),
            dns: self.config.dns_server,
            services: &self.config.internal_services,
            peers,
        });
        command::run(ns, "nft", &["-f", "-"], Some(&rules)).await?;
        let inside = Netlink::connect(ns).await?;
        let lo = inside.require("lo").await?;
        inside.up(lo).await?;

        netns::run_in(ns, || tap::create_persistent(TAP_NAME))
            .await
            .map_err(|e| {
                NetError::io(format!("creating TAP {TAP_NAME} in {}", path.display()), e)
            })?;
        let tap = inside.require(TAP_NAME).await?;
        inside.set_mac(tap, TAP_MAC).await?;
        inside
            .add_address(tap, GATEWAY_ADDRESS, GUEST_PREFIX_LEN)
            .await?;
        inside.up(tap).await?;

        // The pair is made inside the fresh namespace, where the fixed name cannot
        // collide, and its host end moved out.
        let veth = host_veth_name(routable);
        let host = Netlink::connect(self.host_ns()).await?;
        if let Some(stale) = host.index(&veth).await? {
            // Left by a crash: the address is leased to this sandbox now.
            host.delete(stale).await?;
        }
        inside.add_veth(UPLINK_NAME, &veth).await?;
        let outer = inside.require(&veth).await?;
        inside.move_to(outer, &netns::open(self.host_ns())?).await?;
        let outer = host.require(&veth).await?;
        let bridge = host.require(&self.config.bridge_name).await?;
        host.set_controller(outer, bridge).await?;
        host.up(outer).await?;

        let uplink = inside.require(UPLINK_NAME).await?;
        inside
            .add_address(uplink, routable, self.config.subnet.prefix_len())
            .await?;
        inside.up(uplink).await?;
        inside.add_default_route(self.config.gateway()).await?;
        netns::sysctl(ns, "net.ipv4.ip_forward", "1").await?;

        let network = self.network(id, record);
        if let (Some(limit), RateLimiter::Tc) = (
            network.interface.as_ref().and_then(|i| i.rate_limit),
            self.config.rate_limiter,
        ) {
            shaping::apply(path, limit).await?;
        }
        if mode == NetworkMode::Internet {
            let member = firewall::internet_member(routable, true);
            command::run(self.host_ns(), "nft", &["-f", "-"], Some(&member)).await?;
        }
        Ok(network)
    }

    /// The network of `id` as recorded.
    fn network(&self, id: &str, record: &Record) -> SandboxNetwork {
        SandboxNetwork {
            id: id.to_owned(),
            mode: parse_mode(&record.mode),
            tenant_scope: record.scope.clone(),
            netns: netns::path(&self.netns_name(id)),
            interface: record.address.map(|routable| SandboxInterface {
                tap: TAP_NAME.to_owned(),
                mac: mac_text(GUEST_MAC),
                guest_address: GUEST_ADDRESS,
                prefix_len: GUEST_PREFIX_LEN,
                gateway: GATEWAY_ADDRESS,
                dns: vec![GATEWAY_ADDRESS],
                routable_address: routable,
                host_veth: host_veth_name(routable),
                rate_limit: record.rate_limit.map(|(rate, burst)| RateLimit {
                    rate_bytes_per_sec: rate,
                    burst_bytes: burst,
                }),
                rate_limiter: self.config.rate_limiter,
            }),
        }
    }

    /// The network of sandbox `id`, if it has one (after an agent restart too).
    pub async fn get(&self, id: &str) -> Result<Option<SandboxNetwork>, NetError> {
        let (reg, key) = (self.registry.clone(), id.to_owned());
        let record = blocking(move || reg.get(&key)).await?;
        Ok(record.map(|r| self.network(id, &r)))
    }

    /// Every sandbox network on record.
    pub async fn list(&self) -> Result<Vec<SandboxNetwork>, NetError> {
        Ok(self
            .records()
            .await?
            .iter()
            .map(|(id, r)| self.network(id, r))
            .collect())
    }

    async fn records(&self) -> Result<std::collections::BTreeMap<String, Record>, NetError> {
        let reg = self.registry.clone();
        blocking(move || reg.all()).await
    }

    /// Removes the network of sandbox `id`: its host-side veth, its membership in the
    /// host rules, its namespace (with the TAP, NAT and rules inside), and then its
    /// lease. Idempotent: destroying an unknown or half-made sandbox succeeds. Stop the
    /// VMM first; a VMM still running keeps its namespace alive (unreachable) until it
    /// exits.
    pub async fn destroy(&self, id: &str) -> Result<(), NetError> {
        if !valid_id(id) {
            return Err(NetError::InvalidId(id.to_owned()));
        }
        let (reg, key) = (self.registry.clone(), id.to_owned());
        let record = blocking(move || reg.get(&key)).await?;
        let name = self.netns_name(id);
        match &record {
            Some(record) => self.remove_resources(&name, record).await?,
            None => {
                netns::delete(&name)?;
            }
        }
        // The lease goes last: until everything using the address is gone, it must not
        // be handed to another sandbox.
        let (reg, key) = (self.registry.clone(), id.to_owned());
        blocking(move || reg.remove(&key)).await?;
        if record.is_some() {
            tracing::info!(sandbox_id = id, "sandbox network destroyed");
        }
        Ok(())
    }

    async fn remove_resources(&self, name: &str, record: &Record) -> Result<(), NetError> {
        if let Some(addr) = record.address {
            if parse_mode(&record.mode) == NetworkMode::Internet {
                let member = firewall::internet_member(addr, false);
                command::run(self.host_ns(), "nft", &["-f", "-"], Some(&member)).await?;
            }
            // Deleting one end of a veth deletes both; done explicitly because a
            // namespace is freed asynchronously (or only when its VMM exits), and the
            // host end must be gone when destroy returns.
            let host = Netlink::connect(self.host_ns()).await?;
            if let Some(index) = host.index(&host_veth_name(addr)).await? {
                host.delete(index).await?;
            }
        }
        netns::delete(name)?;
        Ok(())
    }

    /// After a crash: destroys every sandbox network on record, every namespace with
    /// this node's prefix and every link on the bridge that does not belong to a sandbox
    /// in `known` (the ones the agent still runs). Returns the ids it removed.
    pub async fn cleanup_orphans(&self, known: &[&str]) -> Result<Vec<String>, NetError> {
        let known: HashSet<&str> = known.iter().copied().collect();
        let mut removed = Vec::new();
        for id in self.records().await?.keys() {
            if !known.contains(id.as_str()) {
                self.destroy(id).await?;
                removed.push(id.clone());
            }
        }
        for name in netns::list(&self.config.netns_prefix)? {
            let id = &name[self.config.netns_prefix.len()..];
            if !known.contains(id) && netns::delete(&name)? {
                tracing::info!(netns = %name, "removed an orphaned namespace");
                removed.push(id.to_owned());
            }
        }
        let kept: HashSet<String> = self
            .records()
            .await?
            .values()
            .filter_map(|r| r.address.map(host_veth_name))
            .collect();
        let host = Netlink::connect(self.host_ns()).await?;
        if let Some(bridge) = host.index(&self.config.bridge_name).await? {
            for (index, name, controller) in host.links().await? {
                if controller == Some(bridge) && !kept.contains(&name) {
                    tracing::info!(link = %name, "removed an orphaned veth");
                    host.delete(index).await?;
                }
            }
        }
        removed.sort();
        removed.dedup();
        Ok(removed)
    }

    /// Removes the host rules and the bridge (uninstalling the node). Destroy the
    /// sandboxes first: their namespaces are left alone.
    pub async fn teardown(&self) -> Result<(), NetError> {
        let rules = format!("table ip {0}\ndelete table ip {0}\n", firewall::TABLE);
        command::run(self.host_ns(), "nft", &["-f", "-"], Some(&rules)).await?;
        let host = Netlink::connect(self.host_ns()).await?;
        if let Some(bridge) = host.index(&self.config.bridge_name).await? {
            host.delete(bridge).await?;
        }
        Ok(())
    }
}

/// File locking and fsync belong off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NetError> + Send + 'static,
) -> Result<T, NetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NetError::io("the lease file task failed", std::io::Error::other(e)))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeNetworkConfig {
        NodeNetworkConfig {
            bridge_name: "nanobox-br0".into(),
            subnet: "10.100.0.0/16".parse().unwrap(),
            host_iface: "eth0".into(),
            dns_server: "10.100.0.1".parse().unwrap(),
            internal_services: vec![],
            host_netns: None,
            netns_prefix: "nbx-".into(),
            state_dir: "/var/lib/nanobox/net".into(),
            rate_limiter: RateLimiter::Tc,
        }
    }

    #[test]
    fn config_validation() {
        assert!(config().validate().is_ok());
        assert_eq!(config().gateway(), Ipv4Addr::new(10, 100, 0, 1));
        let mut c = config();
        c.bridge_name = "a-name-longer-than-15".into();
        assert!(c.validate().is_err());
        let mut c = config();
        c.host_iface = "eth0\"; drop".into();
        assert!(c.validate().is_err());
        let mut c = config();
        c.netns_prefix = "Bad/".into();
        assert!(c.validate().is_err());
        let mut c = config();
        c.internal_services = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(c.validate().unwrap_err().to_string().contains("overlaps"));
        let mut c = config();
        c.subnet = "10.100.0.0/30".parse().unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn ids_name_namespaces_safely() {
        assert!(valid_id("sbx-0123"));
        for bad in ["", "UP", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
