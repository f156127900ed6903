//! `nanobox up` as a user runs it, from a shell: the real binary brings the whole stack up
//! on this machine (a private PostgreSQL in its data directory, the four services, the
//! node's network namespace), then the seed's Quick Start runs over REST with curl
//! against an image a local registry serves, then the `nanobox` CLI warms up, creates,
//! execs, lists and removes, and SIGTERM leaves no process, namespace or VM behind. A
//! second `nanobox up` beside a running one is refused; one after a `kill -9` cleans up
//! what the killed one left and starts. The CLI's bad input gets one clear line each.
//!
//! Needs the guest kernel and init (`NANOBOX_TEST_KERNEL`, `NANOBOX_INIT`) and every
//! service binary beside `nanobox` (`cargo xtask test` builds them all).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nanobox_stack::leftovers::vmm_processes;
use nanobox_stack::network::NodeNetwork;
use nanobox_testkit::images::{debian_node_layout, DEBIAN_NODE_TAG};
use nanobox_testkit::registry::{PushFormat, Registry};
use nanobox_testkit::{env_file, guest_init};
use serde_json::Value;

/// Hang guard for the stack's start.
const UP_LIMIT: Duration = Duration::from_secs(300);
/// Hang guard for a warmup of the Debian + Node.js image.
const WARMUP_LIMIT: Duration = Duration::from_secs(600);
/// Hang guard for the stack's stop (the node agent destroys its VMs).
const STOP_LIMIT: Duration = Duration::from_secs(180);

fn nanobox() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nanobox"));
    // The CLI must take the endpoint from what the test gives it, nothing else.
    cmd.env_remove("NANOBOX_URL")
        .env_remove("NANOBOX_API_KEY")
        .env_remove("NANOBOX_CLI_CONFIG")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env_remove("RUST_LOG");
    cmd
}

/// A data directory PostgreSQL's own user can reach (not under /root).
fn data_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nanobox-up-test-")
        .tempdir_in("/tmp")
        .unwrap()
}

/// A running `nanobox up`, its endpoint lines and what it printed on stderr.
struct Up {
    child: Child,
    env: BTreeMap<String, String>,
    stdout_lines: Vec<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// The network namespace it runs in (its 127.0.0.1 is that namespace's).
    netns: Option<String>,
}

impl Up {
    /// `nanobox up` on free ports; returns once it printed `nanobox: ready`, or panics
    /// with its stderr.
    fn start(data: &Path, registry: Option<&str>) -> Self {
        Self::start_in(None, data, registry, &[])
    }

    /// [`Up::start`] in the network namespace `netns` (`ip netns exec`), with `extra`
    /// flags.
    fn start_in(netns: Option<&str>, data: &Path, registry: Option<&str>, extra: &[&str]) -> Self {
        let mut cmd = match netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_nanobox")])
                    .env_remove("NANOBOX_URL")
                    .env_remove("NANOBOX_API_KEY")
                    .env_remove("RUST_LOG");
                cmd
            }
            None => nanobox(),
        };
        cmd.arg("up")
            .arg("--data-dir")
            .arg(data)
            .args([
                "--api-port",
                "0",
                "--grpc-port",
                "0",
                "--templates-port",
                "0",
            ])
            .args(["--agent-port", "0", "--metrics-port", "0", "--vcpus", "4"])
            .args(["--memory-mb", "4096"])
            .arg("--kernel")
            .arg(env_file("NANOBOX_TEST_KERNEL"))
            .arg("--init")
            .arg(guest_init());
        if let Some(host) = registry {
            cmd.args(["--plain-http-registry", host]);
        }
        cmd.args(extra);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("[nanobox up] {line}");
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let (tx, rx) = mpsc::channel();
        let pipe = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut up = Self {
            child,
            env: BTreeMap::new(),
            stdout_lines: Vec::new(),
            stderr,
            netns: netns.map(str::to_owned),
        };
        let deadline = Instant::now() + UP_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                panic!(
                    "nanobox up did not print `nanobox: ready`: {}",
                    up.stderr.lock().unwrap()
                );
            };
            up.stdout_lines.push(line.clone());
            if line == "nanobox: ready" {
                return up;
            }
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("a stdout line that is not NAME=value: {line:?}"));
            up.env.insert(k.to_owned(), v.to_owned());
        }
    }

    fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.env))
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// The CLI pointed at this stack by the environment variables it printed.
    fn cli(&self) -> Command {
        let mut cmd = nanobox();
        cmd.env("NANOBOX_URL", self.var("NANOBOX_URL"))
            .env("NANOBOX_API_KEY", self.var("NANOBOX_API_KEY"));
        cmd
    }

    /// `curl` with the key, as the README's lines run it; the JSON answer.
    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, "curl"]);
                cmd
            }
            None => Command::new("curl"),
        };
        cmd.args(["-sS", "--fail-with-body", "-X", method])
            .arg(format!("{}{path}", self.var("NANOBOX_URL")))
            .arg("-H")
            .arg(format!(
                "Authorization: Bearer {}",
                self.var("NANOBOX_API_KEY")
            ))
            .args(["-H", "Content-Type: application/json"]);
        if let Some(body) = body {
            cmd.args(["-d", body]);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "curl {method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
    }

    /// SIGTERM, and waits for the stack to stop.
    fn terminate(&mut self) -> std::process::ExitStatus {
        signal(self.pid(), "-TERM");
        wait_exit(&mut self.child, STOP_LIMIT)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.pid(), "-TERM");
            let _ = wait_exit(&mut self.child, STOP_LIMIT);
        }
    }
}

fn signal(pid: i32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nanobox up did not stop within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Processes whose command line mentions `dir`.
fn processes_mentioning(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline
                .contains(&needle)
                .then(|| format!("{pid}: {cmdline}"))
        })
        .collect()
}

/// Nothing of the stack of `data` is left: no process mentions it (services, VMMs,
/// PostgreSQL), no namespace of it exists, PostgreSQL's pid file is gone.
fn assert_nothing_left(data: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let procs = processes_mentioning(data);
        let namespaces = NodeNetwork::new(data, false).namespaces();
        if procs.is_empty() && namespaces.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: processes {procs:#?}, namespaces {namespaces:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(vmm_processes(&data.join("agent")).is_empty());
    assert!(!data.join("pg/data/postmaster.pid").exists());
    assert!(!data.join("endpoints.env").exists());
}

/// What `args` prints run in the namespace `ns`.
fn in_netns(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn push_node_image(registry: &Registry) -> String {
    registry.push(
        &debian_node_layout(),
        DEBIAN_NODE_TAG,
        "node",
        "22",
        PushFormat::Oci,
    );
    format!("{}/node:22", registry.host)
}

#[test]
fn up_runs_the_quick_start_over_rest_and_the_cli_then_leaves_nothing_behind() {
    let registry = Registry::start();
    let image = push_node_image(&registry);
    let data = data_dir();
    let mut up = Up::start(data.path(), Some(&registry.host));

    // The lines are shell-sourceable, in this order, then `nanobox: ready`.
    let names: Vec<&str> = up
        .stdout_lines
        .iter()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    assert_eq!(
        &names[..4],
        [
            "NANOBOX_URL",
            "NANOBOX_GRPC",
            "NANOBOX_TEMPLATES_GRPC",
            "NANOBOX_API_KEY"
        ]
    );
    assert!(up.var("NANOBOX_URL").starts_with("http://127.0.0.1:"));
    assert!(up.var("NANOBOX_GRPC").starts_with("127.0.0.1:"));
    assert!(up.var("NANOBOX_TEMPLATES_GRPC").starts_with("127.0.0.1:"));
    assert_eq!(up.stdout_lines.last().unwrap(), "nanobox: ready");
    // The node's network lives in the namespaces the stack made, not in this one.
    let net = NodeNetwork::new(data.path(), false);
    assert_eq!(net.namespaces(), vec![net.host_netns()]);

    // The seed's Quick Start, over REST with curl.
    let warmup = up.curl(
        "POST",
        "/api/v1/templates/warmup",
        Some(&format!(r#"{{"name": "node22", "image": "{image}"}}"#)),
    );
    assert_eq!(warmup["name"], "node22", "{warmup}");
    assert_eq!(warmup["state"], "TEMPLATE_STATE_QUEUED", "{warmup}");
    let deadline = Instant::now() + WARMUP_LIMIT;
    loop {
        let status = up.curl("GET", "/api/v1/templates/node22/status", None);
        match status["state"]
            .as_str()
            .unwrap_or_else(|| panic!("{status}"))
        {
            "TEMPLATE_STATE_READY" => break,
            "TEMPLATE_STATE_FAILED" => panic!("warmup failed: {status}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "warmup hangs: {status}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let sandbox = up.curl(
        "POST",
        "/api/v1/sandboxes",
        Some(r#"{"template": "node22", "resources": {"vcpu": 2, "memory_mb": 512}}"#),
    );
    assert_eq!(sandbox["state"], "SANDBOX_STATE_RUNNING", "{sandbox}");
    let id = sandbox["id"].as_str().unwrap().to_owned();
    let script =
        r#"console.error('to stderr'); console.log(JSON.stringify({ok:true})); process.exit(3)"#;
    let exec = up.curl(
        "POST",
        &format!("/api/v1/sandboxes/{id}/exec"),
        Some(&serde_json::json!({"command": "node", "args": ["-e", script]}).to_string()),
    );
    assert_eq!(exec["stdout"], "{\"ok\":true}\n", "{exec}");
    assert_eq!(exec["stderr"], "to stderr\n", "{exec}");
    assert_eq!(exec["exit_code"], 3, "{exec}");
    up.curl("DELETE", &format!("/api/v1/sandboxes/{id}"), None);

    // The same with the CLI: warmup with its progress, create, exec, ls, rm.
    let out = up
        .cli()
        .args(["template", "warmup", "node-cli", &image])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warmup: "), "no progress lines: {stderr}");
    assert!(stderr.contains("template node-cli READY"), "{stderr}");
    let out = up
        .cli()
        .args(["template", "ls", "--json"])
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = listed["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"node22") && names.contains(&"node-cli"),
        "{listed}"
    );

    let out = up
        .cli()
        .args(["sandbox", "create", "node-cli"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let id = stdout.trim().to_owned();
    assert!(id.starts_with("sb-"), "{stdout}");

    let out = up
        .cli()
        .args([
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(7), "{stdout}{stderr}");
    assert_eq!(stdout, "out\n");
    assert_eq!(stderr, "err\n");

    let out = up.cli().args(["sandbox", "ls", "--json"]).output().unwrap();
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let found = listed["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["id"] == id.as_str() && s["state"] == "SANDBOX_STATE_RUNNING");
    assert!(found, "{listed}");
    let out = up
        .cli()
        .args(["sandbox", "get", &id, "--json"])
        .output()
        .unwrap();
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["template"], "node-cli");

    let out = up.cli().args(["sandbox", "rm", &id]).output().unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    let out = up
        .cli()
        .args(["sandbox", "get", &id, "--json"])
        .output()
        .unwrap();
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["state"], "SANDBOX_STATE_STOPPED", "{got}");

    // A sandbox left running when the stack stops: its VM goes with the stack.
    let out = up
        .cli()
        .args(["sandbox", "create", "node-cli"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(vmm_processes(&data.path().join("agent")).len(), 1);

    let status = up.terminate();
    assert!(status.success(), "{status}: {}", up.stderr.lock().unwrap());
    assert_nothing_left(data.path());
}

#[test]
fn a_second_up_is_refused_one_after_kill_9_cleans_up_and_the_cli_says_what_is_wrong() {
    let data = data_dir();
    let mut first = Up::start(data.path(), None);

    // A second stack on the same data directory is refused at once.
    let out = nanobox()
        .arg("up")
        .arg("--data-dir")
        .arg(data.path())
        .args(["--api-port", "0"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("already running") && stderr.contains(&first.pid().to_string()),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // Bad input to the CLI: one line each, a non-zero exit, no panic or backtrace.
    let bad: Vec<(Vec<&str>, Command, &str)> = vec![
        (
            vec!["sandbox", "get", "sb-01jq0000000000000000000000"],
            first.cli(),
            "HTTP 404, NOT_FOUND",
        ),
        (
            vec!["sandbox", "create", "no-such-template"],
            first.cli(),
            "no-such-template",
        ),
        (
            vec!["template", "status", "no-such-template"],
            first.cli(),
            "HTTP 404, NOT_FOUND",
        ),
        (
            vec!["sandbox", "ls", "--api-key", "wrong-key-0123456789abcdef"],
            first.cli(),
            "HTTP 401, UNAUTHENTICATED",
        ),
        (
            vec!["sandbox", "ls", "--url", "http://127.0.0.1:1"],
            first.cli(),
            "cannot reach the NanoBox API at http://127.0.0.1:1",
        ),
        (
            vec!["exec", "sb-01jq0000000000000000000000", "--", "true"],
            first.cli(),
            "HTTP 404, NOT_FOUND",
        ),
    ];
    for (args, mut cmd, needle) in bad {
        let out = cmd.args(&args).output().unwrap();
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?} succeeded: {stdout}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("nanobox: "), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} lacks {needle:?}"
        );
        assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"));
    }

    // kill -9: the services, PostgreSQL and the namespaces stay behind...
    signal(first.pid(), "-KILL");
    let _ = wait_exit(&mut first.child, Duration::from_secs(10));
    let left: Vec<String> = processes_mentioning(data.path());
    assert!(
        !left.is_empty(),
        "a killed nanobox up left nothing to clean up?"
    );
    // ...until the next start on the same data directory, which removes them and starts.
    let mut second = Up::start(data.path(), None);
    for line in &left {
        let pid = line.split(':').next().unwrap();
        let alive = Path::new(&format!("/proc/{pid}")).exists()
            && processes_mentioning(data.path()).iter().any(|l| l == line);
        assert!(!alive, "still running after the restart: {line}");
    }
    assert_ne!(second.var("NANOBOX_URL"), "");
    // The API key is kept across runs: a client configured once keeps working.
    assert_eq!(second.var("NANOBOX_API_KEY"), first.var("NANOBOX_API_KEY"));
    let status = second.terminate();
    assert!(status.success(), "{status}");
    assert_nothing_left(data.path());
}

#[test]
fn internet_gives_sandboxes_a_nat_uplink_out_of_the_nodes_namespace_and_takes_it_away() {
    use nanobox_testkit::netns::{add_route, link_wan, Netns, WAN_FAR};

    // This test's stand-in for a machine on a network: a namespace "world" (where `nanobox
    // up` runs, as on a host) whose default route leads to an "internet" namespace with a
    // web server. Nothing is configured in the test runner's own namespace.
    let netns = Netns::new("upinet");
    let world = netns.add("world");
    let internet = netns.add("inet");
    link_wan(&world, &internet);
    add_route(&world, "default", WAN_FAR);
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("hello.txt"), "hello from the internet\n").unwrap();
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &internet,
            "python3",
            "-m",
            "http.server",
            "8000",
        ])
        .args(["--bind", &WAN_FAR.to_string(), "--directory"])
        .arg(site.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://{WAN_FAR}:8000/hello.txt");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Command::new("ip")
        .args(["netns", "exec", &world, "curl", "-sf", &url])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the web server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }

    let data = data_dir();
    let mut up = Up::start_in(
        Some(&world),
        data.path(),
        None,
        &["--internet", "--dns", &WAN_FAR.to_string()],
    );
    // The uplink's end in "world", named after the stack; the stack's host namespace.
    let links = in_netns(&world, &["ip", "-o", "link"]);
    assert!(links.contains("nbxup"), "{links}");

    // A template without a warmup: the test rootfs (busybox, with wget), published into
    // the stack's own database and object store.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut db = tokio_postgres::Config::new();
        db.host_path(data.path().join("pg/sock"))
            .user("postgres")
            .dbname("nanobox");
        let meta = nanobox_store::MetadataStore::open(db, Default::default())
            .await
            .unwrap();
        let objects = nanobox_store::open_object_store(&format!(
            "file://{}",
            data.path().join("objects").display()
        ))
        .unwrap();
        nanobox_testkit::template::publish_template(
            &meta,
            objects.as_ref(),
            "bb",
            &env_file("NANOBOX_TEST_ROOTFS"),
        )
        .await;
    });

    let sandbox = up.curl(
        "POST",
        "/api/v1/sandboxes",
        Some(r#"{"template": "bb", "network": {"mode": "NETWORK_MODE_INTERNET"}}"#),
    );
    assert_eq!(sandbox["state"], "SANDBOX_STATE_RUNNING", "{sandbox}");
    let id = sandbox["id"].as_str().unwrap().to_owned();
    let exec = up.curl(
        "POST",
        &format!("/api/v1/sandboxes/{id}/exec"),
        Some(&serde_json::json!({"command": "wget", "args": ["-qO-", url]}).to_string()),
    );
    assert_eq!(exec["stdout"], "hello from the internet\n", "{exec}");
    assert_eq!(exec["exit_code"], 0, "{exec}");

    let status = up.terminate();
    assert!(status.success(), "{status}: {}", up.stderr.lock().unwrap());
    assert_nothing_left(data.path());
    // The uplink and its masquerade table went with the stack.
    let links = in_netns(&world, &["ip", "-o", "link"]);
    assert!(!links.contains("nbxup"), "{links}");
    let tables = in_netns(&world, &["nft", "list", "tables"]);
    assert!(!tables.contains("nanobox_up"), "{tables}");
    let _ = server.kill();
    let _ = server.wait();
}
