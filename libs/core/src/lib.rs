//! NanoBox domain types: sandbox and template ids and names, resource and network specs,
//! lifecycle states with their allowed transitions, exec specs and outcomes.
//!
//! Every type validates on construction, so code holding one can trust it. The crate does no
//! I/O and knows nothing of protobuf or gRPC: `nanobox-proto` converts between these types
//! and the wire types.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::expect_used, clippy::unwrap_used))]

mod error;
mod exec;
mod id;
mod network;
mod node;
pub mod paths;
mod resources;
mod sandbox;
mod template;

pub use error::{describe, error_id, CoreError};
pub use exec::{ExecSpec, ExitKind, ExitOutcome};
pub use id::SandboxId;
pub use network::{NetworkMode, NetworkSpec};
pub use node::NodeState;
pub use paths::cache_dir;
pub use resources::Resources;
pub use sandbox::{SandboxSpec, SandboxState, MAX_METADATA_ENTRIES, MAX_SANDBOX_TIMEOUT};
pub use template::{ImageConfig, TemplateName, TemplateState};
