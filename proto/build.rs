//! Compiles `proto/konnectivity.proto` with `protox` (pure Rust), so building
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/konnectivity.proto");
    let fds = protox::compile(["proto/konnectivity.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".Data.data")
        // `AgentService.Connect` would clash with the generated `connect()` constructor.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
