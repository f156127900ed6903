//! Compiles the NanoBox protos (all but the guest agent protocol, which
//! `nanobox-agent-protocol` owns) with protox, so no `protoc` is needed, and generates prost
//! messages and tonic clients and servers. Also writes the encoded file descriptor set that
//! the gRPC reflection service serves.

use std::path::{Path, PathBuf};
use std::{env, fs};

/// The protos this crate compiles, relative to the proto root.
const PROTOS: &[&str] = &[
    "google/api/http.proto",
    "google/api/annotations.proto",
    "nanobox/v1/common.proto",
    "nanobox/v1/sandboxes.proto",
    "nanobox/v1/templates.proto",
    "nanobox/v1/cluster.proto",
    "nanobox/node/v1/node_agent.proto",
    "nanobox/snapshot/v1/snapshot_store.proto",
];

/// The proto directories this crate reads, relative to the proto root.
const WATCHED: &[&str] = &["google", "nanobox/v1", "nanobox/node", "nanobox/snapshot"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    for dir in WATCHED {
        watch(&proto_root.join(dir))?;
    }

    let files: Vec<PathBuf> = PROTOS.iter().map(|p| proto_root.join(p)).collect();
    let mut compiler = protox::Compiler::new([&proto_root])?;
    // Imports (the well-known types) let reflection clients resolve
    // `google.protobuf.Timestamp` and the method options; source info carries the comments
    // into the generated docs.
    compiler
        .include_imports(true)
        .include_source_info(true)
        .open_files(&files)?;
    // Encoded by protox itself, because decoding into prost types would drop the
    // `google.api.http` extension options that the REST gateway and grpcurl read.
    fs::write(
        out_dir.join("nanobox_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    let fds = compiler.file_descriptor_set();

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}

/// Emits `rerun-if-changed` for a directory and everything below it, so adding a file
/// reruns the build too.
fn watch(dir: &Path) -> std::io::Result<()> {
    println!("cargo:rerun-if-changed={}", dir.display());
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            watch(&path)?;
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Ok(())
}
