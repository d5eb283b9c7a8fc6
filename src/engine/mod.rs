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
