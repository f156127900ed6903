//! Booting and tearing down one VM with everything it owns: a record written first, a
//! copy-on-write disk cloned from the cached template, the VMM process, its cgroups, and
//! the guest agent connection. Teardown undoes all of it in reverse, and works from a
//! bare record too (recovery after a restart).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nanobox_core::NetworkMode;
use nanobox_guest_client::AgentClient;
use nanobox_node_storage::{clone_rootfs_async, CachedTemplate, CloneOptions, CowClone, CowMethod};
use nanobox_vmm::{connect_agent, DiskFormat, DriveSpec, RateLimit, Vm, VmBackend, VmSpec};

use crate::cgroup::{self, CgroupLayout, Limits};
use crate::record::{RecordStore, SnapshotRecord, VmRecord};
use crate::{NodeConfig, NodeError, ResolvedTemplate};

/// How long a VMM gets to exit after being asked before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// A booted VM whose agent answers.
pub(crate) struct BootedVm {
    pub vm: Box<dyn Vm>,
    /// Its network (a namespace, and a device unless isolated), when the node has one.
    pub network: Option<nanobox_net::SandboxNetwork>,
    pub agent: AgentClient,
    pub record: VmRecord,
    pub disk: CowClone,
    /// Keeps the cached template from being evicted while the VM uses it.
    pub template: CachedTemplate,
    pub boot_time: Duration,
}

impl std::fmt::Debug for BootedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootedVm")
            .field("vm_id", &self.record.vm_id)
            .field("disk", &self.disk.method)
            .finish()
    }
}

/// The size and network of a VM to boot.
#[derive(Debug, Clone)]
pub(crate) struct VmShape {
    pub vcpus: u32,
    pub memory_mb: u32,
    pub mode: NetworkMode,
    pub rate_limit: Option<RateLimit>,
    /// Sandboxes of the same tenant scope reach each other; pooled VMs have none.
    pub tenant_scope: Option<String>,
}

/// What booting needs from the node.
pub(crate) struct Booter {
    pub config: Arc<NodeConfig>,
    pub network: Option<nanobox_net::NodeNetwork>,
    pub backend: Arc<dyn VmBackend>,
    pub records: RecordStore,
    pub cgroups: CgroupLayout,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Booter {
    pub fn disk_path(&self, vm_id: &str) -> PathBuf {
        self.config
            .state_dir
            .join("disks")
            .join(format!("{vm_id}.img"))
    }

    pub fn run_dir(&self, vm_id: &str) -> PathBuf {
        self.config.state_dir.join("run").join(vm_id)
    }

    /// Boots a VM of `template` (already in the cache) until its agent answers. On
    /// failure everything created so far is removed again.
    pub async fn boot(
        &self,
        vm_id: String,
        template: &ResolvedTemplate,
        cached: CachedTemplate,
        shape: VmShape,
    ) -> Result<BootedVm, NodeError> {
        let VmShape {
            vcpus,
            memory_mb,
            mode,
            rate_limit,
            tenant_scope,
        } = shape;
        if self.network.is_none() && mode != NetworkMode::Isolated {
            return Err(NodeError::FailedPrecondition(format!(
                "network mode {mode} needs networking, which this node does not have configured"
            )));
        }
        let mut record = VmRecord {
            vm_id: vm_id.clone(),
            sandbox_id: None,
            template: template.name.to_string(),
            template_digest: template.digest.clone(),
            vcpus,
            memory_mb,
            run_dir: self.run_dir(&vm_id),
            disk: self.disk_path(&vm_id),
            pid: None,
            cgroups: Vec::new(),
            netns: None,
            created_at_ms: now_ms(),
            expires_at_ms: 0,
            hostname: String::new(),
            env: Default::default(),
            metadata: Default::default(),
            network_mode: mode.as_str().to_owned(),
            ip: String::new(),
            boot_time_ms: 0,
            disk_method: None,
            snapshot: None,
        };
        // The record first: a crash from here on leaves a note of what may exist.
        self.records.put(&record)?;
        let mut vm: Option<Box<dyn Vm>> = None;
        let mut network = None;
        let result = self
            .boot_inner(
                &mut record,
                &cached,
                &mut vm,
                &mut network,
                rate_limit,
                tenant_scope.as_deref(),
            )
            .await;
        match result {
            Ok((agent, disk, boot_time)) => match vm {
                Some(vm) => Ok(BootedVm {
                    vm,
                    network,
                    agent,
                    record,
                    disk,
                    template: cached,
                    boot_time,
                }),
                None => Err(NodeError::Internal("booted without a VM".to_owned())),
            },
            Err(e) => {
                let console = vm.as_ref().map(|vm| vm.console_tail()).unwrap_or_default();
                self.teardown(vm, &record).await;
                if !console.is_empty() {
                    tracing::warn!(vm = %vm_id, console = %console, "boot failed");
                }
                Err(e)
            }
        }
    }

    async fn boot_inner(
        &self,
        record: &mut VmRecord,
        cached: &CachedTemplate,
        vm_slot: &mut Option<Box<dyn Vm>>,
        network_slot: &mut Option<nanobox_net::SandboxNetwork>,
        rate_limit: Option<RateLimit>,
        tenant_scope: Option<&str>,
    ) -> Result<(AgentClient, CowClone, Duration), NodeError> {
        let disks = self.config.state_dir.join("disks");
        std::fs::create_dir_all(&disks)
            .map_err(|e| NodeError::io("creating the disk directory", &disks, e))?;
        let run_parent = self.config.state_dir.join("run");
        std::fs::create_dir_all(&run_parent)
            .map_err(|e| NodeError::io("creating the run directory", &run_parent, e))?;
        let disk = clone_rootfs_async(
            cached.path().to_owned(),
            record.disk.clone(),
            CloneOptions {
                prefer: self.config.cow,
                grow_bytes: self.config.disk_headroom_bytes,
                ..CloneOptions::default()
            },
        )
        .await
        .map_err(|e| {
            NodeError::Internal(format!("cloning the template: {}", crate::describe(&e)))
        })?;
        tracing::debug!(vm = %record.vm_id, method = %disk.method, "disk cloned");
        record.disk_method = Some(disk.method);
        let (agent, boot_time) = self
            .start(
                record,
                &disk,
                None,
                vm_slot,
                network_slot,
                rate_limit,
                tenant_scope,
            )
            .await?;
        Ok((agent, disk, boot_time))
    }

    /// Starts a VM from a paused sandbox's snapshot, over the disk the snapshot left,
    /// with a new network (the guest keeps its inside address), cgroups and run
    /// directory. On failure everything but the disk, the snapshot and the record is
    /// removed again; `Err((_, true))` means the guest ran, so the disk no longer
    /// matches the snapshot.
    pub async fn restore(
        &self,
        record: &mut VmRecord,
        snapshot: &SnapshotRecord,
        cached: CachedTemplate,
        rate_limit: Option<RateLimit>,
        tenant_scope: Option<&str>,
    ) -> Result<BootedVm, (NodeError, bool)> {
        let method = record.disk_method.unwrap_or(CowMethod::SparseCopy);
        let disk = CowClone {
            path: record.disk.clone(),
            method,
            format: match method {
                CowMethod::Qcow2 => DiskFormat::Qcow2,
                CowMethod::Reflink | CowMethod::SparseCopy => DiskFormat::Raw,
            },
            disk_bytes: std::fs::metadata(&record.disk).map_or(0, |m| m.len()),
        };
        let mut vm: Option<Box<dyn Vm>> = None;
        let mut network = None;
        let result = self
            .start(
                record,
                &disk,
                Some(&snapshot.dir),
                &mut vm,
                &mut network,
                rate_limit,
                tenant_scope,
            )
            .await;
        match (result, vm) {
            (Ok((agent, boot_time)), Some(vm)) => Ok(BootedVm {
                vm,
                network,
                agent,
                record: record.clone(),
                disk,
                template: cached,
                boot_time,
            }),
            (Ok(_), None) => {
                self.release_vm(None, record).await;
                Err((
                    NodeError::Internal("restored without a VM".to_owned()),
                    false,
                ))
            }
            (Err(e), vm) => {
                // The VMM only runs the guest once the restore went through.
                let ran = vm.is_some();
                self.release_vm(vm, record).await;
                Err((e, ran))
            }
        }
    }

    /// Network, VMM (booted, or restored from `snapshot`), cgroups, agent connection.
    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        record: &mut VmRecord,
        disk: &CowClone,
        snapshot: Option<&Path>,
        vm_slot: &mut Option<Box<dyn Vm>>,
        network_slot: &mut Option<nanobox_net::SandboxNetwork>,
        rate_limit: Option<RateLimit>,
        tenant_scope: Option<&str>,
    ) -> Result<(AgentClient, Duration), NodeError> {
        let mut spec = VmSpec::new(
            record.vm_id.clone(),
            self.config.kernel.clone(),
            DriveSpec {
                path: disk.path.clone(),
                read_only: false,
                ephemeral: false,
                format: disk.format,
            },
            record.run_dir.clone(),
        );
        spec.vcpus = u8::try_from(record.vcpus).unwrap_or(u8::MAX);
        spec.memory_mib = record.memory_mb;
        // The node agent outlives nothing it starts by accident: VMs survive an agent
        // restart, and recovery decides their fate from the records.
        spec.die_with_parent = false;
        if let Some(net) = &self.network {
            let mode = match record.network_mode.as_str() {
                "internal" => NetworkMode::Internal,
                "internet" => NetworkMode::Internet,
                _ => NetworkMode::Isolated,
            };
            // Recorded before it exists, like everything else.
            record.netns = Some(record.vm_id.clone());
            self.records.put(record)?;
            let sandbox_net = net
                .create(&record.vm_id, mode, rate_limit, tenant_scope)
                .await
                .map_err(|e| NodeError::Unavailable {
                    context: "setting up the sandbox network",
                    message: crate::describe(&e),
                })?;
            if let Some(interface) = &sandbox_net.interface {
                record.ip = interface.routable_address.to_string();
            }
            sandbox_net.apply_to(&mut spec);
            *network_slot = Some(sandbox_net);
        }
        let started = Instant::now();
        let launched = match snapshot {
            None => self.backend.launch(spec).await,
            Some(dir) => self.backend.restore(spec, dir).await,
        };
        let vm = launched.map_err(|e| NodeError::Unavailable {
            context: if snapshot.is_some() {
                "restoring the VM from its snapshot"
            } else {
                "starting the VMM"
            },
            message: crate::describe(&e),
        })?;
        record.pid = vm.pid();
        let vm = vm_slot.insert(vm);
        if let Some(pid) = record.pid {
            let limits = Limits {
                vcpus: record.vcpus,
                memory_bytes: (u64::from(record.memory_mb) + self.config.vmm_overhead_mb) << 20,
            };
            record.cgroups =
                self.cgroups
                    .place(&self.config.cgroup_parent, &record.vm_id, limits, pid)?;
        }
        self.records.put(record)?;
        let agent = connect_agent(vm.as_ref(), self.config.boot_timeout)
            .await
            .map_err(|e| NodeError::Guest {
                id: record.vm_id.clone(),
                message: format!("did not come up: {}", crate::describe(&e)),
            })?;
        let boot_time = started.elapsed();
        record.boot_time_ms = u32::try_from(boot_time.as_millis()).unwrap_or(u32::MAX);
        Ok((agent, boot_time))
    }

    /// Stops the VM (if any) and removes everything the record names, then the record.
    pub async fn teardown(&self, vm: Option<Box<dyn Vm>>, record: &VmRecord) {
        self.release_vm(vm, record).await;
        remove_path(&record.disk);
        if let Some(snapshot) = &record.snapshot {
            remove_dir(&snapshot.dir);
        }
        if let Err(e) = self.records.remove(&record.vm_id) {
            tracing::warn!(vm = %record.vm_id, error = %e, "record not removed");
        }
    }

    /// Stops the VM (if any) and removes what only a running VM has: its cgroups,
    /// network and run directory. The disk, any snapshot and the record stay.
    pub async fn release_vm(&self, vm: Option<Box<dyn Vm>>, record: &VmRecord) {
        if let Some(vm) = vm {
            if let Err(e) = vm.stop(STOP_GRACE).await {
                tracing::debug!(vm = %record.vm_id, error = %e, "stop failed; killing");
                vm.kill();
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), vm.wait()).await;
        } else {
            kill_recorded(record).await;
        }
        cgroup::remove(&record.cgroups).await;
        if let (Some(net), Some(_)) = (&self.network, &record.netns) {
            if let Err(e) = net.destroy(&record.vm_id).await {
                tracing::warn!(vm = %record.vm_id, error = %e, "sandbox network not removed");
            }
        }
        remove_dir(&record.run_dir);
    }
}

pub(crate) fn remove_path(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "not removed"),
    }
}

pub(crate) fn remove_dir(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "not removed"),
    }
}

/// Whether `pid` is a live process whose command line names one of `marks` (the VM's
/// disk or run directory): a recorded VMM, not an unrelated process that reused the pid.
pub(crate) fn is_our_vmm(pid: u32, marks: &[&Path]) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    marks.iter().any(|mark| {
        let needle = mark.as_os_str().as_encoded_bytes();
        !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
    })
}

/// Kills a recorded VMM process (after checking it is ours) and waits for it to go.
pub(crate) async fn kill_recorded(record: &VmRecord) {
    let Some(pid) = record.pid else { return };
    let marks = [record.disk.as_path(), record.run_dir.as_path()];
    if !is_our_vmm(pid, &marks) {
        return;
    }
    let Ok(raw) = i32::try_from(pid) else { return };
    let target = nix::unistd::Pid::from_raw(raw);
    let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_our_vmm(pid, &marks) && Instant::now() < deadline {
        // Not our child any more (the agent that spawned it is gone): init reaps it.
        let _ = nix::sys::wait::waitpid(target, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
