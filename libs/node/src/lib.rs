//! The node: sandboxes on one machine, as the node agent serves them.
//!
//! A [`Node`] creates a sandbox from a template by taking a booted VM from the template's
//! warm pool ([`pool`]) or booting one cold ([`vm`]): the template's root filesystem comes
//! from the local template cache (fetched from the object store and verified on first
//! use), each VM gets its own copy-on-write disk, its VMM runs in its own cgroup
//! ([`cgroup`]) with the sandbox's vCPU and memory limits, and the guest receives its
//! identity (hostname, environment, clock, entropy) at hand-over, the same way for pooled
//! and cold VMs. Every VM is recorded on disk before anything is created for it
//! ([`record`]), so a restarted agent finds and removes everything a previous run left
//! (its sandboxes are reported lost). A reaper destroys sandboxes past their deadline.
//!
//! Creates, boots, execs, capacity and pools are recorded as Prometheus series through the
//! `metrics` facade ([`metrics`]); the request spans of the node agent get the sandbox,
//! template and node ids, and calls to the guest are child spans of them.

#![forbid(unsafe_code)]

pub mod cgroup;
mod config;
mod error;
pub mod metrics;
mod node;
mod pause;
mod pool;
pub mod record;
mod templates;
mod vm;

pub use config::{Capacity, NodeConfig, PoolConfig, PoolTarget};
pub use error::NodeError;
/// The error with its causes on one line (re-exported for the node agent's edge).
pub use nanobox_core::describe;
pub use node::{
    Allocation, CachedTemplateStatus, CreateRequest, Created, Node, NodeStatus, PoolStatus,
    SandboxInfo,
};
pub use pause::{Paused, ResumeRequest};
pub use templates::{ResolvedTemplate, Templates};
