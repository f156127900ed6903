//! The gRPC edge: `nanobox.v1.Sandboxes`, `nanobox.v1.Cluster` and
//! `nanobox.node.v1.NodeRegistry` over a [`Scheduler`]. Records become proto here and
//! errors statuses (see `error`).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use nanobox_core::{NodeState, TemplateState};
use nanobox_proto::node::v1 as node;
use nanobox_proto::node::v1::node_registry_server::NodeRegistry;
use nanobox_proto::v1;
use nanobox_proto::v1::cluster_server::Cluster;
use nanobox_proto::v1::sandboxes_server::Sandboxes;
use nanobox_store::metadata::SandboxRecord;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use crate::scheduler::Scheduler;

fn timestamp(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(t))
}

/// A recorded sandbox as the API shows it (its observed state). A paused sandbox shows
/// the node holding its snapshot (snapshots are node-local until the snapshot store
/// lands) and the snapshot; a resumed one the snapshot it was resumed from.
pub fn sandbox_proto(r: SandboxRecord) -> v1::Sandbox {
    let running = r.observed_state == nanobox_core::SandboxState::Running;
    v1::Sandbox {
        id: r.id.to_string(),
        template: r.template.to_string(),
        state: v1::SandboxState::from(r.observed_state).into(),
        node_id: r.node_id.unwrap_or_default(),
        ip: if running { r.ip } else { String::new() },
        boot_time_ms: r.boot_time_ms,
        resources: Some(r.resources.into()),
        network: Some(r.network.into()),
        env: r.env.into_iter().collect(),
        metadata: r.metadata.into_iter().collect(),
        created_at: timestamp(r.created_at),
        expires_at: r.expires_at.and_then(timestamp),
        message: r.message,
        snapshot_id: r.snapshot_id.or(r.resumed_from).unwrap_or_default(),
        template_digest: r.template_digest,
    }
}

/// The three services share one scheduler.
#[derive(Debug, Clone)]
pub struct Api {
    scheduler: Arc<Scheduler>,
}

impl Api {
    pub fn new(scheduler: Arc<Scheduler>) -> Self {
        Self { scheduler }
    }
}

type ExecStream = Pin<Box<dyn Stream<Item = Result<v1::ExecEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Sandboxes for Api {
    async fn create(
        &self,
        request: Request<v1::CreateSandboxRequest>,
    ) -> Result<Response<v1::CreateSandboxResponse>, Status> {
        let record = self.scheduler.create(request.into_inner()).await?;
        Ok(Response::new(v1::CreateSandboxResponse {
            sandbox: Some(sandbox_proto(record)),
        }))
    }

    async fn get(
        &self,
        request: Request<v1::GetSandboxRequest>,
    ) -> Result<Response<v1::GetSandboxResponse>, Status> {
        let record = self.scheduler.get(&request.into_inner().id).await?;
        Ok(Response::new(v1::GetSandboxResponse {
            sandbox: Some(sandbox_proto(record)),
        }))
    }

    async fn list(
        &self,
        request: Request<v1::ListSandboxesRequest>,
    ) -> Result<Response<v1::ListSandboxesResponse>, Status> {
        let (page, next_page_token) = self.scheduler.list(request.into_inner()).await?;
        Ok(Response::new(v1::ListSandboxesResponse {
            sandboxes: page.into_iter().map(sandbox_proto).collect(),
            next_page_token,
        }))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteSandboxRequest>,
    ) -> Result<Response<v1::DeleteSandboxResponse>, Status> {
        let record = self.scheduler.delete(&request.into_inner().id).await?;
        Ok(Response::new(v1::DeleteSandboxResponse {
            sandbox: Some(sandbox_proto(record)),
        }))
    }

    type ExecStream = ExecStream;

    async fn exec(
        &self,
        request: Request<v1::ExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let stream = self.scheduler.exec(request.into_inner()).await?;
        // Events pass through as the node sends them; dropping this stream (the client
        // went away) drops the node call, which kills the command.
        Ok(Response::new(Box::pin(stream.map(|item| item))))
    }

    async fn keepalive(
        &self,
        request: Request<v1::KeepaliveSandboxRequest>,
    ) -> Result<Response<v1::KeepaliveSandboxResponse>, Status> {
        let expires = self.scheduler.keepalive(request.into_inner()).await?;
        Ok(Response::new(v1::KeepaliveSandboxResponse {
            expires_at: timestamp(expires),
        }))
    }

    async fn pause(
        &self,
        request: Request<v1::PauseSandboxRequest>,
    ) -> Result<Response<v1::PauseSandboxResponse>, Status> {
        let paused = self.scheduler.pause(&request.into_inner().id).await?;
        Ok(Response::new(v1::PauseSandboxResponse {
            sandbox: Some(sandbox_proto(paused.record)),
            snapshot_time_ms: paused.snapshot_time_ms,
            snapshot_size_bytes: paused.snapshot_size_bytes,
        }))
    }

    async fn resume(
        &self,
        request: Request<v1::ResumeSandboxRequest>,
    ) -> Result<Response<v1::ResumeSandboxResponse>, Status> {
        let record = self.scheduler.resume(request.into_inner()).await?;
        Ok(Response::new(v1::ResumeSandboxResponse {
            sandbox: Some(sandbox_proto(record)),
        }))
    }
}

#[tonic::async_trait]
impl Cluster for Api {
    async fn list_nodes(
        &self,
        _request: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesResponse>, Status> {
        let names = self
            .scheduler
            .template_names_by_digest()
            .await
            .map_err(Status::from)?;
        let nodes = self
            .scheduler
            .meta
            .list_nodes()
            .await
            .map_err(|e| Status::from(crate::error::SchedulerError::from(e)))?;
        let nodes = nodes
            .into_iter()
            .map(|n| {
                let mut cached: Vec<String> = n
                    .observed
                    .cached_digests
                    .iter()
                    .flat_map(|d| names.get(d).into_iter().flatten())
                    .map(|t| t.to_string())
                    .collect();
                cached.sort();
                cached.dedup();
                v1::Node {
                    id: n.id,
                    address: n.address,
                    state: v1::NodeState::from(n.state).into(),
                    capacity: Some(v1::Resources {
                        vcpu: n.capacity_vcpus,
                        memory_mb: u32::try_from(n.capacity_memory_mb).unwrap_or(u32::MAX),
                        disk_mb: 0,
                    }),
                    allocated: Some(v1::Resources {
                        vcpu: n.allocated_vcpus,
                        memory_mb: u32::try_from(n.allocated_memory_mb).unwrap_or(u32::MAX),
                        disk_mb: 0,
                    }),
                    cached_templates: cached,
                    ready_pool: n.observed.ready_pool.into_iter().collect(),
                    sandboxes_running: n.observed.sandboxes_running,
                    last_heartbeat: timestamp(n.last_heartbeat),
                }
            })
            .collect();
        Ok(Response::new(v1::ListNodesResponse { nodes }))
    }

    async fn get_stats(
        &self,
        _request: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::GetStatsResponse>, Status> {
        let store_err = |e| Status::from(crate::error::SchedulerError::from(e));
        let meta = &self.scheduler.meta;
        let counts = meta.count_sandboxes_by_state().await.map_err(store_err)?;
        let nodes = meta.list_nodes().await.map_err(store_err)?;
        let templates = meta.list_templates(None).await.map_err(store_err)?;
        let mut pool_ready: BTreeMap<String, u32> = BTreeMap::new();
        for n in nodes.iter().filter(|n| n.state != NodeState::Lost) {
            for (template, ready) in &n.observed.ready_pool {
                *pool_ready.entry(template.clone()).or_default() += ready;
            }
        }
        let stats = v1::Stats {
            sandboxes_by_state: counts
                .into_iter()
                .map(|(state, n)| (state.to_string(), u32::try_from(n).unwrap_or(u32::MAX)))
                .collect(),
            nodes_total: nodes.len() as u32,
            nodes_ready: nodes.iter().filter(|n| n.state == NodeState::Ready).count() as u32,
            pool_ready: pool_ready.into_iter().collect(),
            templates_total: templates.len() as u32,
            templates_ready: templates
                .iter()
                .filter(|t| t.state == TemplateState::Ready)
                .count() as u32,
        };
        Ok(Response::new(v1::GetStatsResponse { stats: Some(stats) }))
    }
}

#[tonic::async_trait]
impl NodeRegistry for Api {
    async fn register(
        &self,
        request: Request<node::RegisterRequest>,
    ) -> Result<Response<node::RegisterResponse>, Status> {
        let r = request.into_inner();
        let status = r
            .status
            .ok_or_else(|| Status::invalid_argument("missing status"))?;
        let node_id = status.node_id.clone();
        // Sandboxes a registering node holds that nobody wants are destroyed at its first
        // heartbeat (the register answer has no place for them).
        self.scheduler.node_report(status, None, r.labels).await?;
        tracing::info!(node = %node_id, version = %r.version, vmm = %r.vmm, "node registered");
        Ok(Response::new(node::RegisterResponse {
            heartbeat_interval_ms: interval_ms(&self.scheduler),
            pool_targets: Vec::new(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<node::HeartbeatRequest>,
    ) -> Result<Response<node::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        let status = r
            .status
            .ok_or_else(|| Status::invalid_argument("missing status"))?;
        if !self.scheduler.nodes.knows(&status.node_id) {
            return Ok(Response::new(node::HeartbeatResponse {
                heartbeat_interval_ms: interval_ms(&self.scheduler),
                reregister: true,
                ..Default::default()
            }));
        }
        let observed_at = r.observed_at.and_then(|t| SystemTime::try_from(t).ok());
        let destroy = self
            .scheduler
            .node_report(status, observed_at, Default::default())
            .await?;
        Ok(Response::new(node::HeartbeatResponse {
            heartbeat_interval_ms: interval_ms(&self.scheduler),
            pool_targets: Vec::new(),
            destroy_sandbox_ids: destroy,
            reregister: false,
        }))
    }
}

fn interval_ms(s: &Scheduler) -> u32 {
    u32::try_from(s.settings.heartbeat_interval.as_millis()).unwrap_or(u32::MAX)
}
