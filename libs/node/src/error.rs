//! Errors of the node: each says what was wrong and maps onto one gRPC status.

/// Why a node operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A request field is wrong.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// No such sandbox or template.
    #[error("{what} {name} not found")]
    NotFound { what: &'static str, name: String },
    /// The request is valid but the object is not in a state that allows it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The node cannot fit the request; says what ran out.
    #[error("node is full: {0}")]
    ResourceExhausted(String),
    /// A dependency (database, object store, VMM) is not available; a retry may work.
    #[error("{context}: {message}")]
    Unavailable {
        context: &'static str,
        message: String,
    },
    /// The guest misbehaved or died.
    #[error("sandbox {id}: {message}")]
    Guest { id: String, message: String },
    /// Local I/O failed.
    #[error("{context} ({path}): {source}")]
    Io {
        context: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An invariant broke.
    #[error("{0}")]
    Internal(String),
}

impl NodeError {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<std::path::PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            context,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn not_found(what: &'static str, name: impl std::fmt::Display) -> Self {
        Self::NotFound {
            what,
            name: name.to_string(),
        }
    }
}
