//! Reading images from OCI layout directories: ours (written in the test) and umoci's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{snapshot, write_oci_layout, Layer, LayerBlob, Sandbox};
use nanobox_oci::{ApplyOptions, LayerApplier, OciError, OciLayout, Platform};

fn layers() -> Vec<LayerBlob> {
    vec![
        LayerBlob::gzip(
            Layer::new()
                .dir("etc", 0o755)
                .file("etc/a", b"a", 0o644)
                .file("etc/b", b"b", 0o644),
        ),
        LayerBlob::zstd(Layer::new().whiteout("etc/.wh.a").symlink("etc/c", "b")),
        LayerBlob::plain(Layer::new().file_owned("etc/d", b"d", 0o600, 5, 5)),
    ]
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn layout_resolves_tag_manifest_and_config_and_applies_every_layer() {
    let sb = Sandbox::new();
    let dir = sb.scratch.join("layout");
    let digest = write_oci_layout(&dir, "v1", &layers());
    let layout = OciLayout::open(&dir).unwrap();
    let image = layout
        .resolve(Some("v1"), &Platform::linux_amd64())
        .unwrap();
    assert_eq!(image.descriptor.digest, digest);
    assert_eq!(image.manifest.layers.len(), 3);
    assert_eq!(image.config.entrypoint, ["/usr/bin/tool"]);
    assert_eq!(image.config.cmd, ["--serve"]);
    assert_eq!(image.config.working_dir, "/home/user");
    assert_eq!(image.config.user, "1000:1000");
    assert_eq!(image.config.env, ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"]);
    // Without a tag, the only image.
    assert_eq!(
        layout.resolve(None, &Platform::linux_amd64()).unwrap(),
        image
    );

    let mut applier = LayerApplier::new(&sb.root, ApplyOptions::default()).unwrap();
    let stats = layout.apply(&image, &mut applier).unwrap();
    assert_eq!(stats.len(), 3);
    let tree = snapshot(&sb.root, &[]);
    let names: Vec<_> = tree.keys().map(String::as_str).collect();
    assert_eq!(names, ["etc", "etc/b", "etc/c", "etc/d"]);
    assert_eq!(tree["etc/d"].uid, 5);
}

#[test]
fn unknown_tag_is_an_error() {
    let sb = Sandbox::new();
    let dir = sb.scratch.join("layout");
    write_oci_layout(&dir, "v1", &layers());
    let err = OciLayout::open(&dir)
        .unwrap()
        .resolve(Some("v2"), &Platform::linux_amd64())
        .unwrap_err();
    assert!(err.to_string().contains("v2"), "{err}");
}

#[test]
fn corrupt_layer_blob_is_a_digest_mismatch() {
    let sb = Sandbox::new();
    let dir = sb.scratch.join("layout");
    let layers = layers();
    write_oci_layout(&dir, "v1", &layers);
    let layout = OciLayout::open(&dir).unwrap();
    let image = layout
        .resolve(Some("v1"), &Platform::linux_amd64())
        .unwrap();
    // Flip one byte of the uncompressed third layer: still a valid tar, wrong digest.
    let third = &image.manifest.layers[2];
    let path = layout.blob_path(&third.digest).unwrap();
    let mut data = fs::read(&path).unwrap();
    data[600] ^= 0x20;
    fs::write(&path, data).unwrap();

    let mut applier = LayerApplier::new(&sb.root, ApplyOptions::default()).unwrap();
    let err = layout.apply(&image, &mut applier).unwrap_err();
    match &err {
        OciError::DigestMismatch { digest, .. } => assert_eq!(digest, &third.digest),
        other => panic!("{other:?}"),
    }
}

#[test]
fn corrupt_manifest_is_refused_before_parsing() {
    let sb = Sandbox::new();
    let dir = sb.scratch.join("layout");
    let digest = write_oci_layout(&dir, "v1", &layers());
    let layout = OciLayout::open(&dir).unwrap();
    let path = layout.blob_path(&digest).unwrap();
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("schemaVersion", "schemaVersiom");
    fs::write(&path, text).unwrap();
    let err = layout
        .resolve(Some("v1"), &Platform::linux_amd64())
        .unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err:?}");
}

#[test]
fn hostile_digest_in_the_index_is_refused() {
    let sb = Sandbox::new();
    let dir = sb.scratch.join("layout");
    write_oci_layout(&dir, "v1", &layers());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": "sha256:../../../outside/secret",
            "size": 11,
        }],
    });
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    let err = OciLayout::open(&dir)
        .unwrap()
        .resolve(None, &Platform::linux_amd64())
        .unwrap_err();
    assert!(matches!(err, OciError::InvalidLayout(_)), "{err:?}");
}

#[test]
fn multi_platform_index_picks_the_platform() {
    let sb = Sandbox::new();
    let dir = sb.scratch.join("layout");
    let amd64 = write_oci_layout(&dir, "amd", &layers());
    let arm64 = write_oci_layout(
        &sb.scratch.join("other"),
        "arm",
        &[LayerBlob::plain(Layer::new())],
    );
    // Move the arm64 blobs over, then make a nested index of both.
    for entry in fs::read_dir(sb.scratch.join("other/blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        fs::copy(
            entry.path(),
            dir.join("blobs/sha256").join(entry.file_name()),
        )
        .unwrap();
    }
    let size = |d: &str| {
        fs::metadata(
            dir.join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .unwrap()
        .len()
    };
    let nested = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm64,
             "size": size(&arm64), "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd64,
             "size": size(&amd64), "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    });
    let nested = serde_json::to_vec(&nested).unwrap();
    let nested_digest = format!("sha256:{}", common::sha256_hex(&nested));
    fs::write(
        dir.join("blobs/sha256").join(common::sha256_hex(&nested)),
        &nested,
    )
    .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": nested_digest, "size": nested.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }],
    });
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    let layout = OciLayout::open(&dir).unwrap();
    let image = layout
        .resolve(Some("multi"), &Platform::linux_amd64())
        .unwrap();
    assert_eq!(image.descriptor.digest, amd64);
    let arm = Platform {
        os: "linux".into(),
        architecture: "arm64".into(),
    };
    assert_eq!(
        layout
            .resolve(Some("multi"), &arm)
            .unwrap()
            .descriptor
            .digest,
        arm64
    );
    let s390 = Platform {
        os: "linux".into(),
        architecture: "s390x".into(),
    };
    assert!(layout.resolve(Some("multi"), &s390).is_err());
}

/// An image built by umoci itself (its own layer writer), read by us, equals its unpack.
#[test]
fn umoci_built_image_applies_like_umoci_unpacks_it() {
    let sb = Sandbox::new();
    let layout = sb.scratch.join("umoci-layout");
    let image = format!("{}:t", layout.display());
    let src = sb.scratch.join("src");
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::write(src.join("bin/tool"), b"tool").unwrap();
    fs::set_permissions(src.join("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(src.join("bin/tool"), src.join("bin/tool-link")).unwrap();
    std::os::unix::fs::symlink("/bin/tool", src.join("bin/abs-link")).unwrap();
    nix::unistd::mkfifo(
        &src.join("bin/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    rustix::fs::setxattr(
        src.join("bin/tool"),
        "user.origin",
        b"umoci",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    nix::unistd::chown(&src.join("bin"), Some(1000.into()), Some(1000.into())).unwrap();
    fs::create_dir_all(src.join("old")).unwrap();
    fs::write(src.join("old/file"), b"gone soon").unwrap();

    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["insert", "--image", &image])
        .arg(&src)
        .arg("/app"));
    run(Command::new("umoci").args(["insert", "--image", &image, "--whiteout", "/app/old"]));
    let opaque = sb.scratch.join("opaque");
    fs::create_dir_all(&opaque).unwrap();
    fs::write(opaque.join("only"), b"only").unwrap();
    run(Command::new("umoci")
        .args(["insert", "--image", &image, "--opaque"])
        .arg(&opaque)
        .arg("/app/bin"));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env=A=1",
        "--config.cmd=/app/bin/only",
        "--config.workingdir=/app",
    ]));
    let bundle = sb.scratch.join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));

    let oci = OciLayout::open(&layout).unwrap();
    let resolved = oci.resolve(Some("t"), &Platform::linux_amd64()).unwrap();
    assert_eq!(resolved.config.cmd, ["/app/bin/only"]);
    assert_eq!(resolved.config.working_dir, "/app");
    assert!(resolved.config.env.contains(&"A=1".to_owned()));
    let mut applier = LayerApplier::new(&sb.root, ApplyOptions::default()).unwrap();
    oci.apply(&resolved, &mut applier).unwrap();

    compare(&sb.root, &bundle.join("rootfs"));
    assert!(!sb.at("app/old").exists());
    assert_eq!(
        fs::read_dir(sb.at("app/bin")).unwrap().count(),
        1,
        "the opaque insert hides the lower bin/"
    );
}

fn compare(ours: &Path, theirs: &Path) {
    let ours = snapshot(ours, &[]);
    let theirs = snapshot(theirs, &[]);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (path, node) in &ours {
        assert_eq!(Some(node), theirs.get(path), "{path}");
    }
}
