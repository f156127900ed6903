//! VM backends: how NanoBox starts, controls and stops a microVM.
//!
//! [`VmBackend`] is the seam between NanoBox and a VMM. It is small and typed: a backend
//! creates a [`Vm`] from a [`VmSpec`]; a `Vm` can be paused, resumed, snapshotted, stopped,
//! killed and waited on. Backend-specific knobs (binary paths, accelerator, jailer) stay
//! in each backend's own config. Two implementations: QEMU `-M microvm` (runs anywhere,
//! including TCG without KVM) and Firecracker (production, KVM only).
//!
//! Each running VM is owned by one task (an actor) that holds the VMM process and its
//! control socket; the `Vm` handle sends it commands over a channel. Dropping the last
//! handle kills the VMM and removes its run directory, so nothing outlives its owner by
//! accident.

#![deny(unsafe_code)]

mod accel;
mod agent;
mod backend;
mod console;
mod error;
pub mod firecracker;
mod process;
pub mod qemu;
mod spec;

pub use accel::{detect_accel, Accel, AccelChoice};
pub use agent::connect_agent;
pub use backend::{
    AgentEndpoint, BackendKind, Capabilities, ExitInfo, SnapshotInfo, Vm, VmBackend, VmState,
};
pub use console::ConsoleLog;
pub use error::VmmError;
pub use spec::{DiskFormat, DriveSpec, NetSpec, RateLimit, VmSpec, DEFAULT_CONSOLE_LIMIT};
