//! Errors of the warmup pipeline.

use std::path::PathBuf;

use nanobox_core::TemplateName;

/// Why a warmup request or task failed.
#[derive(Debug, thiserror::Error)]
pub enum WarmupError {
    /// A request field is wrong; `reason` says how.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// No template and no warmup of that name.
    #[error("template {0} not found")]
    NotFound(TemplateName),
    /// The template still has sandboxes or pool VMs, and the delete was not forced.
    #[error(
        "template {template} is in use by {sandboxes} sandbox(es) and {pool_vms} pool VM(s); \
         delete it with force to remove it anyway (its sandboxes keep running, and nodes \
         retire its pools)"
    )]
    InUse {
        template: TemplateName,
        sandboxes: u64,
        pool_vms: u64,
    },
    /// Pulling or converting the image failed (registry errors, hostile layers, limits).
    #[error(transparent)]
    Image(#[from] nanobox_oci::OciError),
    /// The object store failed.
    #[error("object store: {0}")]
    Store(#[from] nanobox_store::StoreError),
    /// The metadata database failed.
    #[error("metadata database: {0}")]
    Metadata(#[from] nanobox_store::MetadataError),
    /// Local file system work failed.
    #[error("{context} ({path}): {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An invariant broke; the message says which.
    #[error("{0}")]
    Internal(String),
}

impl WarmupError {
    /// Whether the cause is on the infrastructure side (database, object store) rather
    /// than in the request or the image: a retry may succeed.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Metadata(e) => e.is_retryable(),
            Self::Store(_) => true,
            _ => false,
        }
    }
}
