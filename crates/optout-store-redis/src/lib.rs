//! The Redis consent store, shared by every replica.
//!
//! The key layout is described in `keys.rs`; on a Redis Cluster the metadata keys share one hash
//! slot and the opt-out data is sharded (see `cluster.rs`).
//!
//! Every admin write is one Lua script: records, counts and the change-log entry change together
//! or not at all. A check's "maybe" numbers are read at one consistent version: on one Redis in
//! one `MULTI`/`EXEC` round trip (`layout.rs`), on a Cluster as `cluster.rs` says. An import is
//! staged into a new generation of its type and swapped in by moving the generation pointer, so
//! no check ever sees half of it.
//!
//! Files: `config` (settings), `keys` (the key layout), `conn` (reaching one Redis, Sentinel's master or a Cluster),
//! `layout` (the seam between topologies, and one Redis's layout), `cluster` (the Cluster's),
//! `scripts` and `lua/` (the Lua scripts and their errors), `reply` (reading replies), `safety`
//! (eviction, persistence, the master's role), `durable` (replica confirmation), `dataset`
//! (marker, init, counts), `feed` (the change log), `import` and `lease` (its lock), `snapshot`, `audit`.
#![deny(missing_docs)]

use optout_core as core;
use optout_store as store;

mod audit;
mod cluster;
mod config;
mod conn;
mod continuity;
mod coverage;
mod dataset;
mod durable;
mod feed;
mod import;
mod keys;
mod layout;
mod lease;
mod reply;
mod safety;
mod scripts;
mod snapshot;
mod stored_practices;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use parking_lot::RwLock;

pub use config::{
    RedisConfig, SentinelConfig, Topology, defaults, redact_nodes, redact_url, with_password,
};
use conn::{Conn, FEED_BLOCK, WRITE_TIMEOUT, cluster_conns, direct_conns, sentinel_conns};
pub use conn::{key_slot, shard_tags};
use layout::{Change, Flat, Layout};
use scripts::{Scripts, not_initialised};

use crate::core::{
    AuditKey, AuditQuery, AuditRecord, NhsNumber, OptOutSet, OptOutType, Practice, Version,
};
use crate::store::{
    AuditTrail, ChangeFeed, ChangeKind, CheckReads, Feed, ImportMode, ImportSession, Lookup,
    OptOutRecord, StoreError, StoreStatus, Stored, StoredEntry, WriteOutcome, Writes,
};

/// The Redis store. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Shared, multiplexed, short timeout: the check path's lookups and small reads.
    conn: Conn,
    /// Admin writes, imports, scans and snapshots: large replies and scripts that may run for
    /// seconds at 5 million opt-outs, kept off the check path's connection so they never delay a
    /// lookup behind them.
    write: Conn,
    /// Its own connection: a blocking XREAD must not stall everyone else's commands.
    feed: Conn,
    /// What differs between one Redis (or Sentinel's master) and a Cluster, chosen at connect.
    layout: Box<dyn Layout>,
    /// Replicas that must confirm an opt-out change, and how long to wait for them.
    replicas_ack: u32,
    /// The operator vouches for the persistence (see [`RedisConfig::assume_durable`]).
    assume_durable: bool,
    replicas_ack_timeout: Duration,
    /// Prefix of the metadata keys (in a cluster, `{P}`: one hash slot for all of them).
    prefix: String,
    /// Prefix of the opt-out data keys (`P`; in a cluster followed by the shard's hash tag).
    data_prefix: String,
    log_len: u64,
    audit_len: u64,
    /// The dataset this store is bound to, and its bucket count.
    bound: RwLock<Option<Bound>>,
    /// The newest version this replica saw the store reach, which every read and write proves
    /// the store still holds.
    continuity: continuity::Continuity,
    scripts: Scripts,
    /// Each record written to the changes trail carries a MAC under this key.
    record_key: Option<Arc<AuditKey>>,
}

/// The dataset a store is bound to.
#[derive(Clone, Debug)]
struct Bound {
    dataset: String,
    buckets: u64,
    /// In a cluster, the hash tag of each shard (a bucket `b` is in shard `b % shards.len()`).
    shards: Arc<Vec<String>>,
}

impl RedisStore {
    /// Connects lazily: an unreachable Redis is not an error here (the replica starts NOT_SERVING
    /// and keeps trying); a malformed URL or sentinel address is. The topology is chosen here,
    /// once.
    pub fn connect(config: &RedisConfig) -> Result<Self, StoreError> {
        let timeouts = [
            config.response_timeout,
            WRITE_TIMEOUT,
            config.response_timeout + FEED_BLOCK,
        ];
        let ([conn, write, feed], layout, prefix): ([Conn; 3], Box<dyn Layout>, String) =
            match &config.topology {
                Topology::Cluster(nodes) => (
                    cluster_conns(config, nodes, timeouts)?,
                    Box::new(cluster::Cluster::new(config.shards)),
                    format!("{{{}}}", config.prefix),
                ),
                Topology::Sentinel(s) => (
                    sentinel_conns(config, s, timeouts)?,
                    Box::new(Flat::new(true)),
                    config.prefix.clone(),
                ),
                Topology::Single(url) => (
                    direct_conns(config, url, timeouts)?,
                    Box::new(Flat::new(false)),
                    config.prefix.clone(),
                ),
            };
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                write,
                feed,
                layout,
                replicas_ack: config.replicas_ack,
                assume_durable: config.assume_durable,
                replicas_ack_timeout: config.replicas_ack_timeout,
                prefix,
                data_prefix: config.prefix.clone(),
                log_len: config.log_len.max(1),
                audit_len: config.audit_len.max(1),
                bound: RwLock::new(None),
                continuity: continuity::Continuity::default(),
                scripts: Scripts::new(),
                record_key: config.record_key.clone(),
            }),
        })
    }

    /// Appends a changes-trail record's fields to the `XADD` last pushed on `pipe`: `r`, its
    /// JSON, and `m`, its MAC when this replica has the audit key.
    fn push_record(&self, pipe: &mut redis::Pipeline, r: &AuditRecord) -> Result<(), StoreError> {
        let (json, mac) = self.signed_record(r)?;
        pipe.arg("r").arg(json);
        if !mac.is_empty() {
            pipe.arg("m").arg(mac);
        }
        Ok(())
    }

    /// A changes-trail record as written: its JSON and its MAC under the audit key (empty
    /// without a key). The scripts store the MAC as the entry's `m` field.
    fn signed_record(&self, r: &AuditRecord) -> Result<(String, String), StoreError> {
        let json = reply::audit_json(r)?;
        let mac = self
            .inner
            .record_key
            .as_ref()
            .map(|k| crate::core::seals::record_mac(k, json.as_bytes()))
            .unwrap_or_default();
        Ok((json, mac))
    }

    fn bound(&self) -> Result<Bound, StoreError> {
        self.inner.bound.read().clone().ok_or_else(not_initialised)
    }

    /// The check path's connection.
    fn conn(&self) -> Conn {
        self.inner.conn.clone()
    }

    /// The connection of admin writes, imports, scans and snapshots.
    fn write_conn(&self) -> Conn {
        self.inner.write.clone()
    }

    /// Drops every connection to the node Sentinel named, so the next call asks the sentinels.
    fn reset_sentinel_conns(&self) {
        for c in [&self.inner.conn, &self.inner.write, &self.inner.feed] {
            c.reset();
        }
    }
}

/// The trait, each method handed to the file of its concern.
#[async_trait]
impl CheckReads for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn lookup(&self, numbers: &[NhsNumber], types: OptOutSet) -> Result<Lookup, StoreError> {
        let bound = self.bound()?;
        self.inner.layout.lookup(self, &bound, numbers, types).await
    }

    async fn coverage(&self) -> Result<crate::core::coverage::Coverage, StoreError> {
        self.read_coverage().await
    }

    async fn coverage_mode(&self) -> Result<crate::core::coverage::CoverageMode, StoreError> {
        self.bound()?;
        self.read_coverage_mode().await
    }
}

#[async_trait]
impl Writes for RedisStore {
    async fn change(
        &self,
        kind: ChangeKind,
        opt_out: OptOutType,
        practice: Option<&Practice>,
        numbers: &[NhsNumber],
        source: &str,
        audit: &AuditRecord,
    ) -> Result<WriteOutcome, StoreError> {
        crate::store::practice_ok(opt_out, practice)?;
        let bound = self.bound()?;
        let change = Change {
            kind,
            opt_out,
            practice,
            numbers,
            source,
            audit,
        };
        self.inner.layout.change(self, &bound, change).await
    }

    async fn begin_import(
        &self,
        mode: ImportMode,
        opt_out: OptOutType,
        practice: Option<&Practice>,
        source: &str,
    ) -> Result<Box<dyn ImportSession>, StoreError> {
        crate::store::practice_ok(opt_out, practice)?;
        self.start_import(mode, opt_out, practice, source).await
    }

    async fn get(&self, number: NhsNumber) -> Result<(Vec<OptOutRecord>, Version), StoreError> {
        let bound = self.bound()?;
        self.inner.layout.get(self, &bound, number).await
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        self.counts().await
    }

    async fn acknowledge_regression(&self, audit: &AuditRecord) -> Result<String, StoreError> {
        self.record_ack(audit).await
    }
}

#[async_trait]
impl ChangeFeed for RedisStore {
    async fn changes_after(
        &self,
        after: Version,
        max: usize,
        wait: Duration,
    ) -> Result<Feed, StoreError> {
        self.read_feed(after, max, wait).await
    }

    async fn scan_pages(
        &self,
        page: &mut (dyn for<'n> FnMut(&'n [NhsNumber]) + Send),
    ) -> Result<Version, StoreError> {
        let bound = self.bound()?;
        self.inner.layout.scan_pages(self, &bound, page).await
    }

    async fn open_dataset(&self) -> Result<String, StoreError> {
        self.bind().await
    }

    async fn check_safe(&self) -> Result<(), StoreError> {
        self.safe_now().await
    }

    async fn recover(&self) -> Result<u64, StoreError> {
        self.inner.layout.recover(self).await
    }

    async fn load_snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.newest_snapshot().await
    }

    async fn publish_snapshot(&self, version: Version, bytes: &[u8]) -> Result<(), StoreError> {
        self.put_snapshot(version, bytes).await
    }

    fn shares_snapshots(&self) -> bool {
        true
    }

    fn forget_history(&self) {
        self.inner.continuity.forget();
    }

    /// The newest version this replica saw, which every read and write proves still held.
    fn seen_version(&self) -> Version {
        self.inner.continuity.seen()
    }

    async fn regression_ack(&self) -> Result<Option<String>, StoreError> {
        self.ack_id().await
    }
}

#[async_trait]
impl AuditTrail for RedisStore {
    async fn trim_changes(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.bound()?;
        let minid = format!("{before_ms}-0");
        // A seal is written after the records it covers: one older than the bound covers only
        // records older than it.
        let (removed, _seals): (u64, u64) = redis::pipe()
            .cmd("XTRIM")
            .arg(self.key("changes"))
            .arg("MINID")
            .arg(&minid)
            .cmd("XTRIM")
            .arg(self.key(audit::SEALS))
            .arg("MINID")
            .arg(&minid)
            .query_async(&mut self.write_conn())
            .await
            .map_err(scripts::store_error)?;
        Ok(removed)
    }

    async fn record_access(&self, record: &AuditRecord) -> Result<(), StoreError> {
        self.append_access(record).await
    }

    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        self.append_records(records).await
    }

    async fn read_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        self.read_records(query).await
    }

    async fn stored(
        &self,
        part: Stored,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.stored_entries(part, after, limit).await
    }

    async fn last_seal(&self) -> Result<Option<StoredEntry>, StoreError> {
        self.newest_seal().await
    }

    async fn append_seal(&self, after_seq: u64, line: &str) -> Result<bool, StoreError> {
        self.add_seal(after_seq, line).await
    }
}
