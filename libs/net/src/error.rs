//! The crate's error type: one enum whose variants the node agent can branch on.

use std::path::PathBuf;

/// What went wrong setting up or tearing down sandbox networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The node configuration is unusable (bad names, a subnet too small, ...).
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),

    /// A sandbox id that cannot name a namespace.
    #[error("invalid sandbox id {0:?}: 1-64 characters of [a-z0-9-]")]
    InvalidId(String),

    /// A tenant scope that `nanobox_core::NetworkSpec` would not have accepted.
    #[error("invalid tenant scope {0:?}: 1-63 characters of [A-Za-z0-9._-]")]
    InvalidScope(String),

    /// The sandbox already has a network; destroy it first.
    #[error("sandbox {0} already has a network")]
    AlreadyExists(String),

    /// Every address of the range a sandbox leases from is taken: the unscoped range,
    /// its tenant scope's block, or every scope block (`subnet` names which).
    #[error("no free address left in {subnet}")]
    Exhausted { subnet: String },

    /// An external command (`nft`, `tc`) failed; its stderr says why.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    /// A netlink request failed.
    #[error("netlink: {what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },

    /// A system call or file operation failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// The lease file exists but cannot be used as it is.
    #[error("lease file {path}: {message}")]
    State { path: PathBuf, message: String },
}

impl NetError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn netlink(what: impl Into<String>, source: rtnetlink::Error) -> Self {
        Self::Netlink {
            what: what.into(),
            source,
        }
    }

    /// True when the subnet has no free address for the sandbox: the node is full (for
    /// sandboxes of its kind), not broken.
    pub fn is_exhausted(&self) -> bool {
        matches!(self, Self::Exhausted { .. })
    }
}
