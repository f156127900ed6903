//! Sandboxes: their lifecycle states and what a caller asks for when creating one.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::exec::validate_env;
use crate::{CoreError, NetworkSpec, Resources, TemplateName};

/// The longest lifetime a sandbox can be given at once (keepalive extends it).
pub const MAX_SANDBOX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// The most metadata entries a sandbox may carry.
pub const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_KEY_LEN: usize = 63;
const MAX_METADATA_VALUE_LEN: usize = 256;

/// The lifecycle state of a sandbox.
///
/// ```text
/// Pending -> Starting -> Running -> Stopping -> Stopped
///                 ^         |  ^
///                 |         v  |
///                 +------ Paused
/// ```
/// Failed is reachable from every live state; Lost from the states in which a node holds
/// the VM or the snapshot, and a Lost sandbox may come back Running (or Paused) when its
/// node reports it again. A resume that fails leaves it Paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SandboxState {
    /// Accepted, waiting for a node.
    Pending,
    /// Placed on a node, booting or restoring.
    Starting,
    /// Booted; commands can run.
    Running,
    /// In a snapshot; holds no node resources.
    Paused,
    /// Being destroyed.
    Stopping,
    /// Destroyed. Terminal.
    Stopped,
    /// Could not start or crashed.
    Failed,
    /// Its node stopped reporting it.
    Lost,
}

impl SandboxState {
    /// Every state, in lifecycle order.
    pub const ALL: [Self; 8] = [
        Self::Pending,
        Self::Starting,
        Self::Running,
        Self::Paused,
        Self::Stopping,
        Self::Stopped,
        Self::Failed,
        Self::Lost,
    ];

    /// Whether the lifecycle allows going from `self` to `next`. Staying in the same state
    /// is not a transition and returns false.
    pub fn can_transition_to(self, next: Self) -> bool {
        use SandboxState::*;
        match (self, next) {
            (Pending, Starting | Stopping | Stopped | Failed) => true,
            // A resume that failed leaves the sandbox in its snapshot, paused again.
            (Starting, Running | Paused | Stopping | Failed | Lost) => true,
            (Running, Paused | Stopping | Failed | Lost) => true,
            // Resuming goes through Starting (the restore); deleting a paused sandbox only
            // deletes its snapshot, hence straight to Stopped as well. Its node may stop
            // reporting it (the snapshot is gone): Lost.
            (Paused, Starting | Stopping | Stopped | Failed | Lost) => true,
            (Stopping, Stopped | Failed | Lost) => true,
            // A failed sandbox may still hold a VM or disk to clean up.
            (Failed, Stopping | Stopped) => true,
            // The node came back and reports the sandbox, or the scheduler gives up on it.
            (Lost, Running | Paused | Stopping | Stopped | Failed) => true,
            _ => false,
        }
    }

    /// Checks a transition, returning the new state.
    pub fn transition_to(self, next: Self) -> Result<Self, CoreError> {
        if self.can_transition_to(next) {
            Ok(next)
        } else {
            Err(CoreError::InvalidTransition {
                from: self,
                to: next,
            })
        }
    }

    /// No transition leaves this state.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Stopped)
    }

    /// The sandbox holds (or is about to hold) a VM on a node.
    pub fn holds_node_resources(self) -> bool {
        matches!(self, Self::Starting | Self::Running | Self::Stopping)
    }

    /// The uppercase name used in the API (`RUNNING`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Starting => "STARTING",
            Self::Running => "RUNNING",
            Self::Paused => "PAUSED",
            Self::Stopping => "STOPPING",
            Self::Stopped => "STOPPED",
            Self::Failed => "FAILED",
            Self::Lost => "LOST",
        }
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a caller asks for when creating a sandbox, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    /// The template to boot.
    pub template: TemplateName,
    /// Its size.
    pub resources: Resources,
    /// Its network.
    pub network: NetworkSpec,
    /// Environment variables for every command.
    pub env: BTreeMap<String, String>,
    /// Its lifetime; `None` takes the server default.
    pub timeout: Option<Duration>,
    /// Caller labels.
    pub metadata: BTreeMap<String, String>,
}

impl SandboxSpec {
    /// A spec with defaults for everything but the template.
    pub fn new(template: TemplateName) -> Self {
        Self {
            template,
            resources: Resources::default(),
            network: NetworkSpec::default(),
            env: BTreeMap::new(),
            timeout: None,
            metadata: BTreeMap::new(),
        }
    }

    /// Checks the parts that the field types do not check themselves: environment names,
    /// timeout, metadata sizes.
    pub fn validate(&self) -> Result<(), CoreError> {
        validate_env("env", &self.env)?;
        if let Some(timeout) = self.timeout {
            if timeout.is_zero() || timeout > MAX_SANDBOX_TIMEOUT {
                return Err(CoreError::invalid(
                    "timeout_sec",
                    format!("must be 1 to {} seconds", MAX_SANDBOX_TIMEOUT.as_secs()),
                ));
            }
        }
        validate_metadata(&self.metadata)
    }
}

fn validate_metadata(metadata: &BTreeMap<String, String>) -> Result<(), CoreError> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(CoreError::invalid(
            "metadata",
            format!("at most {MAX_METADATA_ENTRIES} entries"),
        ));
    }
    for (key, value) in metadata {
        if key.is_empty() || key.len() > MAX_METADATA_KEY_LEN {
            return Err(CoreError::invalid(
                "metadata",
                format!("keys are 1 to {MAX_METADATA_KEY_LEN} bytes"),
            ));
        }
        if value.len() > MAX_METADATA_VALUE_LEN {
            return Err(CoreError::invalid(
                "metadata",
                format!("value of {key:?} is longer than {MAX_METADATA_VALUE_LEN} bytes"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::SandboxState::*;
    use super::*;

    #[test]
    fn happy_path_and_pause_resume_are_allowed() {
        let path = [
            Pending, Starting, Running, Paused, Starting, Running, Stopping, Stopped,
        ];
        for pair in path.windows(2) {
            assert!(
                pair[0].can_transition_to(pair[1]),
                "{} -> {}",
                pair[0],
                pair[1]
            );
        }
    }

    #[test]
    fn stopped_is_terminal_and_self_transitions_are_refused() {
        for state in SandboxState::ALL {
            assert!(!Stopped.can_transition_to(state));
            assert!(!state.can_transition_to(state));
        }
        assert!(Stopped.is_terminal());
    }

    #[test]
    fn refused_transitions_name_both_states() {
        assert!(!Pending.can_transition_to(Running));
        assert!(!Paused.can_transition_to(Running));
        assert_eq!(
            Running.transition_to(Pending),
            Err(CoreError::InvalidTransition {
                from: Running,
                to: Pending
            })
        );
        assert_eq!(Lost.transition_to(Running), Ok(Running));
    }

    #[test]
    fn every_live_state_can_fail_or_be_stopped() {
        for state in SandboxState::ALL {
            if !state.is_terminal() {
                assert!(
                    state.can_transition_to(Stopped) || state.can_transition_to(Stopping),
                    "{state}"
                );
            }
        }
    }

    fn spec() -> SandboxSpec {
        SandboxSpec::new(TemplateName::new("node22").expect("valid"))
    }

    #[test]
    fn spec_validation_names_the_field() {
        assert_eq!(spec().validate(), Ok(()));

        let mut s = spec();
        s.timeout = Some(Duration::from_secs(86_401));
        assert_eq!(
            s.validate().expect_err("timeout").field(),
            Some("timeout_sec")
        );

        let mut s = spec();
        s.env.insert("1BAD".into(), "x".into());
        assert_eq!(s.validate().expect_err("env").field(), Some("env"));

        let mut s = spec();
        s.metadata.insert(String::new(), "x".into());
        assert_eq!(
            s.validate().expect_err("metadata").field(),
            Some("metadata")
        );

        let mut s = spec();
        for i in 0..=MAX_METADATA_ENTRIES {
            s.metadata.insert(format!("k{i}"), "v".into());
        }
        assert_eq!(
            s.validate().expect_err("metadata").field(),
            Some("metadata")
        );
    }
}
