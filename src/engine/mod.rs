//! The engine: everything the service does, free of any transport. The gRPC adapters in
//! [`crate::api`] convert proto to these types and these errors to statuses; tests drive the
//! engine directly.
//!
//! - [`check`]: the check path and the audit gate ("nothing released unrecorded").
//! - [`check_log`]: recording checks off the hot path, in batches, bounded by bytes.
//! - [`filter`]: the filter as the check path reads it, and its freshness clock.
//! - [`follower`]: the one task that keeps the filter in step with the store.
//! - [`sealer`]: sealing the changes trail and verifying it.
//! - [`admin`]: opt-out changes, imports, look-ups, audit reads, status, acknowledgements.
//!
//! May import `core`, `store`, `auth` (who is calling) and `telemetry`; never `api`, `server` or
//! `cli`.

pub mod admin;
pub mod check;
pub mod check_files;
pub mod check_log;
pub mod filter;
pub mod follower;
pub mod sealer;

#[cfg(test)]
mod tests;

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
