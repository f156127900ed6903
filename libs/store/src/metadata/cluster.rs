//! Nodes and sandboxes, as the scheduler records them (migrations 0003 and 0004).
//!
//! A node row is replaced by each registration and heartbeat; the scheduler marks nodes
//! that fall silent LOST. A sandbox row holds what was asked for (template, size, network,
//! env, labels, lifetime), the `desired_state` the scheduler wants and the
//! `observed_state` it last saw, so that a restarted scheduler knows every sandbox and can
//! drive each one towards what is wanted.
//!
//! Pause and resume move a sandbox between RUNNING and PAUSED with compare-and-set
//! updates ([`MetadataStore::record_pause`], [`MetadataStore::begin_resume`],
//! [`MetadataStore::record_resumed`]), so a delete racing either one wins and two resumes
//! of one sandbox cannot both start. A paused sandbox keeps its `node_id`: snapshots are
//! node-local until the snapshot store lands, so that node is where it resumes.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use nanobox_core::{
    NetworkMode, NetworkSpec, NodeState, Resources, SandboxId, SandboxState, TemplateName,
};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

use super::{db, name_from, to_u32, MetadataError, MetadataStore};

/// What a node reports beyond its numbers, stored as JSON with the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeObserved {
    /// Image digests (`sha256:...`) of the template root filesystems the node has cached.
    pub cached_digests: Vec<String>,
    /// Booted, unassigned pool VMs per template name.
    pub ready_pool: BTreeMap<String, u32>,
    /// Sandboxes running on the node.
    pub sandboxes_running: u32,
    /// The operator's labels.
    pub labels: BTreeMap<String, String>,
}

/// A node as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    pub address: String,
    pub state: NodeState,
    pub capacity_vcpus: u32,
    pub capacity_memory_mb: u64,
    pub allocated_vcpus: u32,
    pub allocated_memory_mb: u64,
    pub observed: NodeObserved,
    pub last_heartbeat: SystemTime,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

/// What uses a template (see [`MetadataStore::template_users`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TemplateUsers {
    /// Sandboxes of it that are not stopped, failed or lost.
    pub sandboxes: u64,
    /// Ready pool VMs of it on nodes that are not lost.
    pub pool_vms: u64,
}

/// What a registration or heartbeat writes about a node; its heartbeat time becomes now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    pub id: String,
    pub address: String,
    /// Ready or draining (a node that reports is not lost).
    pub draining: bool,
    pub capacity_vcpus: u32,
    pub capacity_memory_mb: u64,
    pub allocated_vcpus: u32,
    pub allocated_memory_mb: u64,
    pub observed: NodeObserved,
}

/// A sandbox as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    pub id: SandboxId,
    pub request_id: Option<String>,
    pub template: TemplateName,
    pub template_digest: String,
    pub node_id: Option<String>,
    pub desired_state: SandboxState,
    pub observed_state: SandboxState,
    pub resources: Resources,
    pub network: NetworkSpec,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub timeout: Duration,
    pub ip: String,
    pub boot_time_ms: u32,
    pub expires_at: Option<SystemTime>,
    pub message: String,
    /// The snapshot it is paused in: set while PAUSED, and while STARTING from a resume.
    pub snapshot_id: Option<String>,
    /// The snapshot it was last resumed from.
    pub resumed_from: Option<String>,
    /// When its last resume began (a resume in flight is timed from here).
    pub resume_started_at: Option<SystemTime>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

impl SandboxRecord {
    /// Whether it is STARTING because of a resume rather than a create (a sandbox is
    /// created once, so a resume has begun whenever it starts again).
    pub fn resuming(&self) -> bool {
        self.observed_state == SandboxState::Starting && self.resume_started_at.is_some()
    }
}

/// A sandbox to record ([`MetadataStore::insert_sandbox`]); desired state RUNNING.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSandbox {
    pub id: SandboxId,
    pub request_id: Option<String>,
    pub template: TemplateName,
    pub template_digest: String,
    pub node_id: Option<String>,
    pub observed_state: SandboxState,
    pub resources: Resources,
    pub network: NetworkSpec,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub timeout: Duration,
    pub expires_at: Option<SystemTime>,
}

/// What was observed about a sandbox. Fields left `None` keep their value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxObservation {
    pub state: Option<SandboxState>,
    pub ip: Option<String>,
    pub boot_time_ms: Option<u32>,
    pub expires_at: Option<SystemTime>,
    pub message: Option<String>,
}

/// Which sandboxes [`MetadataStore::list_sandboxes`] returns: all given conditions hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxFilter {
    pub template: Option<TemplateName>,
    /// The observed state.
    pub state: Option<SandboxState>,
    pub node_id: Option<String>,
    /// Entries the sandbox's metadata must all have.
    pub metadata: BTreeMap<String, String>,
    /// Only sandboxes older than this one (keyset pagination; ids are time ordered).
    pub before: Option<SandboxId>,
    /// At most this many; zero means no limit.
    pub limit: u32,
}

const NODE_COLUMNS: &str = "id, address, state, capacity_vcpus, capacity_memory_mb, \
                            allocated_vcpus, allocated_memory_mb, observed, last_heartbeat, \
                            created_at, updated_at";
const SANDBOX_COLUMNS: &str = "id, request_id, template_name, template_digest, node_id, \
                               desired_state, observed_state, vcpus, memory_mb, disk_mb, \
                               network_mode, egress_rate_bps, tenant_scope, env, metadata, \
                               timeout_sec, ip, boot_time_ms, expires_at, message, \
                               snapshot_id, resumed_from, resume_started_at, \
                               created_at, updated_at";

/// Observed states in which the node holds (or is making) the VM.
const LIVE_STATES: [SandboxState; 3] = [
    SandboxState::Starting,
    SandboxState::Running,
    SandboxState::Stopping,
];

fn corrupt(what: &'static str, detail: impl Into<String>) -> MetadataError {
    MetadataError::Corrupt {
        what,
        detail: detail.into(),
    }
}

fn parse_node_state(s: &str) -> Result<NodeState, MetadataError> {
    [NodeState::Ready, NodeState::Draining, NodeState::Lost]
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| corrupt("node state", s))
}

fn parse_sandbox_state(s: &str) -> Result<SandboxState, MetadataError> {
    SandboxState::ALL
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| corrupt("sandbox state", s))
}

fn parse_mode(s: &str) -> Result<NetworkMode, MetadataError> {
    [
        NetworkMode::Isolated,
        NetworkMode::Internal,
        NetworkMode::Internet,
    ]
    .into_iter()
    .find(|mode| mode_str(*mode) == s)
    .ok_or_else(|| corrupt("network_mode", s))
}

/// The stored name of a network mode: upper case, like every state column.
fn mode_str(mode: NetworkMode) -> &'static str {
    match mode {
        NetworkMode::Isolated => "ISOLATED",
        NetworkMode::Internal => "INTERNAL",
        NetworkMode::Internet => "INTERNET",
    }
}

fn i32_of(value: u32, what: &'static str) -> Result<i32, MetadataError> {
    i32::try_from(value).map_err(|_| MetadataError::OutOfRange(what))
}

fn i64_of(value: u64, what: &'static str) -> Result<i64, MetadataError> {
    i64::try_from(value).map_err(|_| MetadataError::OutOfRange(what))
}

fn u64_of(value: i64, what: &'static str) -> Result<u64, MetadataError> {
    u64::try_from(value).map_err(|_| corrupt(what, value.to_string()))
}

fn json<T: Serialize>(value: &T, what: &'static str) -> Result<serde_json::Value, MetadataError> {
    serde_json::to_value(value).map_err(|e| corrupt(what, e.to_string()))
}

fn from_json<T: for<'de> Deserialize<'de>>(
    row: &Row,
    column: &'static str,
) -> Result<T, MetadataError> {
    let value: serde_json::Value = row.get(column);
    serde_json::from_value(value).map_err(|e| corrupt(column, e.to_string()))
}

fn node_from(row: &Row) -> Result<NodeRecord, MetadataError> {
    Ok(NodeRecord {
        id: row.get("id"),
        address: row.get("address"),
        state: parse_node_state(row.get("state"))?,
        capacity_vcpus: to_u32(row.get("capacity_vcpus"), "capacity_vcpus")?,
        capacity_memory_mb: u64_of(row.get("capacity_memory_mb"), "capacity_memory_mb")?,
        allocated_vcpus: to_u32(row.get("allocated_vcpus"), "allocated_vcpus")?,
        allocated_memory_mb: u64_of(row.get("allocated_memory_mb"), "allocated_memory_mb")?,
        observed: from_json(row, "observed")?,
        last_heartbeat: row.get("last_heartbeat"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    })
}

fn sandbox_from(row: &Row) -> Result<SandboxRecord, MetadataError> {
    let id: String = row.get("id");
    let id = SandboxId::parse(&id).map_err(|_| corrupt("sandbox id", id))?;
    let disk: Option<i32> = row.get("disk_mb");
    let resources = Resources::new(
        to_u32(row.get("vcpus"), "vcpus")?,
        to_u32(row.get("memory_mb"), "memory_mb")?,
        disk.map(|d| to_u32(d, "disk_mb")).transpose()?,
    )
    .map_err(|e| corrupt("resources", e.to_string()))?;
    let egress: Option<i64> = row.get("egress_rate_bps");
    let network = NetworkSpec::new(
        parse_mode(row.get("network_mode"))?,
        egress.map(|e| u64_of(e, "egress_rate_bps")).transpose()?,
        row.get("tenant_scope"),
    )
    .map_err(|e| corrupt("network", e.to_string()))?;
    Ok(SandboxRecord {
        id,
        request_id: row.get("request_id"),
        template: name_from(row, "template_name")?,
        template_digest: row.get("template_digest"),
        node_id: row.get("node_id"),
        desired_state: parse_sandbox_state(row.get("desired_state"))?,
        observed_state: parse_sandbox_state(row.get("observed_state"))?,
        resources,
        network,
        env: from_json(row, "env")?,
        metadata: from_json(row, "metadata")?,
        timeout: Duration::from_secs(u64::from(to_u32(row.get("timeout_sec"), "timeout_sec")?)),
        ip: row.get("ip"),
        boot_time_ms: to_u32(row.get("boot_time_ms"), "boot_time_ms")?,
        expires_at: row.get("expires_at"),
        message: row.get("message"),
        snapshot_id: row.get("snapshot_id"),
        resumed_from: row.get("resumed_from"),
        resume_started_at: row.get("resume_started_at"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    })
}

fn live_states() -> Vec<&'static str> {
    LIVE_STATES.iter().map(|s| s.as_str()).collect()
}

impl MetadataStore {
    /// Records a node's registration or heartbeat: inserts or replaces its row, READY (or
    /// DRAINING), heartbeat now. A LOST node that reports again is READY again.
    pub async fn report_node(&self, report: &NodeReport) -> Result<NodeRecord, MetadataError> {
        let state = if report.draining {
            NodeState::Draining
        } else {
            NodeState::Ready
        };
        let client = self.client().await?;
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO nodes (id, address, state, capacity_vcpus, capacity_memory_mb,
                                        allocated_vcpus, allocated_memory_mb, observed)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (id) DO UPDATE SET
                         address = EXCLUDED.address,
                         state = EXCLUDED.state,
                         capacity_vcpus = EXCLUDED.capacity_vcpus,
                         capacity_memory_mb = EXCLUDED.capacity_memory_mb,
                         allocated_vcpus = EXCLUDED.allocated_vcpus,
                         allocated_memory_mb = EXCLUDED.allocated_memory_mb,
                         observed = EXCLUDED.observed,
                         last_heartbeat = now(),
                         updated_at = now()
                     RETURNING {NODE_COLUMNS}"
                ),
                &[
                    &report.id,
                    &report.address,
                    &state.as_str(),
                    &i32_of(report.capacity_vcpus, "capacity_vcpus")?,
                    &i64_of(report.capacity_memory_mb, "capacity_memory_mb")?,
                    &i32_of(report.allocated_vcpus, "allocated_vcpus")?,
                    &i64_of(report.allocated_memory_mb, "allocated_memory_mb")?,
                    &json(&report.observed, "observed")?,
                ],
            )
            .await
            .map_err(db("recording a node report"))?;
        node_from(&row)
    }

    /// The node `id`, if known.
    pub async fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, MetadataError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(db("reading a node"))?;
        row.as_ref().map(node_from).transpose()
    }

    /// Every node, by id.
    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, MetadataError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id"),
                &[],
            )
            .await
            .map_err(db("listing nodes"))?;
        rows.iter().map(node_from).collect()
    }

    /// Marks LOST every node not yet lost whose last heartbeat is older than `silent_for`
    /// (by the database's clock, which every scheduler replica shares), and the live
    /// sandboxes of those nodes LOST with `message`. Returns the nodes marked. Paused
    /// sandboxes stay PAUSED: their snapshot is on the node's disk and is there again when
    /// the node comes back (a resume meanwhile is refused as UNAVAILABLE).
    pub async fn mark_silent_nodes_lost(
        &self,
        silent_for: Duration,
        message: &str,
    ) -> Result<Vec<String>, MetadataError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db("starting a transaction"))?;
        let rows = tx
            .query(
                "UPDATE nodes SET state = 'LOST', updated_at = now()
                 WHERE state <> 'LOST' AND last_heartbeat < now() - make_interval(secs => $1)
                 RETURNING id",
                &[&silent_for.as_secs_f64()],
            )
            .await
            .map_err(db("marking silent nodes lost"))?;
        let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if !ids.is_empty() {
            tx.execute(
                "UPDATE sandboxes SET observed_state = 'LOST', message = $2, ip = '',
                                      updated_at = now()
                 WHERE node_id = ANY($1) AND observed_state = ANY($3)",
                &[&ids, &message, &live_states()],
            )
            .await
            .map_err(db("marking a lost node's sandboxes lost"))?;
        }
        tx.commit().await.map_err(db("committing"))?;
        Ok(ids)
    }

    /// Records a new sandbox, desired state RUNNING. With a `request_id` that another
    /// sandbox already has, records nothing and returns that sandbox; the flag says
    /// whether this call created the row.
    pub async fn insert_sandbox(
        &self,
        new: &NewSandbox,
    ) -> Result<(SandboxRecord, bool), MetadataError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "INSERT INTO sandboxes (id, request_id, template_name, template_digest,
                         node_id, desired_state, observed_state, vcpus, memory_mb, disk_mb,
                         network_mode, egress_rate_bps, tenant_scope, env, metadata,
                         timeout_sec, expires_at)
                     VALUES ($1, $2, $3, $4, $5, 'RUNNING', $6, $7, $8, $9, $10, $11, $12,
                             $13, $14, $15, $16)
                     ON CONFLICT (request_id) DO NOTHING
                     RETURNING {SANDBOX_COLUMNS}"
                ),
                &[
                    &new.id.as_str(),
                    &new.request_id,
                    &new.template.as_str(),
                    &new.template_digest,
                    &new.node_id,
                    &new.observed_state.as_str(),
                    &i32_of(new.resources.vcpu(), "vcpus")?,
                    &i32_of(new.resources.memory_mb(), "memory_mb")?,
                    &new.resources
                        .disk_mb()
                        .map(|d| i32_of(d, "disk_mb"))
                        .transpose()?,
                    &mode_str(new.network.mode()),
                    &new.network
                        .egress_rate_bps()
                        .map(|e| i64_of(e, "egress_rate_bps"))
                        .transpose()?,
                    &new.network.tenant_scope(),
                    &json(&new.env, "env")?,
                    &json(&new.metadata, "metadata")?,
                    &i32_of(
                        u32::try_from(new.timeout.as_secs())
                            .map_err(|_| MetadataError::OutOfRange("timeout_sec"))?,
                        "timeout_sec",
                    )?,
                    &new.expires_at,
                ],
            )
            .await
            .map_err(db("recording a sandbox"))?;
        if let Some(row) = row {
            return Ok((sandbox_from(&row)?, true));
        }
        let request_id = new.request_id.as_deref().unwrap_or_default();
        match self.get_sandbox_by_request_id(request_id).await? {
            Some(existing) => Ok((existing, false)),
            // The conflicting row vanished in between; nothing deletes rows, so this is a
            // broken invariant rather than a race to retry.
            None => Err(corrupt("sandboxes.request_id", request_id)),
        }
    }

    /// The sandbox `id`, if recorded.
    pub async fn get_sandbox(
        &self,
        id: &SandboxId,
    ) -> Result<Option<SandboxRecord>, MetadataError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = $1"),
                &[&id.as_str()],
            )
            .await
            .map_err(db("reading a sandbox"))?;
        row.as_ref().map(sandbox_from).transpose()
    }

    /// The sandbox created with the idempotency key `request_id`, if any.
    pub async fn get_sandbox_by_request_id(
        &self,
        request_id: &str,
    ) -> Result<Option<SandboxRecord>, MetadataError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE request_id = $1"),
                &[&request_id],
            )
            .await
            .map_err(db("reading a sandbox by request id"))?;
        row.as_ref().map(sandbox_from).transpose()
    }

    /// Sandboxes matching `filter`, newest first.
    pub async fn list_sandboxes(
        &self,
        filter: &SandboxFilter,
    ) -> Result<Vec<SandboxRecord>, MetadataError> {
        let limit = if filter.limit == 0 {
            None
        } else {
            Some(i64::from(filter.limit))
        };
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                     WHERE ($1::TEXT IS NULL OR template_name = $1)
                       AND ($2::TEXT IS NULL OR observed_state = $2)
                       AND ($3::TEXT IS NULL OR node_id = $3)
                       AND metadata @> $4
                       AND ($5::TEXT IS NULL OR id < $5)
                     ORDER BY id DESC LIMIT $6"
                ),
                &[
                    &filter.template.as_ref().map(TemplateName::as_str),
                    &filter.state.map(SandboxState::as_str),
                    &filter.node_id,
                    &json(&filter.metadata, "metadata")?,
                    &filter.before.as_ref().map(SandboxId::as_str),
                    &limit,
                ],
            )
            .await
            .map_err(db("listing sandboxes"))?;
        rows.iter().map(sandbox_from).collect()
    }

    /// Records what was observed about sandbox `id`; `None` if there is no such sandbox.
    /// A sandbox observed STOPPED no longer has a snapshot (destroying a paused sandbox
    /// deletes it), so its `snapshot_id` is cleared.
    pub async fn observe_sandbox(
        &self,
        id: &SandboxId,
        seen: &SandboxObservation,
    ) -> Result<Option<SandboxRecord>, MetadataError> {
        self.update_sandbox(
            "
                         observed_state = coalesce($2, observed_state),
                         ip = coalesce($3, ip),
                         boot_time_ms = coalesce($4, boot_time_ms),
                         expires_at = coalesce($5, expires_at),
                         message = coalesce($6, message),
                         snapshot_id = CASE WHEN $2 = 'STOPPED' THEN NULL ELSE snapshot_id END,
                         updated_at = now()
                     WHERE id = $1",
            &[
                &id.as_str(),
                &seen.state.map(SandboxState::as_str),
                &seen.ip,
                &seen
                    .boot_time_ms
                    .map(|b| i32_of(b, "boot_time_ms"))
                    .transpose()?,
                &seen.expires_at,
                &seen.message,
            ],
            "recording a sandbox observation",
        )
        .await
    }

    /// Runs `UPDATE sandboxes SET {set_where}` (the assignments and the `WHERE` clause)
    /// and returns the updated sandbox, or `None` if no row matched: every compare-and-set
    /// on a sandbox goes through here.
    async fn update_sandbox(
        &self,
        set_where: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        what: &'static str,
    ) -> Result<Option<SandboxRecord>, MetadataError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("UPDATE sandboxes SET {set_where} RETURNING {SANDBOX_COLUMNS}"),
                params,
            )
            .await
            .map_err(db(what))?;
        row.as_ref().map(sandbox_from).transpose()
    }

    /// Sets what the scheduler wants of sandbox `id` (RUNNING, PAUSED or STOPPED);
    /// `None` if there is no such sandbox.
    pub async fn set_sandbox_desired(
        &self,
        id: &SandboxId,
        desired: SandboxState,
    ) -> Result<Option<SandboxRecord>, MetadataError> {
        self.update_sandbox(
            "desired_state = $2, updated_at = now() WHERE id = $1",
            &[&id.as_str(), &desired.as_str()],
            "setting a sandbox's desired state",
        )
        .await
    }

    /// Moves a create in flight from node `from` to node `to` (the first refused it for
    /// capacity); `None` unless it is still STARTING on `from` and wanted (a delete, or a
    /// reconcile pass that gave up on it, wins).
    pub async fn move_starting_sandbox(
        &self,
        id: &SandboxId,
        from: &str,
        to: &str,
    ) -> Result<Option<SandboxRecord>, MetadataError> {
        self.update_sandbox(
            "node_id = $3, updated_at = now()
                     WHERE id = $1 AND node_id = $2 AND observed_state = 'STARTING'
                       AND desired_state = 'RUNNING'",
            &[&id.as_str(), &from, &to],
            "moving a create to another node",
        )
        .await
    }

    /// The sandboxes recorded on node `node_id` that are not stopped, oldest first.
    pub async fn node_sandboxes(&self, node_id: &str) -> Result<Vec<SandboxRecord>, MetadataError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                     WHERE node_id = $1 AND observed_state <> 'STOPPED' ORDER BY id"
                ),
                &[&node_id],
            )
            .await
            .map_err(db("listing a node's sandboxes"))?;
        rows.iter().map(sandbox_from).collect()
    }

    /// Sandboxes that should be running but whose deadline has passed (database clock).
    /// Paused sandboxes never expire (they hold no node resources and have no deadline).
    pub async fn expired_sandboxes(&self) -> Result<Vec<SandboxRecord>, MetadataError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                     WHERE desired_state = 'RUNNING' AND expires_at < now()
                       AND observed_state NOT IN ('STOPPED', 'FAILED', 'PAUSED')
                     ORDER BY expires_at"
                ),
                &[],
            )
            .await
            .map_err(db("listing expired sandboxes"))?;
        rows.iter().map(sandbox_from).collect()
    }

    /// Sandboxes wanted stopped that are not stopped yet (a destroy that did not reach
    /// the node).
    pub async fn unsettled_stops(&self) -> Result<Vec<SandboxRecord>, MetadataError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                     WHERE desired_state = 'STOPPED'
                       AND observed_state NOT IN ('STOPPED', 'FAILED')
                     ORDER BY updated_at"
                ),
                &[],
            )
            .await
            .map_err(db("listing sandboxes to stop"))?;
        rows.iter().map(sandbox_from).collect()
    }

    /// Records sandbox `id` paused: observed and desired PAUSED, in snapshot `snapshot_id`
    /// (`None` keeps the one recorded), no address and no deadline. `None` if there is no
    /// such sandbox or it is stopped, failed or being deleted: a pause never revives one.
    pub async fn record_pause(
        &self,
        id: &SandboxId,
        snapshot_id: Option<&str>,
    ) -> Result<Option<SandboxRecord>, MetadataError> {
        self.update_sandbox(
            "
                         observed_state = 'PAUSED',
                         desired_state = 'PAUSED',
                         snapshot_id = coalesce($2, snapshot_id),
                         ip = '',
                         expires_at = NULL,
                         message = '',
                         updated_at = now()
                     WHERE id = $1 AND desired_state <> 'STOPPED'
                       AND observed_state NOT IN ('STOPPED', 'FAILED')",
            &[&id.as_str(), &snapshot_id],
            "recording a pause",
        )
        .await
    }

    /// Starts resuming sandbox `id` if it is PAUSED (and not being deleted): observed
    /// STARTING, desired RUNNING, the resume's start time now; its snapshot id stays until
    /// it runs. `None` if it is not paused (or does not exist): exactly one of concurrent
    /// resumes gets the record.
    pub async fn begin_resume(
        &self,
        id: &SandboxId,
    ) -> Result<Option<SandboxRecord>, MetadataError> {
        self.update_sandbox(
            "
                         observed_state = 'STARTING',
                         desired_state = 'RUNNING',
                         message = '',
                         resume_started_at = now(),
                         updated_at = now()
                     WHERE id = $1 AND observed_state = 'PAUSED' AND desired_state <> 'STOPPED'",
            &[&id.as_str()],
            "starting a resume",
        )
        .await
    }

    /// Puts sandbox `id` back to PAUSED after a resume that failed, with `message` saying
    /// why; its snapshot stays. `None` unless it is still STARTING from that resume (a
    /// node report or a delete got there first and is kept).
    pub async fn abort_resume(
        &self,
        id: &SandboxId,
        message: &str,
    ) -> Result<Option<SandboxRecord>, MetadataError> {
        self.update_sandbox(
            "
                         observed_state = 'PAUSED',
                         desired_state = 'PAUSED',
                         ip = '',
                         expires_at = NULL,
                         message = $2,
                         updated_at = now()
                     WHERE id = $1 AND observed_state = 'STARTING'
                       AND resume_started_at IS NOT NULL AND desired_state <> 'STOPPED'",
            &[&id.as_str(), &message],
            "undoing a failed resume",
        )
        .await
    }

    /// Records sandbox `id` running again after a resume (or a node reporting it running
    /// after one): observed and desired RUNNING, its snapshot moved to `resumed_from`, the
    /// observed address, restore time and deadline. `None` if there is no such sandbox or
    /// it is stopped, failed or being deleted.
    pub async fn record_resumed(
        &self,
        id: &SandboxId,
        seen: &SandboxObservation,
    ) -> Result<Option<SandboxRecord>, MetadataError> {
        self.update_sandbox(
            "
                         observed_state = 'RUNNING',
                         desired_state = 'RUNNING',
                         resumed_from = coalesce(snapshot_id, resumed_from),
                         snapshot_id = NULL,
                         ip = coalesce($2, ''),
                         boot_time_ms = coalesce($3, boot_time_ms),
                         expires_at = $4,
                         message = '',
                         updated_at = now()
                     WHERE id = $1 AND desired_state <> 'STOPPED'
                       AND observed_state NOT IN ('STOPPED', 'FAILED')",
            &[
                &id.as_str(),
                &seen.ip,
                &seen
                    .boot_time_ms
                    .map(|b| i32_of(b, "boot_time_ms"))
                    .transpose()?,
                &seen.expires_at,
            ],
            "recording a resume",
        )
        .await
    }

    /// What still uses template `name`: its sandboxes not yet stopped, failed or lost
    /// (paused ones included: they resume from it), and the ready pool VMs of it that
    /// nodes not lost last reported.
    pub async fn template_users(
        &self,
        name: &TemplateName,
    ) -> Result<TemplateUsers, MetadataError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM sandboxes
                 WHERE template_name = $1
                   AND observed_state NOT IN ('STOPPED', 'FAILED', 'LOST')",
                &[&name.as_str()],
            )
            .await
            .map_err(db("counting a template's sandboxes"))?;
        let sandboxes = u64_of(row.get(0), "count")?;
        let pool_vms = self
            .list_nodes()
            .await?
            .iter()
            .filter(|n| n.state != NodeState::Lost)
            .map(|n| {
                u64::from(
                    n.observed
                        .ready_pool
                        .get(name.as_str())
                        .copied()
                        .unwrap_or(0),
                )
            })
            .sum();
        Ok(TemplateUsers {
            sandboxes,
            pool_vms,
        })
    }

    /// The number of sandboxes in each observed state (states with none are absent).
    pub async fn count_sandboxes_by_state(
        &self,
    ) -> Result<BTreeMap<SandboxState, u64>, MetadataError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT observed_state, count(*) FROM sandboxes GROUP BY observed_state",
                &[],
            )
            .await
            .map_err(db("counting sandboxes"))?;
        rows.iter()
            .map(|row| {
                Ok((
                    parse_sandbox_state(row.get(0))?,
                    u64_of(row.get(1), "count")?,
                ))
            })
            .collect()
    }
}
