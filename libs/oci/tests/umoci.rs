//! The staging tree equals what `umoci unpack` makes of the same image: file types,
//! contents, modes, owners, link targets, hardlink counts, device numbers, xattrs and
//! the mtimes of everything but directories (which neither tool promises: creating an
//! entry bumps its parent's mtime, and the two restore them in different orders).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{snapshot, write_oci_layout, Layer, LayerBlob, Sandbox};
use nanobox_oci::{ApplyOptions, Compression, LayerApplier};
use tar::EntryType;

fn capability() -> Vec<u8> {
    let mut cap = vec![0u8; 20];
    cap[0..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
    cap
}

/// Three layers that exercise every rule.
fn test_image() -> Vec<LayerBlob> {
    let cap = capability();
    let base = Layer::new()
        .dir("etc", 0o755)
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644)
        .file("etc/old.conf", b"old", 0o644)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .dir("usr/lib", 0o755)
        .file("usr/bin/tool", b"#!/bin/sh\necho tool\n", 0o755)
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .file_owned("usr/bin/su", b"su", 0o4755, 0, 0)
        .file_owned("usr/bin/wall", b"wall", 0o2755, 0, 5)
        .pax(&[("SCHILY.xattr.security.capability", &cap)])
        .file("usr/bin/ping", b"ping", 0o755)
        .symlink("usr/bin/dangling", "nowhere")
        .file("usr/lib/libx.so", b"libx", 0o644)
        .symlink("bin", "usr/bin")
        .symlink("lib", "/usr/lib")
        .dir("var", 0o755)
        .dir("var/cache", 0o755)
        .file("var/cache/big", &vec![7; 100_000], 0o644)
        .dir("opt", 0o755)
        .file("opt/lower", b"lower", 0o644)
        .dir("opt/sub", 0o755)
        .file("opt/sub/lower", b"lower", 0o644)
        .dir("dev", 0o755)
        .device("dev/null", EntryType::Char, 1, 3)
        .device("dev/loop0", EntryType::Block, 7, 0)
        .fifo("dev/initctl", 0o600)
        .dir_owned("tmp", 0o1777, 0, 0)
        .dir("home", 0o755)
        .dir_owned("home/user", 0o750, 1000, 1000)
        .pax(&[("SCHILY.xattr.user.note", b"hello")])
        .file_owned("home/user/.profile", b"export A=1\n", 0o600, 1000, 1000)
        .file("replace-me-dir", b"file", 0o644)
        .dir("replace-me-file", 0o755)
        .file("replace-me-file/inner", b"inner", 0o644);
    let middle = Layer::new()
        .whiteout("etc/.wh.old.conf")
        .whiteout("var/.wh.cache")
        .dir("opt", 0o700)
        .whiteout("opt/.wh..wh..opq")
        .file("opt/upper", b"upper", 0o644)
        .hardlink("usr/bin/tool3", "usr/bin/tool")
        .file(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
            0o644,
        )
        .symlink("usr/lib/libx.so", "libx.so.1")
        .file("usr/lib/libx.so.1", b"libx1", 0o644)
        .dir("replace-me-dir", 0o711)
        .file("replace-me-dir/new", b"new", 0o644)
        .file("replace-me-file", b"now a file", 0o600);
    let top = Layer::new()
        // Through the `lib -> /usr/lib` symlink of the base layer.
        .file("lib/libz.so", b"libz", 0o644)
        .dir_owned("home/user", 0o700, 1000, 1000)
        .whiteout("usr/bin/.wh.tool2")
        .fifo("tmp/fifo", 0o644);
    vec![
        LayerBlob::gzip(base),
        LayerBlob::plain(middle),
        LayerBlob::gzip(top),
    ]
}

#[test]
fn staging_tree_equals_umoci_unpack() {
    let sb = Sandbox::new();
    let layout = sb.scratch.join("layout");
    let layers = test_image();
    write_oci_layout(&layout, "test", &layers);

    let bundle = sb.scratch.join("bundle");
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:test", layout.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut applier = LayerApplier::new(&sb.root, ApplyOptions::default()).unwrap();
    for layer in &layers {
        let compression = Compression::from_media_type(layer.media_type).unwrap();
        applier
            .apply(std::io::Cursor::new(layer.blob.clone()), compression)
            .unwrap();
    }

    let ours = snapshot(&sb.root, &[]);
    let theirs = snapshot(&bundle.join("rootfs"), &[]);
    let our_paths: Vec<_> = ours.keys().collect();
    let their_paths: Vec<_> = theirs.keys().collect();
    assert_eq!(our_paths, their_paths, "different file sets");
    for (path, node) in &ours {
        assert_eq!(Some(node), theirs.get(path), "{path} differs from umoci's");
    }
    // The rules really ran (a tree equal to umoci's could still be wrong in both).
    assert!(ours.contains_key("usr/lib/libz.so"));
    assert!(!ours.contains_key("etc/old.conf") && !ours.contains_key("var/cache"));
    assert!(!ours.contains_key("opt/lower") && ours.contains_key("opt/upper"));
    assert_eq!(ours["usr/bin/tool3"].nlink, 2);
    assert_eq!(
        ours["usr/bin/ping"].xattrs.get("security.capability"),
        Some(&capability())
    );
    assert_eq!(ours["usr/bin/su"].mode, 0o4755);
    assert_eq!(ours["home/user"].mode, 0o700);
}
