//! The engine: everything the service does, free of any transport and of any backend. The gRPC
//! adapters (`optout::api`) convert proto to these types and these errors to statuses; tests
//! drive the engine directly.
//!
//! - [`check`]: the check path and the audit gate ("nothing released unrecorded").
//! - [`check_log`]: recording checks off the hot path, in batches, bounded by bytes.
//! - [`filter`]: the filter as the check path reads it, and its freshness clock.
//! - [`follower`]: the one task that keeps the filter in step with the store.
//! - [`sealer`]: sealing the changes trail and verifying it.
//! - [`admin`]: opt-out changes, imports, look-ups, audit reads, status, acknowledgements.
//!
//! Depends on `optout-core` and the store contract (`optout-store`) only: naming tonic, prost or a
//! backend does not compile (its Cargo.toml lists none of them).
#![deny(missing_docs)]

use optout_core as core;
use optout_store as store;

pub mod admin;
pub mod check;
pub mod check_files;
pub mod check_log;
pub mod filter;
pub mod follower;
pub mod sealer;

#[cfg(test)]
mod tests;

/// Makes glibc hand large freed blocks straight back to the OS. By default its threshold for
/// serving an allocation from its own mapping rises to the largest block freed so far (up to 32
/// MiB), so the check log's batch buffers (megabytes, several a second under batches) end up in
/// the heap and the resident set stays at their peak. Fixed at 128 KiB (the default's start),
/// blocks that large are mapped and unmapped each time. Measured (200 k opt-outs, Redis, single
/// then batch workloads, 2 rounds): RSS after 49 / 50 -> 33 / 33 MiB, peak 54 / 55 -> 44 / 44 MiB;
/// throughput within the runs' spread (single 64.7 / 67.7 -> 64.1 / 63.0 k req/s).
///
/// And at most one arena per core the process may use (`available_parallelism`, which follows a
/// container's CPU quota), unless `MALLOC_ARENA_MAX` is set. glibc's default is eight a core, and
/// a thread that finds its arena busy moves to another: the embedded store's lookups run on
/// tokio's blocking threads (about forty under batches), which spread their page buffers over
/// sixteen arenas on 2 cores, each keeping what it freed. Measured at 5 M opt-outs, 10 s of
/// batches, 5 alternating rounds: the embedded replica's RSS after them 63-66 -> 42-44 MiB (peak
/// 67-69 -> 44-45); its CPU per number within the runs' spread (medians 456 -> 420 ns, ranges
/// 370-463 and 407-507), and the Redis replica's too (187.5 / 192.4 -> 187.5 / 191.8 ns).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt sets one allocator parameter; it takes no pointers.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            let arenas = libc::c_int::try_from(cores).unwrap_or(libc::c_int::MAX);
            // SAFETY: as above.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
        }
    }
}

/// Hands memory freed after a burst (an import applied, a filter generation built) back to the
/// OS. glibc keeps freed memory in its per-thread arenas, and a replica's resident set would stay
/// at the burst's peak: measured on a 5 M import into the embedded store, 138 MiB after it
/// without this, 43 MiB with it (`scripts/bench-import.sh`).
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
