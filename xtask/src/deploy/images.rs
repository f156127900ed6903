//! The image part of `cargo xtask check-deploy`: two images built with buildah (vfs
//! storage, chroot isolation, no daemon) from a Debian base made here with debootstrap,
//! since there is no Docker Hub: the gateway, then run from its image (its /healthz and
//! /metrics answer, SIGTERM stops it), and the node agent, whose tools and files are
//! checked inside it. The base is cached under `<cache>/deploy/`, keyed by its recipe;
//! the images built are removed afterwards.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::{apt_install, capture, deploy_cache, lock, short_hash};

/// Bump when [`base_recipe`] changes in a way its text does not show.
const BASE_VERSION: u32 = 1;

/// The node agent's runtime packages (docker/node-agent.Dockerfile), preinstalled in the
/// test base so that the image's own `apt-get install` finds them there and the build does
/// not download them again on every run.
const BASE_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "iproute2",
    "nftables",
    "e2fsprogs",
    "ca-certificates",
];

/// Where buildah keeps the base and the images this check builds.
const IMAGE_PREFIX: &str = "localhost/nanobox-check";

/// buildah with this check's own storage (vfs: no overlay or FUSE needed) under the cache.
struct Buildah {
    root: PathBuf,
    runroot: PathBuf,
}

impl Buildah {
    fn new() -> Self {
        let dir = deploy_cache().join("buildah");
        Self {
            root: dir.join("storage"),
            runroot: dir.join("run"),
        }
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.args(["--storage-driver", "vfs", "--root"])
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .env("BUILDAH_ISOLATION", "chroot");
        cmd
    }

    fn has_image(&self, name: &str) -> bool {
        self.cmd()
            .args(["inspect", "--type", "image", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn config(&self, image: &str) -> anyhow::Result<serde_json::Value> {
        let out = capture(self.cmd().args(["inspect", "--type", "image", image]))?;
        let v: serde_json::Value = serde_json::from_str(&out).context("buildah inspect JSON")?;
        Ok(v["Docker"]["config"].clone())
    }
}

pub fn check() -> anyhow::Result<String> {
    apt_install(&["buildah", "debootstrap"])?;
    let buildah = Buildah::new();
    let base = base_image(&buildah)?;
    let mut lines = vec![format!("base {base}")];

    let t = Instant::now();
    capture(Command::new("docker/stage.sh").args(["gateway", "node-agent"]))
        .context("staging the binaries (docker/stage.sh)")?;
    lines.push(format!(
        "staged the gateway and node agent binaries, the init and the kernel in target/docker/ ({:.1} s)",
        t.elapsed().as_secs_f64()
    ));

    let result = (|| {
        let gateway = build_image(&buildah, "gateway", &base)?;
        lines.push(gateway.1);
        lines.push(smoke_gateway(&buildah, &gateway.0)?);
        let agent = build_image(&buildah, "node-agent", &base)?;
        lines.push(agent.1);
        lines.push(inspect_node_agent(&buildah, &agent.0)?);
        anyhow::Ok(())
    })();
    // The base stays; what this run built goes (with vfs every layer is a full copy).
    for component in ["gateway", "node-agent"] {
        let _ = capture(buildah.cmd().args([
            "rmi",
            "-f",
            &format!("{IMAGE_PREFIX}/{component}:check"),
        ]));
    }
    let _ = capture(buildah.cmd().args(["rm", "--all"]));
    let _ = capture(buildah.cmd().args(["rmi", "--prune"]));
    result?;
    Ok(lines.join("\n"))
}

/// The Debian mirror apt uses (what debootstrap fetches from).
fn debian_mirror() -> String {
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let from_deb822 = deb822
        .lines()
        .filter_map(|l| l.strip_prefix("URIs:"))
        .flat_map(str::split_whitespace)
        .find(|u| !u.contains("security"))
        .map(str::to_owned);
    let from_list = || {
        std::fs::read_to_string("/etc/apt/sources.list")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("deb "))
            .flat_map(str::split_whitespace)
            .find(|w| w.starts_with("http") && !w.contains("security"))
            .map(str::to_owned)
    };
    from_deb822
        .or_else(from_list)
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

fn base_recipe(mirror: &str) -> String {
    format!(
        "debootstrap --variant=minbase --include={} bookworm ROOT {mirror} (v{BASE_VERSION})",
        BASE_PACKAGES.join(",")
    )
}

/// The base image, in buildah's storage: a Debian bookworm minbase (plus the node agent's
/// packages) from debootstrap, the stand-in for `debian:bookworm-slim`. The root
/// filesystem is kept as a tarball under the cache, keyed by its recipe.
fn base_image(buildah: &Buildah) -> anyhow::Result<String> {
    let mirror = debian_mirror();
    let recipe = base_recipe(&mirror);
    let key = short_hash(&[recipe.as_bytes()]);
    let name = format!("{IMAGE_PREFIX}/debian-base:{key}");
    let cache = deploy_cache();
    let _lock = lock(&cache.join(".base.lock"))?;
    if buildah.has_image(&name) {
        return Ok(name);
    }
    let tarball = cache.join(format!("debian-base-{key}.tar"));
    if !tarball.is_file() {
        eprintln!("making the base: {recipe}");
        let work = cache.join(format!(".base-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let root = work.join("root");
        capture(
            Command::new("debootstrap")
                .arg("--variant=minbase")
                .arg(format!("--include={}", BASE_PACKAGES.join(",")))
                .arg("bookworm")
                .arg(&root)
                .arg(&mirror),
        )?;
        // What debian:bookworm-slim leaves out too.
        for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
            let _ = capture(Command::new("find").arg(root.join(dir)).args([
                "-mindepth",
                "1",
                "-type",
                "f",
                "-delete",
            ]));
        }
        let partial = work.join("root.tar");
        capture(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .args(["--numeric-owner", "-cf"])
                .arg(&partial)
                .arg("."),
        )?;
        std::fs::rename(&partial, &tarball)?;
        let _ = std::fs::remove_dir_all(&work);
    }
    eprintln!("importing {} into buildah as {name}", tarball.display());
    let container = capture(buildah.cmd().args(["from", "--quiet", "scratch"]))?
        .trim()
        .to_owned();
    let imported = (|| {
        capture(
            buildah
                .cmd()
                .args(["add", "--quiet", &container])
                .arg(&tarball)
                .arg("/"),
        )?;
        capture(buildah.cmd().args([
            "config",
            "--env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--cmd",
            "/bin/bash",
            &container,
        ]))?;
        capture(
            buildah
                .cmd()
                .args(["commit", "--quiet", "--rm", &container, &name]),
        )
    })();
    if imported.is_err() {
        let _ = capture(buildah.cmd().args(["rm", &container]));
    }
    imported?;
    Ok(name)
}

/// Builds docker/<component>.Dockerfile with the staged binaries (BINARIES=prebuilt), on
/// the local base for both the runtime and the (skipped) Rust stage, so nothing is pulled.
fn build_image(buildah: &Buildah, component: &str, base: &str) -> anyhow::Result<(String, String)> {
    let tag = format!("{IMAGE_PREFIX}/{component}:check");
    let t = Instant::now();
    capture(
        buildah
            .cmd()
            .args([
                "bud",
                "--isolation",
                "chroot",
                "--pull=never",
                "--format",
                "docker",
                "--quiet",
            ])
            .args(["-f", &format!("docker/{component}.Dockerfile")])
            .args(["--build-arg", "BINARIES=prebuilt"])
            .args(["--build-arg", &format!("RUNTIME_IMAGE={base}")])
            .args(["--build-arg", &format!("RUST_IMAGE={base}")])
            .args(["-t", &tag, "."]),
    )
    .with_context(|| format!("building docker/{component}.Dockerfile"))?;
    Ok((
        tag.clone(),
        format!(
            "built {tag} from docker/{component}.Dockerfile ({:.1} s)",
            t.elapsed().as_secs_f64()
        ),
    ))
}

fn expect_config(
    config: &serde_json::Value,
    image: &str,
    user: &str,
    entrypoint: &str,
    env: &[&str],
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config["User"].as_str() == Some(user),
        "{image}: runs as {:?}, expected {user}",
        config["User"]
    );
    anyhow::ensure!(
        config["Entrypoint"] == serde_json::json!([entrypoint]),
        "{image}: entrypoint {}, expected [{entrypoint:?}]",
        config["Entrypoint"]
    );
    let have: Vec<&str> = config["Env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    for want in env {
        anyhow::ensure!(have.contains(want), "{image}: no {want} in its environment");
    }
    Ok(())
}

/// Runs the gateway from its image as the image's user, on loopback ports of its choosing
/// (the image's 0.0.0.0 addresses overridden), and asks /healthz and /metrics.
fn smoke_gateway(buildah: &Buildah, image: &str) -> anyhow::Result<String> {
    let config = buildah.config(image)?;
    expect_config(
        &config,
        image,
        "10001:10001",
        "/opt/nanobox/bin/nanobox-gateway",
        &[
            "NANOBOX__API__LISTEN_ADDR=0.0.0.0:8080",
            "NANOBOX__API__METRICS_ADDR=0.0.0.0:9090",
        ],
    )?;
    let container = capture(
        buildah
            .cmd()
            .args(["from", "--quiet", "--pull-never", image]),
    )?
    .trim()
    .to_owned();
    // `sh` prints its pid (chroot isolation shares the host's pid namespace) and becomes
    // the gateway, so the gateway itself can be stopped with SIGTERM.
    let mut child = buildah
        .cmd()
        .args(["run", "--isolation", "chroot"])
        .args(["--env", "NANOBOX__API__LISTEN_ADDR=127.0.0.1:0"])
        .args(["--env", "NANOBOX__API__METRICS_ADDR=127.0.0.1:0"])
        .args([
            &container,
            "--",
            "sh",
            "-c",
            "echo \"pid $$\"; exec /opt/nanobox/bin/nanobox-gateway",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running the gateway image")?;
    let stdout = child.stdout.take().context("the gateway's stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut pid = None;
    let mut api = None;
    let mut metrics = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.is_none() || metrics.is_none() || pid.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        if let Some(p) = line.strip_prefix("pid ") {
            pid = p.trim().parse::<u32>().ok();
        } else if let Some(a) = line.strip_prefix("listening on ") {
            api = Some(a.trim().to_owned());
        } else if let Some(a) = line.strip_prefix("metrics on ") {
            metrics = Some(a.trim().to_owned());
        }
    }
    let probed = (|| {
        let api = api
            .as_deref()
            .context("the gateway did not print `listening on <addr>` within 60 s")?;
        let metrics = metrics
            .as_deref()
            .context("the gateway did not print `metrics on <addr>` within 60 s")?;
        let (status, _) = http_get(api, "/healthz")?;
        anyhow::ensure!(status == 200, "GET /healthz answered {status}");
        let (status, body) = http_get(metrics, "/metrics")?;
        anyhow::ensure!(status == 200, "GET /metrics answered {status}");
        anyhow::ensure!(
            body.contains("nanobox_"),
            "GET /metrics has no nanobox_ series"
        );
        anyhow::Ok(())
    })();
    // Stop the gateway (by the pid it reported), then buildah.
    if let Some(pid) = pid {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let stopped = wait_timeout(&mut child, Duration::from_secs(20));
    if !stopped {
        if let Some(pid) = pid {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = capture(buildah.cmd().args(["rm", &container]));
    if let Err(e) = probed {
        let mut stderr = String::new();
        if let Some(mut s) = child.stderr.take() {
            use std::io::Read as _;
            let _ = s.read_to_string(&mut stderr);
        }
        anyhow::bail!("{e:#}\nthe gateway's log:\n{}", stderr.trim_end());
    }
    anyhow::ensure!(stopped, "the gateway did not stop within 20 s of SIGTERM");
    Ok(format!(
        "ran {image} as uid 10001: GET /healthz 200, GET /metrics 200, stopped on SIGTERM"
    ))
}

fn wait_timeout(child: &mut std::process::Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A plain HTTP/1.0 GET: (status, body).
fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {path}: no HTTP status in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// What the node agent needs at run time is in its image: the agent, the guest kernel and
/// init, QEMU and the host tools it calls, the user QEMU drops to.
fn inspect_node_agent(buildah: &Buildah, image: &str) -> anyhow::Result<String> {
    let config = buildah.config(image)?;
    expect_config(
        &config,
        image,
        "0:0",
        "/opt/nanobox/bin/nanobox-node-agent",
        &[
            "NANOBOX__AGENT__LISTEN_ADDR=0.0.0.0:50071",
            "NANOBOX__AGENT__METRICS_ADDR=0.0.0.0:9090",
            "NANOBOX__FIRECRACKER__KERNEL=/usr/local/lib/nanobox/vmlinux",
            "NANOBOX__AGENT__RUN_AS_USER=nanobox",
        ],
    )?;
    let container = capture(
        buildah
            .cmd()
            .args(["from", "--quiet", "--pull-never", image]),
    )?
    .trim()
    .to_owned();
    let script = "set -e; \
        nanobox-node-agent --version; \
        qemu-system-x86_64 --version | head -n 1; \
        qemu-img --version | head -n 1; \
        nft --version; ip -V; tc -V; nsenter --version; resize2fs 2>&1 | head -n 1 || true; \
        test -s /usr/local/lib/nanobox/vmlinux; \
        test -x /usr/local/lib/nanobox/nanobox-init; \
        id nanobox";
    let out = capture(buildah.cmd().args([
        "run",
        "--isolation",
        "chroot",
        &container,
        "--",
        "sh",
        "-c",
        script,
    ]));
    let _ = capture(buildah.cmd().args(["rm", &container]));
    let out = out.context("the node agent image lacks something it needs")?;
    let first = |prefix: &str| {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or("?")
            .to_owned()
    };
    Ok(format!(
        "in {image}: {}, {}, {}, kernel and init, user nanobox",
        first("nanobox-node-agent"),
        first("QEMU emulator"),
        first("nftables"),
    ))
}
