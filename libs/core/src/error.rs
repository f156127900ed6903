//! The one error type of the domain: a value that breaks a rule.

use crate::SandboxState;

/// Why a domain value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// A field's value breaks its rule.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, as named in the API (`resources.vcpu`, `template`).
        field: &'static str,
        /// What is wrong with it, safe to show to API clients.
        reason: String,
    },
    /// A sandbox state change that the lifecycle does not allow.
    #[error("sandbox cannot go from {from} to {to}")]
    InvalidTransition {
        /// The current state.
        from: SandboxState,
        /// The refused next state.
        to: SandboxState,
    },
}

impl CoreError {
    /// Builds an [`CoreError::Invalid`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// The field that was rejected, if the error is about one field.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::Invalid { field, .. } => Some(field),
            Self::InvalidTransition { .. } => None,
        }
    }
}

/// An error and its causes on one line (`outer: cause: root cause`), each cause added
/// only when the text so far does not already contain it: the message a user reads in a
/// task status or a sandbox's `message`.
pub fn describe(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// A short random id that ties an error a client is shown to the log line that holds its
/// details (host paths, tool output, causes), which clients must not see.
pub fn error_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..12].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_ids_are_short_and_distinct() {
        let (a, b) = (error_id(), error_id());
        assert_eq!(a.len(), 12);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
