//! Where warmed-up root filesystems live in the object store, shared by the template
//! builder (which writes them) and the node agents (which fetch them).
//!
//! A root filesystem is content addressed: its keys derive from the image's manifest
//! digest and the guest init's version, so one image built with one init is one object
//! whatever the templates named after it. Beside the ext4 lies a small sidecar
//! ([`RootfsInfo`], JSON) written after it: its presence means the ext4 is complete, and
//! it carries the sha256 a node verifies its download against.

use nanobox_core::ImageConfig;

use crate::{ObjectKey, StoreError};

/// The object keys of one image's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsKeys {
    /// The ext4 image.
    pub ext4: ObjectKey,
    /// The sidecar ([`RootfsInfo`] as JSON), written after the ext4.
    pub info: ObjectKey,
}

/// The sidecar stored beside each root filesystem object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RootfsInfo {
    /// The image manifest digest it was built from.
    pub manifest_digest: String,
    /// The init version injected.
    pub init_version: String,
    /// Size of the ext4 image in bytes.
    pub size_bytes: u64,
    /// Hex sha256 of the ext4 image, for consumers to verify a download.
    pub sha256: String,
    /// The image's runtime configuration.
    pub config: ImageConfig,
}

/// The keys for the image `manifest_digest` built with init `init_version`.
pub fn rootfs_keys(manifest_digest: &str, init_version: &str) -> Result<RootfsKeys, StoreError> {
    let hex = manifest_digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| StoreError::InvalidKey {
            key: manifest_digest.to_owned(),
            reason: "not a sha256 digest",
        })?;
    let prefix = format!("rootfs/sha256-{hex}/init-{init_version}");
    Ok(RootfsKeys {
        ext4: ObjectKey::new(format!("{prefix}/rootfs.ext4"))?,
        info: ObjectKey::new(format!("{prefix}/image.json"))?,
    })
}

/// The sidecar key of an ext4 key (`.../rootfs.ext4` -> `.../image.json`).
pub fn sidecar_key(ext4: &str) -> Result<ObjectKey, StoreError> {
    let prefix = ext4
        .strip_suffix("/rootfs.ext4")
        .ok_or_else(|| StoreError::InvalidKey {
            key: ext4.to_owned(),
            reason: "not a root filesystem key",
        })?;
    ObjectKey::new(format!("{prefix}/image.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_content_addressed() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let keys = rootfs_keys(&digest, "0123456789abcdef").expect("keys");
        assert_eq!(
            keys.ext4.as_str(),
            format!(
                "rootfs/sha256-{}/init-0123456789abcdef/rootfs.ext4",
                "ab".repeat(32)
            )
        );
        assert_eq!(sidecar_key(keys.ext4.as_str()).expect("sidecar"), keys.info);
        assert!(rootfs_keys("sha256:xyz", "v").is_err());
        assert!(rootfs_keys("md5:ab", "v").is_err());
        assert!(sidecar_key("rootfs/x.img").is_err());
    }
}
