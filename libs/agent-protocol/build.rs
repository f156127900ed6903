//! Compiles proto/nanobox/guest/v1/agent.proto with protox (pure Rust: no protoc needed).
//!
//! This crate is deliberately separate from `nanobox-proto`: the guest init links it into
//! a small static binary and must not pull in tonic or the service contracts.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest.join("../../proto");
    let file = proto_root.join("nanobox/guest/v1/agent.proto");
    println!("cargo:rerun-if-changed={}", file.display());

    let descriptors = protox::compile([&file], [&proto_root])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
