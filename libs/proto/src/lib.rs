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

/// Builds the gRPC reflection service (`grpc.reflection.v1`) over [`FILE_DESCRIPTOR_SET`].
/// Serve it next to the service's own servers so `grpcurl` can list and call them.
pub fn reflection_service() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
}

/// Builds the older `grpc.reflection.v1alpha` reflection service, which grpcurl before 1.9
/// and other older clients use. Serve it alongside [`reflection_service`].
pub fn reflection_service_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1alpha()
}
