//! The gRPC edge: `nanobox.node.v1.NodeAgent` over a [`Node`]. Requests are converted to
//! domain types here (every bad field named), results back to proto, errors to statuses.

use std::pin::Pin;
use std::time::{Duration, SystemTime};

use nanobox_core::{ExecSpec, SandboxId, SandboxSpec};
use nanobox_guest_client::ExecEvent;
use nanobox_node::{CreateRequest, Node, NodeError, ResumeRequest, SandboxInfo};
use nanobox_proto::node::v1 as node;
use nanobox_proto::node::v1::node_agent_server::NodeAgent;
use nanobox_proto::{convert, v1};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// Output chunks buffered between the guest and a slow gRPC client.
const EXEC_BUFFER: usize = 16;
/// Largest file data per gRPC message, both ways.
const MAX_FILE_CHUNK: usize = 1 << 20;
/// Bytes in flight between a WriteFile stream and the guest.
const FILE_PIPE: usize = 256 << 10;
/// Largest single ReadFile (larger files are read in ranges).
const MAX_READ: u64 = 64 << 20;

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
        // Host paths and causes stay in the agent's log, under an id the client gets.
        NodeError::Io { context, .. } => {
            let id = nanobox_core::error_id();
            tracing::error!(error_id = %id, error = %nanobox_core::describe(&err), "internal error");
            Status::internal(format!(
                "{context} failed on the node (error id {id}; the node agent's log has the details)"
            ))
        }
        NodeError::Internal(_) => {
            let id = nanobox_core::error_id();
            tracing::error!(error_id = %id, error = %message, "internal error");
            Status::internal(format!(
                "internal error in the node agent (error id {id}; its log has the details)"
            ))
        }
        NodeError::InvalidArgument { .. } => Status::invalid_argument(message),
        NodeError::NotFound { .. } => Status::not_found(message),
        NodeError::FailedPrecondition(_) => Status::failed_precondition(message),
        NodeError::ResourceExhausted(_) => Status::resource_exhausted(message),
        NodeError::Unavailable { .. } => Status::unavailable(message),
        NodeError::Guest { .. } => Status::aborted(message),
    }
}

fn guest_status(id: &str, e: &nanobox_guest_client::AgentError) -> Status {
    use nanobox_guest_client::ErrorCode;
    let message = format!("sandbox {id}: {}", nanobox_node::describe(e));
    match e.remote_code() {
        Some(ErrorCode::NotFound) => Status::not_found(message),
        Some(ErrorCode::InvalidArgument) => Status::invalid_argument(message),
        Some(ErrorCode::PermissionDenied) => Status::permission_denied(message),
        _ => Status::aborted(message),
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
        // A paused sandbox has no deadline.
        expires_at: (s.state != nanobox_core::SandboxState::Paused)
            .then(|| timestamp(s.expires_at))
            .flatten(),
        message: s.message,
        snapshot_id: s.snapshot_id,
        template_digest: s.template_digest,
    }
}

fn resources(vcpus: u32, memory_mb: u64) -> v1::Resources {
    v1::Resources {
        vcpu: vcpus,
        memory_mb: u32::try_from(memory_mb).unwrap_or(u32::MAX),
        disk_mb: 0,
    }
}

/// The node's status as `GetNodeStatus` answers it and registration and heartbeats
/// report it (`address`: where the scheduler dials the agent; empty when not asked).
pub fn node_status_to_proto(node: &Node, address: &str) -> node::NodeStatus {
    let s = node.status();
    let node_id = s.node_id.clone();
    node::NodeStatus {
        node_id: s.node_id,
        address: address.to_owned(),
        capacity: Some(resources(s.capacity.vcpus, s.capacity.memory_mb)),
        allocated: Some(resources(s.allocated.vcpus, s.allocated.memory_mb)),
        reclaimable: Some(resources(s.reclaimable.vcpus, s.reclaimable.memory_mb)),
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
        let mut watch = nanobox_node::metrics::ExecWatch::start();
        let mut stream = match self.node.exec(&id, spec).await {
            Ok(stream) => stream,
            Err(e) => {
                watch.failed();
                return Err(status(e));
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(EXEC_BUFFER);
        tokio::spawn(async move {
            loop {
                let next = stream.next().await;
                watch.observe(&next);
                let item = match next {
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
        request: Request<Streaming<node::WriteFileRequest>>,
    ) -> Result<Response<node::WriteFileResponse>, Status> {
        use node::write_file_request::Msg;
        let mut messages = request.into_inner();
        let header = match messages.message().await? {
            Some(node::WriteFileRequest {
                msg: Some(Msg::Header(header)),
            }) => header,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of WriteFile must be its header",
                ))
            }
        };
        let id = convert::sandbox_id("sandbox_id", &header.sandbox_id)?;
        if !header.path.starts_with('/') {
            return Err(Status::invalid_argument(format!(
                "path: {:?} is not absolute",
                header.path
            )));
        }
        if header.append {
            return Err(Status::invalid_argument(
                "append: not supported (files are replaced atomically)",
            ));
        }
        let agent = self.node.agent(&id).map_err(status)?;
        // Chunks flow through a bounded pipe: the client's stream is never buffered
        // whole, and a slow guest slows the client down.
        let (mut writer, reader) = tokio::io::duplex(FILE_PIPE);
        let pump = async move {
            use tokio::io::AsyncWriteExt as _;
            while let Some(message) = messages.message().await? {
                match message.msg {
                    Some(Msg::Chunk(chunk)) => {
                        if chunk.len() > MAX_FILE_CHUNK {
                            return Err(Status::invalid_argument(format!(
                                "chunk: {} bytes, at most {MAX_FILE_CHUNK} per message",
                                chunk.len()
                            )));
                        }
                        writer
                            .write_all(&chunk)
                            .await
                            .map_err(|e| Status::aborted(format!("sandbox {id}: {e}")))?;
                    }
                    _ => {
                        return Err(Status::invalid_argument(
                            "only the first message of WriteFile may be a header",
                        ))
                    }
                }
            }
            writer
                .shutdown()
                .await
                .map_err(|e| Status::aborted(e.to_string()))?;
            Ok::<(), Status>(())
        };
        let options = nanobox_guest_client::WriteOptions {
            mode: if header.mode == 0 { 0o644 } else { header.mode },
            uid: header.uid,
            gid: header.gid,
            create_parents: header.create_parents,
        };
        let write = agent.write_file_with(&header.path, options, reader);
        let (pumped, written) = tokio::join!(pump, write);
        pumped?;
        let bytes = written.map_err(|e| guest_status(&header.sandbox_id, &e))?;
        Ok(Response::new(node::WriteFileResponse {
            bytes_written: bytes,
        }))
    }

    type ReadFileStream = ReadFileStream;

    async fn read_file(
        &self,
        request: Request<node::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        use node::read_file_response::Msg;
        let r = request.into_inner();
        let id = convert::sandbox_id("sandbox_id", &r.sandbox_id)?;
        if !r.path.starts_with('/') {
            return Err(Status::invalid_argument(format!(
                "path: {:?} is not absolute",
                r.path
            )));
        }
        let limit = if r.length == 0 || r.length > MAX_READ {
            MAX_READ + 1
        } else {
            r.length
        };
        let agent = self.node.agent(&id).map_err(status)?;
        // Bounded: a guest cannot make the node hold more than MAX_READ for one read.
        let mut data = Vec::new();
        agent
            .read_file_range(&r.path, r.offset, limit, &mut data)
            .await
            .map_err(|e| guest_status(&r.sandbox_id, &e))?;
        if data.len() as u64 > MAX_READ {
            return Err(Status::resource_exhausted(format!(
                "the file is larger than {MAX_READ} bytes from offset {}; read it in ranges",
                r.offset
            )));
        }
        let mut messages = vec![Ok(node::ReadFileResponse {
            msg: Some(Msg::Header(node::ReadFileHeader {
                size: data.len() as u64,
                mode: 0,
            })),
        })];
        messages.extend(data.chunks(MAX_FILE_CHUNK).map(|c| {
            Ok(node::ReadFileResponse {
                msg: Some(Msg::Chunk(c.to_vec())),
            })
        }));
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }

    async fn pause_sandbox(
        &self,
        request: Request<node::PauseSandboxRequest>,
    ) -> Result<Response<node::PauseSandboxResponse>, Status> {
        let r = request.into_inner();
        let id = convert::sandbox_id("sandbox_id", &r.sandbox_id)?;
        let paused = self.node.pause(&id).await.map_err(status)?;
        Ok(Response::new(node::PauseSandboxResponse {
            snapshot_id: paused.snapshot_id,
            size_bytes: paused.size_bytes,
            snapshot_time_ms: u32::try_from(paused.snapshot_time.as_millis()).unwrap_or(u32::MAX),
        }))
    }

    async fn resume_sandbox(
        &self,
        request: Request<node::ResumeSandboxRequest>,
    ) -> Result<Response<node::ResumeSandboxResponse>, Status> {
        let r = request.into_inner();
        let id = convert::sandbox_id("sandbox_id", &r.sandbox_id)?;
        // The sandbox's size, template and environment are the ones it was paused with
        // (they live in its memory); the network mode must match too. Only the
        // lifetime, the egress limit and the tenant scope are the caller's to set.
        let network = match r.network {
            Some(n) => Some(convert::network_or_default(Some(n))?),
            None => None,
        };
        let request = ResumeRequest {
            snapshot_id: r.snapshot_id,
            timeout: (r.timeout_sec != 0).then(|| Duration::from_secs(r.timeout_sec.into())),
            network_mode: network.as_ref().map(|n| n.mode()),
            egress_rate_bps: network.as_ref().and_then(|n| n.egress_rate_bps()),
            tenant_scope: network
                .as_ref()
                .and_then(|n| n.tenant_scope())
                .map(str::to_owned),
        };
        let sandbox = self.node.resume(&id, request).await.map_err(status)?;
        Ok(Response::new(node::ResumeSandboxResponse {
            sandbox: Some(sandbox_to_proto(&self.node.config().node_id, sandbox)),
        }))
    }

    async fn get_node_status(
        &self,
        _request: Request<node::GetNodeStatusRequest>,
    ) -> Result<Response<node::GetNodeStatusResponse>, Status> {
        let status = node_status_to_proto(&self.node, "");
        Ok(Response::new(node::GetNodeStatusResponse {
            status: Some(status),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_reach_clients_without_host_paths() {
        let err = NodeError::Io {
            context: "cloning the template disk",
            path: "/var/lib/nanobox/agent/disks/secret.ext4".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        let shown = status(err);
        assert_eq!(shown.code(), tonic::Code::Internal);
        assert!(!shown.message().contains("/var/lib"), "{}", shown.message());
        assert!(
            shown
                .message()
                .starts_with("cloning the template disk failed on the node (error id "),
            "{}",
            shown.message()
        );
        let shown = status(NodeError::Internal("record {vm: Some(3)} broke".to_owned()));
        assert!(!shown.message().contains("Some(3)"), "{}", shown.message());
        // The client's own mistakes are told as they are.
        let shown = status(NodeError::NotFound {
            what: "sandbox",
            name: "sbx-1".to_owned(),
        });
        assert_eq!(shown.message(), "sandbox sbx-1 not found");
    }
}
