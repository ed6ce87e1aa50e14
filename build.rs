//! Compiles the dmclone.v1 API in one call, so one descriptor set holds every
//! service for server reflection.

use std::{env, path::PathBuf};

const PROTOS: [&str; 5] = [
    "proto/dmclone/v1/common.proto",
    "proto/dmclone/v1/node.proto",
    "proto/dmclone/v1/volume.proto",
    "proto/dmclone/v1/snapshot.proto",
    "proto/dmclone/v1/transfer.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("dmclone_v1_descriptor.bin"))
        .compile_protos(&PROTOS, &["proto"])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
