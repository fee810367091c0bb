//! Generates the gRPC code for the public API and the internal service with the vendored
//! protoc (no system protoc needed), plus a descriptor set for server reflection. Every
//! generated client and server uses [`proto::codec::ProtoCodec`] (see `src/codec.rs`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Decode failures are the sender's mistake: INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::codec::ProtoCodec")
        .file_descriptor_set_path(out.join("descriptors.bin"))
        .compile_with_config(
            config,
            &[
                "proto/scheduler/v1/scheduler.proto",
                "proto/internal/v1/raft.proto",
                "proto/internal/v1/peer.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
