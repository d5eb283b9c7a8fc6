//! The Redis store on a Redis Cluster.
//!
//! Layout: the metadata (marker, version, change log, generations, counts, sources, locks,
//! snapshot, audit) keeps its single-node names under the prefix `{P}`, so all of it is in one
//! hash slot and every metadata script stays atomic. The opt-out data is split into shards (64 by
//! default, fixed at `init-store`): bucket `b` belongs to shard `b % shards`, whose keys are
//! `P{tag}d:{type}:{generation}:{b}` plus `P{tag}marker`, a copy of the dataset marker. Each
//! shard's tag is chosen so that the shards sit on evenly spaced slots, one per slot range, so a
//! cluster whose masters own equal slot ranges holds an equal share of the opt-outs.
//!
//! What is not atomic any more, and why it is still safe:
//! - A lookup reads the shards (one pipeline per master, holding every shard of that master it
//!   needs; which shards a master serves is learnt from `CLUSTER SLOTS` and learnt again after any
//!   error) and then the metadata. The shard markers prove each shard's data belongs to
//!   this dataset (a master that restarted empty has none: fail closed); the generations read
//!   after the data must be the ones the data was read under (they only grow, so equal means
//!   unchanged throughout), else the lookup is repeated.
//! - An added opt-out is written to the change log first, then to its shard, then counted. A
//!   crash in between leaves a log entry for a record that is not there: filters hold an extra
//!   "maybe" (harmless) and the admin call was never acknowledged. A removal deletes first and
//!   logs after; filters never drop numbers, so the order does not matter to them.
//! - A change must not land in a generation an import is replacing: the last step checks, under
//!   the metadata slot's atomicity, that no import holds the type's lock and the generation is
//!   still the one written to; otherwise the change is not acknowledged and the caller retries.

mod intents;
mod reads;

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use futures::StreamExt;
use parking_lot::Mutex;
use redis::{AsyncCommands, ScriptInvocation, Value};

use super::{
    Bound, RedisStore,
    conn::{Conn, key_slot, shard_tags},
    layout::{Change, Layout, push_meta_reads, read_meta},
    reply::{array, csv_of, flag, int_of, numbers_csv, stored_number, text_of, type_code},
    scripts::{ScriptError, store_error},
};
use crate::{
    core::{NhsNumber, OptOutSet, OptOutType, Practice, Version},
    store::{ChangeKind, Lookup, OptOutRecord, StoreError, WriteOutcome, now_ms},
};

/// The Cluster layout: opt-outs in shards, a change in three steps.
pub(super) struct Cluster {
    /// Shards to create at `init`.
    init_shards: usize,
    /// The shards that share a master (learnt from `CLUSTER SLOTS`), so a lookup sends one
    /// pipeline per master; forgotten after any error and whenever the dataset is bound again.
    masters: Mutex<Option<Arc<Masters>>>,
}

impl Cluster {
    pub(super) fn new(init_shards: usize) -> Self {
        Cluster {
            init_shards: init_shards.clamp(1, 16384),
            masters: Mutex::new(None),
        }
    }

    /// Writes each shard's copy of the dataset marker.
    async fn write_shard_markers(
        &self,
        s: &RedisStore,
        tags: &[String],
        id: &str,
    ) -> Result<(), StoreError> {
        let writes = tags.iter().map(|tag| {
            let mut conn = s.write_conn();
            let key = s.shard_marker(tag);
            async move { conn.set::<_, _, ()>(key, id).await }
        });
        for r in futures::future::join_all(writes).await {
            r.map_err(store_error)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Layout for Cluster {
    async fn lookup(
        &self,
        s: &RedisStore,
        bound: &Bound,
        numbers: &[NhsNumber],
        types: OptOutSet,
    ) -> Result<Lookup, StoreError> {
        self.lookup_cluster(s, bound, numbers, types).await
    }

    async fn get(
        &self,
        s: &RedisStore,
        bound: &Bound,
        number: NhsNumber,
    ) -> Result<(Vec<OptOutRecord>, Version), StoreError> {
        self.get_cluster(s, bound, number).await
    }

    async fn change(
        &self,
        s: &RedisStore,
        bound: &Bound,
        c: Change<'_>,
    ) -> Result<WriteOutcome, StoreError> {
        self.change_cluster(s, bound, c).await
    }

    async fn scan_pages(
        &self,
        s: &RedisStore,
        bound: &Bound,
        page: &mut (dyn for<'n> FnMut(&'n [NhsNumber]) + Send),
    ) -> Result<Version, StoreError> {
        self.scan_cluster(s, bound, page).await
    }

    /// A metadata script touches one master: `WAIT` on every master afterwards.
    async fn run_durable(
        &self,
        s: &RedisStore,
        inv: &ScriptInvocation<'_>,
        conn: &mut Conn,
    ) -> Result<Value, StoreError> {
        let value = inv.invoke_async(conn).await.map_err(store_error)?;
        s.confirm_everywhere().await?;
        Ok(value)
    }

    fn new_shards(&self) -> Vec<String> {
        shard_tags(self.init_shards)
    }

    /// Each shard's marker first, the dataset marker (what makes the store usable) last.
    async fn prepare_init(
        &self,
        s: &RedisStore,
        tags: &[String],
        id: &str,
    ) -> Result<(), StoreError> {
        let exists: bool = s
            .write_conn()
            .exists(s.key("marker"))
            .await
            .map_err(store_error)?;
        if exists {
            return Err(s.already_initialised());
        }
        self.write_shard_markers(s, tags, id).await
    }

    /// Again, idempotently: repairs a shard marker a concurrent, losing init overwrote.
    async fn finish_init(
        &self,
        s: &RedisStore,
        tags: &[String],
        id: &str,
    ) -> Result<(), StoreError> {
        self.write_shard_markers(s, tags, id).await?;
        s.confirm_everywhere().await
    }

    async fn check_binding(&self, s: &RedisStore, shards: &[String]) -> Result<(), StoreError> {
        // The marker's INFO went to the metadata's master only; every master holds data.
        s.eviction_policy_ok().await?;
        if shards.is_empty() {
            return Err(StoreError::NotInitialised(
                "the store was initialised without cluster shards; initialise it with \
                 `optout init-store --redis-cluster ...`"
                    .into(),
            ));
        }
        *self.masters.lock() = None;
        Ok(())
    }

    /// Older than any change still running normally takes, with room to spare; finishing one
    /// that is still running is harmless anyway (every step is idempotent).
    async fn recover(&self, s: &RedisStore) -> Result<u64, StoreError> {
        self.recover_intents(s, 2_000).await
    }
}

/// A change registered by step 1: what its shard steps need.
use reads::*;
