//! The stack's private PostgreSQL: one cluster in `<data>/pg`, initialised on the first
//! `nanobox up` from the system's binaries (Debian's `postgresql` package) and kept across
//! runs, reachable only over a unix socket in `<data>/pg/sock` (no TCP port to collide
//! with a PostgreSQL the machine already runs), holding one database, `nanobox`.
//!
//! PostgreSQL refuses to run as root, so as root every server command runs as the
//! `postgres` user (`runuser`), in directories it owns.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::tool;
use crate::StackError;

/// How long initdb, a start and a stop may each take.
const SERVER_TIMEOUT: Duration = Duration::from_secs(120);

/// The database the services share.
pub const DATABASE: &str = "nanobox";

/// The cluster of one data directory.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    /// `Some(uid, gid)` of the `postgres` user when this process runs as root.
    run_as: Option<(u32, u32)>,
    root: PathBuf,
    log: PathBuf,
}

impl Postgres {
    /// The cluster under `root` (`<data>/pg`), logging to `<root>/server.log` (a file the
    /// server's user can write). Finds the binaries: `$NANOBOX_PG_BIN`, else the newest
    /// `/usr/lib/postgresql/<version>/bin`.
    pub fn new(root: PathBuf) -> Result<Self, StackError> {
        let bin = bin_dir().ok_or_else(|| StackError::Missing {
            what: "PostgreSQL (initdb, pg_ctl) under /usr/lib/postgresql/*/bin".into(),
            hint: "install Debian's `postgresql` package (`cargo xtask setup` does) or set NANOBOX_PG_BIN".into(),
        })?;
        let is_root = nix::unistd::geteuid().is_root();
        let run_as = if is_root {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or_else(|| StackError::Missing {
                    what: "the `postgres` user".into(),
                    hint: "install Debian's `postgresql` package, which creates it".into(),
                })?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        } else {
            None
        };
        Ok(Self {
            bin,
            run_as,
            log: root.join("server.log"),
            root,
        })
    }

    /// The server's log.
    pub fn log(&self) -> &Path {
        &self.log
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The directory of the server's unix socket (`host=` for libpq).
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }

    /// The `[database] url` of the services' database.
    pub fn url(&self) -> String {
        format!(
            "host={} user=postgres dbname={DATABASE}",
            self.socket_dir().display()
        )
    }

    /// Initialises the cluster if this is the first run, starts it, and creates the
    /// services' database if it does not exist.
    pub async fn start(&self) -> Result<(), StackError> {
        for dir in [&self.root, &self.socket_dir()] {
            std::fs::create_dir_all(dir)
                .map_err(|e| StackError::io("creating the PostgreSQL directory", dir, e))?;
            self.give_to_postgres(dir)?;
        }
        // The server's user must reach its directory: a data directory under /root
        // (mode 0700) is one it cannot.
        if self.run_as.is_some() {
            let root = self.root.display().to_string();
            if tool::run(
                "runuser",
                &["-u", "postgres", "--", "test", "-w", &root],
                tool::QUICK,
            )
            .await
            .is_err()
            {
                return Err(StackError::Invalid {
                    flag: "--data-dir",
                    message: format!(
                        "the `postgres` user cannot write {root}: choose a data directory every parent of which it may enter (the default /var/lib/nanobox/up works)"
                    ),
                });
            }
        }
        let data = self.data_dir();
        if !data.join("PG_VERSION").is_file() {
            // A half-made cluster (initdb interrupted) is made again from scratch.
            if data.exists() {
                std::fs::remove_dir_all(&data).map_err(|e| {
                    StackError::io("removing a half-initialised PostgreSQL cluster", &data, e)
                })?;
            }
            self.server_command(
                "initdb",
                &[
                    "-D",
                    &data.display().to_string(),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ],
            )
            .await?;
        }
        // A server a killed `nanobox up` left running is stopped first, so this one
        // starts with the options below and its log goes to this run's file.
        self.stop().await?;
        let options = format!(
            "-k {} -c listen_addresses='' -c max_connections=200",
            self.socket_dir().display()
        );
        self.server_command(
            "pg_ctl",
            &[
                "-D",
                &data.display().to_string(),
                "-l",
                &self.log.display().to_string(),
                "-o",
                &options,
                "-w",
                "-t",
                &SERVER_TIMEOUT.as_secs().to_string(),
                "start",
            ],
        )
        .await?;
        self.create_database().await
    }

    /// Stops the server if it runs (fast mode: sessions are cut, data is flushed).
    pub async fn stop(&self) -> Result<(), StackError> {
        let data = self.data_dir();
        if !data.join("postmaster.pid").exists() {
            return Ok(());
        }
        let data = data.display().to_string();
        // `status` fails when no server runs: a stale pid file after a crash.
        if self
            .server_command("pg_ctl", &["-D", &data, "status"])
            .await
            .is_err()
        {
            return Ok(());
        }
        self.server_command(
            "pg_ctl",
            &[
                "-D",
                &data,
                "-m",
                "fast",
                "-w",
                "-t",
                &SERVER_TIMEOUT.as_secs().to_string(),
                "stop",
            ],
        )
        .await
        .map(drop)
    }

    async fn create_database(&self) -> Result<(), StackError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(self.socket_dir())
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
            self.error(format!(
                "connecting over {}: {e}",
                self.socket_dir().display()
            ))
        })?;
        let task = tokio::spawn(connection);
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
            .await
            .map_err(|e| self.error(format!("looking for the database: {e}")))?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!("CREATE DATABASE \"{DATABASE}\""))
                .await
                .map_err(|e| self.error(format!("creating the database {DATABASE}: {e}")))?;
        }
        drop(client);
        let _ = task.await;
        Ok(())
    }

    /// Runs a server binary as the server's user.
    async fn server_command(&self, program: &str, args: &[&str]) -> Result<String, StackError> {
        let path = self.bin.join(program).display().to_string();
        let result = match self.run_as {
            Some(_) => {
                let mut full = vec!["-u", "postgres", "--", path.as_str()];
                full.extend_from_slice(args);
                tool::run("runuser", &full, SERVER_TIMEOUT).await
            }
            None => tool::run(&path, args, SERVER_TIMEOUT).await,
        };
        result.map_err(|e| self.error(e.to_string()))
    }

    fn give_to_postgres(&self, dir: &Path) -> Result<(), StackError> {
        if let Some((uid, gid)) = self.run_as {
            let meta = std::fs::metadata(dir)
                .map_err(|e| StackError::io("reading the PostgreSQL directory", dir, e))?;
            if meta.uid() != uid {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                    .map_err(|e| StackError::io("giving the directory to `postgres`", dir, e))?;
            }
        }
        Ok(())
    }

    fn error(&self, message: String) -> StackError {
        StackError::Postgres {
            message,
            log: self.log.clone(),
        }
    }
}

/// The directory of the server binaries: `$NANOBOX_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` holding `initdb`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("NANOBOX_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}
