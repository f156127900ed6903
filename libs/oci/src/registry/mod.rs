//! Pulling images from registries (OCI distribution v2) into a local cache that is an OCI
//! image layout, so that [`OciLayout::apply`] consumes a pulled image unchanged.
//!
//! A pull resolves the reference to a manifest (through an image index or Docker
//! manifest list, picking the configured platform), then fetches the config and layer
//! blobs, several at once, into `blobs/sha256/<hex>` of the cache directory. Every blob
//! is hashed and counted while it streams into a temporary file and only renamed into
//! place when digest and size match, so the cache never holds bad content; a blob that
//! is already there (and still verifies) is not downloaded again. Transient failures
//! (connection errors, 5xx) are retried with exponential backoff, 4xx answers are not.
//!
//! HTTPS is the default. Plain HTTP is used only for registries the caller lists in
//! [`RegistryOptions::plain_http`], and only when they are on a loopback address.

pub mod auth;
mod error;
pub mod reference;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

pub use auth::{Credentials, DockerConfig};
pub use error::RegistryError;
pub use reference::Reference;

use crate::compression::Compression;
use crate::error::OciError;
use crate::image::{Descriptor, Manifest, OciLayout, Platform, ResolvedImage};
use auth::{Challenge, TokenResponse};

const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Error bodies are read only this far.
const MAX_ERROR_BODY: usize = 64 << 10;

/// How the client talks to registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// The platform picked from multi-platform images.
    pub platform: Platform,
    /// Registries (`host:port` as references name them) that may be reached over plain
    /// HTTP. Each must be on a loopback address (127.0.0.0/8, ::1, localhost).
    pub plain_http: Vec<String>,
    /// Credentials per registry; they win over `docker_config`.
    pub credentials: HashMap<String, Credentials>,
    /// Credentials from a Docker `config.json`.
    pub docker_config: Option<DockerConfig>,
    /// Largest manifest or index accepted.
    pub max_manifest_size: u64,
    /// Largest config or layer blob accepted.
    pub max_blob_size: u64,
    /// Blobs downloaded at once.
    pub parallel_downloads: usize,
    /// Retries after a transient failure (so `retries + 1` attempts in all).
    pub retries: u32,
    /// The first retry's delay; it doubles with every further retry.
    pub retry_backoff: Duration,
    /// Connecting to a registry gives up after this long.
    pub connect_timeout: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            platform: Platform::linux_amd64(),
            plain_http: Vec::new(),
            credentials: HashMap::new(),
            docker_config: None,
            max_manifest_size: 4 << 20,
            max_blob_size: 16 << 30,
            parallel_downloads: 4,
            retries: 3,
            retry_backoff: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// What a pull transferred.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullReport {
    /// Config and layer blobs downloaded.
    pub blobs_downloaded: usize,
    /// Their bytes.
    pub bytes_downloaded: u64,
    /// Config and layer blobs found (and verified) in the cache.
    pub blobs_cached: usize,
}

/// A pulled image: the cache layout holding its blobs and the resolved image, ready for
/// [`OciLayout::apply`].
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// The reference as pulled (normalised).
    pub reference: Reference,
    /// The cache directory, an OCI image layout.
    pub layout: OciLayout,
    /// The platform's manifest and config. Its `descriptor.digest` identifies the image.
    pub image: ResolvedImage,
    /// What was transferred.
    pub report: PullReport,
}

/// A registry client with a content-addressed blob cache.
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    options: RegistryOptions,
    cache: PathBuf,
    layout: OciLayout,
    /// `Authorization` values per `registry/repository` (tokens are scoped to one).
    auth: Mutex<HashMap<String, String>>,
    /// Serialises this client's updates of the cache's `index.json`.
    index_lock: tokio::sync::Mutex<()>,
}

/// One repository on one registry, as requests address it.
struct Repo<'a> {
    reference: &'a Reference,
    base: String,
}

impl Repo<'_> {
    fn key(&self) -> String {
        self.reference.name()
    }
    fn registry(&self) -> &str {
        self.reference.registry()
    }
}

/// What a request fetches, for error messages.
#[derive(Clone, Copy)]
enum Target<'a> {
    Tags,
    Manifest(&'a str),
    Blob(&'a str),
}

impl RegistryClient {
    /// A client caching blobs in `cache_dir` (created if missing; it becomes an OCI
    /// image layout).
    pub fn new(cache_dir: &Path, options: RegistryOptions) -> Result<Self, OciError> {
        for registry in &options.plain_http {
            if !is_loopback(registry) {
                return Err(RegistryError::PlainHttpRefused {
                    registry: registry.clone(),
                }
                .into());
            }
        }
        let blobs = cache_dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs)
            .map_err(|e| OciError::io("creating the blob cache", &blobs, e))?;
        std::fs::create_dir_all(cache_dir.join("tmp"))
            .map_err(|e| OciError::io("creating the blob cache", cache_dir, e))?;
        let marker = cache_dir.join("oci-layout");
        if !marker.is_file() {
            std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
                .map_err(|e| OciError::io("writing", &marker, e))?;
        }
        let index = cache_dir.join("index.json");
        if !index.is_file() {
            write_atomic(cache_dir, &index, br#"{"schemaVersion":2,"manifests":[]}"#)?;
        }
        let plain_http = options.plain_http.clone();
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .user_agent(concat!("nanobox/", env!("CARGO_PKG_VERSION")))
            // Blob storage may redirect elsewhere; never from HTTPS down to plain HTTP
            // (except to a loopback registry the caller allowed).
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                let downgrade = attempt.url().scheme() == "http"
                    && !attempt.url().host_str().is_some_and(|h| {
                        let port = attempt.url().port().map(|p| format!(":{p}"));
                        let host = format!("{h}{}", port.unwrap_or_default());
                        plain_http.contains(&host) && is_loopback(&host)
                    });
                if downgrade {
                    attempt.error("refusing a redirect to plain HTTP")
                } else if attempt.previous().len() > 5 {
                    attempt.error("too many redirects")
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .map_err(RegistryError::Client)?;
        Ok(Self {
            http,
            options,
            cache: cache_dir.to_owned(),
            layout: OciLayout::open(cache_dir)?,
            auth: Mutex::new(HashMap::new()),
            index_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The cache directory (an OCI image layout).
    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// Pulls `reference` (parsed with [`Reference::parse`]).
    pub async fn pull_str(&self, reference: &str) -> Result<PulledImage, OciError> {
        self.pull(&Reference::parse(reference)?).await
    }

    /// Pulls an image: its manifest for the configured platform, its config and layers.
    pub async fn pull(&self, reference: &Reference) -> Result<PulledImage, OciError> {
        let repo = Repo {
            reference,
            base: self.base_url(reference)?,
        };
        let what = reference.to_string();
        let (bytes, media_type, digest) = match self
            .fetch_manifest(&repo, reference.manifest_reference())
            .await
        {
            Err(RegistryError::ManifestUnknown { .. }) if !self.repository_exists(&repo).await => {
                return Err(RegistryError::NameUnknown {
                    name: reference.name(),
                }
                .into())
            }
            other => other?,
        };
        let (bytes, media_type, digest) =
            if media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST {
                self.store_document(&digest, &bytes).await?;
                let chosen = self.choose_platform(&what, &bytes)?;
                let (bytes, media_type, digest) = self.fetch_manifest(&repo, &chosen).await?;
                if media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST {
                    return Err(RegistryError::InvalidDocument {
                        what: "image index",
                        reference: what,
                        reason: "an index nested in an index".to_owned(),
                    }
                    .into());
                }
                (bytes, media_type, digest)
            } else {
                (bytes, media_type, digest)
            };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::InvalidDocument {
                what: "manifest",
                reference: what.clone(),
                reason: e.to_string(),
            })?;
        self.check_manifest(&what, &manifest)?;
        self.store_document(&digest, &bytes).await?;

        let blobs: Vec<(&Descriptor, &'static str)> = std::iter::once((&manifest.config, "config"))
            .chain(manifest.layers.iter().map(|l| (l, "layer")))
            .collect();
        let results: Vec<Option<u64>> = stream::iter(blobs)
            .map(|(descriptor, kind)| self.fetch_blob(&repo, descriptor, kind))
            .buffer_unordered(self.options.parallel_downloads.max(1))
            .try_collect()
            .await?;
        let mut report = PullReport::default();
        for downloaded in results {
            match downloaded {
                Some(bytes) => {
                    report.blobs_downloaded += 1;
                    report.bytes_downloaded += bytes;
                }
                None => report.blobs_cached += 1,
            }
        }

        let ref_name = reference.to_string();
        self.record(&ref_name, &media_type, &digest, bytes.len() as u64)
            .await?;
        let image = self
            .layout
            .resolve(Some(&ref_name), &self.options.platform)?;
        tracing::info!(
            reference = %reference,
            digest = %image.descriptor.digest,
            downloaded = report.blobs_downloaded,
            cached = report.blobs_cached,
            "pulled image"
        );
        Ok(PulledImage {
            reference: reference.clone(),
            layout: self.layout.clone(),
            image,
            report,
        })
    }

    fn base_url(&self, reference: &Reference) -> Result<String, RegistryError> {
        let registry = reference.registry();
        let plain = self.options.plain_http.iter().any(|r| r == registry);
        if plain && !is_loopback(registry) {
            return Err(RegistryError::PlainHttpRefused {
                registry: registry.to_owned(),
            });
        }
        let scheme = if plain { "http" } else { "https" };
        Ok(format!(
            "{scheme}://{}/v2/{}",
            reference.api_host(),
            reference.repository()
        ))
    }

    fn credentials(&self, registry: &str) -> Option<&Credentials> {
        self.options.credentials.get(registry).or_else(|| {
            self.options
                .docker_config
                .as_ref()
                .and_then(|c| c.get(registry))
        })
    }

    /// GETs a manifest (any supported kind), verifying it against `reference` when that
    /// is a digest and against the registry's `Docker-Content-Digest` otherwise.
    async fn fetch_manifest(
        &self,
        repo: &Repo<'_>,
        reference: &str,
    ) -> Result<(Vec<u8>, String, String), RegistryError> {
        let url = format!("{}/manifests/{reference}", repo.base);
        let accept = [
            MEDIA_OCI_MANIFEST,
            MEDIA_OCI_INDEX,
            MEDIA_DOCKER_MANIFEST,
            MEDIA_DOCKER_LIST,
        ]
        .join(", ");
        let limit = self.options.max_manifest_size;
        let (bytes, content_type, header_digest) = self
            .with_retries(|| async {
                let response = self
                    .get(repo, &url, Some(&accept), Target::Manifest(reference))
                    .await?;
                let content_type = header(&response, CONTENT_TYPE.as_str());
                let header_digest = header(&response, "docker-content-digest");
                let bytes =
                    read_capped(response, limit, repo.registry(), "manifest", reference).await?;
                Ok((bytes, content_type, header_digest))
            })
            .await?;
        let digest = sha256_digest(&bytes);
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_owned())
        } else {
            header_digest.filter(|d| d.starts_with("sha256:"))
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(RegistryError::DigestMismatch {
                    what: "manifest",
                    digest: expected,
                    actual: digest,
                });
            }
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            #[serde(default)]
            media_type: Option<String>,
            #[serde(default)]
            schema_version: Option<u32>,
        }
        let probe: Probe =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::InvalidDocument {
                what: "manifest",
                reference: repo.reference.to_string(),
                reason: e.to_string(),
            })?;
        let content_type = content_type
            .map(|c| c.split(';').next().unwrap_or_default().trim().to_owned())
            .unwrap_or_default();
        let media_type = probe.media_type.unwrap_or(content_type);
        let known = [
            MEDIA_OCI_MANIFEST,
            MEDIA_OCI_INDEX,
            MEDIA_DOCKER_MANIFEST,
            MEDIA_DOCKER_LIST,
        ];
        if !known.contains(&media_type.as_str()) || probe.schema_version != Some(2) {
            return Err(RegistryError::UnsupportedMediaType {
                what: "manifest",
                media_type,
                reference: repo.reference.to_string(),
            });
        }
        Ok((bytes, media_type, digest))
    }

    /// Whether the repository exists, asked through its tag list (distribution answers
    /// an unknown tag and an unknown repository alike on the manifest endpoint). Unsure
    /// answers count as "exists", so that the more specific error stands.
    async fn repository_exists(&self, repo: &Repo<'_>) -> bool {
        let url = format!("{}/tags/list", repo.base);
        !matches!(
            self.get(repo, &url, None, Target::Tags).await,
            Err(RegistryError::NameUnknown { .. })
        )
    }

    fn choose_platform(&self, reference: &str, index: &[u8]) -> Result<String, RegistryError> {
        #[derive(Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<Descriptor>,
        }
        let index: Index =
            serde_json::from_slice(index).map_err(|e| RegistryError::InvalidDocument {
                what: "image index",
                reference: reference.to_owned(),
                reason: e.to_string(),
            })?;
        let wanted = &self.options.platform;
        if let Some(found) = index
            .manifests
            .iter()
            .find(|d| d.platform.as_ref() == Some(wanted))
        {
            reference::validate_digest(&found.digest).map_err(|reason| {
                RegistryError::InvalidDocument {
                    what: "image index",
                    reference: reference.to_owned(),
                    reason,
                }
            })?;
            return Ok(found.digest.clone());
        }
        let available: Vec<String> = index
            .manifests
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .map(|p| format!("{}/{}", p.os, p.architecture))
            .collect();
        Err(RegistryError::NoPlatform {
            reference: reference.to_owned(),
            platform: format!("{}/{}", wanted.os, wanted.architecture),
            available: if available.is_empty() {
                "none".to_owned()
            } else {
                available.join(", ")
            },
        })
    }

    fn check_manifest(&self, reference: &str, manifest: &Manifest) -> Result<(), RegistryError> {
        let unsupported = |what, media_type: &str| RegistryError::UnsupportedMediaType {
            what,
            media_type: media_type.to_owned(),
            reference: reference.to_owned(),
        };
        let config = &manifest.config.media_type;
        if config != MEDIA_OCI_CONFIG && config != MEDIA_DOCKER_CONFIG {
            return Err(unsupported("config", config));
        }
        for (descriptor, what) in std::iter::once((&manifest.config, "config"))
            .chain(manifest.layers.iter().map(|l| (l, "layer")))
        {
            if what == "layer" && Compression::from_media_type(&descriptor.media_type).is_err() {
                return Err(unsupported("layer", &descriptor.media_type));
            }
            reference::validate_digest(&descriptor.digest).map_err(|reason| {
                RegistryError::InvalidDocument {
                    what: "manifest",
                    reference: reference.to_owned(),
                    reason,
                }
            })?;
            let limit = if what == "config" {
                self.options.max_manifest_size
            } else {
                self.options.max_blob_size
            };
            if descriptor.size > limit {
                return Err(RegistryError::TooLarge {
                    what,
                    digest: descriptor.digest.clone(),
                    size: descriptor.size,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// Downloads one blob into the cache unless it is there already. Returns the bytes
    /// downloaded, or `None` for a cache hit.
    async fn fetch_blob(
        &self,
        repo: &Repo<'_>,
        descriptor: &Descriptor,
        what: &'static str,
    ) -> Result<Option<u64>, RegistryError> {
        let path = self.blob_path(&descriptor.digest)?;
        if self.cached(&path, descriptor).await? {
            return Ok(None);
        }
        self.with_retries(|| self.download(repo, descriptor, what, &path))
            .await?;
        Ok(Some(descriptor.size))
    }

    /// True when `path` holds exactly the descriptor's content; a bad cached file is
    /// removed.
    async fn cached(&self, path: &Path, descriptor: &Descriptor) -> Result<bool, RegistryError> {
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

    async fn download(
        &self,
        repo: &Repo<'_>,
        descriptor: &Descriptor,
        what: &'static str,
        path: &Path,
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
    async fn store_document(&self, digest: &str, bytes: &[u8]) -> Result<(), RegistryError> {
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

    /// Lists the pulled manifest in the cache's `index.json` under `ref_name`, replacing
    /// what that name pointed to before.
    async fn record(
        &self,
        ref_name: &str,
        media_type: &str,
        digest: &str,
        size: u64,
    ) -> Result<(), OciError> {
        let _guard = self.index_lock.lock().await;
        let path = self.cache.join("index.json");
        let data = tokio::fs::read(&path)
            .await
            .map_err(|e| OciError::io("reading", &path, e))?;
        let mut index: serde_json::Value = serde_json::from_slice(&data)
            .map_err(|e| OciError::InvalidLayout(format!("index.json: {e}")))?;
        let entry = serde_json::json!({
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": { REF_NAME: ref_name },
        });
        let mut manifests: Vec<serde_json::Value> = index
            .get("manifests")
            .and_then(|m| m.as_array())
            .cloned()
            .unwrap_or_default();
        manifests.retain(|m| {
            m.pointer("/annotations/org.opencontainers.image.ref.name")
                .and_then(|v| v.as_str())
                != Some(ref_name)
        });
        manifests.push(entry);
        index["schemaVersion"] = 2.into();
        index["manifests"] = manifests.into();
        let bytes = serde_json::to_vec_pretty(&index)
            .map_err(|e| OciError::InvalidLayout(format!("index.json: {e}")))?;
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || write_atomic(&cache, &path, &bytes))
            .await
            .map_err(|e| OciError::io("writing", &self.cache, std::io::Error::other(e)))?
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, RegistryError> {
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

    async fn with_retries<T, F, Fut>(&self, mut attempt: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut delay = self.options.retry_backoff;
        let mut tries = 0;
        loop {
            match attempt().await {
                Err(e) if e.is_retryable() && tries < self.options.retries => {
                    tries += 1;
                    tracing::warn!(error = %e, attempt = tries, "transient registry failure; retrying");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                }
                other => return other,
            }
        }
    }

    /// One GET, answering an authentication challenge once.
    async fn get(
        &self,
        repo: &Repo<'_>,
        url: &str,
        accept: Option<&str>,
        target: Target<'_>,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut challenged = false;
        loop {
            let mut request = self.http.get(url);
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            if let Some(value) = self.auth_header(&repo.key()) {
                request = request.header(AUTHORIZATION, value);
            }
            let response = request
                .send()
                .await
                .map_err(|source| RegistryError::Unreachable {
                    registry: repo.registry().to_owned(),
                    source,
                })?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            if status == StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                self.authenticate(repo, &response).await?;
                continue;
            }
            return Err(self.status_error(repo, response, target).await);
        }
    }

    fn auth_header(&self, key: &str) -> Option<String> {
        self.auth.lock().ok().and_then(|m| m.get(key).cloned())
    }

    fn set_auth_header(&self, key: String, value: String) {
        if let Ok(mut map) = self.auth.lock() {
            map.insert(key, value);
        }
    }

    fn refused(&self, registry: &str) -> RegistryError {
        let reason = match self.credentials(registry) {
            Some(c) => format!("refused credentials for user {:?}", c.username),
            None => "requires credentials and none are configured for it".to_owned(),
        };
        RegistryError::Unauthorized {
            registry: registry.to_owned(),
            reason,
        }
    }

    async fn authenticate(
        &self,
        repo: &Repo<'_>,
        response: &reqwest::Response,
    ) -> Result<(), RegistryError> {
        let registry = repo.registry();
        let challenge = response
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(Challenge::parse);
        let credentials = self.credentials(registry);
        match challenge {
            Some(Challenge::Basic) => {
                let Some(credentials) = credentials else {
                    return Err(self.refused(registry));
                };
                self.set_auth_header(repo.key(), credentials.basic_header());
                Ok(())
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let mut url =
                    reqwest::Url::parse(&realm).map_err(|e| RegistryError::Unauthorized {
                        registry: registry.to_owned(),
                        reason: format!("sent an unusable token realm {realm:?}: {e}"),
                    })?;
                let realm_plain_ok = url.host_str().is_some_and(|h| {
                    is_loopback(h) && self.options.plain_http.iter().any(|r| r == registry)
                });
                if url.scheme() != "https" && !(url.scheme() == "http" && realm_plain_ok) {
                    return Err(RegistryError::Unauthorized {
                        registry: registry.to_owned(),
                        reason: format!("sent a token realm {realm:?} that is not HTTPS"),
                    });
                }
                let scope = scope
                    .unwrap_or_else(|| format!("repository:{}:pull", repo.reference.repository()));
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(service) = &service {
                        query.append_pair("service", service);
                    }
                    query.append_pair("scope", &scope);
                }
                let token = self
                    .with_retries(|| async {
                        let mut request = self.http.get(url.clone());
                        if let Some(c) = credentials {
                            request = request.header(AUTHORIZATION, c.basic_header());
                        }
                        let response =
                            request
                                .send()
                                .await
                                .map_err(|source| RegistryError::Unreachable {
                                    registry: registry.to_owned(),
                                    source,
                                })?;
                        let status = response.status();
                        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                            return Err(self.refused(registry));
                        }
                        if !status.is_success() {
                            return Err(RegistryError::Status {
                                registry: registry.to_owned(),
                                what: "a token".to_owned(),
                                status: status.as_u16(),
                                message: error_message(response).await,
                            });
                        }
                        let body = read_capped(response, 1 << 20, registry, "token", "").await?;
                        let token: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
                            RegistryError::Unauthorized {
                                registry: registry.to_owned(),
                                reason: format!("sent an unreadable token: {e}"),
                            }
                        })?;
                        token.token.or(token.access_token).ok_or_else(|| {
                            RegistryError::Unauthorized {
                                registry: registry.to_owned(),
                                reason: "sent no token".to_owned(),
                            }
                        })
                    })
                    .await?;
                self.set_auth_header(repo.key(), format!("Bearer {token}"));
                Ok(())
            }
            None => Err(RegistryError::Unauthorized {
                registry: registry.to_owned(),
                reason: "asks for an authentication scheme this client does not support".to_owned(),
            }),
        }
    }

    async fn status_error(
        &self,
        repo: &Repo<'_>,
        response: reqwest::Response,
        target: Target<'_>,
    ) -> RegistryError {
        let status = response.status();
        let registry = repo.registry().to_owned();
        let name = repo.reference.name();
        let body = read_limited(response).await;
        #[derive(Deserialize, Default)]
        struct Errors {
            #[serde(default)]
            errors: Vec<ErrorItem>,
        }
        #[derive(Deserialize)]
        struct ErrorItem {
            #[serde(default)]
            code: String,
            #[serde(default)]
            message: String,
        }
        let errors: Errors = serde_json::from_slice(&body).unwrap_or_default();
        let has = |code: &str| errors.errors.iter().any(|e| e.code == code);
        let message = errors
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        let message = if message.is_empty() {
            String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_owned()
        } else {
            message
        };
        match (status, target) {
            (StatusCode::UNAUTHORIZED, _) => self.refused(&registry),
            (StatusCode::FORBIDDEN, _) => RegistryError::Denied {
                registry,
                name,
                message,
            },
            (StatusCode::NOT_FOUND, Target::Manifest(_) | Target::Tags) if has("NAME_UNKNOWN") => {
                RegistryError::NameUnknown { name }
            }
            (StatusCode::NOT_FOUND, Target::Manifest(reference)) => {
                RegistryError::ManifestUnknown {
                    kind: if reference.starts_with("sha256:") {
                        "digest"
                    } else {
                        "tag"
                    },
                    reference: reference.to_owned(),
                    name,
                }
            }
            (StatusCode::NOT_FOUND, Target::Blob(digest)) => RegistryError::BlobUnknown {
                digest: digest.to_owned(),
                name,
            },
            (_, target) => RegistryError::Status {
                registry,
                what: match target {
                    Target::Tags => format!("the tag list of {name}"),
                    Target::Manifest(r) => format!("manifest {r} of {name}"),
                    Target::Blob(d) => format!("blob {d} of {name}"),
                },
                status: status.as_u16(),
                message,
            },
        }
    }
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .map(str::to_owned)
}

async fn read_limited(mut response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_ERROR_BODY {
            body.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    body
}

async fn error_message(response: reqwest::Response) -> String {
    let body = read_limited(response).await;
    String::from_utf8_lossy(&body[..body.len().min(200)])
        .trim()
        .to_owned()
}

async fn read_capped(
    mut response: reqwest::Response,
    limit: u64,
    registry: &str,
    what: &'static str,
    digest: &str,
) -> Result<Vec<u8>, RegistryError> {
    let too_large = |size| RegistryError::TooLarge {
        what,
        digest: digest.to_owned(),
        size,
        limit,
    };
    if let Some(length) = response.content_length() {
        if length > limit {
            return Err(too_large(length));
        }
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|source| RegistryError::Transfer {
            registry: registry.to_owned(),
            what: format!("{what} {digest}"),
            source,
        })?
    {
        body.extend_from_slice(&chunk);
        if body.len() as u64 > limit {
            return Err(too_large(body.len() as u64));
        }
    }
    Ok(body)
}

fn hex_digest(hasher: Sha256) -> String {
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn sha256_digest(bytes: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(bytes);
    hex_digest(hasher)
}

/// True for `localhost`, 127.0.0.0/8 and ::1, with or without a port.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else if registry.matches(':').count() > 1 {
        registry
    } else {
        registry.split(':').next().unwrap_or_default()
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Writes `path` through a temporary file in `cache/tmp` and a rename.
fn write_atomic(cache: &Path, path: &Path, bytes: &[u8]) -> Result<(), OciError> {
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
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    fn new(cache: &Path, digest: &str) -> Self {
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

    async fn persist(mut self, to: &Path) -> Result<(), RegistryError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for yes in [
            "127.0.0.1:5000",
            "127.1.2.3",
            "localhost:80",
            "[::1]:5000",
            "::1",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "10.0.0.1:5000",
            "example.com",
            "[::2]:5000",
            "localhost.example",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn plain_http_is_refused_for_remote_registries() {
        let dir = tempfile::tempdir().unwrap();
        let options = RegistryOptions {
            plain_http: vec!["registry.example.com".into()],
            ..Default::default()
        };
        let err = RegistryClient::new(dir.path(), options).unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
    }

    #[test]
    fn transient_failures_are_retryable_and_client_errors_are_not() {
        let status = |status| RegistryError::Status {
            registry: "r".into(),
            what: "w".into(),
            status,
            message: String::new(),
        };
        assert!(status(503).is_retryable());
        assert!(status(429).is_retryable());
        assert!(!status(400).is_retryable());
        assert!(!RegistryError::NameUnknown { name: "x".into() }.is_retryable());
    }
}
