//! The NanoBox REST gateway as a library, in the style of grpc-gateway: the REST API is
//! derived from the `google.api.http` options in a protobuf descriptor set rather than
//! written by hand, and every call is forwarded to the gRPC service that owns it.
//!
//! - [`routes`]: one route per HTTP rule (path templates such as
//!   `/api/v1/sandboxes/{id}/exec`, `body`, `response_body`, `additional_bindings`);
//! - [`transcode`]: JSON (proto3 JSON mapping, unknown fields rejected) to request
//!   messages and response messages to JSON, for any message of the pool;
//! - [`upstream`]: dynamic gRPC calls (tonic with a prost-reflect codec) to the upstream
//!   services, unary and server-streaming;
//! - [`stream`]: server streams as newline-delimited JSON, and exec aggregated into one
//!   answer;
//! - [`auth`]: bearer API keys, compared in constant time;
//! - [`openapi`]: the OpenAPI document of the routes;
//! - [`status`]: gRPC codes to HTTP statuses and the `{code, message}` error body;
//! - [`metrics`]: REST request counts and latencies by method, route and status;
//! - [`server`]: the axum router tying them together.
//!
//! The `gateway` binary (`services/gateway`) wires it to `nanobox.toml`.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::expect_used, clippy::unwrap_used, clippy::panic))]

pub mod auth;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod server;
pub mod status;
pub mod stream;
pub mod template;
pub mod transcode;
pub mod upstream;

pub use auth::ApiKeys;
pub use error::RouteError;
pub use prost_reflect::DescriptorPool;
pub use server::{Gateway, GatewayOptions};
pub use status::ApiError;
pub use upstream::Upstream;

/// The descriptor pool of the NanoBox protos (`nanobox_proto::FILE_DESCRIPTOR_SET`).
pub fn nanobox_descriptors() -> Result<DescriptorPool, RouteError> {
    Ok(DescriptorPool::decode(nanobox_proto::FILE_DESCRIPTOR_SET)?)
}
