//! The live view of the cluster's nodes, from their registrations and heartbeats, kept in
//! memory for placement and routing (Postgres has the durable copy for the Cluster API
//! and for routing after a restart). Each node has one lazily connected gRPC channel.
//!
//! Creates (and resumes) placed on a node and still in flight are reserved here, so a
//! burst of them does not overfill a node before its next heartbeat reports them; a pause
//! gives its sandbox's share back at once for the same reason.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nanobox_proto::node::v1 as node;
use nanobox_proto::node::v1::node_agent_client::NodeAgentClient;
use nanobox_scheduler::auth::ClientAuth;
use nanobox_scheduler::placement::{Candidate, Need};
use nanobox_telemetry::grpc::{InjectContext, InjectContextLayer};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tower::Layer as _;

/// A node agent client that sends the service token and the caller's trace context (so
/// the node's span of a call is a child of the scheduler's).
pub type NodeClient = NodeAgentClient<InterceptedService<InjectContext<Channel>, ClientAuth>>;

/// How long dialing a node may take before a call fails UNAVAILABLE.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds a client for the node agent at `address` (`host:port` or a URL); connects on
/// first use.
pub fn client(address: &str, auth: &ClientAuth) -> Result<NodeClient, tonic::transport::Error> {
    let url = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let channel = Endpoint::from_shared(url)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(NodeAgentClient::with_interceptor(
        InjectContextLayer.layer(channel),
        auth.clone(),
    ))
}

#[derive(Debug)]
struct LiveNode {
    address: String,
    client: NodeClient,
    status: node::NodeStatus,
    last_seen: Instant,
    /// Creates placed here whose VM the node has not reported yet.
    reserved: Vec<(u64, Need)>,
}

/// The nodes this scheduler has heard from since it started.
#[derive(Debug)]
pub struct Nodes {
    inner: Mutex<Inner>,
    auth: ClientAuth,
    lost_after: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    nodes: HashMap<String, LiveNode>,
    next_reservation: u64,
}

/// A reservation of capacity on a node, released when dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    nodes: &'a Nodes,
    node: String,
    id: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.nodes.lock().nodes.get_mut(&self.node) {
            n.reserved.retain(|(id, _)| *id != self.id);
        }
    }
}

impl Nodes {
    pub fn new(auth: ClientAuth, lost_after: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            auth,
            lost_after,
        }
    }

    pub fn auth(&self) -> &ClientAuth {
        &self.auth
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the node has registered with this scheduler.
    pub fn knows(&self, id: &str) -> bool {
        self.lock().nodes.contains_key(id)
    }

    /// Records a registration or heartbeat (a registration replaces the node's client
    /// when its address changed).
    pub fn report(&self, status: node::NodeStatus) -> Result<(), tonic::transport::Error> {
        let mut inner = self.lock();
        let fresh_client = match inner.nodes.get(&status.node_id) {
            Some(n) if n.address == status.address => None,
            _ => Some(client(&status.address, &self.auth)?),
        };
        let now = Instant::now();
        match inner.nodes.get_mut(&status.node_id) {
            Some(n) => {
                if let Some(c) = fresh_client {
                    n.client = c;
                    n.address = status.address.clone();
                }
                n.status = status;
                n.last_seen = now;
            }
            None => {
                if let Some(c) = fresh_client {
                    inner.nodes.insert(
                        status.node_id.clone(),
                        LiveNode {
                            address: status.address.clone(),
                            client: c,
                            status,
                            last_seen: now,
                            reserved: Vec::new(),
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Counts a sandbox just created on node `id` in its allocation until its next
    /// heartbeat reports it (the reservation ends when the create returns).
    pub fn add_allocated(&self, id: &str, need: Need) {
        if let Some(n) = self.lock().nodes.get_mut(id) {
            let alloc = n.status.allocated.get_or_insert_with(Default::default);
            alloc.vcpu = alloc.vcpu.saturating_add(need.vcpus);
            alloc.memory_mb = alloc
                .memory_mb
                .saturating_add(u32::try_from(need.memory_mb).unwrap_or(u32::MAX));
        }
    }

    /// Takes a sandbox just paused on node `id` out of its allocation until its next
    /// heartbeat reports the node's own numbers.
    pub fn sub_allocated(&self, id: &str, need: Need) {
        if let Some(n) = self.lock().nodes.get_mut(id) {
            let alloc = n.status.allocated.get_or_insert_with(Default::default);
            alloc.vcpu = alloc.vcpu.saturating_sub(need.vcpus);
            alloc.memory_mb = alloc
                .memory_mb
                .saturating_sub(u32::try_from(need.memory_mb).unwrap_or(u32::MAX));
        }
    }

    /// Takes node `id` as full until its next report: it refused a create for capacity,
    /// so what the scheduler last heard of it (free room, ready pool VMs) is out of date.
    pub fn mark_full(&self, id: &str) {
        if let Some(n) = self.lock().nodes.get_mut(id) {
            n.status.allocated = n.status.capacity;
            n.status.reclaimable = None;
            for pool in &mut n.status.pools {
                pool.ready = 0;
            }
        }
    }

    /// Forgets a node (it was found lost).
    pub fn forget(&self, id: &str) {
        self.lock().nodes.remove(id);
    }

    /// Ids of known nodes whose last heartbeat is older than the lost threshold.
    pub fn silent(&self) -> Vec<String> {
        let inner = self.lock();
        inner
            .nodes
            .iter()
            .filter(|(_, n)| n.last_seen.elapsed() > self.lost_after)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The client of a known node.
    pub fn client_of(&self, id: &str) -> Option<NodeClient> {
        self.lock().nodes.get(id).map(|n| n.client.clone())
    }

    /// Placement candidates for a sandbox of `template` (its digest `digest`).
    pub fn candidates(&self, template: &str, digest: &str) -> Vec<Candidate> {
        let inner = self.lock();
        let mut out: Vec<Candidate> = inner
            .nodes
            .iter()
            .map(|(id, n)| {
                let s = &n.status;
                let cap = s.capacity.unwrap_or_default();
                let alloc = s.allocated.unwrap_or_default();
                let reclaimable = s.reclaimable.unwrap_or_default();
                let (res_cpu, res_mem) =
                    n.reserved.iter().fold((0u32, 0u64), |(c, m), (_, need)| {
                        (
                            c.saturating_add(need.vcpus),
                            m.saturating_add(need.memory_mb),
                        )
                    });
                Candidate {
                    id: id.clone(),
                    accepting: !s.draining,
                    fresh: n.last_seen.elapsed() <= self.lost_after,
                    capacity_vcpus: cap.vcpu,
                    capacity_memory_mb: u64::from(cap.memory_mb),
                    allocated_vcpus: alloc.vcpu.saturating_add(res_cpu),
                    allocated_memory_mb: u64::from(alloc.memory_mb).saturating_add(res_mem),
                    reclaimable_vcpus: reclaimable.vcpu,
                    reclaimable_memory_mb: u64::from(reclaimable.memory_mb),
                    template_cached: s.cached_templates.iter().any(|c| c.digest == digest),
                    ready_pool: s
                        .pools
                        .iter()
                        .filter(|p| {
                            p.template == template && (p.digest.is_empty() || p.digest == digest)
                        })
                        .map(|p| p.ready)
                        .sum(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Reserves `need` on node `id` until the returned guard is dropped; for a create
    /// (`pool_template` given) also takes one ready pool VM of that template off the
    /// node's last report (the create will use it). A resume restores its own VM and
    /// takes none.
    pub fn reserve(&self, id: &str, pool_template: Option<&str>, need: Need) -> Reservation<'_> {
        let mut inner = self.lock();
        inner.next_reservation += 1;
        let rid = inner.next_reservation;
        if let Some(n) = inner.nodes.get_mut(id) {
            n.reserved.push((rid, need));
            if let Some(pool) = pool_template.and_then(|template| {
                n.status
                    .pools
                    .iter_mut()
                    .find(|p| p.template == template && p.ready > 0)
            }) {
                pool.ready -= 1;
            }
        }
        Reservation {
            nodes: self,
            node: id.to_owned(),
            id: rid,
        }
    }
}
