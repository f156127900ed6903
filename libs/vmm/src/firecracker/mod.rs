//! Firecracker backend (production, KVM only).
//!
//! Firecracker is driven through its REST API on a Unix socket. NanoBox never hand-builds
//! JSON for it: every body is one of the typed structs in [`api`], each checked against
//! Firecracker's published schema in the tests. [`plan`] turns a [`crate::VmSpec`] into the
//! ordered requests that configure and start a microVM, and builds the snapshot requests;
//! [`client`] speaks HTTP/1.1 over the socket with bounded replies and deadlines.
//!
//! [`FirecrackerBackend`] implements [`crate::VmBackend`]: it starts one Firecracker per VM
//! (directly, or under the jailer in a chroot as an unprivileged user), waits for its API
//! socket, applies the plan and hands out a [`FirecrackerVm`], whose actor task owns the
//! process as the QEMU backend's does. Pause and resume are `PATCH /vm`; snapshots are
//! Firecracker's full snapshots plus a manifest; restore loads one into a fresh process.
//! The guest agent is reached over Firecracker's hybrid vsock
//! ([`crate::AgentEndpoint::FirecrackerVsock`]); [`wait_for_agent`] retries while the
//! guest boots. [`check_available`] says whether Firecracker can run here, and why not.

mod agent;
pub mod api;
mod backend;
pub mod client;
mod config;
mod jailer;
mod layout;
pub mod plan;
mod probe;
mod snapshot;
mod vm;

pub use agent::wait_for_agent;
pub use backend::FirecrackerBackend;
pub use config::{CgroupVersion, FirecrackerConfig, JailerConfig, LogLevel, DEFAULT_BOOT_ARGS};
pub use probe::{check_available, check_kvm, find_binary, Unavailable};
pub use vm::FirecrackerVm;
