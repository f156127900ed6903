//! The node's Prometheus series, recorded through the `metrics` facade (the node agent
//! exports them when `[agent] metrics_addr` is set; without a recorder every call here is
//! a no-op).
//!
//! Events are recorded where they happen (a create ends, a VM has booted, a command
//! exits); levels (capacity, allocation, pools) are sampled every [`SAMPLE_INTERVAL`] by
//! [`sampler`], so the hot paths take no extra locks for them.

use std::sync::Weak;
use std::time::{Duration, Instant};

use nanobox_guest_client::{AgentError, ExecEvent, ExitOutcome};

use crate::node::{lock, Inner};

/// Counter: creates that made a sandbox or failed trying, by `path` (`pool`: a warm VM
/// was handed over, `cold`: the sandbox booted its own, `none`: it failed before either,
/// e.g. an unknown template or no room) and `result` (`ok`, `error`). A retried create of
/// a sandbox that exists is not counted.
pub const CREATES: &str = "nanobox_node_sandbox_creates_total";
/// Histogram: seconds from a create's arrival to its sandbox running, by `path`.
pub const CREATE_DURATION: &str = "nanobox_node_sandbox_create_duration_seconds";
/// Histogram: seconds from starting a VMM to its guest agent answering, by `purpose`
/// (`sandbox`: a cold create, `pool`: a warm-pool refill).
pub const BOOT_DURATION: &str = "nanobox_node_vm_boot_duration_seconds";
/// Counter: VM boots that failed, by `purpose`.
pub const BOOT_FAILURES: &str = "nanobox_node_vm_boot_failures_total";
/// Counter: commands run in sandboxes, by `outcome` (`ok`: exit code 0, `failed`: another
/// code or a signal, `timed_out`, `error`: it could not start or the guest broke off,
/// `cancelled`: the caller went away first).
pub const EXECS: &str = "nanobox_node_execs_total";
/// Histogram: a command's run time in seconds (the guest's measure when it exited), by
/// `outcome`.
pub const EXEC_DURATION: &str = "nanobox_node_exec_duration_seconds";
/// Gauges: what this node offers to sandboxes.
pub const CAPACITY_VCPUS: &str = "nanobox_node_capacity_vcpus";
pub const CAPACITY_MEMORY: &str = "nanobox_node_capacity_memory_bytes";
pub const CAPACITY_SANDBOXES: &str = "nanobox_node_capacity_sandboxes";
/// Gauges: what is allocated (sandboxes and warm-pool VMs alike) and how many sandboxes
/// run (pool VMs not counted).
pub const ALLOCATED_VCPUS: &str = "nanobox_node_allocated_vcpus";
pub const ALLOCATED_MEMORY: &str = "nanobox_node_allocated_memory_bytes";
pub const SANDBOXES: &str = "nanobox_node_sandboxes";
/// Gauges per `template`: booted VMs waiting in its pool, VMs booting for it, and the
/// number the refiller keeps ready (`min_ready`).
pub const POOL_READY: &str = "nanobox_node_pool_ready";
pub const POOL_STARTING: &str = "nanobox_node_pool_starting";
pub const POOL_TARGET: &str = "nanobox_node_pool_target";

/// How often the gauges are sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

const MIB: f64 = 1024.0 * 1024.0;

/// The HELP lines; the node agent calls it once the recorder is installed.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        CREATES,
        "Sandbox creates by path (pool, cold, none) and result"
    );
    describe_histogram!(
        CREATE_DURATION,
        Unit::Seconds,
        "Time from a create's arrival to its sandbox running, by path (pool, cold)"
    );
    describe_histogram!(
        BOOT_DURATION,
        Unit::Seconds,
        "Time from starting a VMM to its guest agent answering, by purpose (sandbox, pool)"
    );
    describe_counter!(BOOT_FAILURES, "VM boots that failed, by purpose");
    describe_counter!(EXECS, "Commands run in sandboxes, by outcome");
    describe_histogram!(
        EXEC_DURATION,
        Unit::Seconds,
        "Run time of commands in sandboxes, by outcome"
    );
    describe_gauge!(CAPACITY_VCPUS, "vCPUs this node offers to sandboxes");
    describe_gauge!(
        CAPACITY_MEMORY,
        Unit::Bytes,
        "Memory this node offers to sandboxes"
    );
    describe_gauge!(CAPACITY_SANDBOXES, "Most sandboxes at once on this node");
    describe_gauge!(
        ALLOCATED_VCPUS,
        "vCPUs allocated to sandboxes and warm-pool VMs"
    );
    describe_gauge!(
        ALLOCATED_MEMORY,
        Unit::Bytes,
        "Memory allocated to sandboxes and warm-pool VMs"
    );
    describe_gauge!(
        SANDBOXES,
        "Sandboxes on this node (warm-pool VMs not counted)"
    );
    describe_gauge!(POOL_READY, "Booted VMs waiting in a template's warm pool");
    describe_gauge!(POOL_STARTING, "VMs booting for a template's warm pool");
    describe_gauge!(
        POOL_TARGET,
        "VMs a template's warm pool keeps ready (min_ready)"
    );
}

/// A create ended; `path` is `pool`, `cold` or `none`.
pub(crate) fn create_finished(path: &'static str, ok: bool, elapsed: Duration) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(CREATES, "path" => path, "result" => result).increment(1);
    if ok {
        metrics::histogram!(CREATE_DURATION, "path" => path).record(elapsed.as_secs_f64());
    }
}

/// A boot for `purpose` (`sandbox`, `pool`) ended: its boot time, or `None` if it failed.
pub(crate) fn vm_booted(purpose: &'static str, boot_time: Option<Duration>) {
    match boot_time {
        Some(t) => metrics::histogram!(BOOT_DURATION, "purpose" => purpose).record(t.as_secs_f64()),
        None => metrics::counter!(BOOT_FAILURES, "purpose" => purpose).increment(1),
    }
}

/// Follows one exec from its start to its end and records it once: the node agent makes
/// one before calling [`crate::Node::exec`] and shows it every item of the stream. Dropped
/// before the command ended (the caller went away), it records `cancelled`.
#[derive(Debug)]
pub struct ExecWatch {
    started: Instant,
    done: bool,
}

impl ExecWatch {
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
            done: false,
        }
    }

    /// The exec could not start.
    pub fn failed(&mut self) {
        self.finish("error", self.started.elapsed());
    }

    /// One item of the exec's stream.
    pub fn observe(&mut self, item: &Result<Option<ExecEvent>, AgentError>) {
        match item {
            Ok(Some(ExecEvent::Exit(status))) => {
                let outcome = if status.timed_out {
                    "timed_out"
                } else if status.outcome == ExitOutcome::Code(0) {
                    "ok"
                } else {
                    "failed"
                };
                self.finish(outcome, status.duration);
            }
            Ok(Some(_)) => {}
            // The stream ended without an exit, or broke.
            Ok(None) | Err(_) => self.finish("error", self.started.elapsed()),
        }
    }

    fn finish(&mut self, outcome: &'static str, duration: Duration) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        metrics::counter!(EXECS, "outcome" => outcome).increment(1);
        metrics::histogram!(EXEC_DURATION, "outcome" => outcome).record(duration.as_secs_f64());
    }
}

impl Drop for ExecWatch {
    fn drop(&mut self) {
        self.finish("cancelled", self.started.elapsed());
    }
}

/// Samples the gauges every [`SAMPLE_INTERVAL`] until the node is dropped.
pub(crate) async fn sampler(node: Weak<Inner>) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = node.upgrade() else { return };
        sample(&inner);
    }
}

fn sample(inner: &Inner) {
    use metrics::gauge;
    let capacity = inner.config.capacity;
    let allocated = *lock(&inner.allocated);
    gauge!(CAPACITY_VCPUS).set(f64::from(capacity.vcpus));
    gauge!(CAPACITY_MEMORY).set(capacity.memory_mb as f64 * MIB);
    gauge!(CAPACITY_SANDBOXES).set(f64::from(capacity.max_sandboxes));
    gauge!(ALLOCATED_VCPUS).set(f64::from(allocated.vcpus));
    gauge!(ALLOCATED_MEMORY).set(allocated.memory_mb as f64 * MIB);
    gauge!(SANDBOXES).set(f64::from(allocated.sandboxes));
    let pools = lock(&inner.pools);
    for target in &inner.config.pool.targets {
        let template = target.template.to_string();
        let (ready, starting) = pools
            .get(&target.template)
            .map_or((0, 0), |p| (p.ready.len(), p.starting));
        gauge!(POOL_READY, "template" => template.clone()).set(ready as f64);
        gauge!(POOL_STARTING, "template" => template.clone()).set(f64::from(starting));
        gauge!(POOL_TARGET, "template" => template)
            .set(f64::from(target.min_ready.min(target.max_ready)));
    }
}
