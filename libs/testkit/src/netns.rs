//! Private network namespaces for tests and benchmarks, so that nothing is configured in,
//! or sent to, the root namespace or any address outside them.
//!
//! [`Netns`] creates namespaces under a prefix unique to one test and removes, on drop (on
//! panic too), every namespace under that prefix: those it made and those others made
//! under it, such as the sandbox namespaces of a node agent configured with
//! [`NodeNet::sandbox_prefix`].
//!
//! [`NodeNet`] is the world a node agent runs in: a private "host" namespace standing in for
//! the node's root namespace, whose host interface `wan0` leads to a stand-in for the
//! internet or nowhere.

use std::net::Ipv4Addr;

use crate::process::run;

/// The host interface's address in the host namespace.
pub const WAN_HOST: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 1);
/// The far end of the host interface: the "internet" namespace's address.
pub const WAN_FAR: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 2);
/// The name of the veth pair joining a host namespace to the internet (both ends).
pub const WAN_IFACE: &str = "wan0";

/// Namespaces under one unique prefix, all removed on drop.
#[derive(Debug)]
pub struct Netns {
    prefix: String,
}

impl Netns {
    /// A fresh prefix: `tag` (a few of `[a-z0-9]` saying which test made it), eight random
    /// hex digits and a dash. Namespace names are global to the host: the random part
    /// keeps tests running in parallel (and leftovers of a killed run) apart.
    pub fn new(tag: &str) -> Self {
        Self {
            prefix: format!("{tag}{:08x}-", rand::random::<u32>()),
        }
    }

    /// The prefix of every namespace this guard removes.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Creates the namespace `<prefix><suffix>` with its loopback up; returns its name.
    pub fn add(&self, suffix: &str) -> String {
        let name = format!("{}{suffix}", self.prefix);
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// The namespaces under the prefix now, sorted.
    pub fn list(&self) -> Vec<String> {
        list(&self.prefix)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in self.list() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .status();
        }
    }
}

/// The namespaces whose names start with `prefix` now, sorted.
pub fn list(prefix: &str) -> Vec<String> {
    nanobox_stack::network::namespaces_with_prefix(prefix)
}

/// Joins the namespace `host` to `far` by a veth pair named [`WAN_IFACE`] at both ends,
/// [`WAN_HOST`]/24 on the host's end and [`WAN_FAR`]/24 on the other, both up. The pair
/// is made inside `host`, so no name ever appears in the root namespace.
pub fn link_wan(host: &str, far: &str) {
    run(&[
        "ip", "-n", host, "link", "add", WAN_IFACE, "type", "veth", "peer", "name", WAN_IFACE,
        "netns", far,
    ]);
    for (ns, addr) in [(host, WAN_HOST), (far, WAN_FAR)] {
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            WAN_IFACE,
        ]);
        run(&["ip", "-n", ns, "link", "set", WAN_IFACE, "up"]);
    }
}

/// Adds a route to `dest` (a prefix, or `default`) via `gateway` in the namespace `ns`.
pub fn add_route(ns: &str, dest: &str, gateway: Ipv4Addr) {
    run(&[
        "ip",
        "-n",
        ns,
        "route",
        "add",
        dest,
        "via",
        &gateway.to_string(),
    ]);
}

/// The network a node agent runs in: its "host" namespace (`host_netns`, where the agent
/// makes its bridge and NAT rules) with the host interface [`WAN_IFACE`], and every
/// namespace the agent makes for its sandboxes, under [`NodeNet::sandbox_prefix`]. All of
/// it is removed on drop.
#[derive(Debug)]
pub struct NodeNet {
    /// The node's host namespace.
    pub host: String,
    /// The stand-in for the internet at [`WAN_FAR`], if there is one.
    pub internet: Option<String>,
    // Last: dropped after the names above are of no more use.
    netns: Netns,
}

impl NodeNet {
    /// A host namespace (`<prefix>host`) whose default route leads over [`WAN_IFACE`] to an
    /// "internet" namespace (`<prefix>inet`) at [`WAN_FAR`].
    pub fn with_internet(tag: &str) -> Self {
        let netns = Netns::new(tag);
        let host = netns.add("host");
        let internet = netns.add("inet");
        link_wan(&host, &internet);
        add_route(&host, "default", WAN_FAR);
        Self {
            host,
            internet: Some(internet),
            netns,
        }
    }

    /// A host namespace (`<prefix>host`) whose host interface [`WAN_IFACE`] is one end of a
    /// veth pair that stays inside it (its peer is `wan1`): nothing leaves the namespace.
    pub fn isolated(tag: &str) -> Self {
        let netns = Netns::new(tag);
        let host = netns.add("host");
        run(&[
            "ip", "-n", &host, "link", "add", WAN_IFACE, "type", "veth", "peer", "name", "wan1",
        ]);
        run(&["ip", "-n", &host, "link", "set", WAN_IFACE, "up"]);
        Self {
            host,
            internet: None,
            netns,
        }
    }

    /// The prefix of every namespace of this node.
    pub fn prefix(&self) -> &str {
        self.netns.prefix()
    }

    /// The internet namespace; panics for an isolated node.
    pub fn internet(&self) -> &str {
        self.internet
            .as_deref()
            .unwrap_or_else(|| panic!("{} has no internet namespace", self.host))
    }

    /// The prefix for the namespaces of the node's sandboxes (the agent's `netns_prefix`).
    pub fn sandbox_prefix(&self) -> String {
        format!("{}s-", self.prefix())
    }

    /// The namespaces of the node's sandboxes now, sorted.
    pub fn sandbox_namespaces(&self) -> Vec<String> {
        list(&self.sandbox_prefix())
    }
}
