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
mod cache;
mod error;
pub mod reference;
mod transport;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use reqwest::header::CONTENT_TYPE;
use serde::Deserialize;

pub use auth::{Credentials, DockerConfig};
pub use error::RegistryError;
pub use reference::Reference;

use crate::compression::Compression;
use crate::error::OciError;
use crate::image::{Descriptor, Manifest, OciLayout, Platform, ResolvedImage};
use cache::{sha256_digest, write_atomic};
use transport::{header, read_capped};

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
    /// Extra trusted CA certificates (PEM), for registries with a private CA; the
    /// system's roots are trusted too.
    pub root_certificates: Vec<Vec<u8>>,
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
            root_certificates: Vec::new(),
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

/// An image resolved in its registry: the platform's manifest, verified, not yet pulled.
#[derive(Debug, Clone)]
pub struct RemoteImage {
    /// The reference as resolved (normalised).
    pub reference: Reference,
    /// The manifest's digest: the image's identity.
    pub digest: String,
    /// The manifest's media type.
    pub media_type: String,
    /// The manifest as the registry sent it.
    document: Vec<u8>,
    /// The parsed manifest.
    pub manifest: Manifest,
}

impl RemoteImage {
    /// Compressed bytes of all layers.
    pub fn layer_bytes(&self) -> u64 {
        self.manifest.layers.iter().map(|l| l.size).sum()
    }
}

/// Receives a pull's progress. Calls come from concurrent downloads, in any order.
pub trait PullProgress: Send + Sync {
    /// `n` more bytes of a blob arrived (a retried download reports its bytes again).
    fn bytes(&self, n: u64) {
        let _ = n;
    }
    /// A layer of `size` bytes is in the cache, `downloaded` or found there.
    fn layer_done(&self, size: u64, downloaded: bool) {
        let _ = (size, downloaded);
    }
}

/// Progress nobody watches.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl PullProgress for NoProgress {}

/// A registry client with a content-addressed blob cache.
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    options: RegistryOptions,
    cache: PathBuf,
    layout: OciLayout,
    /// `Authorization` values per `registry/repository` (tokens are scoped to one).
    auth: Mutex<HashMap<String, String>>,
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
        let mut builder = reqwest::Client::builder();
        for pem in &options.root_certificates {
            let certificate = reqwest::Certificate::from_pem(pem).map_err(RegistryError::Client)?;
            builder = builder.add_root_certificate(certificate);
        }
        let http = builder
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
        let remote = self.resolve(reference).await?;
        self.fetch(&remote, &NoProgress).await
    }

    /// Resolves `reference` to the manifest of the configured platform (fetching an index
    /// first when the reference names one), without downloading any layer. The manifest
    /// is verified and checked: supported media types, valid digests, sizes in limits.
    pub async fn resolve(&self, reference: &Reference) -> Result<RemoteImage, OciError> {
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
        Ok(RemoteImage {
            reference: reference.clone(),
            digest,
            media_type,
            document: bytes,
            manifest,
        })
    }

    /// Downloads a resolved image's config and layers into the cache (blobs already
    /// there are verified, not fetched), reporting progress to `progress`.
    pub async fn fetch(
        &self,
        remote: &RemoteImage,
        progress: &dyn PullProgress,
    ) -> Result<PulledImage, OciError> {
        let reference = &remote.reference;
        let repo = Repo {
            reference,
            base: self.base_url(reference)?,
        };
        self.store_document(&remote.digest, &remote.document)
            .await?;
        let manifest = &remote.manifest;
        let blobs: Vec<(&Descriptor, &'static str)> = std::iter::once((&manifest.config, "config"))
            .chain(manifest.layers.iter().map(|l| (l, "layer")))
            .collect();
        let repo = &repo;
        // The futures are made up front rather than by a closure in the stream, which
        // keeps the whole pull `Send` (closures over borrowed data in stream adapters
        // trip the compiler's higher-ranked lifetime inference).
        let downloads: Vec<_> = blobs
            .into_iter()
            .map(|(descriptor, kind)| self.fetch_reported(repo, descriptor, kind, progress))
            .collect();
        let results: Vec<Option<u64>> = stream::iter(downloads)
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
        let image = self
            .record_and_resolve(
                &ref_name,
                &remote.media_type,
                &remote.digest,
                remote.document.len() as u64,
            )
            .await?;
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

    /// [`Self::fetch_blob`], then the layer reported done. (A method rather than an
    /// async closure, so that the future stays `Send` for callers that spawn a pull.)
    async fn fetch_reported(
        &self,
        repo: &Repo<'_>,
        descriptor: &Descriptor,
        kind: &'static str,
        progress: &dyn PullProgress,
    ) -> Result<Option<u64>, RegistryError> {
        let fetched = self.fetch_blob(repo, descriptor, kind, progress).await?;
        if kind == "layer" {
            progress.layer_done(descriptor.size, fetched.is_some());
        }
        Ok(fetched)
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
