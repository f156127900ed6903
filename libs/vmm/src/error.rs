use std::path::PathBuf;

/// Errors of the VM backends.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The spec cannot be run (bad id, missing kernel, zero memory, ...).
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    /// A file the VM needs is missing or unreadable.
    #[error("{what} {path} is not usable")]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The VMM binary could not be started.
    #[error("cannot start {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    /// The VMM exited (before or while doing what was asked).
    #[error("the VMM exited: {0}")]
    Exited(String),
    /// The VMM's control channel (QMP, Firecracker API) failed or refused a command.
    #[error("VMM control: {0}")]
    Control(String),
    /// The Firecracker API refused a request: `fault_message` is Firecracker's own reason.
    #[error("Firecracker refused {request} ({status}): {fault_message}")]
    FirecrackerApi {
        /// Method and path, e.g. `PUT /drives/rootfs`.
        request: String,
        /// The HTTP status of the reply.
        status: u16,
        fault_message: String,
    },
    /// The backend cannot do this (see [`crate::Capabilities`]).
    #[error("{backend} does not support {operation}")]
    Unsupported {
        backend: &'static str,
        operation: &'static str,
    },
    /// The guest agent did not come up or its connection failed.
    #[error("guest agent")]
    Agent(#[from] nanobox_guest_client::AgentError),
    /// Waiting for the VM timed out.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
    #[error("I/O error: {context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl VmmError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
