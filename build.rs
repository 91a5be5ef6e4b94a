//! Compiles the protobuf schemas in `proto/` with prost, using the protoc
//! binary shipped by the `protoc-bin-vendored` crate (no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    prost_build::Config::new().compile_protos(&["proto/onnx.proto"], &["proto/"])?;
    Ok(())
}
