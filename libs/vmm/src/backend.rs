//! The backend trait and the types every backend shares.

use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::{VmSpec, VmmError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Qemu,
    Firecracker,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qemu => "qemu",
            Self::Firecracker => "firecracker",
        }
    }
}

/// What a backend can do on this host, so callers can choose without trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub pause: bool,
    pub snapshot: bool,
    /// Hardware virtualisation is in use (else software emulation, much slower).
    pub hardware_accel: bool,
}

/// Where the guest agent's byte stream is reached from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// Connect to this Unix socket; the stream is the agent (QEMU virtio-serial).
    Unix(PathBuf),
    /// Connect to this Unix socket and send `CONNECT <port>` first (Firecracker vsock).
    FirecrackerVsock { uds: PathBuf, port: u32 },
}

/// Run state as the VMM reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Running,
    Paused,
    Exited,
}

/// How the VMM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code of the VMM process, or None when it was killed by a signal.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Last lines of the VMM's own error output, for error messages.
    pub stderr_tail: String,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}")?,
            (None, Some(sig)) => write!(f, "killed by signal {sig}")?,
            (None, None) => write!(f, "unknown status")?,
        }
        let tail = self.stderr_tail.trim();
        if !tail.is_empty() {
            write!(f, ": {}", tail.lines().last().unwrap_or(tail))?;
        }
        Ok(())
    }
}

/// What [`Vm::snapshot`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The directory holding the snapshot's files.
    pub dir: PathBuf,
    /// Bytes of VM state (memory and devices) written.
    pub state_bytes: u64,
    pub memory_mib: u32,
    pub vcpus: u8,
}

/// A VMM: turns specs into running VMs.
pub trait VmBackend: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> BackendKind;

    fn capabilities(&self) -> Capabilities;

    /// Starts the VMM process for `spec` and boots the guest. Returns once the VMM runs;
    /// the guest is ready when its agent answers (see [`crate::connect_agent`]).
    fn launch(&self, spec: VmSpec) -> BoxFuture<'_, Result<Box<dyn Vm>, VmmError>>;

    /// Starts a VM from a snapshot taken with [`Vm::snapshot`], running. `spec` must
    /// describe the same machine (memory, vCPUs) and name a root disk in the state it had
    /// when the snapshot was taken. The guest's clock and entropy are stale afterwards:
    /// configure it through its agent before use.
    fn restore<'a>(
        &'a self,
        spec: VmSpec,
        snapshot: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<Box<dyn Vm>, VmmError>>;
}

/// A running (or paused) VM, owned by the backend's actor task.
///
/// Dropping the handle kills the VMM and removes the VM's run directory.
pub trait Vm: Send + Sync + std::fmt::Debug {
    fn id(&self) -> &str;

    /// The VMM's process id, for resource accounting.
    fn pid(&self) -> Option<u32>;

    /// Directory holding the VM's sockets and logs.
    fn run_dir(&self) -> &std::path::Path;

    fn agent_endpoint(&self) -> AgentEndpoint;

    fn state(&self) -> VmState;

    /// Stops the vCPUs; memory and devices stay as they are.
    fn pause(&self) -> BoxFuture<'_, Result<(), VmmError>>;

    fn resume(&self) -> BoxFuture<'_, Result<(), VmmError>>;

    /// Writes the VM's memory and device state into `dir` (created if missing), pausing
    /// the VM first; it stays paused. The root disk is not copied: it belongs to the
    /// caller, who must keep it as it is now (the VM cannot write while paused) to restore
    /// from this snapshot.
    fn snapshot<'a>(
        &'a self,
        dir: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<SnapshotInfo, VmmError>>;

    /// Asks the VMM to exit, and kills it if it has not within `grace`. The guest is not
    /// asked first: shut it down through its agent beforehand for a clean stop.
    fn stop(&self, grace: Duration) -> BoxFuture<'_, Result<ExitInfo, VmmError>>;

    /// Kills the VMM at once (SIGKILL).
    fn kill(&self);

    /// Resolves when the VMM has exited and its run directory is gone.
    fn wait(&self) -> BoxFuture<'_, ExitInfo>;

    /// The tail of the guest's serial console.
    fn console_tail(&self) -> String;
}
