//! The Flotilla agent as a library: joining a fleet, holding the one live session to
//! the server, renewing the node certificate, and running the role hook.
//!
//! The binary `flotilla-agent` is a thin command line over this crate, so the fleet
//! simulator can run many real sessions in one process.

pub mod backoff;
pub mod cert;
pub mod config;
pub mod embed;
pub mod enroll;
pub mod facts;
pub mod files;
pub mod hook;
pub mod install;
pub mod patch;
pub mod refusal;
pub mod session;
pub mod site;
pub mod state;
pub mod status;
pub mod textfile;
pub mod trust;
pub mod uplink;

pub use enroll::{JoinError, JoinOptions, Joined, join, join_with};
pub use session::{RunError, RunOptions, run, run_with};
pub use state::{Desired, Identity, Keyspace, Role, StateError, Store};
pub use status::Status;
