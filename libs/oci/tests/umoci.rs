//! The staging tree equals what `umoci unpack` makes of the same image: file types,
//! contents, modes, owners, link targets, hardlink counts, device numbers, xattrs and
//! the mtimes of everything but directories (which neither tool promises: creating an
//! entry bumps its parent's mtime, and the two restore them in different orders).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{capability, snapshot, test_image, umoci_unpack, write_oci_layout, Sandbox};
use nanobox_oci::{ApplyOptions, Compression, LayerApplier};

#[test]
fn staging_tree_equals_umoci_unpack() {
    let sb = Sandbox::new();
    let layout = sb.scratch.join("layout");
    let layers = test_image();
    write_oci_layout(&layout, "test", &layers);

    let bundle = sb.scratch.join("bundle");
    umoci_unpack(&layout, "test", &bundle);

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
