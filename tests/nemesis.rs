//! The nemesis in CI (issue 27): a few seeded runs on each Redis topology of random operations
//! (adds, removals, small imports, checks and check streams, with and without
//! `at_least_version`) through three real `optout serve` processes, while Redis nodes are killed,
//! paused, failed over and restored from older copies and the replicas killed and paused; each
//! run's history is checked by `crates/optout-nemesis`'s checker, which shares no code with the
//! service. A violation fails the test with the seed, the operations around it and the faults in
//! force; `target/release/optout-nemesis --seed N --topology T --runs 1` (after `cargo build
//! --release --workspace`) replays the schedule.
//!
//! `OPTOUT_NEMESIS_SEEDS` (comma-separated) and `OPTOUT_NEMESIS_SECONDS` override the seeds and
//! the length of each run; longer searches are the `optout-nemesis --minutes` command in docs/src/guarantees.md.

use std::{path::PathBuf, time::Duration};

use optout_nemesis::{RunConfig, RunReport, Topology, procs::Programs, run, summary};

/// The runs start many processes each: one at a time, whatever the test threads.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn seeds() -> Vec<u64> {
    std::env::var("OPTOUT_NEMESIS_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2])
}

fn seconds() -> u64 {
    std::env::var("OPTOUT_NEMESIS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12)
}

async fn no_violation_in_any_seed(topology: Topology) {
    let _one = ONE_AT_A_TIME.lock().await;
    let programs = Programs::new(PathBuf::from(env!("CARGO_BIN_EXE_optout")));
    for seed in seeds() {
        let config = RunConfig::new(
            topology,
            seed,
            Duration::from_secs(seconds()),
            programs.clone(),
        );
        let report: RunReport = run(config).await.unwrap_or_else(|e| {
            panic!(
                "{} seed {seed}: the run could not be made: {e}",
                topology.name()
            )
        });
        let text = summary(&report);
        println!("{text}");
        assert!(report.verdict.violations.is_empty(), "{text}");
        // A run that drove nothing proves nothing.
        let acknowledged: u64 = report
            .ops
            .iter()
            .filter(|(k, _)| !k.contains("check") && k.ends_with(" ok"))
            .map(|(_, v)| v)
            .sum();
        let answered: u64 = report
            .ops
            .iter()
            .filter(|(k, _)| k.contains("check") && k.ends_with(" ok"))
            .map(|(_, v)| v)
            .sum();
        assert!(
            acknowledged >= 20 && answered >= 50 && report.fault_count() >= 2,
            "the run drove too little to prove anything: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_nemesis_finds_no_release_on_one_redis() {
    no_violation_in_any_seed(Topology::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_nemesis_finds_no_release_behind_sentinel() {
    no_violation_in_any_seed(Topology::Sentinel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_nemesis_finds_no_release_on_a_cluster() {
    no_violation_in_any_seed(Topology::Cluster).await;
}
