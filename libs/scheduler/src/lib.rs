//! Scheduling logic with no I/O, shared by the scheduler service and the node agent:
//!
//! - [`placement`]: which node a new sandbox goes to (filter the nodes that can take it,
//!   score the rest, break ties at random), with an error that says what is missing.
//! - [`auth`]: the shared service token on internal gRPC calls (node agent <-> scheduler):
//!   a client interceptor that attaches it and a server interceptor that checks it in
//!   constant time; and the same check for the API keys of the public `nanobox.v1` APIs.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::expect_used, clippy::unwrap_used))]

pub mod auth;
pub mod placement;
