//! VMM processes, whatever the backend: spawning them (own process group, optional death
//! with the parent, descriptors handed over at fixed numbers), and what both backends'
//! VM handles share about the process their actor owns.
//!
//! Each backend runs one actor task per VMM that holds the child process for its whole
//! life: it serves the handles' commands, one at a time, until the process exits
//! ([`next_event`]),
//! keeps its [`RunState`], and when the process has exited and been cleaned up,
//! publishes its [`ExitInfo`] ([`exit_info`]). The VM handle reads both through a
//! [`VmmProcess`], which also kills the process and waits for that exit.

#![allow(unsafe_code)]

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

use crate::backend::{ExitInfo, VmState};
use crate::ConsoleLog;

/// Hands `fds` to the child at descriptor numbers 3, 4, ... and returns those numbers.
pub(crate) fn pass_fds(cmd: &mut Command, fds: Vec<OwnedFd>) -> Result<Vec<i32>, String> {
    let numbers: Vec<i32> = (0..fds.len() as i32).map(|i| 3 + i).collect();
    let mappings = fds
        .into_iter()
        .zip(&numbers)
        .map(|(parent_fd, &child_fd)| FdMapping {
            parent_fd,
            child_fd,
        })
        .collect();
    cmd.fd_mappings(mappings).map_err(|e| e.to_string())?;
    Ok(numbers)
}

/// Makes the child get SIGKILL when the thread that spawned it exits... which for a tokio
/// runtime means when the process exits, since spawns happen on long-lived workers.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // prctl(2) through nix, which is async-signal-safe and touches no parent state.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

/// Makes the child enter the network namespace `netns` (a `/run/netns/<name>` file)
/// before it executes, so the VMM sees only that namespace's devices.
pub(crate) fn enter_netns(cmd: &mut Command, netns: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(netns)?;
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // setns(2) through nix, which is async-signal-safe. The descriptor stays open for the
    // closure's lifetime because the closure owns the file.
    unsafe {
        cmd.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(file.as_raw_fd());
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    Ok(())
}

/// The run state of a VMM, shared by its actor, which changes it as its commands succeed
/// and marks it exited once the process is reaped, and its handle, which reads it.
#[derive(Debug, Clone)]
pub(crate) struct RunState(Arc<AtomicU8>);

impl RunState {
    pub(crate) fn new(state: VmState) -> Self {
        Self(Arc::new(AtomicU8::new(Self::encode(state))))
    }

    pub(crate) fn get(&self) -> VmState {
        match self.0.load(Ordering::SeqCst) {
            0 => VmState::Running,
            1 => VmState::Paused,
            _ => VmState::Exited,
        }
    }

    pub(crate) fn set(&self, state: VmState) {
        self.0.store(Self::encode(state), Ordering::SeqCst);
    }

    fn encode(state: VmState) -> u8 {
        match state {
            VmState::Running => 0,
            VmState::Paused => 1,
            VmState::Exited => 2,
        }
    }
}

/// A VM handle's view of the VMM process its actor owns: its pid, its run state, and the
/// exit the actor publishes once the process is reaped and cleaned up.
#[derive(Debug)]
pub(crate) struct VmmProcess {
    pid: Option<u32>,
    state: RunState,
    exit: watch::Receiver<Option<ExitInfo>>,
    /// Set once SIGKILL was sent, so it is sent once.
    killed: Mutex<bool>,
}

impl VmmProcess {
    /// The handle's view of the process `pid` whose actor keeps `state`; the actor
    /// publishes the exit through the returned sender.
    pub(crate) fn new(
        pid: Option<u32>,
        state: RunState,
    ) -> (Self, watch::Sender<Option<ExitInfo>>) {
        let (exit_tx, exit) = watch::channel(None);
        let process = Self {
            pid,
            state,
            exit,
            killed: Mutex::new(false),
        };
        (process, exit_tx)
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub(crate) fn state(&self) -> VmState {
        self.state.get()
    }

    /// Sends SIGKILL, once, unless the process is known to have exited.
    pub(crate) fn kill(&self) {
        let mut killed = self.killed.lock().unwrap_or_else(PoisonError::into_inner);
        if *killed || self.exit.borrow().is_some() {
            return;
        }
        if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) {
            // The actor has not reaped the process yet (no exit published), so the pid
            // still names our VMM (a jailer execs Firecracker in place, keeping its pid).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            *killed = true;
        }
    }

    /// Waits until the actor publishes the exit (the process reaped, its run directory
    /// removed).
    pub(crate) async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        let info = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
        info.unwrap_or(ExitInfo {
            code: None,
            signal: None,
            stderr_tail: "VM actor ended without an exit status".into(),
        })
    }

    /// Waits up to `grace` for the exit (the VMM was asked to stop), then kills the
    /// process and waits for it.
    pub(crate) async fn exit_within(&self, grace: Duration) -> ExitInfo {
        match tokio::time::timeout(grace, self.wait_exit()).await {
            Ok(info) => info,
            Err(_) => {
                self.kill();
                self.wait_exit().await
            }
        }
    }
}

/// How long an actor lets the output readers take the last bytes after the VMM exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// What an actor acts on next.
pub(crate) enum ActorEvent<C> {
    /// A command from a handle.
    Command(C),
    /// The VMM exited: how it ended.
    Exited(std::io::Result<std::process::ExitStatus>),
}

/// Waits for the next command from the VM's handles or for the VMM to exit. Once the last
/// handle is dropped (the channel closes) nobody can reach the VM any more: the VMM is
/// killed, and its exit is what comes next.
pub(crate) async fn next_event<C>(
    child: &mut tokio::process::Child,
    commands: &mut mpsc::UnboundedReceiver<C>,
) -> ActorEvent<C> {
    tokio::select! {
        status = child.wait() => ActorEvent::Exited(status),
        cmd = commands.recv() => match cmd {
            Some(cmd) => ActorEvent::Command(cmd),
            None => {
                let _ = child.start_kill();
                ActorEvent::Exited(child.wait().await)
            }
        },
    }
}

/// Waits (briefly) for the tasks reading the exited VMM's output: its pipes close with
/// the process, and the readers take the tail first.
pub(crate) async fn drain_readers(readers: impl IntoIterator<Item = tokio::task::JoinHandle<()>>) {
    for reader in readers {
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, reader).await;
    }
}

/// How the process ended, as the actor publishes it: its status and the tail of its
/// diagnostics, or why waiting for it failed (`vmm` names it: "QEMU").
pub(crate) fn exit_info(
    status: std::io::Result<std::process::ExitStatus>,
    diagnostics: &ConsoleLog,
    vmm: &str,
) -> ExitInfo {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => ExitInfo {
            code: s.code(),
            signal: s.signal(),
            stderr_tail: diagnostics.tail(),
        },
        Err(e) => ExitInfo {
            code: None,
            signal: None,
            stderr_tail: format!("waiting for {vmm} failed: {e}"),
        },
    }
}

/// Starts the tasks reading the VMM's output until its pipes close: its stdout (the
/// guest's serial console) into `console`, onto our stderr too when `mirror` is set, and
/// its stderr into `diagnostics`.
pub(crate) fn capture_output(
    child: &mut tokio::process::Child,
    console: &ConsoleLog,
    mirror: bool,
    diagnostics: &ConsoleLog,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(capture(out, console.clone(), mirror)));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(capture(err, diagnostics.clone(), false)));
    }
    readers
}

/// Copies one of the VMM's output streams into `log` (bounded) until it closes, and onto
/// our stderr too when `mirror` is set.
async fn capture<R: AsyncRead + Unpin>(mut src: R, log: ConsoleLog, mirror: bool) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut stderr = tokio::io::stderr();
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                log.push(&buf[..n]);
                if mirror {
                    let _ = stderr.write_all(&buf[..n]).await;
                }
            }
        }
    }
}
