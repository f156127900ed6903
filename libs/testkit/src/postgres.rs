//! A private PostgreSQL server for tests: its own cluster in a temporary directory,
//! reachable only over a unix socket in that directory (no TCP port to collide on), with
//! fsync off. Each test asks for its own database ([`Postgres::create_database`]).
//! Dropping the [`Postgres`] stops the server (immediate mode) and removes the directory.
//!
//! The binaries come from Debian's `postgresql` package (`/usr/lib/postgresql/<v>/bin`,
//! installed by `cargo xtask setup`); `NANOBOX_PG_BIN` overrides the directory. initdb
//! refuses to run as root, so as root the server runs as the `postgres` user, in a
//! directory owned by it.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// How long the server may take to accept its first connection. A hang guard.
pub const PG_START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running private PostgreSQL cluster.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    /// `Some((uid, gid))` of the `postgres` user when the tests run as root.
    run_as: Option<(u32, u32)>,
    dir: tempfile::TempDir,
}

/// The directory holding `initdb` and `pg_ctl` (found as `nanobox up` finds it), or a
/// panic saying how to install them.
pub fn pg_bin_dir() -> PathBuf {
    nanobox_stack::postgres::bin_dir().unwrap_or_else(|| {
        panic!(
            "PostgreSQL not found under /usr/lib/postgresql/*/bin: run `cargo xtask setup` \
             (Debian package `postgresql`) or set NANOBOX_PG_BIN"
        )
    })
}

fn id_of(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .unwrap_or_else(|e| panic!("running id: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no `postgres` user (install the Debian package `postgresql`)"))
}

impl Postgres {
    /// Creates and starts a cluster, returning once it accepts connections.
    pub async fn start() -> Self {
        let bin = pg_bin_dir();
        let is_root = std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false);
        let run_as = is_root.then(|| (id_of("-u"), id_of("-g")));
        let dir = tempfile::Builder::new()
            .prefix("nanobox-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir: {e}"));
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", dir.path().display()));
        }
        let pg = Self { bin, run_as, dir };
        let data = pg.data_dir();
        pg.run_ok(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )
        .await;
        let options = format!(
            "-k {} -c listen_addresses='' -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=200",
            pg.socket_dir().display()
        );
        let log = pg.dir.path().join("server.log");
        pg.run_ok(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-o",
                &options,
                "-w",
                "-t",
                &PG_START_TIMEOUT.as_secs().to_string(),
                "start",
            ],
        )
        .await;
        // pg_ctl -w already waited; make sure a real client gets in too.
        let deadline = Instant::now() + PG_START_TIMEOUT;
        loop {
            match pg.config("postgres").connect(tokio_postgres::NoTls).await {
                Ok(_) => return pg,
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "PostgreSQL does not accept connections: {e}\n{}",
                        pg.log_tail()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.run_as {
            Some(_) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", "postgres", "--"]).arg(path);
                cmd
            }
            None => Command::new(path),
        }
    }

    async fn run_ok(&self, program: &str, args: &[&str]) -> Output {
        let mut cmd = self.command(program);
        cmd.args(args).current_dir(self.dir.path());
        let out = tokio::process::Command::from(cmd)
            .output()
            .await
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} failed ({}):\n{}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        out
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory with the server's unix socket (`host` for libpq clients).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Connection settings for database `dbname` as the superuser `postgres`.
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(self.socket_dir())
            .user("postgres")
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// The libpq connection string for database `db` of this server, as the services'
    /// `[database] url` takes it.
    pub fn url(&self, db: &tokio_postgres::Config) -> String {
        format!(
            "host={} user=postgres dbname={}",
            self.socket_dir().display(),
            db.get_dbname().unwrap_or("postgres")
        )
    }

    /// Creates a fresh, empty database with a unique name and returns its settings.
    pub async fn create_database(&self) -> tokio_postgres::Config {
        let name = format!("test_{:016x}", rand::random::<u64>());
        let (client, connection) = self
            .config("postgres")
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test server: {e}"));
        let task = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        drop(client);
        let _ = task.await;
        self.config(&name)
    }

    /// The end of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .current_dir(self.dir.path())
            .output();
    }
}
