//! The blob cache: a directory that is an OCI image layout. Blobs stream into `tmp/`,
//! are hashed and counted on the way, and are renamed into `blobs/sha256/` only when
//! digest and size match; the cache's `index.json` lists pulled images by reference.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::{reference, PullProgress, RegistryClient, RegistryError, Repo, Target, REF_NAME};
use crate::diff_id::sha256_digest as hex_digest;
use crate::error::OciError;
use crate::image::{Descriptor, ResolvedImage};

impl RegistryClient {
    /// Downloads one blob into the cache unless it is there already. Returns the bytes
    /// downloaded, or `None` for a cache hit.
    pub(super) async fn fetch_blob(
        &self,
        repo: &Repo<'_>,
        descriptor: &Descriptor,
        what: &'static str,
        progress: &dyn PullProgress,
    ) -> Result<Option<u64>, RegistryError> {
        let path = self.blob_path(&descriptor.digest)?;
        if self.cached(&path, descriptor).await? {
            return Ok(None);
        }
        self.with_retries(|| self.download(repo, descriptor, what, &path, progress))
            .await?;
        Ok(Some(descriptor.size))
    }

    /// True when `path` holds exactly the descriptor's content; a bad cached file is
    /// removed.
    pub(super) async fn cached(
        &self,
        path: &Path,
        descriptor: &Descriptor,
    ) -> Result<bool, RegistryError> {
        let path = path.to_owned();
        let digest = descriptor.digest.clone();
        let size = descriptor.size;
        let verdict = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            let file = match std::fs::File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            };
            if file.metadata()?.len() != size {
                std::fs::remove_file(&path)?;
                return Ok(false);
            }
            let mut hasher = Sha256::new();
            std::io::copy(&mut std::io::BufReader::new(file), &mut hasher)?;
            if hex_digest(hasher) != digest {
                std::fs::remove_file(&path)?;
                return Ok(false);
            }
            Ok(true)
        })
        .await
        .map_err(|e| {
            RegistryError::cache(
                "verifying a cached blob",
                &self.cache,
                std::io::Error::other(e),
            )
        })?;
        verdict.map_err(|e| RegistryError::cache("verifying a cached blob", &self.cache, e))
    }

    pub(super) async fn download(
        &self,
        repo: &Repo<'_>,
        descriptor: &Descriptor,
        what: &'static str,
        path: &Path,
        progress: &dyn PullProgress,
    ) -> Result<(), RegistryError> {
        let digest = &descriptor.digest;
        let url = format!("{}/blobs/{digest}", repo.base);
        let mut response = self.get(repo, &url, None, Target::Blob(digest)).await?;
        if let Some(length) = response.content_length() {
            if length > descriptor.size {
                return Err(RegistryError::TooLarge {
                    what,
                    digest: digest.clone(),
                    size: length,
                    limit: descriptor.size,
                });
            }
        }
        let temp = TempFile::new(&self.cache, digest);
        let mut file = tokio::fs::File::create(&temp.path)
            .await
            .map_err(|e| RegistryError::cache("creating a download file", &temp.path, e))?;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|source| RegistryError::Transfer {
                    registry: repo.registry().to_owned(),
                    what: format!("{what} {digest}"),
                    source,
                })?;
            let Some(chunk) = chunk else { break };
            received += chunk.len() as u64;
            if received > descriptor.size {
                return Err(RegistryError::TooLarge {
                    what,
                    digest: digest.clone(),
                    size: received,
                    limit: descriptor.size,
                });
            }
            hasher.update(&chunk);
            progress.bytes(chunk.len() as u64);
            file.write_all(&chunk)
                .await
                .map_err(|e| RegistryError::cache("writing a download file", &temp.path, e))?;
        }
        file.flush()
            .await
            .map_err(|e| RegistryError::cache("writing a download file", &temp.path, e))?;
        drop(file);
        let actual = hex_digest(hasher);
        if actual != *digest || received != descriptor.size {
            return Err(RegistryError::DigestMismatch {
                what,
                digest: digest.clone(),
                actual,
            });
        }
        temp.persist(path).await
    }

    /// Writes a verified manifest or index into the cache.
    pub(super) async fn store_document(
        &self,
        digest: &str,
        bytes: &[u8],
    ) -> Result<(), RegistryError> {
        let path = self.blob_path(digest)?;
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(());
        }
        let temp = TempFile::new(&self.cache, digest);
        tokio::fs::write(&temp.path, bytes)
            .await
            .map_err(|e| RegistryError::cache("writing a manifest", &temp.path, e))?;
        temp.persist(&path).await
    }

    /// Lists the pulled manifest in the cache's `index.json` under `ref_name` (replacing
    /// what that name pointed to before) and resolves it from there, re-verifying the
    /// manifest and config. An exclusive lock on `index.lock` covers both steps, so that
    /// concurrent pulls into one cache, from any process, lose no entry.
    pub(super) async fn record_and_resolve(
        &self,
        ref_name: &str,
        media_type: &str,
        digest: &str,
        size: u64,
    ) -> Result<ResolvedImage, OciError> {
        let entry = serde_json::json!({
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": { REF_NAME: ref_name },
        });
        let cache = self.cache.clone();
        let layout = self.layout.clone();
        let platform = self.options.platform.clone();
        let ref_name = ref_name.to_owned();
        tokio::task::spawn_blocking(move || {
            let lock_path = cache.join("index.lock");
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| OciError::io("opening", &lock_path, e))?;
            let _lock = Flock::lock(lock, FlockArg::LockExclusive)
                .map_err(|(_, errno)| OciError::io("locking", &lock_path, errno.into()))?;
            let path = cache.join("index.json");
            let data = std::fs::read(&path).map_err(|e| OciError::io("reading", &path, e))?;
            let mut index: serde_json::Value = serde_json::from_slice(&data)
                .map_err(|e| OciError::InvalidLayout(format!("index.json: {e}")))?;
            let mut manifests: Vec<serde_json::Value> = index
                .get("manifests")
                .and_then(|m| m.as_array())
                .cloned()
                .unwrap_or_default();
            manifests.retain(|m| {
                m.pointer("/annotations/org.opencontainers.image.ref.name")
                    .and_then(|v| v.as_str())
                    != Some(ref_name.as_str())
            });
            manifests.push(entry);
            index["schemaVersion"] = 2.into();
            index["manifests"] = manifests.into();
            let bytes = serde_json::to_vec_pretty(&index)
                .map_err(|e| OciError::InvalidLayout(format!("index.json: {e}")))?;
            write_atomic(&cache, &path, &bytes)?;
            let resolved = layout.resolve(Some(&ref_name), &platform);
            if resolved.is_err() {
                // An image that does not resolve (a config whose diff_ids do not match the
                // manifest's layers, say) is not left listed as pulled.
                write_atomic(&cache, &path, &data)?;
            }
            resolved
        })
        .await
        .map_err(|e| OciError::io("updating", &self.cache, std::io::Error::other(e)))?
    }

    pub(super) fn blob_path(&self, digest: &str) -> Result<PathBuf, RegistryError> {
        reference::validate_digest(digest).map_err(|reason| RegistryError::InvalidDocument {
            what: "descriptor",
            reference: digest.to_owned(),
            reason,
        })?;
        self.layout
            .blob_path(digest)
            .map_err(|e| RegistryError::InvalidDocument {
                what: "descriptor",
                reference: digest.to_owned(),
                reason: e.to_string(),
            })
    }
}

pub(super) fn sha256_digest(bytes: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(bytes);
    hex_digest(hasher)
}

/// Writes `path` through a temporary file in `cache/tmp` and a rename.
pub(super) fn write_atomic(cache: &Path, path: &Path, bytes: &[u8]) -> Result<(), OciError> {
    let temp = cache.join("tmp").join(format!(
        "index.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(cache.join("tmp"))
        .map_err(|e| OciError::io("creating", cache.join("tmp"), e))?;
    std::fs::write(&temp, bytes).map_err(|e| OciError::io("writing", &temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        OciError::io("renaming into place", path, e)
    })
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A download in progress, removed unless persisted.
pub(super) struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    pub(super) fn new(cache: &Path, digest: &str) -> Self {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let path = cache.join("tmp").join(format!(
            "{hex}.{}.{}.partial",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        Self {
            path,
            persisted: false,
        }
    }

    pub(super) async fn persist(mut self, to: &Path) -> Result<(), RegistryError> {
        tokio::fs::rename(&self.path, to)
            .await
            .map_err(|e| RegistryError::cache("moving a verified blob into the cache", to, e))?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
