//! [`FirecrackerBackend`]: turns specs into running Firecracker VMs, booted or restored.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

use super::config::FirecrackerConfig;
use super::layout::Layout;
use super::plan::{self, RestoreOverrides};
use super::probe::{self, Unavailable};
use super::snapshot::{self, Manifest, SavedNet};
use super::vm::{self, FirecrackerVm, JailLaunch, Launch};
use super::{jailer, layout};
use crate::backend::{BackendKind, Capabilities, Vm, VmBackend};
use crate::{DriveSpec, VmSpec, VmmError};

/// The Firecracker backend. Cheap to share.
#[derive(Debug, Clone)]
pub struct FirecrackerBackend {
    cfg: FirecrackerConfig,
}

/// What a VM's files need before its process starts.
enum Prepare {
    Boot,
    /// The snapshot's state and memory files.
    Restore(Vec<(PathBuf, &'static str)>),
}

impl FirecrackerBackend {
    pub fn new(cfg: FirecrackerConfig) -> Self {
        Self { cfg }
    }

    pub fn config(&self) -> &FirecrackerConfig {
        &self.cfg
    }

    /// Whether this backend can run VMs here: the binaries exist, /dev/kvm works, and
    /// (given a kernel) Firecracker boots it. See [`probe::check_available`].
    pub async fn availability(&self, kernel: Option<&Path>) -> Result<(), Unavailable> {
        probe::check_available(&self.cfg, kernel).await
    }

    /// Where the VM's files go, and for a jailed VM what the jailer needs.
    fn layout(&self, spec: &VmSpec) -> Result<(Layout, Option<JailLaunch>), VmmError> {
        let Some(jail) = &self.cfg.jailer else {
            return Ok((Layout::direct(&spec.run_dir), None));
        };
        jailer::validate(jail)?;
        // The jailer copies the binary into the jail by path: it must be absolute.
        let exec_file = probe::find_binary(&self.cfg.binary).ok_or_else(|| {
            VmmError::InvalidSpec(format!(
                "Firecracker binary {} not found",
                self.cfg.binary.display()
            ))
        })?;
        let exec_file = std::path::absolute(&exec_file)
            .map_err(|e| VmmError::io(format!("resolving {}", exec_file.display()), e))?;
        let name = jailer::exec_name(&exec_file)?;
        let layout = Layout::jailed(&spec.run_dir, jail, &name, &spec.id);
        let cgroups = jailer::cgroup_dirs(jail, &name, &spec.id);
        Ok((
            layout,
            Some(JailLaunch {
                jailer: jail.clone(),
                exec_file,
                cgroups,
            }),
        ))
    }

    /// Creates the VM's directories, puts its files in place and starts Firecracker. On
    /// failure everything created is removed again.
    fn start(
        &self,
        spec: &VmSpec,
        layout: Layout,
        jail: Option<JailLaunch>,
        prepare: Prepare,
    ) -> Result<FirecrackerVm, VmmError> {
        create_run_dir(&spec.run_dir)?;
        if let Some(jail) = &jail {
            if let Err(e) = jailer::create_jail(&jail.jailer, &layout) {
                // The jail may be another VM's: only the run dir is ours to remove.
                let _ = std::fs::remove_dir_all(&spec.run_dir);
                return Err(e);
            }
        }
        let started = (|| {
            let rootfs = match &jail {
                Some(jail) => {
                    match &prepare {
                        Prepare::Boot => jailer::link_boot_files(&jail.jailer, &layout, spec)?,
                        Prepare::Restore(files) => {
                            jailer::link_restore_files(&jail.jailer, &layout, spec, files)?
                        }
                    }
                    None
                }
                None => Some(open_disk(&spec.rootfs)?),
            };
            vm::spawn(
                &self.cfg,
                Launch {
                    id: spec.id.clone(),
                    layout: layout.clone(),
                    jail: jail.clone(),
                    console_limit: spec.console_limit,
                    console_to_stderr: spec.console_to_stderr,
                    die_with_parent: spec.die_with_parent,
                    netns: spec.netns.clone(),
                    rootfs,
                    memory_mib: spec.memory_mib,
                    vcpus: spec.vcpus,
                    network: spec.network.as_ref().map(|n| SavedNet {
                        iface_id: plan::NET_IFACE_ID.into(),
                        tap: n.tap.clone(),
                    }),
                    api_timeout: self.cfg.api_timeout,
                    snapshot_timeout: self.cfg.snapshot_timeout,
                },
            )
        })();
        if started.is_err() {
            let _ = std::fs::remove_dir_all(&spec.run_dir);
            if let Some(jail_dir) = layout.jail_dir() {
                jailer::cleanup(jail_dir, &[]);
            }
        }
        started
    }
}

/// Hands out a freshly started VM whose set-up ended with `outcome`; on failure the VM is
/// killed and cleaned up before the error is returned.
async fn finish(vm: FirecrackerVm, outcome: Result<(), VmmError>) -> Result<Box<dyn Vm>, VmmError> {
    match outcome {
        Ok(()) => Ok(Box::new(vm)),
        Err(e) => {
            let e = match e {
                // Say why it exited, with its own last words.
                VmmError::Exited(what) => VmmError::Exited(format!(
                    "{what}; console:\n{}",
                    last_lines(&vm.console_tail(), 20)
                )),
                e => e,
            };
            vm.abort().await;
            Err(e)
        }
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl VmBackend for FirecrackerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    fn capabilities(&self) -> Capabilities {
        // Firecracker runs only on KVM; `availability` says whether KVM works here.
        Capabilities {
            pause: true,
            snapshot: true,
            hardware_accel: true,
        }
    }

    fn launch(&self, spec: VmSpec) -> BoxFuture<'_, Result<Box<dyn Vm>, VmmError>> {
        Box::pin(async move {
            spec.validate()?;
            plan::check_disk(&spec)?;
            let (layout, jail) = self.layout(&spec)?;
            // Planned before anything starts, so a spec Firecracker cannot take (paths,
            // rate limits) fails without a process to clean up.
            let requests =
                plan::boot_requests(&spec, &self.cfg.boot_args, &layout.vmm_paths(&spec)?)?;
            let vm = self.start(&spec, layout, jail, Prepare::Boot)?;
            let outcome = async {
                vm.wait_for_api(self.cfg.api_socket_timeout).await?;
                vm.configure(requests).await
            }
            .await;
            finish(vm, outcome).await
        })
    }

    /// Starts a fresh Firecracker and loads the snapshot into it, resumed. The root disk
    /// the spec names takes the place of the one snapshotted (jailed: linked to
    /// `/rootfs.ext4` as before; direct: passed at the same descriptor), the TAP device is
    /// overridden when the spec names another, and the vsock socket when its path differs
    /// (Firecracker binds it on load, so it must be free: it is, in the new run directory
    /// or jail). The snapshot's memory file must stay unchanged while the VM runs.
    fn restore<'a>(
        &'a self,
        spec: VmSpec,
        snapshot: &'a Path,
    ) -> BoxFuture<'a, Result<Box<dyn Vm>, VmmError>> {
        Box::pin(async move {
            spec.validate()?;
            plan::check_disk(&spec)?;
            let (layout, jail) = self.layout(&spec)?;
            let manifest = Manifest::check(snapshot, &spec, &layout.rootfs())?;
            let snapshot = std::path::absolute(snapshot)
                .map_err(|e| VmmError::io(format!("resolving {}", snapshot.display()), e))?;
            let state = snapshot.join(snapshot::STATE_FILE);
            let memory = snapshot.join(snapshot::MEMORY_FILE);
            let (state_vmm, memory_vmm) = match &jail {
                None => (
                    layout::utf8("snapshot", &state)?.to_owned(),
                    layout::utf8("snapshot", &memory)?.to_owned(),
                ),
                Some(_) => (
                    format!("/{}/{}", layout::JAIL_RESTORE_DIR, snapshot::STATE_FILE),
                    format!("/{}/{}", layout::JAIL_RESTORE_DIR, snapshot::MEMORY_FILE),
                ),
            };
            let vsock_now = layout.vsock()?.vmm;
            let overrides = RestoreOverrides {
                tap: match (&manifest.network, &spec.network) {
                    (Some(saved), Some(net)) if saved.tap != net.tap => Some(net.tap.clone()),
                    _ => None,
                },
                vsock_uds: (manifest.vsock_uds != vsock_now).then_some(vsock_now),
            };
            let load = plan::snapshot_load(&state_vmm, &memory_vmm, &overrides)?;
            let files = vec![
                (state, snapshot::STATE_FILE),
                (memory, snapshot::MEMORY_FILE),
            ];
            let vm = self.start(&spec, layout, jail, Prepare::Restore(files))?;
            let outcome = async {
                vm.wait_for_api(self.cfg.api_socket_timeout).await?;
                vm.load(load).await
            }
            .await;
            finish(vm, outcome).await
        })
    }
}

/// The run directory holds the VM's control sockets: only its owner may enter it.
fn create_run_dir(path: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|e| VmmError::io(format!("creating run dir {}", path.display()), e))
}

/// Opens the root disk for a directly run Firecracker, which inherits the descriptor.
fn open_disk(drive: &DriveSpec) -> Result<OwnedFd, VmmError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(!drive.read_only)
        .open(&drive.path)
        .map(OwnedFd::from)
        .map_err(|source| VmmError::MissingFile {
            what: "rootfs",
            path: drive.path.clone(),
            source,
        })
}
