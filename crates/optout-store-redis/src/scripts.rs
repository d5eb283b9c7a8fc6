//! The Lua scripts, kept as `.lua` files beside this one, and the one place their errors are read.
//!
//! Each script runs atomically in Redis; `redis::Script` sends EVALSHA and falls back to EVAL once
//! per connection, so a call is one round trip. The scripts that change opt-outs start with the
//! helpers of `lua/lib.lua` (dataset and lock guard, source interning, log trimming). A script
//! refuses with an error reply whose first word is a code ([`ScriptError`]), never by returning an
//! empty answer that could read as "no opt-out".

use redis::{RedisError, Script};

use crate::store::{Cause, StoreError};

/// The scripts of the store.
pub(super) struct Scripts {
    pub init: Script,
    pub intern: Script,
    pub get: Script,
    pub change: Script,
    pub swap: Script,
    pub unlock: Script,
    pub renew: Script,
    pub unlink: Script,
    pub scan: Script,
    pub snapshot: Script,
    pub acknowledge: Script,
    pub seal: Script,
    /// Redis Cluster: the three steps of a change (see `cluster.rs`).
    pub cluster_begin: Script,
    pub cluster_shard: Script,
    pub cluster_end: Script,
}

const LIB: &str = include_str!("lua/lib.lua");

/// A script that uses the helpers of `lua/lib.lua`.
fn with_lib(body: &str) -> Script {
    Script::new(&format!("{LIB}\n{body}"))
}

impl Scripts {
    pub(super) fn new() -> Self {
        Scripts {
            init: Script::new(include_str!("lua/init.lua")),
            intern: with_lib(include_str!("lua/intern.lua")),
            get: Script::new(include_str!("lua/get.lua")),
            change: with_lib(include_str!("lua/change.lua")),
            swap: with_lib(include_str!("lua/swap.lua")),
            unlock: Script::new(include_str!("lua/unlock.lua")),
            renew: Script::new(include_str!("lua/renew.lua")),
            unlink: Script::new(include_str!("lua/unlink.lua")),
            scan: Script::new(include_str!("lua/scan.lua")),
            snapshot: Script::new(include_str!("lua/snapshot.lua")),
            acknowledge: with_lib(include_str!("lua/acknowledge.lua")),
            seal: Script::new(include_str!("lua/seal.lua")),
            cluster_begin: with_lib(include_str!("lua/cluster_begin.lua")),
            cluster_shard: with_lib(include_str!("lua/cluster_shard.lua")),
            cluster_end: with_lib(include_str!("lua/cluster_end.lua")),
        }
    }
}

/// The codes our scripts refuse with (the first word of the error reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ScriptError {
    /// `OPTOUTDATASET`: the dataset marker (or a cluster shard's copy) is missing or differs.
    Dataset,
    /// `OPTOUTLOCKED`: an import of the type holds its lock, or the import lost it.
    Locked,
    /// `OPTOUTREFUSED`: the import cannot be applied as it stands (the message says why).
    Refused,
    /// `OPTOUTBUSY`: another change of one of the numbers is under way (a Cluster's changes of
    /// one number run one after the other).
    Busy,
    /// `OPTOUTLOST`: a Cluster change's first step (its log entry, intent and audit record) is
    /// gone from the store: a failover of the metadata's master lost it.
    Lost,
}

impl ScriptError {
    const CODES: [(&'static str, ScriptError); 5] = [
        ("OPTOUTDATASET", ScriptError::Dataset),
        ("OPTOUTLOCKED", ScriptError::Locked),
        ("OPTOUTREFUSED", ScriptError::Refused),
        ("OPTOUTBUSY", ScriptError::Busy),
        ("OPTOUTLOST", ScriptError::Lost),
    ];

    /// The script error a Redis error carries, if it is one of ours, with its detail: also
    /// when the script ran in a pipeline (with `WAIT`, behind Sentinel or in a Cluster), where
    /// the crate wraps it as a pipeline failure whose `code()` is none. (Unwrapped, a refusal
    /// read as "Redis unavailable": a definite ABORTED became an unknown UNAVAILABLE, and a
    /// missing marker did not read as a reset store.)
    pub(super) fn of(e: &RedisError) -> Option<(ScriptError, Option<String>)> {
        let ours = |code: &str| {
            Self::CODES
                .iter()
                .find(|(c, _)| *c == code)
                .map(|(_, s)| *s)
        };
        if let Some(s) = e.code().and_then(ours) {
            return Some((s, e.detail().map(str::to_string)));
        }
        e.clone()
            .into_server_errors()?
            .iter()
            .find_map(|(_, err)| Some((ours(err.code())?, err.details().map(str::to_string))))
    }
}

/// The one mapping from a Redis error to a store error.
pub(super) fn store_error(e: RedisError) -> StoreError {
    match ScriptError::of(&e) {
        Some((ScriptError::Dataset, _)) => StoreError::NotInitialised(
            "the Redis store's dataset marker is missing or changed (reset, flushed or \
             re-initialised); failing closed"
                .into(),
        ),
        Some((ScriptError::Locked, _)) => StoreError::Busy(
            "an import of this opt-out type is being applied; nothing was changed, retry in a \
             few seconds"
                .into(),
        ),
        Some((ScriptError::Busy, _)) => StoreError::Busy(
            "another change of one of these numbers is under way (it is finished within seconds \
             if its writer stopped); nothing was changed, retry"
                .into(),
        ),
        Some((ScriptError::Lost, _)) => StoreError::Unavailable(
            "the store lost this change's log entry and record after it began (a failover of the \
             metadata's master): not acknowledged; its shards may hold part of it, unrecorded; \
             retry it"
                .into(),
        ),
        Some((ScriptError::Refused, detail)) => StoreError::ImportRefused(
            detail
                .unwrap_or_else(|| "the import was refused by the store".to_string())
                .into(),
        ),
        None => StoreError::Unavailable(Cause::with_source(format!("redis: {e}"), e)),
    }
}

/// The store holds no dataset marker.
pub(super) fn not_initialised() -> StoreError {
    StoreError::NotInitialised(
        "the Redis store holds no dataset marker: initialise it with `optout init-store`, or \
         restore its data"
            .into(),
    )
}

/// The marker differs from the one this replica bound to.
pub(super) fn changed() -> StoreError {
    StoreError::NotInitialised(
        "the Redis store's dataset marker is missing or differs from the one this replica \
         loaded (reset, flushed or re-initialised); failing closed"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_errors_are_read_by_their_code() {
        let ours = |code: &str| {
            redis::make_extension_error(code.into(), Some("marker missing or changed".into()))
        };
        assert_eq!(
            ScriptError::of(&ours("OPTOUTDATASET")),
            Some((
                ScriptError::Dataset,
                Some("marker missing or changed".into())
            ))
        );
        assert_eq!(
            ScriptError::of(&ours("OPTOUTLOCKED")).map(|(s, _)| s),
            Some(ScriptError::Locked)
        );
        assert_eq!(ScriptError::of(&ours("OPTOUTDATASETX")), None);
        assert!(matches!(
            store_error(ours("OPTOUTDATASET")),
            StoreError::NotInitialised(_)
        ));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let e = store_error(io);
        assert!(matches!(e, StoreError::Unavailable(_)));
        let source = std::error::Error::source(&e).expect("the redis error is kept as the source");
        assert!(source.downcast_ref::<RedisError>().is_some(), "{source:?}");
    }
}
