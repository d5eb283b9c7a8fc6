//! What the benches share: valid NHS numbers and the filter size to fill.

use optout::core::NhsNumber;

/// `count` valid NHS numbers from `from` upwards.
pub fn valid(from: u64, count: usize) -> Vec<NhsNumber> {
    (from..)
        .filter_map(|v| NhsNumber::from_u64(v).ok())
        .take(count)
        .collect()
}

/// Opt-outs the filter holds: `OPTOUT_BENCH_OPT_OUTS`, else 5,000,000 (production size).
pub fn opt_outs() -> usize {
    std::env::var("OPTOUT_BENCH_OPT_OUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000)
}
