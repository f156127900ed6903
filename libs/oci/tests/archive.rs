#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Importing `docker save` archives: written by skopeo from OCI layouts (and reshaped
//! here into the other writers' variants and into hostile ones), imported into a cache
//! layout and applied, compared with applying the layout they came from.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{snapshot, test_image, write_oci_layout, Layer, LayerBlob, Sandbox};
use nanobox_oci::{
    import_docker_archive, import_docker_archive_with, ApplyOptions, ArchiveOptions, LayerApplier,
    OciError, OciLayout, Platform, ResolvedImage,
};

/// Three small layers, one of them zstd (which skopeo cannot put in a docker archive).
fn small_image() -> Vec<LayerBlob> {
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

/// [`small_image`] without zstd, for skopeo.
fn archivable_image() -> Vec<LayerBlob> {
    let mut layers = small_image();
    layers[1] = LayerBlob::plain(Layer::new().whiteout("etc/.wh.a").symlink("etc/c", "b"));
    layers
}

/// `skopeo copy oci:<layout>:<tag> docker-archive:<out>:<name>`.
fn skopeo_archive(layout: &Path, tag: &str, out: &Path, name: &str) {
    let result = Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker-archive:{}:{name}", out.display()))
        .output()
        .expect("running skopeo");
    assert!(
        result.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&result.stderr)
    );
}

/// One tar entry, for reshaping archives.
#[derive(Clone)]
struct Entry {
    header: tar::Header,
    path: String,
    link: Option<String>,
    data: Vec<u8>,
}

impl Entry {
    fn file(path: &str, data: &[u8]) -> Self {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o444);
        Self {
            header,
            path: path.to_owned(),
            link: None,
            data: data.to_vec(),
        }
    }

    fn link(kind: tar::EntryType, path: &str, target: &str) -> Self {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(0o777);
        header.set_size(0);
        Self {
            header,
            path: path.to_owned(),
            link: Some(target.to_owned()),
            data: Vec::new(),
        }
    }
}

fn read_archive(path: &Path) -> Vec<Entry> {
    let mut archive = tar::Archive::new(fs::File::open(path).unwrap());
    archive
        .entries()
        .unwrap()
        .map(|entry| {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_str().unwrap().to_owned();
            let link = entry
                .link_name()
                .unwrap()
                .map(|l| l.to_str().unwrap().to_owned());
            let header = entry.header().clone();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            Entry {
                header,
                path,
                link,
                data,
            }
        })
        .collect()
}

fn write_archive(path: &Path, entries: &[Entry]) {
    let mut builder = tar::Builder::new(fs::File::create(path).unwrap());
    for entry in entries {
        let mut header = entry.header.clone();
        match &entry.link {
            Some(target) => builder
                .append_link(&mut header, &entry.path, target)
                .unwrap(),
            None => {
                header.set_size(entry.data.len() as u64);
                builder
                    .append_data(&mut header, &entry.path, &entry.data[..])
                    .unwrap();
            }
        }
    }
    builder.finish().unwrap();
}

fn manifest_json(entries: &[Entry]) -> serde_json::Value {
    let entry = entries.iter().find(|e| e.path == "manifest.json").unwrap();
    serde_json::from_slice(&entry.data).unwrap()
}

fn set_manifest_json(entries: &mut [Entry], manifest: &serde_json::Value) {
    let entry = entries
        .iter_mut()
        .find(|e| e.path == "manifest.json")
        .unwrap();
    entry.data = serde_json::to_vec(manifest).unwrap();
}

/// Writes a variant of `source` made by `reshape`, returns its path.
fn reshaped(source: &Path, name: &str, reshape: impl FnOnce(&mut Vec<Entry>)) -> PathBuf {
    let mut entries = read_archive(source);
    reshape(&mut entries);
    let out = source.with_file_name(name);
    write_archive(&out, &entries);
    out
}

/// An OCI layout at `<scratch>/<name>` and a skopeo archive of it.
fn layout_and_archive(
    sb: &Sandbox,
    name: &str,
    layers: &[LayerBlob],
    repo_tag: &str,
) -> (PathBuf, PathBuf) {
    let dir = sb.scratch.join(name);
    write_oci_layout(&dir, "v1", layers);
    let archive = sb.scratch.join(format!("{name}.tar"));
    skopeo_archive(&dir, "v1", &archive, repo_tag);
    (dir, archive)
}

fn apply(layout: &OciLayout, image: &ResolvedImage, root: &Path) {
    fs::create_dir_all(root).unwrap();
    let mut applier = LayerApplier::new(root, ApplyOptions::default()).unwrap();
    layout.apply(image, &mut applier).unwrap();
}

fn assert_same_tree(ours: &Path, theirs: &Path) {
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

fn blob_names(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(cache.join("blobs/sha256"))
        .map(|dir| {
            dir.map(|e| e.unwrap().file_name().to_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn assert_no_leftovers(cache: &Path) {
    let tmp: Vec<_> = fs::read_dir(cache.join("tmp"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
}

#[test]
fn a_skopeo_archive_applies_like_the_layout_it_came_from() {
    let sb = Sandbox::new();
    let (dir, archive) = layout_and_archive(&sb, "app", &test_image(), "demo/app:v1");
    let cache = sb.scratch.join("cache");

    let (layout, image) = import_docker_archive(&archive, &cache, None).unwrap();
    let source = OciLayout::open(&dir).unwrap();
    let expected = source
        .resolve(Some("v1"), &Platform::linux_amd64())
        .unwrap();
    assert_eq!(image.config, expected.config);
    assert_eq!(image.config.entrypoint, ["/usr/bin/tool"]);
    assert_eq!(
        image.manifest.config.digest, expected.manifest.config.digest,
        "the config is kept byte for byte"
    );
    // skopeo stores layers uncompressed; the manifest says so.
    assert_eq!(image.manifest.layers.len(), 3);
    for layer in &image.manifest.layers {
        assert_eq!(layer.media_type, "application/vnd.oci.image.layer.v1.tar");
    }
    // The image is listed in the cache's index, so it resolves like a pulled one.
    let listed = OciLayout::open(&cache)
        .unwrap()
        .resolve(
            Some("docker-archive:docker.io/demo/app:v1"),
            &Platform::linux_amd64(),
        )
        .unwrap();
    assert_eq!(listed, image);

    apply(&layout, &image, &sb.root);
    let from_layout = sb.scratch.join("from-layout");
    apply(&source, &expected, &from_layout);
    assert_same_tree(&sb.root, &from_layout);
    sb.assert_outside_untouched();
    assert_no_leftovers(&cache);

    // Importing again reuses the cached blobs (not rewritten) and the index entry.
    let inodes = |image: &ResolvedImage| -> Vec<u64> {
        image
            .manifest
            .layers
            .iter()
            .map(|l| {
                fs::metadata(layout.blob_path(&l.digest).unwrap())
                    .unwrap()
                    .ino()
            })
            .collect()
    };
    let before = inodes(&image);
    let (_, again) = import_docker_archive(&archive, &cache, Some("demo/app:v1")).unwrap();
    assert_eq!(again, image);
    assert_eq!(inodes(&again), before, "cached layers were written again");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(cache.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);

    // A damaged cached layer is replaced by the archive's copy.
    let damaged = layout.blob_path(&image.manifest.layers[0].digest).unwrap();
    fs::write(&damaged, b"not the layer").unwrap();
    let (_, healed) = import_docker_archive(&archive, &cache, None).unwrap();
    assert_eq!(healed, image);
    assert_eq!(
        format!(
            "sha256:{}",
            common::sha256_hex(&fs::read(&damaged).unwrap())
        ),
        image.manifest.layers[0].digest
    );
}

/// Docker 25 and later write an OCI layout plus manifest.json naming `blobs/sha256/<hex>`;
/// with the containerd image store the layers stay compressed.
#[test]
fn a_docker_25_archive_with_compressed_layers_keeps_them_as_stored() {
    let sb = Sandbox::new();
    let dir = sb.scratch.join("layout");
    write_oci_layout(&dir, "v1", &small_image());
    let source = OciLayout::open(&dir).unwrap();
    let expected = source
        .resolve(Some("v1"), &Platform::linux_amd64())
        .unwrap();
    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let manifest = serde_json::json!([{
        "Config": blob(&expected.manifest.config.digest),
        "RepoTags": ["app:v1"],
        "Layers": expected.manifest.layers.iter().map(|l| blob(&l.digest)).collect::<Vec<_>>(),
    }]);
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let archive = sb.scratch.join("docker25.tar");
    let mut builder = tar::Builder::new(fs::File::create(&archive).unwrap());
    builder.append_dir_all(".", &dir).unwrap();
    builder.finish().unwrap();
    drop(builder);

    let cache = sb.scratch.join("cache");
    let (layout, image) =
        import_docker_archive(&archive, &cache, Some("docker.io/library/app:v1")).unwrap();
    let media: Vec<_> = image
        .manifest
        .layers
        .iter()
        .map(|l| l.media_type.as_str())
        .collect();
    assert_eq!(
        media,
        [
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.v1.tar",
        ]
    );
    let digests = |i: &ResolvedImage| -> Vec<String> {
        i.manifest.layers.iter().map(|l| l.digest.clone()).collect()
    };
    assert_eq!(digests(&image), digests(&expected));

    apply(&layout, &image, &sb.root);
    let from_layout = sb.scratch.join("from-layout");
    apply(&source, &expected, &from_layout);
    assert_same_tree(&sb.root, &from_layout);
    assert_no_leftovers(&cache);
}

/// `docker save` writes `<id>/layer.tar`, a symlink (or here a hardlink) to the layer
/// file when images share it; manifest.json then names the link.
#[test]
fn layers_named_through_in_archive_links_resolve() {
    let sb = Sandbox::new();
    let (_, archive) = layout_and_archive(&sb, "app", &archivable_image(), "demo/app:v1");
    let entries = read_archive(&archive);
    // skopeo writes `<id>/layer.tar -> ../<hex>.tar`.
    let link_for = |file: &str| -> String {
        entries
            .iter()
            .find(|e| e.link.as_deref() == Some(&format!("../{file}")))
            .map(|e| e.path.clone())
            .expect("a link to the layer")
    };
    let manifest = manifest_json(&entries);
    let links: Vec<String> = manifest[0]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| link_for(l.as_str().unwrap()))
        .collect();
    let via_symlinks = reshaped(&archive, "symlinks.tar", |entries| {
        let mut manifest = manifest_json(entries);
        manifest[0]["Layers"] = serde_json::json!(links);
        set_manifest_json(entries, &manifest);
    });
    let via_hardlinks = reshaped(&via_symlinks, "hardlinks.tar", |entries| {
        for entry in entries.iter_mut() {
            if let Some(target) = entry.link.clone() {
                *entry = Entry::link(
                    tar::EntryType::Link,
                    &entry.path,
                    target.trim_start_matches("../"),
                );
            }
        }
    });

    // Docker before 25 without shared layers: the content is at `<id>/layer.tar` itself,
    // under a name that carries no digest.
    let in_layer_dirs = reshaped(&via_symlinks, "layer-dirs.tar", |entries| {
        let files: Vec<Entry> = entries
            .iter()
            .filter(|e| e.link.is_none())
            .cloned()
            .collect();
        for entry in entries.iter_mut() {
            if let Some(target) = entry.link.clone() {
                let file = target.trim_start_matches("../");
                let data = &files.iter().find(|f| f.path == file).unwrap().data;
                *entry = Entry::file(&entry.path, data);
            }
        }
        // The top-level `<hex>.tar` files are gone: the layer directories hold the data.
        entries.retain(|e| e.path.contains('/') || !e.path.ends_with(".tar"));
    });

    let (_, direct) = import_docker_archive(&archive, &sb.scratch.join("cache"), None).unwrap();
    for variant in [via_symlinks, via_hardlinks, in_layer_dirs] {
        // Into the cache that has the layers already, and into an empty one.
        let fresh = sb.scratch.join("fresh").join(variant.file_name().unwrap());
        for cache in [sb.scratch.join("cache"), fresh] {
            let (_, image) = import_docker_archive(&variant, &cache, None).unwrap();
            assert_eq!(image.manifest, direct.manifest, "{}", variant.display());
        }
    }
}

#[test]
fn a_multi_image_archive_needs_a_tag_and_picks_by_it() {
    let sb = Sandbox::new();
    let (_, one) = layout_and_archive(&sb, "one", &archivable_image(), "demo/one:v1");
    let two_layers = vec![LayerBlob::plain(
        Layer::new().file("only-two", b"two", 0o644),
    )];
    let (_, two) = layout_and_archive(&sb, "two", &two_layers, "demo/two:v2");
    // Both images in one archive, as `docker save one two` writes it.
    let both = reshaped(&one, "both.tar", |entries| {
        let second = read_archive(&two);
        let mut manifest = manifest_json(entries);
        let mut images = manifest.as_array().unwrap().clone();
        images.extend(manifest_json(&second).as_array().unwrap().iter().cloned());
        manifest = serde_json::Value::Array(images);
        for entry in second {
            if !entries.iter().any(|e| e.path == entry.path) {
                entries.push(entry);
            }
        }
        set_manifest_json(entries, &manifest);
    });
    let cache = sb.scratch.join("cache");

    let err = import_docker_archive(&both, &cache, None).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, OciError::Archive { .. }), "{err:?}");
    assert!(
        message.contains("docker.io/demo/one:v1") && message.contains("docker.io/demo/two:v2"),
        "{message}"
    );
    let err = import_docker_archive(&both, &cache, Some("demo/three:v1")).unwrap_err();
    assert!(
        err.to_string().contains("demo/three:v1") && err.to_string().contains("demo/two:v2"),
        "{err}"
    );
    assert!(
        blob_names(&cache).is_empty(),
        "a refused import wrote blobs"
    );

    // The short form (as docker writes tags) matches skopeo's long one.
    let (layout, image) = import_docker_archive(&both, &cache, Some("demo/two:v2")).unwrap();
    assert_eq!(image.manifest.layers.len(), 1);
    apply(&layout, &image, &sb.root);
    assert_eq!(fs::read(sb.at("only-two")).unwrap(), b"two");
    let (_, first) = import_docker_archive(&both, &cache, Some("docker.io/demo/one:v1")).unwrap();
    assert_eq!(first.manifest.layers.len(), 3);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(cache.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
}

#[test]
fn a_tampered_layer_fails_its_diff_id() {
    let sb = Sandbox::new();
    let (_, archive) = layout_and_archive(&sb, "app", &test_image(), "demo/app:v1");
    let first = manifest_json(&read_archive(&archive))[0]["Layers"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let tampered = reshaped(&archive, "tampered.tar", |entries| {
        let layer = entries.iter_mut().find(|e| e.path == first).unwrap();
        // Inside the content of etc/passwd (after the headers of etc/ and etc/passwd):
        // still a valid tar, different content.
        assert_eq!(layer.data[1024], b'r');
        layer.data[1024] = b'R';
    });
    let check = |err: OciError| {
        match &err {
            OciError::ArchiveMismatch {
                entry, expected_by, ..
            } => {
                assert_eq!(entry, &first);
                assert!(expected_by.contains("rootfs.diff_ids[0]"), "{expected_by}");
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains(&first), "{err}");
    };
    let cache = sb.scratch.join("cache");
    check(import_docker_archive(&tampered, &cache, None).unwrap_err());
    assert!(
        blob_names(&cache).is_empty(),
        "the bad layer reached the cache"
    );
    assert_no_leftovers(&cache);

    // With the genuine layer cached already, the archive's copy is still checked.
    let warm = sb.scratch.join("warm");
    import_docker_archive(&archive, &warm, None).unwrap();
    let blobs = blob_names(&warm);
    check(import_docker_archive(&tampered, &warm, None).unwrap_err());
    assert_eq!(blob_names(&warm), blobs);
    assert_no_leftovers(&warm);
}

#[test]
fn a_config_that_does_not_hash_to_its_name_is_refused() {
    let sb = Sandbox::new();
    let (_, archive) = layout_and_archive(&sb, "app", &archivable_image(), "demo/app:v1");
    let config = manifest_json(&read_archive(&archive))[0]["Config"]
        .as_str()
        .unwrap()
        .to_owned();
    let tampered = reshaped(&archive, "tampered.tar", |entries| {
        let entry = entries.iter_mut().find(|e| e.path == config).unwrap();
        let text = String::from_utf8(entry.data.clone()).unwrap();
        entry.data = text.replace("LANG=C.UTF-8", "LANG=C.UTF-9").into_bytes();
    });
    let err = import_docker_archive(&tampered, &sb.scratch.join("cache"), None).unwrap_err();
    match &err {
        OciError::ArchiveMismatch {
            entry, expected_by, ..
        } => {
            assert_eq!(entry, &config);
            assert!(expected_by.contains("file name"), "{expected_by}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn hostile_manifest_paths_are_refused_and_nothing_is_written() {
    let sb = Sandbox::new();
    let (_, archive) = layout_and_archive(&sb, "app", &archivable_image(), "demo/app:v1");
    let cache = sb.scratch.join("cache");
    let secret = sb.outside.join("secret");
    let up = "../../outside/secret".to_owned();
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("layer-dotdot", "Layers", "../x".to_owned(), ".."),
        (
            "layer-absolute",
            "Layers",
            secret.display().to_string(),
            "absolute",
        ),
        ("config-dotdot", "Config", up.clone(), ".."),
        (
            "layer-escaping-symlink",
            "Layers",
            "evil.tar".to_owned(),
            "outside the archive",
        ),
        (
            "layer-escaping-hardlink",
            "Layers",
            "evil-hard.tar".to_owned(),
            "outside the archive",
        ),
        ("layer-directory", "Layers", "adir".to_owned(), "directory"),
        ("layer-loop", "Layers", "loop-a".to_owned(), "links"),
    ];
    for (name, field, path, want) in cases {
        let variant = reshaped(&archive, &format!("{name}.tar"), |entries| {
            entries.push(Entry::link(tar::EntryType::Symlink, "evil.tar", &up));
            entries.push(Entry::link(
                tar::EntryType::Link,
                "evil-hard.tar",
                "../outside/secret",
            ));
            entries.push(Entry::link(tar::EntryType::Symlink, "loop-a", "loop-b"));
            entries.push(Entry::link(tar::EntryType::Symlink, "loop-b", "loop-a"));
            let mut dir = Entry::file("adir/", b"");
            dir.header.set_entry_type(tar::EntryType::Directory);
            entries.push(dir);
            let mut manifest = manifest_json(entries);
            if field == "Layers" {
                manifest[0]["Layers"][0] = serde_json::json!(path);
            } else {
                manifest[0]["Config"] = serde_json::json!(path);
            }
            set_manifest_json(entries, &manifest);
        });
        let err = import_docker_archive(&variant, &cache, None).unwrap_err();
        match &err {
            OciError::ArchiveEntry { entry, reason, .. } => {
                assert_eq!(entry, &path, "{name}");
                assert!(reason.contains(want), "{name}: {reason}");
            }
            other => panic!("{name}: {other:?}"),
        }
        assert!(err.to_string().contains(&path), "{name}: {err}");
    }
    assert!(blob_names(&cache).is_empty());
    sb.assert_outside_untouched();
}

#[test]
fn missing_entries_are_refused() {
    let sb = Sandbox::new();
    let (_, archive) = layout_and_archive(&sb, "app", &archivable_image(), "demo/app:v1");
    let cache = sb.scratch.join("cache");
    let manifest = manifest_json(&read_archive(&archive));
    let second = manifest[0]["Layers"][1].as_str().unwrap().to_owned();
    let expect_entry = |archive: &Path, entry: &str, want: &str| match import_docker_archive(
        archive, &cache, None,
    )
    .unwrap_err()
    {
        OciError::ArchiveEntry {
            entry: named,
            reason,
            ..
        } => {
            assert_eq!(named, entry);
            assert!(reason.contains(want), "{reason}");
        }
        other => panic!("{other:?}"),
    };

    let named_but_absent = reshaped(&archive, "absent.tar", |entries| {
        let mut manifest = manifest_json(entries);
        manifest[0]["Layers"][1] = serde_json::json!("nope.tar");
        set_manifest_json(entries, &manifest);
    });
    expect_entry(&named_but_absent, "nope.tar", "does not exist");

    let removed = reshaped(&archive, "removed.tar", |entries| {
        entries.retain(|e| e.path != second);
    });
    expect_entry(&removed, &second, "does not exist");

    // A link whose target is gone.
    let link = read_archive(&archive)
        .into_iter()
        .find(|e| e.link.as_deref() == Some(&format!("../{second}")))
        .unwrap()
        .path;
    let dangling = reshaped(&archive, "dangling.tar", |entries| {
        entries.retain(|e| e.path != second);
        let mut manifest = manifest_json(entries);
        manifest[0]["Layers"][1] = serde_json::json!(link);
        set_manifest_json(entries, &manifest);
    });
    expect_entry(&dangling, &link, "which does not exist");

    let no_manifest = reshaped(&archive, "no-manifest.tar", |entries| {
        entries.retain(|e| e.path != "manifest.json");
    });
    let err = import_docker_archive(&no_manifest, &cache, None).unwrap_err();
    assert!(
        matches!(&err, OciError::Archive { reason, .. } if reason.contains("manifest.json")),
        "{err:?}"
    );

    let short = reshaped(&archive, "short.tar", |entries| {
        let mut manifest = manifest_json(entries);
        manifest[0]["Layers"].as_array_mut().unwrap().pop();
        set_manifest_json(entries, &manifest);
    });
    let err = import_docker_archive(&short, &cache, None).unwrap_err();
    assert!(
        matches!(&err, OciError::Archive { reason, .. } if reason.contains("2 layers") && reason.contains("3 rootfs.diff_ids")),
        "{err:?}"
    );

    let err = import_docker_archive(&sb.scratch.join("no-such.tar"), &cache, None).unwrap_err();
    assert!(matches!(err, OciError::Io { .. }), "{err:?}");
    assert!(blob_names(&cache).is_empty());
}

#[test]
fn limits_bound_layers_and_entries() {
    let sb = Sandbox::new();
    let (_, archive) = layout_and_archive(&sb, "app", &test_image(), "demo/app:v1");
    let cache = sb.scratch.join("cache");
    let first = manifest_json(&read_archive(&archive))[0]["Layers"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let small_layers = ArchiveOptions {
        max_layer_size: 50_000,
        ..ArchiveOptions::default()
    };
    match import_docker_archive_with(&archive, &cache, None, &small_layers).unwrap_err() {
        OciError::ArchiveEntry { entry, reason, .. } => {
            assert_eq!(entry, first);
            assert!(reason.contains("layer limit"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let few_entries = ArchiveOptions {
        max_entries: 3,
        ..ArchiveOptions::default()
    };
    let err = import_docker_archive_with(&archive, &cache, None, &few_entries).unwrap_err();
    assert!(
        matches!(&err, OciError::Archive { reason, .. } if reason.contains("more than 3 entries")),
        "{err:?}"
    );
    let little_metadata = ArchiveOptions {
        max_metadata: 2048,
        ..ArchiveOptions::default()
    };
    let err = import_docker_archive_with(&archive, &cache, None, &little_metadata).unwrap_err();
    assert!(
        matches!(&err, OciError::Archive { reason, .. } if reason.contains("metadata limit")),
        "{err:?}"
    );
    let huge_manifest = reshaped(&archive, "huge.tar", |entries| {
        entries.push(Entry::file("manifest.json", &vec![b' '; 5 << 20]));
        entries.retain(|e| e.path != "manifest.json" || e.data.len() > 1000);
    });
    let err = import_docker_archive(&huge_manifest, &cache, None).unwrap_err();
    assert!(
        matches!(&err, OciError::ArchiveEntry { entry, .. } if entry == "manifest.json"),
        "{err:?}"
    );
    assert!(blob_names(&cache).is_empty());
}

#[test]
fn compressed_or_broken_archives_say_what_is_wrong() {
    let sb = Sandbox::new();
    let (_, archive) = layout_and_archive(&sb, "app", &archivable_image(), "demo/app:v1");
    let cache = sb.scratch.join("cache");

    let gz = sb.scratch.join("app.tar.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, &fs::read(&archive).unwrap()).unwrap();
    fs::write(&gz, enc.finish().unwrap()).unwrap();
    let err = import_docker_archive(&gz, &cache, None).unwrap_err();
    assert!(err.to_string().contains("decompress it first"), "{err}");

    // Cut inside the last layer's data: the entry runs past the end of the file.
    let data = fs::read(&archive).unwrap();
    let entries = read_archive(&archive);
    let last = manifest_json(&entries)[0]["Layers"][2]
        .as_str()
        .unwrap()
        .to_owned();
    let mut offset = None;
    let mut reader = tar::Archive::new(&data[..]);
    for entry in reader.entries().unwrap() {
        let entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some(last.as_str()) {
            offset = Some(entry.raw_file_position() + entry.size() / 2);
        }
    }
    let truncated = sb.scratch.join("truncated.tar");
    fs::write(&truncated, &data[..offset.unwrap() as usize]).unwrap();
    let err = import_docker_archive(&truncated, &cache, None).unwrap_err();
    assert!(
        matches!(&err, OciError::ArchiveEntry { entry, reason, .. }
            if *entry == last && reason.contains("truncated")),
        "{err:?}"
    );

    let garbage = sb.scratch.join("garbage.tar");
    fs::write(&garbage, vec![0x55; 4096]).unwrap();
    let err = import_docker_archive(&garbage, &cache, None).unwrap_err();
    assert!(
        matches!(
            err,
            OciError::ArchiveCorrupt { .. } | OciError::Archive { .. }
        ),
        "{err:?}"
    );
}
