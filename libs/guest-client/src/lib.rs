//! Host side of the guest agent protocol: one [`AgentClient`] per guest connection.
//!
//! The guest is untrusted. Everything it sends is checked: frames are size-limited by the
//! codec, bulk data beyond the window this side granted ends the connection, stream ids
//! this side did not open are ignored, and every wait has a deadline or is cancellable by
//! dropping it. Memory per stream is bounded by [`INITIAL_WINDOW`], however fast the guest
//! produces output and however slowly the caller consumes it.

#![forbid(unsafe_code)]

mod client;
mod error;
mod exec;
mod transport;

pub use client::{AgentClient, ConfigureRequest, GuestInfo, NetworkConfig, WriteOptions};
pub use error::AgentError;
pub use exec::{
    ExecEvent, ExecOutput, ExecRequest, ExecStdin, ExecStream, ExitOutcome, ExitStatus,
};
pub use transport::connect_firecracker_vsock;

pub use nanobox_agent_protocol::pb::ErrorCode;
pub use nanobox_agent_protocol::INITIAL_WINDOW;
