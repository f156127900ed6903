//! The NanoBox gRPC contracts as Rust: prost messages and tonic clients and servers for the
//! public API (`nanobox.v1`), the node agent and registry (`nanobox.node.v1`) and the
//! snapshot store (`nanobox.snapshot.v1`), the encoded descriptor set that the gRPC
//! reflection service serves, and the conversions between these wire types and the domain
//! types of `nanobox-core`.
//!
//! This is the only crate that deals in prost types; services convert at their gRPC edge.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::expect_used, clippy::unwrap_used))]

pub mod convert;

/// Generated code, laid out by protobuf package so that cross-package references resolve.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    rustdoc::all
)]
mod generated {
    pub mod google {
        pub mod api {
            tonic::include_proto!("google.api");
        }
    }
    pub mod nanobox {
        pub mod v1 {
            tonic::include_proto!("nanobox.v1");
        }
        pub mod node {
            pub mod v1 {
                tonic::include_proto!("nanobox.node.v1");
            }
        }
        pub mod snapshot {
            pub mod v1 {
                tonic::include_proto!("nanobox.snapshot.v1");
            }
        }
    }
}

/// `google.api`: the HTTP rule annotations (only the option messages; the REST gateway reads
/// the rules from the descriptor set).
pub use generated::google;
/// `nanobox.node.v1`: the node agent and node registry services.
pub use generated::nanobox::node;
/// `nanobox.snapshot.v1`: the snapshot store service.
pub use generated::nanobox::snapshot;
/// `nanobox.v1`: the public sandboxes, templates and cluster services.
pub use generated::nanobox::v1;

/// The encoded `FileDescriptorSet` of every proto in this crate and their imports (with
/// comments), for gRPC reflection and for the REST gateway to read the HTTP rules.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/nanobox_descriptor.bin"));

/// Services every NanoBox process serves next to its own: health and both reflection
/// versions.
pub const COMMON_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// A reflection builder that lists `served` (the process's own services, by full name)
/// and the [`COMMON_SERVICES`], and can describe all of them.
///
/// [`FILE_DESCRIPTOR_SET`] holds every NanoBox service; listing them all from every
/// process would send `grpcurl list` users to calls that answer UNIMPLEMENTED, and
/// health's descriptors are not in it, so they are added here.
pub fn reflection(served: &[&'static str]) -> tonic_reflection::server::Builder<'static> {
    let builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        // Both versions are registered above, whichever one is being built.
        .include_reflection_service(false);
    served
        .iter()
        .chain(COMMON_SERVICES.iter())
        .fold(builder, |b, name| b.with_service_name(*name))
}

/// The connections a gRPC server accepts on `listener`, with Nagle's algorithm off.
///
/// A gRPC reply is several small HTTP/2 frames (headers, data, trailers) written one
/// after another; with Nagle on, the later ones wait for the peer's delayed ACK, up to
/// 40 ms on Linux, on every call. `serve_with_incoming` ignores the server builder's own
/// `tcp_nodelay`, so services that bind their listener themselves (to print the address
/// of port 0) must set it here.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
