//! The integration tests, one binary: each file is a module (a subject: the CLI, the store
//! contract, Redis topologies, ...) sharing `common`, the harness. One binary links the service
//! once instead of once per file (each debug test binary is about 250 MB). Three stay binaries
//! of their own: `tests/nemesis.rs` (minutes of real processes, best alone),
//! `tests/metrics_memory.rs` (its own global allocator) and `tests/check_log_full.rs` (a
//! file-size limit on its whole process).

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod audit;
mod cli;
mod edges;
mod grammar;
mod health;
mod layering;
mod logs;
mod nhs_oracle;
mod ops;
mod parquet;
mod population;
mod redis;
mod security;
mod service;
mod store_contract;
mod topology;
