//! `rootfs.diff_ids`: a layer whose uncompressed tar is not what the image config says,
//! or a config that lists more or fewer diff_ids than the manifest lists layers, is
//! refused, through an OCI layout and through a real registry pull; the honest image
//! still converts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{sha256_hex, Layer, LayerBlob};
use nanobox_oci::{
    convert, ConvertOptions, Ext4Image, OciError, OciLayout, Platform, RegistryClient,
    RegistryOptions, ResolvedImage,
};
use nanobox_testkit::registry::Registry;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gzip,
    Plain,
    Zstd,
}

const KINDS: [Kind; 3] = [Kind::Gzip, Kind::Plain, Kind::Zstd];

fn blob(kind: Kind, layer: Layer) -> LayerBlob {
    match kind {
        Kind::Gzip => LayerBlob::gzip(layer),
        Kind::Plain => LayerBlob::plain(layer),
        Kind::Zstd => LayerBlob::zstd(layer),
    }
}

/// A two-layer image whose layers are compressed as `kind`.
fn layers(kind: Kind) -> Vec<LayerBlob> {
    vec![
        blob(
            kind,
            Layer::new()
                .dir("etc", 0o755)
                .file("etc/hostname", b"lower\n", 0o644),
        ),
        blob(
            kind,
            Layer::new().dir("usr", 0o755).file(
                "usr/greeting",
                b"hello from the upper layer\n",
                0o644,
            ),
        ),
    ]
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// The correct diff_ids of `layers`.
fn diff_ids(layers: &[LayerBlob]) -> Vec<String> {
    layers.iter().map(|l| digest(&l.diff)).collect()
}

/// An image's documents: the config (with the given diff_ids) and the manifest.
struct Documents {
    config: Vec<u8>,
    manifest: Vec<u8>,
}

fn documents(layers: &[LayerBlob], diff_ids: &[String]) -> Documents {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "mediaType": l.media_type,
                "digest": digest(&l.blob),
                "size": l.blob.len(),
            })
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": layer_descs,
    }))
    .unwrap();
    Documents { config, manifest }
}

/// Writes an OCI layout at `dir` holding the image tagged `v1`.
fn write_layout(dir: &Path, layers: &[LayerBlob], diff_ids: &[String]) -> OciLayout {
    let docs = documents(layers, diff_ids);
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| fs::write(blobs.join(sha256_hex(data)), data).unwrap();
    put(&docs.config);
    put(&docs.manifest);
    for layer in layers {
        put(&layer.blob);
    }
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": digest(&docs.manifest),
            "size": docs.manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "v1"},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    OciLayout::open(dir).unwrap()
}

/// Pushes the image to `registry` as `name:v1`, blob by blob.
fn push(registry: &Registry, name: &str, layers: &[LayerBlob], diff_ids: &[String]) {
    let docs = documents(layers, diff_ids);
    for layer in layers {
        registry.put_blob(name, &layer.blob);
    }
    registry.put_blob(name, &docs.config);
    registry.put_manifest(name, "v1", OCI_MANIFEST, &docs.manifest);
}

fn client(registry: &Registry, cache: &Path) -> RegistryClient {
    RegistryClient::new(
        cache,
        RegistryOptions {
            plain_http: vec![registry.host.clone()],
            retries: 1,
            retry_backoff: std::time::Duration::from_millis(10),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Converts into `<work>/out/rootfs.ext4`; on failure, checks that nothing is left in
/// the output directory (no image, no staging tree, no temporary file).
async fn convert_in(
    work: &Path,
    layout: OciLayout,
    image: ResolvedImage,
) -> Result<Ext4Image, OciError> {
    let init = work.join("nanobox-init");
    fs::write(&init, b"\x7fELF fake init").unwrap();
    let out_dir = work.join("out");
    fs::create_dir_all(&out_dir).unwrap();
    let out: PathBuf = out_dir.join("rootfs.ext4");
    let result = convert(
        layout,
        image,
        init,
        out,
        ConvertOptions::default(),
        Arc::new(|_| {}),
    )
    .await;
    if result.is_err() {
        let left: Vec<_> = fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "a failed conversion left {left:?}");
    }
    result
}

/// Checks that `err` refuses layer `index` of `layers` for the diff_id `wrong`.
fn assert_mismatch(err: &OciError, layers: &[LayerBlob], index: usize, wrong: &str) {
    let layer_digest = digest(&layers[index].blob);
    let actual = digest(&layers[index].diff);
    match err {
        OciError::DiffIdMismatch {
            index: i,
            digest: d,
            expected,
            actual: a,
        } => {
            assert_eq!(*i, index);
            assert_eq!(*d, layer_digest);
            assert_eq!(expected, wrong);
            assert_eq!(*a, actual);
        }
        other => panic!("expected a diff_id mismatch, got {other:?}"),
    }
    let message = err.to_string();
    for part in [
        format!("layer {index}"),
        layer_digest,
        wrong.to_owned(),
        actual,
    ] {
        assert!(message.contains(&part), "{message:?} lacks {part:?}");
    }
    assert!(err.is_bad_input());
}

/// diff_ids with the one of layer `index` replaced by the digest of something else.
fn with_wrong(layers: &[LayerBlob], index: usize) -> (Vec<String>, String) {
    let mut ids = diff_ids(layers);
    let wrong = digest(b"some other tar");
    ids[index] = wrong.clone();
    (ids, wrong)
}

#[tokio::test]
async fn a_layout_layer_with_a_wrong_diff_id_is_refused_naming_it() {
    for kind in KINDS {
        for index in [0, 1] {
            let work = tempfile::tempdir().unwrap();
            let layers = layers(kind);
            let (ids, wrong) = with_wrong(&layers, index);
            let layout = write_layout(&work.path().join("layout"), &layers, &ids);
            let image = layout
                .resolve(Some("v1"), &Platform::linux_amd64())
                .unwrap();
            let err = convert_in(work.path(), layout, image).await.unwrap_err();
            assert_mismatch(&err, &layers, index, &wrong);
        }
    }
}

#[tokio::test]
async fn a_pulled_layer_with_a_wrong_diff_id_is_refused_the_first_time_and_from_the_cache() {
    let registry = Registry::start();
    for kind in KINDS {
        let work = tempfile::tempdir().unwrap();
        let layers = layers(kind);
        let (ids, wrong) = with_wrong(&layers, 1);
        let name = format!("wrong-{kind:?}").to_lowercase();
        push(&registry, &name, &layers, &ids);
        let cache = work.path().join("cache");
        let reference = format!("{}/{name}:v1", registry.host);

        let pulled = client(&registry, &cache)
            .pull_str(&reference)
            .await
            .unwrap();
        assert_eq!(pulled.report.blobs_downloaded, 3);
        let err = convert_in(work.path(), pulled.layout, pulled.image)
            .await
            .unwrap_err();
        assert_mismatch(&err, &layers, 1, &wrong);

        // The blobs are cached now (their digests are right); the diff_id is checked
        // again on the stream that applies them.
        let again = client(&registry, &cache)
            .pull_str(&reference)
            .await
            .unwrap();
        assert_eq!(again.report.blobs_downloaded, 0);
        let err = convert_in(work.path(), again.layout, again.image)
            .await
            .unwrap_err();
        assert_mismatch(&err, &layers, 1, &wrong);
    }
}

#[tokio::test]
async fn a_config_with_one_diff_id_fewer_or_more_than_layers_is_refused() {
    let registry = Registry::start();
    for (n, kind) in KINDS.into_iter().enumerate() {
        let layers = layers(kind);
        let right = diff_ids(&layers);
        let fewer = right[..1].to_vec();
        let mut more = right.clone();
        more.push(digest(b"a layer the manifest does not list"));
        for (case, ids) in [("fewer", fewer), ("more", more)] {
            let count_error = |err: &OciError| {
                assert!(
                    matches!(err, OciError::DiffIdCount { layers: 2, diff_ids } if *diff_ids == ids.len()),
                    "{case}: {err:?}"
                );
                let message = err.to_string();
                assert!(message.contains("2 layers"), "{message}");
                assert!(err.is_bad_input());
            };

            // An OCI layout.
            let work = tempfile::tempdir().unwrap();
            let layout = write_layout(&work.path().join("layout"), &layers, &ids);
            count_error(
                &layout
                    .resolve(Some("v1"), &Platform::linux_amd64())
                    .unwrap_err(),
            );

            // A registry pull: refused, and the cache does not list the image.
            let name = format!("count-{case}-{n}");
            push(&registry, &name, &layers, &ids);
            let cache = work.path().join("cache");
            let reference = format!("{}/{name}:v1", registry.host);
            count_error(
                &client(&registry, &cache)
                    .pull_str(&reference)
                    .await
                    .unwrap_err(),
            );
            let index = fs::read_to_string(cache.join("index.json")).unwrap();
            assert!(!index.contains(&name), "{index}");
        }
    }
}

#[tokio::test]
async fn the_honest_image_still_converts_from_a_layout_and_a_registry() {
    let registry = Registry::start();
    for kind in KINDS {
        let layers = layers(kind);
        let ids = diff_ids(&layers);

        let work = tempfile::tempdir().unwrap();
        let layout = write_layout(&work.path().join("layout"), &layers, &ids);
        let image = layout
            .resolve(Some("v1"), &Platform::linux_amd64())
            .unwrap();
        assert_eq!(image.diff_ids, ids);
        let built = convert_in(work.path(), layout, image).await.unwrap();
        assert!(fs::metadata(&built.path).unwrap().len() > 0);

        let work = tempfile::tempdir().unwrap();
        let name = format!("honest-{kind:?}").to_lowercase();
        push(&registry, &name, &layers, &ids);
        let reference = format!("{}/{name}:v1", registry.host);
        let pulled = client(&registry, &work.path().join("cache"))
            .pull_str(&reference)
            .await
            .unwrap();
        let built = convert_in(work.path(), pulled.layout, pulled.image)
            .await
            .unwrap();
        let out = std::process::Command::new("debugfs")
            .arg("-R")
            .arg("cat /usr/greeting")
            .arg(&built.path)
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"hello from the upper layer\n");
    }
}
