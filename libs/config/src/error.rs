//! Configuration errors. Every error about a value names its key by its full path
//! (`[agent].listen_addr`, `[pool.templates][1].min_ready`) and where the value came from:
//! the file and line, or the environment variable that set it.

use std::fmt;
use std::path::PathBuf;

/// One step of a [`KeyPath`]: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Segment {
    /// A key of a table.
    Key(String),
    /// An index into an array (0-based).
    Index(usize),
}

/// The full path of a key in the configuration, such as `pool.templates[1].min_ready`.
///
/// `Display` writes the table part the way a TOML header names it and the key after it:
/// `[agent].listen_addr`, `[pool.templates][1].min_ready`, `[network].internal_services[2]`;
/// a top-level section alone is `[agent]`. [`KeyPath::table`] writes a path that names a
/// table: `[pool.templates][1]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct KeyPath(Vec<Segment>);

impl KeyPath {
    /// The empty path (the document itself).
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// A path of keys only (`KeyPath::keys(["agent", "listen_addr"])`).
    pub fn keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        Self(
            keys.into_iter()
                .map(|k| Segment::Key(k.to_owned()))
                .collect(),
        )
    }

    /// This path with a key appended.
    pub fn key(&self, key: &str) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_owned()));
        path
    }

    /// This path with an array index appended.
    pub fn index(&self, index: usize) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }

    /// The segments.
    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    /// The path without its last segment, or `None` for the root.
    pub fn parent(&self) -> Option<Self> {
        let (_, rest) = self.0.split_last()?;
        Some(Self(rest.to_vec()))
    }

    /// The last key of the path, if it ends with a key.
    pub fn last_key(&self) -> Option<&str> {
        match self.0.last() {
            Some(Segment::Key(k)) => Some(k),
            _ => None,
        }
    }

    /// The path written as a table header: `[pool.templates][1]`, `[agent]`; the root is
    /// `the top level`.
    pub fn table(&self) -> String {
        if self.0.is_empty() {
            return "the top level".to_owned();
        }
        write_table(&self.0)
    }
}

/// `[a.b][1][2]`: runs of keys joined by dots in brackets, indices in their own brackets.
fn write_table(segments: &[Segment]) -> String {
    let mut out = String::new();
    let mut open = false;
    for segment in segments {
        match segment {
            Segment::Key(k) => {
                if open {
                    out.push('.');
                } else {
                    out.push('[');
                    open = true;
                }
                out.push_str(k);
            }
            Segment::Index(i) => {
                if open {
                    out.push(']');
                    open = false;
                }
                out.push_str(&format!("[{i}]"));
            }
        }
    }
    if open {
        out.push(']');
    }
    out
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last_key = self.0.iter().rposition(|s| matches!(s, Segment::Key(_)));
        let Some(k) = last_key else {
            return f.write_str(&self.table());
        };
        let (table, rest) = self.0.split_at(k);
        if table.is_empty() {
            // A top-level key is a section.
            f.write_str(&write_table(&rest[..1]))?;
        } else {
            f.write_str(&write_table(table))?;
            if let Segment::Key(key) = &rest[0] {
                write!(f, ".{key}")?;
            }
        }
        for segment in &rest[1..] {
            if let Segment::Index(i) = segment {
                write!(f, "[{i}]")?;
            }
        }
        Ok(())
    }
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A line of a configuration file (1-based).
    File {
        /// The file as it was named when loaded.
        file: PathBuf,
        /// The line.
        line: usize,
    },
    /// An environment variable (`NANOBOX__AGENT__LISTEN_ADDR`).
    Env {
        /// The variable's name.
        var: String,
    },
    /// The built-in default; `file` is the configuration file, if one was loaded.
    Default {
        /// The file loaded, if any.
        file: Option<PathBuf>,
    },
}

/// One thing wrong with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key.
    pub key: KeyPath,
    /// Where its value came from.
    pub location: Location,
    /// What is wrong, in a phrase (`must be at most max_ready (3 > 2)`).
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            key,
            location,
            message,
        } = self;
        match location {
            Location::File { file, line } => {
                write!(f, "{}: {key} (line {line}): {message}", file.display())
            }
            Location::Env { var } => write!(f, "{var}: {key}: {message}"),
            Location::Default { file: Some(file) } => {
                write!(f, "{}: {key} (default): {message}", file.display())
            }
            Location::Default { file: None } => write!(f, "{key} (default): {message}"),
        }
    }
}

/// Why the configuration could not be loaded or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file (or a key or token file it names) could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}: line {line}, column {column}: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The TOML parser's message.
        message: String,
    },
    /// A key (or section) the configuration does not have, probably a typo.
    #[error("{0}")]
    UnknownKey(Box<UnknownKey>),
    /// A value of the wrong type or format (`invalid socket address syntax`), from the file
    /// or from an environment variable.
    #[error("{0}")]
    Value(Problem),
    /// [`crate::Config::validate`] found values that parse but do not make sense, one
    /// problem per key.
    #[error("{}", list(.0))]
    Invalid(Vec<Problem>),
    /// A `NANOBOX__...` environment variable that does not name a key, or whose value does
    /// not parse as the key's type.
    #[error("{var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// A key file (`api_keys_file`, `service_token_file`) holds an unusable key.
    #[error("{}: {key}: {message}", path.display())]
    KeyFile {
        /// The key naming the file.
        key: KeyPath,
        /// The file.
        path: PathBuf,
        /// What is wrong (the line is named).
        message: String,
    },
}

impl ConfigError {
    /// The problems of an [`ConfigError::Invalid`] or [`ConfigError::Value`] error, so
    /// callers and tests can look at each key.
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Invalid(problems) => problems,
            Self::Value(problem) => std::slice::from_ref(problem),
            _ => &[],
        }
    }
}

/// The details of [`ConfigError::UnknownKey`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    /// The file.
    pub file: PathBuf,
    /// The 1-based line of the key.
    pub line: usize,
    /// The table the key is in (`[agent]`, `the top level`).
    pub table: String,
    /// The unknown key.
    pub key: String,
    /// A known key spelled almost the same, if there is one.
    pub suggestion: Option<String>,
    /// The keys the table has, as serde listed them (`expected one of ...`).
    pub expected: String,
}

impl fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            file,
            line,
            table,
            key,
            suggestion,
            expected,
        } = self;
        let file = file.display();
        let section = table == "the top level";
        let hint = match suggestion {
            Some(s) if section => format!("did you mean [{s}]?"),
            Some(s) => format!("did you mean `{s}`?"),
            None => expected.clone(),
        };
        if section {
            write!(f, "{file}: unknown section [{key}] (line {line}); {hint}")
        } else {
            write!(
                f,
                "{file}: unknown key `{key}` in {table} (line {line}); {hint}"
            )
        }
    }
}

fn list(problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => {
            let mut out = format!("{} problems in the configuration:", many.len());
            for p in many {
                out.push_str("\n  ");
                out.push_str(&p.to_string());
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_read_like_toml() {
        let p = KeyPath::keys(["pool", "templates"])
            .index(1)
            .key("min_ready");
        assert_eq!(p.to_string(), "[pool.templates][1].min_ready");
        assert_eq!(
            KeyPath::keys(["agent", "listen_addr"]).to_string(),
            "[agent].listen_addr"
        );
        assert_eq!(
            KeyPath::keys(["network", "internal_services"])
                .index(2)
                .to_string(),
            "[network].internal_services[2]"
        );
        assert_eq!(KeyPath::keys(["agent"]).to_string(), "[agent]");
        let item = KeyPath::keys(["pool", "templates"]).index(0);
        assert_eq!(item.table(), "[pool.templates][0]");
        assert_eq!(item.to_string(), "[pool].templates[0]");
        assert_eq!(KeyPath::root().table(), "the top level");
        assert_eq!(
            KeyPath::keys(["telemetry", "log_format"]).parent(),
            Some(KeyPath::keys(["telemetry"]))
        );
    }
}
