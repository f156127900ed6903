//! Hardlinks to every non-regular type, and whiteouts next to new entries of the same
//! layer, checked in the finished ext4 image with e2fsprogs (`debugfs`, `e2fsck -fn`) for
//! a staging tree in memory (tmpfs) and on disk.
//!
//! Sockets have no tar entry type (ustar, GNU and PAX know none; GNU tar skips them and
//! Go's archive/tar refuses them), so no layer can carry a socket or a hardlink to one;
//! the ext4 builder is still checked to keep a hardlinked socket of the tree one inode.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::{debugfs, fsck, Layer, Sandbox};
use nanobox_oci::{build_ext4, ApplyOptions, Compression, Ext4Options, LayerApplier};
use tar::EntryType;

/// Where a staging tree lives in a test.
#[derive(Debug, Clone, Copy)]
enum Place {
    Memory,
    Disk,
}

const PLACES: [Place; 2] = [Place::Memory, Place::Disk];

/// A staging root in `place`, kept alive by the returned guard.
fn staging(sb: &Sandbox, place: Place) -> (tempfile::TempDir, PathBuf) {
    let dir = match place {
        // The tmpfs convert stages in when the image fits.
        Place::Memory => tempfile::tempdir_in("/dev/shm").unwrap(),
        Place::Disk => tempfile::tempdir_in(&sb.scratch).unwrap(),
    };
    let root = dir.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    (dir, root)
}

fn tight() -> Ext4Options {
    Ext4Options {
        headroom_percent: 0,
        headroom_bytes: 0,
        min_size_bytes: 0,
        ..Ext4Options::default()
    }
}

/// Applies `layers` in `place` and builds the ext4 image; returns its path.
fn image_of(sb: &Sandbox, place: Place, name: &str, layers: Vec<Vec<u8>>) -> PathBuf {
    let (_guard, root) = staging(sb, place);
    let mut applier = LayerApplier::new(&root, ApplyOptions::default()).unwrap();
    for layer in layers {
        applier
            .apply(std::io::Cursor::new(layer), Compression::None)
            .unwrap();
    }
    let out = sb.scratch.join(format!("{name}-{place:?}.ext4"));
    build_ext4(&root, &out, &tight()).unwrap();
    fsck(&out);
    out
}

/// One inode as `debugfs stat` shows it.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    inode: u64,
    kind: String,
    links: u64,
    size: u64,
    device: Option<(u32, u32)>,
    fast_link: Option<String>,
}

fn stat(image: &Path, path: &str) -> Stat {
    let text = debugfs(image, &format!("stat \"{}\"", path.replace('"', "\"\"")));
    let after = |key: &str| -> Option<String> {
        let line = text.lines().find(|l| l.contains(key))?;
        let rest = &line[line.find(key)? + key.len()..];
        Some(rest.split_whitespace().next()?.to_owned())
    };
    let first = text.lines().next().unwrap_or_default();
    let kind = first
        .find("Type:")
        .zip(first.find("Mode:"))
        .map(|(a, b)| first[a + 5..b].trim().to_owned())
        .unwrap_or_else(|| panic!("no inode at {path}: {text}"));
    Stat {
        inode: after("Inode:").unwrap().parse().unwrap(),
        kind,
        links: after("Links:").unwrap().parse().unwrap(),
        size: after("Size:").unwrap().parse().unwrap(),
        device: after("Device major/minor number:").map(|d| {
            let (major, minor) = d.split_once(':').unwrap();
            (major.parse().unwrap(), minor.parse().unwrap())
        }),
        fast_link: text
            .lines()
            .find_map(|l| l.strip_prefix("Fast link dest: "))
            .map(|s| s.trim_matches('"').to_owned()),
    }
}

/// Names in a directory of the image (`.`, `..` and lost+found left out), with modes.
fn listing(image: &Path, dir: &str) -> BTreeMap<String, String> {
    debugfs(image, &format!("ls -p \"{dir}\""))
        .lines()
        .filter_map(|l| {
            let parts: Vec<&str> = l.split('/').collect();
            (parts.len() >= 6).then(|| (parts[5].to_owned(), parts[2].to_owned()))
        })
        .filter(|(name, _)| !matches!(name.as_str(), "." | ".." | "lost+found"))
        .collect()
}

fn cat(image: &Path, path: &str) -> String {
    debugfs(image, &format!("cat \"{path}\""))
}

/// Both names are one inode with two links, of `kind`.
fn assert_one_inode(image: &Path, a: &str, b: &str, kind: &str) -> Stat {
    let first = stat(image, a);
    let second = stat(image, b);
    assert_eq!(first, second, "{a} and {b} in {}", image.display());
    assert_eq!(first.kind, kind, "{a}");
    assert_eq!(first.links, 2, "{a}");
    first
}

const SLOW_TARGET: &str =
    "a/target/long/enough/that/ext4/keeps/it/in/a/data/block/rather/than/the/inode";

/// Class 3: a hardlink entry links the symlink, device or fifo itself, in the same layer
/// and across layers, and the image keeps the two names on one inode with nlink 2.
#[test]
fn hardlinks_to_symlinks_devices_and_fifos_are_one_inode_in_the_image() {
    assert!(SLOW_TARGET.len() > 60);
    for place in PLACES {
        let sb = Sandbox::new();
        let lower = Layer::new()
            .dir("dev", 0o755)
            .device("dev/null", EntryType::Char, 1, 3)
            .hardlink("dev/null-link", "dev/null")
            .device("dev/loop0", EntryType::Block, 7, 0)
            .hardlink("dev/loop0-link", "dev/loop0")
            .fifo("dev/initctl", 0o600)
            .hardlink("dev/initctl-link", "dev/initctl")
            .dir("l", 0o755)
            .symlink("l/fast", "target")
            .hardlink("l/fast-link", "l/fast")
            .symlink("l/slow", SLOW_TARGET)
            .hardlink("l/slow-link", "l/slow")
            .symlink("l/dangling", "/nowhere")
            .symlink("l/with \"quote\" and space", "q");
        // Across layers, and a name debugfs must be given quoted.
        let upper = Layer::new()
            .hardlink("l/dangling-link", "l/dangling")
            .hardlink("l/other \"name\"", "l/with \"quote\" and space");
        let image = image_of(&sb, place, "links", vec![lower.tar(), upper.tar()]);

        let null = assert_one_inode(&image, "/dev/null", "/dev/null-link", "character special");
        assert_eq!(null.device, Some((1, 3)));
        let lp = assert_one_inode(&image, "/dev/loop0", "/dev/loop0-link", "block special");
        assert_eq!(lp.device, Some((7, 0)));
        assert_one_inode(&image, "/dev/initctl", "/dev/initctl-link", "FIFO");
        let fast = assert_one_inode(&image, "/l/fast", "/l/fast-link", "symlink");
        assert_eq!(fast.fast_link.as_deref(), Some("target"));
        let slow = assert_one_inode(&image, "/l/slow", "/l/slow-link", "symlink");
        assert_eq!(slow.size, SLOW_TARGET.len() as u64);
        assert_eq!(cat(&image, "/l/slow-link"), SLOW_TARGET);
        let dangling = assert_one_inode(&image, "/l/dangling", "/l/dangling-link", "symlink");
        assert_eq!(dangling.fast_link.as_deref(), Some("/nowhere"));
        let quoted = assert_one_inode(
            &image,
            "/l/with \"quote\" and space",
            "/l/other \"name\"",
            "symlink",
        );
        assert_eq!(quoted.fast_link.as_deref(), Some("q"));
        // No inode was left behind by the join (e2fsck above also counts them).
        let names = listing(&image, "/l");
        assert_eq!(names.len(), 8, "{names:?}");
    }
}

/// The builder keeps a hardlinked socket of the tree (no layer can carry one) one inode.
#[test]
fn a_hardlinked_socket_of_the_tree_stays_one_inode() {
    for place in PLACES {
        let sb = Sandbox::new();
        let (_guard, root) = staging(&sb, place);
        let _listener = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
        fs::hard_link(root.join("sock"), root.join("sock-link")).unwrap();
        std::os::unix::fs::symlink("sock", root.join("sym")).unwrap();
        fs::hard_link(root.join("sym"), root.join("sym-link")).unwrap();
        let out = sb.scratch.join("socket.ext4");
        build_ext4(&root, &out, &tight()).unwrap();
        fsck(&out);
        assert_one_inode(&out, "/sock", "/sock-link", "socket");
        assert_one_inode(&out, "/sym", "/sym-link", "symlink");
        // The tree itself is left as it was.
        assert_eq!(
            common::node(&root.join("sym-link")),
            common::node(&root.join("sym"))
        );
    }
}

/// The lower layer every whiteout case starts from.
fn whiteout_lower() -> Vec<u8> {
    Layer::new()
        .file("f", b"lower f", 0o644)
        .symlink("s", "lower-target")
        .dir("d", 0o755)
        .file("d/lower", b"lower", 0o644)
        .dir("d/deep", 0o755)
        .file("d/deep/lower", b"lower", 0o644)
        .dir("o", 0o755)
        .file("o/lower", b"lower", 0o644)
        .dir("o/sub", 0o755)
        .file("o/sub/lower", b"lower", 0o644)
        .dir("r", 0o755)
        .file("r/lower", b"lower", 0o644)
        .tar()
}

/// What every order of the upper layer must leave in the image.
fn assert_whiteout_result(image: &Path, order: &str) {
    let ctx = format!("{order} ({})", image.display());
    let root = listing(image, "/");
    let names: Vec<&str> = root.keys().map(String::as_str).collect();
    assert_eq!(names, ["d", "f", "n", "o", "r", "s"], "{ctx}");
    // A whiteout and a new file of the same name: the new file.
    assert_eq!(cat(image, "/f"), "upper f", "{ctx}");
    let s = stat(image, "/s");
    assert_eq!(s.fast_link.as_deref(), Some("upper-target"), "{ctx}");
    // A whited-out lower directory this layer fills again: only the new content.
    let d: Vec<String> = listing(image, "/d").into_keys().collect();
    assert_eq!(d, ["deep", "new"], "{ctx}");
    let deep: Vec<String> = listing(image, "/d/deep").into_keys().collect();
    assert_eq!(deep, ["new"], "{ctx}");
    // A whiteout of a new name with no lower file behind it.
    assert_eq!(cat(image, "/n"), "new n", "{ctx}");
    // Opaque markers: the lower content goes, this layer's entries stay, also under a
    // lower subdirectory the layer writes into without declaring it.
    let o: Vec<String> = listing(image, "/o").into_keys().collect();
    assert_eq!(o, ["new", "sub"], "{ctx}");
    let sub: Vec<String> = listing(image, "/o/sub").into_keys().collect();
    assert_eq!(sub, ["new"], "{ctx}");
    // An opaque marker in a directory the layer re-declares.
    let r: Vec<String> = listing(image, "/r").into_keys().collect();
    assert_eq!(r, ["new"], "{ctx}");
    assert_eq!(cat(image, "/r/new"), "new r", "{ctx}");
}

/// Class 4: whiteouts and opaque markers delete from the lower layers only, whether they
/// come before or after the same layer's new entries of the same names.
#[test]
fn whiteouts_and_opaque_markers_keep_the_same_layers_entries_in_either_order() {
    let whiteouts = |l: Layer| {
        l.whiteout(".wh.f")
            .whiteout(".wh.s")
            .whiteout(".wh.d")
            .whiteout(".wh.n")
            .whiteout("o/.wh..wh..opq")
            .whiteout("r/.wh..wh..opq")
    };
    let entries = |l: Layer| {
        l.file("f", b"upper f", 0o644)
            .symlink("s", "upper-target")
            .dir("d", 0o755)
            .file("d/new", b"new", 0o644)
            .file("d/deep/new", b"new", 0o644)
            .file("n", b"new n", 0o644)
            .file("o/new", b"new", 0o644)
            .file("o/sub/new", b"new", 0o644)
            .dir("r", 0o750)
            .file("r/new", b"new r", 0o644)
    };
    for place in PLACES {
        let before = whiteouts(entries(Layer::new())).tar();
        let after = entries(whiteouts(Layer::new())).tar();
        // Whiteouts interleaved with the entries they concern, both ways round.
        let mixed = Layer::new()
            .file("f", b"upper f", 0o644)
            .whiteout(".wh.f")
            .whiteout(".wh.s")
            .symlink("s", "upper-target")
            .file("d/new", b"new", 0o644)
            .whiteout(".wh.d")
            .file("d/deep/new", b"new", 0o644)
            .whiteout(".wh.n")
            .file("n", b"new n", 0o644)
            .file("o/sub/new", b"new", 0o644)
            .whiteout("o/.wh..wh..opq")
            .file("o/new", b"new", 0o644)
            .dir("r", 0o750)
            .whiteout("r/.wh..wh..opq")
            .file("r/new", b"new r", 0o644)
            .tar();
        for (order, upper) in [
            ("entries, then whiteouts", before),
            ("whiteouts, then entries", after),
            ("interleaved", mixed),
        ] {
            let sb = Sandbox::new();
            let name = order.replace([',', ' '], "-");
            let image = image_of(&sb, place, &name, vec![whiteout_lower(), upper]);
            assert_whiteout_result(&image, order);
        }
    }
}
