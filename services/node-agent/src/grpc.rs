//! The gRPC edge: `nanobox.node.v1.NodeAgent` over a [`Node`]. Requests are converted to
//! domain types here (every bad field named), results back to proto, errors to statuses.

use std::pin::Pin;
use std::time::{Duration, SystemTime};

use nanobox_core::{ExecSpec, SandboxId, SandboxSpec};
use nanobox_guest_client::ExecEvent;
use nanobox_node::{CreateRequest, Node, NodeError, SandboxInfo};
use nanobox_proto::node::v1 as node;
use nanobox_proto::node::v1::node_agent_server::NodeAgent;
use nanobox_proto::{convert, v1};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// Output chunks buffered between the guest and a slow gRPC client.
const EXEC_BUFFER: usize = 16;

/// The NodeAgent service.
#[derive(Debug, Clone)]
pub struct NodeAgentService {
    node: Node,
}

impl NodeAgentService {
    pub fn new(node: Node) -> Self {
        Self { node }
    }
}

pub fn status(err: NodeError) -> Status {
    let message = err.to_string();
    match err {
        NodeError::InvalidArgument { .. } => Status::invalid_argument(message),
        NodeError::NotFound { .. } => Status::not_found(message),
        NodeError::FailedPrecondition(_) => Status::failed_precondition(message),
        NodeError::ResourceExhausted(_) => Status::resource_exhausted(message),
        NodeError::Unavailable { .. } => Status::unavailable(message),
        NodeError::Guest { .. } => Status::aborted(message),
        NodeError::Io { .. } | NodeError::Internal(_) => Status::internal(message),
    }
}

fn timestamp(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(t))
}

pub fn sandbox_to_proto(node_id: &str, s: SandboxInfo) -> v1::Sandbox {
    let network = nanobox_core::NetworkSpec::new(s.network_mode, None, None)
        .map(v1::NetworkSpec::from)
        .ok();
    v1::Sandbox {
        id: s.id.to_string(),
        template: s.template,
        state: v1::SandboxState::from(s.state).into(),
        node_id: node_id.to_owned(),
        ip: s.ip,
        boot_time_ms: s.boot_time_ms,
        resources: Some(v1::Resources {
            vcpu: s.vcpus,
            memory_mb: s.memory_mb,
            disk_mb: 0,
        }),
        network,
        env: s.env.into_iter().collect(),
        metadata: s.metadata.into_iter().collect(),
        created_at: timestamp(s.created_at),
        expires_at: timestamp(s.expires_at),
        message: s.message,
        snapshot_id: String::new(),
        template_digest: s.template_digest,
    }
}

fn exec_event(event: ExecEvent) -> v1::ExecEvent {
    use v1::exec_event::Event;
    let event = match event {
        ExecEvent::Stdout(data) => Event::Stdout(data.to_vec()),
        ExecEvent::Stderr(data) => Event::Stderr(data.to_vec()),
        ExecEvent::Exit(status) => {
            let signal = match status.outcome {
                nanobox_guest_client::ExitOutcome::Signal(s) => s,
                nanobox_guest_client::ExitOutcome::Code(_) => 0,
            };
            Event::Exit(v1::ExecResult {
                exit_code: status.shell_code(),
                signal,
                timed_out: status.timed_out,
                duration_ms: u64::try_from(status.duration.as_millis()).unwrap_or(u64::MAX),
            })
        }
    };
    v1::ExecEvent { event: Some(event) }
}

type ExecEventStream = Pin<Box<dyn Stream<Item = Result<v1::ExecEvent, Status>> + Send>>;
type ReadFileStream = Pin<Box<dyn Stream<Item = Result<node::ReadFileResponse, Status>> + Send>>;

#[tonic::async_trait]
impl NodeAgent for NodeAgentService {
    async fn create_sandbox(
        &self,
        request: Request<node::CreateSandboxRequest>,
    ) -> Result<Response<node::CreateSandboxResponse>, Status> {
        let r = request.into_inner();
        let id = match r.sandbox_id.as_str() {
            "" => None,
            s => Some(convert::sandbox_id("sandbox_id", s)?),
        };
        let spec = SandboxSpec {
            template: convert::template_name("template", r.template)?,
            resources: convert::resources_or_default(r.resources)?,
            network: convert::network_or_default(r.network)?,
            env: r.env.into_iter().collect(),
            timeout: (r.timeout_sec != 0).then(|| Duration::from_secs(r.timeout_sec.into())),
            metadata: r.metadata.into_iter().collect(),
        };
        spec.validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let created = self
            .node
            .create(CreateRequest {
                id,
                spec,
                template_digest: r.template_digest,
                hostname: r.hostname,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(node::CreateSandboxResponse {
            sandbox: Some(sandbox_to_proto(
                &self.node.config().node_id,
                created.sandbox,
            )),
            from_pool: created.from_pool,
        }))
    }

    async fn get_sandbox(
        &self,
        request: Request<node::GetSandboxRequest>,
    ) -> Result<Response<node::GetSandboxResponse>, Status> {
        let id = convert::sandbox_id("sandbox_id", &request.into_inner().sandbox_id)?;
        let info = self.node.get(&id).map_err(status)?;
        Ok(Response::new(node::GetSandboxResponse {
            sandbox: Some(sandbox_to_proto(&self.node.config().node_id, info)),
        }))
    }

    async fn list_sandboxes(
        &self,
        _request: Request<node::ListSandboxesRequest>,
    ) -> Result<Response<node::ListSandboxesResponse>, Status> {
        let node_id = &self.node.config().node_id;
        Ok(Response::new(node::ListSandboxesResponse {
            sandboxes: self
                .node
                .list()
                .into_iter()
                .map(|s| sandbox_to_proto(node_id, s))
                .collect(),
        }))
    }

    async fn destroy_sandbox(
        &self,
        request: Request<node::DestroySandboxRequest>,
    ) -> Result<Response<node::DestroySandboxResponse>, Status> {
        let id = convert::sandbox_id("sandbox_id", &request.into_inner().sandbox_id)?;
        let existed = self.node.destroy(&id).await.map_err(status)?;
        Ok(Response::new(node::DestroySandboxResponse { existed }))
    }

    type ExecStream = ExecEventStream;

    async fn exec(
        &self,
        request: Request<v1::ExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let r = request.into_inner();
        let id: SandboxId = convert::sandbox_id("id", &r.id)?;
        let spec = ExecSpec::try_from(r)?;
        let mut stream = self.node.exec(&id, spec).await.map_err(status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(EXEC_BUFFER);
        tokio::spawn(async move {
            loop {
                let item = match stream.next().await {
                    Ok(Some(event)) => Ok(exec_event(event)),
                    Ok(None) => return,
                    Err(e) => Err(Status::aborted(format!(
                        "sandbox {id}: {}",
                        nanobox_node::describe(&e)
                    ))),
                };
                let last = item.is_err();
                // The client went away: dropping the stream kills the command.
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn keepalive(
        &self,
        request: Request<node::KeepaliveRequest>,
    ) -> Result<Response<node::KeepaliveResponse>, Status> {
        let r = request.into_inner();
        let id = convert::sandbox_id("sandbox_id", &r.sandbox_id)?;
        let timeout = (r.timeout_sec != 0).then(|| Duration::from_secs(r.timeout_sec.into()));
        let expires = self.node.keepalive(&id, timeout).map_err(status)?;
        Ok(Response::new(node::KeepaliveResponse {
            expires_at: timestamp(expires),
        }))
    }

    async fn write_file(
        &self,
        _request: Request<Streaming<node::WriteFileRequest>>,
    ) -> Result<Response<node::WriteFileResponse>, Status> {
        Err(Status::unimplemented(
            "WriteFile is not served by this node agent yet",
        ))
    }

    type ReadFileStream = ReadFileStream;

    async fn read_file(
        &self,
        _request: Request<node::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        Err(Status::unimplemented(
            "ReadFile is not served by this node agent yet",
        ))
    }

    async fn pause_sandbox(
        &self,
        _request: Request<node::PauseSandboxRequest>,
    ) -> Result<Response<node::PauseSandboxResponse>, Status> {
        Err(Status::unimplemented(
            "pause needs the snapshot store, which this deployment does not have yet",
        ))
    }

    async fn resume_sandbox(
        &self,
        _request: Request<node::ResumeSandboxRequest>,
    ) -> Result<Response<node::ResumeSandboxResponse>, Status> {
        Err(Status::unimplemented(
            "resume needs the snapshot store, which this deployment does not have yet",
        ))
    }

    async fn get_node_status(
        &self,
        _request: Request<node::GetNodeStatusRequest>,
    ) -> Result<Response<node::GetNodeStatusResponse>, Status> {
        let s = self.node.status();
        let node_id = s.node_id.clone();
        let status = node::NodeStatus {
            node_id: s.node_id,
            address: String::new(),
            capacity: Some(v1::Resources {
                vcpu: s.capacity.vcpus,
                memory_mb: u32::try_from(s.capacity.memory_mb).unwrap_or(u32::MAX),
                disk_mb: 0,
            }),
            allocated: Some(v1::Resources {
                vcpu: s.allocated.vcpus,
                memory_mb: u32::try_from(s.allocated.memory_mb).unwrap_or(u32::MAX),
                disk_mb: 0,
            }),
            cached_templates: s
                .cached_templates
                .into_iter()
                .map(|c| node::CachedTemplate {
                    name: String::new(),
                    digest: c.digest,
                    size_bytes: c.size_bytes,
                })
                .collect(),
            pools: s
                .pools
                .into_iter()
                .map(|p| node::TemplatePool {
                    template: p.template.to_string(),
                    digest: p.digest,
                    ready: p.ready,
                    starting: p.starting,
                    min_ready: p.min_ready,
                    max_ready: p.max_ready,
                })
                .collect(),
            sandboxes: s
                .sandboxes
                .into_iter()
                .map(|sb| sandbox_to_proto(&node_id, sb))
                .collect(),
            draining: false,
        };
        Ok(Response::new(node::GetNodeStatusResponse {
            status: Some(status),
        }))
    }
}
