//! Generates the gRPC code from proto/ into OUT_DIR.
//!
//! protox compiles the .proto files in Rust, so no system `protoc` is needed on a fresh machine. The
//! encoded descriptor set is also written to OUT_DIR for the reflection service.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/optout/v1/optout.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../../proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("optout_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Hand-written in src/lib.rs: NHS numbers decoded as zero-copy `Bytes` slices of the
        // received message instead of one `String` allocation per number (wire-identical).
        .extern_path(".optout.v1.CheckRequest", "crate::CheckRequest")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
