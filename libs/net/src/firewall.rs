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
//!   and the mode's policy, enforced before a packet ever reaches the shared bridge. It
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
    pub dns: Ipv4Addr,
    pub services: &'a [Ipv4Cidr],
}

/// The sandbox table (a fresh namespace: nothing to replace).
pub(crate) fn sandbox_ruleset(r: &SandboxRules<'_>) -> String {
    let SandboxRules {
        routable,
        subnet,
        dns,
        ..
    } = r;
    let internal = r.mode == NetworkMode::Internal;
    let mut text = format!("table ip {TABLE} {{\n");
    let _ = writeln!(
        text,
        "\tchain prerouting {{
		type nat hook prerouting priority dstnat; policy accept;
		iifname \"{TAP_NAME}\" ip daddr {GATEWAY_ADDRESS} meta l4proto {{ tcp, udp }} th dport 53 dnat to {dns}"
    );
    if internal {
        // Peers reach the guest at the sandbox's routable address.
        let _ = writeln!(
            text,
            "\t\tiifname \"{UPLINK_NAME}\" ip daddr {routable} dnat to {GUEST_ADDRESS}"
        );
    }
    let _ = write!(
        text,
        "\t}}
	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		oifname \"{UPLINK_NAME}\" ip saddr {GUEST_ADDRESS} snat to {routable}
	}}
	chain input {{
		type filter hook input priority filter; policy drop;
		iifname \"lo\" accept
	}}
	chain forward {{
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		ct state invalid drop
		iifname \"{TAP_NAME}\" oifname \"{UPLINK_NAME}\" ip saddr {GUEST_ADDRESS} jump egress
"
    );
    if internal {
        let _ = writeln!(
            text,
            "\t\tiifname \"{UPLINK_NAME}\" oifname \"{TAP_NAME}\" ip saddr {subnet} ip daddr {GUEST_ADDRESS} accept"
        );
    }
    let _ = write!(
        text,
        "\t}}
	chain egress {{
		ip daddr {dns} meta l4proto {{ tcp, udp }} th dport 53 accept
		ip daddr {LINK_LOCAL} drop
"
    );
    if !r.services.is_empty() {
        let services: Vec<String> = r.services.iter().map(ToString::to_string).collect();
        let _ = writeln!(text, "\t\tip daddr {{ {} }} accept", services.join(", "));
    }
    match r.mode {
        NetworkMode::Internal => {
            let _ = writeln!(text, "\t\tip daddr {subnet} accept");
        }
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
    fn sandbox_policy_follows_the_mode() {
        let rules = |mode| {
            sandbox_ruleset(&SandboxRules {
                mode,
                routable: "10.100.0.5".parse().unwrap(),
                subnet: "10.100.0.0/16".parse().unwrap(),
                dns: "10.100.0.1".parse().unwrap(),
                services: &[],
            })
        };
        let internal = rules(NetworkMode::Internal);
        assert!(
            internal.contains("ip daddr 10.100.0.5 dnat to 169.254.0.2"),
            "{internal}"
        );
        assert!(
            internal.contains("\t\tip daddr 10.100.0.0/16 accept\n"),
            "{internal}"
        );
        assert!(
            !internal.contains("\t\taccept\n"),
            "internal must not accept everything"
        );
        let internet = rules(NetworkMode::Internet);
        assert!(!internet.contains("dnat to 169.254.0.2"), "{internet}");
        assert!(
            internet.contains("ip daddr 10.100.0.0/16 drop\n\t\taccept\n"),
            "{internet}"
        );
        for text in [&internal, &internet] {
            assert!(text.contains("snat to 10.100.0.5"));
            assert!(text.contains("th dport 53 dnat to 10.100.0.1"));
            assert!(text.contains("policy drop"));
        }
    }
}
