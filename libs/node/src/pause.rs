//! Pausing a sandbox into a snapshot on local disk, and resuming it from there.
//!
//! A pause writes the VM's memory and device state to `<snapshot_dir>/<vm id>/` (the VM
//! is stopped first, so its disk is quiet and consistent with the state), then removes
//! the VM, its cgroups and its network and frees its vCPUs and memory. What stays is the
//! disk, the snapshot and the record, which now names the snapshot: a paused sandbox
//! costs only disk, never expires, and survives restarts of the agent.
//!
//! A resume starts a VMM from the snapshot over that disk, in a new network namespace
//! (the guest keeps its inside address, see `nanobox-net`), gives the guest a fresh
//! clock and entropy, and deletes the snapshot: once the guest has run, its disk has
//! moved on and the snapshot no longer matches it.
//!
//! Snapshots are node-local for now: a sandbox resumes on the node that paused it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nanobox_core::{NetworkMode, SandboxId, SandboxState};
use nanobox_guest_client::ConfigureRequest;

use crate::node::{
    guest_error, info_from_record, lock, rate_limit, system_time, Inner, PausedSandbox, Sandbox,
    CONFIGURE_TIMEOUT,
};
use crate::record::{SnapshotRecord, VmRecord};
use crate::vm::{now_ms, remove_dir};
use crate::{Node, NodeError, SandboxInfo};

/// What a pause produced.
#[derive(Debug, Clone)]
pub struct Paused {
    pub sandbox: SandboxInfo,
    pub snapshot_id: String,
    /// Bytes the paused sandbox keeps on disk: VM state plus its disk's allocation.
    pub size_bytes: u64,
    /// From stopping the vCPUs to the snapshot being on disk.
    pub snapshot_time: Duration,
}

/// What a resume asks for.
#[derive(Debug, Clone, Default)]
pub struct ResumeRequest {
    /// The snapshot to restore; empty means the sandbox's own.
    pub snapshot_id: String,
    /// The lifetime from now; `None` means the node's default.
    pub timeout: Option<Duration>,
    /// The network mode; must be the one the sandbox was paused in.
    pub network_mode: Option<NetworkMode>,
    /// Egress limit for internet mode, bytes per second.
    pub egress_rate_bps: Option<u64>,
    pub tenant_scope: Option<String>,
}

impl Node {
    /// Pauses a running sandbox into a snapshot on this node and frees its vCPUs and
    /// memory. Refused while a command or file transfer is in flight: those hold the
    /// guest connection the pause would cut.
    pub async fn pause(&self, id: &SandboxId) -> Result<Paused, NodeError> {
        let inner = &self.inner;
        let sandbox = {
            let mut sandboxes = lock(&inner.sandboxes);
            let Some(shared) = sandboxes.remove(id) else {
                drop(sandboxes);
                // Paused, gone or unknown: `running` says which.
                return Err(match inner.running(id) {
                    Err(e) => e,
                    Ok(_) => NodeError::Internal(format!("sandbox {id} vanished")),
                });
            };
            // Only the map holds it, unless an exec or file transfer does.
            let sandbox = match Arc::try_unwrap(shared) {
                Ok(sandbox) => sandbox,
                Err(shared) => {
                    sandboxes.insert(id.clone(), shared);
                    return Err(NodeError::FailedPrecondition(format!(
                        "sandbox {id} has a command or file transfer in flight; pause it once that ends"
                    )));
                }
            };
            // While the snapshot is written the sandbox shows as paused, and nothing
            // else can start on it.
            let mut info = lock(&sandbox.info).clone();
            info.state = SandboxState::Paused;
            info.message = "pausing".to_owned();
            lock(&inner.paused).insert(
                id.clone(),
                PausedSandbox {
                    record: lock(&sandbox.record).clone(),
                    info,
                    busy: true,
                },
            );
            sandbox
        };
        let result = inner.pause_vm(id, sandbox).await;
        if result.is_err() {
            lock(&inner.paused).remove(id);
        }
        result
    }

    /// Resumes a paused sandbox from its snapshot on this node.
    pub async fn resume(
        &self,
        id: &SandboxId,
        request: ResumeRequest,
    ) -> Result<SandboxInfo, NodeError> {
        let inner = &self.inner;
        let timeout = request.timeout.unwrap_or(inner.config.default_timeout);
        if timeout.is_zero() || timeout > inner.config.max_timeout {
            return Err(NodeError::InvalidArgument {
                field: "timeout_sec",
                reason: format!(
                    "must be 1 to {} seconds",
                    inner.config.max_timeout.as_secs()
                ),
            });
        }
        let mut record = {
            let mut paused = lock(&inner.paused);
            let Some(entry) = paused.get_mut(id) else {
                drop(paused);
                if lock(&inner.sandboxes).contains_key(id) {
                    return Err(NodeError::FailedPrecondition(format!(
                        "sandbox {id} is running, not paused"
                    )));
                }
                if !request.snapshot_id.is_empty() {
                    return Err(inner.foreign_snapshot(&request.snapshot_id));
                }
                return Err(inner.running(id).err().unwrap_or_else(|| {
                    NodeError::FailedPrecondition(format!("sandbox {id} is not paused"))
                }));
            };
            if entry.busy {
                return Err(NodeError::FailedPrecondition(format!(
                    "sandbox {id} is being paused, resumed or destroyed; retry"
                )));
            }
            let ours = entry.record.snapshot.as_ref().map(|s| s.id.as_str());
            if !request.snapshot_id.is_empty() && ours != Some(request.snapshot_id.as_str()) {
                return Err(inner.foreign_snapshot(&request.snapshot_id));
            }
            if let Some(mode) = request.network_mode {
                if mode.as_str() != entry.record.network_mode {
                    return Err(NodeError::InvalidArgument {
                        field: "network.mode",
                        reason: format!(
                            "the sandbox was paused in {} mode and resumes in it",
                            entry.record.network_mode
                        ),
                    });
                }
            }
            entry.busy = true;
            entry.record.clone()
        };
        let result = inner.resume_vm(id, &mut record, &request, timeout).await;
        if let Err((_, gone)) = &result {
            let mut paused = lock(&inner.paused);
            if *gone {
                paused.remove(id);
            } else if let Some(entry) = paused.get_mut(id) {
                entry.busy = false;
            }
        }
        result.map_err(|(e, _)| e)
    }
}

impl Inner {
    async fn pause_vm(&self, id: &SandboxId, sandbox: Sandbox) -> Result<Paused, NodeError> {
        let Sandbox {
            vm,
            agent,
            record,
            info,
            _template: template,
        } = sandbox;
        let mut record = record.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut info = info.into_inner().unwrap_or_else(|e| e.into_inner());
        let dir = self.config.snapshot_dir.join(&record.vm_id);
        // A leftover of an earlier attempt would mix into this one.
        remove_dir(&dir);
        let started = Instant::now();
        let snapshot = async {
            std::fs::create_dir_all(&self.config.snapshot_dir).map_err(|e| {
                NodeError::io(
                    "creating the snapshot directory",
                    &self.config.snapshot_dir,
                    e,
                )
            })?;
            vm.snapshot(&dir).await.map_err(|e| NodeError::Unavailable {
                context: "snapshotting the VM",
                message: crate::describe(&e),
            })
        }
        .await;
        let written = match snapshot {
            Ok(written) => written,
            Err(e) => {
                remove_dir(&dir);
                // The VM may be stopped mid-way: let it run on if it can, else it goes.
                if vm.resume().await.is_ok() {
                    let sandbox = Sandbox {
                        vm,
                        agent,
                        record: std::sync::Mutex::new(record),
                        info: std::sync::Mutex::new(info),
                        _template: template,
                    };
                    lock(&self.sandboxes).insert(id.clone(), Arc::new(sandbox));
                } else {
                    self.booter.teardown(Some(vm), &record).await;
                    self.release(record.vcpus, record.memory_mb, true);
                    info.state = SandboxState::Failed;
                    info.message = format!("pausing failed: {e}");
                    self.tombstone(info);
                }
                return Err(e);
            }
        };
        let snapshot_time = started.elapsed();
        let disk_bytes = allocated_bytes(&record.disk);
        let snapshot_record = SnapshotRecord {
            id: snapshot_id(),
            dir: dir.clone(),
            size_bytes: written.state_bytes + disk_bytes,
            taken_at_ms: now_ms(),
            restoring: false,
        };
        // Durable before the VM goes: from here a crash leaves a paused sandbox.
        record.snapshot = Some(snapshot_record.clone());
        if let Err(e) = self.booter.records.put(&record) {
            let _ = vm.resume().await;
            remove_dir(&dir);
            record.snapshot = None;
            self.booter.teardown(Some(vm), &record).await;
            self.release(record.vcpus, record.memory_mb, true);
            return Err(e);
        }
        drop((agent, template));
        self.booter.release_vm(Some(vm), &record).await;
        self.release(record.vcpus, record.memory_mb, true);
        record.pid = None;
        record.cgroups.clear();
        record.netns = None;
        record.ip.clear();
        if let Err(e) = self.booter.records.put(&record) {
            // The older record names resources that are gone; recovery copes with that.
            tracing::warn!(sandbox = %id, error = %e, "paused record not updated");
        }
        info.state = SandboxState::Paused;
        info.ip.clear();
        info.message = String::new();
        info.snapshot_id = snapshot_record.id.clone();
        // No deadline while paused.
        info.expires_at = system_time(0);
        lock(&self.paused).insert(
            id.clone(),
            PausedSandbox {
                record,
                info: info.clone(),
                busy: false,
            },
        );
        tracing::info!(
            sandbox = %id,
            snapshot = %snapshot_record.id,
            ms = snapshot_time.as_millis() as u64,
            bytes = snapshot_record.size_bytes,
            "sandbox paused"
        );
        Ok(Paused {
            sandbox: info,
            snapshot_id: snapshot_record.id,
            size_bytes: snapshot_record.size_bytes,
            snapshot_time,
        })
    }

    /// Restores a paused sandbox; `Err((_, true))` when it is gone as a result (its
    /// guest ran but could not be taken into service).
    async fn resume_vm(
        &self,
        id: &SandboxId,
        record: &mut VmRecord,
        request: &ResumeRequest,
        timeout: Duration,
    ) -> Result<SandboxInfo, (NodeError, bool)> {
        let original = record.clone();
        let Some(mut snapshot) = record.snapshot.clone() else {
            return Err((
                NodeError::Internal(format!("paused sandbox {id} has no snapshot")),
                false,
            ));
        };
        crate::pool::reserve_for_sandbox(self, record.vcpus, record.memory_mb)
            .await
            .map_err(|e| (e, false))?;
        let cached = async {
            let name = nanobox_core::TemplateName::new(&record.template).map_err(|e| {
                NodeError::Internal(format!("paused sandbox {id} names a bad template: {e}"))
            })?;
            let template = self
                .templates
                .resolve(&name, Some(&record.template_digest))
                .await?;
            self.cache
                .acquire(&template.rootfs_key)
                .await
                .map_err(|e| NodeError::Unavailable {
                    context: "fetching the template",
                    message: crate::describe(&e),
                })
        }
        .await;
        let cached = match cached {
            Ok(cached) => cached,
            Err(e) => {
                self.release(record.vcpus, record.memory_mb, true);
                return Err((e, false));
            }
        };
        snapshot.restoring = true;
        record.snapshot = Some(snapshot.clone());
        if let Err(e) = self.booter.records.put(record) {
            self.release(record.vcpus, record.memory_mb, true);
            return Err((e, false));
        }
        let rate = match record.network_mode.as_str() {
            "internet" => request
                .egress_rate_bps
                .or(self.config.default_rate_limit)
                .map(rate_limit),
            _ => None,
        };
        let booted = self
            .booter
            .restore(
                record,
                &snapshot,
                cached,
                rate,
                request.tenant_scope.as_deref(),
            )
            .await;
        let booted = match booted {
            Ok(booted) => booted,
            Err((e, ran)) => {
                self.release(record.vcpus, record.memory_mb, true);
                if ran {
                    self.give_up(id, None, record, &e).await;
                } else {
                    // Nothing ran: it stays paused, as it was.
                    *record = original;
                    if let Err(e) = self.booter.records.put(record) {
                        tracing::warn!(sandbox = %id, error = %e, "paused record not reset");
                    }
                }
                return Err((e, ran));
            }
        };
        let restore_time = booted.boot_time;
        // The guest's clock stopped at the pause and its entropy pool is a copy: both
        // are renewed before anything runs in it again.
        let configure = ConfigureRequest {
            hostname: record.hostname.clone(),
            entropy_seed: rand::random::<[u8; 32]>().to_vec(),
            unix_time_ns: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .and_then(|d| u64::try_from(d.as_nanos()).ok()),
            env: record
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            network: None,
            start_sshd: false,
        };
        let mut record = booted.record.clone();
        let now = now_ms();
        record.snapshot = None;
        record.expires_at_ms =
            now.saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        record.boot_time_ms = u32::try_from(restore_time.as_millis()).unwrap_or(u32::MAX);
        let ready = async {
            booted
                .agent
                .configure(configure, CONFIGURE_TIMEOUT)
                .await
                .map_err(|e| guest_error(id, &e))?;
            self.booter.records.put(&record)
        }
        .await;
        if let Err(e) = ready {
            let mut gone = record.clone();
            gone.snapshot = Some(snapshot);
            self.release(record.vcpus, record.memory_mb, true);
            self.give_up(id, Some(booted.vm), &gone, &e).await;
            return Err((e, true));
        }
        remove_dir(&snapshot.dir);
        let info = info_from_record(id, &record);
        let sandbox = Arc::new(Sandbox {
            vm: booted.vm,
            agent: booted.agent,
            record: std::sync::Mutex::new(record),
            info: std::sync::Mutex::new(info.clone()),
            _template: booted.template,
        });
        {
            let mut sandboxes = lock(&self.sandboxes);
            lock(&self.paused).remove(id);
            sandboxes.insert(id.clone(), sandbox);
        }
        tracing::info!(sandbox = %id, restore_ms = info.boot_time_ms, "sandbox resumed");
        Ok(info)
    }

    fn foreign_snapshot(&self, snapshot_id: &str) -> NodeError {
        NodeError::NotFound {
            what: "snapshot",
            name: format!("{snapshot_id} (on node {})", self.config.node_id),
        }
    }

    /// Removes a sandbox whose resume ran its guest but failed (its disk no longer
    /// matches the snapshot): the VM if there is one, disk, snapshot and record; it is
    /// left as FAILED.
    async fn give_up(
        &self,
        id: &SandboxId,
        vm: Option<Box<dyn nanobox_vmm::Vm>>,
        record: &VmRecord,
        why: &NodeError,
    ) {
        self.booter.teardown(vm, record).await;
        let mut info = info_from_record(id, record);
        info.state = SandboxState::Failed;
        info.message = format!("resuming failed: {why}");
        self.tombstone(info);
    }

    /// Destroys a paused sandbox: its disk, snapshot and record. `None` if it is not
    /// paused here.
    pub(crate) async fn destroy_paused(
        &self,
        id: &SandboxId,
        message: &str,
    ) -> Option<Result<(), NodeError>> {
        let (record, mut info) = {
            let mut paused = lock(&self.paused);
            let entry = paused.get(id)?;
            if entry.busy {
                return Some(Err(NodeError::FailedPrecondition(format!(
                    "sandbox {id} is being paused or resumed; retry"
                ))));
            }
            let entry = paused.remove(id)?;
            let mut going = entry.info.clone();
            going.state = SandboxState::Stopping;
            self.tombstone(going);
            (entry.record, entry.info)
        };
        self.booter.teardown(None, &record).await;
        info.state = SandboxState::Stopped;
        info.message = message.to_owned();
        tracing::info!(sandbox = %id, %message, "paused sandbox destroyed");
        self.tombstone(info);
        Some(Ok(()))
    }
}

/// Bytes a file occupies on disk (holes and shared extents aside).
fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn snapshot_id() -> String {
    let id = SandboxId::new();
    format!("snap-{}", id.as_str().trim_start_matches("sb-"))
}

/// Rebuilds the paused-sandbox entry of a record found at start-up.
pub(crate) fn paused_from_record(id: &SandboxId, record: VmRecord) -> PausedSandbox {
    let mut info = info_from_record(id, &record);
    info.state = SandboxState::Paused;
    info.ip.clear();
    info.expires_at = system_time(0);
    PausedSandbox {
        record,
        info,
        busy: false,
    }
}
