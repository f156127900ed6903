//! The seed's Quick Start, as a newcomer runs it: `nanobox up` on this machine, a local
//! registry serving a Debian + Node.js image (there is no Docker Hub here; the image is
//! made with debootstrap and cached), then warmup, create and exec over REST with curl,
//! printed as they run. `cargo xtask demo` runs it once; `cargo xtask bench up` times it.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;

use crate::setup::{self, Guest};

/// How long `nanobox up` may take to print `nanobox: ready`.
const UP_LIMIT: Duration = Duration::from_secs(300);

/// How long a warmup may take (a first one pulls ~150 MiB of layers and builds ext4).
const WARMUP_LIMIT: Duration = Duration::from_secs(900);

/// The template the Quick Start warms up.
pub const TEMPLATE: &str = "node22";

/// The release binaries the stack runs.
pub fn build_release() -> anyhow::Result<()> {
    setup::step("building nanobox and the four services (release)");
    setup::cargo(&[
        "build",
        "--quiet",
        "--release",
        "-p",
        "nanobox-cli",
        "-p",
        "nanobox-gateway",
        "-p",
        "nanobox-scheduler-service",
        "-p",
        "nanobox-node-agent",
        "-p",
        "nanobox-template-builder",
    ])
}

/// A registry on 127.0.0.1 serving the Debian + Node.js image as `node:22`; the image
/// reference.
pub fn serve_image() -> anyhow::Result<(nanobox_testkit::registry::Registry, String)> {
    setup::step(
        "the demo image: Debian bookworm + Node.js (debootstrap, cached), in a local registry",
    );
    let layout = nanobox_testkit::images::debian_node_layout();
    let registry = nanobox_testkit::registry::Registry::start();
    registry.push(
        &layout,
        nanobox_testkit::images::DEBIAN_NODE_TAG,
        "node",
        "22",
        nanobox_testkit::registry::PushFormat::Oci,
    );
    let image = format!("{}/node:22", registry.host);
    Ok((registry, image))
}

/// A running `nanobox up`: its endpoint lines. Dropping it stops the stack (SIGTERM)
/// and waits for it.
pub struct Up {
    child: Child,
    pub env: BTreeMap<String, String>,
    /// From spawning the process to its `nanobox: ready` line.
    pub ready_after: Duration,
}

impl Up {
    /// Starts `nanobox up` with the data directory `data_dir` on free ports, the guest
    /// of `guest`, plain HTTP to `registry`; returns once it printed `nanobox: ready`.
    pub fn start(guest: &Guest, data_dir: &Path, registry: &str) -> anyhow::Result<Self> {
        let nanobox = PathBuf::from("target/release/nanobox");
        let started = Instant::now();
        let mut child = Command::new(&nanobox)
            .arg("up")
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--api-port",
                "0",
                "--grpc-port",
                "0",
                "--templates-port",
                "0",
            ])
            .args(["--agent-port", "0", "--metrics-port", "0"])
            .args(["--plain-http-registry", registry])
            .arg("--kernel")
            .arg(&guest.kernel)
            .arg("--init")
            .arg(&guest.init)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} up", nanobox.display()))?;
        let stdout = child.stdout.take().context("nanobox up: no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut up = Self {
            child,
            env: BTreeMap::new(),
            ready_after: Duration::ZERO,
        };
        loop {
            let left = UP_LIMIT.saturating_sub(started.elapsed());
            let line = rx.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!("nanobox up did not get ready (see its output above)")
            })?;
            println!("{line}");
            if line == "nanobox: ready" {
                up.ready_after = started.elapsed();
                return Ok(up);
            }
            if let Some((k, v)) = line.split_once('=') {
                up.env.insert(k.to_owned(), v.to_owned());
            }
        }
    }

    fn var(&self, name: &str) -> anyhow::Result<&str> {
        self.env
            .get(name)
            .map(String::as_str)
            .with_context(|| format!("nanobox up printed no {name}"))
    }

    /// SIGTERM, and waits for it to stop everything.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let pid = i32::try_from(self.child.id()).context("pid")?;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let status = self.child.wait().context("waiting for nanobox up")?;
        anyhow::ensure!(status.success(), "nanobox up exited {status}");
        Ok(())
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.stop();
        }
    }
}

/// Timings of one Quick Start.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub warmup: Duration,
    pub create: Duration,
    pub exec: Duration,
}

/// `curl` with the stack's key, printing the command as the README shows it when `show`.
fn curl(
    up: &Up,
    show: bool,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<Value> {
    let url = up.var("NANOBOX_URL")?;
    let key = up.var("NANOBOX_API_KEY")?;
    if show {
        match body {
            Some(b) => println!("$ curl -X {method} $NANOBOX_URL{path} -d '{b}'"),
            None => println!("$ curl -X {method} $NANOBOX_URL{path}"),
        }
    }
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail-with-body", "-X", method])
        .arg(format!("{url}{path}"))
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .args(["-H", "Content-Type: application/json"]);
    if let Some(b) = body {
        cmd.args(["-d", b]);
    }
    let out = cmd.output().context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success(),
        "{method} {path} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text).with_context(|| format!("{method} {path}: not JSON: {text}"))
}

/// Warmup, create, exec (and delete) over REST, printing each call when `show`.
pub fn run(up: &Up, image: &str, show: bool) -> anyhow::Result<Timings> {
    let started = Instant::now();
    let warmup = format!(r#"{{"name": "{TEMPLATE}", "image": "{image}"}}"#);
    let answer = curl(up, show, "POST", "/api/v1/templates/warmup", Some(&warmup))?;
    if show {
        println!("{answer}");
    }
    let mut last = String::new();
    loop {
        let status = curl(
            up,
            false,
            "GET",
            &format!("/api/v1/templates/{TEMPLATE}/status"),
            None,
        )?;
        // The REST answer is the task itself (`response_body: "task"`).
        let state = status["state"].as_str().unwrap_or("").to_owned();
        if show && state != last {
            println!("  template {TEMPLATE}: {state}");
        }
        match state.as_str() {
            "TEMPLATE_STATE_READY" => break,
            "TEMPLATE_STATE_FAILED" => {
                anyhow::bail!("warmup failed: {}", status["message"])
            }
            _ => {}
        }
        anyhow::ensure!(
            started.elapsed() < WARMUP_LIMIT,
            "warmup still running after {WARMUP_LIMIT:?}"
        );
        last = state;
        std::thread::sleep(Duration::from_millis(100));
    }
    let warmup = started.elapsed();

    let started = Instant::now();
    let create =
        format!(r#"{{"template": "{TEMPLATE}", "resources": {{"vcpu": 2, "memory_mb": 512}}}}"#);
    let sandbox = curl(up, show, "POST", "/api/v1/sandboxes", Some(&create))?;
    let create = started.elapsed();
    if show {
        println!("{sandbox}");
    }
    let id = sandbox["id"]
        .as_str()
        .context("the create answer has no id")?
        .to_owned();

    let started = Instant::now();
    let exec = r#"{"command": "node", "args": ["-e", "console.log(JSON.stringify({ok:true}))"]}"#;
    let result = curl(
        up,
        show,
        "POST",
        &format!("/api/v1/sandboxes/{id}/exec"),
        Some(exec),
    )?;
    let exec = started.elapsed();
    if show {
        println!("{result}");
    }
    anyhow::ensure!(
        result["stdout"] == "{\"ok\":true}\n" && result["exit_code"] == 0,
        "unexpected exec result: {result}"
    );
    curl(up, show, "DELETE", &format!("/api/v1/sandboxes/{id}"), None)?;
    Ok(Timings {
        warmup,
        create,
        exec,
    })
}

/// The data directory of the demo's and the benchmark's stacks: their own, so that a
/// `nanobox up` of the user's keeps running beside them.
pub fn data_dir(name: &str) -> PathBuf {
    PathBuf::from("/var/lib/nanobox").join(name)
}
