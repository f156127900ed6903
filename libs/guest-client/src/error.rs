use nanobox_agent_protocol::pb::ErrorCode;

/// Errors talking to a guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The connection to the agent is gone (VM stopped, killed, or the channel broke).
    #[error("connection to the guest agent closed: {0}")]
    Disconnected(String),
    /// The agent did not answer in time.
    #[error("guest agent did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The guest broke the protocol; the connection has been closed.
    #[error("guest agent protocol violation: {0}")]
    Protocol(String),
    /// The agent refused or failed the operation.
    #[error("guest agent error ({code:?}): {message}")]
    Remote { code: ErrorCode, message: String },
    /// The request was invalid before anything was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Local I/O failed (reading a file to upload, writing a download).
    #[error("local I/O error")]
    Io(#[from] std::io::Error),
}

impl AgentError {
    /// True when the failure is the guest's answer rather than the channel: the connection
    /// is still usable afterwards.
    pub fn is_remote(&self) -> bool {
        matches!(self, Self::Remote { .. })
    }

    /// The guest's error code, when it was the guest that refused.
    pub fn remote_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}
