//! Errors of the object store.

/// Errors of an [`crate::ObjectStore`]. Callers branch on the variants: `NotFound` is an
/// ordinary answer, `AccessDenied` is a configuration problem, and [`StoreError::is_retryable`]
/// says whether trying again later may help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key (or list prefix) breaks the key rules (see [`crate::ObjectKey`]).
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    /// No object under this key.
    #[error("object {key} not found")]
    NotFound { key: String },
    /// A ranged read asked for bytes the object does not have.
    #[error("range {offset}+{len} is outside object {key} of {size} bytes")]
    RangeOutOfBounds {
        key: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A ranged read asked for more than [`crate::MAX_RANGE_LEN`] bytes at once.
    #[error("range of {len} bytes exceeds the limit of {max} bytes")]
    RangeTooLarge { len: u64, max: u64 },
    /// The content does not hash to what was expected (or what was recorded at upload).
    #[error("object {key} has sha256 {actual}, expected {expected}")]
    DigestMismatch {
        key: String,
        expected: String,
        actual: String,
    },
    /// The store refused our credentials or the operation (wrong secret, no permission).
    #[error("access denied by the object store during {operation} of {key}: {message}")]
    AccessDenied {
        operation: &'static str,
        key: String,
        message: String,
    },
    /// The store's configuration is unusable.
    #[error("invalid object store configuration: {0}")]
    Config(String),
    /// The remote store failed or could not be reached.
    #[error("object store {operation} of {key} failed: {message}")]
    Backend {
        operation: &'static str,
        key: String,
        message: String,
        retryable: bool,
    },
    /// Local file I/O failed.
    #[error("I/O error: {context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether trying the same operation again later may succeed (timeouts, throttling,
    /// server errors, dropped connections). Not-found, bad keys, bad ranges, digest
    /// mismatches and refused credentials are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Backend { retryable, .. } => *retryable,
            Self::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }

    /// Whether this is [`StoreError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert!(StoreError::NotFound { key: "a".into() }.is_not_found());
        assert!(!StoreError::NotFound { key: "a".into() }.is_retryable());
        let backend = |retryable| StoreError::Backend {
            operation: "put",
            key: "a".into(),
            message: "503".into(),
            retryable,
        };
        assert!(backend(true).is_retryable());
        assert!(!backend(false).is_retryable());
        let io = |kind| StoreError::io("x", std::io::Error::from(kind));
        assert!(io(std::io::ErrorKind::TimedOut).is_retryable());
        assert!(!io(std::io::ErrorKind::PermissionDenied).is_retryable());
    }
}
