//! The gRPC edge: protobuf in, domain calls, protobuf out. Besides this
//! module, only the CLI and the replica client (`artifacts::peers`), both
//! gRPC clients, and `server.rs` (which wires the services) use protobuf
//! types (see the invariants in ARCHITECTURE.md).

pub mod access;
pub mod admin;
pub mod agent;
pub mod artifact_stream;
pub mod events;
pub mod publish;
pub mod rate;
pub mod renewal;
pub mod replica;
pub mod rollout;
pub mod views;

use flotilla_proto::pb;

use crate::model::Facts;

impl From<pb::NodeFacts> for Facts {
    fn from(f: pb::NodeFacts) -> Self {
        let pb::NodeFacts {
            hostname,
            os,
            arch,
            agent_version,
            machine_id,
            trust_version,
            site_url,
            serve_site,
            site_cache_files,
            site_cache_bytes,
        } = f;
        Self {
            hostname,
            os,
            arch,
            agent_version,
            machine_id,
            trust_version,
            site_url,
            serve_site,
            site_cache_files,
            site_cache_bytes,
        }
    }
}

impl From<Facts> for pb::NodeFacts {
    fn from(f: Facts) -> Self {
        Self {
            hostname: f.hostname,
            os: f.os,
            arch: f.arch,
            agent_version: f.agent_version,
            machine_id: f.machine_id,
            trust_version: f.trust_version,
            site_url: f.site_url,
            serve_site: f.serve_site,
            site_cache_files: f.site_cache_files,
            site_cache_bytes: f.site_cache_bytes,
        }
    }
}
