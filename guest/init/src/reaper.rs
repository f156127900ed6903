//! Child process table and the reaper that PID 1 must be.
//!
//! PID 1 inherits every orphan in the VM, so it must `waitpid(-1)` or zombies pile up.
//! That same wait would steal the exit status of the agent's own children, so there is
//! one table: `spawn` registers a child under the table lock, and the reaper, which also
//! waits under the lock, hands each status to the task that registered the pid and
//! discards the rest (orphans). Holding the lock across `spawn` closes the race in which a
//! child exits before it is registered.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, PoisonError};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Default)]
struct Table {
    waiting: HashMap<i32, oneshot::Sender<Exit>>,
}

/// Shared handle to the child table.
#[derive(Debug, Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaping task. Must run before the first
    /// spawn so that no SIGCHLD is missed.
    pub fn start() -> std::io::Result<Self> {
        let reaper = Self::default();
        let mut sigchld = signal(SignalKind::child())?;
        let task = reaper.clone();
        tokio::spawn(async move {
            loop {
                task.reap_all();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns `cmd` and returns the child with a receiver for its exit. The caller must not
    /// wait on the `Child` itself.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<Exit>)> {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        // A pid fits in i32 on Linux.
        table.waiting.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    fn reap_all(&self) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(_) => return,
            };
            if let Some(tx) = table.waiting.remove(&pid.as_raw()) {
                let _ = tx.send(exit);
            }
        }
    }
}
