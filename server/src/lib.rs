//! The Flotilla control plane: store, CA, tokens, membership, the live fleet and
//! its gRPC services; and the operator CLI behind the `flotilla` binary.

pub mod admission;
pub mod app;
pub mod artifacts;
pub mod audit;
pub mod ca;
pub mod cli;
pub mod compliance;
pub mod config;
pub mod connections;
pub mod credential_file;
pub mod credentials;
pub mod data_dir;
pub mod enroll;
pub mod error;
pub mod events;
pub mod fleet;
pub mod grpc;
pub mod guess_guard;
pub mod handoff;
pub mod key_proof;
pub mod maintenance;
pub mod membership;
pub mod metrics;
pub mod model;
pub mod patches;
pub mod replica;
pub mod rollout;
pub mod server;
pub mod slots;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod trust;
pub mod web;
