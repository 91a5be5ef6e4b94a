//! Compiles the protobuf schemas in `proto/` with prost, using the protoc
//! binary shipped by the `protoc-bin-vendored` crate (no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    prost_build::Config::new()
        .file_descriptor_set_path(out.join("amct_descriptor.bin"))
        .compile_protos(&["proto/onnx.proto", "proto/amct.proto"], &["proto/"])?;
    Ok(())
}
