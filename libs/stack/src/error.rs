//! What can stop `nanobox up` from bringing the stack up, or keep it from stopping cleanly.
//! Every variant says what was being done and, where one exists, which file to read.

use std::path::PathBuf;
use std::time::Duration;

/// A failure of the local stack.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// Another `nanobox up` holds the data directory.
    #[error("nanobox up is already running (pid {pid}) with the data directory {}; stop it first (Ctrl-C or kill -TERM {pid})", data_dir.display())]
    AlreadyRunning { pid: String, data_dir: PathBuf },

    /// A file or directory operation failed.
    #[error("{what} ({}): {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An external tool (`ip`, `pg_ctl`, `nft`, ...) failed or could not be run.
    #[error("`{command}` failed: {message}")]
    Tool { command: String, message: String },

    /// An external tool did not finish in time.
    #[error("`{command}` did not finish within {} s", limit.as_secs())]
    ToolTimeout { command: String, limit: Duration },

    /// Something this machine lacks: a binary, the guest kernel, a PostgreSQL install.
    #[error("{what}: {hint}")]
    Missing { what: String, hint: String },

    /// A flag's value cannot work.
    #[error("{flag}: {message}")]
    Invalid { flag: &'static str, message: String },

    /// A port the stack needs is taken.
    #[error("port {port} ({flag}) is already in use on 127.0.0.1; pass another one, or 0 for any free port")]
    PortInUse { port: u16, flag: &'static str },

    /// The PostgreSQL server could not be prepared or reached.
    #[error("PostgreSQL: {message} (log: {})", log.display())]
    Postgres { message: String, log: PathBuf },

    /// The configuration the stack wrote does not validate: a bug in this crate, or a
    /// flag's value the services refuse.
    #[error("the generated {}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    /// A service exited while the stack was starting or running.
    #[error("{service} exited ({status}); its log: {}", log.display())]
    ServiceExited {
        service: &'static str,
        status: String,
        log: PathBuf,
    },

    /// A service did not become ready in time.
    #[error("{service} was not ready within {} s: {detail}; its log: {}", waited.as_secs(), log.display())]
    NotReady {
        service: &'static str,
        waited: Duration,
        detail: String,
        log: PathBuf,
    },
}

impl StackError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
