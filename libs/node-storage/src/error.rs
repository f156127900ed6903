//! Errors of the template cache and of copy-on-write clones.

use std::time::Duration;

use crate::CowMethod;

/// Errors of [`crate::TemplateCache`]. Every variant about one template names its object
/// key, so a node's log line or a failed create says which template is at fault.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The object store failed (not found, access denied, backend down, bad key).
    #[error("template {key}: {source}")]
    Store {
        key: String,
        #[source]
        source: nanobox_store::StoreError,
    },
    /// The sidecar beside the ext4 is missing a sane description of it.
    #[error("template {key}: invalid sidecar {sidecar}: {reason}")]
    Sidecar {
        key: String,
        sidecar: String,
        reason: String,
    },
    /// The downloaded ext4 does not hash to the sidecar's sha256; nothing was kept.
    #[error("template {key}: downloaded content has sha256 {actual}, the sidecar says {expected}")]
    DigestMismatch {
        key: String,
        expected: String,
        actual: String,
    },
    /// The downloaded ext4 does not have the sidecar's size; nothing was kept.
    #[error("template {key}: downloaded {actual} bytes, the sidecar says {expected}")]
    SizeMismatch {
        key: String,
        expected: u64,
        actual: u64,
    },
    /// The download (sidecar, ext4 and verification) took longer than allowed.
    #[error("template {key}: download did not finish within {after:?}")]
    Timeout { key: String, after: Duration },
    /// Local file I/O in the cache directory failed.
    #[error("template cache: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl CacheError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether trying again later may succeed (the store's transient failures, time-outs).
    /// Digest and size mismatches are not: the object itself is wrong.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store { source, .. } => source.is_retryable(),
            Self::Timeout { .. } => true,
            _ => false,
        }
    }
}

/// Errors of [`crate::clone_rootfs`].
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// The method cannot work here (reflink on a file system without it, or across file
    /// systems; qcow2 with headroom). Auto mode moves on to the next method.
    #[error("{method} clone not possible: {reason}")]
    Unsupported { method: CowMethod, reason: String },
    /// The destination already exists; clones never overwrite.
    #[error("clone destination {0} already exists")]
    DestinationExists(String),
    /// An external tool (qemu-img, resize2fs) failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: &'static str,
        status: String,
        stderr: String,
    },
    /// An external tool did not finish in time and was killed.
    #[error("{tool} did not finish within {after:?} and was killed")]
    ToolTimeout { tool: &'static str, after: Duration },
    /// Local file I/O failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl CowError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
