//! Errors of the registry client: each says what to fix (the reference, the credentials,
//! the registry) and [`RegistryError::is_retryable`] tells transient failures apart.

use std::path::PathBuf;

/// A failure to pull an image from a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The image reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    /// Plain HTTP was asked for a registry that is not on a loopback address.
    #[error(
        "plain HTTP is only allowed for registries on a loopback address, not {registry}; \
         use HTTPS"
    )]
    PlainHttpRefused { registry: String },
    /// The registry could not be reached (connection refused, reset, timed out).
    #[error("cannot reach registry {registry}")]
    Unreachable {
        registry: String,
        #[source]
        source: reqwest::Error,
    },
    /// A response body broke off mid-transfer.
    #[error("download of {what} from {registry} broke off")]
    Transfer {
        registry: String,
        what: String,
        #[source]
        source: reqwest::Error,
    },
    /// The repository does not exist in the registry.
    #[error("image {name} not found (the registry knows no such repository)")]
    NameUnknown { name: String },
    /// The tag or digest does not exist in the repository.
    #[error("{kind} {reference} not found in {name}")]
    ManifestUnknown {
        kind: &'static str,
        reference: String,
        name: String,
    },
    /// A blob the manifest lists is missing from the registry.
    #[error("blob {digest} not found in {name}")]
    BlobUnknown { digest: String, name: String },
    /// The registry wants credentials and has none, or refused the ones it got.
    #[error("registry {registry} {reason}")]
    Unauthorized { registry: String, reason: String },
    /// The registry refused access with the credentials it accepted (403).
    #[error("registry {registry} denied access to {name}: {message}")]
    Denied {
        registry: String,
        name: String,
        message: String,
    },
    /// Any other unexpected HTTP status.
    #[error("registry {registry} answered {status} for {what}: {message}")]
    Status {
        registry: String,
        what: String,
        status: u16,
        message: String,
    },
    /// A manifest, config or layer whose media type this client cannot use.
    #[error("unsupported media type {media_type:?} for the {what} of {reference}")]
    UnsupportedMediaType {
        what: &'static str,
        media_type: String,
        reference: String,
    },
    /// Content does not hash to its digest (or is not of its declared size).
    #[error("digest mismatch for {what} {digest}: the registry sent content hashing to {actual}")]
    DigestMismatch {
        what: &'static str,
        digest: String,
        actual: String,
    },
    /// Content is larger than a limit or than its descriptor says.
    #[error("{what} {digest} is too large: {size} bytes, limit {limit}")]
    TooLarge {
        what: &'static str,
        digest: String,
        size: u64,
        limit: u64,
    },
    /// A multi-platform image has no manifest for the wanted platform.
    #[error("{reference} has no image for {platform} (available: {available})")]
    NoPlatform {
        reference: String,
        platform: String,
        available: String,
    },
    /// A manifest or index that does not parse.
    #[error("invalid {what} for {reference}: {reason}")]
    InvalidDocument {
        what: &'static str,
        reference: String,
        reason: String,
    },
    /// A Docker `config.json` that cannot be read.
    #[error("cannot read registry credentials from {path}: {reason}", path = path.display())]
    Credentials { path: PathBuf, reason: String },
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
    /// A cache file operation failed.
    #[error("{context} ({path})", path = path.display())]
    Cache {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RegistryError {
    /// True for failures that may go away on their own: the registry unreachable, a
    /// transfer cut off, 5xx and 429 answers. Never for 4xx or bad content.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Transfer { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => false,
        }
    }

    /// True when the image or tag does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::NameUnknown { .. } | Self::ManifestUnknown { .. } | Self::BlobUnknown { .. }
        )
    }

    pub(crate) fn cache(
        context: &'static str,
        path: impl Into<PathBuf>,
        e: std::io::Error,
    ) -> Self {
        Self::Cache {
            context,
            path: path.into(),
            source: e,
        }
    }
}
