//! Scheduling logic with no I/O, and the bearer checks of the gRPC services:
//!
//! - [`placement`]: which node a new sandbox goes to (filter the nodes that can take it,
//!   score the rest, break ties at random), with an error that says what is missing.
//!   Used by the scheduler service, which keeps the rest of the scheduling (create with
//!   its fallback to the next node, pause/resume, heartbeat reconciliation) in
//!   `services/scheduler` for now; issue 11 moves it here.
//! - [`auth`]: the shared service token on internal gRPC calls (node agent <-> scheduler):
//!   a client interceptor that attaches it and a server interceptor that checks it in
//!   constant time; and the same check for the API keys of the public `nanobox.v1` APIs.
//!   Used by the scheduler, the node agent and the template-builder; the REST gateway
//!   checks API keys with its own copy (`nanobox_rest::auth`).

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::expect_used, clippy::unwrap_used))]

pub mod auth;
pub mod placement;
