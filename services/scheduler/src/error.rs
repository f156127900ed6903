//! The scheduler's errors and the gRPC status each becomes. Messages name the sandbox,
//! template, node or field concerned and never carry Debug text or host paths.

use nanobox_core::{SandboxId, SandboxState, TemplateName, TemplateState};
use nanobox_store::MetadataError;
use tonic::Status;

/// Why a scheduler call failed.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Invalid(#[from] nanobox_proto::convert::ConvertError),
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("sandbox {0} not found")]
    SandboxNotFound(SandboxId),
    #[error("sandbox {0} was already deleted")]
    SandboxGone(SandboxId),
    #[error("template {0} not found")]
    TemplateNotFound(TemplateName),
    #[error("template {name} is not ready ({state}); wait for its warmup to finish")]
    TemplateNotReady {
        name: TemplateName,
        state: TemplateState,
    },
    #[error("sandbox {id} is {state}; {what} needs it RUNNING")]
    NotRunning {
        id: SandboxId,
        state: SandboxState,
        what: &'static str,
    },
    /// Exec or keepalive on a paused sandbox: it has no VM until it is resumed.
    #[error("sandbox {id} is paused; resume it first ({what} needs it RUNNING)")]
    Paused { id: SandboxId, what: &'static str },
    #[error("sandbox {id} is {state}; resume needs it PAUSED")]
    NotPaused { id: SandboxId, state: SandboxState },
    /// The node holding a paused sandbox's snapshot cannot be reached. Snapshots are
    /// node-local until the snapshot store lands, so no other node can resume it.
    #[error(
        "sandbox {id} is paused on node {node}, which is {why}; its snapshot is on that \
         node's disk, so it can be resumed once the node is back"
    )]
    SnapshotNodeUnavailable {
        id: SandboxId,
        node: String,
        why: &'static str,
    },
    #[error(transparent)]
    NoCapacity(#[from] nanobox_scheduler::placement::NoNode),
    /// A call to a node agent failed; the node's own status code is kept.
    #[error("node {node}: {message}")]
    Node {
        node: String,
        code: tonic::Code,
        message: String,
    },
    #[error("metadata database: {0}")]
    Store(#[from] MetadataError),
}

impl SchedulerError {
    /// Wraps a status returned by (or on the way to) node `node`.
    pub fn node(node: &str, status: &Status) -> Self {
        Self::Node {
            node: node.to_owned(),
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

impl From<SchedulerError> for Status {
    fn from(err: SchedulerError) -> Self {
        let message = err.to_string();
        match err {
            SchedulerError::Invalid(_) | SchedulerError::InvalidField { .. } => {
                Status::invalid_argument(message)
            }
            SchedulerError::SandboxNotFound(_)
            | SchedulerError::SandboxGone(_)
            | SchedulerError::TemplateNotFound(_) => Status::not_found(message),
            SchedulerError::TemplateNotReady { .. }
            | SchedulerError::NotRunning { .. }
            | SchedulerError::Paused { .. }
            | SchedulerError::NotPaused { .. } => Status::failed_precondition(message),
            SchedulerError::SnapshotNodeUnavailable { .. } => Status::unavailable(message),
            SchedulerError::NoCapacity(_) => Status::resource_exhausted(message),
            SchedulerError::Node { code, .. } => match code {
                // A node that cannot be reached or timed out is the caller's UNAVAILABLE;
                // its own answers keep their codes.
                tonic::Code::Unknown | tonic::Code::Cancelled => Status::unavailable(message),
                code => Status::new(code, message),
            },
            // The database's own words name sockets, hosts and SQL: logged under an id.
            SchedulerError::Store(e) => {
                let id = nanobox_core::error_id();
                tracing::error!(error_id = %id, error = %nanobox_core::describe(&e), "metadata store failure");
                let shown = format!(
                    "the metadata database failed (error id {id}; the scheduler's log has the details)"
                );
                if e.is_retryable() {
                    Status::unavailable(shown)
                } else {
                    Status::internal(shown)
                }
            }
        }
    }
}
