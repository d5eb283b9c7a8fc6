//! The key layout. Every key is under the configured prefix `P`, so foreign keys in the same
//! Redis are never touched (in a cluster the metadata prefix is `{P}`: one hash slot):
//! - `P marker` (hash): the dataset marker (`dataset_id`, `buckets`, `created_at_ms`), written only
//!   by `optout init-store`. A store without it (never initialised, or restarted empty, flushed, a
//!   wrong database number) is never read as "nobody opted out": every call fails closed.
//! - `P gen:{t}`: the current generation of opt-out type `t` (1 national, 2 type 1).
//! - `P d:{t}:{g}:{b}` (hash): the opt-outs of type `t` in generation `g` whose NHS number falls in
//!   bucket `b` (`number % buckets`); field = the number, value = `recorded_at_ms,source_id`.
//!   Small hashes stay in Redis's compact listpack encoding, which is what keeps 5 million opt-outs
//!   compact; `buckets` is chosen at init so buckets stay under 128 fields.
//! - `P src` / `P srcid` / `P srcnext`: sources interned to small ids.
//! - `P counts` (hash): per-type counts and distinct patients.
//! - `P log` (stream): the change log; each entry's id is the version of that change, its `a`
//!   field the numbers that gained an opt-out (what filters must add). `P version` is the latest
//!   id, `P log_floor` the newest id trimmed away (a follower behind it must rebuild).
//! - `P snapshot` / `P snapshot_version`: the newest published filter snapshot; `P
//!   snapshot_staging:{uuid}` one being sent, a chunk at a time (see `snapshot.rs`).
//! - `P lock:{t}`: held while an import of type `t` is being applied.
//! - `P audit` (stream): the audit records; `P regression_ack`: the newest acknowledgement that
//!   the store went back in time.
//!
//! In a cluster the opt-out data keys carry their shard's hash tag (`P{tag}d:...`) and each shard
//! has its own copy of the marker (`P{tag}marker`); `cluster.rs` lists the keys of its changes.

use super::{Bound, RedisStore};

impl RedisStore {
    /// A metadata key.
    pub(super) fn key(&self, name: &str) -> String {
        format!("{}{name}", self.inner.prefix)
    }

    /// The hash of opt-outs of type `t`, generation `g`, bucket `b`.
    pub(super) fn data_key(
        &self,
        bound: &Bound,
        t: &str,
        g: impl std::fmt::Display,
        b: u64,
    ) -> String {
        if bound.shards.is_empty() {
            format!("{}{b}", self.flat_data_key_base(t, g))
        } else {
            let tag = &bound.shards[(b % bound.shards.len() as u64) as usize];
            format!("{}{{{tag}}}d:{t}:{g}:{b}", self.inner.data_prefix)
        }
    }

    /// The hash of opt-outs of type `t`, generation `g` on one Redis, less its bucket number.
    pub(super) fn flat_data_key_base(&self, t: &str, g: impl std::fmt::Display) -> String {
        format!("{}d:{t}:{g}:", self.inner.prefix)
    }

    /// A cluster shard's copy of the dataset marker, read with its data in one round trip.
    pub(super) fn shard_marker(&self, tag: &str) -> String {
        format!("{}{{{tag}}}marker", self.inner.data_prefix)
    }

    /// Buckets in groups that share a hash slot (a cluster shard), at most 256 to a group.
    pub(super) fn bucket_groups(&self, bound: &Bound) -> Vec<Vec<u64>> {
        let step = (bound.shards.len() as u64).max(1);
        let mut groups = Vec::new();
        for first in 0..step.min(bound.buckets) {
            let all: Vec<u64> = (first..bound.buckets).step_by(step as usize).collect();
            groups.extend(all.chunks(256).map(<[u64]>::to_vec));
        }
        groups
    }
}
