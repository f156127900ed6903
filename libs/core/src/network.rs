//! The network a sandbox gets.

use std::fmt;

use crate::CoreError;

/// How much network a sandbox gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NetworkMode {
    /// No network interface.
    #[default]
    Isolated,
    /// Other sandboxes of the same tenant scope and the cluster DNS, no internet.
    Internal,
    /// The internet through NAT, optionally rate limited.
    Internet,
}

impl NetworkMode {
    /// The lowercase name used in configuration and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Isolated => "isolated",
            Self::Internal => "internal",
            Self::Internet => "internet",
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The network of a sandbox, validated: a rate limit only in internet mode, a well-formed
/// tenant scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NetworkSpec {
    mode: NetworkMode,
    egress_rate_bps: Option<u64>,
    tenant_scope: Option<String>,
}

impl NetworkSpec {
    /// A validated network spec. A rate of `Some(0)` is rejected: `None` means unlimited.
    pub fn new(
        mode: NetworkMode,
        egress_rate_bps: Option<u64>,
        tenant_scope: Option<String>,
    ) -> Result<Self, CoreError> {
        match egress_rate_bps {
            Some(0) => {
                return Err(CoreError::invalid(
                    "network.egress_rate_bps",
                    "a rate limit must be positive",
                ))
            }
            Some(_) if mode != NetworkMode::Internet => {
                return Err(CoreError::invalid(
                    "network.egress_rate_bps",
                    "a rate limit applies to internet mode only",
                ))
            }
            _ => {}
        }
        if let Some(scope) = &tenant_scope {
            let valid_chars = scope
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if scope.is_empty() || scope.len() > 63 || !valid_chars {
                return Err(CoreError::invalid(
                    "network.tenant_scope",
                    "1 to 63 letters, digits, '.', '_' or '-'",
                ));
            }
        }
        Ok(Self {
            mode,
            egress_rate_bps,
            tenant_scope,
        })
    }

    /// An isolated network (no interface).
    pub fn isolated() -> Self {
        Self::default()
    }

    /// The mode.
    pub fn mode(&self) -> NetworkMode {
        self.mode
    }

    /// The egress rate limit in bytes per second, `None` for unlimited.
    pub fn egress_rate_bps(&self) -> Option<u64> {
        self.egress_rate_bps
    }

    /// The tenant scope whose sandboxes may reach each other.
    pub fn tenant_scope(&self) -> Option<&str> {
        self.tenant_scope.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_only_in_internet_mode() {
        assert!(NetworkSpec::new(NetworkMode::Internet, Some(1_000_000), None).is_ok());
        let err = NetworkSpec::new(NetworkMode::Internal, Some(1_000_000), None);
        assert_eq!(
            err.expect_err("internal").field(),
            Some("network.egress_rate_bps")
        );
        let err = NetworkSpec::new(NetworkMode::Internet, Some(0), None);
        assert_eq!(
            err.expect_err("zero").field(),
            Some("network.egress_rate_bps")
        );
    }

    #[test]
    fn tenant_scope_is_checked() {
        assert!(NetworkSpec::new(NetworkMode::Internal, None, Some("team-a.prod".into())).is_ok());
        for bad in ["", "has space", "x".repeat(64).as_str(), "a/b"] {
            let err = NetworkSpec::new(NetworkMode::Internal, None, Some(bad.into()));
            assert_eq!(err.expect_err(bad).field(), Some("network.tenant_scope"));
        }
    }

    #[test]
    fn default_is_isolated() {
        assert_eq!(NetworkSpec::isolated().mode(), NetworkMode::Isolated);
        assert_eq!(NetworkSpec::isolated().egress_rate_bps(), None);
    }
}
