//! The gRPC edge: protobuf in, domain calls, protobuf out. Besides this
//! module, only the CLI and the replica client (`artifacts::peers`), both
//! gRPC clients, and `server.rs` (which wires the services) use protobuf
//! types (see the invariants in ARCHITECTURE.md).

pub mod admin;
pub mod agent;
pub mod artifact_stream;
pub mod publish;
pub mod rate;
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
        } = f;
        Self {
            hostname,
            os,
            arch,
            agent_version,
            machine_id,
            trust_version,
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
        }
    }
}
