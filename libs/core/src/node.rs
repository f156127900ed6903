//! The state of a node as the scheduler sees it.

use std::fmt;

/// The state of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Heartbeating and accepting sandboxes.
    Ready,
    /// Heartbeating, accepting no new sandboxes.
    Draining,
    /// Missed its heartbeats.
    Lost,
}

impl NodeState {
    /// The uppercase name used in the API (`READY`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Ready => "READY",
            Self::Draining => "DRAINING",
            Self::Lost => "LOST",
        }
    }

    /// New sandboxes may be placed on the node.
    pub fn accepts_sandboxes(&self) -> bool {
        matches!(self, Self::Ready)
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
