//! Joining the cluster: when `[agent].scheduler_addr` is set, the agent registers with the
//! scheduler's `NodeRegistry` and then heartbeats its status (capacity, allocation, cached
//! templates, pools, sandboxes) at the interval the scheduler asks for. It destroys the
//! sandboxes the scheduler no longer wants, off the heartbeat loop (a few at a time, each
//! once however often it is asked), so that destroying many VMs never delays the next
//! heartbeat past the point where the scheduler calls the node lost; and it registers
//! again when the scheduler asks (it restarted). A scheduler that is down is retried with
//! capped exponential backoff; the node keeps serving meanwhile.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use nanobox_core::SandboxId;
use tokio::sync::Semaphore;

use nanobox_node::Node;
use nanobox_proto::node::v1 as node;
use nanobox_proto::node::v1::node_registry_client::NodeRegistryClient;
use nanobox_scheduler::auth::ClientAuth;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Registry = NodeRegistryClient<InterceptedService<Channel, ClientAuth>>;

/// Each registry call's deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff after a failed call: from the first value, doubling, up to the cap.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Destroys asked for by the scheduler that run at once.
const PARALLEL_DESTROYS: usize = 4;
/// Heartbeat interval bounds, whatever the scheduler answers.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// Starts registering and heartbeating in the background: `scheduler` is `host:port` or
/// a URL, `address` where the scheduler reaches this agent, `token` the service token.
pub fn spawn(
    node: Node,
    scheduler: &str,
    address: String,
    token: Option<&str>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let url = if scheduler.contains("://") {
        scheduler.to_owned()
    } else {
        format!("http://{scheduler}")
    };
    let channel = Endpoint::from_shared(url)
        .map_err(|e| format!("[agent].scheduler_addr {scheduler:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(CALL_TIMEOUT)
        .connect_lazy();
    let auth = ClientAuth::new(token).map_err(|e| format!("[auth] service token: {e}"))?;
    let client = NodeRegistryClient::with_interceptor(channel, auth);
    tracing::info!(scheduler, address = %address, "joining the cluster");
    Ok(tokio::spawn(run(node, client, address)))
}

/// Runs the destroys the scheduler asks for in the background, each sandbox once at a
/// time, a few at once.
#[derive(Clone)]
struct Destroyer {
    node: Node,
    in_flight: Arc<Mutex<HashSet<SandboxId>>>,
    permits: Arc<Semaphore>,
}

impl Destroyer {
    fn new(node: Node) -> Self {
        Self {
            node,
            in_flight: Arc::default(),
            permits: Arc::new(Semaphore::new(PARALLEL_DESTROYS)),
        }
    }

    /// Starts destroying `id` unless that is already under way; returns at once.
    fn destroy(&self, id: SandboxId) {
        let fresh = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone());
        if !fresh {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Ok(_permit) = this.permits.acquire().await {
                tracing::info!(sandbox = %id, "destroying a sandbox the scheduler does not want");
                if let Err(e) = this.node.destroy(&id).await {
                    tracing::warn!(sandbox = %id, error = %e, "destroy asked by the scheduler failed");
                }
            }
            this.in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        });
    }
}

async fn run(node: Node, mut client: Registry, address: String) {
    let mut backoff = BACKOFF_START;
    let mut registered = false;
    let destroyer = Destroyer::new(node.clone());
    loop {
        let result = if registered {
            heartbeat(&node, &destroyer, &mut client, &address).await
        } else {
            register(&node, &mut client, &address).await
        };
        match result {
            Ok(Answer { interval_ms, again }) => {
                if again {
                    tracing::info!("the scheduler does not know this node: registering again");
                    registered = false;
                    continue;
                }
                if !registered {
                    tracing::info!("registered with the scheduler");
                    registered = true;
                }
                backoff = BACKOFF_START;
                let interval =
                    Duration::from_millis(interval_ms.into()).clamp(MIN_INTERVAL, MAX_INTERVAL);
                tokio::time::sleep(interval).await;
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), error = %status.message(), retry_in = ?backoff, "scheduler call failed");
                // Registration is redone after an error the scheduler may have lost us in.
                if status.code() == tonic::Code::NotFound {
                    registered = false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_CAP);
            }
        }
    }
}

struct Answer {
    interval_ms: u32,
    /// Register again now.
    again: bool,
}

async fn register(
    node: &Node,
    client: &mut Registry,
    address: &str,
) -> Result<Answer, tonic::Status> {
    let answer = client
        .register(node::RegisterRequest {
            status: Some(crate::grpc::node_status_to_proto(node, address)),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            vmm: node.vmm().to_owned(),
            supports_snapshots: false,
            labels: Default::default(),
        })
        .await?
        .into_inner();
    Ok(Answer {
        interval_ms: answer.heartbeat_interval_ms,
        again: false,
    })
}

async fn heartbeat(
    node: &Node,
    destroyer: &Destroyer,
    client: &mut Registry,
    address: &str,
) -> Result<Answer, tonic::Status> {
    let answer = client
        .heartbeat(node::HeartbeatRequest {
            status: Some(crate::grpc::node_status_to_proto(node, address)),
            observed_at: Some(SystemTime::now().into()),
        })
        .await?
        .into_inner();
    for id in &answer.destroy_sandbox_ids {
        match nanobox_proto::convert::sandbox_id("destroy_sandbox_ids", id) {
            Ok(id) => destroyer.destroy(id),
            Err(e) => tracing::warn!(error = %e, "the scheduler sent a bad sandbox id"),
        }
    }
    Ok(Answer {
        interval_ms: answer.heartbeat_interval_ms,
        again: answer.reregister,
    })
}
