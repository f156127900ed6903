//! The registry client against a real registry (Debian's `docker-registry`, started by
//! the test kit), with images pushed by `skopeo copy`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{snapshot, write_oci_layout, Layer, LayerBlob, Sandbox};
use nanobox_oci::registry::RegistryError;
use nanobox_oci::{
    ApplyOptions, DockerConfig, LayerApplier, OciError, OciLayout, Platform, PulledImage,
    RegistryClient, RegistryOptions,
};
use nanobox_testkit::registry::{PushFormat, Registry};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

fn options(registry: &Registry) -> RegistryOptions {
    RegistryOptions {
        plain_http: vec![registry.host.clone()],
        retries: 1,
        retry_backoff: std::time::Duration::from_millis(10),
        ..Default::default()
    }
}

fn gzip_layers() -> Vec<LayerBlob> {
    vec![
        LayerBlob::gzip(
            Layer::new()
                .dir("etc", 0o755)
                .file("etc/a", b"a", 0o644)
                .file("etc/b", b"b", 0o644),
        ),
        LayerBlob::gzip(Layer::new().whiteout("etc/.wh.a").symlink("etc/c", "b")),
        LayerBlob::gzip(Layer::new().file_owned("etc/d", b"d", 0o600, 5, 5)),
    ]
}

/// Writes an OCI layout with `layers` tagged `tag` in `dir`, returning the manifest digest.
fn layout(dir: &Path, tag: &str, layers: &[LayerBlob]) -> String {
    write_oci_layout(dir, tag, layers)
}

fn unwrap_registry(err: OciError) -> RegistryError {
    match err {
        OciError::Registry(e) => e,
        other => panic!("expected a registry error, got {other:?}: {other}"),
    }
}

/// The tree the pulled image applies to, and the tree the source layout applies to.
fn assert_applies_like(pulled: &PulledImage, source: &Path, tag: &str) {
    let from_registry = Sandbox::new();
    let mut applier = LayerApplier::new(&from_registry.root, ApplyOptions::default()).unwrap();
    pulled.layout.apply(&pulled.image, &mut applier).unwrap();

    let from_layout = Sandbox::new();
    let source = OciLayout::open(source).unwrap();
    let image = source.resolve(Some(tag), &Platform::linux_amd64()).unwrap();
    let mut applier = LayerApplier::new(&from_layout.root, ApplyOptions::default()).unwrap();
    source.apply(&image, &mut applier).unwrap();
    assert_eq!(
        snapshot(&from_registry.root, &[]),
        snapshot(&from_layout.root, &[])
    );
    assert_eq!(pulled.image.config, image.config);
}

#[tokio::test]
async fn pull_by_tag_then_again_from_the_cache() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let digest = layout(&src, "v1", &common::test_image());
    registry.push(&src, "v1", "app", "v1", PushFormat::Oci);

    let cache = work.path().join("cache");
    let client = RegistryClient::new(&cache, options(&registry)).unwrap();
    let reference = format!("{}/app:v1", registry.host);
    let pulled = client.pull_str(&reference).await.unwrap();
    assert_eq!(pulled.image.descriptor.digest, digest);
    let layers = pulled.image.manifest.layers.len();
    assert!(layers >= 2, "a multi-layer image");
    assert_eq!(pulled.report.blobs_downloaded, layers + 1);
    assert_eq!(pulled.report.blobs_cached, 0);
    assert_applies_like(&pulled, &src, "v1");

    // The second pull downloads no blob: the registry sees no blob request, and the
    // cached files are the same inodes.
    let blob_requests = registry.requests("GET", "/blobs/sha256:");
    assert_eq!(blob_requests, layers + 1, "{}", registry.log_tail());
    let inode = |d: &str| {
        fs::metadata(pulled.layout.blob_path(d).unwrap())
            .unwrap()
            .ino()
    };
    let before: Vec<u64> = pulled
        .image
        .manifest
        .layers
        .iter()
        .map(|l| inode(&l.digest))
        .collect();
    let again = client.pull_str(&reference).await.unwrap();
    assert_eq!(again.report.blobs_downloaded, 0);
    assert_eq!(again.report.blobs_cached, layers + 1);
    assert_eq!(again.image, pulled.image);
    assert_eq!(registry.requests("GET", "/blobs/sha256:"), blob_requests);
    let after: Vec<u64> = again
        .image
        .manifest
        .layers
        .iter()
        .map(|l| inode(&l.digest))
        .collect();
    assert_eq!(before, after);

    // A fresh client over the same cache also downloads nothing.
    let other = RegistryClient::new(&cache, options(&registry)).unwrap();
    let third = other.pull_str(&reference).await.unwrap();
    assert_eq!(third.report.blobs_downloaded, 0);
    // The cache is a valid OCI layout listing the image by reference.
    let reopened = OciLayout::open(&cache).unwrap();
    let resolved = reopened
        .resolve(Some(&third.reference.to_string()), &Platform::linux_amd64())
        .unwrap();
    assert_eq!(resolved, pulled.image);
}

#[tokio::test]
async fn pull_by_digest() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let digest = layout(&src, "v1", &gzip_layers());
    registry.push(&src, "v1", "team/app", "v1", PushFormat::Oci);

    let client = RegistryClient::new(&work.path().join("cache"), options(&registry)).unwrap();
    let pulled = client
        .pull_str(&format!("{}/team/app@{digest}", registry.host))
        .await
        .unwrap();
    assert_eq!(pulled.image.descriptor.digest, digest);
    assert_eq!(pulled.reference.tag(), None);
    assert_applies_like(&pulled, &src, "v1");

    // A digest the repository does not have.
    let missing = format!("sha256:{}", "0".repeat(64));
    let err = unwrap_registry(
        client
            .pull_str(&format!("{}/team/app@{missing}", registry.host))
            .await
            .unwrap_err(),
    );
    assert!(err.is_not_found(), "{err}");
    assert_eq!(
        err.to_string(),
        format!("digest {missing} not found in {}/team/app", registry.host)
    );
}

#[tokio::test]
async fn pull_docker_schema_2() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    layout(&src, "v1", &gzip_layers());
    registry.push(&src, "v1", "docker", "v1", PushFormat::DockerV2s2);

    let client = RegistryClient::new(&work.path().join("cache"), options(&registry)).unwrap();
    let pulled = client
        .pull_str(&format!("{}/docker:v1", registry.host))
        .await
        .unwrap();
    assert_eq!(pulled.image.descriptor.media_type, DOCKER_MANIFEST);
    assert_eq!(pulled.image.manifest.layers.len(), 3);
    for layer in &pulled.image.manifest.layers {
        assert_eq!(
            layer.media_type,
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
    }
    assert_applies_like(&pulled, &src, "v1");
}

fn put_blob(dir: &Path, data: &[u8]) -> (String, usize) {
    let hex = common::sha256_hex(data);
    fs::write(dir.join("blobs/sha256").join(&hex), data).unwrap();
    (format!("sha256:{hex}"), data.len())
}

/// A layout tagged `multi` holding an index of an amd64 and an arm64 image; returns
/// their manifest digests.
fn multi_platform_layout(src: &Path) -> (String, String) {
    let amd64 = layout(src, "amd64", &gzip_layers());
    let arm64 = layout(
        src,
        "arm64",
        &[LayerBlob::gzip(Layer::new().file("arm", b"64", 0o644))],
    );
    let size = |d: &str| {
        fs::metadata(
            src.join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .unwrap()
        .len()
    };
    let platform = |arch: &str| serde_json::json!({"os": "linux", "architecture": arch});
    let nested = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm64,
             "size": size(&arm64), "platform": platform("arm64")},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd64,
             "size": size(&amd64), "platform": platform("amd64")},
        ],
    });
    let (index_digest, index_size) = put_blob(src, &serde_json::to_vec(&nested).unwrap());
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index_digest, "size": index_size,
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }],
    });
    fs::write(src.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    (amd64, arm64)
}

#[tokio::test]
async fn index_with_two_platforms_picks_the_configured_one() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let (amd64, arm64) = multi_platform_layout(&src);
    registry.push(&src, "multi", "multi", "v1", PushFormat::Oci);
    let reference = format!("{}/multi:v1", registry.host);

    let client = RegistryClient::new(&work.path().join("cache"), options(&registry)).unwrap();
    let pulled = client.pull_str(&reference).await.unwrap();
    assert_eq!(pulled.image.descriptor.digest, amd64);

    let arm = RegistryClient::new(
        &work.path().join("cache-arm"),
        RegistryOptions {
            platform: Platform {
                os: "linux".into(),
                architecture: "arm64".into(),
            },
            ..options(&registry)
        },
    )
    .unwrap();
    let pulled = arm.pull_str(&reference).await.unwrap();
    assert_eq!(pulled.image.descriptor.digest, arm64);
    assert_eq!(pulled.image.manifest.layers.len(), 1);

    let s390x = RegistryClient::new(
        &work.path().join("cache-s390x"),
        RegistryOptions {
            platform: Platform {
                os: "linux".into(),
                architecture: "s390x".into(),
            },
            ..options(&registry)
        },
    )
    .unwrap();
    let err = unwrap_registry(s390x.pull_str(&reference).await.unwrap_err());
    assert_eq!(
        err.to_string(),
        format!("{reference} has no image for linux/s390x (available: linux/arm64, linux/amd64)")
    );
}

#[tokio::test]
async fn unknown_image_and_unknown_tag() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    layout(&src, "v1", &gzip_layers());
    registry.push(&src, "v1", "app", "v1", PushFormat::Oci);
    let client = RegistryClient::new(&work.path().join("cache"), options(&registry)).unwrap();

    let err = unwrap_registry(
        client
            .pull_str(&format!("{}/nope:v1", registry.host))
            .await
            .unwrap_err(),
    );
    assert!(matches!(err, RegistryError::NameUnknown { .. }), "{err:?}");
    assert!(err.is_not_found() && !err.is_retryable());
    assert!(
        err.to_string()
            .contains(&format!("image {}/nope not found", registry.host)),
        "{err}"
    );

    let err = unwrap_registry(
        client
            .pull_str(&format!("{}/app:1.2", registry.host))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        err.to_string(),
        format!("tag 1.2 not found in {}/app", registry.host)
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn registry_down_is_a_retryable_unreachable_error() {
    let registry = Registry::start();
    let host = registry.host.clone();
    let options = options(&registry);
    drop(registry);
    let work = tempfile::tempdir().unwrap();
    let client = RegistryClient::new(&work.path().join("cache"), options).unwrap();
    let err = unwrap_registry(
        client
            .pull_str(&format!("{host}/app:v1"))
            .await
            .unwrap_err(),
    );
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(err.to_string(), format!("cannot reach registry {host}"));
}

#[tokio::test]
async fn corrupt_blob_in_the_registry_is_a_digest_mismatch_and_never_cached() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let manifest_digest = layout(&src, "v1", &gzip_layers());
    registry.push(&src, "v1", "app", "v1", PushFormat::Oci);
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(
            src.join("blobs/sha256")
                .join(manifest_digest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][1]["digest"].as_str().unwrap().to_owned();
    let stored = registry.blob_data_path(&layer);
    let mut data = fs::read(&stored).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    fs::write(&stored, data).unwrap();

    let cache = work.path().join("cache");
    let client = RegistryClient::new(&cache, options(&registry)).unwrap();
    let err = unwrap_registry(
        client
            .pull_str(&format!("{}/app:v1", registry.host))
            .await
            .unwrap_err(),
    );
    assert!(
        matches!(err, RegistryError::DigestMismatch { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with(&format!("digest mismatch for layer {layer}")),
        "{err}"
    );
    let layout = OciLayout::open(&cache).unwrap();
    assert!(!layout.blob_path(&layer).unwrap().exists());
    assert_eq!(fs::read_dir(cache.join("tmp")).unwrap().count(), 0);
}

#[tokio::test]
async fn unsupported_media_type_is_named() {
    let registry = Registry::start();
    let config = br#"{"kind":"not an image"}"#;
    let config_digest = registry.put_blob("artifact", config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.example.thing.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [],
    });
    registry.put_manifest(
        "artifact",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );

    let work = tempfile::tempdir().unwrap();
    let client = RegistryClient::new(&work.path().join("cache"), options(&registry)).unwrap();
    let reference = format!("{}/artifact:v1", registry.host);
    let err = unwrap_registry(client.pull_str(&reference).await.unwrap_err());
    assert_eq!(
        err.to_string(),
        format!(
            "unsupported media type \"application/vnd.example.thing.config.v1+json\" for the \
             config of {reference}"
        )
    );
}

#[tokio::test]
async fn basic_auth_accepts_the_right_credentials_and_reports_wrong_ones() {
    let registry = Registry::start_with_auth("alice", "right-password");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let digest = layout(&src, "v1", &gzip_layers());
    registry.push(&src, "v1", "private", "v1", PushFormat::Oci);
    let reference = format!("{}/private:v1", registry.host);

    let config_json = |password: &str| {
        let auth = base64_encode(&format!("alice:{password}"));
        let json = format!(
            r#"{{"auths":{{"http://{}":{{"auth":"{auth}"}}}}}}"#,
            registry.host
        );
        let path = work.path().join(format!("config-{password}.json"));
        fs::write(&path, json).unwrap();
        DockerConfig::load(&path).unwrap()
    };
    let with = |config: Option<DockerConfig>, cache: &str| {
        RegistryClient::new(
            &work.path().join(cache),
            RegistryOptions {
                docker_config: config,
                ..options(&registry)
            },
        )
        .unwrap()
    };

    let pulled = with(Some(config_json("right-password")), "c1")
        .pull_str(&reference)
        .await
        .unwrap();
    assert_eq!(pulled.image.descriptor.digest, digest);

    let err = unwrap_registry(
        with(Some(config_json("wrong")), "c2")
            .pull_str(&reference)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        err.to_string(),
        format!(
            "registry {} refused credentials for user \"alice\"",
            registry.host
        )
    );
    assert!(!err.is_retryable());

    let err = unwrap_registry(with(None, "c3").pull_str(&reference).await.unwrap_err());
    assert_eq!(
        err.to_string(),
        format!(
            "registry {} requires credentials and none are configured for it",
            registry.host
        )
    );
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn connection_resets_are_retried_and_client_errors_are_not() {
    // A real listener that accepts and closes every connection at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    let work = tempfile::tempdir().unwrap();
    let client = RegistryClient::new(
        &work.path().join("cache"),
        RegistryOptions {
            plain_http: vec![host.clone()],
            retries: 2,
            retry_backoff: std::time::Duration::from_millis(1),
            ..Default::default()
        },
    )
    .unwrap();
    let err = unwrap_registry(
        client
            .pull_str(&format!("{host}/app:v1"))
            .await
            .unwrap_err(),
    );
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);

    // A 404 is asked once.
    let registry = Registry::start();
    let client = RegistryClient::new(&work.path().join("cache2"), options(&registry)).unwrap();
    let err = client
        .pull_str(&format!("{}/app:missing", registry.host))
        .await
        .unwrap_err();
    // Not found is the input's fault: callers must not retry it.
    assert!(err.is_bad_input(), "{err:?}");
    assert_eq!(registry.requests("GET", "/manifests/missing"), 1);
}

#[tokio::test]
async fn size_limits_on_manifests_and_blobs() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    layout(&src, "v1", &gzip_layers());
    registry.push(&src, "v1", "app", "v1", PushFormat::Oci);
    let reference = format!("{}/app:v1", registry.host);

    let small_manifests = RegistryClient::new(
        &work.path().join("c1"),
        RegistryOptions {
            max_manifest_size: 100,
            ..options(&registry)
        },
    )
    .unwrap();
    let err = unwrap_registry(small_manifests.pull_str(&reference).await.unwrap_err());
    assert!(
        matches!(
            err,
            RegistryError::TooLarge {
                what: "manifest",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().ends_with("limit 100"), "{err}");

    let small_blobs = RegistryClient::new(
        &work.path().join("c2"),
        RegistryOptions {
            max_blob_size: 64,
            ..options(&registry)
        },
    )
    .unwrap();
    let err = unwrap_registry(small_blobs.pull_str(&reference).await.unwrap_err());
    assert!(
        matches!(err, RegistryError::TooLarge { what: "layer", .. }),
        "{err:?}"
    );
    // Refused before any blob was fetched.
    assert_eq!(registry.requests("GET", "/blobs/"), 0);
}

#[tokio::test]
async fn a_damaged_cached_blob_is_downloaded_again() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    layout(&src, "v1", &gzip_layers());
    registry.push(&src, "v1", "app", "v1", PushFormat::Oci);
    let reference = format!("{}/app:v1", registry.host);
    let client = RegistryClient::new(&work.path().join("cache"), options(&registry)).unwrap();
    let pulled = client.pull_str(&reference).await.unwrap();
    let layer = &pulled.image.manifest.layers[0];
    let path = pulled.layout.blob_path(&layer.digest).unwrap();
    let mut data = fs::read(&path).unwrap();
    data[0] ^= 0xff;
    fs::write(&path, data).unwrap();

    let again = client.pull_str(&reference).await.unwrap();
    assert_eq!(again.report.blobs_downloaded, 1);
    assert_eq!(again.report.bytes_downloaded, layer.size);
    assert_applies_like(&again, &src, "v1");
}

#[tokio::test]
async fn https_by_default_with_a_trusted_certificate() {
    let registry = Registry::start_tls();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let digest = layout(&src, "v1", &gzip_layers());
    registry.push(&src, "v1", "app", "v1", PushFormat::Oci);
    let reference = format!("{}/app:v1", registry.host);

    // No plain-HTTP opt-in: the client speaks HTTPS and trusts the registry's CA.
    let trusting = RegistryClient::new(
        &work.path().join("c1"),
        RegistryOptions {
            root_certificates: vec![registry.certificate.clone().unwrap()],
            retries: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let pulled = trusting.pull_str(&reference).await.unwrap();
    assert_eq!(pulled.image.descriptor.digest, digest);
    assert_applies_like(&pulled, &src, "v1");

    // Without the CA the certificate is refused.
    let untrusting = RegistryClient::new(
        &work.path().join("c2"),
        RegistryOptions {
            retries: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let err = unwrap_registry(untrusting.pull_str(&reference).await.unwrap_err());
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err:?}");
}

#[tokio::test]
async fn plain_http_needs_the_opt_in() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    layout(&src, "v1", &gzip_layers());
    registry.push(&src, "v1", "app", "v1", PushFormat::Oci);
    let client = RegistryClient::new(
        &work.path().join("cache"),
        RegistryOptions {
            retries: 0,
            ..Default::default()
        },
    )
    .unwrap();
    // HTTPS to a plain-HTTP server fails; the client never falls back to HTTP.
    let err = unwrap_registry(
        client
            .pull_str(&format!("{}/app:v1", registry.host))
            .await
            .unwrap_err(),
    );
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err:?}");
    assert_eq!(registry.requests("GET", "/v2/app/"), 0);
}

#[tokio::test]
async fn bearer_token_auth_through_the_challenge() {
    let registry = Registry::start_with_token_auth("carol", "token-password");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let digest = layout(&src, "v1", &gzip_layers());
    registry.push(&src, "v1", "team/private", "v1", PushFormat::Oci);
    let reference = format!("{}/team/private:v1", registry.host);
    let with = |password: Option<&str>, cache: &str| {
        let mut options = options(&registry);
        if let Some(password) = password {
            options.credentials.insert(
                registry.host.clone(),
                nanobox_oci::Credentials::new("carol", password),
            );
        }
        RegistryClient::new(&work.path().join(cache), options).unwrap()
    };

    let before = registry.tokens_issued();
    let pulled = with(Some("token-password"), "c1")
        .pull_str(&reference)
        .await
        .unwrap();
    assert_eq!(pulled.image.descriptor.digest, digest);
    assert_applies_like(&pulled, &src, "v1");
    // One token, reused for the manifest and every blob.
    assert_eq!(registry.tokens_issued() - before, 1);

    let err = unwrap_registry(
        with(Some("wrong"), "c2")
            .pull_str(&reference)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        err.to_string(),
        format!(
            "registry {} refused credentials for user \"carol\"",
            registry.host
        )
    );
    let err = unwrap_registry(with(None, "c3").pull_str(&reference).await.unwrap_err());
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
}

#[tokio::test]
async fn docker_manifest_list_picks_the_platform() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    multi_platform_layout(&src);
    registry.push(&src, "multi", "multi", "v1", PushFormat::DockerV2s2);
    let list = reqwest::Client::new()
        .get(format!("http://{}/v2/multi/manifests/v1", registry.host))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        list.headers()["content-type"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );

    let client = RegistryClient::new(&work.path().join("cache"), options(&registry)).unwrap();
    let pulled = client
        .pull_str(&format!("{}/multi:v1", registry.host))
        .await
        .unwrap();
    assert_eq!(pulled.image.descriptor.media_type, DOCKER_MANIFEST);
    assert_eq!(pulled.image.manifest.layers.len(), 3);
    // The same layers as a single-image layout, for comparison.
    let single = work.path().join("single");
    layout(&single, "v1", &gzip_layers());
    assert_applies_like(&pulled, &single, "v1");
}

#[tokio::test]
async fn concurrent_pulls_into_one_cache_keep_every_image() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let names = ["one", "two", "three", "four"];
    for (i, name) in names.iter().enumerate() {
        let src = work.path().join(name);
        let content = format!("image {i}");
        layout(
            &src,
            "v1",
            &[LayerBlob::gzip(Layer::new().file(
                "id",
                content.as_bytes(),
                0o644,
            ))],
        );
        registry.push(&src, "v1", name, "v1", PushFormat::Oci);
    }
    let cache = work.path().join("cache");
    // One client per image, as separate processes would have.
    let clients: Vec<RegistryClient> = names
        .iter()
        .map(|_| RegistryClient::new(&cache, options(&registry)).unwrap())
        .collect();
    let pulls = clients.iter().zip(names).map(|(client, name)| {
        let reference = format!("{}/{name}:v1", registry.host);
        async move { client.pull_str(&reference).await }
    });
    let pulled: Vec<PulledImage> = futures::future::try_join_all(pulls).await.unwrap();
    let layout = OciLayout::open(&cache).unwrap();
    for image in &pulled {
        let resolved = layout
            .resolve(Some(&image.reference.to_string()), &Platform::linux_amd64())
            .unwrap();
        assert_eq!(resolved, image.image);
    }
}
