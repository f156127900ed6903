//! Firecracker backend (production, KVM only): the typed API model and the boot plan.
//!
//! Firecracker is driven through its REST API on a Unix socket. NanoBox never hand-builds
//! JSON for it: every body is one of the typed structs in [`api`], each checked against
//! Firecracker's published schema in the tests. [`plan`] turns a [`crate::VmSpec`] into the
//! ordered requests that configure and start a microVM. The guest agent is reached over
//! Firecracker's hybrid vsock (see [`crate::AgentEndpoint::FirecrackerVsock`]).
//!
//! The process management (spawn, jailer, actor) joins these in the node-agent work.

pub mod api;
pub mod client;
pub mod plan;
