//! One NanoBox service as a child process of `nanobox up`: its output goes to its own log
//! file (and to our stderr with `--verbose`), its pid to a pid file so that the next start
//! can stop it if this process is killed, and its start is confirmed by the `listening
//! on <addr>` line every service prints on stdout once it serves.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader,
};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::StackError;

/// The longest line copied from a service's output into its log: a runaway line cannot
/// fill memory.
const MAX_LINE: usize = 64 << 10;

/// A running service.
#[derive(Debug)]
pub struct Service {
    /// Its name, as in its log file's.
    pub name: &'static str,
    /// The address it printed.
    pub addr: String,
    child: Child,
    log: PathBuf,
    pid_file: PathBuf,
}

/// Where a service's log and pid file go, and whether its output is also streamed.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub log_dir: PathBuf,
    pub run_dir: PathBuf,
    pub verbose: bool,
}

impl Service {
    /// Starts `bin --config <config>` and waits, at most `start_limit`, for its
    /// `listening on` line.
    pub async fn start(
        name: &'static str,
        bin: &Path,
        config: &Path,
        outputs: &Outputs,
        start_limit: Duration,
    ) -> Result<Self, StackError> {
        let log = outputs.log_dir.join(format!("{name}.log"));
        let file = tokio::fs::File::create(&log)
            .await
            .map_err(|e| StackError::io("creating the log", &log, e))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(config)
            .env_remove("NANOBOX_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A panic of `nanobox up` must not leave services running with nobody to
            // stop them; an orderly stop goes through `stop` first.
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = cmd.spawn().map_err(|e| StackError::Missing {
            what: format!("{name} ({})", bin.display()),
            hint: format!(
                "cannot start it: {e}; build it with `cargo build --release` or pass --bin-dir"
            ),
        })?;
        let pid_file = outputs.run_dir.join(format!("{name}.pid"));
        if let Some(pid) = child.id() {
            let record = format!("{pid} {}\n", start_time(pid).unwrap_or_default());
            std::fs::write(&pid_file, record)
                .map_err(|e| StackError::io("writing the pid file", &pid_file, e))?;
        }
        let log_writer = std::sync::Arc::new(tokio::sync::Mutex::new(file));
        let (first_line, first) = oneshot::channel();
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(copy_lines(
                stdout,
                name,
                log_writer.clone(),
                outputs.verbose,
                Some(first_line),
            ));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(copy_lines(stderr, name, log_writer, outputs.verbose, None));
        }
        let mut service = Self {
            name,
            addr: String::new(),
            child,
            log,
            pid_file,
        };
        let line = tokio::select! {
            line = first => line.ok(),
            status = service.child.wait() => {
                return Err(service.exited(status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())));
            }
            () = tokio::time::sleep(start_limit) => {
                return Err(StackError::NotReady {
                    service: name,
                    waited: start_limit,
                    detail: "it printed no `listening on` line".into(),
                    log: service.log.clone(),
                });
            }
        };
        match line
            .as_deref()
            .and_then(|l| l.trim().strip_prefix("listening on "))
        {
            Some(addr) => service.addr = addr.to_owned(),
            None => {
                // Its stdout closed or said something else: it is on its way out.
                let status = tokio::time::timeout(Duration::from_secs(5), service.child.wait())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map_or_else(|| "no `listening on` line".to_owned(), |s| s.to_string());
                return Err(service.exited(status));
            }
        }
        Ok(service)
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Its exit status as text if it has exited.
    pub fn try_exit_status(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Waits for it to exit; its exit status as text.
    pub async fn wait(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        }
    }

    /// The error saying it exited with `status`.
    pub fn exited(&self, status: String) -> StackError {
        StackError::ServiceExited {
            service: self.name,
            status,
            log: self.log.clone(),
        }
    }

    /// Asks it to stop (SIGTERM) and waits up to `grace`, then kills it. Removes its pid
    /// file. Whether it stopped by itself.
    pub async fn stop(&mut self, grace: Duration) -> bool {
        let mut orderly = true;
        if matches!(self.child.try_wait(), Ok(None)) {
            if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            if tokio::time::timeout(grace, self.child.wait())
                .await
                .is_err()
            {
                orderly = false;
                let _ = self.child.kill().await;
            }
        }
        let _ = std::fs::remove_file(&self.pid_file);
        orderly
    }
}

/// Copies `from` line by line into the log (and to stderr, prefixed, when `verbose`);
/// the first line also goes to `first`.
async fn copy_lines(
    from: impl AsyncRead + Unpin,
    name: &'static str,
    log: std::sync::Arc<tokio::sync::Mutex<tokio::fs::File>>,
    verbose: bool,
    mut first: Option<oneshot::Sender<String>>,
) {
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        let _ = log.lock().await.write_all(&line).await;
        if verbose {
            eprint!("{name:>16} | {}", String::from_utf8_lossy(&line));
        }
        if let Some(tx) = first.take() {
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
        }
    }
    let _ = log.lock().await.flush().await;
}

/// The start time of process `pid` (field 22 of `/proc/<pid>/stat`, in clock ticks since
/// boot): with the pid, it names one process even after the pid is reused.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}
