//! One Firecracker process: spawning it (directly or through the jailer), the actor task
//! that owns it for its whole life, and the [`FirecrackerVm`] handle.
//!
//! As with QEMU, the actor holds the child process and its run directory; the handle
//! sends it API requests over a channel, so requests to one VM never interleave. When the
//! VMM exits the actor records its status and diagnostics, removes the run directory (and
//! the jail and cgroup), and only then publishes the exit. Dropping the last handle kills
//! the VMM.
//!
//! Three output streams, all bounded: the guest's serial console is Firecracker's stdout
//! (kept as the console tail); Firecracker's own log goes to a FIFO in its directory and,
//! with its stderr (panics), into a 16 KiB diagnostics tail for error messages.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch};

use super::api::{InstanceInfo, VmRunState};
use super::client::ApiClient;
use super::config::{FirecrackerConfig, JailerConfig};
use super::jailer;
use super::layout::{self, Layout};
use super::plan::{self, PlannedRequest, AGENT_VSOCK_PORT};
use super::snapshot::{self, SavedNet};
use crate::backend::{AgentEndpoint, ExitInfo, SnapshotInfo, Vm, VmState};
use crate::process::{
    capture_output, drain_readers, exit_info, next_event, ActorEvent, RunState, VmmProcess,
};
use crate::{ConsoleLog, VmmError};

const DIAGNOSTICS_LIMIT: usize = 16 * 1024;
/// How often the API socket is looked for while Firecracker starts.
const SOCKET_POLL: Duration = Duration::from_millis(5);
/// How long a failed launch waits for the killed VMM to be reaped and cleaned up.
const ABORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Running under the jailer: what the command line and the cleanup need.
#[derive(Debug, Clone)]
pub(crate) struct JailLaunch {
    pub jailer: JailerConfig,
    /// The Firecracker binary the jailer copies into the jail (absolute).
    pub exec_file: PathBuf,
    /// The VM's cgroups, removed after the VMM exits.
    pub cgroups: Vec<PathBuf>,
}

/// Everything needed to start one Firecracker process.
#[derive(Debug)]
pub(crate) struct Launch {
    pub id: String,
    pub layout: Layout,
    pub jail: Option<JailLaunch>,
    pub console_limit: usize,
    pub console_to_stderr: bool,
    pub die_with_parent: bool,
    pub netns: Option<PathBuf>,
    /// The root disk, handed to a directly run Firecracker at [`layout::ROOTFS_FD`].
    pub rootfs: Option<OwnedFd>,
    pub memory_mib: u32,
    pub vcpus: u8,
    pub network: Option<SavedNet>,
    pub api_timeout: Duration,
    pub snapshot_timeout: Duration,
}

/// Starts Firecracker for `launch` and the actor that owns it. The caller then waits for
/// the API socket and configures the VM; dropping the returned handle on failure kills
/// the VMM and cleans up.
pub(crate) fn spawn(cfg: &FirecrackerConfig, launch: Launch) -> Result<FirecrackerVm, VmmError> {
    let api_socket = launch.layout.api_socket()?;
    let vsock = launch.layout.vsock()?;
    let log = launch.layout.log()?;

    // Firecracker's own log goes to a FIFO we read into a bounded tail, not to stdout
    // (its default), where it would mix with the guest's console. Opened read-write so it
    // never reports end-of-file while Firecracker has not opened it yet, and so
    // Firecracker's open never waits for a reader.
    nix::unistd::mkfifo(
        &log.host,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .map_err(|e| VmmError::io(format!("creating {}", log.host.display()), e.into()))?;
    if let Some(jail) = &launch.jail {
        jailer::chown(&jail.jailer, &log.host)?;
    }
    let log_rx = pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&log.host)
        .map_err(|e| VmmError::io(format!("opening {}", log.host.display()), e))?;

    let fc_args: Vec<std::ffi::OsString> = vec![
        "--api-sock".into(),
        api_socket.vmm.clone().into(),
        "--log-path".into(),
        log.vmm.clone().into(),
        "--level".into(),
        cfg.log_level.as_str().into(),
    ];
    let (mut cmd, program) = match &launch.jail {
        None => {
            let mut cmd = Command::new(&cfg.binary);
            cmd.args(&fc_args).arg("--id").arg(&launch.id);
            (cmd, cfg.binary.clone())
        }
        Some(jail) => {
            let mut cmd = Command::new(&jail.jailer.binary);
            // The jailer joins the namespace itself (before dropping privileges).
            cmd.args(jailer::command_args(
                &jail.jailer,
                &jail.exec_file,
                &launch.id,
                launch.netns.as_deref(),
                &fc_args,
            ));
            (cmd, jail.jailer.binary.clone())
        }
    };
    if let Some(fd) = launch.rootfs {
        let numbers = crate::process::pass_fds(&mut cmd, vec![fd]).map_err(VmmError::Control)?;
        if numbers != [layout::ROOTFS_FD] {
            return Err(VmmError::Control(format!(
                "the root disk was passed at descriptor {numbers:?}, not {}",
                layout::ROOTFS_FD
            )));
        }
    }
    // stdin is a pipe we hold open and never write: Firecracker's serial device polls its
    // stdin, and /dev/null (always readable, end-of-file) or a closed pipe (hang-up) is
    // something it must then handle; an idle pipe is a console nobody types into.
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Terminal signals (Ctrl-C) go to the foreground group; the VM's owner decides.
        .process_group(0)
        .kill_on_drop(true);
    if launch.die_with_parent {
        // Under the jailer this lasts only until it drops privileges (the kernel clears
        // the parent-death signal on a credential change).
        crate::process::die_with_parent(&mut cmd);
    }
    if let (Some(netns), None) = (&launch.netns, &launch.jail) {
        crate::process::enter_netns(&mut cmd, netns).map_err(|source| VmmError::Spawn {
            binary: format!("{} (entering {})", program.display(), netns.display()),
            source,
        })?;
    }
    let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
        binary: program.display().to_string(),
        source,
    })?;
    tracing::debug!(vm = %launch.id, pid = ?child.id(), jailed = launch.jail.is_some(), "Firecracker started");

    let console = ConsoleLog::new(launch.console_limit);
    let diagnostics = ConsoleLog::new(DIAGNOSTICS_LIMIT);
    let readers = capture_output(&mut child, &console, launch.console_to_stderr, &diagnostics);
    let (stop_log, stop_rx) = oneshot::channel();
    let log_reader = tokio::spawn(capture_fifo(log_rx, diagnostics.clone(), stop_rx));
    let stdin = child.stdin.take();

    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let state = RunState::new(VmState::Running);
    let (process, exit_tx) = VmmProcess::new(child.id(), state.clone());
    let api = ApiClient::new(&api_socket.host, launch.api_timeout);
    let actor = Actor {
        child,
        _stdin: stdin,
        api: api.clone(),
        layout: launch.layout.clone(),
        cgroups: launch
            .jail
            .as_ref()
            .map(|j| j.cgroups.clone())
            .unwrap_or_default(),
        state,
        diagnostics,
        readers,
        log_reader: Some((log_reader, stop_log)),
    };
    tokio::spawn(actor.run(cmd_rx, exit_tx));
    Ok(FirecrackerVm {
        id: launch.id,
        process,
        run_dir: launch.layout.run_dir().to_path_buf(),
        api_socket: api_socket.host,
        vsock,
        drive_path: launch.layout.rootfs(),
        layout: launch.layout,
        jailer: launch.jail.map(|j| j.jailer),
        commands: cmd_tx,
        console,
        memory_mib: launch.memory_mib,
        vcpus: launch.vcpus,
        network: launch.network,
        api_timeout: launch.api_timeout,
        snapshot_timeout: launch.snapshot_timeout,
        snapshots: AtomicU32::new(0),
    })
}

/// Reads the log FIFO until told the VMM has exited, then takes what is left without
/// waiting (we hold a write end ourselves, so the FIFO never reports end-of-file).
async fn capture_fifo(mut rx: pipe::Receiver, log: ConsoleLog, mut stop: oneshot::Receiver<()>) {
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        tokio::select! {
            read = rx.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => log.push(&buf[..n]),
            },
            _ = &mut stop => break,
        }
    }
    while let Ok(n) = rx.try_read(&mut buf) {
        if n == 0 {
            return;
        }
        log.push(&buf[..n]);
    }
}

enum ActorCommand {
    Send {
        request: PlannedRequest,
        timeout: Duration,
        /// The run state after the request succeeds, if it changes it.
        then: Option<VmState>,
        reply: oneshot::Sender<Result<(), VmmError>>,
    },
    Info {
        reply: oneshot::Sender<Result<InstanceInfo, VmmError>>,
    },
}

impl std::fmt::Debug for ActorCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Send { request, .. } => {
                write!(f, "Send({} {})", request.method.as_str(), request.path)
            }
            Self::Info { .. } => write!(f, "Info"),
        }
    }
}

/// Owns the Firecracker process for its whole life.
struct Actor {
    child: tokio::process::Child,
    /// Held, never written: see `spawn`.
    _stdin: Option<tokio::process::ChildStdin>,
    api: ApiClient,
    layout: Layout,
    cgroups: Vec<PathBuf>,
    state: RunState,
    diagnostics: ConsoleLog,
    readers: Vec<tokio::task::JoinHandle<()>>,
    log_reader: Option<(tokio::task::JoinHandle<()>, oneshot::Sender<()>)>,
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
                ActorEvent::Command(ActorCommand::Send {
                    request,
                    timeout,
                    then,
                    reply,
                }) => {
                    let result = self.api.with_timeout(timeout).send(&request).await;
                    if let (Ok(()), Some(state)) = (&result, then) {
                        // Not over an exit the actor has not seen yet: it only ever marks
                        // the VM exited below, once the process is gone.
                        self.state.set(state);
                    }
                    let _ = reply.send(result);
                }
                ActorEvent::Command(ActorCommand::Info { reply }) => {
                    let _ = reply.send(self.api.instance_info().await);
                }
            }
        };
        self.state.set(VmState::Exited);
        if let Some((reader, stop)) = self.log_reader.take() {
            let _ = stop.send(());
            drain_readers([reader]).await;
        }
        drain_readers(self.readers.drain(..)).await;
        let run_dir = self.layout.run_dir().to_path_buf();
        if let Err(e) = tokio::fs::remove_dir_all(&run_dir).await {
            tracing::warn!(dir = %run_dir.display(), error = %e, "removing VM run dir");
        }
        if let Some(jail_dir) = self.layout.jail_dir() {
            let jail_dir = jail_dir.to_path_buf();
            let cgroups = std::mem::take(&mut self.cgroups);
            let _ = tokio::task::spawn_blocking(move || jailer::cleanup(&jail_dir, &cgroups)).await;
        }
        let info = exit_info(status, &self.diagnostics, "Firecracker");
        let _ = exit.send(Some(info));
    }
}

/// Handle to a Firecracker VM.
#[derive(Debug)]
pub struct FirecrackerVm {
    id: String,
    process: VmmProcess,
    run_dir: PathBuf,
    api_socket: PathBuf,
    vsock: layout::Place,
    /// The root disk's path as Firecracker opened it (recorded in snapshots).
    drive_path: String,
    layout: Layout,
    jailer: Option<JailerConfig>,
    commands: mpsc::UnboundedSender<ActorCommand>,
    console: ConsoleLog,
    memory_mib: u32,
    vcpus: u8,
    network: Option<SavedNet>,
    api_timeout: Duration,
    snapshot_timeout: Duration,
    /// Names each snapshot's staging directory inside a jail.
    snapshots: AtomicU32,
}

impl FirecrackerVm {
    /// The API socket on the host (under the jail when jailed).
    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    /// Sends one request through the actor.
    pub(crate) async fn send(
        &self,
        request: PlannedRequest,
        timeout: Duration,
        then: Option<VmState>,
    ) -> Result<(), VmmError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(ActorCommand::Send {
                request,
                timeout,
                then,
                reply,
            })
            .map_err(|_| VmmError::Exited("the VM is gone".into()))?;
        rx.await
            .map_err(|_| VmmError::Exited("the VM exited during the request".into()))?
    }

    pub(crate) async fn configure(&self, plan: Vec<PlannedRequest>) -> Result<(), VmmError> {
        for request in plan {
            self.send(request, self.api_timeout, None).await?;
        }
        Ok(())
    }

    /// Loads a snapshot into this fresh VMM, which resumes it.
    pub(crate) async fn load(&self, request: PlannedRequest) -> Result<(), VmmError> {
        self.send(request, self.snapshot_timeout, Some(VmState::Running))
            .await
    }

    async fn instance_info(&self) -> Result<InstanceInfo, VmmError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(ActorCommand::Info { reply })
            .map_err(|_| VmmError::Exited("the VM is gone".into()))?;
        rx.await
            .map_err(|_| VmmError::Exited("the VM exited during the request".into()))?
    }

    /// Waits until Firecracker accepts connections on its API socket, at most `timeout`,
    /// and reports at once if it exits first.
    pub(crate) async fn wait_for_api(&self, timeout: Duration) -> Result<(), VmmError> {
        let poll = async {
            loop {
                if UnixStream::connect(&self.api_socket).await.is_ok() {
                    return;
                }
                tokio::time::sleep(SOCKET_POLL).await;
            }
        };
        tokio::select! {
            found = tokio::time::timeout(timeout, poll) => {
                found.map_err(|_| VmmError::Timeout(timeout, "the Firecracker API socket"))
            }
            exit = self.wait_exit() => Err(VmmError::Exited(format!(
                "{exit} before creating its API socket"
            ))),
        }
    }

    /// For a launch that failed: kills the VMM and waits (bounded) until it is reaped and
    /// its directories are gone, so the caller's error means "nothing left running".
    pub(crate) async fn abort(self) {
        self.kill();
        let _ = tokio::time::timeout(ABORT_TIMEOUT, self.wait_exit()).await;
    }

    pub(crate) async fn wait_exit(&self) -> ExitInfo {
        self.process.wait_exit().await
    }

    async fn set_run_state(&self, state: VmRunState) -> Result<(), VmmError> {
        let then = match state {
            VmRunState::Paused => VmState::Paused,
            VmRunState::Resumed => VmState::Running,
        };
        self.send(plan::vm_state(state)?, self.api_timeout, Some(then))
            .await
    }

    async fn take_snapshot(&self, dir: &Path) -> Result<SnapshotInfo, VmmError> {
        if self.state() == VmState::Exited {
            return Err(VmmError::Exited("the VM is gone".into()));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| VmmError::io(format!("creating {}", dir.display()), e))?;
        let dir = std::path::absolute(dir)
            .map_err(|e| VmmError::io(format!("resolving {}", dir.display()), e))?;
        // Without a manifest a directory is no snapshot: a failure from here on must not
        // leave an older manifest describing half-replaced files.
        match std::fs::remove_file(dir.join(snapshot::MANIFEST_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(VmmError::io(format!("clearing {}", dir.display()), e)),
        }
        // Firecracker writes into staging files that are then renamed into place, never
        // over the final names: those may be the files a VM restored from this directory
        // still maps as its memory, and Firecracker truncates what it writes to.
        let (staging, state_vmm, memory_vmm) = match &self.jailer {
            None => {
                let state = dir.join(format!("{}.partial", snapshot::STATE_FILE));
                let memory = dir.join(format!("{}.partial", snapshot::MEMORY_FILE));
                let vmm = (
                    layout::utf8("snapshot", &state)?.to_owned(),
                    layout::utf8("snapshot", &memory)?.to_owned(),
                );
                ((state, memory), vmm.0, vmm.1)
            }
            Some(jail) => {
                // Jailed, Firecracker can write only inside its root.
                let name = format!("snapshot-{}", self.snapshots.fetch_add(1, Ordering::SeqCst));
                let host = self.layout.root().join(&name);
                jailer::make_owned_dir(jail, &host)?;
                (
                    (
                        host.join(snapshot::STATE_FILE),
                        host.join(snapshot::MEMORY_FILE),
                    ),
                    format!("/{name}/{}", snapshot::STATE_FILE),
                    format!("/{name}/{}", snapshot::MEMORY_FILE),
                )
            }
        };
        self.set_run_state(VmRunState::Paused).await?;
        let vmm_version = self.instance_info().await?.vmm_version;
        self.send(
            plan::snapshot_create(&state_vmm, &memory_vmm)?,
            self.snapshot_timeout,
            None,
        )
        .await?;
        let state = dir.join(snapshot::STATE_FILE);
        let memory = dir.join(snapshot::MEMORY_FILE);
        jailer::move_file(&staging.0, &state)?;
        jailer::move_file(&staging.1, &memory)?;
        if let Some(parent) = staging.0.parent().filter(|_| self.jailer.is_some()) {
            let _ = std::fs::remove_dir(parent);
        }
        snapshot::manifest(
            self.memory_mib,
            self.vcpus,
            vmm_version,
            self.drive_path.clone(),
            self.vsock.vmm.clone(),
            self.network.clone(),
        )
        .write(&dir)?;
        let size = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.len())
                .map_err(|e| VmmError::io(format!("reading {}", p.display()), e))
        };
        Ok(SnapshotInfo {
            state_bytes: size(&state)? + size(&memory)?,
            dir,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
        })
    }
}

impl Vm for FirecrackerVm {
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
        AgentEndpoint::FirecrackerVsock {
            uds: self.vsock.host.clone(),
            port: AGENT_VSOCK_PORT,
        }
    }

    fn state(&self) -> VmState {
        self.process.state()
    }

    fn pause(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(self.set_run_state(VmRunState::Paused))
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(self.set_run_state(VmRunState::Resumed))
    }

    /// Writes a full snapshot (state and all memory) into `dir`, pausing the VM first;
    /// it stays paused. Firecracker resets the guest's vsock transport when it snapshots:
    /// open agent connections end, and the caller reconnects after resuming (the guest's
    /// listener survives).
    fn snapshot<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, Result<SnapshotInfo, VmmError>> {
        Box::pin(self.take_snapshot(dir))
    }

    /// Sends Ctrl-Alt-Del (Firecracker's only request to its guest), then kills the VMM
    /// if it has not exited within `grace`. The guest reboots on Ctrl-Alt-Del only if its
    /// kernel turns the key press into one (our kernel has no virtual terminal layer, so
    /// expect the kill): shut the guest down through its agent first for a clean stop. A
    /// paused VM cannot act on it and is killed at once.
    fn stop(&self, grace: Duration) -> BoxFuture<'_, Result<ExitInfo, VmmError>> {
        Box::pin(async move {
            match self.state() {
                VmState::Exited => return Ok(self.wait_exit().await),
                VmState::Paused => {
                    self.kill();
                    return Ok(self.wait_exit().await);
                }
                VmState::Running => {
                    // May fail if Firecracker is already on its way out; waiting covers both.
                    if let Ok(request) = plan::ctrl_alt_del() {
                        let _ = tokio::time::timeout(grace, self.send(request, grace, None)).await;
                    }
                }
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
