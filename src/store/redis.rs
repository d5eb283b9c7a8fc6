//! The Redis consent store, shared by every replica.
//!
//! Layout (every key under the configured prefix `P`, so foreign keys in the same Redis are never
//! touched):
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
//! - `P snapshot` / `P snapshot_version`: the newest published filter snapshot.
//! - `P lock:{t}`: held while an import of type `t` is being applied.
//!
//! Every admin write is one Lua script: records, counts and the change-log entry change together
//! or not at all. A check's "maybe" numbers are one script call: one round trip, one consistent
//! version. An import is staged into a new generation of its type and swapped in by moving the
//! generation pointer, so no check ever sees half of it.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use parking_lot::RwLock;
use redis::{
    AsyncCommands, Client, FromRedisValue, IntoConnectionInfo, Script, ScriptInvocation, Value,
    aio::{ConnectionManager, ConnectionManagerConfig},
    sentinel::SentinelNodeConnectionInfo,
};

use super::topology::{ClusterConn, Conn, SentinelConn, Sentinels, shard_tags};
use super::{
    ChangeEntry, ChangeKind, ConsentStore, Feed, ImportMode, ImportOutcome, ImportSession, Lookup,
    OptOutRecord, Scan, StoreError, StoreStatus, WriteOutcome, now_ms,
};
use crate::core::{AuditKey, AuditQuery, AuditRecord, NhsNumber, OptOutSet, OptOutType, Version};

/// Settings of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` (TLS) URL. Behind Sentinel its host is not used: it carries the
    /// credentials, database and TLS mode for the Redis nodes the sentinels name.
    pub url: String,
    /// Redis Sentinel: when set, the store follows the master the sentinels name.
    pub sentinel: Option<SentinelConfig>,
    /// Redis Cluster: when set, these are some of its nodes (`host:port`), and the store uses the
    /// cluster layout (see the module documentation).
    pub cluster: Option<Vec<String>>,
    /// Shards of the opt-out data in a cluster (fixed when the store is initialised).
    pub shards: usize,
    /// Replicas that must confirm an opt-out change (`WAIT`) before it is acknowledged.
    pub replicas_ack: u32,
    /// How long to wait for those confirmations.
    pub replicas_ack_timeout: Duration,
    /// Skip the persistence check (the operator vouches for a Redis whose CONFIG is hidden).
    pub assume_durable: bool,
    /// Prefix of every key this service uses.
    pub prefix: String,
    /// Change-log entries kept.
    pub log_len: u64,
    /// How long one Redis call may take before it is an error.
    pub response_timeout: Duration,
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// Audit records kept (approximately; the oldest are trimmed past it).
    pub audit_len: u64,
}

impl RedisConfig {
    /// Defaults for a URL.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "optout:".into(),
            log_len: 100_000,
            response_timeout: Duration::from_millis(1000),
            connect_timeout: Duration::from_millis(1000),
            audit_len: 10_000_000,
            sentinel: None,
            cluster: None,
            shards: 64,
            replicas_ack: 0,
            replicas_ack_timeout: Duration::from_millis(2000),
            assume_durable: false,
        }
    }

    /// Where the store is, for messages and logs (no password).
    pub fn describe(&self) -> String {
        match (&self.sentinel, &self.cluster) {
            (_, Some(nodes)) => format!("Redis Cluster at {}", redact_nodes(nodes)),
            (Some(s), None) => format!(
                "Redis master {:?} via sentinels {}",
                s.master_name,
                redact_nodes(&s.addrs)
            ),
            (None, None) => redact_url(&self.url),
        }
    }
}

/// Where the sentinels are and which master they watch.
#[derive(Clone, Debug)]
pub struct SentinelConfig {
    /// `host:port` of each sentinel (or a full `redis://` URL, with the sentinel's password).
    pub addrs: Vec<String>,
    /// The master's name in the sentinels' configuration (`sentinel monitor NAME ...`).
    pub master_name: String,
}

/// Node addresses (`host:port` or URLs that may carry a password), fit for messages and logs.
pub fn redact_nodes(nodes: &[String]) -> String {
    nodes
        .iter()
        .map(|n| redact_url(n))
        .collect::<Vec<_>>()
        .join(",")
}

/// The URL with any password replaced, fit for messages and logs.
pub fn redact_url(url: &str) -> String {
    match redis::parse_redis_url(url) {
        Some(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        None => match url.rsplit_once('@') {
            Some((_, host)) => format!("<redacted>@{host}"),
            None => url.to_string(),
        },
    }
}

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
    /// Replicas that must confirm an opt-out change, and how long to wait for them.
    replicas_ack: u32,
    /// The operator vouches for the persistence (see [`RedisConfig::assume_durable`]).
    assume_durable: bool,
    replicas_ack_timeout: Duration,
    /// Prefix of the metadata keys (in a cluster, `{P}`: one hash slot for all of them).
    prefix: String,
    /// Prefix of the opt-out data keys (`P`; in a cluster followed by the shard's hash tag).
    data_prefix: String,
    /// Shards to create at `init` in a cluster.
    init_shards: usize,
    /// In a cluster, the shards that share a master (learnt from `CLUSTER SLOTS`), so a lookup
    /// sends one pipeline per master; forgotten after any error.
    masters: parking_lot::Mutex<Option<Arc<cluster::Masters>>>,
    log_len: u64,
    audit_len: u64,
    /// The dataset this store is bound to, and its bucket count.
    bound: RwLock<Option<Bound>>,
    scripts: Scripts,
}

#[derive(Clone, Debug)]
struct Bound {
    dataset: String,
    buckets: u64,
    /// In a cluster, the hash tag of each shard (a bucket `b` is in shard `b % shards.len()`).
    shards: Arc<Vec<String>>,
}

fn unavailable(e: redis::RedisError) -> StoreError {
    let text = e.to_string();
    if text.contains("OPTOUTDATASET") {
        StoreError::NotInitialised(
            "the Redis store's dataset marker is missing or changed (reset, flushed or \
             re-initialised); failing closed"
                .into(),
        )
    } else if text.contains("OPTOUTLOCKED") {
        StoreError::Unavailable(
            "an import of this opt-out type is being applied; retry in a few seconds".into(),
        )
    } else {
        StoreError::Unavailable(format!("redis: {text}"))
    }
}

fn not_initialised() -> StoreError {
    StoreError::NotInitialised(
        "the Redis store holds no dataset marker: initialise it with `optout init-store`, or \
         restore its data"
            .into(),
    )
}

fn changed() -> StoreError {
    StoreError::NotInitialised(
        "the Redis store's dataset marker is missing or differs from the one this replica \
         loaded (reset, flushed or re-initialised); failing closed"
            .into(),
    )
}

/// Refuses a Redis that may evict keys without an expiry when it runs out of memory.
///
/// With `allkeys-lru`, `allkeys-lfu` or `allkeys-random`, a full Redis silently deletes opt-out
/// records; a deleted record answers "no opt-out" and the patient's data would be released. The
/// `volatile-*` policies evict only keys with an expiry (none of the opt-out data has one) and
/// `noeviction` refuses writes instead; both fail closed. Read from `INFO memory`, which managed
/// Redis services keep even where they disable `CONFIG`. Checked whenever the dataset is opened
/// (start, and after the store was reset) and every few seconds by the filter follower.
fn check_eviction_policy(info_memory: &str) -> Result<(), StoreError> {
    let policy = info_memory
        .lines()
        .find_map(|l| l.trim().strip_prefix("maxmemory_policy:"))
        .map(str::trim);
    match policy {
        Some(p) if p.starts_with("allkeys-") => Err(StoreError::Unsafe(format!(
            "Redis maxmemory-policy is {p}: a full Redis would evict opt-out records and their \
             patients' data would be released; set maxmemory-policy to noeviction"
        ))),
        Some(_) => Ok(()),
        None => Err(StoreError::Unsafe(
            "Redis INFO memory does not say maxmemory_policy, so evicting opt-out records \
             cannot be ruled out; refusing to serve"
                .into(),
        )),
    }
}

/// The advice every refusal of Redis persistence ends with.
const DURABILITY_ADVICE: &str = "set `appendonly yes` and `appendfsync always` (redis.conf, or \
     CONFIG SET appendonly yes, CONFIG SET appendfsync always, CONFIG REWRITE), or run Redis behind \
     Sentinel or as a Cluster with --redis-replicas-ack 1 or more; on a managed Redis that hides \
     CONFIG but keeps every acknowledged write (see README \"Guarantees\"), pass \
     --redis-assume-durable";

/// Refuses persistence that could lose an acknowledged change when the Redis process crashes.
///
/// `pairs` is the flattened reply of `CONFIG GET append*` (one list per master in a cluster).
/// Only the append-only file with an fsync before every reply keeps each acknowledged write:
/// RDB snapshots lose everything since the last one, `appendfsync everysec` up to a second, and
/// a replica that loads the older data then reads as "no opt-out" for the lost changes.
fn check_persistence(pairs: &[String]) -> Result<(), StoreError> {
    let values = |name: &str| -> Vec<&str> {
        pairs
            .chunks(2)
            .filter(|p| p.first().map(String::as_str) == Some(name))
            .filter_map(|p| p.get(1).map(String::as_str))
            .collect()
    };
    let (aof, fsync) = (values("appendonly"), values("appendfsync"));
    let durable = !aof.is_empty()
        && !fsync.is_empty()
        && aof.iter().all(|v| v.eq_ignore_ascii_case("yes"))
        && fsync.iter().all(|v| v.eq_ignore_ascii_case("always"));
    if durable {
        return Ok(());
    }
    Err(StoreError::Unsafe(format!(
        "Redis could lose an acknowledged opt-out change in a crash (appendonly {}, appendfsync \
         {}), and a replica would then release that patient: {DURABILITY_ADVICE}",
        if aof.is_empty() {
            "unknown".into()
        } else {
            aof.join("/")
        },
        if fsync.is_empty() {
            "unknown".into()
        } else {
            fsync.join("/")
        },
    )))
}

impl RedisStore {
    /// Whether an acknowledged change survives the crash of the Redis process that took it:
    /// replicas confirm every change (Sentinel, Cluster), or the operator vouches for it, or the
    /// append-only file is fsynced before every reply.
    async fn persistence_ok(&self) -> Result<(), StoreError> {
        if self.inner.replicas_ack > 0 || self.inner.assume_durable {
            return Ok(());
        }
        let reply: Value = redis::cmd("CONFIG")
            .arg("GET")
            .arg("append*")
            .query_async(&mut self.conn())
            .await
            .map_err(|e| {
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    // Not an answer about persistence: the store is unreachable for now.
                    return unavailable(e);
                }
                StoreError::Unsafe(format!(
                    "cannot read Redis persistence settings (CONFIG GET: {e}), so losing \
                     acknowledged opt-out changes in a crash cannot be ruled out: \
                     {DURABILITY_ADVICE}"
                ))
            })?;
        check_persistence(&texts_of(reply))
    }

    /// Connects lazily: an unreachable Redis is not an error here (the replica starts NOT_SERVING
    /// and keeps trying); a malformed URL or sentinel address is.
    pub fn connect(config: &RedisConfig) -> Result<Self, StoreError> {
        let shown = redact_url(&config.url);
        let client = Client::open(config.url.as_str())
            .map_err(|e| StoreError::Unavailable(format!("--redis-url {shown}: {e}")))?;
        let timeouts = [
            config.response_timeout,
            WRITE_TIMEOUT,
            config.response_timeout + FEED_BLOCK,
        ];
        let [conn, write, feed] = match (&config.sentinel, &config.cluster) {
            (_, Some(nodes)) => cluster_conns(config, nodes, &shown, timeouts)?,
            (Some(s), None) => sentinel_conns(config, s, &shown, timeouts)?,
            (None, None) => direct_conns(config, client, &shown, timeouts)?,
        };
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                write,
                feed,
                replicas_ack: config.replicas_ack,
                assume_durable: config.assume_durable,
                replicas_ack_timeout: config.replicas_ack_timeout,
                prefix: if config.cluster.is_some() {
                    format!("{{{}}}", config.prefix)
                } else {
                    config.prefix.clone()
                },
                data_prefix: config.prefix.clone(),
                init_shards: config.shards.clamp(1, 16384),
                masters: parking_lot::Mutex::new(None),
                log_len: config.log_len.max(1),
                audit_len: config.audit_len.max(1),
                bound: RwLock::new(None),
                scripts: Scripts::new(),
            }),
        })
    }

    /// Runs a script that changes opt-outs and, when replicas must confirm it, `WAIT` in the same
    /// round trip on the same connection, so the confirmation is for this change. A change that
    /// too few replicas confirmed in time is applied on the master but is not acknowledged: a
    /// failover now could lose it, so the caller gets an error and retries (changes are
    /// idempotent).
    async fn invoke_durable<T: FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
        conn: &mut Conn,
    ) -> Result<T, StoreError> {
        let want = self.inner.replicas_ack;
        if want == 0 {
            return inv.invoke_async(conn).await.map_err(unavailable);
        }
        if self.is_cluster() {
            let value = inv.invoke_async(conn).await.map_err(unavailable)?;
            self.confirm_everywhere().await?;
            return Ok(value);
        }
        let mut pipe = redis::pipe();
        pipe.invoke_script(inv)
            .cmd("WAIT")
            .arg(want)
            .arg(self.ack_timeout_ms());
        let reply: Result<(T, i64), _> = match pipe.query_async(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                inv.load_async(conn).await.map_err(unavailable)?;
                pipe.query_async(conn).await
            }
            other => other,
        };
        let (value, acked) = reply.map_err(unavailable)?;
        self.enough_acks(acked)?;
        Ok(value)
    }

    fn ack_timeout_ms(&self) -> u64 {
        u64::try_from(self.inner.replicas_ack_timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// `acked` replicas answered `WAIT`: an error unless that is enough to acknowledge.
    fn enough_acks(&self, acked: i64) -> Result<(), StoreError> {
        let want = self.inner.replicas_ack;
        if acked >= i64::from(want) {
            return Ok(());
        }
        Err(StoreError::Unconfirmed(format!(
            "the change was applied on the Redis master(s) but only {acked} of {want} replicas \
             confirmed it within {} ms, so a failover now could lose it; it is not acknowledged: \
             retry (changes are idempotent)",
            self.ack_timeout_ms()
        )))
    }

    /// Drops every connection to the node Sentinel named, so the next call asks the sentinels.
    fn reset_sentinel_conns(&self) {
        for c in [&self.inner.conn, &self.inner.write, &self.inner.feed] {
            if let Conn::Sentinel(s) = c {
                s.reset();
            }
        }
    }

    /// A Redis Cluster: data keys are sharded and multi-key steps are ordered, not atomic.
    fn is_cluster(&self) -> bool {
        matches!(self.inner.conn, Conn::Cluster(_))
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.inner.prefix)
    }

    fn bound(&self) -> Result<Bound, StoreError> {
        self.inner.bound.read().clone().ok_or_else(not_initialised)
    }

    fn conn(&self) -> Conn {
        self.inner.conn.clone()
    }

    /// The hash of opt-outs of type `t`, generation `g`, bucket `b`.
    fn data_key(&self, bound: &Bound, t: &str, g: impl std::fmt::Display, b: u64) -> String {
        if bound.shards.is_empty() {
            format!("{}d:{t}:{g}:{b}", self.inner.prefix)
        } else {
            let tag = &bound.shards[(b % bound.shards.len() as u64) as usize];
            format!("{}{{{tag}}}d:{t}:{g}:{b}", self.inner.data_prefix)
        }
    }

    /// A cluster shard's copy of the dataset marker, read with its data in one round trip.
    fn shard_marker(&self, tag: &str) -> String {
        format!("{}{{{tag}}}marker", self.inner.data_prefix)
    }

    /// Buckets in groups that share a hash slot (a cluster shard), at most 256 to a group.
    fn bucket_groups(&self, bound: &Bound) -> Vec<Vec<u64>> {
        let step = (bound.shards.len() as u64).max(1);
        let mut groups = Vec::new();
        for first in 0..step.min(bound.buckets) {
            let all: Vec<u64> = (first..bound.buckets).step_by(step as usize).collect();
            groups.extend(all.chunks(256).map(<[u64]>::to_vec));
        }
        groups
    }

    /// In a cluster: waits until every master's replicas confirmed this client's writes to it.
    /// `WAIT` without a key goes to every master and answers the smallest count.
    async fn confirm_everywhere(&self) -> Result<(), StoreError> {
        let want = self.inner.replicas_ack;
        if want == 0 {
            return Ok(());
        }
        let acked: i64 = redis::cmd("WAIT")
            .arg(want)
            .arg(self.ack_timeout_ms())
            .query_async(&mut self.write_conn())
            .await
            .map_err(unavailable)?;
        self.enough_acks(acked)
    }

    fn write_conn(&self) -> Conn {
        self.inner.write.clone()
    }

    /// Unlinks every bucket of a generation nobody reads any more, in the background.
    fn unlink_generation(&self, t: &'static str, generation: u64, bound: &Bound) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let keys: Vec<String> = (0..bound.buckets)
            .map(|b| self.data_key(bound, t, generation, b))
            .collect();
        let mut conn = self.write_conn();
        handle.spawn(async move {
            for chunk in keys.chunks(1024) {
                let r: Result<(), _> = redis::cmd("UNLINK").arg(chunk).query_async(&mut conn).await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "could not unlink an unused opt-out generation");
                    return;
                }
            }
        });
    }

    /// Reads the eviction policy (see [`check_eviction_policy`]).
    async fn eviction_policy_ok(&self) -> Result<(), StoreError> {
        // In a cluster INFO goes to every master and the answer holds one text per master.
        let memory: Value = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let texts = texts_of(memory);
        if texts.is_empty() {
            return check_eviction_policy("");
        }
        texts.iter().try_for_each(|t| check_eviction_policy(t))
    }

    /// Initialises an empty store: writes the dataset marker. Refuses a store that has one.
    pub async fn init(&self, buckets: u64) -> Result<String, StoreError> {
        self.eviction_policy_ok().await?;
        self.persistence_ok().await?;
        let id = super::random_hex::<16>();
        let already = || {
            StoreError::ImportRefused(format!(
                "the Redis store under prefix {:?} is already initialised; nothing was changed",
                self.inner.data_prefix
            ))
        };
        let tags = if self.is_cluster() {
            shard_tags(self.inner.init_shards)
        } else {
            Vec::new()
        };
        if self.is_cluster() {
            // Each shard's marker first, the dataset marker (what makes the store usable) last.
            let exists: bool = self
                .write_conn()
                .exists(self.key("marker"))
                .await
                .map_err(unavailable)?;
            if exists {
                return Err(already());
            }
            self.write_shard_markers(&tags, &id).await?;
        }
        let mut inv = self.inner.scripts.init.prepare_invoke();
        inv.key(self.key("marker"))
            .arg(&self.inner.prefix)
            .arg(&id)
            .arg(buckets.max(1))
            .arg(now_ms())
            .arg(tags.join(","));
        let created: i64 = self.invoke_durable(&inv, &mut self.write_conn()).await?;
        if created == 0 {
            return Err(already());
        }
        if self.is_cluster() {
            // Idempotent; repairs a shard marker a concurrent, losing init overwrote.
            self.write_shard_markers(&tags, &id).await?;
            self.confirm_everywhere().await?;
        }
        Ok(id)
    }

    async fn write_shard_markers(&self, tags: &[String], id: &str) -> Result<(), StoreError> {
        let writes = tags.iter().map(|tag| {
            let mut conn = self.write_conn();
            let key = self.shard_marker(tag);
            async move { conn.set::<_, _, ()>(key, id).await }
        });
        for r in futures::future::join_all(writes).await {
            r.map_err(unavailable)?;
        }
        Ok(())
    }

    /// `(bucket, number)` argument pairs for a list of numbers.
    fn pairs(&self, numbers: &[NhsNumber], buckets: u64) -> Vec<String> {
        let mut args = Vec::with_capacity(numbers.len() * 2);
        for n in numbers {
            args.push((n.as_u64() % buckets).to_string());
            args.push(n.as_u64().to_string());
        }
        args
    }

    /// Interns a source and returns its id (for staged import records).
    async fn source_id(&self, source: &str) -> Result<i64, StoreError> {
        self.inner
            .scripts
            .intern
            .prepare_invoke()
            .key(self.key("marker"))
            .arg(&self.inner.prefix)
            .arg(source)
            .invoke_async(&mut self.write_conn())
            .await
            .map_err(unavailable)
    }
}

/// What `--redis-url` says of the Redis nodes behind Sentinel or in a cluster (password,
/// database, TLS); its host is not used there.
fn node_settings(config: &RedisConfig, shown: &str) -> Result<redis::ConnectionInfo, StoreError> {
    config
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| StoreError::Unavailable(format!("--redis-url {shown}: {e}")))
}

/// The check, write and feed connections to one Redis node.
fn direct_conns(
    config: &RedisConfig,
    client: Client,
    shown: &str,
    timeouts: [Duration; 3],
) -> Result<[Conn; 3], StoreError> {
    let base = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let mut conns = Vec::with_capacity(3);
    for t in timeouts {
        conns.push(Conn::Direct(
            ConnectionManager::new_lazy_with_config(
                client.clone(),
                base.clone().set_response_timeout(Some(t)),
            )
            .map_err(|e| StoreError::Unavailable(format!("--redis-url {shown}: {e}")))?,
        ));
    }
    conns
        .try_into()
        .map_err(|_| StoreError::Unavailable("three connections".into()))
}

/// The check, write and feed connections to the master Redis Sentinel names.
fn sentinel_conns(
    config: &RedisConfig,
    s: &SentinelConfig,
    shown: &str,
    timeouts: [Duration; 3],
) -> Result<[Conn; 3], StoreError> {
    let info = node_settings(config, shown)?;
    let mut node = SentinelNodeConnectionInfo::default()
        .set_redis_connection_info(info.redis_settings().clone());
    if let redis::ConnectionAddr::TcpTls { insecure, .. } = info.addr() {
        node = node.set_tls_mode(if *insecure {
            redis::TlsMode::Insecure
        } else {
            redis::TlsMode::Secure
        });
    }
    let db = info.redis_settings().db();
    let sentinels = Sentinels::new(&s.addrs, &s.master_name, node).map_err(|e| {
        StoreError::Unavailable(format!("--redis-sentinel {}: {e}", redact_nodes(&s.addrs)))
    })?;
    Ok(timeouts.map(|t| {
        Conn::Sentinel(SentinelConn::new(
            sentinels.clone(),
            redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(Some(t)),
            config.connect_timeout * 3,
            db,
        ))
    }))
}

/// The check, write and feed connections to a Redis Cluster.
fn cluster_conns(
    config: &RedisConfig,
    nodes: &[String],
    shown: &str,
    timeouts: [Duration; 3],
) -> Result<[Conn; 3], StoreError> {
    let info = node_settings(config, shown)?;
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| {
            if n.contains("://") {
                n.clone()
            } else if tls {
                format!("rediss://{n}")
            } else {
                format!("redis://{n}")
            }
        })
        .collect();
    let mut conns = Vec::with_capacity(3);
    for t in timeouts {
        let mut builder = redis::cluster::ClusterClient::builder(urls.clone())
            .connection_timeout(config.connect_timeout)
            .response_timeout(t)
            .retries(2)
            .max_retry_wait(200);
        if let Some(user) = info.redis_settings().username() {
            builder = builder.username(user);
        }
        if let Some(password) = info.redis_settings().password() {
            builder = builder.password(password);
        }
        let client = builder.build().map_err(|e| {
            StoreError::Unavailable(format!("--redis-cluster {}: {e}", redact_nodes(nodes)))
        })?;
        conns.push(Conn::Cluster(ClusterConn::new(client)));
    }
    conns
        .try_into()
        .map_err(|_| StoreError::Unavailable("three connections".into()))
}

/// How long one blocking read of the change log waits for news.
const FEED_BLOCK: Duration = Duration::from_millis(250);
/// How long an admin write, import step, scan chunk or snapshot may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

fn version_of(v: &Value) -> Result<Version, StoreError> {
    match v {
        Value::Nil => Ok(Version::ZERO),
        Value::BulkString(b) => {
            let s = String::from_utf8_lossy(b);
            Version::parse(&s).map_err(|e| StoreError::Corrupt(e.to_string()))
        }
        Value::SimpleString(s) => Version::parse(s).map_err(|e| StoreError::Corrupt(e.to_string())),
        other => Err(StoreError::Corrupt(format!(
            "expected a version, got {other:?}"
        ))),
    }
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Every text in a reply, however nested (a cluster's per-master answers arrive as a map).
fn texts_of(v: Value) -> Vec<String> {
    match v {
        Value::Array(a) | Value::Set(a) => a.into_iter().flat_map(texts_of).collect(),
        Value::Map(m) => m.into_iter().flat_map(|(_, v)| texts_of(v)).collect(),
        Value::VerbatimString { text, .. } => vec![text],
        other => text_of(&other).into_iter().collect(),
    }
}

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text_of(other).and_then(|s| s.parse().ok()),
    }
}

fn array(v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(StoreError::Corrupt(format!(
            "expected an array, got {other:?}"
        ))),
    }
}

/// Numbers as a change-log entry holds them (read back by [`numbers_csv`]).
fn csv_of(numbers: &[NhsNumber]) -> String {
    let mut csv = String::with_capacity(numbers.len() * 11);
    for (i, n) in numbers.iter().enumerate() {
        if i > 0 {
            csv.push(',');
        }
        csv.push_str(&n.as_u64().to_string());
    }
    csv
}

/// An NHS number as stored in a bucket's field.
fn stored_number(v: &Value) -> Result<NhsNumber, StoreError> {
    int_of(v)
        .and_then(|i| u64::try_from(i).ok())
        .and_then(|i| NhsNumber::from_u64(i).ok())
        .ok_or_else(|| StoreError::Corrupt("stored field is not an NHS number".into()))
}

fn numbers_csv(s: &str) -> Result<Vec<NhsNumber>, StoreError> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|p| {
            p.parse::<u64>()
                .ok()
                .and_then(|v| NhsNumber::from_u64(v).ok())
                .ok_or_else(|| {
                    StoreError::Corrupt("change-log entry holds an invalid number".into())
                })
        })
        .collect()
}

fn audit_json(r: &AuditRecord) -> Result<String, StoreError> {
    serde_json::to_string(r).map_err(|e| StoreError::Corrupt(format!("audit record: {e}")))
}

fn type_code(t: OptOutType) -> &'static str {
    match t {
        OptOutType::NationalDataOptOut => "1",
        OptOutType::Type1 => "2",
    }
}

#[async_trait]
impl ConsentStore for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn lookup(&self, numbers: &[NhsNumber]) -> Result<Lookup, StoreError> {
        let bound = self.bound()?;
        if self.is_cluster() {
            return self.lookup_cluster(&bound, numbers).await;
        }
        let mut inv = self.inner.scripts.lookup.prepare_invoke();
        inv.arg(&self.inner.prefix);
        inv.arg(self.pairs(numbers, bound.buckets));
        let reply: Value = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let mut reply = array(reply)?.into_iter();
        let marker = reply.next().as_ref().and_then(text_of).unwrap_or_default();
        if marker != bound.dataset {
            return Err(changed());
        }
        let version = version_of(&reply.next().unwrap_or(Value::Nil))?;
        // Anything but the expected small integer is an error, never "not held".
        let held = reply
            .map(|v| {
                let m = match v {
                    Value::Int(m @ 0..=3) => m,
                    other => {
                        return Err(StoreError::Corrupt(format!(
                            "lookup answered {other:?} for a number"
                        )));
                    }
                };
                let mut s = OptOutSet::EMPTY;
                if m & 1 != 0 {
                    s.insert(OptOutType::NationalDataOptOut);
                }
                if m & 2 != 0 {
                    s.insert(OptOutType::Type1);
                }
                Ok(s)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if held.len() != numbers.len() {
            return Err(StoreError::Corrupt(format!(
                "lookup of {} numbers answered {}",
                numbers.len(),
                held.len()
            )));
        }
        Ok(Lookup { held, version })
    }

    async fn change(
        &self,
        kind: ChangeKind,
        opt_out: OptOutType,
        numbers: &[NhsNumber],
        source: &str,
        audit: &AuditRecord,
    ) -> Result<WriteOutcome, StoreError> {
        let bound = self.bound()?;
        if self.is_cluster() {
            return self
                .change_cluster(&bound, kind, opt_out, numbers, source, audit)
                .await;
        }
        let mut inv = self.inner.scripts.change.prepare_invoke();
        inv.arg(&self.inner.prefix)
            .arg(&bound.dataset)
            .arg(match kind {
                ChangeKind::Add => "a",
                ChangeKind::Remove => "r",
            })
            .arg(type_code(opt_out))
            .arg(now_ms())
            .arg(source)
            .arg(self.inner.log_len)
            .arg(audit_json(audit)?)
            .arg(self.inner.audit_len)
            .arg(self.pairs(numbers, bound.buckets));
        let (id, applied): (String, u64) =
            self.invoke_durable(&inv, &mut self.write_conn()).await?;
        Ok(WriteOutcome {
            version: Version::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            applied,
        })
    }

    async fn begin_import(
        &self,
        mode: ImportMode,
        opt_out: OptOutType,
        source: &str,
    ) -> Result<Box<dyn ImportSession>, StoreError> {
        let bound = self.bound()?;
        let mut conn = self.write_conn();
        let generation: u64 = conn
            .incr(self.key(&format!("gennext:{}", type_code(opt_out))), 1)
            .await
            .map_err(unavailable)?;
        let source_id = self.source_id(source).await?;
        Ok(Box::new(RedisImport {
            store: self.clone(),
            bound,
            mode,
            opt_out,
            generation,
            value: format!("{},{source_id}", now_ms()),
            committed: false,
        }))
    }

    async fn get(&self, number: NhsNumber) -> Result<(Vec<OptOutRecord>, Version), StoreError> {
        let bound = self.bound()?;
        if self.is_cluster() {
            return self.get_cluster(&bound, number).await;
        }
        let reply: Value = self
            .inner
            .scripts
            .get
            .prepare_invoke()
            .arg(&self.inner.prefix)
            .arg(number.as_u64() % bound.buckets)
            .arg(number.as_u64())
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let reply = array(reply)?;
        if reply.first().and_then(text_of).unwrap_or_default() != bound.dataset {
            return Err(changed());
        }
        let version = version_of(reply.get(1).unwrap_or(&Value::Nil))?;
        let mut records = Vec::new();
        for (t, i) in OptOutType::ALL.into_iter().zip([2usize, 4]) {
            let Some(value) = reply.get(i).and_then(text_of).filter(|s| !s.is_empty()) else {
                continue;
            };
            let at = value
                .split(',')
                .next()
                .and_then(|s| s.parse::<i64>().ok())
                .unwrap_or(0);
            records.push(OptOutRecord {
                kind: t,
                recorded_at_ms: at,
                source: reply.get(i + 1).and_then(text_of).unwrap_or_default(),
            });
        }
        Ok((records, version))
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        let bound = self.bound()?;
        let (marker, version, counts): (Option<String>, Value, HashMap<String, i64>) =
            redis::pipe()
                .hget(self.key("marker"), "dataset_id")
                .get(self.key("version"))
                .hgetall(self.key("counts"))
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
        if marker.as_deref() != Some(bound.dataset.as_str()) {
            return Err(changed());
        }
        let count = |k: &str| u64::try_from(counts.get(k).copied().unwrap_or(0)).unwrap_or(0);
        Ok(StoreStatus {
            national: count("1"),
            type1: count("2"),
            patients: count("patients"),
            version: version_of(&version)?,
            dataset_id: bound.dataset,
        })
    }

    async fn changes_after(
        &self,
        after: Version,
        max: usize,
        wait: Duration,
    ) -> Result<Feed, StoreError> {
        let bound = self.bound()?;
        let block = u64::try_from(wait.min(FEED_BLOCK).as_millis()).unwrap_or(250);
        let mut read = redis::cmd("XREAD");
        read.arg("COUNT").arg(max.max(1));
        if block > 0 {
            read.arg("BLOCK").arg(block);
        }
        read.arg("STREAMS")
            .arg(self.key("log"))
            .arg(after.to_string());
        // The marker and the floor are read after the log, in the same round trip: if both still
        // hold once the entries are in hand, nothing between `after` and them was trimmed, and
        // they belong to the dataset this replica loaded.
        let mut pipe = redis::pipe();
        pipe.add_command(read)
            .hget(self.key("marker"), "dataset_id")
            .get(self.key("log_floor"))
            .get(self.key("version"));
        let sentinel = matches!(self.inner.feed, Conn::Sentinel(_));
        if sentinel {
            // Behind Sentinel, a connection may still reach a demoted master (now a replica that
            // lags): what it says of the version is not the store's, so ask who it is.
            pipe.cmd("ROLE");
        }
        let reply: Vec<Value> = pipe
            .query_async(&mut self.inner.feed.clone())
            .await
            .map_err(unavailable)?;
        let mut reply = reply.into_iter();
        let mut next = || reply.next().unwrap_or(Value::Nil);
        let (entries, marker, floor, latest) = (next(), next(), next(), next());
        if sentinel && array(next())?.first().and_then(text_of).as_deref() != Some("master") {
            self.reset_sentinel_conns();
            return Err(StoreError::Unavailable(
                "the Redis node Sentinel named is no longer the master; asking again".into(),
            ));
        }
        if text_of(&marker).as_deref() != Some(bound.dataset.as_str()) {
            return Err(changed());
        }
        let latest = version_of(&latest)?;
        if after > latest {
            // The store is behind what this replica already read: Redis restarted from an older
            // snapshot, lost its last writes, or failed over to a replica that had not received
            // them. Never rebuilt from silently: the follower fails closed.
            return Ok(Feed::Behind { store: latest });
        }
        if after < version_of(&floor)? {
            return Ok(Feed::Trimmed);
        }
        let mut out = Vec::new();
        // XREAD reply: [[stream, [[id, [field, value, ...]], ...]]] (RESP2), or nil on timeout.
        for stream in array(entries)? {
            let mut parts = array(stream)?.into_iter();
            let _name = parts.next();
            for entry in array(parts.next().unwrap_or(Value::Nil))? {
                let mut e = array(entry)?.into_iter();
                let version = version_of(&e.next().unwrap_or(Value::Nil))?;
                let fields = array(e.next().unwrap_or(Value::Nil))?;
                let mut added = Vec::new();
                let mut removed = 0u64;
                for pair in fields.chunks(2) {
                    match (pair.first().and_then(text_of).as_deref(), pair.get(1)) {
                        (Some("a"), Some(v)) => {
                            added = numbers_csv(&text_of(v).unwrap_or_default())?
                        }
                        (Some("r"), Some(v)) => {
                            removed = int_of(v).and_then(|i| u64::try_from(i).ok()).unwrap_or(0)
                        }
                        _ => {}
                    }
                }
                out.push(ChangeEntry {
                    version,
                    added,
                    removed,
                });
            }
        }
        Ok(Feed::Changes(out))
    }

    async fn scan(&self) -> Result<Scan, StoreError> {
        let bound = self.bound()?;
        if self.is_cluster() {
            return self.scan_cluster(&bound).await;
        }
        let (marker, version): (Option<String>, Value) = redis::pipe()
            .hget(self.key("marker"), "dataset_id")
            .get(self.key("version"))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        if marker.as_deref() != Some(bound.dataset.as_str()) {
            return Err(changed());
        }
        // Read before the records: the follower replays the log from here, which adds whatever
        // the scan misses of later changes.
        let version = version_of(&version)?;
        const CHUNK: u64 = 256;
        // No de-duplication: a number in both types is inserted twice, which a bloom filter
        // absorbs, and a set of 5 million would cost far more memory than the duplicates.
        let mut numbers = Vec::new();
        let mut from = 0;
        while from < bound.buckets {
            let to = (from + CHUNK).min(bound.buckets) - 1;
            // Each chunk resolves the current generations itself, atomically, so an import swapped
            // in mid-scan is read from whichever generation is current for that chunk (its new
            // numbers are in the log entry the follower replays).
            let reply: Value = self
                .inner
                .scripts
                .scan
                .prepare_invoke()
                .arg(&self.inner.prefix)
                .arg(&bound.dataset)
                .arg(from)
                .arg(to)
                .invoke_async(&mut self.write_conn())
                .await
                .map_err(unavailable)?;
            for v in array(reply)? {
                numbers.push(stored_number(&v)?);
            }
            from = to + 1;
        }
        Ok(Scan { numbers, version })
    }

    async fn open_dataset(&self) -> Result<String, StoreError> {
        type Marker = (Option<String>, Option<u64>, Option<String>, String);
        let (id, buckets, shards, memory): Marker = redis::pipe()
            .hget(self.key("marker"), "dataset_id")
            .hget(self.key("marker"), "buckets")
            .hget(self.key("marker"), "shards")
            .cmd("INFO")
            .arg("memory")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let mut safe = check_eviction_policy(&memory);
        if safe.is_ok() && self.is_cluster() {
            // The pipeline's INFO went to the metadata's master only; every master holds data.
            safe = self.eviction_policy_ok().await;
        }
        if safe.is_ok() {
            safe = self.persistence_ok().await;
        }
        if let Err(e) = safe {
            *self.inner.bound.write() = None;
            return Err(e);
        }
        let (Some(dataset), Some(buckets)) = (id, buckets) else {
            *self.inner.bound.write() = None;
            return Err(not_initialised());
        };
        let shards: Vec<String> = shards
            .filter(|s| !s.is_empty())
            .map(|s| s.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        if self.is_cluster() && shards.is_empty() {
            *self.inner.bound.write() = None;
            return Err(StoreError::NotInitialised(
                "the store was initialised without cluster shards; initialise it with \
                 `optout init-store --redis-cluster ...`"
                    .into(),
            ));
        }
        *self.inner.masters.lock() = None;
        *self.inner.bound.write() = Some(Bound {
            dataset: dataset.clone(),
            buckets: buckets.max(1),
            shards: Arc::new(shards),
        });
        Ok(dataset)
    }

    async fn check_safe(&self) -> Result<(), StoreError> {
        let safe = match self.eviction_policy_ok().await {
            Ok(()) => self.persistence_ok().await,
            Err(e) => Err(e),
        };
        safe.inspect_err(|e| {
            if matches!(e, StoreError::Unsafe(_)) {
                *self.inner.bound.write() = None;
            }
        })?;
        if let Conn::Sentinel(_) = &self.inner.conn {
            // Sentinel closes clients' connections when it demotes a master, but do not rely on
            // it: a connection to a node that is no longer the master is dropped here, so no read
            // is served from a replica that may lag.
            let role: Value = redis::cmd("ROLE")
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            let is_master = array(role)?.first().and_then(text_of).as_deref() == Some("master");
            if !is_master {
                self.reset_sentinel_conns();
                return Err(StoreError::Unavailable(
                    "the Redis node Sentinel named is no longer the master; asking again".into(),
                ));
            }
        }
        Ok(())
    }

    async fn load_snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let bound = self.bound()?;
        let bytes: Option<Vec<u8>> = self
            .conn()
            .get(self.key("snapshot"))
            .await
            .map_err(unavailable)?;
        Ok(bytes.and_then(|b| {
            let id = bound.dataset.as_bytes();
            (b.len() > id.len() && &b[..id.len()] == id).then(|| b[id.len()..].to_vec())
        }))
    }

    async fn publish_snapshot(&self, version: Version, bytes: &[u8]) -> Result<(), StoreError> {
        let bound = self.bound()?;
        let mut value = Vec::with_capacity(bound.dataset.len() + bytes.len());
        value.extend_from_slice(bound.dataset.as_bytes());
        value.extend_from_slice(bytes);
        let _: i64 = self
            .inner
            .scripts
            .snapshot
            .prepare_invoke()
            .key(self.key("marker"))
            .arg(&self.inner.prefix)
            .arg(&bound.dataset)
            .arg(version.ms)
            .arg(version.seq)
            .arg(value)
            .invoke_async(&mut self.write_conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn shares_snapshots(&self) -> bool {
        true
    }

    async fn recover(&self) -> Result<u64, StoreError> {
        if self.is_cluster() {
            // Older than any change still running normally takes, with room to spare; finishing
            // one that is still running is harmless anyway (every step is idempotent).
            self.recover_intents(2_000).await
        } else {
            Ok(0)
        }
    }

    async fn regression_ack(&self) -> Result<Option<String>, StoreError> {
        self.conn()
            .get(self.key("regression_ack"))
            .await
            .map_err(unavailable)
    }

    async fn acknowledge_regression(&self, audit: &AuditRecord) -> Result<String, StoreError> {
        let bound = self.bound()?;
        let id = super::random_hex::<16>();
        let mut inv = self.inner.scripts.acknowledge.prepare_invoke();
        inv.key(self.key("marker"))
            .arg(&self.inner.prefix)
            .arg(&bound.dataset)
            .arg(&id)
            .arg(audit_json(audit)?)
            .arg(self.inner.audit_len);
        self.invoke_durable(&inv, &mut self.write_conn()).await
    }

    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let bound = self.bound()?;
        let mut pipe = redis::pipe();
        // MULTI/EXEC: the batch is written whole or not at all, and only while the marker holds.
        pipe.atomic();
        pipe.hget(self.key("marker"), "dataset_id");
        for r in records {
            pipe.cmd("XADD")
                .arg(self.key("audit"))
                .arg("MAXLEN")
                .arg("~")
                .arg(self.inner.audit_len)
                .arg("*")
                .arg("r")
                .arg(audit_json(r)?)
                .arg("v")
                .arg(&r.version)
                .ignore();
        }
        let (marker,): (Option<String>,) = pipe
            .query_async(&mut self.write_conn())
            .await
            .map_err(unavailable)?;
        if marker.as_deref() != Some(bound.dataset.as_str()) {
            return Err(changed());
        }
        Ok(())
    }

    async fn read_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        self.bound()?;
        let mut out = Vec::new();
        let mut start = format!("{}-0", query.from_ms.max(0));
        let end = if query.to_ms <= 0 {
            "+".to_string()
        } else {
            format!("{}-{}", query.to_ms, u64::MAX)
        };
        loop {
            let page: Value = redis::cmd("XRANGE")
                .arg(self.key("audit"))
                .arg(&start)
                .arg(&end)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.write_conn())
                .await
                .map_err(unavailable)?;
            let entries = array(page)?;
            let n = entries.len();
            let mut last = None;
            for entry in entries {
                let mut e = array(entry)?.into_iter();
                let id = e.next().as_ref().and_then(text_of).unwrap_or_default();
                let fields = array(e.next().unwrap_or(Value::Nil))?;
                let mut record: Option<AuditRecord> = None;
                let mut version = String::new();
                let mut applied: Option<u64> = None;
                for pair in fields.chunks(2) {
                    match (
                        pair.first().and_then(text_of).as_deref(),
                        pair.get(1).and_then(text_of),
                    ) {
                        (Some("r"), Some(json)) => {
                            record = Some(serde_json::from_str(&json).map_err(|e| {
                                StoreError::Corrupt(format!("audit record {id}: {e}"))
                            })?)
                        }
                        (Some("v"), Some(v)) => version = v,
                        (Some("n"), Some(n)) => applied = n.parse().ok(),
                        _ => {}
                    }
                }
                if let Some(mut r) = record {
                    if r.version.is_empty() {
                        r.version = version;
                    }
                    // A change's record is written before the store knows what it changed.
                    if r.applied == 0 && r.action != "check" {
                        r.applied = applied.unwrap_or(0);
                    }
                    if query.matches(&r) {
                        out.push(r);
                        if out.len() >= query.limit.max(1) {
                            return Ok(out);
                        }
                    }
                }
                last = Some(id);
            }
            match last {
                Some(id) if n == 1000 => start = format!("({id}"),
                _ => return Ok(out),
            }
        }
    }
}

mod cluster;

/// An import staged into a new generation of its type.
struct RedisImport {
    store: RedisStore,
    bound: Bound,
    mode: ImportMode,
    opt_out: OptOutType,
    generation: u64,
    /// The record value of every staged number: `recorded_at_ms,source_id`.
    value: String,
    committed: bool,
}

impl RedisImport {
    fn bucket_key(&self, generation: &str, b: u64) -> String {
        self.store
            .data_key(&self.bound, type_code(self.opt_out), generation, b)
    }
}

#[async_trait]
impl ImportSession for RedisImport {
    async fn stage(&mut self, numbers: &[NhsNumber]) -> Result<(), StoreError> {
        let g = self.generation.to_string();
        // One pipeline per shard (one in all without a cluster), sent together.
        let shards = self.bound.shards.len().max(1) as u64;
        let mut pipes: HashMap<u64, redis::Pipeline> = HashMap::new();
        for n in numbers {
            let b = n.as_u64() % self.bound.buckets;
            pipes
                .entry(b % shards)
                .or_insert_with(redis::pipe)
                .hset(self.bucket_key(&g, b), n.as_u64(), &self.value)
                .ignore();
        }
        let sends = pipes.into_values().map(|pipe| {
            let mut conn = self.store.write_conn();
            async move { pipe.query_async::<()>(&mut conn).await }
        });
        for r in futures::future::join_all(sends).await {
            r.map_err(unavailable)?;
        }
        Ok(())
    }

    /// Under the type's lock (admin changes of that type wait), compares the staged generation
    /// with the current one bucket by bucket, carries over the records that stay (so they keep
    /// their original date and source; for MERGE, every current record stays), then one script
    /// moves the generation pointer, the counts and the change log together.
    async fn commit(
        mut self: Box<Self>,
        audit: AuditRecord,
        key: &AuditKey,
    ) -> Result<ImportOutcome, StoreError> {
        let store = self.store.clone();
        let mut conn = store.write_conn();
        let t = type_code(self.opt_out);
        let other = match self.opt_out {
            OptOutType::NationalDataOptOut => "2",
            OptOutType::Type1 => "1",
        };
        let token = super::random_hex::<8>();
        let lock = store.key(&format!("lock:{t}"));
        let locked: Option<String> = redis::cmd("SET")
            .arg(&lock)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(600_000)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if locked.is_none() {
            return Err(StoreError::Unavailable(
                "another import of this opt-out type is being applied; retry".into(),
            ));
        }
        let result = self
            .diff_and_swap(&mut conn, t, other, &token, audit, key)
            .await;
        if result.is_err() {
            let _: Result<i64, _> = store
                .inner
                .scripts
                .unlock
                .prepare_invoke()
                .key(&lock)
                .arg(&lock)
                .arg(&token)
                .invoke_async(&mut conn)
                .await;
        }
        if matches!(result, Err(StoreError::Unconfirmed(_))) {
            // The swap is applied: the staged generation is the current one now and must not be
            // unlinked. The old one is kept too (a failover that loses the swap needs it).
            self.committed = true;
        }
        let (outcome, old_generation) = result?;
        self.committed = true;
        // The old generation is unreachable now.
        store.unlink_generation(t, old_generation, &self.bound);
        Ok(outcome)
    }
}

impl RedisImport {
    async fn diff_and_swap(
        &self,
        conn: &mut Conn,
        t: &str,
        other: &str,
        token: &str,
        mut audit: AuditRecord,
        key: &AuditKey,
    ) -> Result<(ImportOutcome, u64), StoreError> {
        let store = &self.store;
        // In a cluster a change runs in steps: an import waits until none of its type is under
        // way (none can start while the lock is held), so none lands in the replaced generation.
        let (current, other_gen, in_flight): (Option<u64>, Option<u64>, Option<i64>) =
            redis::pipe()
                .get(store.key(&format!("gen:{t}")))
                .get(store.key(&format!("gen:{other}")))
                .hget(store.key("intents_of"), t)
                .query_async(conn)
                .await
                .map_err(unavailable)?;
        if in_flight.unwrap_or(0) > 0 {
            return Err(StoreError::Unavailable(
                "a change of this opt-out type is under way (or being finished after a crash); \
                 retry the import in a few seconds"
                    .into(),
            ));
        }
        let (current, other_gen) = (
            current.unwrap_or(0).to_string(),
            other_gen.unwrap_or(0).to_string(),
        );
        let staged_gen = self.generation.to_string();
        let mut added: Vec<NhsNumber> = Vec::new();
        let mut removed = 0u64;
        let mut removed_numbers: Vec<NhsNumber> = Vec::new();
        let mut total = 0u64;
        let mut patients: i64 = 0;
        // Bucket groups share a hash slot in a cluster, so each group is one pipeline.
        for group in store.bucket_groups(&self.bound) {
            let mut read = redis::pipe();
            for &b in &group {
                read.hgetall(self.bucket_key(&current, b))
                    .hkeys(self.bucket_key(&staged_gen, b))
                    .hkeys(store.data_key(&self.bound, other, &other_gen, b));
            }
            let replies: Vec<Value> = read.query_async(conn).await.map_err(unavailable)?;
            let mut carry = redis::pipe();
            let mut carrying = false;
            for (i, &b) in group.iter().enumerate() {
                let old = pairs_map(replies.get(i * 3).cloned().unwrap_or(Value::Nil))?;
                let new: HashSet<String> =
                    array(replies.get(i * 3 + 1).cloned().unwrap_or(Value::Nil))?
                        .iter()
                        .filter_map(text_of)
                        .collect();
                let in_other: HashSet<String> =
                    array(replies.get(i * 3 + 2).cloned().unwrap_or(Value::Nil))?
                        .iter()
                        .filter_map(text_of)
                        .collect();
                for n in &new {
                    if !old.contains_key(n) {
                        if let Some(v) = n.parse().ok().and_then(|v| NhsNumber::from_u64(v).ok()) {
                            added.push(v);
                        }
                        if !in_other.contains(n) {
                            patients += 1;
                        }
                    }
                }
                let key = self.bucket_key(&staged_gen, b);
                for (n, v) in &old {
                    let stays = self.mode == ImportMode::Merge || new.contains(n);
                    if stays {
                        carry.hset(&key, n, v).ignore();
                        carrying = true;
                    } else {
                        removed += 1;
                        if let Some(n) = n.parse().ok().and_then(|v| NhsNumber::from_u64(v).ok()) {
                            removed_numbers.push(n);
                        }
                        if !in_other.contains(n) {
                            patients -= 1;
                        }
                    }
                }
                total += u64::try_from(new.len()).unwrap_or(0);
                if self.mode == ImportMode::Merge {
                    total += u64::try_from(old.keys().filter(|n| !new.contains(*n)).count())
                        .unwrap_or(0);
                }
            }
            if carrying {
                let _: () = carry.query_async(conn).await.map_err(unavailable)?;
            }
        }
        if self.mode == ImportMode::Replace && total == 0 {
            return Err(StoreError::ImportRefused(format!(
                "a REPLACE import with no valid numbers would remove every {} opt-out; use \
                 RemoveOptOuts to remove opt-outs explicitly",
                self.opt_out.name()
            )));
        }
        audit.applied = added.len() as u64 + removed;
        audit.digests = key.digests(added.iter().chain(&removed_numbers).copied());
        let added_csv = csv_of(&added);
        drop(removed_numbers);
        let mut inv = store.inner.scripts.swap.prepare_invoke();
        inv.key(store.key("marker"))
            .arg(&store.inner.prefix)
            .arg(&self.bound.dataset)
            .arg(t)
            .arg(token)
            .arg(&staged_gen)
            .arg(added_csv)
            .arg(removed)
            .arg(total)
            .arg(patients)
            .arg(store.inner.log_len)
            .arg(audit_json(&audit)?)
            .arg(store.inner.audit_len)
            .arg(audit.applied);
        let reply: (String, u64) = store.invoke_durable(&inv, conn).await?;
        let version = Version::parse(&reply.0).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok((
            ImportOutcome {
                added: added.len() as u64,
                removed,
                version,
            },
            reply.1,
        ))
    }
}

fn pairs_map(v: Value) -> Result<HashMap<String, String>, StoreError> {
    match v {
        Value::Map(m) => Ok(m
            .iter()
            .filter_map(|(k, v)| Some((text_of(k)?, text_of(v)?)))
            .collect()),
        other => {
            let a = array(other)?;
            Ok(a.chunks(2)
                .filter_map(|p| Some((text_of(p.first()?)?, text_of(p.get(1)?)?)))
                .collect())
        }
    }
}

impl Drop for RedisImport {
    /// An import that was not committed leaves a generation nobody reads: unlink it. If this
    /// process dies first, its keys stay until removed by hand (they are never read).
    fn drop(&mut self) {
        if !self.committed {
            self.store
                .unlink_generation(type_code(self.opt_out), self.generation, &self.bound);
        }
    }
}

/// The Lua scripts. Each runs atomically in Redis; `redis::Script` sends EVALSHA and falls back to
/// EVAL once per connection, so a call is one round trip.
struct Scripts {
    init: Script,
    intern: Script,
    lookup: Script,
    get: Script,
    change: Script,
    swap: Script,
    unlock: Script,
    scan: Script,
    snapshot: Script,
    acknowledge: Script,
}

/// Lua helpers shared by the scripts that change opt-outs.
const TRIM: &str = r#"
-- An error reply unless the store holds dataset `id` and no import of type `t` holds its lock.
local function refuse(p, id, t)
  if redis.call('HGET', p..'marker', 'dataset_id') ~= id then
    return redis.error_reply('OPTOUTDATASET marker missing or changed')
  end
  if redis.call('EXISTS', p..'lock:'..t) == 1 then
    return redis.error_reply('OPTOUTLOCKED an import of this type is being applied')
  end
end
-- The small id of a source, interned on first use.
local function intern(p, source)
  local sid = redis.call('HGET', p..'srcid', source)
  if sid then return sid end
  sid = redis.call('INCR', p..'srcnext')
  redis.call('HSET', p..'srcid', source, sid)
  redis.call('HSET', p..'src', sid, source)
  return sid
end
local function trim(p, maxlen)
  local len = redis.call('XLEN', p..'log')
  if len <= maxlen then return end
  local old = redis.call('XRANGE', p..'log', '-', '+', 'COUNT', len - maxlen)
  for _, e in ipairs(old) do redis.call('XDEL', p..'log', e[1]) end
  redis.call('SET', p..'log_floor', old[#old][1])
end
"#;

impl Scripts {
    fn new() -> Self {
        Scripts {
            // ARGV: prefix, dataset id, buckets, now, shard tags (comma-separated, cluster only).
            // Returns 1 if initialised, 0 if it already was.
            init: Script::new(
                r#"
local p = ARGV[1]
if redis.call('EXISTS', p..'marker') == 1 then return 0 end
redis.call('HSET', p..'marker', 'dataset_id', ARGV[2], 'buckets', ARGV[3], 'created_at_ms', ARGV[4])
if ARGV[5] and ARGV[5] ~= '' then redis.call('HSET', p..'marker', 'shards', ARGV[5]) end
redis.call('SET', p..'version', '0-0')
redis.call('SET', p..'log_floor', '0-0')
return 1
"#,
            ),
            // ARGV: prefix, source. Returns the source's id.
            intern: Script::new(&format!(
                r#"{TRIM}
return tonumber(intern(ARGV[1], ARGV[2]))
"#
            )),
            // ARGV: prefix, then bucket/number pairs. Returns marker, version, then per number a
            // bit set of types held (1 national, 2 type 1).
            lookup: Script::new(
                r#"
local p = ARGV[1]
local marker = redis.call('HGET', p..'marker', 'dataset_id')
if not marker then return {''} end
local version = redis.call('GET', p..'version') or '0-0'
local g1 = redis.call('GET', p..'gen:1') or '0'
local g2 = redis.call('GET', p..'gen:2') or '0'
local out = {marker, version}
for i = 2, #ARGV, 2 do
  local b, n = ARGV[i], ARGV[i + 1]
  local m = 0
  if redis.call('HEXISTS', p..'d:1:'..g1..':'..b, n) == 1 then m = m + 1 end
  if redis.call('HEXISTS', p..'d:2:'..g2..':'..b, n) == 1 then m = m + 2 end
  out[#out + 1] = m
end
return out
"#,
            ),
            // ARGV: prefix, bucket, number. Returns marker, version, then value and source name
            // for national, then for type 1 ('' when absent).
            get: Script::new(
                r#"
local p, b, n = ARGV[1], ARGV[2], ARGV[3]
local marker = redis.call('HGET', p..'marker', 'dataset_id') or ''
local out = {marker, redis.call('GET', p..'version') or '0-0'}
for t = 1, 2 do
  local g = redis.call('GET', p..'gen:'..t) or '0'
  local v = redis.call('HGET', p..'d:'..t..':'..g..':'..b, n)
  if v then
    local sid = string.match(v, ',(%d+)$')
    out[#out + 1] = v
    out[#out + 1] = (sid and redis.call('HGET', p..'src', sid)) or ''
  else
    out[#out + 1] = ''
    out[#out + 1] = ''
  end
end
return out
"#,
            ),
            // ARGV: prefix, dataset, 'a'|'r', type, now, source, maxlen, audit json, audit maxlen,
            // bucket/number pairs.
            // Returns {version, applied}.
            change: Script::new(&format!(
                r#"{TRIM}
local p, t = ARGV[1], ARGV[4]
local refused = refuse(p, ARGV[2], t)
if refused then return refused end
local other = (t == '1') and '2' or '1'
local g = redis.call('GET', p..'gen:'..t) or '0'
local go = redis.call('GET', p..'gen:'..other) or '0'
local sid = intern(p, ARGV[6])
local value = ARGV[5]..','..sid
local add = ARGV[3] == 'a'
local applied, patients = 0, 0
local added = {{}}
for i = 10, #ARGV, 2 do
  local b, n = ARGV[i], ARGV[i + 1]
  local key = p..'d:'..t..':'..g..':'..b
  local changed
  if add then changed = redis.call('HSETNX', key, n, value) else changed = redis.call('HDEL', key, n) end
  if changed == 1 then
    applied = applied + 1
    if add then added[#added + 1] = n end
    if redis.call('HEXISTS', p..'d:'..other..':'..go..':'..b, n) == 0 then
      if add then patients = patients + 1 else patients = patients - 1 end
    end
  end
end
redis.call('HINCRBY', p..'counts', t, add and applied or -applied)
redis.call('HINCRBY', p..'counts', 'patients', patients)
local id = redis.call('XADD', p..'log', '*', 'a', table.concat(added, ','), 'r', add and 0 or applied)
redis.call('SET', p..'version', id)
trim(p, tonumber(ARGV[7]))
redis.call('XADD', p..'audit', 'MAXLEN', '~', ARGV[9], '*', 'r', ARGV[8], 'v', id, 'n', applied)
return {{id, applied}}
"#
            )),
            // ARGV: prefix, dataset, type, lock token, new generation, added csv, removed, new
            // count, patients delta, maxlen, audit json, audit maxlen, changes. Returns
            // {version, old generation}.
            swap: Script::new(&format!(
                r#"{TRIM}
local p, t = ARGV[1], ARGV[3]
if redis.call('HGET', p..'marker', 'dataset_id') ~= ARGV[2] then
  return redis.error_reply('OPTOUTDATASET marker missing or changed')
end
if redis.call('GET', p..'lock:'..t) ~= ARGV[4] then
  return redis.error_reply('OPTOUTLOCKED the import lock was lost')
end
local old = redis.call('GET', p..'gen:'..t) or '0'
redis.call('SET', p..'gen:'..t, ARGV[5])
redis.call('HSET', p..'counts', t, ARGV[8])
redis.call('HINCRBY', p..'counts', 'patients', ARGV[9])
local id = redis.call('XADD', p..'log', '*', 'a', ARGV[6], 'r', ARGV[7])
redis.call('SET', p..'version', id)
trim(p, tonumber(ARGV[10]))
redis.call('DEL', p..'lock:'..t)
redis.call('XADD', p..'audit', 'MAXLEN', '~', ARGV[12], '*', 'r', ARGV[11], 'v', id, 'n', ARGV[13])
return {{id, tonumber(old)}}
"#
            )),
            // KEYS-free: ARGV lock key, token. Deletes the lock if still ours.
            unlock: Script::new(
                r#"
if redis.call('GET', ARGV[1]) == ARGV[2] then return redis.call('DEL', ARGV[1]) end
return 0
"#,
            ),
            // ARGV: prefix, dataset, first bucket, last bucket. Returns the numbers of both
            // current generations in those buckets.
            scan: Script::new(
                r#"
local p = ARGV[1]
if redis.call('HGET', p..'marker', 'dataset_id') ~= ARGV[2] then
  return redis.error_reply('OPTOUTDATASET marker missing or changed')
end
local g1 = redis.call('GET', p..'gen:1') or '0'
local g2 = redis.call('GET', p..'gen:2') or '0'
local out = {}
for b = tonumber(ARGV[3]), tonumber(ARGV[4]) do
  for _, n in ipairs(redis.call('HKEYS', p..'d:1:'..g1..':'..b)) do out[#out + 1] = n end
  for _, n in ipairs(redis.call('HKEYS', p..'d:2:'..g2..':'..b)) do out[#out + 1] = n end
end
return out
"#,
            ),
            // KEYS: the marker. ARGV: prefix, dataset, acknowledgement id, audit json, audit
            // maxlen. Records an admin's acknowledgement that the store went back in time, with
            // its audit record. Returns the id.
            acknowledge: Script::new(
                r#"
local p = ARGV[1]
if redis.call('HGET', p..'marker', 'dataset_id') ~= ARGV[2] then
  return redis.error_reply('OPTOUTDATASET marker missing or changed')
end
redis.call('SET', p..'regression_ack', ARGV[3])
local v = redis.call('GET', p..'version') or '0-0'
redis.call('XADD', p..'audit', 'MAXLEN', '~', ARGV[5], '*', 'r', ARGV[4], 'v', v, 'n', 0)
return ARGV[3]
"#,
            ),
            // ARGV: prefix, dataset, version ms, version seq, bytes. Keeps the newest snapshot.
            snapshot: Script::new(
                r#"
local p = ARGV[1]
if redis.call('HGET', p..'marker', 'dataset_id') ~= ARGV[2] then
  return redis.error_reply('OPTOUTDATASET marker missing or changed')
end
local function newer(cur, nms, nseq)
  local ms, seq = string.match(cur, '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq)
  return ms and (ms > nms or (ms == nms and seq >= nseq))
end
-- A snapshot never claims more than the store holds (a store restored from an older copy must
-- not be handed a filter of the newer one).
if not newer(redis.call('GET', p..'version') or '0-0', tonumber(ARGV[3]), tonumber(ARGV[4])) then
  return 0
end
-- Keeps the newest snapshot.
local cur = redis.call('GET', p..'snapshot_version')
if cur and newer(cur, tonumber(ARGV[3]), tonumber(ARGV[4])) then return 0 end
redis.call('SET', p..'snapshot', ARGV[5])
redis.call('SET', p..'snapshot_version', ARGV[3]..'-'..ARGV[4])
return 1
"#,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(
            redact_url("redis://user:secret@cache.example:6380/2"),
            "redis://user:***@cache.example:6380/2"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert!(!redact_url("not a url:secret@host").contains("secret"));
    }
}
