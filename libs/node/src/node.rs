//! The node: every sandbox on this machine, the warm pools, capacity, deadlines.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nanobox_core::{ExecSpec, NetworkMode, SandboxId, SandboxSpec, SandboxState, TemplateName};
use nanobox_guest_client::{AgentClient, ConfigureRequest, ExecRequest, ExecStream};
use nanobox_node_storage::TemplateCache;
use nanobox_store::{MetadataStore, ObjectStore};
use nanobox_vmm::{Vm, VmBackend};
use tokio::sync::Notify;
use tracing::Instrument as _;

use crate::cgroup::CgroupLayout;
use crate::record::{RecordStore, VmRecord};
use crate::vm::{now_ms, BootedVm, Booter, VmShape};
use crate::{NodeConfig, NodeError, ResolvedTemplate, Templates};

/// How long a configure call to a fresh guest may take.
pub(crate) const CONFIGURE_TIMEOUT: Duration = Duration::from_secs(30);
/// Destroyed, expired and lost sandboxes stay visible this long (so callers learn why).
const TOMBSTONE_TTL: Duration = Duration::from_secs(600);
/// At most this many tombstones are kept.
const MAX_TOMBSTONES: usize = 1024;
/// How often deadlines are checked.
const REAPER_INTERVAL: Duration = Duration::from_millis(500);

/// A sandbox as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxInfo {
    pub id: SandboxId,
    pub template: String,
    pub template_digest: String,
    pub state: SandboxState,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub network_mode: NetworkMode,
    pub ip: String,
    pub boot_time_ms: u32,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    /// Why it stopped, failed or was lost.
    pub message: String,
    /// The snapshot it is paused in; empty unless paused.
    pub snapshot_id: String,
}

/// What a create asks for.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// The id to use (the scheduler mints ids); `None` makes one.
    pub id: Option<SandboxId>,
    pub spec: SandboxSpec,
    /// The image digest the scheduler placed for; empty means the template's current.
    pub template_digest: String,
    /// The guest's hostname; empty means the sandbox id.
    pub hostname: String,
}

/// The outcome of a create.
#[derive(Debug, Clone)]
pub struct Created {
    pub sandbox: SandboxInfo,
    /// It was a warm-pool VM.
    pub from_pool: bool,
}

/// Capacity in use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allocation {
    pub vcpus: u32,
    pub memory_mb: u64,
    pub sandboxes: u32,
}

/// One template pool's numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    pub template: TemplateName,
    pub digest: String,
    pub ready: u32,
    pub starting: u32,
    pub min_ready: u32,
    pub max_ready: u32,
}

/// A cached template's numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedTemplateStatus {
    pub digest: String,
    pub size_bytes: u64,
}

/// The node's state, for the scheduler and operators.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub node_id: String,
    pub capacity: crate::Capacity,
    pub allocated: Allocation,
    /// The part of `allocated` held by ready pooled VMs (retired to make room when a
    /// sandbox needs its own boot).
    pub reclaimable: Allocation,
    pub cached_templates: Vec<CachedTemplateStatus>,
    pub pools: Vec<PoolStatus>,
    pub sandboxes: Vec<SandboxInfo>,
}

/// A running sandbox.
pub(crate) struct Sandbox {
    pub(crate) vm: Box<dyn Vm>,
    pub(crate) agent: AgentClient,
    pub(crate) record: Mutex<VmRecord>,
    pub(crate) info: Mutex<SandboxInfo>,
    /// Keeps the template in the cache while the sandbox runs.
    pub(crate) _template: nanobox_node_storage::CachedTemplate,
}

/// A sandbox paused into a snapshot on local disk: no VM and no vCPUs or memory, only
/// its disk and snapshot, until it is resumed or destroyed. Paused sandboxes do not
/// expire, and survive restarts of the agent.
pub(crate) struct PausedSandbox {
    pub(crate) record: VmRecord,
    pub(crate) info: SandboxInfo,
    /// A resume or destroy of it is under way.
    pub(crate) busy: bool,
}

/// A booted VM waiting in a pool.
pub(crate) struct Pooled {
    pub(crate) booted: BootedVm,
    pub(crate) ready_at: Instant,
}

#[derive(Default)]
pub(crate) struct PoolState {
    pub(crate) digest: String,
    pub(crate) ready: Vec<Pooled>,
    pub(crate) starting: u32,
}

pub(crate) struct Inner {
    pub(crate) config: Arc<NodeConfig>,
    pub(crate) booter: Booter,
    pub(crate) cache: TemplateCache,
    pub(crate) templates: Templates,
    pub(crate) sandboxes: Mutex<HashMap<SandboxId, Arc<Sandbox>>>,
    pub(crate) paused: Mutex<HashMap<SandboxId, PausedSandbox>>,
    /// Ids whose create is under way (a second create of one waits for nothing: it is
    /// refused, and a retry after the first finished gets the sandbox).
    pub(crate) creating: Mutex<std::collections::HashSet<SandboxId>>,
    pub(crate) tombstones: Mutex<VecDeque<(Instant, SandboxInfo)>>,
    pub(crate) pools: Mutex<HashMap<TemplateName, PoolState>>,
    pub(crate) allocated: Mutex<Allocation>,
    pub(crate) refill: Arc<Notify>,
    /// Permits for pool boots running at once.
    pub(crate) pool_boots: tokio::sync::Semaphore,
    /// Woken when the last create in flight ends (pool boots wait for that, briefly).
    pub(crate) creates_idle: Notify,
}

/// Sandboxes on this machine; cheap to clone.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.inner.config.node_id)
            .finish()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data is plain bookkeeping; a panic elsewhere must not wedge the node.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn system_time(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

impl Node {
    /// Opens the node's state, recovers from a previous run (every VM it left behind is
    /// destroyed and its sandbox reported lost), and starts the deadline reaper and the
    /// pool refiller.
    pub async fn start(
        config: NodeConfig,
        backend: Arc<dyn VmBackend>,
        meta: MetadataStore,
        objects: Arc<dyn ObjectStore>,
    ) -> Result<Self, NodeError> {
        let config = Arc::new(config);
        let records = RecordStore::open(config.state_dir.join("vms"))?;
        let cache = TemplateCache::open(
            config.state_dir.join("templates"),
            config.template_cache_bytes,
            objects,
        )
        .await
        .map_err(|e| {
            NodeError::Internal(format!(
                "opening the template cache: {}",
                crate::describe(&e)
            ))
        })?;
        let network =
            match &config.network {
                Some(net) => Some(nanobox_net::NodeNetwork::setup(net.clone()).await.map_err(
                    |e| NodeError::Unavailable {
                        context: "setting up the node network",
                        message: crate::describe(&e),
                    },
                )?),
                None => None,
            };
        let cgroups = CgroupLayout::detect();
        if cgroups == CgroupLayout::Unavailable {
            tracing::warn!("no writable cgroup cpu/memory controllers: VMs are limited by their own vCPU and memory settings only");
        }
        let pool_boots = tokio::sync::Semaphore::new(config.pool.max_parallel_boots.max(1));
        let inner = Arc::new(Inner {
            booter: Booter {
                config: config.clone(),
                network,
                backend,
                records,
                cgroups,
            },
            config,
            cache,
            templates: Templates::new(meta),
            sandboxes: Mutex::new(HashMap::new()),
            paused: Mutex::new(HashMap::new()),
            creating: Mutex::new(std::collections::HashSet::new()),
            tombstones: Mutex::new(VecDeque::new()),
            pools: Mutex::new(HashMap::new()),
            allocated: Mutex::new(Allocation::default()),
            refill: Arc::new(Notify::new()),
            pool_boots,
            creates_idle: Notify::new(),
        });
        let node = Self { inner };
        node.recover().await?;
        tokio::spawn(reaper(Arc::downgrade(&node.inner)));
        tokio::spawn(crate::pool::refiller(Arc::downgrade(&node.inner)));
        tokio::spawn(crate::metrics::sampler(Arc::downgrade(&node.inner)));
        Ok(node)
    }

    /// The node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// The VM backend in use (`qemu`, `firecracker`).
    pub fn vmm(&self) -> &'static str {
        self.inner.booter.backend.kind().as_str()
    }

    /// Destroys every VM a previous run left (records and stray files alike); paused
    /// sandboxes have none and stay paused.
    async fn recover(&self) -> Result<(), NodeError> {
        let booter = &self.inner.booter;
        let mut records = booter.records.load_all()?;
        let mut keep = Vec::new();
        for record in &mut records {
            if let Some(id) = self.inner.recover_paused(record).await {
                keep.push(record.disk.clone());
                keep.push(self.inner.config.snapshot_dir.join(&record.vm_id));
                let entry = crate::pause::paused_from_record(&id, record.clone());
                lock(&self.inner.paused).insert(id, entry);
                continue;
            }
            tracing::warn!(vm = %record.vm_id, sandbox = ?record.sandbox_id, "destroying a VM left by a previous run");
            booter.teardown(None, record).await;
            if let Some(id) = record
                .sandbox_id
                .as_deref()
                .and_then(|s| SandboxId::parse(s).ok())
            {
                let mut info = info_from_record(&id, record);
                info.state = SandboxState::Lost;
                info.message =
                    "the node agent restarted; the sandbox's VM was destroyed".to_owned();
                self.inner.tombstone(info);
            }
        }
        if let Some(net) = &booter.network {
            // Every sandbox network of the previous run (none of its VMs survive).
            match net.cleanup_orphans(&[]).await {
                Ok(removed) if !removed.is_empty() => {
                    tracing::warn!(?removed, "removed sandbox networks left by a previous run")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not clean up old sandbox networks"),
            }
        }
        // Files no record names: a crash between creating them and recording them is
        // impossible (records come first), but stray files from older versions are not.
        let config = &self.inner.config;
        for path in [
            config.state_dir.join("disks"),
            config.state_dir.join("run"),
            config.snapshot_dir.clone(),
        ] {
            if let Ok(entries) = std::fs::read_dir(&path) {
                for entry in entries.flatten() {
                    let p = entry.path();
                    if keep.contains(&p) {
                        continue;
                    }
                    let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
                }
            }
        }
        Ok(())
    }

    /// Creates a sandbox: from the warm pool when a matching VM is ready, else by a cold
    /// boot. The sandbox's identity (hostname, env, clock, entropy) is applied the same way
    /// in both cases, so the code inside cannot tell them apart.
    pub async fn create(&self, request: CreateRequest) -> Result<Created, NodeError> {
        let inner = &self.inner;
        let spec = &request.spec;
        let timeout = spec.timeout.unwrap_or(inner.config.default_timeout);
        if timeout > inner.config.max_timeout {
            return Err(NodeError::InvalidArgument {
                field: "timeout_sec",
                reason: format!(
                    "{} s is longer than this node allows ({} s)",
                    timeout.as_secs(),
                    inner.config.max_timeout.as_secs()
                ),
            });
        }
        let id = request.id.clone().unwrap_or_default();
        tracing::Span::current()
            .record("sandbox_id", id.as_str())
            .record("template", spec.template.as_str())
            .record("node_id", inner.config.node_id.as_str());
        // Idempotent on the id: a retried create (the scheduler's, after a lost reply)
        // gets the sandbox it already made.
        if let Some(existing) = lock(&inner.sandboxes).get(&id) {
            return Ok(Created {
                sandbox: lock(&existing.info).clone(),
                from_pool: false,
            });
        }
        if lock(&inner.paused).contains_key(&id) {
            return Err(NodeError::FailedPrecondition(format!(
                "sandbox {id} exists and is paused; resume it"
            )));
        }
        if !lock(&inner.creating).insert(id.clone()) {
            return Err(NodeError::FailedPrecondition(format!(
                "sandbox {id} is being created; retry to get it"
            )));
        }
        let started = Instant::now();
        let mut path = "none";
        let result = self.create_new(&id, &request, timeout, &mut path).await;
        crate::metrics::create_finished(path, result.is_ok(), started.elapsed());
        let idle = {
            let mut creating = lock(&inner.creating);
            creating.remove(&id);
            creating.is_empty()
        };
        if idle {
            inner.creates_idle.notify_waiters();
        }
        result
    }

    /// A create of a new sandbox; sets `path` (for the metrics) to `pool` or `cold` once
    /// it is decided.
    async fn create_new(
        &self,
        id: &SandboxId,
        request: &CreateRequest,
        timeout: Duration,
        path: &mut &'static str,
    ) -> Result<Created, NodeError> {
        let inner = &self.inner;
        let spec = &request.spec;
        let mode = spec.network.mode();
        let rate_limit = match mode {
            NetworkMode::Internet => spec
                .network
                .egress_rate_bps()
                .or(inner.config.default_rate_limit)
                .map(rate_limit),
            _ => None,
        };
        let digest =
            (!request.template_digest.is_empty()).then_some(request.template_digest.as_str());
        let template = inner.templates.resolve(&spec.template, digest).await?;
        let vcpus = spec.resources.vcpu();
        let memory_mb = spec.resources.memory_mb();

        // Pooled VMs have the node's default limits; an explicit one needs its own boot.
        let poolable = spec.network.egress_rate_bps().is_none();
        let pooled = if poolable {
            inner.take_pooled(
                &template,
                vcpus,
                memory_mb,
                mode,
                spec.network.tenant_scope(),
            )?
        } else {
            None
        };
        *path = if pooled.is_some() { "pool" } else { "cold" };
        let (booted, from_pool) = match pooled {
            Some(booted) => (booted, true),
            None => {
                crate::pool::reserve_for_sandbox(inner, vcpus, memory_mb).await?;
                let booted = async {
                    let cached = inner
                        .cache
                        .acquire(&template.rootfs_key)
                        .await
                        .map_err(|e| NodeError::Unavailable {
                            context: "fetching the template",
                            message: crate::describe(&e),
                        })?;
                    inner
                        .booter
                        .boot(
                            vm_id_for(id),
                            &template,
                            cached,
                            VmShape {
                                vcpus,
                                memory_mb,
                                mode,
                                rate_limit,
                                tenant_scope: spec.network.tenant_scope().map(str::to_owned),
                            },
                        )
                        .await
                }
                .instrument(tracing::info_span!(
                    "vm.boot",
                    sandbox_id = %id,
                    template = %template.name,
                ))
                .await;
                crate::metrics::vm_booted("sandbox", booted.as_ref().ok().map(|b| b.boot_time));
                match booted {
                    Ok(b) => (b, false),
                    Err(e) => {
                        inner.release(vcpus, memory_mb, true);
                        return Err(e);
                    }
                }
            }
        };
        if from_pool {
            inner.refill.notify_one();
        }
        match inner.hand_over(id, booted, request, timeout).await {
            Ok(info) => Ok(Created {
                sandbox: info,
                from_pool,
            }),
            Err(e) => {
                inner.release(vcpus, memory_mb, true);
                Err(e)
            }
        }
    }

    /// A sandbox, running or recently gone.
    pub fn get(&self, id: &SandboxId) -> Result<SandboxInfo, NodeError> {
        if let Some(sandbox) = lock(&self.inner.sandboxes).get(id) {
            return Ok(lock(&sandbox.info).clone());
        }
        if let Some(paused) = lock(&self.inner.paused).get(id) {
            return Ok(paused.info.clone());
        }
        lock(&self.inner.tombstones)
            .iter()
            .rev()
            .find(|(_, info)| &info.id == id)
            .map(|(_, info)| info.clone())
            .ok_or_else(|| NodeError::not_found("sandbox", id))
    }

    /// Running sandboxes, then recently gone ones, by id.
    pub fn list(&self) -> Vec<SandboxInfo> {
        let mut all: Vec<SandboxInfo> = lock(&self.inner.sandboxes)
            .values()
            .map(|s| lock(&s.info).clone())
            .collect();
        all.extend(lock(&self.inner.paused).values().map(|p| p.info.clone()));
        let running: std::collections::HashSet<SandboxId> =
            all.iter().map(|s| s.id.clone()).collect();
        all.extend(
            lock(&self.inner.tombstones)
                .iter()
                .filter(|(_, info)| !running.contains(&info.id))
                .map(|(_, info)| info.clone()),
        );
        all.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        all
    }

    /// Destroys a sandbox, running or paused; `Ok(false)` if it was neither here.
    pub async fn destroy(&self, id: &SandboxId) -> Result<bool, NodeError> {
        tracing::Span::current()
            .record("sandbox_id", id.as_str())
            .record("node_id", self.inner.config.node_id.as_str());
        if let Some(result) = self.inner.destroy_paused(id, "destroyed").await {
            return result.map(|()| true);
        }
        Ok(self
            .inner
            .destroy(id, SandboxState::Stopped, "destroyed")
            .await)
    }

    /// Extends a sandbox's deadline to `timeout` from now (the default when `None`).
    pub fn keepalive(
        &self,
        id: &SandboxId,
        timeout: Option<Duration>,
    ) -> Result<SystemTime, NodeError> {
        let timeout = timeout.unwrap_or(self.inner.config.default_timeout);
        if timeout.is_zero() || timeout > self.inner.config.max_timeout {
            return Err(NodeError::InvalidArgument {
                field: "timeout_sec",
                reason: format!(
                    "must be 1 to {} seconds",
                    self.inner.config.max_timeout.as_secs()
                ),
            });
        }
        let sandbox = self.inner.running(id)?;
        let expires =
            now_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        let record = {
            let mut record = lock(&sandbox.record);
            record.expires_at_ms = expires;
            record.clone()
        };
        lock(&sandbox.info).expires_at = system_time(expires);
        self.inner.booter.records.put(&record)?;
        Ok(system_time(expires))
    }

    /// Starts a command in a sandbox; the stream yields its output and exit.
    pub async fn exec(&self, id: &SandboxId, spec: ExecSpec) -> Result<ExecStream, NodeError> {
        tracing::Span::current()
            .record("sandbox_id", id.as_str())
            .record("node_id", self.inner.config.node_id.as_str());
        let sandbox = self.inner.running(id)?;
        let mut argv = Vec::with_capacity(spec.args.len() + 1);
        argv.push(spec.command);
        argv.extend(spec.args);
        let request = ExecRequest {
            argv,
            env: spec.env.into_iter().collect(),
            clear_env: false,
            cwd: spec.cwd,
            uid: spec.uid,
            gid: spec.gid,
            timeout: spec.timeout,
            stdin: !spec.stdin.is_empty(),
        };
        // The call to the guest is a child span of the node's request.
        let mut stream = sandbox
            .agent
            .exec(request)
            .instrument(tracing::info_span!(
                "guest.exec",
                otel.kind = "client",
                sandbox_id = %id
            ))
            .await
            .map_err(|e| guest_error(id, &e))?;
        if !spec.stdin.is_empty() {
            if let Some(mut stdin) = stream.take_stdin() {
                stdin
                    .write(&spec.stdin)
                    .await
                    .map_err(|e| guest_error(id, &e))?;
                stdin.close().await.map_err(|e| guest_error(id, &e))?;
            }
        }
        Ok(stream)
    }

    /// The agent of a running sandbox (file transfer).
    pub fn agent(&self, id: &SandboxId) -> Result<AgentClient, NodeError> {
        Ok(self.inner.running(id)?.agent.clone())
    }

    /// Capacity, allocation, cache, pools and sandboxes.
    pub fn status(&self) -> NodeStatus {
        let (pools, reclaimable) = {
            let pools = lock(&self.inner.pools);
            let reclaimable = pools.values().flat_map(|p| p.ready.iter()).fold(
                Allocation::default(),
                |mut sum, p| {
                    sum.vcpus += p.booted.record.vcpus;
                    sum.memory_mb += u64::from(p.booted.record.memory_mb);
                    sum
                },
            );
            let statuses = self
                .inner
                .config
                .pool
                .targets
                .iter()
                .map(|t| {
                    let state = pools.get(&t.template);
                    PoolStatus {
                        template: t.template.clone(),
                        digest: state.map(|s| s.digest.clone()).unwrap_or_default(),
                        ready: state.map_or(0, |s| s.ready.len() as u32),
                        starting: state.map_or(0, |s| s.starting),
                        min_ready: t.min_ready,
                        max_ready: t.max_ready,
                    }
                })
                .collect::<Vec<_>>();
            (statuses, reclaimable)
        };
        NodeStatus {
            node_id: self.inner.config.node_id.clone(),
            capacity: self.inner.config.capacity,
            allocated: *lock(&self.inner.allocated),
            reclaimable,
            cached_templates: self
                .inner
                .cache
                .list()
                .into_iter()
                .map(|c| CachedTemplateStatus {
                    digest: c.manifest_digest.clone(),
                    size_bytes: c.size_bytes,
                })
                .collect(),
            pools,
            sandboxes: self.list(),
        }
    }

    /// Destroys every sandbox and pooled VM (orderly shutdown).
    pub async fn shutdown(&self) {
        let ids: Vec<SandboxId> = lock(&self.inner.sandboxes).keys().cloned().collect();
        for id in ids {
            self.inner
                .destroy(&id, SandboxState::Stopped, "the node agent shut down")
                .await;
        }
        crate::pool::drain(&self.inner).await;
    }
}

/// A token bucket for `rate` bytes per second: a quarter second of burst (at least
/// 64 KiB), so short bursts pass and the average holds.
pub(crate) fn rate_limit(rate: u64) -> nanobox_vmm::RateLimit {
    nanobox_vmm::RateLimit {
        rate_bytes_per_sec: rate,
        burst_bytes: (rate / 4).max(64 << 10),
    }
}

pub(crate) fn vm_id_for(id: &SandboxId) -> String {
    id.as_str().to_ascii_lowercase()
}

pub(crate) fn guest_error(id: &SandboxId, e: &nanobox_guest_client::AgentError) -> NodeError {
    NodeError::Guest {
        id: id.to_string(),
        message: crate::describe(e),
    }
}

pub(crate) fn info_from_record(id: &SandboxId, record: &VmRecord) -> SandboxInfo {
    SandboxInfo {
        id: id.clone(),
        template: record.template.clone(),
        template_digest: record.template_digest.clone(),
        state: SandboxState::Running,
        vcpus: record.vcpus,
        memory_mb: record.memory_mb,
        network_mode: match record.network_mode.as_str() {
            "internal" => NetworkMode::Internal,
            "internet" => NetworkMode::Internet,
            _ => NetworkMode::Isolated,
        },
        ip: record.ip.clone(),
        boot_time_ms: record.boot_time_ms,
        env: record.env.clone(),
        metadata: record.metadata.clone(),
        created_at: system_time(record.created_at_ms),
        expires_at: system_time(record.expires_at_ms),
        message: String::new(),
        snapshot_id: record
            .snapshot
            .as_ref()
            .map(|s| s.id.clone())
            .unwrap_or_default(),
    }
}

impl Inner {
    pub(crate) fn running(&self, id: &SandboxId) -> Result<Arc<Sandbox>, NodeError> {
        if let Some(sandbox) = lock(&self.sandboxes).get(id) {
            return Ok(sandbox.clone());
        }
        if lock(&self.paused).contains_key(id) {
            return Err(NodeError::FailedPrecondition(format!(
                "sandbox {id} is paused; resume it first"
            )));
        }
        match lock(&self.tombstones)
            .iter()
            .rev()
            .find(|(_, i)| &i.id == id)
        {
            Some((_, info)) => Err(NodeError::FailedPrecondition(format!(
                "sandbox {id} is {} ({})",
                info.state, info.message
            ))),
            None => Err(NodeError::not_found("sandbox", id)),
        }
    }

    /// Brings a paused sandbox of a previous run back: whatever a crash mid-pause left
    /// running goes, its disk and snapshot stay. `None` (and nothing touched) if the
    /// record is not of a usable paused sandbox.
    async fn recover_paused(&self, record: &mut VmRecord) -> Option<SandboxId> {
        let id = SandboxId::parse(record.sandbox_id.as_deref()?).ok()?;
        let snapshot = record.snapshot.as_ref()?;
        // The record is input from disk: only the place this node puts snapshots is
        // ever used (or deleted).
        let expected = self.config.snapshot_dir.join(&record.vm_id);
        let usable = snapshot.dir == expected
            && !snapshot.restoring
            && expected.is_dir()
            && record.disk.is_file()
            && record.disk.parent() == Some(self.config.state_dir.join("disks").as_path());
        if !usable {
            if snapshot.dir != expected {
                record.snapshot = None;
            }
            return None;
        }
        self.booter.release_vm(None, record).await;
        record.pid = None;
        record.cgroups.clear();
        record.netns = None;
        record.ip.clear();
        if let Err(e) = self.booter.records.put(record) {
            tracing::warn!(sandbox = %id, error = %e, "paused record not updated");
        }
        tracing::info!(sandbox = %id, "paused sandbox kept across the restart");
        Some(id)
    }

    /// Records a gone (or going) sandbox, replacing an earlier entry for it.
    pub(crate) fn tombstone(&self, info: SandboxInfo) {
        let mut tombstones = lock(&self.tombstones);
        tombstones.retain(|(_, gone)| gone.id != info.id);
        let now = Instant::now();
        while tombstones.len() >= MAX_TOMBSTONES
            || tombstones
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > TOMBSTONE_TTL)
        {
            tombstones.pop_front();
        }
        tombstones.push_back((now, info));
    }

    /// Takes capacity for a new VM, or says what ran out.
    pub(crate) fn reserve(
        &self,
        vcpus: u32,
        memory_mb: u32,
        sandbox: bool,
    ) -> Result<(), NodeError> {
        let capacity = self.config.capacity;
        let mut allocated = lock(&self.allocated);
        if sandbox && allocated.sandboxes >= capacity.max_sandboxes {
            return Err(NodeError::ResourceExhausted(format!(
                "sandboxes: {} of {} running",
                allocated.sandboxes, capacity.max_sandboxes
            )));
        }
        if allocated.vcpus + vcpus > capacity.vcpus {
            return Err(NodeError::ResourceExhausted(format!(
                "vcpus: {} of {} allocated, {vcpus} requested",
                allocated.vcpus, capacity.vcpus
            )));
        }
        if allocated.memory_mb + u64::from(memory_mb) > capacity.memory_mb {
            return Err(NodeError::ResourceExhausted(format!(
                "memory: {} of {} MiB allocated, {memory_mb} MiB requested",
                allocated.memory_mb, capacity.memory_mb
            )));
        }
        allocated.vcpus += vcpus;
        allocated.memory_mb += u64::from(memory_mb);
        if sandbox {
            allocated.sandboxes += 1;
        }
        Ok(())
    }

    pub(crate) fn release(&self, vcpus: u32, memory_mb: u32, sandbox: bool) {
        let mut allocated = lock(&self.allocated);
        allocated.vcpus = allocated.vcpus.saturating_sub(vcpus);
        allocated.memory_mb = allocated.memory_mb.saturating_sub(u64::from(memory_mb));
        if sandbox {
            allocated.sandboxes = allocated.sandboxes.saturating_sub(1);
        }
    }

    /// A ready pooled VM of this template, digest, size, network mode and tenant scope,
    /// if any. Its capacity moves from the pool to the sandbox count.
    fn take_pooled(
        &self,
        template: &ResolvedTemplate,
        vcpus: u32,
        memory_mb: u32,
        mode: NetworkMode,
        tenant_scope: Option<&str>,
    ) -> Result<Option<BootedVm>, NodeError> {
        let mut pools = lock(&self.pools);
        let Some(pool) = pools.get_mut(&template.name) else {
            return Ok(None);
        };
        if pool.digest != template.digest {
            return Ok(None);
        }
        let Some(pos) = pool.ready.iter().position(|p| {
            p.booted.record.vcpus == vcpus
                && p.booted.record.memory_mb == memory_mb
                && p.booted.record.network_mode == mode.as_str()
                // Pooled VMs are booted without a scope: a scoped sandbox boots its own.
                && p.booted.network.as_ref().and_then(|n| n.tenant_scope.as_deref())
                    == tenant_scope
        }) else {
            return Ok(None);
        };
        {
            let mut allocated = lock(&self.allocated);
            if allocated.sandboxes >= self.config.capacity.max_sandboxes {
                return Err(NodeError::ResourceExhausted(format!(
                    "sandboxes: {} of {} running",
                    allocated.sandboxes, self.config.capacity.max_sandboxes
                )));
            }
            // The VM's vCPUs and memory were counted when the pool booted it.
            allocated.sandboxes += 1;
        }
        Ok(Some(pool.ready.swap_remove(pos).booted))
    }

    /// Gives a booted VM its sandbox identity and registers the sandbox.
    async fn hand_over(
        &self,
        id: &SandboxId,
        booted: BootedVm,
        request: &CreateRequest,
        timeout: Duration,
    ) -> Result<SandboxInfo, NodeError> {
        let spec = &request.spec;
        let hostname = if request.hostname.is_empty() {
            id.to_string()
        } else {
            request.hostname.clone()
        };
        let BootedVm {
            vm,
            agent,
            mut record,
            template,
            boot_time,
            network,
            ..
        } = booted;
        let configure = ConfigureRequest {
            hostname: hostname.clone(),
            entropy_seed: rand::random::<[u8; 32]>().to_vec(),
            unix_time_ns: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .and_then(|d| u64::try_from(d.as_nanos()).ok()),
            env: spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            network: network.as_ref().and_then(|n| n.guest_config()),
            start_sshd: false,
        };
        let now = now_ms();
        record.sandbox_id = Some(id.to_string());
        record.hostname = hostname;
        record.env = spec.env.clone();
        record.metadata = spec.metadata.clone();
        record.created_at_ms = now;
        record.expires_at_ms =
            now.saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        record.boot_time_ms = u32::try_from(boot_time.as_millis()).unwrap_or(u32::MAX);
        let ready = async {
            self.booter.records.put(&record)?;
            // The call to the guest is a child span of the node's request.
            agent
                .configure(configure, CONFIGURE_TIMEOUT)
                .instrument(tracing::info_span!(
                    "guest.configure",
                    otel.kind = "client",
                    sandbox_id = %id
                ))
                .await
                .map_err(|e| guest_error(id, &e))
        }
        .await;
        if let Err(e) = ready {
            self.booter.teardown(Some(vm), &record).await;
            return Err(e);
        }
        let info = info_from_record(id, &record);
        let sandbox = Arc::new(Sandbox {
            vm,
            agent,
            record: Mutex::new(record),
            info: Mutex::new(info.clone()),
            _template: template,
        });
        lock(&self.sandboxes).insert(id.clone(), sandbox);
        tracing::info!(sandbox = %id, template = %info.template, boot_ms = info.boot_time_ms, "sandbox running");
        Ok(info)
    }

    /// Removes a sandbox: VM, disk, cgroups, record; leaves a tombstone in `state`.
    async fn destroy(&self, id: &SandboxId, state: SandboxState, message: &str) -> bool {
        // Leave the map and enter the tombstones under one lock, so a concurrent
        // `get` never finds the sandbox in neither: while the teardown runs it is
        // STOPPING, then settles in `state`.
        let (sandbox, mut info) = {
            let mut sandboxes = lock(&self.sandboxes);
            let Some(sandbox) = sandboxes.remove(id) else {
                return false;
            };
            let mut info = lock(&sandbox.info).clone();
            info.state = SandboxState::Stopping;
            info.message = message.to_owned();
            self.tombstone(info.clone());
            (sandbox, info)
        };
        let record = lock(&sandbox.record).clone();
        let Ok(sandbox) = Arc::try_unwrap(sandbox) else {
            // An exec or file transfer still holds it; kill the VM now, the rest is
            // cleaned up below from the record.
            tracing::debug!(sandbox = %id, "destroying a sandbox in use");
            self.booter.teardown(None, &record).await;
            self.release(record.vcpus, record.memory_mb, true);
            info.state = state;
            info.message = message.to_owned();
            self.tombstone(info);
            return true;
        };
        self.booter.teardown(Some(sandbox.vm), &record).await;
        self.release(record.vcpus, record.memory_mb, true);
        info.state = state;
        info.message = message.to_owned();
        tracing::info!(sandbox = %id, %message, "sandbox destroyed");
        self.tombstone(info);
        true
    }
}

/// Destroys sandboxes past their deadline, and ones whose VM died.
async fn reaper(node: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(REAPER_INTERVAL);
    loop {
        tick.tick().await;
        let Some(inner) = node.upgrade() else { return };
        let now = now_ms();
        let due: Vec<(SandboxId, SandboxState, String)> = lock(&inner.sandboxes)
            .iter()
            .filter_map(|(id, s)| {
                let expires = lock(&s.record).expires_at_ms;
                if expires <= now {
                    Some((
                        id.clone(),
                        SandboxState::Stopped,
                        "its timeout passed (keepalive extends it)".to_owned(),
                    ))
                } else if s.vm.state() == nanobox_vmm::VmState::Exited {
                    Some((
                        id.clone(),
                        SandboxState::Failed,
                        format!(
                            "its VM exited: {}",
                            s.vm.console_tail().lines().last().unwrap_or("")
                        ),
                    ))
                } else {
                    None
                }
            })
            .collect();
        for (id, state, message) in due {
            inner.destroy(&id, state, &message).await;
        }
    }
}
