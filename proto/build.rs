//! Compiles the .proto files with protox (pure Rust), so building Strata needs
//! no protoc on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // csi.proto imports descriptor, timestamp and wrappers from
    // google/protobuf, which protox ships.
    let protos = ["proto/storage.proto", "proto/csi.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
