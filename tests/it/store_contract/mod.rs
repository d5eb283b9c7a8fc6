//! The consent store contract: one set of cases every `ConsentStore` must pass, run against the
//! embedded store, one Redis, Redis behind Sentinel and a Redis Cluster (real redis-server
//! processes on loopback). In the spirit of SpiceDB's datastore test suite: a new store, or a
//! change to one, is done when this file passes against it.
//!
//! Each case gets a fresh, initialised store (a new data directory, or a new key prefix on the
//! same Redis). Cases that need to break a store from outside (reset it, roll it back) run where
//! the backend can do that (Redis); the embedded store's file cannot be changed under it.

use std::{collections::BTreeSet, path::Path, sync::Arc, time::Duration};

use crate::common::{Cluster, RedisServer, SentinelSet, national_generation, redis_config};
use async_trait::async_trait;
use optout::{
    core::{
        AuditKey, AuditQuery, AuditRecord, NhsNumber, OptOutSet, OptOutType, Practice, Version,
        coverage::CoverageMode, seals::ChangesError,
    },
    engine::sealer,
    server::ServerConfig,
    store::{
        ChangeEntry, ChangeFeed, ChangeKind, ConsentStore, Feed, ImportMode, LOG_LIST_MAX,
        StoreError, Stored,
        embedded::{EmbeddedConfig, EmbeddedStore},
        redis::{RedisConfig, RedisStore},
    },
};

mod audit;
mod changes;
mod imports;
mod safety;
use audit::*;
use changes::*;
use imports::*;
use safety::*;

const NATIONAL: OptOutType = OptOutType::NationalDataOptOut;
const TYPE1: OptOutType = OptOutType::Type1;

/// A kind of store the contract runs against.
#[async_trait]
trait Backend: Send + Sync {
    /// A fresh, initialised store, bound to its dataset.
    async fn fresh(&self, case: &str) -> Fresh {
        self.fresh_in(case, CoverageMode::List).await
    }
    /// The same, initialised in a national coverage mode.
    async fn fresh_in(&self, case: &str, mode: CoverageMode) -> Fresh;
    /// Resets the store's dataset from outside (as FLUSHALL or a restart without data would);
    /// `false` if this backend cannot.
    async fn wipe(&self, _fresh: &Fresh) -> bool {
        false
    }
    /// Moves the store's version back from outside (as a restore from an older copy would);
    /// `false` if this backend cannot.
    async fn roll_back(&self, _fresh: &Fresh) -> bool {
        false
    }
    /// Deletes one record of the changes trail from outside; `false` if this backend cannot.
    async fn delete_change_record(&self, _fresh: &Fresh, _id: &str) -> bool {
        false
    }
    /// Loses the change logged at `lost` from outside, its records left as they are, with the
    /// version set back to `back` (as a restore from a copy taken between them would); `false` if
    /// this backend cannot.
    async fn lose_change(&self, _fresh: &Fresh, _lost: Version, _back: Version) -> bool {
        false
    }
    /// Takes the national list's import lock from outside, as an import being applied holds it;
    /// `false` if this backend has no such lock.
    async fn hold_import_lock(&self, _fresh: &Fresh) -> bool {
        false
    }
    /// Overwrites the national list's current generation from outside with `value`; `false` if
    /// this backend cannot.
    async fn set_generation(&self, _fresh: &Fresh, _value: &str) -> bool {
        false
    }
    /// Makes every node refuse writes (out of memory) from outside, or accept them again;
    /// `false` if this backend cannot.
    async fn refuse_writes(&self, _refuse: bool) -> bool {
        false
    }
    /// What the store keeps to hand out import generations, read from outside (`None` if this
    /// backend cannot).
    async fn generation_allocator(&self, _fresh: &Fresh) -> Option<Vec<(String, Option<String>)>> {
        None
    }
    /// Sets it back to what [`Backend::generation_allocator`] read, as a failover to a replica
    /// that had not received an import's start does.
    async fn set_generation_allocator(&self, _fresh: &Fresh, _saved: &[(String, Option<String>)]) {}
    /// The generations of the national list that hold data (`None` if this backend cannot tell).
    async fn national_generations(&self, _fresh: &Fresh) -> Option<BTreeSet<String>> {
        None
    }
    /// Deletes what imports staged of the national list (every generation but the current one),
    /// as a failover to a replica that had not received the staged chunks does; `false` if this
    /// backend cannot.
    async fn lose_staged(&self, _fresh: &Fresh) -> bool {
        false
    }
    /// What a publish of a snapshot left behind in the store beside the snapshot itself: keys it
    /// staged and still there, and whether the snapshot expires; `None` if this backend stages
    /// nothing.
    async fn snapshot_leftovers(&self, _fresh: &Fresh) -> Option<(Vec<String>, bool)> {
        None
    }
}

/// A fresh store and what it needs to stay alive.
struct Fresh {
    store: Arc<dyn ConsentStore>,
    /// The Redis key prefix of the metadata (`{P}` in a cluster), for the backends that break it.
    meta_prefix: String,
    _dir: Option<tempfile::TempDir>,
}

struct Embedded;

#[async_trait]
impl Backend for Embedded {
    async fn fresh_in(&self, _case: &str, mode: CoverageMode) -> Fresh {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = EmbeddedConfig {
            data_dir: dir.path().to_path_buf(),
            change_log_len: 1000,
            cache_bytes: optout::store::embedded::DEFAULT_CACHE_BYTES,
        };
        let store = EmbeddedStore::init(&config, mode).expect("init");
        store.open_dataset().await.expect("bind");
        Fresh {
            store: Arc::new(store),
            meta_prefix: String::new(),
            _dir: Some(dir),
        }
    }
}

/// A Redis topology: a prefix per case on one set of servers.
struct OnRedis {
    config: ServerConfig,
    cluster: bool,
    /// How to reach the node (or cluster) holding the metadata, to break it.
    urls: Vec<String>,
    _scratch: tempfile::TempDir,
}

impl OnRedis {
    fn new(config: impl FnOnce(&Path) -> ServerConfig, cluster: bool, urls: Vec<String>) -> Self {
        let scratch = tempfile::tempdir().expect("tempdir");
        OnRedis {
            config: config(scratch.path()),
            cluster,
            urls,
            _scratch: scratch,
        }
    }

    fn redis(&self, case: &str) -> RedisConfig {
        let mut r = self.config.redis().expect("redis").clone();
        r.prefix = format!("contract:{case}:");
        // The key the sealing cases seal under: each record this store writes carries its MAC.
        r.record_key = Some(std::sync::Arc::new(AuditKey::new(&[9u8; 32]).expect("key")));
        r
    }

    /// Overwrites the metadata key `name` of `fresh`'s dataset from outside.
    async fn set_meta(&self, fresh: &Fresh, name: &str, value: &str) -> bool {
        self.command(
            redis::cmd("SET")
                .arg(format!("{}{name}", fresh.meta_prefix))
                .arg(value),
        )
        .await;
        true
    }

    /// The national list's data keys of `fresh`'s dataset, each with its generation (in a cluster
    /// the redis crate sends KEYS to every master and joins their answers).
    async fn national_data_keys(&self, fresh: &Fresh) -> Vec<(String, String)> {
        let prefix = fresh.meta_prefix.trim_matches(|c| c == '{' || c == '}');
        let keys: Vec<String> = self
            .query(redis::cmd("KEYS").arg(format!("{prefix}*d:1:*")))
            .await;
        keys.into_iter()
            .filter_map(|k| Some((k.clone(), national_generation(&k)?.to_string())))
            .collect()
    }

    /// Runs one command on the node holding `key`.
    async fn command(&self, cmd: &redis::Cmd) {
        let _: redis::Value = self.query(cmd).await;
    }

    /// Runs one command on the node holding `key`, and returns its reply.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        if self.cluster {
            let client = redis::cluster::ClusterClient::new(self.urls.clone()).expect("client");
            let mut conn = client.get_async_connection().await.expect("cluster");
            cmd.query_async(&mut conn).await.expect("command")
        } else {
            let client = redis::Client::open(self.urls[0].as_str()).expect("client");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            cmd.query_async(&mut conn).await.expect("command")
        }
    }
}

#[async_trait]
impl Backend for OnRedis {
    async fn fresh_in(&self, case: &str, mode: CoverageMode) -> Fresh {
        let r = self.redis(case);
        let store = RedisStore::connect(&r).expect("connect");
        store.init_with(64, mode).await.expect("init");
        store.open_dataset().await.expect("bind");
        let meta_prefix = if self.cluster {
            format!("{{{}}}", r.prefix)
        } else {
            r.prefix.clone()
        };
        Fresh {
            store: Arc::new(store),
            meta_prefix,
            _dir: None,
        }
    }

    async fn wipe(&self, fresh: &Fresh) -> bool {
        self.command(redis::cmd("DEL").arg(format!("{}marker", fresh.meta_prefix)))
            .await;
        true
    }

    async fn delete_change_record(&self, fresh: &Fresh, id: &str) -> bool {
        self.command(
            redis::cmd("XDEL")
                .arg(format!("{}changes", fresh.meta_prefix))
                .arg(id),
        )
        .await;
        true
    }

    async fn set_generation(&self, fresh: &Fresh, value: &str) -> bool {
        self.set_meta(fresh, "gen:1", value).await
    }

    async fn refuse_writes(&self, refuse: bool) -> bool {
        // A byte of memory allowed: with no eviction, every write is refused (OOM), reads not.
        for url in &self.urls {
            let client = redis::Client::open(url.as_str()).expect("client");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg(if refuse { "1" } else { "0" })
                .query_async(&mut conn)
                .await
                .expect("CONFIG SET maxmemory");
        }
        true
    }

    async fn roll_back(&self, fresh: &Fresh) -> bool {
        self.set_meta(fresh, "version", "1-0").await
    }

    async fn hold_import_lock(&self, fresh: &Fresh) -> bool {
        self.set_meta(fresh, "lock:1", "contract").await
    }

    async fn snapshot_leftovers(&self, fresh: &Fresh) -> Option<(Vec<String>, bool)> {
        let p = &fresh.meta_prefix;
        // In a cluster the redis crate sends KEYS to every master and joins their answers.
        let staged: Vec<String> = self
            .query(redis::cmd("KEYS").arg(format!("{p}snapshot_staging:*")))
            .await;
        let ttl: i64 = self
            .query(redis::cmd("PTTL").arg(format!("{p}snapshot")))
            .await;
        Some((staged, ttl != -1))
    }

    async fn generation_allocator(&self, fresh: &Fresh) -> Option<Vec<(String, Option<String>)>> {
        // Before generations were random, a counter per type handed them out.
        let mut saved = Vec::new();
        for t in ["1", "2"] {
            let key = format!("{}gennext:{t}", fresh.meta_prefix);
            let value: Option<String> = self.query(redis::cmd("GET").arg(&key)).await;
            saved.push((key, value));
        }
        Some(saved)
    }

    async fn set_generation_allocator(&self, _fresh: &Fresh, saved: &[(String, Option<String>)]) {
        for (key, value) in saved {
            match value {
                Some(v) => self.command(redis::cmd("SET").arg(key).arg(v)).await,
                None => self.command(redis::cmd("DEL").arg(key)).await,
            }
        }
    }

    async fn national_generations(&self, fresh: &Fresh) -> Option<BTreeSet<String>> {
        Some(
            self.national_data_keys(fresh)
                .await
                .into_iter()
                .map(|(_, g)| g)
                .collect(),
        )
    }

    async fn lose_staged(&self, fresh: &Fresh) -> bool {
        let current: Option<String> = self
            .query(redis::cmd("GET").arg(format!("{}gen:1", fresh.meta_prefix)))
            .await;
        let current = current.unwrap_or_else(|| "0".into());
        for (key, g) in self.national_data_keys(fresh).await {
            if g != current {
                self.command(redis::cmd("DEL").arg(key)).await;
            }
        }
        true
    }

    async fn lose_change(&self, fresh: &Fresh, lost: Version, back: Version) -> bool {
        let p = &fresh.meta_prefix;
        self.command(
            redis::cmd("XDEL")
                .arg(format!("{p}log"))
                .arg(lost.to_string()),
        )
        .await;
        self.command(
            redis::cmd("HDEL")
                .arg(format!("{p}ids"))
                .arg(lost.to_string()),
        )
        .await;
        self.set_meta(fresh, "version", &back.to_string()).await
    }
}

fn numbers(from: u64, count: usize) -> Vec<NhsNumber> {
    (from..)
        .filter_map(|v| NhsNumber::from_u64(v).ok())
        .take(count)
        .collect()
}

fn record(action: &str, organisation: &str) -> AuditRecord {
    AuditRecord {
        at_ms: 1_700_000_000_000,
        organisation: organisation.into(),
        key_id: "contract".into(),
        action: action.into(),
        ..AuditRecord::default()
    }
}

fn set(types: &[OptOutType]) -> OptOutSet {
    let mut s = OptOutSet::EMPTY;
    for t in types {
        s.insert(*t);
    }
    s
}

/// A change; type 1 ones are practice A83007's.
async fn change(
    store: &dyn ConsentStore,
    kind: ChangeKind,
    t: OptOutType,
    n: &[NhsNumber],
) -> (Version, u64) {
    let a = practice("A83007");
    let p = (t == TYPE1).then_some(&a);
    let o = store
        .change(kind, t, p, n, "contract", &record("change", "ADMIN"))
        .await
        .expect("change");
    (o.version, o.applied)
}

fn practice(code: &str) -> Practice {
    Practice::parse(code, true).expect("practice")
}

/// The whole change log, oldest first.
async fn whole_log(s: &dyn ConsentStore) -> Vec<ChangeEntry> {
    match s.changes_after(Version::ZERO, 100, Duration::ZERO).await {
        Ok(Feed::Changes(entries)) => entries,
        other => panic!("the whole log is there, got {other:?}"),
    }
}

fn optout_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One test per (store, case), so a failure names both: `store_contract::cluster::imports`.
/// Each Redis test starts its own topology (a Cluster takes about a second), and each case works
/// in a fresh store of its own, as SpiceDB's datastore suite does.
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(&super::Embedded).await;
                }
            )*
        }
        mod one_redis {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    let redis = RedisServer::start();
                    let backend = OnRedis::new(
                        |p| redis_config(&redis, "unused:", p),
                        false,
                        vec![redis.url()],
                    );
                    super::$case(&backend).await;
                }
            )*
        }
        mod sentinel {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    let set = SentinelSet::start().await;
                    let backend = OnRedis::new(|p| set.config(p), false, vec![set.master.url()]);
                    super::$case(&backend).await;
                }
            )*
        }
        mod cluster {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    let cluster = Cluster::start().await;
                    let backend = OnRedis::new(|p| cluster.config(p), true, cluster.urls());
                    super::$case(&backend).await;
                }
            )*
        }
    };
}

contract!(
    marker,
    lookups_and_changes,
    removing_what_is_not_there,
    change_feed,
    imports,
    national_checks,
    type1_practices,
    scan,
    snapshots,
    audit,
    changes_retention,
    changes_sealing,
    reset_fails_closed,
    rollback_is_reported,
    lost_history_is_reported,
    a_change_during_an_import_is_refused_as_busy,
    a_chunk_that_fails_to_stage_fails_the_import,
    an_abandoned_import_spares_another_imports_list,
    an_import_whose_staged_chunks_were_lost_is_not_applied,
    generations,
);
