//! A READY template without a warmup: a root filesystem (the test rootfs) published the
//! way the template-builder publishes one, so node agents fetch and boot it as they would
//! a warmed-up image.
//!
//! The order is the builder's: the content-addressed ext4 under its
//! [`nanobox_store::rootfs`] keys, then its sidecar (whose presence says the ext4 is
//! complete), then the template row in Postgres. The manifest digest the keys derive from
//! is the ext4's own sha256: there is no image manifest, and the same file always lands
//! under the same keys.

use std::path::Path;

use nanobox_core::{ImageConfig, TemplateName, TemplateState};
use nanobox_store::metadata::TemplateRecord;
use nanobox_store::rootfs::{rootfs_keys, RootfsInfo};
use nanobox_store::{sha256_file, MetadataStore, ObjectStore};

/// The init version in the keys and sidecar of a published test rootfs (it carries the
/// init its build put in).
pub const INIT_VERSION: &str = "test";

/// The image reference the published templates name.
pub const IMAGE_REF: &str = "test/busybox:latest";

/// Publishes the ext4 `rootfs` as the READY template `name`: uploads it and its sidecar to
/// `objects`, then inserts (or replaces) the template row in `meta`.
pub async fn publish_template(
    meta: &MetadataStore,
    objects: &dyn ObjectStore,
    name: &str,
    rootfs: &Path,
) {
    let (sha256, _) = sha256_file(rootfs)
        .await
        .unwrap_or_else(|e| panic!("hashing {}: {e}", rootfs.display()));
    let digest = format!("sha256:{sha256}");
    let keys = rootfs_keys(&digest, INIT_VERSION).unwrap_or_else(|e| panic!("keys: {e}"));
    let stored = objects
        .put_file(&keys.ext4, rootfs)
        .await
        .unwrap_or_else(|e| panic!("uploading {}: {e}", rootfs.display()));
    let info = RootfsInfo {
        manifest_digest: digest.clone(),
        init_version: INIT_VERSION.into(),
        size_bytes: stored.size,
        sha256: stored.sha256.unwrap_or(sha256),
        config: ImageConfig::default(),
    };
    let sidecar = serde_json::to_vec(&info).unwrap_or_else(|e| panic!("the sidecar: {e}"));
    objects
        .put_bytes(&keys.info, sidecar.into())
        .await
        .unwrap_or_else(|e| panic!("uploading {}: {e}", keys.info));
    let template = TemplateName::new(name).unwrap_or_else(|e| panic!("template {name:?}: {e}"));
    meta.upsert_template(&TemplateRecord {
        name: template,
        image_ref: IMAGE_REF.into(),
        manifest_digest: Some(digest),
        rootfs_key: Some(keys.ext4.to_string()),
        size_bytes: Some(stored.size),
        image_config: ImageConfig::default(),
        state: TemplateState::Ready,
    })
    .await
    .unwrap_or_else(|e| panic!("publishing template {name}: {e}"));
}
