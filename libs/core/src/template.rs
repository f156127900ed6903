//! Templates: warmed-up images that sandboxes boot from.

use std::fmt;
use std::str::FromStr;

use crate::CoreError;

/// A template name: `[a-z0-9][a-z0-9._-]{0,62}`, so it is safe as a file name, an object
/// store key segment and a label value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TemplateName(String);

impl TemplateName {
    /// Validates a name.
    pub fn new(name: impl Into<String>) -> Result<Self, CoreError> {
        let name = name.into();
        let bytes = name.as_bytes();
        let lower_or_digit = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let valid = match bytes.split_first() {
            Some((first, rest)) => {
                lower_or_digit(first)
                    && rest.len() <= 62
                    && rest
                        .iter()
                        .all(|b| lower_or_digit(b) || matches!(b, b'.' | b'_' | b'-'))
            }
            None => false,
        };
        if valid {
            Ok(Self(name))
        } else {
            Err(CoreError::invalid(
                "template",
                "1 to 63 of [a-z0-9._-], starting with a letter or digit",
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TemplateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TemplateName {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for TemplateName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The state of a template and of its warmup task, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TemplateState {
    /// Waiting for a builder.
    Queued,
    /// Pulling the manifest and layers.
    Pulling,
    /// Applying the layers.
    Extracting,
    /// Building the ext4 root filesystem.
    Building,
    /// Uploading it to the object store.
    Uploading,
    /// Sandboxes can be created from it.
    Ready,
    /// The warmup failed.
    Failed,
}

impl TemplateState {
    /// The warmup task has finished, successfully or not.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Ready | Self::Failed)
    }

    /// The uppercase name used in the API (`READY`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::Pulling => "PULLING",
            Self::Extracting => "EXTRACTING",
            Self::Building => "BUILDING",
            Self::Uploading => "UPLOADING",
            Self::Ready => "READY",
            Self::Failed => "FAILED",
        }
    }
}

impl fmt::Display for TemplateState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The runtime configuration of an OCI image.
///
/// Its JSON form (snake_case field names, every field optional) is also the file the
/// template builder writes into each rootfs at `/etc/nanobox/image.json` for the guest
/// init: one definition for both ends.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    /// Environment, `KEY=value`, in image order.
    pub env: Vec<String>,
    /// Working directory; empty means `/`.
    pub working_dir: String,
    /// User, as in the image (`name`, `uid`, `uid:gid`); empty means root.
    pub user: String,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Default command.
    pub cmd: Vec<String>,
}

impl ImageConfig {
    /// Checks that every environment entry is `KEY=value` with a non-empty key.
    pub fn validate(&self) -> Result<(), CoreError> {
        for entry in &self.env {
            match entry.split_once('=') {
                Some((key, _)) if !key.is_empty() => {}
                _ => {
                    return Err(CoreError::invalid(
                        "config.env",
                        format!("{entry:?} is not KEY=value"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// The environment as key and value pairs, in image order.
    pub fn env_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env.iter().filter_map(|e| e.split_once('='))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_names() {
        for good in ["node22", "a", "python3.12-slim", "0_x", &"a".repeat(63)] {
            assert!(TemplateName::new(good).is_ok(), "{good}");
        }
        for bad in ["", "Node22", "-x", ".x", "a b", "a/b", &"a".repeat(64)] {
            let err = TemplateName::new(bad).expect_err(bad);
            assert_eq!(err.field(), Some("template"), "{bad}");
        }
    }

    #[test]
    fn image_config_env() {
        let config = ImageConfig {
            env: vec!["PATH=/usr/bin:/bin".into(), "EMPTY=".into()],
            ..ImageConfig::default()
        };
        assert_eq!(config.validate(), Ok(()));
        let pairs: Vec<_> = config.env_pairs().collect();
        assert_eq!(pairs, [("PATH", "/usr/bin:/bin"), ("EMPTY", "")]);

        let bad = ImageConfig {
            env: vec!["NOEQUALS".into()],
            ..ImageConfig::default()
        };
        assert_eq!(bad.validate().expect_err("bad").field(), Some("config.env"));
        assert!(TemplateState::Ready.is_terminal());
        assert!(!TemplateState::Pulling.is_terminal());
    }
}
