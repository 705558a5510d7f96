//! Compiles the gRPC contract in `proto/` with protox (pure Rust: no protoc on any machine) and writes
//! the encoded descriptor set next to the generated code, for gRPC server reflection.

use prost::Message;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "flotilla/agent/v1/spec.proto",
    "flotilla/agent/v1/enrollment.proto",
    "flotilla/agent/v1/status.proto",
    "flotilla/agent/v1/agent.proto",
    "flotilla/admin/v1/admin.proto",
    "flotilla/admin/v1/credentials.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // The migrations are embedded by a macro that cargo cannot see reading them.
    println!("cargo:rerun-if-changed=migrations");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("flotilla_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .btree_map(".")
        .codec_path("crate::proto::codec::CompactCodec")
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
