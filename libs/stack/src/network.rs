//! The node's network, kept off the host's: the node agent makes its bridge, TAPs and
//! NAT rules in a "host" namespace this module creates (the agent's `[network]
//! host_netns`), and every sandbox namespace it makes is named under a prefix of the
//! same stack. Nothing is configured in the machine's own namespace, unless `--internet`
//! asks for an uplink: then one veth pair joins the host namespace to it, with a /30 of
//! 100.64.0.0/10 (shared address space, none of the private ranges) and one nftables
//! masquerade table, both named after the stack and removed when it stops.
//!
//! Names derive from the data directory, so two stacks with two data directories never
//! collide, and the leftovers of a killed run are found by name on the next start.

use std::net::Ipv4Addr;
use std::path::Path;

use crate::tool::{self, QUICK};
use crate::StackError;

/// The host interface inside the host namespace: where internet-mode sandbox traffic
/// leaves (`[network] host_iface`).
pub const HOST_IFACE: &str = "wan0";

/// Where `ip netns` keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// The sandbox network of one stack.
#[derive(Debug, Clone)]
pub struct NodeNetwork {
    /// Prefix of every namespace of this stack (`nbxup-<tag>-`).
    prefix: String,
    /// The names and addresses of the uplink to this machine's namespace: made with
    /// `--internet`, removed whatever the mode (an earlier run may have had one).
    uplink: Uplink,
    /// Whether [`NodeNetwork::create`] makes the uplink.
    internet: bool,
}

/// The veth pair and masquerade table of `--internet`.
#[derive(Debug, Clone)]
struct Uplink {
    /// The pair's end in this machine's namespace (at most 15 characters).
    root_link: String,
    /// Its address; the host namespace's default route.
    root_addr: Ipv4Addr,
    /// The host namespace's end's address.
    host_addr: Ipv4Addr,
    /// The nftables table holding the masquerade rule.
    table: String,
}

impl NodeNetwork {
    /// The network of the stack whose data directory is `data_dir`.
    pub fn new(data_dir: &Path, internet: bool) -> Self {
        let tag = tag(data_dir);
        // Two bytes of the tag pick the /30 inside 100.127.0.0/16.
        let third = (tag >> 8) as u8;
        let fourth = (tag as u8) & 0xfc;
        let uplink = Uplink {
            root_link: format!("nbxup{tag:06x}"),
            root_addr: Ipv4Addr::new(100, 127, third, fourth + 1),
            host_addr: Ipv4Addr::new(100, 127, third, fourth + 2),
            table: format!("nanobox_up_{tag:06x}"),
        };
        Self {
            prefix: format!("nbxup-{tag:06x}-"),
            uplink,
            internet,
        }
    }

    /// The host namespace's name (`[network] host_netns`).
    pub fn host_netns(&self) -> String {
        format!("{}host", self.prefix)
    }

    /// The prefix of the sandbox namespaces (`[network] netns_prefix`): under the stack's
    /// own, so removing the stack's namespaces removes any a killed agent left.
    pub fn sandbox_prefix(&self) -> String {
        format!("{}s-", self.prefix)
    }

    /// Whether sandboxes in internet mode can reach anything.
    pub fn has_uplink(&self) -> bool {
        self.internet
    }

    /// Creates the host namespace and its host interface (and the uplink). What an
    /// earlier run of this stack left must have been removed first ([`NodeNetwork::remove`]).
    pub async fn create(&self) -> Result<(), StackError> {
        let host = self.host_netns();
        ip(&["netns", "add", &host]).await?;
        ip(&["-n", &host, "link", "set", "lo", "up"]).await?;
        let up = &self.uplink;
        match self.internet {
            false => {
                // A host interface whose peer stays in the namespace: the agent has its
                // NAT target, and nothing leaves.
                ip(&[
                    "-n", &host, "link", "add", HOST_IFACE, "type", "veth", "peer", "name", "wan1",
                ])
                .await?;
                ip(&["-n", &host, "link", "set", HOST_IFACE, "up"]).await?;
            }
            true => {
                ip(&[
                    "link",
                    "add",
                    &up.root_link,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    HOST_IFACE,
                    "netns",
                    &host,
                ])
                .await?;
                let root_cidr = format!("{}/30", up.root_addr);
                let host_cidr = format!("{}/30", up.host_addr);
                ip(&["addr", "add", &root_cidr, "dev", &up.root_link]).await?;
                ip(&["link", "set", &up.root_link, "up"]).await?;
                ip(&["-n", &host, "addr", "add", &host_cidr, "dev", HOST_IFACE]).await?;
                ip(&["-n", &host, "link", "set", HOST_IFACE, "up"]).await?;
                ip(&[
                    "-n",
                    &host,
                    "route",
                    "add",
                    "default",
                    "via",
                    &up.root_addr.to_string(),
                ])
                .await?;
                tool::run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"], QUICK).await?;
                let ruleset = format!(
                    "table ip {table} {{\n\
                     \tchain postrouting {{\n\
                     \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
                     \t\tip saddr {host}/32 oifname != \"{link}\" masquerade\n\
                     \t}}\n\
                     \tchain forward {{\n\
                     \t\ttype filter hook forward priority filter; policy accept;\n\
                     \t\tiifname \"{link}\" accept\n\
                     \t\toifname \"{link}\" ct state established,related accept\n\
                     \t}}\n\
                     }}\n",
                    table = up.table,
                    host = up.host_addr,
                    link = up.root_link,
                );
                tool::run_with_stdin("nft", &["-f", "-"], Some(&ruleset), QUICK).await?;
            }
        }
        Ok(())
    }

    /// Removes every namespace of this stack (the host one and any sandbox one an agent
    /// left), and the uplink if there is one, with or without `--internet` now.
    /// Idempotent; the first failure is returned after every step was tried.
    pub async fn remove(&self) -> Result<(), StackError> {
        let mut first_error = None;
        for name in namespaces_with_prefix(&self.prefix) {
            if let Err(e) = ip(&["netns", "del", &name]).await {
                first_error.get_or_insert(e);
            }
        }
        let up = &self.uplink;
        // Gone with the namespace when the peer was in it; else removed here.
        if link_exists(&up.root_link) {
            if let Err(e) = ip(&["link", "del", &up.root_link]).await {
                first_error.get_or_insert(e);
            }
        }
        if tool::run("nft", &["list", "table", "ip", &up.table], QUICK)
            .await
            .is_ok()
        {
            if let Err(e) = tool::run("nft", &["delete", "table", "ip", &up.table], QUICK).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The namespaces of this stack now, sorted.
    pub fn namespaces(&self) -> Vec<String> {
        namespaces_with_prefix(&self.prefix)
    }
}

async fn ip(args: &[&str]) -> Result<String, StackError> {
    tool::run("ip", args, QUICK).await
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The named namespaces (`/run/netns`) whose names start with `prefix` now, sorted.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// 24 bits of an FNV-1a hash of the data directory's path: short enough for interface
/// names (15 characters), stable across runs.
fn tag(data_dir: &Path) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in data_dir.as_os_str().as_encoded_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash & 0x00ff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_differ_per_data_directory() {
        let a = NodeNetwork::new(Path::new("/var/lib/nanobox/up"), true);
        let b = NodeNetwork::new(Path::new("/tmp/other"), true);
        assert_ne!(a.host_netns(), b.host_netns());
        assert!(a.sandbox_prefix().starts_with(&a.prefix));
        // The agent refuses a host namespace under its own sandbox prefix.
        assert!(!a.host_netns().starts_with(&a.sandbox_prefix()));
        let up = &a.uplink;
        assert!(up.root_link.len() <= 15, "{}", up.root_link);
        assert!(a.sandbox_prefix().len() <= 32);
        // The /30 is inside 100.64.0.0/10, and the two ends are its two hosts.
        assert_eq!(up.root_addr.octets()[0], 100);
        assert_eq!(up.root_addr.octets()[3] % 4, 1);
        assert_eq!(u32::from(up.host_addr), u32::from(up.root_addr) + 1);
        assert!(!up.root_addr.is_private() && !up.host_addr.is_private());
    }
}
