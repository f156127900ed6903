//! `convert`: a layout image to a finished ext4 in one call, checked with e2fsprogs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{debugfs, fsck, snapshot, test_image, write_oci_layout, Sandbox};
use nanobox_oci::{convert, ConvertEvent, ConvertOptions, OciLayout, Platform, Staged, Staging};

/// Names in `dir` that look like leftovers of a conversion.
fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

type Events = Arc<Mutex<Vec<ConvertEvent>>>;

fn recorder() -> (Events, Arc<dyn Fn(ConvertEvent) + Send + Sync>) {
    let events: Events = Arc::default();
    let sink = events.clone();
    (events, Arc::new(move |e| sink.lock().unwrap().push(e)))
}

#[tokio::test]
async fn converts_a_multi_layer_image_reporting_progress_in_order() {
    let sb = Sandbox::new();
    let dir = sb.scratch.join("layout");
    write_oci_layout(&dir, "v1", &test_image());
    let layout = OciLayout::open(&dir).unwrap();
    let image = layout
        .resolve(Some("v1"), &Platform::linux_amd64())
        .unwrap();
    let init = sb.scratch.join("nanobox-init");
    fs::write(&init, b"\x7fELF fake init").unwrap();
    let work = sb.scratch.join("out");
    fs::create_dir(&work).unwrap();
    let out = work.join("rootfs.ext4");
    // An older image at the path is replaced.
    fs::write(&out, b"old").unwrap();

    let (events, on_event) = recorder();
    let built = convert(
        layout,
        image.clone(),
        init,
        out.clone(),
        ConvertOptions::default(),
        on_event,
    )
    .await
    .unwrap();

    assert_eq!(
        *events.lock().unwrap(),
        [
            ConvertEvent::LayerApplied { done: 1, total: 3 },
            ConvertEvent::LayerApplied { done: 2, total: 3 },
            ConvertEvent::LayerApplied { done: 3, total: 3 },
            ConvertEvent::Building {
                staging: Staged::Memory
            },
        ]
    );
    assert_eq!(built.path, out);
    assert_eq!(fs::metadata(&out).unwrap().len(), built.size_bytes);
    assert!(leftovers(&work).is_empty(), "{:?}", leftovers(&work));
    fsck(&out);

    // The layers' rules, as the ext4 shows them.
    assert_eq!(debugfs(&out, "cat /sbin/nanobox-init"), "\x7fELF fake init");
    let config: nanobox_core::ImageConfig =
        serde_json::from_str(&debugfs(&out, "cat /etc/nanobox/image.json")).unwrap();
    assert_eq!(config, image.config);
    assert!(debugfs(&out, "cat /etc/passwd").contains("user:x:1000"));
    let etc = debugfs(&out, "ls /etc");
    assert!(!etc.contains("old.conf"), "{etc}");
    let opt = debugfs(&out, "ls /opt");
    assert!(opt.contains("upper") && !opt.contains("lower"), "{opt}");
    assert!(!debugfs(&out, "ls /usr/bin").contains("tool2"));
    let tool = debugfs(&out, "stat /usr/bin/tool");
    assert!(tool.contains("Links: 2"), "{tool}");
    assert_eq!(debugfs(&out, "cat /usr/lib/libz.so"), "libz");
    let home = debugfs(&out, "stat /home/user");
    assert!(
        home.contains("Mode:  0700") && home.contains("User:  1000"),
        "{home}"
    );
    let ping = debugfs(&out, "ea_list /usr/bin/ping");
    assert!(ping.contains("security.capability"), "{ping}");
}

#[tokio::test]
async fn a_failed_conversion_leaves_nothing_behind() {
    let sb = Sandbox::new();
    let dir = sb.scratch.join("layout");
    write_oci_layout(&dir, "v1", &test_image());
    let layout = OciLayout::open(&dir).unwrap();
    let image = layout
        .resolve(Some("v1"), &Platform::linux_amd64())
        .unwrap();
    // Corrupt the last layer: its digest no longer matches.
    let last = layout.blob_path(&image.manifest.layers[2].digest).unwrap();
    let mut data = fs::read(&last).unwrap();
    let n = data.len();
    data[n / 2] ^= 0xff;
    fs::write(&last, data).unwrap();
    let init = sb.scratch.join("nanobox-init");
    fs::write(&init, b"init").unwrap();
    let work = sb.scratch.join("out");
    fs::create_dir(&work).unwrap();
    let out = work.join("rootfs.ext4");

    let (events, on_event) = recorder();
    let err = convert(
        layout,
        image,
        init,
        out.clone(),
        ConvertOptions::default(),
        on_event,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            nanobox_oci::OciError::DigestMismatch { .. } | nanobox_oci::OciError::Corrupt { .. }
        ),
        "{err:?}"
    );
    assert!(!events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, ConvertEvent::Building { .. })));
    assert!(!out.exists());
    assert!(leftovers(&work).is_empty(), "{:?}", leftovers(&work));
}

/// Converts the test image with `staging`; returns the image path.
async fn convert_with(sb: &Sandbox, name: &str, staging: Staging) -> std::path::PathBuf {
    let dir = sb.scratch.join("layout");
    if !dir.exists() {
        write_oci_layout(&dir, "v1", &test_image());
    }
    let layout = OciLayout::open(&dir).unwrap();
    let image = layout
        .resolve(Some("v1"), &Platform::linux_amd64())
        .unwrap();
    let init = sb.scratch.join("nanobox-init");
    fs::write(&init, b"init").unwrap();
    let out = sb.scratch.join(name);
    let options = ConvertOptions {
        staging,
        ..ConvertOptions::default()
    };
    convert(layout, image, init, out.clone(), options, Arc::new(|_| {}))
        .await
        .unwrap();
    fsck(&out);
    out
}

/// The tree in an ext4 image, as `debugfs rdump` writes it out (contents, modes, owners,
/// links, times). Times that are the moment of conversion, not the layers' (the injected
/// files; symlinks, which rdump creates with the current time), are left out: two
/// conversions may straddle a second.
fn dump(image: &Path, into: &Path) -> std::collections::BTreeMap<String, common::Node> {
    fs::create_dir(into).unwrap();
    debugfs(image, &format!("rdump / {}", into.display()));
    let mut tree = snapshot(into, &[]);
    for (path, node) in &mut tree {
        let injected = path == "sbin/nanobox-init" || path == "etc/nanobox/image.json";
        if injected || node.kind == "symlink" {
            node.mtime = None;
        }
    }
    tree
}

#[tokio::test]
async fn staging_in_memory_or_on_disk_makes_the_same_image() {
    let sb = Sandbox::new();
    let memory = sb.scratch.join("memory");
    fs::create_dir(&memory).unwrap();
    let a = convert_with(&sb, "disk.ext4", Staging::BesideOutput).await;
    let b = convert_with(&sb, "memory.ext4", Staging::In(memory.clone())).await;
    let c = convert_with(&sb, "auto.ext4", Staging::Auto).await;
    // Each staging directory is gone.
    assert_eq!(fs::read_dir(&memory).unwrap().count(), 0);
    assert!(
        leftovers(&sb.scratch).is_empty(),
        "{:?}",
        leftovers(&sb.scratch)
    );
    let disk = dump(&a, &sb.scratch.join("a"));
    assert!(disk.contains_key("usr/bin/tool"), "{:?}", disk.keys());
    assert_eq!(disk, dump(&b, &sb.scratch.join("b")));
    assert_eq!(disk, dump(&c, &sb.scratch.join("c")));
}
