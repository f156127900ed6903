//! The scheduler's operations, between the gRPC edge and the stores: create (validate,
//! place, record, call the node), route exec/keepalive/delete/pause/resume to the owning
//! node, take in registrations and heartbeats, and the reconcile pass that drives recorded
//! sandboxes towards their desired state (lost nodes, deadlines, unfinished deletes).
//!
//! Pause and resume: snapshots are node-local until the snapshot store lands, so a paused
//! sandbox keeps its node and resumes only there (UNAVAILABLE while that node is away). A
//! pause is recorded once the node answers; a node report of PAUSED is the same
//! observation, so a pause cut short by a scheduler restart is adopted from the next
//! heartbeat. A resume is recorded STARTING first (one of concurrent resumes wins), then
//! RUNNING with what the node answered, or PAUSED again if the node refused; after a
//! restart mid-resume, a node reporting the sandbox RUNNING settles it at once, and one
//! still reporting it PAUSED at the resume's deadline puts it back to PAUSED.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use nanobox_core::{SandboxId, SandboxSpec, SandboxState, TemplateName, TemplateState};
use nanobox_proto::node::v1 as node;
use nanobox_proto::{convert, v1};
use nanobox_scheduler::placement::{self, Need};
use nanobox_store::metadata::{
    NewSandbox, NodeObserved, NodeReport, SandboxFilter, SandboxObservation, SandboxRecord,
};
use nanobox_store::MetadataStore;
use tonic::Request;

use crate::error::SchedulerError;
use crate::nodes::{NodeClient, Nodes};

/// Longest idempotency key.
const MAX_REQUEST_ID: usize = 128;
/// Default and largest list page.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

/// Timing and limits, from `nanobox.toml`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub heartbeat_interval: Duration,
    pub lost_after: Duration,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    /// How long a node may take to create a sandbox (a cold boot under TCG is slow).
    pub create_deadline: Duration,
    /// How long any other unary node call may take.
    pub call_deadline: Duration,
}

/// Nodes a create is offered to, best first, when the first ones refuse for capacity.
const MAX_PLACEMENT_ATTEMPTS: usize = 3;

/// What a pause produced.
#[derive(Debug)]
pub struct Paused {
    /// The sandbox, PAUSED, with its snapshot id.
    pub record: SandboxRecord,
    /// Milliseconds the node took from pausing the VM to the snapshot being written.
    pub snapshot_time_ms: u32,
    pub snapshot_size_bytes: u64,
}

/// The scheduler: stores, live nodes, settings.
#[derive(Debug)]
pub struct Scheduler {
    pub meta: MetadataStore,
    pub nodes: Nodes,
    pub settings: Settings,
}

fn with_deadline<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    request
}

fn to_system_time(t: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(t).ok())
}

/// The observation a node's report of a sandbox amounts to.
fn observation(s: &v1::Sandbox) -> SandboxObservation {
    SandboxObservation {
        state: convert::sandbox_state(s.state).ok(),
        ip: Some(s.ip.clone()),
        boot_time_ms: (s.boot_time_ms > 0).then_some(s.boot_time_ms),
        expires_at: to_system_time(s.expires_at),
        message: (!s.message.is_empty()).then(|| s.message.clone()),
    }
}

/// When the create or resume that put a STARTING sandbox in flight began.
fn in_flight_since(record: &SandboxRecord) -> SystemTime {
    if record.resuming() {
        record.resume_started_at.unwrap_or(record.created_at)
    } else {
        record.created_at
    }
}

fn need_of(r: &nanobox_core::Resources) -> Need {
    Need {
        vcpus: r.vcpu(),
        memory_mb: u64::from(r.memory_mb()),
    }
}

impl Scheduler {
    /// The client of node `id`: the live one, else one built from its recorded address
    /// (after a scheduler restart, before the node registered again).
    async fn node_client(&self, id: &str) -> Result<NodeClient, SchedulerError> {
        // Every call routed to a node comes here: the request's span names the node.
        tracing::Span::current().record("node_id", id);
        if let Some(client) = self.nodes.client_of(id) {
            return Ok(client);
        }
        let record = self
            .meta
            .get_node(id)
            .await?
            .ok_or_else(|| SchedulerError::Node {
                node: id.to_owned(),
                code: tonic::Code::Unavailable,
                message: "not registered".to_owned(),
            })?;
        crate::nodes::client(&record.address, self.nodes.auth()).map_err(|e| SchedulerError::Node {
            node: id.to_owned(),
            code: tonic::Code::Unavailable,
            message: format!("bad address {:?}: {e}", record.address),
        })
    }

    async fn sandbox(&self, id: &str) -> Result<SandboxRecord, SchedulerError> {
        let id = convert::sandbox_id("id", id)?;
        tracing::Span::current().record("sandbox_id", id.as_str());
        self.meta
            .get_sandbox(&id)
            .await?
            .ok_or(SchedulerError::SandboxNotFound(id))
    }

    /// Creates a sandbox: validates, places, records it (desired RUNNING), asks the node
    /// and records what it answered.
    pub async fn create(
        &self,
        r: v1::CreateSandboxRequest,
    ) -> Result<SandboxRecord, SchedulerError> {
        let request_id = (!r.request_id.is_empty()).then(|| r.request_id.clone());
        if let Some(rid) = &request_id {
            if rid.len() > MAX_REQUEST_ID {
                return Err(SchedulerError::InvalidField {
                    field: "request_id",
                    reason: format!("{} bytes, at most {MAX_REQUEST_ID}", rid.len()),
                });
            }
            if let Some(existing) = self.meta.get_sandbox_by_request_id(rid).await? {
                return Ok(existing);
            }
        }
        let spec = SandboxSpec::try_from(r)?;
        let timeout = spec.timeout.unwrap_or(self.settings.default_timeout);
        if timeout > self.settings.max_timeout {
            return Err(SchedulerError::InvalidField {
                field: "timeout_sec",
                reason: format!(
                    "{} is more than this cluster's maximum of {}",
                    timeout.as_secs(),
                    self.settings.max_timeout.as_secs()
                ),
            });
        }
        let template = self
            .meta
            .get_template(&spec.template)
            .await?
            .ok_or_else(|| SchedulerError::TemplateNotFound(spec.template.clone()))?;
        let digest = match (template.state, template.manifest_digest) {
            (TemplateState::Ready, Some(digest)) => digest,
            (state, _) => {
                return Err(SchedulerError::TemplateNotReady {
                    name: spec.template.clone(),
                    state,
                })
            }
        };
        let need = need_of(&spec.resources);
        let candidates = self.nodes.candidates(spec.template.as_str(), &digest);
        let order = placement::rank(&candidates, need, &mut rand::rng())?;
        let mut node_id = candidates[order[0]].id.clone();
        // Placement works from the nodes' last reports: one that has filled up since
        // refuses for capacity, and the create moves on to the next candidate.
        let mut fallbacks = order
            .iter()
            .skip(1)
            .take(MAX_PLACEMENT_ATTEMPTS - 1)
            .map(|&i| candidates[i].id.clone());
        let template_name = spec.template.to_string();
        let mut reservation = self.nodes.reserve(&node_id, Some(&template_name), need);

        let id = SandboxId::new();
        tracing::Span::current()
            .record("sandbox_id", id.as_str())
            .record("template", template_name.as_str());
        let (record, created) = self
            .meta
            .insert_sandbox(&NewSandbox {
                id: id.clone(),
                request_id,
                template: spec.template.clone(),
                template_digest: digest.clone(),
                node_id: Some(node_id.clone()),
                observed_state: SandboxState::Starting,
                resources: spec.resources,
                network: spec.network.clone(),
                env: spec.env.clone(),
                metadata: spec.metadata.clone(),
                timeout,
                expires_at: Some(SystemTime::now() + timeout),
            })
            .await?;
        if !created {
            // A concurrent create with the same request_id won.
            return Ok(record);
        }
        let call = node::CreateSandboxRequest {
            sandbox_id: id.to_string(),
            template: spec.template.to_string(),
            template_digest: digest,
            resources: Some(spec.resources.into()),
            network: Some(spec.network.into()),
            env: spec.env.into_iter().collect(),
            timeout_sec: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
            metadata: spec.metadata.into_iter().collect(),
            hostname: String::new(),
        };
        let answer = loop {
            let mut client = self.node_client(&node_id).await?;
            let answer = client
                .create_sandbox(with_deadline(call.clone(), self.settings.create_deadline))
                .await;
            drop(reservation);
            let full = matches!(&answer, Err(s) if s.code() == tonic::Code::ResourceExhausted);
            let Some(next) = fallbacks.next().filter(|_| full) else {
                break answer;
            };
            if let Err(status) = &answer {
                tracing::info!(sandbox = %id, node = %node_id, next = %next, reason = %status.message(), "node refused the create for capacity; trying the next");
            }
            self.nodes.mark_full(&node_id);
            if self
                .meta
                .move_starting_sandbox(&id, &node_id, &next)
                .await?
                .is_none()
            {
                // Deleted meanwhile (or given up by a reconcile pass): nothing was made.
                return Err(SchedulerError::SandboxGone(id));
            }
            node_id = next;
            reservation = self.nodes.reserve(&node_id, Some(&template_name), need);
        };
        match answer.map(|r| r.into_inner().sandbox) {
            Ok(Some(sandbox)) => {
                self.nodes.add_allocated(&node_id, need);
                tracing::info!(sandbox = %id, node = %node_id, boot_ms = sandbox.boot_time_ms, "sandbox created");
                Ok(self
                    .meta
                    .observe_sandbox(&id, &observation(&sandbox))
                    .await?
                    .unwrap_or(record))
            }
            Ok(None) => Err(self
                .fail_create(
                    &id,
                    &node_id,
                    &tonic::Status::internal("no sandbox in the answer"),
                )
                .await),
            Err(status) => Err(self.fail_create(&id, &node_id, &status).await),
        }
    }

    /// Records a failed create and makes sure the node holds nothing for it (the node may
    /// have booted the VM after the deadline passed here).
    async fn fail_create(
        &self,
        id: &SandboxId,
        node_id: &str,
        status: &tonic::Status,
    ) -> SchedulerError {
        let err = SchedulerError::node(node_id, status);
        tracing::warn!(sandbox = %id, node = %node_id, error = %err, "create failed");
        let _ = self
            .meta
            .set_sandbox_desired(id, SandboxState::Stopped)
            .await;
        let seen = SandboxObservation {
            state: Some(SandboxState::Failed),
            message: Some(err.to_string()),
            ..Default::default()
        };
        if let Err(e) = self.meta.observe_sandbox(id, &seen).await {
            tracing::warn!(sandbox = %id, error = %e, "recording a failed create");
        }
        self.destroy_quietly(id, node_id, "cleaning up a failed create")
            .await;
        err
    }

    /// Asks node `node_id` to destroy sandbox `id` (with a paused one, its snapshot), for
    /// clean-ups nobody waits on. A failure is only logged: the node reports the sandbox
    /// in a later heartbeat and is told to destroy it then.
    async fn destroy_quietly(&self, id: &SandboxId, node_id: &str, why: &'static str) {
        if let Ok(mut client) = self.node_client(node_id).await {
            let destroy = node::DestroySandboxRequest {
                sandbox_id: id.to_string(),
            };
            if let Err(e) = client
                .destroy_sandbox(with_deadline(destroy, self.settings.call_deadline))
                .await
            {
                tracing::warn!(sandbox = %id, node = %node_id, error = %e, "{why}");
            }
        }
    }

    /// One sandbox, as recorded.
    pub async fn get(&self, id: &str) -> Result<SandboxRecord, SchedulerError> {
        self.sandbox(id).await
    }

    /// A page of sandboxes, newest first, and the next page's token.
    pub async fn list(
        &self,
        r: v1::ListSandboxesRequest,
    ) -> Result<(Vec<SandboxRecord>, String), SchedulerError> {
        let limit = match r.page_size {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(SchedulerError::InvalidField {
                    field: "page_size",
                    reason: format!("{n} is more than {MAX_PAGE}"),
                })
            }
            n => n,
        };
        let filter = SandboxFilter {
            template: (!r.template.is_empty())
                .then(|| convert::template_name("template", r.template))
                .transpose()?,
            state: (r.state != 0)
                .then(|| convert::sandbox_state(r.state))
                .transpose()?,
            node_id: (!r.node_id.is_empty()).then_some(r.node_id),
            metadata: r.metadata.into_iter().collect(),
            before: (!r.page_token.is_empty())
                .then(|| convert::sandbox_id("page_token", &r.page_token))
                .transpose()?,
            limit: limit + 1,
        };
        let mut page = self.meta.list_sandboxes(&filter).await?;
        let next = if page.len() > limit as usize {
            page.truncate(limit as usize);
            page.last().map(|s| s.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((page, next))
    }

    /// Deletes a sandbox cluster-wide: wanted STOPPED, destroyed on its node.
    pub async fn delete(&self, id: &str) -> Result<SandboxRecord, SchedulerError> {
        let record = self.sandbox(id).await?;
        if record.observed_state == SandboxState::Stopped {
            return Err(SchedulerError::SandboxGone(record.id));
        }
        self.stop(record, None).await
    }

    /// Drives one sandbox to STOPPED; `reason` becomes its message.
    async fn stop(
        &self,
        record: SandboxRecord,
        reason: Option<&str>,
    ) -> Result<SandboxRecord, SchedulerError> {
        let id = record.id.clone();
        self.meta
            .set_sandbox_desired(&id, SandboxState::Stopped)
            .await?;
        let Some(node_id) = record.node_id.clone() else {
            return self.settle_stopped(&id, reason).await;
        };
        // A sandbox the node never got, or already lost, holds nothing to destroy here;
        // if its node comes back and reports it, the heartbeat answer destroys it.
        if matches!(
            record.observed_state,
            SandboxState::Failed | SandboxState::Lost | SandboxState::Pending
        ) {
            return self.settle_stopped(&id, reason).await;
        }
        let request = node::DestroySandboxRequest {
            sandbox_id: id.to_string(),
        };
        let result = match self.node_client(&node_id).await {
            Ok(mut client) => client
                .destroy_sandbox(with_deadline(request, self.settings.call_deadline))
                .await
                .map_err(|s| SchedulerError::node(&node_id, &s)),
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => self.settle_stopped(&id, reason).await,
            Err(e) => {
                // The reconcile pass retries; the caller sees STOPPING.
                tracing::warn!(sandbox = %id, node = %node_id, error = %e, "destroy failed; retrying later");
                let seen = SandboxObservation {
                    state: Some(SandboxState::Stopping),
                    ..Default::default()
                };
                Ok(self
                    .meta
                    .observe_sandbox(&id, &seen)
                    .await?
                    .unwrap_or(record))
            }
        }
    }

    async fn settle_stopped(
        &self,
        id: &SandboxId,
        reason: Option<&str>,
    ) -> Result<SandboxRecord, SchedulerError> {
        let seen = SandboxObservation {
            state: Some(SandboxState::Stopped),
            ip: Some(String::new()),
            message: reason.map(str::to_owned),
            ..Default::default()
        };
        self.meta
            .observe_sandbox(id, &seen)
            .await?
            .ok_or_else(|| SchedulerError::SandboxNotFound(id.clone()))
    }

    /// Starts a command on the sandbox's node and returns its event stream.
    pub async fn exec(
        &self,
        r: v1::ExecRequest,
    ) -> Result<tonic::Streaming<v1::ExecEvent>, SchedulerError> {
        let id = convert::sandbox_id("id", &r.id)?;
        // Validate here, so bad input is INVALID_ARGUMENT whatever state the sandbox is in.
        let spec = nanobox_core::ExecSpec::try_from(r.clone())?;
        let record = self
            .meta
            .get_sandbox(&id)
            .await?
            .ok_or_else(|| SchedulerError::SandboxNotFound(id.clone()))?;
        let node_id = match (&record.node_id, record.observed_state) {
            (Some(node_id), SandboxState::Running) => node_id.clone(),
            (_, SandboxState::Paused) => return Err(SchedulerError::Paused { id, what: "exec" }),
            (_, state) => {
                return Err(SchedulerError::NotRunning {
                    id,
                    state,
                    what: "exec",
                })
            }
        };
        let mut client = self.node_client(&node_id).await?;
        let stream = client
            .exec(convert::exec_request(&id, spec))
            .await
            .map_err(|s| SchedulerError::node(&node_id, &s))?;
        Ok(stream.into_inner())
    }

    /// A lifetime asked for in seconds (0: the sandbox's creation timeout), checked
    /// against the cluster's maximum.
    fn lifetime(&self, seconds: u32, record: &SandboxRecord) -> Result<Duration, SchedulerError> {
        let timeout = match seconds {
            0 => record.timeout,
            s => Duration::from_secs(s.into()),
        };
        if timeout > self.settings.max_timeout {
            return Err(SchedulerError::InvalidField {
                field: "timeout_sec",
                reason: format!(
                    "{} is more than this cluster's maximum of {}",
                    timeout.as_secs(),
                    self.settings.max_timeout.as_secs()
                ),
            });
        }
        Ok(timeout)
    }

    /// Pauses a running sandbox: its node snapshots the VM to its own disk and stops it
    /// (freeing its vCPUs and memory); recorded PAUSED with the snapshot, no deadline.
    pub async fn pause(&self, id: &str) -> Result<Paused, SchedulerError> {
        let record = self.sandbox(id).await?;
        let node_id = match (&record.node_id, record.observed_state) {
            (Some(node_id), SandboxState::Running) => node_id.clone(),
            (_, state) => {
                return Err(SchedulerError::NotRunning {
                    id: record.id,
                    state,
                    what: "pause",
                })
            }
        };
        let mut client = self.node_client(&node_id).await?;
        let request = node::PauseSandboxRequest {
            sandbox_id: record.id.to_string(),
        };
        // Writing the guest's memory out takes as long as a boot may on a slow host.
        let answer = client
            .pause_sandbox(with_deadline(request, self.settings.create_deadline))
            .await
            .map_err(|s| SchedulerError::node(&node_id, &s))?
            .into_inner();
        self.nodes
            .sub_allocated(&node_id, need_of(&record.resources));
        let snapshot = (!answer.snapshot_id.is_empty()).then_some(answer.snapshot_id.as_str());
        let Some(paused) = self.meta.record_pause(&record.id, snapshot).await? else {
            // Deleted while its node was pausing it: the snapshot is nobody's. (The
            // delete's own destroy may have run before the pause finished.)
            self.destroy_quietly(
                &record.id,
                &node_id,
                "deleting the snapshot of a sandbox deleted while pausing",
            )
            .await;
            return Err(SchedulerError::SandboxGone(record.id));
        };
        tracing::info!(
            sandbox = %record.id,
            node = %node_id,
            snapshot = %answer.snapshot_id,
            snapshot_ms = answer.snapshot_time_ms,
            bytes = answer.size_bytes,
            "sandbox paused"
        );
        Ok(Paused {
            record: paused,
            snapshot_time_ms: answer.snapshot_time_ms,
            snapshot_size_bytes: answer.size_bytes,
        })
    }

    /// Resumes a paused sandbox on the node holding its snapshot, with a fresh lifetime
    /// (`timeout_sec` 0: its creation timeout).
    pub async fn resume(
        &self,
        r: v1::ResumeSandboxRequest,
    ) -> Result<SandboxRecord, SchedulerError> {
        let record = self.sandbox(&r.id).await?;
        if record.observed_state != SandboxState::Paused {
            return Err(SchedulerError::NotPaused {
                id: record.id,
                state: record.observed_state,
            });
        }
        let timeout = self.lifetime(r.timeout_sec, &record)?;
        let Some(node_id) = record.node_id.clone() else {
            return Err(SchedulerError::SnapshotNodeUnavailable {
                id: record.id,
                node: "(none recorded)".to_owned(),
                why: "unknown",
            });
        };
        // Snapshots are node-local: no other node can take over, so say which node is
        // missing rather than try the recorded address and time out.
        if !self.nodes.knows(&node_id) {
            let why = match self.meta.get_node(&node_id).await? {
                Some(n) if n.state == nanobox_core::NodeState::Lost => {
                    "lost (it stopped heartbeating)"
                }
                Some(_) => "not connected to the scheduler",
                None => "unknown",
            };
            return Err(SchedulerError::SnapshotNodeUnavailable {
                id: record.id,
                node: node_id,
                why,
            });
        }
        let Some(started) = self.meta.begin_resume(&record.id).await? else {
            // A concurrent resume or delete got there first.
            let now = self.sandbox(&r.id).await?;
            return Err(SchedulerError::NotPaused {
                id: now.id,
                state: now.observed_state,
            });
        };
        let id = started.id.clone();
        let need = need_of(&started.resources);
        let reservation = self.nodes.reserve(&node_id, None, need);
        let call = node::ResumeSandboxRequest {
            sandbox_id: id.to_string(),
            snapshot_id: started.snapshot_id.clone().unwrap_or_default(),
            template: started.template.to_string(),
            template_digest: started.template_digest.clone(),
            resources: Some(started.resources.into()),
            network: Some(started.network.clone().into()),
            timeout_sec: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
            metadata: started.metadata.clone().into_iter().collect(),
            env: started.env.clone().into_iter().collect(),
        };
        let answer = match self.node_client(&node_id).await {
            Ok(mut client) => client
                .resume_sandbox(with_deadline(call, self.settings.create_deadline))
                .await
                .map(|r| r.into_inner().sandbox)
                .map_err(|s| SchedulerError::node(&node_id, &s)),
            Err(e) => Err(e),
        };
        drop(reservation);
        let sandbox = match answer {
            Ok(Some(sandbox)) => sandbox,
            Ok(None) => {
                let status = tonic::Status::internal("no sandbox in the answer");
                return Err(self
                    .fail_resume(&id, SchedulerError::node(&node_id, &status))
                    .await);
            }
            Err(e) => return Err(self.fail_resume(&id, e).await),
        };
        self.nodes.add_allocated(&node_id, need);
        let mut seen = observation(&sandbox);
        seen.expires_at = seen
            .expires_at
            .or_else(|| Some(SystemTime::now() + timeout));
        let Some(resumed) = self.meta.record_resumed(&id, &seen).await? else {
            // Deleted while its node was restoring it.
            self.destroy_quietly(&id, &node_id, "destroying a sandbox deleted while resuming")
                .await;
            return Err(SchedulerError::SandboxGone(id));
        };
        tracing::info!(sandbox = %id, node = %node_id, restore_ms = sandbox.boot_time_ms, "sandbox resumed");
        Ok(resumed)
    }

    /// Records a resume that failed: PAUSED again (the node still has the snapshot unless
    /// it said otherwise, and its reports settle that), the error as the message.
    async fn fail_resume(&self, id: &SandboxId, err: SchedulerError) -> SchedulerError {
        tracing::warn!(sandbox = %id, error = %err, "resume failed");
        let message = format!("resume failed: {err}");
        if let Err(e) = self.meta.abort_resume(id, &message).await {
            // The reconcile pass settles it from the node's reports at the deadline.
            tracing::warn!(sandbox = %id, error = %e, "recording a failed resume");
        }
        err
    }

    /// Moves a sandbox's deadline (on its node and in the record).
    pub async fn keepalive(
        &self,
        r: v1::KeepaliveSandboxRequest,
    ) -> Result<SystemTime, SchedulerError> {
        let record = self.sandbox(&r.id).await?;
        let timeout = self.lifetime(r.timeout_sec, &record)?;
        let node_id = match (&record.node_id, record.observed_state) {
            (Some(node_id), SandboxState::Running) => node_id.clone(),
            (_, SandboxState::Paused) => {
                return Err(SchedulerError::Paused {
                    id: record.id,
                    what: "keepalive",
                })
            }
            (_, state) => {
                return Err(SchedulerError::NotRunning {
                    id: record.id,
                    state,
                    what: "keepalive",
                })
            }
        };
        let mut client = self.node_client(&node_id).await?;
        let request = node::KeepaliveRequest {
            sandbox_id: record.id.to_string(),
            timeout_sec: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
        };
        let answer = client
            .keepalive(with_deadline(request, self.settings.call_deadline))
            .await
            .map_err(|s| SchedulerError::node(&node_id, &s))?
            .into_inner();
        let expires =
            to_system_time(answer.expires_at).unwrap_or_else(|| SystemTime::now() + timeout);
        self.meta
            .observe_sandbox(
                &record.id,
                &SandboxObservation {
                    expires_at: Some(expires),
                    ..Default::default()
                },
            )
            .await?;
        Ok(expires)
    }

    /// Records a node's report (registration or heartbeat) and reconciles the sandboxes
    /// it reports against the records; returns the sandboxes the node should destroy.
    pub async fn node_report(
        &self,
        status: node::NodeStatus,
        observed_at: Option<SystemTime>,
        labels: HashMap<String, String>,
    ) -> Result<Vec<String>, SchedulerError> {
        if status.node_id.is_empty() {
            return Err(SchedulerError::InvalidField {
                field: "status.node_id",
                reason: "empty".to_owned(),
            });
        }
        if status.address.is_empty() {
            return Err(SchedulerError::InvalidField {
                field: "status.address",
                reason: "empty".to_owned(),
            });
        }
        let cap = status.capacity.unwrap_or_default();
        let alloc = status.allocated.unwrap_or_default();
        let observed = NodeObserved {
            cached_digests: status
                .cached_templates
                .iter()
                .map(|c| c.digest.clone())
                .collect(),
            ready_pool: status
                .pools
                .iter()
                .map(|p| (p.template.clone(), p.ready))
                .collect(),
            sandboxes_running: status
                .sandboxes
                .iter()
                .filter(|s| s.state == v1::SandboxState::Running as i32)
                .count() as u32,
            labels: labels.into_iter().collect(),
        };
        self.meta
            .report_node(&NodeReport {
                id: status.node_id.clone(),
                address: status.address.clone(),
                draining: status.draining,
                capacity_vcpus: cap.vcpu,
                capacity_memory_mb: u64::from(cap.memory_mb),
                allocated_vcpus: alloc.vcpu,
                allocated_memory_mb: u64::from(alloc.memory_mb),
                observed,
            })
            .await?;
        let destroy = self.reconcile_reported(&status, observed_at).await?;
        crate::metrics::node_reported(&status);
        self.nodes
            .report(status)
            .map_err(|e| SchedulerError::InvalidField {
                field: "status.address",
                reason: e.to_string(),
            })?;
        Ok(destroy)
    }

    async fn reconcile_reported(
        &self,
        status: &node::NodeStatus,
        observed_at: Option<SystemTime>,
    ) -> Result<Vec<String>, SchedulerError> {
        let node_id = &status.node_id;
        let records = self.meta.node_sandboxes(node_id).await?;
        let by_id: HashMap<&str, &SandboxRecord> =
            records.iter().map(|r| (r.id.as_str(), r)).collect();
        let mut destroy = Vec::new();
        let mut reported = HashSet::new();
        for s in &status.sandboxes {
            reported.insert(s.id.as_str());
            let state = convert::sandbox_state(s.state).ok();
            let gone = matches!(state, Some(SandboxState::Stopped));
            let Some(record) = by_id.get(s.id.as_str()) else {
                // Not ours (or already stopped here): a live VM nobody wants goes.
                let ours = match SandboxId::parse(&s.id) {
                    Ok(id) => self.meta.get_sandbox(&id).await?,
                    Err(_) => None,
                };
                let wanted = ours.is_some_and(|r| {
                    r.node_id.as_deref() == Some(node_id.as_str())
                        && r.desired_state == SandboxState::Running
                });
                if !gone && !wanted {
                    destroy.push(s.id.clone());
                }
                continue;
            };
            if record.desired_state == SandboxState::Stopped {
                if gone {
                    self.settle_stopped(&record.id, None).await?;
                } else {
                    destroy.push(s.id.clone());
                }
                continue;
            }
            let seen = observation(s);
            // A report taken before the record last changed (a pause or resume recorded
            // after the node took its snapshot of state) must not undo that change.
            let outdated = observed_at.is_some_and(|t| t < record.updated_at);
            if outdated && seen.state != Some(record.observed_state) {
                continue;
            }
            // A create or resume in flight records its own result; one older than its
            // deadline was cut short (a scheduler restart) and is adopted from the node's
            // report. A resume the node reports running is finished whoever records it.
            if record.observed_state == SandboxState::Starting {
                let age = SystemTime::now()
                    .duration_since(in_flight_since(record))
                    .unwrap_or_default();
                let resumed = record.resuming() && seen.state == Some(SandboxState::Running);
                if age < self.settings.create_deadline && !resumed {
                    continue;
                }
            }
            let snapshot = (!s.snapshot_id.is_empty()).then_some(s.snapshot_id.as_str());
            match seen.state {
                // Paused on the node (a pause whose answer this scheduler never got, or a
                // resume that never happened): PAUSED here too, wanted so.
                Some(SandboxState::Paused) => {
                    if record.observed_state != SandboxState::Paused
                        || (record.snapshot_id.is_none() && snapshot.is_some())
                    {
                        self.meta.record_pause(&record.id, snapshot).await?;
                    }
                    continue;
                }
                // Running again after a resume whose answer this scheduler never got.
                Some(SandboxState::Running)
                    if record.observed_state == SandboxState::Paused
                        || record.snapshot_id.is_some()
                        || record.resuming() =>
                {
                    self.meta.record_resumed(&record.id, &seen).await?;
                    continue;
                }
                _ => {}
            }
            let changed = seen.state != Some(record.observed_state)
                || seen
                    .expires_at
                    .is_some_and(|e| Some(e) != record.expires_at)
                || seen.ip.as_deref() != Some(record.ip.as_str());
            if changed {
                self.meta.observe_sandbox(&record.id, &seen).await?;
            }
        }
        // Sandboxes recorded running (or paused) here that the node no longer has.
        for record in &records {
            let stale = observed_at.is_none_or(|t| record.updated_at < t);
            // A create or resume cut short (the scheduler restarted while it was in
            // flight) that the node never reported by its deadline: it failed. It is also
            // no longer wanted, so a VM the node reports for it later is destroyed, not
            // adopted.
            if record.observed_state == SandboxState::Starting
                && !reported.contains(record.id.as_str())
                && stale
            {
                let age = SystemTime::now()
                    .duration_since(in_flight_since(record))
                    .unwrap_or_default();
                if age >= self.settings.create_deadline {
                    self.meta
                        .set_sandbox_desired(&record.id, SandboxState::Stopped)
                        .await?;
                    let what = if record.resuming() {
                        "resume"
                    } else {
                        "create"
                    };
                    let seen = SandboxObservation {
                        state: Some(SandboxState::Failed),
                        ip: Some(String::new()),
                        message: Some(format!(
                            "its {what} was interrupted and the node never reported it"
                        )),
                        ..Default::default()
                    };
                    self.meta.observe_sandbox(&record.id, &seen).await?;
                    continue;
                }
            }
            // A paused sandbox the node no longer reports has lost its snapshot with it.
            if matches!(
                record.observed_state,
                SandboxState::Running | SandboxState::Paused
            ) && !reported.contains(record.id.as_str())
                && stale
            {
                let seen = SandboxObservation {
                    state: Some(SandboxState::Lost),
                    ip: Some(String::new()),
                    message: Some(format!("node {node_id} no longer reports it")),
                    ..Default::default()
                };
                self.meta.observe_sandbox(&record.id, &seen).await?;
            }
        }
        Ok(destroy)
    }

    /// One reconcile pass: silent nodes become LOST (and their sandboxes), sandboxes past
    /// their deadline are deleted, deletes that did not reach their node are retried.
    pub async fn reconcile(&self) -> Result<(), SchedulerError> {
        let lost = self
            .meta
            .mark_silent_nodes_lost(self.settings.lost_after, "its node stopped heartbeating")
            .await?;
        for id in self.nodes.silent().into_iter().chain(lost.iter().cloned()) {
            self.nodes.forget(&id);
            crate::metrics::node_lost(&id);
        }
        for id in &lost {
            tracing::warn!(node = %id, "node lost: no heartbeat");
        }
        for record in self.meta.expired_sandboxes().await? {
            let id = record.id.clone();
            tracing::info!(sandbox = %id, "deadline passed: deleting");
            if let Err(e) = self.stop(record, Some("its timeout expired")).await {
                tracing::warn!(sandbox = %id, error = %e, "deleting an expired sandbox");
            }
        }
        for record in self.meta.unsettled_stops().await? {
            let id = record.id.clone();
            let node_live = record
                .node_id
                .as_deref()
                .is_some_and(|n| self.nodes.knows(n));
            let result = if node_live {
                self.stop(record, None).await
            } else {
                // Its node is gone; if it returns and reports the VM, it is told to
                // destroy it then.
                self.settle_stopped(&id, None).await
            };
            if let Err(e) = result {
                tracing::warn!(sandbox = %id, error = %e, "retrying a delete");
            }
        }
        Ok(())
    }

    /// Refreshes the series the reconcile loop keeps current (recorded sandboxes by
    /// state): one count query, run only when metrics are exported.
    pub async fn publish_metrics(&self) -> Result<(), SchedulerError> {
        crate::metrics::sandboxes(&self.meta.count_sandboxes_by_state().await?);
        Ok(())
    }

    /// Every template's name by its image digest: nodes report their cached templates by
    /// digest, the Cluster API shows them by name.
    pub async fn template_names_by_digest(
        &self,
    ) -> Result<HashMap<String, Vec<TemplateName>>, SchedulerError> {
        let mut names: HashMap<String, Vec<TemplateName>> = HashMap::new();
        for t in self.meta.list_templates(None).await? {
            if let Some(d) = t.manifest_digest {
                names.entry(d).or_default().push(t.name);
            }
        }
        Ok(names)
    }
}
