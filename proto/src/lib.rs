//! Flotilla's wire protocol (generated from `flotilla/v1/*.proto`), the join token
//! format, the signed trust-policy chain, the delta index beside a patch
//! manifest, the limits every side enforces, the TLS pieces agent and CLI
//! share, the one telemetry setup and error ending all binaries use, and their
//! systemd notifications.

pub mod codec;
pub mod config_example;
pub mod delta;
pub mod durable;
pub mod exit;
pub mod http2;
pub mod key_proof;
pub mod limits;
pub mod manifest;
pub mod phase;
pub mod site;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod transfer;
pub mod trust;
pub mod when;

/// Generated protobuf and gRPC code for package `flotilla.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("flotilla.v1");
}

/// The encoded descriptors of every Flotilla service and message, for gRPC
/// reflection (`grpcurl` without the .proto files).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/flotilla_descriptor.bin"));

/// Lower-case hex SHA-256 of `bytes`: the fingerprint of a CA certificate (DER).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Installs ring as rustls' process-wide crypto provider. Every binary calls this
/// once at start; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
