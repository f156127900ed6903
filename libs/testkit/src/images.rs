//! Test images: a small busybox image made on the spot, and realistic ones built from
//! Debian's packages (there is no Docker Hub here).
//!
//! [`busybox_layout`] makes a two-layer busybox image as an OCI layout with `umoci`.
//! [`debian_node_layout`] makes a Debian bookworm minbase with Node.js as a two-layer OCI
//! image layout: the system from `debootstrap` (from the same mirror apt uses), then an
//! application layer. It is cached under the NanoBox cache directory, keyed by
//! [`DEBIAN_NODE_VERSION`], and built into a temporary directory that is renamed into place,
//! so concurrent test processes never see half an image. [`debian_large_layout`] is that
//! image with a third layer of generated files, over 2 GB unpacked, for the benchmark of
//! large conversions.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::run_command;

/// Bump when the recipe below changes, so cached images are rebuilt.
pub const DEBIAN_NODE_VERSION: u32 = 1;

/// Bump when the recipe of [`debian_large_layout`] changes.
pub const DEBIAN_LARGE_VERSION: u32 = 1;

/// The tag of the image in the layout.
pub const DEBIAN_NODE_TAG: &str = "v1";

/// The Debian mirror apt is configured with (deb822 or one-line format).
fn debian_mirror() -> String {
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    if let Some(uri) = deb822
        .lines()
        .filter_map(|l| l.strip_prefix("URIs:"))
        .flat_map(str::split_whitespace)
        .find(|u| !u.contains("security"))
    {
        return uri.to_owned();
    }
    let classic = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    classic
        .lines()
        .filter(|l| l.starts_with("deb "))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("http")))
        .find(|u| !u.contains("security"))
        .unwrap_or("http://deb.debian.org/debian")
        .to_owned()
}

/// A small two-layer busybox image as an OCI layout in `work` (tag `v1`): busybox and
/// `/bin/sh`, then `/etc/marker` holding `marker`, so different markers make different
/// images. Its config sets `MARKER=<marker>` and the working directory `/etc`.
pub fn busybox_layout(work: &Path, marker: &str) -> PathBuf {
    let layout = work.join(format!("layout-{marker}"));
    let image = format!("{}:v1", layout.display());
    run_command(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    );
    run_command(Command::new("umoci").args(["new", "--image", &image]));
    for (i, step) in ["busybox", "marker"].iter().enumerate() {
        let bundle = work.join(format!("bundle-{marker}-{i}"));
        run_command(
            Command::new("umoci")
                .args(["unpack", "--image", &image])
                .arg(&bundle),
        );
        let root = bundle.join("rootfs");
        let made = if *step == "busybox" {
            std::fs::create_dir_all(root.join("bin"))
                .and_then(|()| std::fs::copy("/bin/busybox", root.join("bin/busybox")))
                .and_then(|_| std::os::unix::fs::symlink("busybox", root.join("bin/sh")))
        } else {
            std::fs::create_dir_all(root.join("etc"))
                .and_then(|()| std::fs::write(root.join("etc/marker"), marker))
        };
        made.unwrap_or_else(|e| panic!("the {step} layer in {}: {e}", root.display()));
        run_command(
            Command::new("umoci")
                .args(["repack", "--image", &image])
                .arg(&bundle),
        );
        std::fs::remove_dir_all(&bundle)
            .unwrap_or_else(|e| panic!("removing {}: {e}", bundle.display()));
    }
    run_command(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        &format!("MARKER={marker}"),
        "--config.workingdir",
        "/etc",
    ]));
    layout
}

/// The cached Debian + Node.js image layout (building it first if needed, ~100 s).
pub fn debian_node_layout() -> PathBuf {
    let dir = nanobox_core::cache_dir().join("images");
    let out = dir.join(format!("debian-node-v{DEBIAN_NODE_VERSION}"));
    if out.join("index.json").is_file() {
        return out;
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let work = tempfile::Builder::new()
        .prefix(".debian-node-")
        .tempdir_in(&dir)
        .unwrap_or_else(|e| panic!("work dir in {}: {e}", dir.display()));
    build(work.path());
    place(&work.path().join("layout"), &out);
    out
}

/// Renames a finished layout into its cached place; another process may have finished
/// first, and then theirs is kept.
fn place(layout: &Path, out: &Path) {
    if std::fs::rename(layout, out).is_err() {
        assert!(
            out.join("index.json").is_file(),
            "could not place {}",
            out.display()
        );
    }
}

/// The Debian + Node.js image with a third layer under `/opt/data`: 160 files of 12 MiB
/// of incompressible bytes and 4,096 text files of 32 KiB, about 2.3 GB unpacked in all.
/// Cached like [`debian_node_layout`] (building it takes a few minutes). Tag `v1`.
pub fn debian_large_layout() -> PathBuf {
    let dir = nanobox_core::cache_dir().join("images");
    let out = dir.join(format!("debian-large-v{DEBIAN_LARGE_VERSION}"));
    if out.join("index.json").is_file() {
        return out;
    }
    let base = debian_node_layout();
    let work = tempfile::Builder::new()
        .prefix(".debian-large-")
        .tempdir_in(&dir)
        .unwrap_or_else(|e| panic!("work dir in {}: {e}", dir.display()));
    let layout = work.path().join("layout");
    run_command(Command::new("cp").arg("-a").arg(&base).arg(&layout));
    let image = format!("{}:{DEBIAN_NODE_TAG}", layout.display());
    let bundle = work.path().join("bundle");
    run_command(
        Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle),
    );
    generate_data(&bundle.join("rootfs/opt/data"));
    run_command(
        Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle),
    );
    place(&layout, &out);
    out
}

/// The generated files of [`debian_large_layout`] (deterministic).
fn generate_data(dir: &Path) {
    use std::io::Write as _;
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut block = vec![0u8; 1 << 20];
    for i in 0..160 {
        let path = dir.join(format!("blob-{i:03}.bin"));
        let mut f = std::fs::File::create(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        for _ in 0..12 {
            for word in block.chunks_exact_mut(8) {
                word.copy_from_slice(&next().to_le_bytes());
            }
            f.write_all(&block)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
    }
    for i in 0..4096 {
        let sub = dir.join(format!("text/{:02}", i % 64));
        std::fs::create_dir_all(&sub).unwrap_or_else(|e| panic!("mkdir {}: {e}", sub.display()));
        let line = format!("line of file {i}: {:016x}\n", next());
        let text = line.repeat((32 << 10) / line.len());
        std::fs::write(sub.join(format!("{i}.txt")), text)
            .unwrap_or_else(|e| panic!("writing text {i}: {e}"));
    }
}

fn build(work: &Path) {
    let rootfs = work.join("debootstrap");
    run_command(
        Command::new("debootstrap")
            .args(["--variant=minbase", "--include=nodejs", "bookworm"])
            .arg(&rootfs)
            .arg(debian_mirror()),
    );
    let layout = work.join("layout");
    let image = format!("{}:{DEBIAN_NODE_TAG}", layout.display());
    run_command(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
    );
    run_command(Command::new("umoci").args(["new", "--image", &image]));

    // Layer 1: the system.
    let bundle = work.join("bundle1");
    run_command(
        Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle),
    );
    run_command(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", rootfs.display()))
            .arg(bundle.join("rootfs")),
    );
    run_command(
        Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle),
    );

    // Layer 2: the application.
    let bundle = work.join("bundle2");
    run_command(
        Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle),
    );
    let app = bundle.join("rootfs/app");
    std::fs::create_dir_all(&app).unwrap_or_else(|e| panic!("mkdir /app: {e}"));
    std::fs::write(
        app.join("index.js"),
        "console.log(`node ${process.version} in ${process.cwd()} says ${process.env.GREETING}`);\n",
    )
    .unwrap_or_else(|e| panic!("writing index.js: {e}"));
    run_command(
        Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle),
    );
    run_command(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--config.env",
        "GREETING=hello",
        "--config.workingdir",
        "/app",
        "--config.cmd",
        "node",
        "--config.cmd",
        "index.js",
    ]));
}
