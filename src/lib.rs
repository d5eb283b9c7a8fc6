//! Online NHS opt-out enforcement.
//!
//! A data-extraction system sends a batch of NHS numbers and a purpose over gRPC and gets, for
//! each, RELEASE or WITHHOLD with a reason. The one rule: never release the data of a patient who
//! opted out; every doubt resolves to WITHHOLD.
//!
//! Layout (arrows point inward only; the README's "Code map" says the same, and docs/src/architecture.md includes it):
//! - [`core`]: the `optout-core` crate: NHS numbers, purpose policy, decisions, versions, the
//!   opted-out filter, audit records, the keys file, CSV extracts. Pure.
//! - [`store`]: the `optout-store` contract, the embedded (redb) and Redis backends (crates of
//!   their own), and the factory that chooses one.
//! - [`engine`]: the `optout-engine` crate: the check path, the check log, the filter and its
//!   follower, admin operations.
//!   No transport.
//! - [`api`]: the tonic services, thin: proto to engine types, engine errors to statuses.
//! - [`auth`], [`connections`], [`telemetry`]: keys, connection limits, metrics.
//! - [`server`]: `run(listener, config, shutdown)`, used by the binary and the tests.
//! - [`cli`]: the `optout` command line.
#![deny(missing_docs)]

pub mod api;
pub mod auth;
pub mod cli;
pub mod connections;
pub use optout_core as core;
pub use optout_engine as engine;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod traces;
