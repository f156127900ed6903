//! The nftables rulesets, as text fed to `nft -f -`: each applies as one transaction,
//! so a namespace never runs with half a ruleset.
//!
//! Two places hold rules, both in one table named [`TABLE`]:
//!
//! * the **host** namespace (the bridge's): NAT of the subnet out of every interface but
//!   the bridge, and filters on what sandboxes may reach through or on the host: the
//!   resolver, the internal services, the host interface only from the addresses in the
//!   `internet` set. This is the only per-sandbox state on the host side: one set
//!   element per internet-mode sandbox.
//! * each **sandbox** namespace: the 1:1 NAT between the fixed guest address and the
//!   sandbox's routable address, DNS at the gateway address forwarded to the resolver,
//!   and the mode's policy, enforced before a packet ever reaches the shared bridge. Its
//!   peers are one prefix (its tenant scope's block, or the unscoped range), checked on
//!   the way out and on the way in, so the rules never change while it lives. It
//!   disappears with the namespace, so destroying a sandbox cannot leave a rule behind.
//!
//! Sandbox-to-sandbox traffic crosses the bridge at layer 2, where the host's IP rules
//! do not see it (unless `br_netfilter` is loaded, hence the bridge-to-bridge accept):
//! that is why each sandbox's own namespace polices what leaves and enters its guest.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use nanobox_core::NetworkMode;

use crate::sandbox::{GATEWAY_ADDRESS, GUEST_ADDRESS, TAP_NAME, UPLINK_NAME};
use crate::Ipv4Cidr;

/// The table NanoBox owns in each namespace it configures.
pub const TABLE: &str = "nanobox";

/// Link-local addresses: never forwarded for a guest (cloud metadata lives there).
const LINK_LOCAL: &str = "169.254.0.0/16";

/// What the host namespace's rules are made from.
#[derive(Debug)]
pub(crate) struct HostRules<'a> {
    pub bridge: &'a str,
    pub host_iface: &'a str,
    pub subnet: Ipv4Cidr,
    pub dns: Ipv4Addr,
    pub services: &'a [Ipv4Cidr],
    /// Routable addresses of the internet-mode sandboxes.
    pub internet: &'a [Ipv4Addr],
}

/// The host table, replacing any previous version of it atomically (the first two lines
/// make the `delete` valid whether or not the table existed).
pub(crate) fn host_ruleset(r: &HostRules<'_>) -> String {
    let HostRules {
        bridge,
        host_iface,
        subnet,
        dns,
        ..
    } = r;
    let mut text = format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    text.push_str("\tset internet {\n\t\ttype ipv4_addr\n");
    push_elements(&mut text, r.internet.iter().map(ToString::to_string));
    text.push_str("\t}\n\tset services {\n\t\ttype ipv4_addr\n\t\tflags interval\n");
    push_elements(&mut text, r.services.iter().map(ToString::to_string));
    text.push_str("\t}\n");
    let _ = write!(
        text,
        "\tchain forward {{
		type filter hook forward priority filter; policy accept;
		iifname \"{bridge}\" oifname \"{bridge}\" accept
		oifname \"{bridge}\" ct state established,related accept
		oifname \"{bridge}\" drop
		iifname \"{bridge}\" ip saddr != {subnet} drop
		iifname \"{bridge}\" ip daddr {dns} meta l4proto {{ tcp, udp }} th dport 53 accept
		iifname \"{bridge}\" ip daddr {LINK_LOCAL} drop
		iifname \"{bridge}\" ip daddr @services accept
		iifname \"{bridge}\" oifname \"{host_iface}\" ip saddr @internet accept
		iifname \"{bridge}\" drop
	}}
	chain input {{
		type filter hook input priority filter; policy accept;
		iifname \"{bridge}\" ct state established,related accept
		iifname \"{bridge}\" ip daddr {dns} meta l4proto {{ tcp, udp }} th dport 53 accept
		iifname \"{bridge}\" ip daddr @services accept
		iifname \"{bridge}\" drop
	}}
	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr {subnet} oifname != \"{bridge}\" masquerade
	}}
}}
"
    );
    text
}

fn push_elements(text: &mut String, elements: impl Iterator<Item = String>) {
    let elements: Vec<String> = elements.collect();
    if !elements.is_empty() {
        let _ = writeln!(text, "\t\telements = {{ {} }}", elements.join(", "));
    }
}

/// Adds (`present`) or removes a routable address from the host's `internet` set. The
/// removal adds first so that it succeeds whether or not the element was there (nft
/// before 1.0.8 has no `destroy`), which keeps destroy idempotent.
pub(crate) fn internet_member(addr: Ipv4Addr, present: bool) -> String {
    let add = format!("add element ip {TABLE} internet {{ {addr} }}\n");
    if present {
        add
    } else {
        format!("{add}delete element ip {TABLE} internet {{ {addr} }}\n")
    }
}

/// What a sandbox namespace's rules are made from.
#[derive(Debug)]
pub(crate) struct SandboxRules<'a> {
    pub mode: NetworkMode,
    pub routable: Ipv4Addr,
    pub subnet: Ipv4Cidr,
    /// The bridge's address: the node itself.
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
    pub services: &'a [Ipv4Cidr],
    /// The addresses of the sandboxes this one may exchange traffic with (its tenant
    /// scope's block, or the unscoped range for an unscoped internal sandbox); `None`:
    /// no peers (an unscoped internet sandbox).
    pub peers: Option<Ipv4Cidr>,
}

/// The sandbox table (a fresh namespace: nothing to replace). The rules name prefixes
/// only, never another sandbox: they stay as they are for the sandbox's whole life.
pub(crate) fn sandbox_ruleset(r: &SandboxRules<'_>) -> String {
    let SandboxRules {
        routable,
        subnet,
        gateway,
        dns,
        ..
    } = r;
    let internal = r.mode == NetworkMode::Internal;
    let mut text = format!("table ip {TABLE} {{\n");
    let _ = writeln!(
        text,
        "\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname \"{TAP_NAME}\" ip daddr {GATEWAY_ADDRESS} meta l4proto {{ tcp, udp }} th dport 53 dnat to {dns}"
    );
    if internal || r.peers.is_some() {
        // Peers (and in internal mode the node) reach the guest at the sandbox's
        // routable address; the forward chain decides who may.
        let _ = writeln!(
            text,
            "\t\tiifname \"{UPLINK_NAME}\" ip daddr {routable} dnat to {GUEST_ADDRESS}"
        );
    }
    let _ = write!(
        text,
        "\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname \"{UPLINK_NAME}\" ip saddr {GUEST_ADDRESS} snat to {routable}
\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy drop;
\t\tiifname \"lo\" accept
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy drop;
\t\tct state established,related accept
\t\tct state invalid drop
\t\tiifname \"{TAP_NAME}\" oifname \"{UPLINK_NAME}\" ip saddr {GUEST_ADDRESS} jump egress
"
    );
    let inbound = format!("iifname \"{UPLINK_NAME}\" oifname \"{TAP_NAME}\"");
    if let Some(peers) = r.peers {
        let _ = writeln!(
            text,
            "\t\t{inbound} ip saddr {peers} ip daddr {GUEST_ADDRESS} accept"
        );
    }
    // The node reaches internal sandboxes (in the unscoped range it is a peer already).
    if internal && !r.peers.is_some_and(|p| p.contains(*gateway)) {
        let _ = writeln!(
            text,
            "\t\t{inbound} ip saddr {gateway} ip daddr {GUEST_ADDRESS} accept"
        );
    }
    let _ = write!(
        text,
        "\t}}
\tchain egress {{
\t\tip daddr {dns} meta l4proto {{ tcp, udp }} th dport 53 accept
\t\tip daddr {LINK_LOCAL} drop
"
    );
    if !r.services.is_empty() {
        let services: Vec<String> = r.services.iter().map(ToString::to_string).collect();
        let _ = writeln!(text, "\t\tip daddr {{ {} }} accept", services.join(", "));
    }
    if let Some(peers) = r.peers {
        let _ = writeln!(text, "\t\tip daddr {peers} accept");
    }
    match r.mode {
        // Nothing else: the forward chain's policy drops it.
        NetworkMode::Internal => {}
        NetworkMode::Internet => {
            let _ = writeln!(text, "\t\tip daddr {subnet} drop\n\t\taccept");
        }
        // No interface, so no rules are ever built for it; refuse everything regardless.
        NetworkMode::Isolated => {}
    }
    text.push_str("\t}\n}\n");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ruleset_replaces_the_table_and_lists_members() {
        let services = ["192.0.2.0/24".parse().unwrap()];
        let text = host_ruleset(&HostRules {
            bridge: "nanobox-br0",
            host_iface: "eth0",
            subnet: "10.100.0.0/16".parse().unwrap(),
            dns: "10.100.0.1".parse().unwrap(),
            services: &services,
            internet: &["10.100.0.7".parse().unwrap(), "10.100.0.9".parse().unwrap()],
        });
        assert!(
            text.starts_with("table ip nanobox\ndelete table ip nanobox\n"),
            "{text}"
        );
        assert!(
            text.contains("elements = { 10.100.0.7, 10.100.0.9 }"),
            "{text}"
        );
        assert!(text.contains("elements = { 192.0.2.0/24 }"), "{text}");
        assert!(
            text.contains("oifname \"eth0\" ip saddr @internet accept"),
            "{text}"
        );
        assert!(text.contains("ip saddr 10.100.0.0/16 oifname != \"nanobox-br0\" masquerade"));
        // Empty sets have no elements line (nft refuses `elements = { }`).
        let empty = host_ruleset(&HostRules {
            bridge: "br",
            host_iface: "wan",
            subnet: "10.100.0.0/16".parse().unwrap(),
            dns: "10.100.0.1".parse().unwrap(),
            services: &[],
            internet: &[],
        });
        assert!(!empty.contains("elements"), "{empty}");
    }

    #[test]
    fn sandbox_policy_follows_the_mode_and_scope() {
        let rules = |mode, peers: Option<&str>| {
            sandbox_ruleset(&SandboxRules {
                mode,
                routable: "10.100.0.5".parse().unwrap(),
                subnet: "10.100.0.0/16".parse().unwrap(),
                gateway: "10.100.0.1".parse().unwrap(),
                dns: "10.100.0.1".parse().unwrap(),
                services: &[],
                peers: peers.map(|p| p.parse().unwrap()),
            })
        };
        let from_node = "ip saddr 10.100.0.1 ip daddr 169.254.0.2 accept";
        // Unscoped internal: the unscoped range (which holds the node) both ways.
        let internal = rules(NetworkMode::Internal, Some("10.100.0.0/17"));
        assert!(
            internal.contains("ip daddr 10.100.0.5 dnat to 169.254.0.2"),
            "{internal}"
        );
        assert!(
            internal.contains("\t\tip daddr 10.100.0.0/17 accept\n"),
            "{internal}"
        );
        assert!(
            internal.contains("ip saddr 10.100.0.0/17 ip daddr 169.254.0.2 accept"),
            "{internal}"
        );
        assert!(!internal.contains(from_node), "{internal}");
        assert!(!internal.contains("10.100.0.0/16"), "{internal}");
        assert!(
            !internal.contains("\t\taccept\n"),
            "internal must not accept everything"
        );
        // Scoped internal: its block both ways, and the node in.
        let scoped = rules(NetworkMode::Internal, Some("10.100.128.0/25"));
        assert!(
            scoped.contains("ip saddr 10.100.128.0/25 ip daddr 169.254.0.2 accept"),
            "{scoped}"
        );
        assert!(scoped.contains(from_node), "{scoped}");
        assert!(
            scoped.contains("\t\tip daddr 10.100.128.0/25 accept\n"),
            "{scoped}"
        );
        assert!(!scoped.contains("10.100.0.0/"), "{scoped}");
        // A version 1 lease: the whole subnet, as before scopes.
        let legacy = rules(NetworkMode::Internal, Some("10.100.0.0/16"));
        assert!(legacy.contains("\t\tip daddr 10.100.0.0/16 accept\n"));
        // Unscoped internet: no peers, nothing in.
        let internet = rules(NetworkMode::Internet, None);
        assert!(!internet.contains("dnat to 169.254.0.2"), "{internet}");
        assert!(!internet.contains("oifname \"tap0\""), "{internet}");
        assert!(
            internet.contains("ip daddr 10.100.0.0/16 drop\n\t\taccept\n"),
            "{internet}"
        );
        // Scoped internet: its block both ways (before the subnet is dropped), not the
        // node.
        let scoped_internet = rules(NetworkMode::Internet, Some("10.100.128.0/25"));
        assert!(
            scoped_internet.contains(
                "ip daddr 10.100.128.0/25 accept\n\t\tip daddr 10.100.0.0/16 drop\n\t\taccept\n"
            ),
            "{scoped_internet}"
        );
        assert!(
            scoped_internet.contains("ip saddr 10.100.128.0/25 ip daddr 169.254.0.2 accept"),
            "{scoped_internet}"
        );
        assert!(
            scoped_internet.contains("dnat to 169.254.0.2"),
            "{scoped_internet}"
        );
        assert!(!scoped_internet.contains(from_node), "{scoped_internet}");
        for text in [&internal, &scoped, &internet, &scoped_internet] {
            assert!(text.contains("snat to 10.100.0.5"));
            assert!(text.contains("th dport 53 dnat to 10.100.0.1"));
            assert!(text.contains("policy drop"));
        }
    }
}
