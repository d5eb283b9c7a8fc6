//! Online NHS opt-out enforcement.
//!
//! A data-extraction system sends a batch of NHS numbers and a purpose over gRPC and gets, for
//! each, RELEASE or WITHHOLD with a reason. The one rule: never release the data of a patient who
//! opted out; every doubt resolves to WITHHOLD.
//!
//! Layout (arrows point inward only):
//! - [`core`]: NHS numbers, purpose policy, decisions, versions, the opted-out filter. Pure.
//! - [`store`]: the consent store trait and its embedded (redb) implementation.
//! - [`sync`]: the task that keeps the filter in step with the store, and its freshness clock.
//! - [`check`]: the check path over a store and a filter, free of any transport.
//! - [`api`]: the tonic services, thin: validate, convert, call, convert back.
//! - [`server`]: `run(listener, config, shutdown)`, used by the binary and the tests.
//! - [`cli`]: the `optout` command line.
#![deny(missing_docs)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod check;
pub mod cli;
pub mod connections;
pub use optout_core as core;
pub mod metrics;
pub mod server;
pub mod store;
pub mod sync;
