#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Creating and destroying sandbox networks without VMs: what exists in between, that
//! nothing is left after, that addresses are leased once and survive an agent restart,
//! and that orphans of a crash are found and removed.

mod common;

use std::collections::HashSet;

use common::World;
use nanobox_core::NetworkMode;
use nanobox_net::{NetError, NodeNetwork, GUEST_ADDRESS, TAP_NAME, UPLINK_NAME};
use nanobox_testkit::process::run;
use nanobox_vmm::RateLimit;

const LIMIT: RateLimit = RateLimit {
    rate_bytes_per_sec: 1 << 20,
    burst_bytes: 64 << 10,
};

fn in_sandbox(ns: &std::path::Path, args: &[&str]) -> String {
    let mut all = vec!["nsenter", "--net"];
    let arg = format!("--net={}", ns.display());
    all[1] = &arg;
    all.extend_from_slice(args);
    run(&all)
}

#[tokio::test]
async fn create_then_destroy_leaves_no_namespace_link_rule_or_lease() {
    let w = World::new().await;
    let baseline_links: HashSet<String> = w.host_links().into_iter().collect();
    let baseline_rules = w.host_nft(&["list", "ruleset"]);
    let internal = w
        .node
        .create("lc-internal", NetworkMode::Internal, None, None)
        .await
        .unwrap();
    let internet = w
        .node
        .create("lc-internet", NetworkMode::Internet, Some(LIMIT), None)
        .await
        .unwrap();
    let isolated = w
        .node
        .create("lc-isolated", NetworkMode::Isolated, None, None)
        .await
        .unwrap();

    // Distinct routable addresses from the subnet, never the gateway; one guest address.
    let a = internal.interface.as_ref().unwrap();
    let b = internet.interface.as_ref().unwrap();
    assert_ne!(a.routable_address, b.routable_address);
    for i in [a, b] {
        assert!(w.config.subnet.contains(i.routable_address));
        assert_ne!(i.routable_address, w.config.gateway());
        assert_eq!(i.guest_address, GUEST_ADDRESS);
    }
    assert!(isolated.interface.is_none());
    assert!(isolated.net_spec().is_none() && isolated.guest_config().is_none());

    // Each namespace holds its TAP and uplink; the isolated one nothing but loopback.
    for net in [&internal, &internet] {
        let links = in_sandbox(&net.netns, &["ip", "-o", "link", "show"]);
        assert!(
            links.contains(TAP_NAME) && links.contains(UPLINK_NAME),
            "{links}"
        );
        let addrs = in_sandbox(&net.netns, &["ip", "-o", "-4", "addr", "show"]);
        let routable = net.interface.as_ref().unwrap().routable_address.to_string();
        assert!(addrs.contains(&format!("{routable}/16")), "{addrs}");
        assert!(addrs.contains("169.254.0.1/30"), "{addrs}");
        // The policy is IPv4: IPv6 is off on the guest's TAP.
        let v6 = in_sandbox(
            &net.netns,
            &["cat", "/proc/sys/net/ipv6/conf/tap0/disable_ipv6"],
        );
        assert_eq!(v6.trim(), "1");
        let rules = in_sandbox(&net.netns, &["nft", "list", "table", "ip", "nanobox"]);
        assert!(rules.contains(&format!("snat to {routable}")), "{rules}");
    }
    let links = in_sandbox(&isolated.netns, &["ip", "-o", "link", "show"]);
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:"), "{links}");

    // Only the internet sandbox is shaped by tc and in the host's internet set.
    let qdisc = in_sandbox(&internet.netns, &["tc", "qdisc", "show"]);
    assert_eq!(qdisc.matches("qdisc tbf").count(), 2, "{qdisc}");
    assert!(qdisc.contains("rate 8388Kbit"), "{qdisc}");
    let qdisc = in_sandbox(&internal.netns, &["tc", "qdisc", "show"]);
    assert!(!qdisc.contains("tbf"), "{qdisc}");
    let set = w.host_nft(&["list", "set", "ip", "nanobox", "internet"]);
    assert!(set.contains(&b.routable_address.to_string()), "{set}");
    assert!(!set.contains(&a.routable_address.to_string()), "{set}");

    // The host side: one veth per addressed sandbox, on the bridge.
    let on_bridge = w.host_ip(&["-o", "link", "show", "master", "nbxbr0"]);
    for i in [a, b] {
        assert!(on_bridge.contains(&i.host_veth), "{on_bridge}");
    }
    assert_eq!(w.node.list().await.unwrap().len(), 3);

    for net in [&internal, &internet, &isolated] {
        w.node.destroy(&net.id).await.unwrap();
        // Idempotent.
        w.node.destroy(&net.id).await.unwrap();
        assert!(!net.netns.exists());
        assert_eq!(w.node.get(&net.id).await.unwrap(), None);
    }
    let sandbox_ns: Vec<String> = w
        .namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&w.config.netns_prefix))
        .collect();
    assert!(sandbox_ns.is_empty(), "{sandbox_ns:?}");
    let links: HashSet<String> = w.host_links().into_iter().collect();
    assert_eq!(links, baseline_links);
    let set = w.host_nft(&["list", "set", "ip", "nanobox", "internet"]);
    assert!(!set.contains("10.100."), "{set}");
    // The host ruleset is the same as before any sandbox (no per-sandbox rule).
    assert_eq!(w.host_nft(&["list", "ruleset"]), baseline_rules);
    assert!(w.node.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn leases_survive_an_agent_restart_and_are_never_handed_out_twice() {
    let w = World::new().await;
    let a = w
        .node
        .create("rs-a", NetworkMode::Internet, Some(LIMIT), None)
        .await
        .unwrap();
    let b = w
        .node
        .create("rs-b", NetworkMode::Internal, None, None)
        .await
        .unwrap();

    // The agent restarts: a new NodeNetwork from the same config and state directory.
    let restarted = NodeNetwork::setup(w.config.clone()).await.unwrap();
    assert_eq!(restarted.get("rs-a").await.unwrap().as_ref(), Some(&a));
    assert_eq!(restarted.get("rs-b").await.unwrap().as_ref(), Some(&b));
    // The host rules were rebuilt with the internet sandbox still allowed out.
    let addr_a = a.interface.as_ref().unwrap().routable_address;
    let set = w.host_nft(&["list", "set", "ip", "nanobox", "internet"]);
    assert!(set.contains(&addr_a.to_string()), "{set}");

    let mut seen: HashSet<_> = [addr_a, b.interface.as_ref().unwrap().routable_address].into();
    let c = restarted
        .create("rs-c", NetworkMode::Internal, None, None)
        .await
        .unwrap();
    assert!(seen.insert(c.interface.as_ref().unwrap().routable_address));

    // A released address is not the next one handed out.
    restarted.destroy("rs-a").await.unwrap();
    let d = restarted
        .create("rs-d", NetworkMode::Internal, None, None)
        .await
        .unwrap();
    assert!(seen.insert(d.interface.as_ref().unwrap().routable_address));

    for id in ["rs-b", "rs-c", "rs-d"] {
        restarted.destroy(id).await.unwrap();
    }
}

#[tokio::test]
async fn cleanup_orphans_removes_everything_not_known() {
    let w = World::new().await;
    for id in ["or-a", "or-b", "or-c"] {
        w.node
            .create(id, NetworkMode::Internal, None, None)
            .await
            .unwrap();
    }
    w.node
        .create("or-i", NetworkMode::Isolated, None, None)
        .await
        .unwrap();
    let kept = w.node.get("or-b").await.unwrap().unwrap();
    // Debris a crash could leave: a namespace with the node's prefix but no record, and
    // a veth on the bridge that no lease names.
    let stray = format!("{}or-stray", w.config.netns_prefix);
    run(&["ip", "netns", "add", &stray]);
    w.host_ip(&[
        "link",
        "add",
        "nbxdeadbeef",
        "type",
        "veth",
        "peer",
        "name",
        "nbxdeadbef0",
    ]);
    w.host_ip(&["link", "set", "nbxdeadbeef", "master", "nbxbr0"]);

    let removed = w.node.cleanup_orphans(&["or-b"]).await.unwrap();
    assert_eq!(removed, ["or-a", "or-c", "or-i", "or-stray"]);
    assert_eq!(w.node.list().await.unwrap(), vec![kept.clone()]);
    assert!(kept.netns.exists());
    let links = w.host_links();
    assert!(
        links.contains(&kept.interface.as_ref().unwrap().host_veth),
        "{links:?}"
    );
    assert!(
        !links.iter().any(|l| l.starts_with("nbxdeadbe")),
        "{links:?}"
    );
    let left: Vec<String> = w
        .namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&w.config.netns_prefix))
        .collect();
    assert_eq!(left, vec![w.node.netns_name("or-b")]);
    // Nothing more to do the second time.
    assert!(w.node.cleanup_orphans(&["or-b"]).await.unwrap().is_empty());
    w.node.destroy("or-b").await.unwrap();
}

#[tokio::test]
async fn bad_requests_are_refused_without_side_effects() {
    let w = World::new().await;
    for bad in ["", "Upper", "../etc", "a b"] {
        let err = w
            .node
            .create(bad, NetworkMode::Internal, None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, NetError::InvalidId(_)), "{err}");
    }
    w.node
        .create("dup", NetworkMode::Internal, None, None)
        .await
        .unwrap();
    let err = w
        .node
        .create("dup", NetworkMode::Internal, None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::AlreadyExists(_)), "{err}");
    assert_eq!(w.node.list().await.unwrap().len(), 1);
    w.node.destroy("dup").await.unwrap();
    // Setting up the node again is harmless (agent restarts run it every time).
    NodeNetwork::setup(w.config.clone()).await.unwrap();
    let mut bad = w.config.clone();
    bad.subnet = "10.101.0.0/16".parse().unwrap();
    bad.state_dir = w.state.path().to_owned();
    // The lease file is empty now, so a subnet change is allowed...
    NodeNetwork::setup(bad.clone()).await.unwrap();
    // ...but not while a lease of the old subnet exists.
    let node = NodeNetwork::setup(w.config.clone()).await.unwrap();
    node.create("held", NetworkMode::Internal, None, None)
        .await
        .unwrap();
    let err = NodeNetwork::setup(bad).await.unwrap_err();
    assert!(matches!(err, NetError::State { .. }), "{err}");
    node.destroy("held").await.unwrap();
}

/// Tenant scopes as address blocks: sandboxes of one scope share a block (recorded in
/// the lease file, so a restarted agent and cleanup know it), other scopes get others,
/// unscoped sandboxes stay in the lower half, and each namespace's rules name only its
/// own block.
#[tokio::test]
async fn tenant_scopes_lease_stable_blocks_that_survive_a_restart() {
    let w = World::new().await;
    let create = |id: &'static str, mode, scope: Option<&'static str>| {
        let node = w.node.clone();
        async move { node.create(id, mode, None, scope).await.unwrap() }
    };
    let a1 = create("ts-a1", NetworkMode::Internal, Some("a")).await;
    let a2 = create("ts-a2", NetworkMode::Internet, Some("a")).await;
    let b = create("ts-b", NetworkMode::Internal, Some("b")).await;
    let u = create("ts-u", NetworkMode::Internal, None).await;
    let inet = create("ts-inet", NetworkMode::Internet, None).await;
    let iso = create("ts-iso", NetworkMode::Isolated, Some("a")).await;
    let addr = |n: &nanobox_net::SandboxNetwork| n.interface.as_ref().unwrap().routable_address;
    // The default /16: the unscoped half is 10.100.0.0/17, scope blocks are /25s above.
    let block = |n: &nanobox_net::SandboxNetwork| u32::from(addr(n)) >> 7;
    let upper = |n: &nanobox_net::SandboxNetwork| addr(n).octets()[2] >= 128;
    assert_eq!(block(&a1), block(&a2));
    assert_ne!(block(&a1), block(&b));
    assert!(upper(&a1) && upper(&b), "{} {}", addr(&a1), addr(&b));
    assert!(!upper(&u) && !upper(&inet), "{} {}", addr(&u), addr(&inet));
    assert_eq!(a1.tenant_scope.as_deref(), Some("a"));
    assert_eq!(u.tenant_scope, None);
    assert!(iso.interface.is_none());

    let a_block = format!("{}/25", std::net::Ipv4Addr::from(block(&a1) << 7));
    let rules = in_sandbox(&a1.netns, &["nft", "list", "table", "ip", "nanobox"]);
    assert!(
        rules.contains(&format!("ip saddr {a_block} ip daddr 169.254.0.2 accept")),
        "{rules}"
    );
    assert!(
        rules.contains(&format!("ip daddr {a_block} accept")),
        "{rules}"
    );
    assert!(!rules.contains("10.100.0.0/"), "{rules}");
    let rules = in_sandbox(&u.netns, &["nft", "list", "table", "ip", "nanobox"]);
    assert!(rules.contains("ip daddr 10.100.0.0/17 accept"), "{rules}");
    assert!(!rules.contains(&a_block), "{rules}");
    let leases = std::fs::read_to_string(w.state.path().join("sandboxes.json")).unwrap();
    assert!(leases.contains(&a_block), "{leases}");

    // Bad scopes are refused; an empty one is no scope.
    let err = w
        .node
        .create("ts-bad", NetworkMode::Internal, None, Some("a b"))
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::InvalidScope(_)), "{err}");
    let empty = create("ts-empty", NetworkMode::Internal, Some("")).await;
    assert_eq!(empty.tenant_scope, None);
    assert!(!upper(&empty));

    // A restarted agent knows every scope, and keeps a scope's block for its next
    // sandbox while one of the scope lives.
    let restarted = NodeNetwork::setup(w.config.clone()).await.unwrap();
    assert_eq!(restarted.get("ts-a1").await.unwrap().as_ref(), Some(&a1));
    assert_eq!(restarted.get("ts-iso").await.unwrap().as_ref(), Some(&iso));
    restarted.destroy("ts-a1").await.unwrap();
    let a3 = restarted
        .create("ts-a3", NetworkMode::Internal, None, Some("a"))
        .await
        .unwrap();
    assert_eq!(block(&a3), block(&a2));

    // Cleanup after a crash works from the same records and frees the blocks.
    let removed = restarted.cleanup_orphans(&["ts-b"]).await.unwrap();
    assert_eq!(
        removed,
        ["ts-a2", "ts-a3", "ts-empty", "ts-inet", "ts-iso", "ts-u"]
    );
    let leases = std::fs::read_to_string(w.state.path().join("sandboxes.json")).unwrap();
    assert!(!leases.contains(&a_block), "{leases}");
    assert!(leases.contains("\"b\""), "{leases}");
    restarted.destroy("ts-b").await.unwrap();
    let leases = std::fs::read_to_string(w.state.path().join("sandboxes.json")).unwrap();
    assert!(!leases.contains("\"b\""), "{leases}");
}
