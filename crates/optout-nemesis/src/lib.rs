//! A nemesis for the optout service, after Jepsen: several clients send random operations
//! (adds, removals, small imports, checks and check streams, with and without
//! `at_least_version`) through two or three real `optout serve` replicas, while the nemesis kills,
//! pauses, fails over and restores the real Redis processes under them and kills and pauses the
//! replicas themselves. Every operation is recorded with its start, its end and its result; at
//! the end the faults are healed, the store's final state and its changes trail are read, and
//! [`checker::check`] judges the whole history against the one rule.
//!
//! Every run is driven by a seed: the operations each client sends, on which replica, and the
//! faults with their targets and durations come from it, so a seed replays the same schedule.
//! The timing of real processes does not replay exactly (that is what the many short runs are
//! for).
//!
//! The checker knows the service only through its gRPC API and the names of the reasons it
//! returns; it shares no code with it (no optout-core type, no store code), so a bug in the
//! service's logic cannot hide itself in the checker.
#![deny(missing_docs)]

pub mod checker;
pub mod history;
mod nemesis;
pub mod procs;
mod report;
mod run;
pub mod topology;
mod workload;

pub use report::{markdown_table, summary};
pub use run::{RunConfig, RunReport, run};
pub use topology::Topology;

/// What can stop a run before its history is checked.
#[derive(Debug, thiserror::Error)]
pub enum NemesisError {
    /// A process or the topology could not be set up.
    #[error("set-up: {0}")]
    Setup(String),
    /// A fault could not be injected or healed.
    #[error("fault: {0}")]
    Fault(String),
    /// A file or a process call failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Redis refused a nemesis command.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Valid NHS numbers (the modulus 11 check digit), its own few lines: the checker must not share
/// the service's.
pub fn valid_nhs_number(n: u64) -> bool {
    if !(1_000_000_000..10_000_000_000).contains(&n) {
        return false;
    }
    let digits: Vec<u64> = format!("{n:010}")
        .bytes()
        .map(|b| u64::from(b - b'0'))
        .collect();
    let sum: u64 = digits[..9]
        .iter()
        .zip((2..=10).rev())
        .map(|(d, w)| d * w)
        .sum();
    match 11 - sum % 11 {
        11 => digits[9] == 0,
        10 => false,
        c => digits[9] == c,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_nhs_number_rule_agrees_with_the_published_examples() {
        for n in [9434765919, 4010232137, 9000000009, 9876543210, 4000000632] {
            assert!(super::valid_nhs_number(n), "{n}");
        }
        for n in [9876544321, 4857773456, 1234567890, 9990000000] {
            assert!(!super::valid_nhs_number(n), "{n}");
        }
    }
}
