//! Compiles the .proto files with protox (pure Rust), so building Strata needs
//! no protoc on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/storage.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
