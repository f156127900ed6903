//! QEMU `-M microvm` backend.
//!
//! The guest boots straight into the PVH entry of an uncompressed kernel with virtio-mmio
//! devices only: a virtio-blk root disk, a virtio-serial port for the agent, virtio-rng,
//! the serial console on QEMU's stdout, and QMP for control. Both control sockets are
//! bound by this process and handed to QEMU as listening descriptors, so they exist before
//! QEMU starts (no waiting for a path to appear) and stay reachable by path for a host
//! process that re-attaches later.

mod args;
mod qmp;
mod snapshot;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch, OnceCell};

pub use args::{build_args, kernel_cmdline, PassedFds, QemuConfig};
pub use qmp::Qmp;

use crate::backend::{
    AgentEndpoint, BackendKind, Capabilities, ExitInfo, SnapshotInfo, Vm, VmBackend, VmState,
};
use crate::process::{
    capture_output, drain_readers, exit_info, next_event, ActorEvent, RunState, VmmProcess,
};
use crate::{detect_accel, Accel, ConsoleLog, VmSpec, VmmError};

const STDERR_LIMIT: usize = 16 * 1024;

/// The QEMU backend. Cheap to share; the accelerator is detected once, on first launch.
#[derive(Debug)]
pub struct QemuBackend {
    cfg: QemuConfig,
    accel: OnceCell<Accel>,
    tsc_khz: Option<u64>,
}

impl QemuBackend {
    pub fn new(cfg: QemuConfig) -> Self {
        Self {
            cfg,
            accel: OnceCell::new(),
            tsc_khz: host_tsc_khz(),
        }
    }

    pub fn config(&self) -> &QemuConfig {
        &self.cfg
    }

    /// The accelerator VMs of this backend use (probing on first call).
    pub async fn accel(&self, kernel: &Path) -> Accel {
        *self
            .accel
            .get_or_init(|| {
                detect_accel(
                    self.cfg.accel,
                    &self.cfg.binary,
                    kernel,
                    self.cfg.accel_cache.as_deref(),
                )
            })
            .await
    }

    /// The exact command line `launch` would run, for benchmarks comparing against bare
    /// QEMU and for debugging.
    pub async fn command_line(&self, spec: &VmSpec, fds: PassedFds) -> Vec<std::ffi::OsString> {
        let accel = self.accel(&spec.kernel).await;
        build_args(spec, accel, &self.cfg, self.tsc_khz, fds)
    }
}

/// The host TSC frequency, from /proc/cpuinfo. Under TCG the guest's TSC runs at the host
/// rate, so telling the guest spares it an unreliable calibration.
fn host_tsc_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = text
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// The run directory holds the VM's control sockets: only its owner may enter it.
fn create_run_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(path)
}

/// Hands `dir` to `user` (QEMU's `-runas` user), for the snapshot writer QEMU starts.
fn give_to_user(dir: &Path, user: &str) -> Result<(), VmmError> {
    let found = nix::unistd::User::from_name(user)
        .map_err(|e| VmmError::Control(format!("looking up user {user}: {e}")))?
        .ok_or_else(|| VmmError::Control(format!("user {user} does not exist")))?;
    nix::unistd::chown(dir, Some(found.uid), Some(found.gid))
        .map_err(|e| VmmError::io(format!("handing {} to {user}", dir.display()), e.into()))
}

fn bind_listener(path: &Path) -> Result<OwnedFd, VmmError> {
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| VmmError::io(format!("binding {}", path.display()), e))?;
    Ok(OwnedFd::from(listener))
}

impl VmBackend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            snapshot: true,
            hardware_accel: self.accel.get() == Some(&Accel::Kvm),
        }
    }

    fn launch(&self, spec: VmSpec) -> BoxFuture<'_, Result<Box<dyn Vm>, VmmError>> {
        Box::pin(async move {
            spec.validate()?;
            let accel = self.accel(&spec.kernel).await;
            create_run_dir(&spec.run_dir).map_err(|e| {
                VmmError::io(format!("creating run dir {}", spec.run_dir.display()), e)
            })?;
            match self.spawn(&spec, accel, false) {
                Ok(vm) => Ok(Box::new(vm) as Box<dyn Vm>),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&spec.run_dir);
                    Err(e)
                }
            }
        })
    }

    fn restore<'a>(
        &'a self,
        spec: VmSpec,
        snapshot: &'a Path,
    ) -> BoxFuture<'a, Result<Box<dyn Vm>, VmmError>> {
        Box::pin(async move {
            spec.validate()?;
            if spec.rootfs.ephemeral {
                return Err(VmmError::InvalidSpec(
                    "a restored VM needs the root disk saved with its snapshot, not an ephemeral one"
                        .into(),
                ));
            }
            snapshot::Manifest::check(snapshot, &spec)?;
            let state = snapshot::state_path(snapshot);
            std::fs::metadata(&state).map_err(|source| VmmError::MissingFile {
                what: "snapshot state",
                path: state.clone(),
                source,
            })?;
            let uri = snapshot::load_uri(snapshot)?;
            let accel = self.accel(&spec.kernel).await;
            create_run_dir(&spec.run_dir).map_err(|e| {
                VmmError::io(format!("creating run dir {}", spec.run_dir.display()), e)
            })?;
            let vm = match self.spawn(&spec, accel, true) {
                Ok(vm) => vm,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&spec.run_dir);
                    return Err(e);
                }
            };
            // From here on, dropping `vm` on error kills QEMU and removes the run dir.
            vm.qmp("migrate-incoming", Some(snapshot::migrate_args(&uri)))
                .await?;
            vm.wait_for_migration().await?;
            vm.qmp("cont", None).await?;
            Ok(Box::new(vm) as Box<dyn Vm>)
        })
    }
}

impl QemuBackend {
    fn spawn(&self, spec: &VmSpec, accel: Accel, incoming: bool) -> Result<QemuVm, VmmError> {
        let agent_path = spec.run_dir.join("agent.sock");
        let qmp_path = spec.run_dir.join("qmp.sock");
        let fds = vec![bind_listener(&agent_path)?, bind_listener(&qmp_path)?];

        let mut cmd = Command::new(&self.cfg.binary);
        let numbers = crate::process::pass_fds(&mut cmd, fds).map_err(VmmError::Control)?;
        let passed = PassedFds {
            agent_listener: numbers[0],
            qmp_listener: numbers[1],
        };
        cmd.args(build_args(spec, accel, &self.cfg, self.tsc_khz, passed));
        if incoming {
            // Wait for the migration stream (sent over QMP) instead of booting.
            cmd.args(["-incoming", "defer"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Terminal signals (Ctrl-C) go to the foreground group; the VM's owner decides.
            .process_group(0)
            .kill_on_drop(true);
        if spec.die_with_parent {
            crate::process::die_with_parent(&mut cmd);
        }
        if let Some(netns) = &spec.netns {
            crate::process::enter_netns(&mut cmd, netns).map_err(|source| VmmError::Spawn {
                binary: format!(
                    "{} (entering {})",
                    self.cfg.binary.display(),
                    netns.display()
                ),
                source,
            })?;
        }
        let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: self.cfg.binary.display().to_string(),
            source,
        })?;
        tracing::debug!(vm = %spec.id, pid = ?child.id(), accel = accel.as_str(), "QEMU started");

        let console = ConsoleLog::new(spec.console_limit);
        let stderr_tail = ConsoleLog::new(STDERR_LIMIT);
        let readers = capture_output(&mut child, &console, spec.console_to_stderr, &stderr_tail);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let state = RunState::new(if incoming {
            VmState::Paused
        } else {
            VmState::Running
        });
        let (process, exit_tx) = VmmProcess::new(child.id(), state.clone());
        let actor = Actor {
            child,
            qmp_path,
            qmp: None,
            run_dir: spec.run_dir.clone(),
            state,
            stderr_tail,
            readers,
        };
        tokio::spawn(actor.run(cmd_rx, exit_tx));
        Ok(QemuVm {
            id: spec.id.clone(),
            process,
            run_dir: spec.run_dir.clone(),
            agent_path,
            commands: cmd_tx,
            console,
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            ephemeral_disk: spec.rootfs.ephemeral,
            run_as: self.cfg.run_as.clone(),
        })
    }
}

enum ActorCommand {
    Qmp {
        command: &'static str,
        arguments: Option<serde_json::Value>,
        reply: oneshot::Sender<Result<serde_json::Value, VmmError>>,
    },
}

/// Owns the QEMU process for its whole life.
struct Actor {
    child: tokio::process::Child,
    qmp_path: PathBuf,
    qmp: Option<Qmp>,
    run_dir: PathBuf,
    state: RunState,
    stderr_tail: ConsoleLog,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Actor {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<ActorCommand>,
        exit: watch::Sender<Option<ExitInfo>>,
    ) {
        let status = loop {
            match next_event(&mut self.child, &mut commands).await {
                ActorEvent::Exited(status) => break status,
                ActorEvent::Command(ActorCommand::Qmp {
                    command,
                    arguments,
                    reply,
                }) => {
                    let result = self.qmp(command, arguments).await;
                    let _ = reply.send(result);
                }
            }
        };
        self.state.set(VmState::Exited);
        drain_readers(self.readers.drain(..)).await;
        if let Err(e) = tokio::fs::remove_dir_all(&self.run_dir).await {
            tracing::warn!(dir = %self.run_dir.display(), error = %e, "removing VM run dir");
        }
        let _ = exit.send(Some(exit_info(status, &self.stderr_tail, "QEMU")));
    }

    async fn qmp(
        &mut self,
        command: &'static str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, VmmError> {
        if self.qmp.is_none() {
            self.qmp = Some(Qmp::connect(&self.qmp_path).await?);
        }
        let qmp = self
            .qmp
            .as_mut()
            .ok_or_else(|| VmmError::Control("QMP unavailable".into()))?;
        let result = qmp.execute(command, arguments).await;
        if result.is_err() {
            // Reconnect next time rather than reuse a stream in an unknown state.
            self.qmp = None;
        }
        let value = result?;
        match command {
            "stop" => self.state.set(VmState::Paused),
            "cont" => self.state.set(VmState::Running),
            _ => {}
        }
        Ok(value)
    }
}

/// Handle to a QEMU VM.
#[derive(Debug)]
pub struct QemuVm {
    id: String,
    process: VmmProcess,
    run_dir: PathBuf,
    agent_path: PathBuf,
    commands: mpsc::UnboundedSender<ActorCommand>,
    console: ConsoleLog,
    memory_mib: u32,
    vcpus: u8,
    ephemeral_disk: bool,
    /// The user QEMU runs as (`-runas`): the migration helper it starts to write a
    /// snapshot runs as that user, so the snapshot directory must be theirs.
    run_as: Option<String>,
}

impl std::fmt::Debug for ActorCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Qmp { command, .. } => write!(f, "Qmp({command})"),
        }
    }
}

impl QemuVm {
    async fn qmp(
        &self,
        command: &'static str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, VmmError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(ActorCommand::Qmp {
                command,
                arguments,
                reply,
            })
            .map_err(|_| VmmError::Exited("the VM is gone".into()))?;
        rx.await
            .map_err(|_| VmmError::Exited("the VM exited during the command".into()))?
    }

    /// Polls `query-migrate` until the migration (either direction) has completed.
    async fn wait_for_migration(&self) -> Result<(), VmmError> {
        let poll = async {
            loop {
                let reply = self.qmp("query-migrate", None).await?;
                if snapshot::migration_done(&reply)? {
                    return Ok(());
                }
                tokio::time::sleep(snapshot::MIGRATION_POLL).await;
            }
        };
        tokio::select! {
            result = tokio::time::timeout(snapshot::MIGRATION_TIMEOUT, poll) => result
                .map_err(|_| VmmError::Timeout(snapshot::MIGRATION_TIMEOUT, "the migration stream"))?,
            exit = self.wait_exit() => Err(VmmError::Exited(exit.to_string())),
        }
    }

    async fn wait_exit(&self) -> ExitInfo {
        self.process.wait_exit().await
    }
}

impl Vm for QemuVm {
    fn id(&self) -> &str {
        &self.id
    }

    fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    fn agent_endpoint(&self) -> AgentEndpoint {
        AgentEndpoint::Unix(self.agent_path.clone())
    }

    fn state(&self) -> VmState {
        self.process.state()
    }

    fn pause(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(async move { self.qmp("stop", None).await.map(drop) })
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(async move { self.qmp("cont", None).await.map(drop) })
    }

    fn snapshot<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, Result<SnapshotInfo, VmmError>> {
        Box::pin(async move {
            if self.ephemeral_disk {
                // Its writes live in a throwaway overlay that no restore could find.
                return Err(VmmError::InvalidSpec(
                    "a VM with an ephemeral root disk cannot be snapshotted".into(),
                ));
            }
            let uri = snapshot::save_uri(dir)?;
            std::fs::create_dir_all(dir)
                .map_err(|e| VmmError::io(format!("creating {}", dir.display()), e))?;
            if let Some(user) = &self.run_as {
                give_to_user(dir, user)?;
            }
            self.qmp("stop", None).await?;
            self.qmp("migrate", Some(snapshot::migrate_args(&uri)))
                .await?;
            self.wait_for_migration().await?;
            snapshot::Manifest::for_spec(self.memory_mib, self.vcpus).write(dir)?;
            let state = snapshot::state_path(dir);
            let state_bytes = std::fs::metadata(&state)
                .map_err(|e| VmmError::io(format!("reading {}", state.display()), e))?
                .len();
            Ok(SnapshotInfo {
                dir: dir.to_path_buf(),
                state_bytes,
                memory_mib: self.memory_mib,
                vcpus: self.vcpus,
            })
        })
    }

    fn stop(&self, grace: Duration) -> BoxFuture<'_, Result<ExitInfo, VmmError>> {
        Box::pin(async move {
            if self.state() != VmState::Exited {
                // "quit" may fail if QEMU is already on its way out; waiting covers both.
                let _ = tokio::time::timeout(grace, self.qmp("quit", None)).await;
            }
            Ok(self.process.exit_within(grace).await)
        })
    }

    fn kill(&self) {
        self.process.kill();
    }

    fn wait(&self) -> BoxFuture<'_, ExitInfo> {
        Box::pin(self.wait_exit())
    }

    fn console_tail(&self) -> String {
        self.console.tail()
    }
}
