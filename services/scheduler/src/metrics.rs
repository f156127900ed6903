//! The scheduler's Prometheus series: the recorded sandboxes by state (refreshed every
//! reconcile pass) and each node's capacity and allocation as its last report gave them.
//! Recorded through the `metrics` facade; `nanobox_telemetry::metrics::serve` exports
//! them when `[scheduler] metrics_addr` is set.

use std::collections::BTreeMap;

use nanobox_core::SandboxState;
use nanobox_proto::node::v1 as node;
use nanobox_proto::v1;

/// Gauge: recorded sandboxes by observed `state` (all of them, STOPPED included).
pub const SANDBOXES: &str = "nanobox_scheduler_sandboxes";
/// Gauges per `node_id`, from the node's last registration or heartbeat.
pub const NODE_CAPACITY_VCPUS: &str = "nanobox_scheduler_node_capacity_vcpus";
pub const NODE_CAPACITY_MEMORY: &str = "nanobox_scheduler_node_capacity_memory_bytes";
pub const NODE_ALLOCATED_VCPUS: &str = "nanobox_scheduler_node_allocated_vcpus";
pub const NODE_ALLOCATED_MEMORY: &str = "nanobox_scheduler_node_allocated_memory_bytes";
pub const NODE_SANDBOXES: &str = "nanobox_scheduler_node_sandboxes_running";
/// Gauge per `node_id`: 1 while the scheduler hears from the node, 0 once it is lost.
pub const NODE_UP: &str = "nanobox_scheduler_node_up";

const MIB: f64 = 1024.0 * 1024.0;

/// The HELP lines.
pub fn describe() {
    use metrics::{describe_gauge, Unit};
    describe_gauge!(SANDBOXES, "Recorded sandboxes by observed state");
    describe_gauge!(
        NODE_CAPACITY_VCPUS,
        "vCPUs a node offers, as it last reported"
    );
    describe_gauge!(
        NODE_CAPACITY_MEMORY,
        Unit::Bytes,
        "Memory a node offers, as it last reported"
    );
    describe_gauge!(
        NODE_ALLOCATED_VCPUS,
        "vCPUs allocated on a node (sandboxes and warm pool VMs), as it last reported"
    );
    describe_gauge!(
        NODE_ALLOCATED_MEMORY,
        Unit::Bytes,
        "Memory allocated on a node (sandboxes and warm pool VMs), as it last reported"
    );
    describe_gauge!(
        NODE_SANDBOXES,
        "Running sandboxes a node reported in its last heartbeat"
    );
    describe_gauge!(NODE_UP, "1 while a node heartbeats, 0 once it is lost");
}

/// Sets the sandbox counts; a state with none shows 0.
pub fn sandboxes(counts: &BTreeMap<SandboxState, u64>) {
    for state in SandboxState::ALL {
        let n = counts.get(&state).copied().unwrap_or(0);
        metrics::gauge!(SANDBOXES, "state" => state.to_string()).set(n as f64);
    }
}

/// Takes in a node's report.
pub fn node_reported(status: &node::NodeStatus) {
    let id = status.node_id.clone();
    let cap = status.capacity.unwrap_or_default();
    let alloc = status.allocated.unwrap_or_default();
    let running = status
        .sandboxes
        .iter()
        .filter(|s| s.state == v1::SandboxState::Running as i32)
        .count();
    metrics::gauge!(NODE_CAPACITY_VCPUS, "node_id" => id.clone()).set(f64::from(cap.vcpu));
    metrics::gauge!(NODE_CAPACITY_MEMORY, "node_id" => id.clone())
        .set(f64::from(cap.memory_mb) * MIB);
    metrics::gauge!(NODE_ALLOCATED_VCPUS, "node_id" => id.clone()).set(f64::from(alloc.vcpu));
    metrics::gauge!(NODE_ALLOCATED_MEMORY, "node_id" => id.clone())
        .set(f64::from(alloc.memory_mb) * MIB);
    metrics::gauge!(NODE_SANDBOXES, "node_id" => id.clone()).set(running as f64);
    metrics::gauge!(NODE_UP, "node_id" => id).set(1.0);
}

/// A node was found lost: it offers and holds nothing the scheduler can use.
pub fn node_lost(id: &str) {
    for name in [
        NODE_CAPACITY_VCPUS,
        NODE_CAPACITY_MEMORY,
        NODE_ALLOCATED_VCPUS,
        NODE_ALLOCATED_MEMORY,
        NODE_SANDBOXES,
        NODE_UP,
    ] {
        metrics::gauge!(name, "node_id" => id.to_owned()).set(0.0);
    }
}
