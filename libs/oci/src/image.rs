//! Images stored as an OCI image layout directory (`oci-layout`, `index.json`,
//! `blobs/sha256/...`), as `umoci` and `skopeo copy ... oci:DIR` write them.
//!
//! Every blob is checked against its descriptor: JSON documents before they are parsed,
//! layers while they stream into the [`LayerApplier`] (so a mismatch is found at the end
//! of the layer, after it was applied: callers discard the staging tree on any error).
//! Each layer's decompressed tar is checked, in the same pass, against the config's
//! `rootfs.diff_ids` entry for it ([`crate::diff_id`]), and a config listing more or
//! fewer diff_ids than the manifest lists layers is refused when the image is resolved.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nanobox_core::ImageConfig;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::compression::{read_ahead, Compression};
use crate::diff_id::{DiffIdReader, Expected};
use crate::error::OciError;
use crate::layer::{LayerApplier, LayerStats};

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Index, manifest and config documents are small; anything bigger is refused.
const MAX_DOCUMENT: u64 = 4 << 20;

/// A content descriptor (media type, digest, size).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the content.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Annotations (the tag is `org.opencontainers.image.ref.name`).
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// The platform, in an index.
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// An OS and CPU architecture.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    /// For example `linux`.
    pub os: String,
    /// For example `amd64`.
    pub architecture: String,
}

impl Platform {
    /// linux/amd64.
    pub fn linux_amd64() -> Self {
        Self {
            os: "linux".to_owned(),
            architecture: "amd64".to_owned(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// The image config blob.
    pub config: Descriptor,
    /// The layers, lowest first.
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RuntimeConfig>,
    #[serde(default)]
    rootfs: RootFs,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RuntimeConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

/// One image in a layout, resolved to its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The manifest's descriptor (its digest identifies the image).
    pub descriptor: Descriptor,
    /// The manifest.
    pub manifest: Manifest,
    /// The runtime config (Env, Entrypoint, Cmd, WorkingDir, User).
    pub config: ImageConfig,
    /// The config's `rootfs.diff_ids`: one `sha256:<hex>` per manifest layer, the digest
    /// of that layer's uncompressed tar.
    pub diff_ids: Vec<String>,
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
}

impl OciLayout {
    /// Opens a layout (it must have an `oci-layout` file and an `index.json`).
    pub fn open(dir: &Path) -> Result<Self, OciError> {
        for name in ["oci-layout", "index.json"] {
            if !dir.join(name).is_file() {
                return Err(OciError::InvalidLayout(format!("{name} is missing")));
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Resolves `tag` (or the only image, when `None`) to its manifest and config, picking
    /// `platform` from a multi-platform index.
    pub fn resolve(
        &self,
        tag: Option<&str>,
        platform: &Platform,
    ) -> Result<ResolvedImage, OciError> {
        let index_path = self.dir.join("index.json");
        let index: Index = parse(&read_capped(&index_path)?, "index.json")?;
        let mut candidates: Vec<&Descriptor> = match tag {
            Some(tag) => index
                .manifests
                .iter()
                .filter(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(tag))
                .collect(),
            None => index.manifests.iter().collect(),
        };
        let descriptor = match candidates.len() {
            1 => candidates.remove(0).clone(),
            0 => {
                return Err(OciError::InvalidLayout(match tag {
                    Some(tag) => format!("no image tagged {tag:?}"),
                    None => "the index lists no image".to_owned(),
                }))
            }
            _ => {
                return Err(OciError::InvalidLayout(
                    "several images match; name a tag".to_owned(),
                ))
            }
        };
        let descriptor = if is_index(&descriptor.media_type) {
            let nested: Index = parse(&self.read_document(&descriptor)?, "image index")?;
            nested
                .manifests
                .into_iter()
                .find(|d| d.platform.as_ref() == Some(platform))
                .ok_or_else(|| {
                    OciError::InvalidLayout(format!(
                        "no manifest for {}/{}",
                        platform.os, platform.architecture
                    ))
                })?
        } else {
            descriptor
        };
        let manifest: Manifest = parse(&self.read_document(&descriptor)?, "manifest")?;
        let config_file: ConfigFile =
            parse(&self.read_document(&manifest.config)?, "image config")?;
        let runtime = config_file.config.unwrap_or_default();
        let config = ImageConfig {
            env: runtime.env.unwrap_or_default(),
            working_dir: runtime.working_dir.unwrap_or_default(),
            user: runtime.user.unwrap_or_default(),
            entrypoint: runtime.entrypoint.unwrap_or_default(),
            cmd: runtime.cmd.unwrap_or_default(),
        };
        let diff_ids = config_file.rootfs.diff_ids;
        if diff_ids.len() != manifest.layers.len() {
            return Err(OciError::DiffIdCount {
                layers: manifest.layers.len(),
                diff_ids: diff_ids.len(),
            });
        }
        if let Some((i, bad)) = diff_ids
            .iter()
            .enumerate()
            .find(|(_, d)| sha256_hex(d).is_err())
        {
            return Err(OciError::InvalidLayout(format!(
                "image config: rootfs.diff_ids[{i}] = {bad:?} is not a sha256 digest"
            )));
        }
        Ok(ResolvedImage {
            descriptor,
            manifest,
            config,
            diff_ids,
        })
    }

    /// The path of a blob (the digest is validated first, so it cannot name a path).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, OciError> {
        let hex = sha256_hex(digest)?;
        Ok(self.dir.join("blobs/sha256").join(hex))
    }

    /// Opens a blob as a stream that fails on a size or digest mismatch.
    pub fn open_blob(&self, descriptor: &Descriptor) -> Result<VerifiedBlob<File>, OciError> {
        let path = self.blob_path(&descriptor.digest)?;
        let file = File::open(&path).map_err(|e| OciError::io("opening a blob", &path, e))?;
        Ok(VerifiedBlob::new(file, descriptor))
    }

    /// Applies the image's layers, in order, with `applier`, each verified as in
    /// [`Self::apply_layer`]; the applier holds them to its budgets.
    pub fn apply(
        &self,
        image: &ResolvedImage,
        applier: &mut LayerApplier,
    ) -> Result<Vec<LayerStats>, OciError> {
        (0..image.manifest.layers.len())
            .map(|index| self.apply_layer(image, index, applier))
            .collect()
    }

    /// Applies layer `index` of the image with `applier`, checking its blob digest and
    /// size and its diff_id as it streams. The layer is decompressed before it reaches
    /// the applier (which so sees a plain tar and holds it to its budgets).
    ///
    /// Every application hashes the decompressed tar again, cached blob or not: that
    /// costs no extra pass (the hash runs on the stream being applied), and it means no
    /// record of an earlier check has to be trusted. The blob digest alone would not be
    /// enough to skip it: it ties the bytes to the manifest, not to the config's
    /// diff_ids, and another image's config can pair the same blob with a wrong one.
    pub(crate) fn apply_layer(
        &self,
        image: &ResolvedImage,
        index: usize,
        applier: &mut LayerApplier,
    ) -> Result<LayerStats, OciError> {
        let layer = &image.manifest.layers[index];
        let diff_id = image
            .diff_ids
            .get(index)
            .ok_or(OciError::DiffIdCount {
                layers: image.manifest.layers.len(),
                diff_ids: image.diff_ids.len(),
            })?
            .clone();
        let compression = Compression::from_media_type(&layer.media_type)?;
        let blob = self.open_blob(layer)?;
        let blob_verdict = blob.verdict();
        let expected = Expected {
            index,
            digest: layer.digest.clone(),
            diff_id,
        };
        // Three stages on three threads: read and hash the blob, decompress and hash the
        // tar, apply it.
        let blob =
            read_ahead(blob).map_err(|e| OciError::io("reading a layer", &layer.digest, e))?;
        let tar = DiffIdReader::new(blob, compression, expected)?;
        let tar_verdict = tar.verdict();
        let result = applier.apply(tar, Compression::None);
        // A digest or size mismatch is the real cause of whatever the stream did; then
        // a diff_id mismatch is.
        if let Some(err) = take(&blob_verdict) {
            return Err(err);
        }
        if let Some(err) = take(&tar_verdict) {
            return Err(err);
        }
        result
    }

    fn read_document(&self, descriptor: &Descriptor) -> Result<Vec<u8>, OciError> {
        if descriptor.size > MAX_DOCUMENT {
            return Err(OciError::InvalidLayout(format!(
                "{} is too large for a JSON document ({} bytes)",
                descriptor.digest, descriptor.size
            )));
        }
        let path = self.blob_path(&descriptor.digest)?;
        let mut blob = self.open_blob(descriptor)?;
        let verdict = blob.verdict();
        let mut data = Vec::new();
        let read = blob.read_to_end(&mut data);
        if let Some(err) = take(&verdict) {
            return Err(err);
        }
        read.map_err(|e| OciError::io("reading a blob", path, e))?;
        Ok(data)
    }
}

fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_INDEX || media_type == MEDIA_DOCKER_LIST
}

fn parse<T: serde::de::DeserializeOwned>(data: &[u8], what: &str) -> Result<T, OciError> {
    serde_json::from_slice(data).map_err(|e| OciError::InvalidLayout(format!("{what}: {e}")))
}

fn read_capped(path: &Path) -> Result<Vec<u8>, OciError> {
    let file = File::open(path).map_err(|e| OciError::io("reading", path, e))?;
    let mut data = Vec::new();
    file.take(MAX_DOCUMENT + 1)
        .read_to_end(&mut data)
        .map_err(|e| OciError::io("reading", path, e))?;
    if data.len() as u64 > MAX_DOCUMENT {
        return Err(OciError::InvalidLayout(format!(
            "{} is too large",
            path.display()
        )));
    }
    Ok(data)
}

/// The hex part of a `sha256:` digest, checked to be 64 lowercase hex digits.
fn sha256_hex(digest: &str) -> Result<&str, OciError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(hex)
        }
        _ => Err(OciError::InvalidLayout(format!(
            "unsupported or malformed digest {digest:?}"
        ))),
    }
}

/// The failure a [`VerifiedBlob`] found, for the code that drove the read.
pub type Verdict = Arc<Mutex<Option<OciError>>>;

/// Takes the recorded failure, if any.
fn take(verdict: &Verdict) -> Option<OciError> {
    verdict.lock().ok().and_then(|mut v| v.take())
}

/// A blob stream that hashes what passes through and fails at the end on a digest
/// mismatch, or as soon as it runs past its declared size.
#[derive(Debug)]
pub struct VerifiedBlob<R> {
    inner: R,
    expected: String,
    size: u64,
    read: u64,
    hasher: Sha256,
    done: bool,
    verdict: Verdict,
}

impl<R: Read> VerifiedBlob<R> {
    /// Wraps `inner`, the content of `descriptor`.
    pub fn new(inner: R, descriptor: &Descriptor) -> Self {
        Self {
            inner,
            expected: descriptor.digest.clone(),
            size: descriptor.size,
            read: 0,
            hasher: Sha256::new(),
            done: false,
            verdict: Arc::new(Mutex::new(None)),
        }
    }

    /// Where a mismatch is recorded (the `io::Error` the stream returns says less).
    pub fn verdict(&self) -> Verdict {
        self.verdict.clone()
    }

    fn fail(&self, err: OciError) -> io::Error {
        record(&self.verdict, err)
    }
}

/// Records `err` as a stream's verdict and returns the `io::Error` the stream fails with
/// (which reaches its reader only as "corrupt layer": the verdict keeps the real cause).
pub(crate) fn record(verdict: &Verdict, err: OciError) -> io::Error {
    let message = err.to_string();
    if let Ok(mut slot) = verdict.lock() {
        *slot = Some(err);
    }
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl<R: Read> Read for VerifiedBlob<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.size {
            return Err(self.fail(OciError::InvalidLayout(format!(
                "blob {} is larger than its declared {} bytes",
                self.expected, self.size
            ))));
        }
        if n > 0 {
            self.hasher.update(&buf[..n]);
            return Ok(n);
        }
        self.done = true;
        let actual: String = std::mem::take(&mut self.hasher)
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let actual = format!("sha256:{actual}");
        if self.read != self.size || actual != self.expected {
            return Err(self.fail(OciError::DigestMismatch {
                digest: self.expected.clone(),
                actual,
            }));
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_validated_before_they_become_paths() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(sha256_hex(&good).is_ok());
        for bad in [
            "sha256:../../etc/passwd".to_owned(),
            format!("sha512:{}", "a".repeat(128)),
            format!("sha256:{}", "A".repeat(64)),
            "sha256:".to_owned(),
        ] {
            assert!(sha256_hex(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn verified_blob_checks_digest_and_size() {
        let data = b"hello";
        let digest = format!(
            "sha256:{}",
            Sha256::digest(data)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let desc = |digest: &str, size| Descriptor {
            media_type: String::new(),
            digest: digest.to_owned(),
            size,
            annotations: Default::default(),
            platform: None,
        };
        let mut out = Vec::new();
        let ok = VerifiedBlob::new(&data[..], &desc(&digest, 5)).read_to_end(&mut out);
        assert_eq!(ok.ok(), Some(5));

        let wrong = format!("sha256:{}", "0".repeat(64));
        let mut blob = VerifiedBlob::new(&data[..], &desc(&wrong, 5));
        assert!(blob.read_to_end(&mut Vec::new()).is_err());
        assert!(matches!(
            take(&blob.verdict()),
            Some(OciError::DigestMismatch { .. })
        ));

        let mut long = VerifiedBlob::new(&data[..], &desc(&digest, 3));
        assert!(long.read_to_end(&mut Vec::new()).is_err());
        let mut short = VerifiedBlob::new(&data[..], &desc(&digest, 9));
        assert!(short.read_to_end(&mut Vec::new()).is_err());
    }
}
