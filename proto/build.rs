//! Compiles flotilla/v1/*.proto with protox (pure Rust), so no system protoc is needed.

#[allow(clippy::disallowed_macros)] // cargo reads build-script output from stdout
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "flotilla/v1/agent.proto",
        "flotilla/v1/admin.proto",
        "flotilla/v1/replica.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    // The descriptors as the servers' reflection service hands them out.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("flotilla_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::SmallBufferCodec")
        // Shared, not copied: a manifest (and its delta index) sits in every
        // targeted node's desired state, and artifact chunks are slices of one
        // buffer the server holds.
        .bytes(".flotilla.v1.SignedManifest.manifest")
        .bytes(".flotilla.v1.SignedManifest.deltas")
        .bytes(".flotilla.v1.ArtifactChunk.data")
        .bytes(".flotilla.v1.SignedTrustPolicy.document")
        .compile_fds(fds)?;
    Ok(())
}
