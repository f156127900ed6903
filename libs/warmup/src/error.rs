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
    /// What a client may be told about this error: its own text when that holds only
    /// what the client sent or the image holds, else (local I/O, tool output, storage
    /// and database failures, which name host paths and internals) what was being done
    /// and an id under which the details are logged here, once. The one place that
    /// decides, for gRPC statuses and for failed warmups' messages alike.
    pub fn public_message(&self) -> String {
        let hidden = match self {
            Self::Io { context, .. } => Some(*context),
            Self::Internal(_) => Some("the template-builder"),
            Self::Store(_) => Some("the object store"),
            Self::Metadata(_) => Some("the metadata database"),
            Self::Image(nanobox_oci::OciError::Io { context, .. }) => Some(*context),
            Self::Image(nanobox_oci::OciError::Tool { tool, .. }) => Some(*tool),
            _ => None,
        };
        match hidden {
            None => nanobox_core::describe(self),
            Some(what) => {
                let id = nanobox_core::error_id();
                tracing::error!(error_id = %id, error = %nanobox_core::describe(self), "template-builder error");
                format!("{what} failed (error id {id}; the template-builder's log has the details)")
            }
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_never_see_host_paths_or_tool_output() {
        let io = WarmupError::Io {
            context: "creating a build directory",
            path: "/var/lib/secret/builds".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        let tool = WarmupError::Image(nanobox_oci::OciError::Tool {
            tool: "mkfs.ext4",
            stderr: "could not open /var/lib/secret/builds/.x.tmp".to_owned(),
        });
        for (err, what) in [(io, "creating a build directory"), (tool, "mkfs.ext4")] {
            let shown = err.public_message();
            assert!(!shown.contains("/var/lib/secret"), "{shown}");
            assert!(
                shown.starts_with(&format!("{what} failed (error id ")),
                "{shown}"
            );
        }
        // What the client sent or the image holds is shown as it is.
        let invalid = WarmupError::InvalidArgument {
            field: "image",
            reason: "not a reference".to_owned(),
        };
        assert_eq!(invalid.public_message(), "invalid image: not a reference");
        let hostile = WarmupError::Image(nanobox_oci::OciError::UnsafePath {
            entry: "../x".to_owned(),
            reason: "'..' component",
        });
        assert_eq!(
            hostile.public_message(),
            "entry \"../x\": unsafe path ('..' component)"
        );
    }
}
