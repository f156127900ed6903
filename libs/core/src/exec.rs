//! Commands run in a sandbox, and how they end.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::CoreError;

/// A command to run in a sandbox, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecSpec {
    /// The program, looked up in PATH if it has no slash.
    pub command: String,
    /// Its arguments, without the program name.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// The working directory (absolute); `None` for the image's.
    pub cwd: Option<String>,
    /// The user id; `None` for the image's user.
    pub uid: Option<u32>,
    /// The group id; `None` for the user's primary group.
    pub gid: Option<u32>,
    /// Kill the command after this long; `None` for no limit.
    pub timeout: Option<Duration>,
    /// Bytes for standard input, which is then closed.
    pub stdin: Vec<u8>,
}

impl ExecSpec {
    /// A spec running `command` with `args` and defaults for the rest.
    pub fn new(
        command: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            command: command.into(),
            args: args.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Checks that the command can be passed to `execve`: a non-empty program, no NUL bytes,
    /// well-formed environment names, an absolute working directory, a non-zero timeout.
    pub fn validate(&self) -> Result<(), CoreError> {
        if self.command.is_empty() {
            return Err(CoreError::invalid("command", "must not be empty"));
        }
        if self.command.contains('\0') {
            return Err(CoreError::invalid("command", "must not contain NUL"));
        }
        if self.args.iter().any(|a| a.contains('\0')) {
            return Err(CoreError::invalid("args", "must not contain NUL"));
        }
        validate_env("env", &self.env)?;
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') || cwd.contains('\0') {
                return Err(CoreError::invalid("cwd", "must be an absolute path"));
            }
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(CoreError::invalid(
                "timeout_ms",
                "must be positive when set",
            ));
        }
        Ok(())
    }
}

/// Checks environment variable names (`[A-Za-z_][A-Za-z0-9_]*`) and values (no NUL).
pub(crate) fn validate_env(
    field: &'static str,
    env: &BTreeMap<String, String>,
) -> Result<(), CoreError> {
    for (name, value) in env {
        let mut bytes = name.bytes();
        let first_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
        if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(CoreError::invalid(
                field,
                format!("{name:?} is not a variable name"),
            ));
        }
        if value.contains('\0') {
            return Err(CoreError::invalid(
                field,
                format!("value of {name} contains NUL"),
            ));
        }
    }
    Ok(())
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitKind {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl ExitKind {
    /// The code a shell would report: the exit code, or 128 plus the signal.
    pub fn shell_code(&self) -> i32 {
        match *self {
            Self::Code(code) => code,
            Self::Signal(signal) => 128_i32.saturating_add(signal),
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExitOutcome {
    /// Exit code or signal.
    pub kind: ExitKind,
    /// It was killed for running past its timeout.
    pub timed_out: bool,
    /// Wall-clock run time.
    pub duration: Duration,
}

impl ExitOutcome {
    /// It exited with code 0 and did not time out.
    pub fn success(&self) -> bool {
        self.kind == ExitKind::Code(0) && !self.timed_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_spec() {
        let mut spec = ExecSpec::new("node", ["-e", "1"]);
        spec.cwd = Some("/work".into());
        spec.env.insert("NODE_ENV".into(), "production".into());
        spec.env.insert("_X1".into(), String::new());
        assert_eq!(spec.validate(), Ok(()));
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let field = |spec: ExecSpec| spec.validate().expect_err("invalid").field();
        assert_eq!(
            field(ExecSpec::new("", Vec::<String>::new())),
            Some("command")
        );
        assert_eq!(
            field(ExecSpec::new("a\0b", Vec::<String>::new())),
            Some("command")
        );
        assert_eq!(field(ExecSpec::new("ls", ["a\0"])), Some("args"));

        let mut spec = ExecSpec::new("ls", Vec::<String>::new());
        spec.cwd = Some("relative".into());
        assert_eq!(field(spec), Some("cwd"));

        for bad in ["", "1A", "A-B", "A=B"] {
            let mut spec = ExecSpec::new("ls", Vec::<String>::new());
            spec.env.insert(bad.into(), "x".into());
            assert_eq!(field(spec), Some("env"), "{bad:?}");
        }

        let mut spec = ExecSpec::new("ls", Vec::<String>::new());
        spec.timeout = Some(Duration::ZERO);
        assert_eq!(field(spec), Some("timeout_ms"));
    }

    #[test]
    fn outcome_success_and_shell_code() {
        let ok = ExitOutcome {
            kind: ExitKind::Code(0),
            timed_out: false,
            duration: Duration::from_millis(5),
        };
        assert!(ok.success());
        assert!(!ExitOutcome {
            timed_out: true,
            ..ok
        }
        .success());
        assert_eq!(ExitKind::Signal(9).shell_code(), 137);
        assert_eq!(ExitKind::Code(3).shell_code(), 3);
    }
}
