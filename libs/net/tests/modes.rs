#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The network modes with real guests: each test boots a few VMs into sandbox networks
//! of a private test world (see `common`) and probes from inside them with busybox
//! (`wget`, `nslookup`, `ping`). Every negative probe has a positive control showing the
//! target does answer someone, so a refusal is the policy and not a dead server.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use common::{
    in_netns, start_dns, HttpServer, World, BRIDGE_ADDRESS, HTTP_PORT, INTERNET_NAME,
    INTERNET_SERVER, SERVICE, WAN_HOST,
};
use nanobox_core::NetworkMode;
use nanobox_guest_client::{ConfigureRequest, ExecRequest};
use nanobox_net::SandboxNetwork;
use nanobox_testkit::TestVm;
use nanobox_vmm::RateLimit;

/// Boots a guest in `net` and configures its eth0 the way the node agent will.
async fn boot(name: &str, net: &SandboxNetwork) -> TestVm {
    let vm = TestVm::boot_with(name, |spec| net.apply_to(spec)).await;
    if let Some(network) = net.guest_config() {
        vm.agent
            .configure(
                ConfigureRequest {
                    hostname: name.into(),
                    network: Some(network),
                    ..ConfigureRequest::default()
                },
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|e| panic!("configuring {name}'s network: {e}"));
    }
    vm
}

/// Runs a shell script in the guest: (exit code, stdout + stderr).
async fn sh(vm: &TestVm, script: &str) -> (i32, String) {
    let mut req = ExecRequest::new(["sh", "-c", script]);
    req.timeout = Some(Duration::from_secs(120));
    let out = vm
        .agent
        .run(req, 1 << 20)
        .await
        .unwrap_or_else(|e| panic!("running {script:?}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.shell_code(), text)
}

/// Fetches `http://addr:port/hello` from the guest, giving up after a few seconds (a
/// dropped SYN would otherwise wait for TCP's own timeout).
async fn fetch(vm: &TestVm, addr: Ipv4Addr, port: u16) -> (i32, String) {
    sh(
        vm,
        &format!("timeout 5 wget -q -O - http://{addr}:{port}/hello 2>&1"),
    )
    .await
}

/// Fetches `http://addr:port/hello` from a thread inside namespace `ns`.
fn fetch_from_ns(ns: &str, addr: Ipv4Addr, port: u16) -> std::io::Result<String> {
    in_netns(ns, move || {
        let mut conn = TcpStream::connect_timeout(&(addr, port).into(), Duration::from_secs(5))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.write_all(b"GET /hello HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok(text)
    })
}

/// Starts busybox httpd in the guest, serving "hello from <tag>" at /hello.
async fn serve_hello(vm: &TestVm, tag: &str) {
    let (code, out) = sh(
        vm,
        &format!(
            "mkdir -p /tmp/www && echo 'hello from {tag}' > /tmp/www/hello && httpd -p {HTTP_PORT} -h /tmp/www"
        ),
    )
    .await;
    assert_eq!(code, 0, "starting httpd: {out}");
}

fn routable(net: &SandboxNetwork) -> Ipv4Addr {
    net.interface.as_ref().unwrap().routable_address
}

/// Isolated and internet sandboxes cannot reach an internal sandbox, nor the node; the
/// isolated guest has no interface at all.
#[tokio::test]
async fn isolated_and_internet_guests_reach_no_other_sandbox() {
    let w = World::new().await;
    let node_http = HttpServer::start(&w.host, BRIDGE_ADDRESS, HTTP_PORT, "the node");
    let peer_net = w
        .node
        .create("peer", NetworkMode::Internal, None, None)
        .await
        .unwrap();
    let iso_net = w
        .node
        .create("iso", NetworkMode::Isolated, None, None)
        .await
        .unwrap();
    let inet_net = w
        .node
        .create("inet", NetworkMode::Internet, None, None)
        .await
        .unwrap();
    let peer = boot("peer", &peer_net).await;
    serve_hello(&peer, "peer").await;
    let peer_addr = routable(&peer_net);
    // Positive controls: the peer's server and the node's answer from the host side.
    let reply = fetch_from_ns(&w.host, peer_addr, HTTP_PORT).unwrap();
    assert!(reply.contains("hello from peer"), "{reply}");
    let reply = fetch_from_ns(&w.host, BRIDGE_ADDRESS, HTTP_PORT).unwrap();
    assert!(reply.contains("hello from the node"), "{reply}");

    let iso = boot("iso", &iso_net).await;
    // Loopback and the kernel's IPv6-in-IPv4 pseudo-device (which needs a route to
    // carry anything): no network device.
    let (_, links) = sh(&iso, "ls /sys/class/net").await;
    let links: Vec<&str> = links.split_whitespace().collect();
    assert!(
        links.iter().all(|l| ["lo", "sit0"].contains(l)),
        "{links:?}"
    );
    let (_, routes) = sh(&iso, "ip -4 route show").await;
    assert_eq!(routes.trim(), "", "isolated guest has routes");
    for target in [peer_addr, BRIDGE_ADDRESS, INTERNET_SERVER] {
        let (code, out) = fetch(&iso, target, HTTP_PORT).await;
        assert_ne!(code, 0, "isolated guest reached {target}: {out}");
    }
    let (code, out) = sh(&iso, &format!("ping -c 1 -W 2 {BRIDGE_ADDRESS} 2>&1")).await;
    assert_ne!(code, 0, "isolated guest pinged the bridge: {out}");
    drop(iso);

    let inet = boot("inet", &inet_net).await;
    let (code, out) = fetch(&inet, peer_addr, HTTP_PORT).await;
    assert_ne!(code, 0, "internet guest reached the internal peer: {out}");
    let (code, out) = fetch(&inet, BRIDGE_ADDRESS, HTTP_PORT).await;
    assert_ne!(code, 0, "internet guest reached the node: {out}");
    let (code, out) = sh(&inet, &format!("ping -c 1 -W 2 {peer_addr} 2>&1")).await;
    assert_ne!(code, 0, "internet guest pinged the internal peer: {out}");
    assert_eq!(
        node_http.peers().len(),
        1,
        "only the control reached the node's server: {:?}",
        node_http.peers()
    );
    drop((inet, peer));
    for id in ["peer", "iso", "inet"] {
        w.node.destroy(id).await.unwrap();
    }
}

/// Internal sandboxes reach each other, the node's internal services and the resolver,
/// but not the internet and not the node itself.
#[tokio::test]
async fn internal_guests_reach_each_other_and_services_but_not_the_internet() {
    let w = World::new().await;
    let internet = HttpServer::start(&w.internet, INTERNET_SERVER, HTTP_PORT, "the internet");
    let service = HttpServer::start(&w.internet, SERVICE, HTTP_PORT, "a service");
    let node_http = HttpServer::start(&w.host, BRIDGE_ADDRESS, HTTP_PORT, "the node");
    start_dns(&w.host, BRIDGE_ADDRESS);
    let a_net = w
        .node
        .create("int-a", NetworkMode::Internal, None, None)
        .await
        .unwrap();
    let b_net = w
        .node
        .create("int-b", NetworkMode::Internal, None, None)
        .await
        .unwrap();
    let a = boot("int-a", &a_net).await;
    let b = boot("int-b", &b_net).await;
    serve_hello(&b, "b").await;

    let (code, out) = fetch(&a, routable(&b_net), HTTP_PORT).await;
    assert_eq!((code, out.trim()), (0, "hello from b"), "a -> b");
    // Both guests have the same inside address; b saw a's routable one.
    let (_, addrs) = sh(&b, "ip -o -4 addr show eth0").await;
    assert!(addrs.contains("169.254.0.2/30"), "{addrs}");
    let (code, out) = sh(&a, &format!("ping -c 1 -W 5 {} 2>&1", routable(&b_net))).await;
    assert_eq!(code, 0, "a pings b: {out}");

    let (code, out) = fetch(&a, SERVICE, HTTP_PORT).await;
    assert_eq!(
        (code, out.trim()),
        (0, "hello from a service"),
        "a -> service"
    );
    // NATed out of the host interface like all traffic leaving the bridge.
    assert_eq!(
        service.peers().iter().map(|p| p.ip()).collect::<Vec<_>>(),
        [WAN_HOST]
    );

    let (code, out) = sh(&a, &format!("nslookup {INTERNET_NAME} 2>&1")).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&INTERNET_SERVER.to_string()), "{out}");
    let (_, resolv) = sh(&a, "cat /etc/resolv.conf").await;
    assert_eq!(resolv.trim(), "nameserver 169.254.0.1");

    // Positive control: the internet server answers the host namespace.
    let reply = fetch_from_ns(&w.host, INTERNET_SERVER, HTTP_PORT).unwrap();
    assert!(reply.contains("hello from the internet"), "{reply}");
    let (code, out) = fetch(&a, INTERNET_SERVER, HTTP_PORT).await;
    assert_ne!(code, 0, "internal guest reached the internet: {out}");
    let (code, out) = fetch(&a, BRIDGE_ADDRESS, HTTP_PORT).await;
    assert_ne!(code, 0, "internal guest reached the node: {out}");
    assert!(internet.peers().iter().all(|p| p.ip() == WAN_HOST));
    assert_eq!(
        internet.peers().len(),
        1,
        "only the control: {:?}",
        internet.peers()
    );
    assert!(node_http.peers().is_empty(), "{:?}", node_http.peers());
    drop((a, b));
    for id in ["int-a", "int-b"] {
        w.node.destroy(id).await.unwrap();
    }
}

/// Rate limit of the internet test, in bytes per second.
const RATE: u64 = 512 * 1024;
/// Bytes moved in each direction: about four seconds at [`RATE`].
const BULK: u64 = 2 * 1024 * 1024;
/// The tolerance on the measured rate.
const TOLERANCE: f64 = 0.15;

/// An internet guest reaches a server beyond the host interface through NAT, resolves
/// names through its gateway, and a bulk transfer each way runs at the configured rate.
#[tokio::test]
async fn internet_guest_reaches_the_internet_at_the_configured_rate() {
    let w = World::new().await;
    let internet = HttpServer::start(&w.internet, INTERNET_SERVER, HTTP_PORT, "the internet");
    start_dns(&w.host, BRIDGE_ADDRESS);
    let limit = RateLimit {
        rate_bytes_per_sec: RATE,
        burst_bytes: 16 * 1024,
    };
    let net = w
        .node
        .create("inet", NetworkMode::Internet, Some(limit), None)
        .await
        .unwrap();
    let vm = boot("inet", &net).await;

    let (code, out) = sh(&vm, &format!("nslookup {INTERNET_NAME} 2>&1")).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&INTERNET_SERVER.to_string()), "{out}");
    let (code, out) = fetch(&vm, INTERNET_SERVER, HTTP_PORT).await;
    assert_eq!((code, out.trim()), (0, "hello from the internet"));
    assert_eq!(
        internet.peers()[0].ip(),
        WAN_HOST,
        "the server sees the NAT address"
    );

    let (code, out) = sh(
        &vm,
        &format!("wget -q -O /dev/null http://{INTERNET_SERVER}:{HTTP_PORT}/bulk/{BULK} 2>&1"),
    )
    .await;
    assert_eq!(code, 0, "download: {out}");
    let (code, out) = sh(
        &vm,
        &format!(
            // Not zeros: busybox wget sends the file as a C string.
            "head -c {BULK} /dev/zero | tr '\\0' x > /tmp/blob && \
             wget -q -O - --post-file /tmp/blob http://{INTERNET_SERVER}:{HTTP_PORT}/upload 2>&1"
        ),
    )
    .await;
    assert_eq!((code, out.trim()), (0, "uploaded"), "upload");

    let transfers = internet.transfers();
    let mut report = Vec::new();
    for (direction, path) in [
        ("download", format!("/bulk/{BULK}")),
        ("upload", "/upload".into()),
    ] {
        let t = transfers
            .iter()
            .find(|t| t.path == path)
            .unwrap_or_else(|| panic!("no {direction} seen: {transfers:?}"));
        assert_eq!(t.bytes, BULK, "{direction}");
        let rate = t.bytes as f64 / t.elapsed.as_secs_f64();
        let ratio = rate / RATE as f64;
        eprintln!(
            "{direction}: {} bytes in {:.3} s = {:.0} B/s, {:.1}% of the {RATE} B/s limit",
            t.bytes,
            t.elapsed.as_secs_f64(),
            rate,
            ratio * 100.0
        );
        report.push((direction, ratio));
    }
    for (direction, ratio) in report {
        assert!(
            (1.0 - TOLERANCE..=1.0 + TOLERANCE).contains(&ratio),
            "{direction} ran at {:.1}% of the configured rate (allowed: ±{:.0}%)",
            ratio * 100.0,
            TOLERANCE * 100.0
        );
    }
    drop(vm);
    w.node.destroy("inet").await.unwrap();
}

/// Fetches `/hello` from every target at once (each given up after a few seconds) and
/// returns which answered, in the order given.
async fn reachable(vm: &TestVm, targets: &[Ipv4Addr]) -> Vec<bool> {
    let list: Vec<String> = targets.iter().map(ToString::to_string).collect();
    let script = format!(
        "for t in {}; do (if timeout 5 wget -q -O - http://$t:{HTTP_PORT}/hello >/dev/null 2>&1; \
         then echo \"ok $t\"; else echo \"no $t\"; fi) & done; wait",
        list.join(" ")
    );
    let (code, out) = sh(vm, &script).await;
    assert_eq!(code, 0, "{out}");
    list.iter()
        .map(|t| {
            if out.lines().any(|l| l.trim() == format!("ok {t}")) {
                true
            } else {
                assert!(
                    out.lines().any(|l| l.trim() == format!("no {t}")),
                    "no result for {t}: {out}"
                );
                false
            }
        })
        .collect()
}

/// Probes from `vm` (named `from`) and checks each target against what is expected.
async fn expect_reach(vm: &TestVm, from: &str, expected: &[(&str, Ipv4Addr, bool)]) {
    let targets: Vec<Ipv4Addr> = expected.iter().map(|(_, addr, _)| *addr).collect();
    let got = reachable(vm, &targets).await;
    let wrong: Vec<String> = expected
        .iter()
        .zip(&got)
        .filter(|((_, _, want), got)| want != *got)
        .map(|((name, addr, want), _)| {
            let verb = if *want { "did not reach" } else { "reached" };
            format!("{from} {verb} {name} ({addr})")
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:?}");
}

/// Tenant scopes: internal sandboxes of scope "a" reach each other and an internet
/// sandbox of scope "a"; one of scope "b" and an unscoped one reach none of them and
/// are reached by none of them. Every guest's own network works (it reaches the service
/// or the internet) and every server answers someone, so each refusal is the policy.
#[tokio::test]
async fn tenant_scopes_separate_sandboxes() {
    let w = World::new().await;
    let _internet = HttpServer::start(&w.internet, INTERNET_SERVER, HTTP_PORT, "the internet");
    let _service = HttpServer::start(&w.internet, SERVICE, HTTP_PORT, "a service");
    let shapes = [
        ("sc-a1", NetworkMode::Internal, Some("a")),
        ("sc-a2", NetworkMode::Internal, Some("a")),
        ("sc-ia", NetworkMode::Internet, Some("a")),
        ("sc-b", NetworkMode::Internal, Some("b")),
        ("sc-u", NetworkMode::Internal, None),
    ];
    let mut nets = Vec::new();
    for (id, mode, scope) in shapes {
        let net = w.node.create(id, mode, None, scope).await.unwrap();
        assert_eq!(net.tenant_scope.as_deref(), scope);
        nets.push(net);
    }
    let mut vms = Vec::new();
    for net in &nets {
        let vm = boot(&net.id, net).await;
        serve_hello(&vm, &net.id).await;
        vms.push(vm);
    }
    let [a1, a2, ia, b, u] = &vms[..] else {
        unreachable!()
    };
    let addr: Vec<Ipv4Addr> = nets.iter().map(routable).collect();
    let (a1_addr, a2_addr, ia_addr, b_addr, u_addr) = (addr[0], addr[1], addr[2], addr[3], addr[4]);

    // Positive controls for the internal guests' servers: the node reaches them all.
    for (net, target) in nets.iter().zip(&addr) {
        if net.mode == NetworkMode::Internal {
            let reply = fetch_from_ns(&w.host, *target, HTTP_PORT).unwrap();
            assert!(reply.contains(&format!("hello from {}", net.id)), "{reply}");
        }
    }

    // Scope "a", internal and internet alike: each other, not "b", not unscoped.
    expect_reach(
        a1,
        "a1",
        &[
            ("a2", a2_addr, true),
            ("ia", ia_addr, true),
            ("b", b_addr, false),
            ("u", u_addr, false),
        ],
    )
    .await;
    expect_reach(
        a2,
        "a2",
        &[
            ("a1", a1_addr, true),
            ("ia", ia_addr, true),
            ("b", b_addr, false),
            ("u", u_addr, false),
        ],
    )
    .await;
    expect_reach(
        ia,
        "ia",
        &[
            ("a1", a1_addr, true),
            ("the internet", INTERNET_SERVER, true),
            ("b", b_addr, false),
            ("u", u_addr, false),
        ],
    )
    .await;
    // Scope "b" and no scope: their network works, but no scope "a" sandbox and not
    // each other.
    expect_reach(
        b,
        "b",
        &[
            ("a service", SERVICE, true),
            ("a1", a1_addr, false),
            ("a2", a2_addr, false),
            ("ia", ia_addr, false),
            ("u", u_addr, false),
        ],
    )
    .await;
    expect_reach(
        u,
        "u",
        &[
            ("a service", SERVICE, true),
            ("a1", a1_addr, false),
            ("a2", a2_addr, false),
            ("ia", ia_addr, false),
            ("b", b_addr, false),
        ],
    )
    .await;
    // Not only TCP: the same holds for ICMP.
    let (code, out) = sh(a2, &format!("ping -c 1 -W 5 {a1_addr} 2>&1")).await;
    assert_eq!(code, 0, "a2 pings a1: {out}");
    let (code, out) = sh(b, &format!("ping -c 1 -W 2 {a1_addr} 2>&1")).await;
    assert_ne!(code, 0, "b pinged a1: {out}");

    drop(vms);
    for (id, _, _) in shapes {
        w.node.destroy(id).await.unwrap();
    }
}
