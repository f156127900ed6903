//! The world the network tests run in, all inside namespaces the test creates: a "host"
//! namespace standing in for the node's root namespace (bridge, host rules), an
//! "internet" namespace joined to it by a veth pair (the host interface `wan0`), and
//! small servers bound inside them. Nothing is configured in, or sent to, the root
//! namespace or any address outside these namespaces. A drop guard removes every
//! namespace the test made, on panic too.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanobox_net::{NodeNetwork, NodeNetworkConfig, RateLimiter};
use nanobox_testkit::netns::{self, Netns, WAN_FAR};
use nanobox_testkit::process::run;

/// The host namespace's end of the link to the simulated internet.
pub const WAN_HOST: Ipv4Addr = netns::WAN_HOST;
/// A server "on the internet".
pub const INTERNET_SERVER: Ipv4Addr = netns::WAN_FAR;
/// An internal service of the node (in the same far namespace, on another address).
pub const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 254, 1, 2);
/// The bridge address (gateway of the subnet, and the resolver the guests use).
pub const BRIDGE_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub const HTTP_PORT: u16 = 8080;
/// A name the test resolver answers with [`INTERNET_SERVER`].
pub const INTERNET_NAME: &str = "internet.test";

/// The test world: namespaces, a node network set up in them, and its state directory.
#[derive(Debug)]
pub struct World {
    pub host: String,
    pub internet: String,
    pub config: NodeNetworkConfig,
    pub node: NodeNetwork,
    pub state: tempfile::TempDir,
    // Last: dropped after everything that might still use the namespaces.
    pub netns: Netns,
}

impl World {
    pub async fn new() -> Self {
        let netns = Netns::new("nbxt");
        let prefix = netns.prefix().to_owned();
        let host = netns.add("host");
        let internet = netns.add("inet");
        netns::link_wan(&host, &internet);
        // The node's internal service, on the far side too but outside the link's subnet:
        // reached through a route of its own.
        let service = format!("{SERVICE}/32");
        run(&[
            "ip", "-n", &internet, "addr", "add", &service, "dev", "wan0",
        ]);
        netns::add_route(&host, "10.254.1.0/24", WAN_FAR);
        let state = tempfile::tempdir().unwrap();
        let config = NodeNetworkConfig {
            bridge_name: "nbxbr0".into(),
            subnet: "10.100.0.0/16".parse().unwrap(),
            host_iface: "wan0".into(),
            dns_server: BRIDGE_ADDRESS,
            internal_services: vec![format!("{SERVICE}/32").parse().unwrap()],
            host_netns: Some(PathBuf::from("/run/netns").join(&host)),
            netns_prefix: format!("{prefix}s-"),
            state_dir: state.path().to_owned(),
            rate_limiter: RateLimiter::Tc,
        };
        let node = NodeNetwork::setup(config.clone()).await.unwrap();
        Self {
            host,
            internet,
            config,
            node,
            state,
            netns,
        }
    }

    /// `ip ...` in the host namespace.
    pub fn host_ip(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", &self.host];
        all.extend_from_slice(args);
        run(&all)
    }

    /// `nft ...` in the host namespace.
    pub fn host_nft(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", &self.host, "nft"];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Names of the links in the host namespace.
    pub fn host_links(&self) -> Vec<String> {
        self.host_ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            .collect()
    }

    /// Names of every namespace of this test.
    pub fn namespaces(&self) -> Vec<String> {
        self.netns.list()
    }
}

/// Runs `f` on a thread that first enters the namespace `ns`; sockets it creates stay
/// there.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// One transfer a [`HttpServer`] saw: bytes of body and the time from its first to its
/// last byte (uploads) or from the first byte sent to the client closing (downloads).
#[derive(Debug, Clone)]
pub struct Transfer {
    pub path: String,
    pub peer: SocketAddr,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// A tiny HTTP/1.0 server: `GET /hello`, `GET /bulk/<n>` (n bytes), `POST /upload`.
#[derive(Debug, Clone)]
pub struct HttpServer {
    pub log: Arc<Mutex<Vec<Transfer>>>,
}

impl HttpServer {
    /// Serves on `addr:port` inside namespace `ns`, answering `/hello` with `tag`.
    pub fn start(ns: &str, addr: Ipv4Addr, port: u16, tag: &'static str) -> Self {
        let listener = in_netns(ns, move || TcpListener::bind((addr, port)).unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let server = Self { log: log.clone() };
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, tag, &log);
                });
            }
        });
        server
    }

    pub fn transfers(&self) -> Vec<Transfer> {
        self.log.lock().unwrap().clone()
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.transfers().iter().map(|t| t.peer).collect()
    }
}

fn serve(conn: TcpStream, tag: &str, log: &Mutex<Vec<Transfer>>) -> std::io::Result<()> {
    let peer = conn.peer_addr()?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut length = 0u64;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut conn = conn;
    if let Some(n) = path.strip_prefix("/bulk/") {
        let n: u64 = n.parse().unwrap_or(0);
        write!(
            conn,
            "HTTP/1.0 200 OK\r\nContent-Length: {n}\r\nContent-Type: application/octet-stream\r\n\r\n"
        )?;
        let chunk = vec![b'x'; 64 * 1024];
        let start = Instant::now();
        let mut left = n;
        while left > 0 {
            let take = left.min(chunk.len() as u64) as usize;
            conn.write_all(&chunk[..take])?;
            left -= take as u64;
        }
        // The client closes once it has everything: that, not the last write (which
        // only fills the socket buffer), ends the transfer.
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        log.lock().unwrap().push(Transfer {
            path,
            peer,
            bytes: n,
            elapsed: start.elapsed(),
        });
    } else if path == "/upload" {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        let mut first = None;
        while got < length {
            let want = buf.len().min((length - got) as usize);
            let n = reader.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            got += n as u64;
        }
        let elapsed = first.map_or(Duration::ZERO, |f| f.elapsed());
        log.lock().unwrap().push(Transfer {
            path,
            peer,
            bytes: got,
            elapsed,
        });
        write!(
            conn,
            "HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nuploaded\n"
        )?;
    } else {
        let body = format!("hello from {tag}\n");
        write!(
            conn,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        log.lock().unwrap().push(Transfer {
            path,
            peer,
            bytes: body.len() as u64,
            elapsed: Duration::ZERO,
        });
    }
    Ok(())
}

/// A resolver on `addr:53` (UDP) in namespace `ns` that answers A queries for
/// [`INTERNET_NAME`] with [`INTERNET_SERVER`], its other types with no records, and every
/// other name with NXDOMAIN.
pub fn start_dns(ns: &str, addr: Ipv4Addr) {
    let socket = in_netns(ns, move || UdpSocket::bind((addr, 53)).unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if let Some(reply) = dns_answer(&buf[..n]) {
                let _ = socket.send_to(&reply, from);
            }
        }
    });
}

fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // The question: labels up to the zero byte, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    while i < query.len() && query[i] != 0 {
        let len = query[i] as usize;
        labels.push(String::from_utf8_lossy(query.get(i + 1..i + 1 + len)?).to_lowercase());
        i += 1 + len;
    }
    let question_end = i + 5;
    let qtype = u16::from_be_bytes([*query.get(i + 1)?, *query.get(i + 2)?]);
    let name = labels.join(".");
    let known = name == INTERNET_NAME;
    // Only an A record; other types of the known name get an empty answer (NODATA).
    let found = known && qtype == 1;
    let mut reply = query[..2].to_vec();
    // Response, recursion available; rcode 0 or 3 (NXDOMAIN).
    reply.extend_from_slice(&[0x81, if known { 0x80 } else { 0x83 }]);
    reply.extend_from_slice(&[0, 1, 0, u8::from(found), 0, 0, 0, 0]);
    reply.extend_from_slice(query.get(12..question_end)?);
    if found {
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend_from_slice(&INTERNET_SERVER.octets());
    }
    Some(reply)
}
