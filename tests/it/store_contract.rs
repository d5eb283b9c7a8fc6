//! The consent store contract: one set of cases every `ConsentStore` must pass, run against the
//! embedded store, one Redis, Redis behind Sentinel and a Redis Cluster (real redis-server
//! processes on loopback). In the spirit of SpiceDB's datastore test suite: a new store, or a
//! change to one, is done when this file passes against it.
//!
//! Each case gets a fresh, initialised store (a new data directory, or a new key prefix on the
//! same Redis). Cases that need to break a store from outside (reset it, roll it back) run where
//! the backend can do that (Redis); the embedded store's file cannot be changed under it.

use std::{path::Path, sync::Arc, time::Duration};

use crate::common::{Cluster, RedisServer, SentinelSet, redis_config};
use async_trait::async_trait;
use optout::{
    core::{
        AuditKey, AuditQuery, AuditRecord, NhsNumber, OptOutSet, OptOutType, Practice, Version,
        coverage::CoverageMode, seals::ChangesError,
    },
    engine::sealer,
    server::ServerConfig,
    store::{
        ChangeEntry, ChangeKind, ConsentStore, Feed, ImportMode, LOG_LIST_MAX, StoreError, Stored,
        embedded::{EmbeddedConfig, EmbeddedStore},
        redis::{RedisConfig, RedisStore},
    },
};

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

    /// Runs one command on the node holding `key`.
    async fn command(&self, cmd: &redis::Cmd) {
        if self.cluster {
            let client = redis::cluster::ClusterClient::new(self.urls.clone()).expect("client");
            let mut conn = client.get_async_connection().await.expect("cluster");
            let _: redis::Value = cmd.query_async(&mut conn).await.expect("command");
        } else {
            let client = redis::Client::open(self.urls[0].as_str()).expect("client");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            let _: redis::Value = cmd.query_async(&mut conn).await.expect("command");
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

    async fn roll_back(&self, fresh: &Fresh) -> bool {
        self.set_meta(fresh, "version", "1-0").await
    }

    async fn hold_import_lock(&self, fresh: &Fresh) -> bool {
        self.set_meta(fresh, "lock:1", "contract").await
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

/// The dataset marker: bound once, stable, reported by status.
async fn marker(b: &dyn Backend) {
    let f = b.fresh("marker").await;
    let id = f.store.open_dataset().await.expect("bind");
    assert!(!id.is_empty());
    assert_eq!(f.store.open_dataset().await.expect("again"), id);
    assert_eq!(f.store.status().await.expect("status").dataset_id, id);
    let other = b.fresh("marker-other").await;
    assert_ne!(other.store.open_dataset().await.expect("bind"), id);
}

/// Lookups, gets and counts reflect every change, and versions only grow.
async fn lookups_and_changes(b: &dyn Backend) {
    let f = b.fresh("changes").await;
    let s = f.store.as_ref();
    let n = numbers(4_000_000_000, 3);
    let (v1, a1) = change(s, ChangeKind::Add, NATIONAL, &n[..2]).await;
    assert_eq!(a1, 2);
    let (v2, a2) = change(s, ChangeKind::Add, NATIONAL, &n[..2]).await;
    assert_eq!(a2, 0, "adding again changes nothing");
    let (v3, _) = change(s, ChangeKind::Add, TYPE1, &n[1..2]).await;
    assert!(v1 < v2 && v2 < v3, "{v1} {v2} {v3}");
    let found = s.lookup(&n, OptOutSet::ALL).await.expect("lookup");
    assert_eq!(
        found.held,
        vec![set(&[NATIONAL]), set(&[NATIONAL, TYPE1]), OptOutSet::EMPTY]
    );
    assert!(found.version >= v3);
    // A lookup of one type reads and reports that type alone.
    for only in [NATIONAL, TYPE1] {
        let found = s.lookup(&n, set(&[only])).await.expect("lookup");
        let want: Vec<OptOutSet> = [set(&[NATIONAL]), set(&[NATIONAL, TYPE1]), OptOutSet::EMPTY]
            .into_iter()
            .map(|h| h.intersection(set(&[only])))
            .collect();
        assert_eq!(found.held, want, "{only:?} alone");
        assert!(found.version >= v3);
    }
    let (records, _) = s.get(n[1]).await.expect("get");
    let mut kinds: Vec<_> = records.iter().map(|r| r.kind).collect();
    kinds.sort_by_key(|k| k.name());
    assert_eq!(kinds.len(), 2);
    assert!(records.iter().all(|r| r.source == "contract"));
    let st = s.status().await.expect("status");
    assert_eq!((st.national, st.type1, st.patients), (2, 1, 2));
    let (v4, removed) = change(s, ChangeKind::Remove, NATIONAL, &n[..1]).await;
    assert_eq!(removed, 1);
    assert!(v4 > v3);
    let found = s.lookup(&n[..1], OptOutSet::ALL).await.expect("lookup");
    assert_eq!(found.held, vec![OptOutSet::EMPTY]);
    let st = s.status().await.expect("status");
    assert_eq!((st.national, st.type1, st.patients), (1, 1, 1));
    assert!(s.get(n[2]).await.expect("get").0.is_empty());
}

/// Removing an opt-out that is not there (never added, or removed already) changes nothing and
/// says so, like adding one twice: a retried removal must not fail for ever (issue 27: on Redis
/// the script passed Lua's `-0` to HINCRBY, which refused it).
async fn removing_what_is_not_there(b: &dyn Backend) {
    let f = b.fresh("remove-absent").await;
    let s = f.store.as_ref();
    let n = numbers(4_005_000_000, 2);
    let (v1, applied) = change(s, ChangeKind::Remove, NATIONAL, &n).await;
    assert_eq!(applied, 0, "nothing to remove");
    let (v2, added) = change(s, ChangeKind::Add, NATIONAL, &n[..1]).await;
    assert_eq!(added, 1);
    let (v3, removed) = change(s, ChangeKind::Remove, NATIONAL, &n[..1]).await;
    assert_eq!(removed, 1);
    let (v4, again) = change(s, ChangeKind::Remove, NATIONAL, &n[..1]).await;
    assert_eq!(again, 0, "removed already");
    assert!(v1 < v2 && v2 < v3 && v3 < v4, "{v1} {v2} {v3} {v4}");
    let st = s.status().await.expect("status");
    assert_eq!((st.national, st.type1, st.patients), (0, 0, 0));
}

/// The change feed: every change in order with the numbers it added; empty, not an error, when
/// there is nothing new.
async fn change_feed(b: &dyn Backend) {
    let f = b.fresh("feed").await;
    let s = f.store.as_ref();
    let n = numbers(4_010_000_000, 4);
    let (v1, _) = change(s, ChangeKind::Add, NATIONAL, &n[..2]).await;
    let (v2, _) = change(s, ChangeKind::Remove, NATIONAL, &n[..1]).await;
    let (v3, _) = change(s, ChangeKind::Add, TYPE1, &n[2..]).await;
    let Feed::Changes(all) = s
        .changes_after(Version::ZERO, 100, Duration::ZERO)
        .await
        .expect("feed")
    else {
        panic!("the whole log is there");
    };
    let versions: Vec<_> = all.iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![v1, v2, v3]);
    assert_eq!(all[0].added, n[..2].to_vec());
    assert!(all[1].added.is_empty());
    assert_eq!(all[2].added, n[2..].to_vec());
    let Feed::Changes(later) = s
        .changes_after(v1, 100, Duration::ZERO)
        .await
        .expect("feed")
    else {
        panic!("after v1");
    };
    assert_eq!(later.len(), 2);
    let Feed::Changes(none) = s
        .changes_after(v3, 100, Duration::from_millis(50))
        .await
        .expect("feed")
    else {
        panic!("at the tip");
    };
    assert!(none.is_empty());
}

/// Imports: nothing visible before commit, MERGE adds, REPLACE makes the list exactly the import,
/// an empty REPLACE is refused, and the feed carries what an import added.
async fn imports(b: &dyn Backend) {
    let f = b.fresh("imports").await;
    let s = f.store.as_ref();
    let key = AuditKey::new(&[9u8; 32]).expect("key");
    let old = numbers(4_020_000_000, 3);
    let new = numbers(4_030_000_000, 2);
    change(s, ChangeKind::Add, NATIONAL, &old).await;

    let mut dropped = s
        .begin_import(ImportMode::Replace, NATIONAL, None, "contract")
        .await
        .expect("begin");
    dropped.stage(&new).await.expect("stage");
    drop(dropped);
    assert_eq!(
        s.lookup(&new, OptOutSet::ALL).await.expect("lookup").held,
        vec![OptOutSet::EMPTY; 2],
        "an import never committed changes nothing"
    );

    let mut merge = s
        .begin_import(ImportMode::Merge, NATIONAL, None, "contract")
        .await
        .expect("begin");
    merge.stage(&new[..1]).await.expect("stage");
    let o = merge
        .commit(record("import-merge", "ADMIN"), &key)
        .await
        .expect("merge");
    assert_eq!((o.added, o.removed), (1, 0));

    let mut replace = s
        .begin_import(ImportMode::Replace, NATIONAL, None, "contract")
        .await
        .expect("begin");
    replace.stage(&[old[0]]).await.expect("stage");
    replace.stage(&new).await.expect("stage");
    replace.stage(&new).await.expect("duplicates are fine");
    let o = replace
        .commit(record("import-replace", "ADMIN"), &key)
        .await
        .expect("replace");
    assert_eq!((o.added, o.removed), (1, 2));
    let found = s
        .lookup(&[old.as_slice(), &new].concat(), OptOutSet::ALL)
        .await
        .expect("lookup");
    let n = set(&[NATIONAL]);
    let e = OptOutSet::EMPTY;
    assert_eq!(found.held, vec![n, e, e, n, n]);
    assert_eq!(s.status().await.expect("status").national, 3);
    let tail = whole_log(s).await;
    let last = tail.last().expect("the import is in the log");
    assert_eq!(last.version, o.version);
    // A REPLACE changes the list's date: logged unlisted, so every replica rebuilds and reads
    // the coverage with its scan.
    assert!(last.unlisted && last.added.is_empty(), "{last:?}");
    let coverage = s.coverage().await.expect("coverage");
    assert_eq!(coverage.national_mode, Some(CoverageMode::List));
    assert_eq!(coverage.version, o.version, "set by the replace, with it");
    let as_of = coverage
        .as_of_ms(NATIONAL)
        .expect("a replace dates the national list");
    assert!(as_of > 0 && coverage.as_of_ms(TYPE1).is_none());
    assert!(coverage.population.is_empty());
    // A national check round trip needs a store in population mode: refused here, whole.
    let mut check = s
        .begin_import(ImportMode::Replace, NATIONAL, None, "contract")
        .await
        .expect("begin");
    check.stage(&new).await.expect("stage");
    let mut population = optout::core::coverage::Population::new();
    for n in &new {
        population.insert(*n);
    }
    check.set_national_check(optout::store::NationalCheck {
        population,
        checked_at_ms: 1,
        older_reason: None,
    });
    let refused = check
        .commit(record("import-replace", "ADMIN"), &key)
        .await
        .expect_err("list mode refuses a national check");
    assert!(refused.to_string().contains("list mode"), "{refused}");
    assert_eq!(
        s.coverage().await.expect("coverage"),
        coverage,
        "nothing changed"
    );

    // The import's record holds the counts; its digests are in parts that name it.
    let trail = s
        .read_audit(&AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .expect("read");
    let main = trail
        .iter()
        .find(|r| r.action == "import-replace")
        .expect("the replace's record");
    assert_eq!(main.applied, 3);
    let parts = |action: &str| -> usize {
        trail
            .iter()
            .filter(|r| r.action == action && r.part_of == main.part_of)
            .map(|r| r.digest_count())
            .sum()
    };
    assert!(main.part_of.is_some());
    assert_eq!(
        (parts("import-added"), parts("import-removed")),
        (1, 2),
        "one digest per number added or removed, saying which"
    );

    // An import that adds more than a log entry lists is logged without its numbers: a replica
    // rebuilds from a scan, which holds them all.
    let many = numbers(4_050_000_000, LOG_LIST_MAX + 7);
    let mut big = s
        .begin_import(
            ImportMode::Merge,
            TYPE1,
            Some(&practice("A83007")),
            "contract",
        )
        .await
        .expect("begin");
    big.stage(&many).await.expect("stage");
    let o = big
        .commit(record("import-merge", "ADMIN"), &key)
        .await
        .expect("big merge");
    assert_eq!(o.added, many.len() as u64);
    let tail = whole_log(s).await;
    let entry = tail.last().expect("the big import is in the log");
    assert_eq!(entry.version, o.version);
    assert!(entry.unlisted && entry.added.is_empty(), "{entry:?}");
    let merge_entry = tail
        .iter()
        .rev()
        .find(|e| e.version < o.version && !e.added.is_empty())
        .expect("the small merge");
    assert_eq!(
        merge_entry.added,
        vec![new[0]],
        "a small merge lists its numbers"
    );
    assert_eq!(
        s.coverage().await.expect("coverage").as_of_ms(NATIONAL),
        Some(as_of),
        "a merge does not make a list complete: its date stays"
    );
    let mut scanned = std::collections::HashSet::new();
    let at = s
        .scan_pages(&mut |p: &[NhsNumber]| scanned.extend(p.iter().copied()))
        .await
        .expect("scan");
    assert!(at >= o.version);
    assert!(many.iter().all(|n| scanned.contains(n)));
    let trail = s
        .read_audit(&AuditQuery {
            limit: 1000,
            ..AuditQuery::default()
        })
        .await
        .expect("read");
    let added: usize = trail
        .iter()
        .filter(|r| r.action == "import-added" && r.count > 1)
        .map(|r| r.digest_count())
        .sum();
    assert_eq!(
        added,
        many.len(),
        "every added number's digest, in bounded parts"
    );

    let empty = s
        .begin_import(ImportMode::Replace, NATIONAL, None, "contract")
        .await
        .expect("begin");
    let refused = empty.commit(record("import-replace", "ADMIN"), &key).await;
    assert!(
        matches!(refused, Err(StoreError::ImportRefused(_))),
        "{refused:?}"
    );
    assert_eq!(s.status().await.expect("status").national, 3);

    // Every record the imports wrote (parts, main records) carries a MAC that verifies where the
    // store writes them (Redis, under the key its replica holds): all sealed, none refused.
    let sealed = sealer::seal_pass(s, &key).await.expect("seal");
    assert!(sealed.refused.is_empty(), "{sealed:?}");
    assert!(sealed.records > 0);
    let report = sealer::verify(s, &key)
        .await
        .expect("read")
        .expect("verifies");
    assert_eq!(report.unsealed, 0, "{report:?}");
}

/// The whole change log, oldest first.
async fn whole_log(s: &dyn ConsentStore) -> Vec<ChangeEntry> {
    match s.changes_after(Version::ZERO, 100, Duration::ZERO).await {
        Ok(Feed::Changes(entries)) => entries,
        other => panic!("the whole log is there, got {other:?}"),
    }
}

/// A scan holds every opted-out number, at a version the feed can be replayed from.
async fn scan(b: &dyn Backend) {
    let f = b.fresh("scan").await;
    let s = f.store.as_ref();
    let n = numbers(4_040_000_000, 50);
    change(s, ChangeKind::Add, NATIONAL, &n[..30]).await;
    let (v, _) = change(s, ChangeKind::Add, TYPE1, &n[20..]).await;
    let scanned = s.scan().await.expect("scan");
    let mut got = scanned.numbers.clone();
    got.sort();
    got.dedup();
    assert_eq!(got, n);
    assert!(scanned.version >= v);
}

/// Snapshots, where the store shares them: the newest wins, and none newer than the store.
async fn snapshots(b: &dyn Backend) {
    let f = b.fresh("snapshots").await;
    let s = f.store.as_ref();
    if !s.shares_snapshots() {
        assert!(s.load_snapshot().await.expect("load").is_none());
        return;
    }
    assert!(s.load_snapshot().await.expect("load").is_none());
    let (v, _) = change(s, ChangeKind::Add, NATIONAL, &numbers(4_050_000_000, 1)).await;
    s.publish_snapshot(v, b"first").await.expect("publish");
    assert_eq!(
        s.load_snapshot().await.expect("load").as_deref(),
        Some(&b"first"[..])
    );
    let older = Version {
        ms: v.ms - 1,
        seq: 0,
    };
    s.publish_snapshot(older, b"older").await.expect("publish");
    assert_eq!(
        s.load_snapshot().await.expect("load").as_deref(),
        Some(&b"first"[..]),
        "an older snapshot never replaces a newer one"
    );
    let beyond = Version {
        ms: v.ms + 60_000,
        seq: 0,
    };
    s.publish_snapshot(beyond, b"beyond")
        .await
        .expect("publish");
    assert_eq!(
        s.load_snapshot().await.expect("load").as_deref(),
        Some(&b"first"[..]),
        "a snapshot newer than the store is refused"
    );
}

/// Audit records: checks appended, admin reads recorded, both read back in one order with the
/// changes' own records, filtered.
async fn audit(b: &dyn Backend) {
    let f = b.fresh("audit").await;
    let s = f.store.as_ref();
    change(s, ChangeKind::Add, NATIONAL, &numbers(4_060_000_000, 2)).await;
    s.append_audit(&[record("check", "RX1"), record("check", "RX2")])
        .await
        .expect("append");
    s.append_audit(&[record("check", "RX1")])
        .await
        .expect("append");
    s.record_access(&record("get", "RX9"))
        .await
        .expect("record a read");
    let all = s
        .read_audit(&AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .expect("read");
    // Each trail keeps its own order; the two merge by time, to the millisecond, so records of
    // the two trails written within one millisecond may come in either order.
    let trail = |changes: bool| -> Vec<(&str, &str)> {
        all.iter()
            .filter(|r| (r.action == "check") != changes)
            .map(|r| (r.action.as_str(), r.organisation.as_str()))
            .collect()
    };
    assert_eq!(trail(true), vec![("change", "ADMIN"), ("get", "RX9")]);
    assert_eq!(
        trail(false),
        vec![("check", "RX1"), ("check", "RX2"), ("check", "RX1")]
    );
    assert_eq!(all.len(), 5);
    let changed = all.iter().find(|r| r.action == "change").expect("change");
    assert_eq!(changed.applied, 2, "a change's record says what it changed");
    let rx1 = s
        .read_audit(&AuditQuery {
            organisation: Some("RX1".into()),
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .expect("read");
    assert_eq!(rx1.len(), 2);
}

/// Retention of the changes trail by age: older records go, newer ones and checks stay.
async fn changes_retention(b: &dyn Backend) {
    let f = b.fresh("retention").await;
    let s = f.store.as_ref();
    let now = i64::try_from(optout_now_ms()).expect("time");
    let mut fresh = record("get", "RX1");
    fresh.at_ms = now;
    s.record_access(&fresh).await.expect("record");
    s.append_audit(&[record("check", "RX2")])
        .await
        .expect("append");
    let all = || async {
        s.read_audit(&AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .expect("read")
    };
    // A cut-off a minute ago keeps the record; one a minute ahead removes it, not the check.
    s.trim_changes(optout_now_ms() - 60_000)
        .await
        .expect("trim");
    assert_eq!(all().await.len(), 2);
    let removed = s
        .trim_changes(optout_now_ms() + 60_000)
        .await
        .expect("trim");
    assert_eq!(removed, 1);
    let left = all().await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].action, "check");
}

/// The changes trail is sealed by whichever writer gets there first, and verifies; a record
/// removed from outside is named.
async fn changes_sealing(b: &dyn Backend) {
    let f = b.fresh("sealing").await;
    let s = f.store.as_ref();
    let key = AuditKey::new(&[9u8; 32]).expect("key");
    for org in ["RX1", "RX2", "RX3"] {
        s.record_access(&record("get", org)).await.expect("record");
    }
    change(s, ChangeKind::Add, NATIONAL, &numbers(4_200_000_000, 2)).await;
    // An acknowledgement's record too (its own script).
    s.acknowledge_regression(&record("acknowledge-regression", "RX1"))
        .await
        .expect("acknowledge");
    assert_eq!(sealer::seal_pending(s, &key).await.expect("seal"), 5);
    assert_eq!(sealer::seal_pending(s, &key).await.expect("seal"), 0);
    // A writer that read an older last seal loses the race instead of forking the chain.
    assert!(!s.append_seal(0, "{}").await.expect("append"));
    s.record_access(&record("get", "RX4"))
        .await
        .expect("record");
    let report = sealer::verify(s, &key)
        .await
        .expect("read")
        .expect("intact");
    assert_eq!((report.seals, report.records, report.unsealed), (1, 5, 1));
    assert_eq!(sealer::seal_pending(s, &key).await.expect("seal"), 1);
    let records = s.stored(Stored::Records, None, 100).await.expect("records");
    assert_eq!(records.len(), 6);
    // Paging after an id returns what follows it.
    let after = s
        .stored(Stored::Records, Some(&records[1].id), 2)
        .await
        .expect("page");
    assert_eq!(after, records[2..4].to_vec());
    // Under another key nothing verifies.
    let other = AuditKey::new(&[8u8; 32]).expect("key");
    assert!(sealer::verify(s, &other).await.expect("read").is_err());
    if b.delete_change_record(&f, &records[2].id).await {
        match sealer::verify(s, &key).await.expect("read") {
            Err(ChangesError::Removed { id, .. }) => assert_eq!(id, records[2].id),
            other => panic!("a removed record must be named, got {other:?}"),
        }
    }
    // Retention removes records with their seals: what is left still verifies.
    s.trim_changes(optout_now_ms() + 60_000)
        .await
        .expect("trim");
    let report = sealer::verify(s, &key)
        .await
        .expect("read")
        .expect("after retention");
    assert_eq!(report.records, 0);
}

fn optout_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A store reset from outside fails closed: never "no opt-out".
async fn reset_fails_closed(b: &dyn Backend) {
    let f = b.fresh("reset").await;
    let n = numbers(4_070_000_000, 1);
    change(f.store.as_ref(), ChangeKind::Add, NATIONAL, &n).await;
    if !b.wipe(&f).await {
        return;
    }
    let looked = f.store.lookup(&n, OptOutSet::ALL).await;
    assert!(
        matches!(looked, Err(StoreError::NotInitialised(_))),
        "{looked:?}"
    );
    let feed = f
        .store
        .changes_after(Version::ZERO, 10, Duration::ZERO)
        .await;
    assert!(
        matches!(feed, Err(StoreError::NotInitialised(_))),
        "{feed:?}"
    );
    let bound = f.store.open_dataset().await;
    assert!(
        matches!(bound, Err(StoreError::NotInitialised(_))),
        "{bound:?}"
    );
}

/// A lookup follows the current generation of a list, however it changed since the last lookup
/// (a store that caches it must notice), and a generation that is not a count fails closed: read
/// as generation 0 (empty) it would answer "not held" for everyone on the list.
async fn generations(b: &dyn Backend) {
    let f = b.fresh("generations").await;
    let s = f.store.as_ref();
    let n = numbers(4_090_000_000, 2);
    change(s, ChangeKind::Add, NATIONAL, &n).await;
    let held = |l: Result<optout::store::Lookup, StoreError>| l.expect("lookup").held;
    let nat = set(&[NATIONAL]);
    assert_eq!(held(s.lookup(&n, OptOutSet::ALL).await), vec![nat; 2]);
    // From outside: the list moves to a generation nobody wrote (an empty one), and back.
    if !b.set_generation(&f, "7").await {
        return;
    }
    assert_eq!(
        held(s.lookup(&n, OptOutSet::ALL).await),
        vec![OptOutSet::EMPTY; 2],
        "the lookup read the generation now current"
    );
    assert!(b.set_generation(&f, "0").await);
    assert_eq!(held(s.lookup(&n, OptOutSet::ALL).await), vec![nat; 2]);
    assert!(b.set_generation(&f, "not-a-generation").await);
    let looked = s.lookup(&n, OptOutSet::ALL).await;
    assert!(matches!(looked, Err(StoreError::Corrupt(_))), "{looked:?}");
    // Nor is the store trusted for the other list meanwhile.
    let looked = s.lookup(&n, set(&[TYPE1])).await;
    assert!(matches!(looked, Err(StoreError::Corrupt(_))), "{looked:?}");
}

/// A store that went back in time says so to a reader that saw more.
async fn rollback_is_reported(b: &dyn Backend) {
    let f = b.fresh("rollback").await;
    let (v, _) = change(
        f.store.as_ref(),
        ChangeKind::Add,
        NATIONAL,
        &numbers(4_080_000_000, 1),
    )
    .await;
    if !b.roll_back(&f).await {
        return;
    }
    let feed = f
        .store
        .changes_after(v, 10, Duration::ZERO)
        .await
        .expect("feed");
    assert!(matches!(feed, Feed::Behind { .. }), "{feed:?}");
}

/// Invariant 9: the store proves its continuity, not just its version. A change this store saw
/// (here: acknowledged) that is lost from outside, after which another write puts the version
/// ahead again, fails every read with `Regressed` (writes still go through, so lost changes can
/// be restored), until the history is forgotten (an admin acknowledged the regression).
async fn lost_history_is_reported(b: &dyn Backend) {
    let f = b.fresh("lost-history").await;
    let s = f.store.as_ref();
    let n = numbers(4_085_000_000, 3);
    let (v1, _) = change(s, ChangeKind::Add, NATIONAL, &n[..1]).await;
    let (v2, _) = change(s, ChangeKind::Add, NATIONAL, &n[1..2]).await;
    if !b.lose_change(&f, v2, v1).await {
        return;
    }
    let (v3, _) = change(s, ChangeKind::Add, TYPE1, &n[2..]).await;
    assert!(v3 > v2, "the store's version is ahead again: {v3} > {v2}");
    let lookup = s.lookup(&n, OptOutSet::ALL).await;
    assert!(
        matches!(lookup, Err(StoreError::Regressed(_))),
        "a lookup on a store that lost a change: {lookup:?}"
    );
    let feed = s.changes_after(v1, 10, Duration::ZERO).await;
    assert!(
        matches!(feed, Err(StoreError::Regressed(_))),
        "the feed of a store that lost a change: {feed:?}"
    );
    assert!(matches!(s.scan().await, Err(StoreError::Regressed(_))));
    s.forget_history();
    let found = s
        .lookup(&n, OptOutSet::ALL)
        .await
        .expect("lookup after acknowledgement");
    // (This loss took the log entry only: the record is still there.)
    assert_eq!(
        found.held,
        vec![set(&[NATIONAL]), set(&[NATIONAL]), set(&[TYPE1])]
    );
    assert!(matches!(
        s.changes_after(v1, 10, Duration::ZERO).await,
        Ok(Feed::Changes(_))
    ));
}

/// A change of a type an import is being applied to is refused as `Busy` (ABORTED: nothing
/// changed, retry), on every topology: behind Sentinel and in a Cluster the script runs in a
/// pipeline with `WAIT`, where the refusal once read as "Redis unavailable" (an unknown outcome).
async fn a_change_during_an_import_is_refused_as_busy(b: &dyn Backend) {
    let f = b.fresh("busy").await;
    if !b.hold_import_lock(&f).await {
        return;
    }
    let n = numbers(4_087_000_000, 1);
    for kind in [ChangeKind::Add, ChangeKind::Remove] {
        let refused = f
            .store
            .change(
                kind,
                NATIONAL,
                None,
                &n,
                "contract",
                &record("change", "ADMIN"),
            )
            .await;
        assert!(
            matches!(refused, Err(StoreError::Busy(_))),
            "{kind:?} while an import holds the lock: {refused:?}"
        );
    }
    // The other type is not locked.
    change(f.store.as_ref(), ChangeKind::Add, TYPE1, &n).await;
}

/// Every case, in order, each on a fresh store.
/// A store in population mode: a national check round trip commits its opt-outs, its population
/// and its date together; a list REPLACE of national opt-outs is refused; a check in which nobody
/// opted out is a valid empty list; the next check replaces population and opt-outs at once.
async fn national_checks(b: &dyn Backend) {
    let fresh = b
        .fresh_in("national-checks", CoverageMode::Population)
        .await;
    let s = fresh.store.as_ref();
    let key = AuditKey::new(&[3u8; 32]).expect("key");
    let n = numbers(4_060_000_000, 6);
    let before = s.coverage().await.expect("coverage");
    assert_eq!(before.national_mode, Some(CoverageMode::Population));
    assert!(before.population.is_empty() && before.as_of_ms(NATIONAL).is_none());

    let population = |members: &[NhsNumber]| {
        let mut p = optout::core::coverage::Population::new();
        for m in members {
            p.insert(*m);
        }
        p
    };
    let round_trip_why =
        |members: &[NhsNumber], opted: &[NhsNumber], at: u64, why: Option<&str>| {
            let (members, opted) = (members.to_vec(), opted.to_vec());
            let key = key.clone();
            let why = why.map(str::to_string);
            async move {
                let mut i = s
                    .begin_import(ImportMode::Replace, NATIONAL, None, "national check")
                    .await
                    .expect("begin");
                i.stage(&opted).await.expect("stage");
                i.set_national_check(optout::store::NationalCheck {
                    population: population(&members),
                    checked_at_ms: at,
                    older_reason: why,
                });
                i.commit(record("import-replace", "ADMIN"), &key).await
            }
        };
    let round_trip = |members: &[NhsNumber], opted: &[NhsNumber], at: u64| {
        round_trip_why(members, opted, at, None)
    };
    let list = async {
        let mut i = s
            .begin_import(ImportMode::Replace, NATIONAL, None, "list")
            .await
            .expect("begin");
        i.stage(&n[..1]).await.expect("stage");
        i.commit(record("import-replace", "ADMIN"), &key).await
    };
    let refused = list.await.expect_err("a list replace in population mode");
    assert!(refused.to_string().contains("population mode"), "{refused}");

    let o = round_trip(&n[..4], &n[..2], 1_000)
        .await
        .expect("first check");
    assert_eq!((o.added, o.removed), (2, 0));
    let c = s.coverage().await.expect("coverage");
    assert_eq!(c.version, o.version);
    assert_eq!(c.as_of_ms(NATIONAL), Some(1_000));
    assert_eq!(c.population.len(), 4);
    assert!(n[..4].iter().all(|m| c.population.contains(*m)));
    assert!(!c.population.contains(n[4]));
    let found = s.lookup(&n, OptOutSet::ALL).await.expect("lookup");
    let (y, e) = (set(&[NATIONAL]), OptOutSet::EMPTY);
    assert_eq!(found.held, vec![y, y, e, e, e, e]);

    // Nobody opted out this time, and the population moved: both replaced in one step.
    let o = round_trip(&n[2..], &[], 2_000).await.expect("second check");
    assert_eq!((o.added, o.removed), (0, 2));
    let c = s.coverage().await.expect("coverage");
    assert_eq!((c.version, c.as_of_ms(NATIONAL)), (o.version, Some(2_000)));
    assert_eq!(c.population.len(), 4);
    assert!(!c.population.contains(n[0]) && c.population.contains(n[5]));
    assert!(
        s.lookup(&n, OptOutSet::ALL)
            .await
            .expect("lookup")
            .held
            .iter()
            .all(|h| *h == OptOutSet::EMPTY)
    );
    let tail = whole_log(s).await;
    assert!(
        tail.last()
            .is_some_and(|e| e.version == o.version && e.unlisted)
    );

    // An older check than the one in force would move the list back in time: refused, nothing
    // changed; with a reason it is applied.
    let refused = round_trip(&n[..4], &n[..1], 1_500)
        .await
        .expect_err("an older check");
    assert!(
        refused
            .to_string()
            .contains("older than the national check in force"),
        "{refused}"
    );
    let c = s.coverage().await.expect("coverage");
    assert_eq!((c.version, c.as_of_ms(NATIONAL)), (o.version, Some(2_000)));
    let o = round_trip_why(&n[..4], &n[..1], 1_500, Some("the newer reply was wrong"))
        .await
        .expect("an older check, meant");
    let c = s.coverage().await.expect("coverage");
    assert_eq!((c.version, c.as_of_ms(NATIONAL)), (o.version, Some(1_500)));
}

/// Type 1 opt-outs belong to practices (issue 28 item 3): a patient holds type 1 while any
/// practice does; a practice's REPLACE replaces its own objections only, and dates its list (the
/// type 1 list's date is its oldest practice's); `get` names the practices; the unknown practice
/// (records from before practices were) is cleared only by an explicit removal.
async fn type1_practices(b: &dyn Backend) {
    let f = b.fresh("type1-practices").await;
    let s = f.store.as_ref();
    let key = AuditKey::new(&[5u8; 32]).expect("key");
    let (a, bp) = (practice("A83007"), practice("B81001"));
    let n = numbers(4_070_000_000, 4);
    let t1 = set(&[TYPE1]);
    let e = OptOutSet::EMPTY;
    let add = |p: &Practice, ns: &[NhsNumber]| {
        let (p, ns) = (p.clone(), ns.to_vec());
        async move {
            s.change(
                ChangeKind::Add,
                TYPE1,
                Some(&p),
                &ns,
                "gp",
                &record("add", "GP"),
            )
            .await
            .expect("add")
        }
    };
    // A holds n0 and n1; B holds n1 and n2.
    assert_eq!(add(&a, &n[..2]).await.applied, 2);
    assert_eq!(add(&bp, &n[1..3]).await.applied, 2, "n1 gains a practice");
    assert_eq!(add(&bp, &n[1..2]).await.applied, 0, "held by B already");
    let st = s.status().await.expect("status");
    assert_eq!((st.type1, st.patients), (3, 3));
    let (records, _) = s.get(n[1]).await.expect("get");
    assert_eq!(records[0].practices, vec![a.clone(), bp.clone()]);

    // B withdraws n1: A still holds it.
    let o = s
        .change(
            ChangeKind::Remove,
            TYPE1,
            Some(&bp),
            &n[1..2],
            "gp",
            &record("remove", "GP"),
        )
        .await
        .expect("remove");
    assert_eq!(o.applied, 1);
    let held = s.lookup(&n, OptOutSet::ALL).await.expect("lookup").held;
    assert_eq!(held, vec![t1, t1, t1, e]);

    // A's whole list is now n3 alone: A's objections to n0 and n1 go, B's n2 stays.
    let mut import = s
        .begin_import(ImportMode::Replace, TYPE1, Some(&a), "practice-A83007.txt")
        .await
        .expect("begin");
    import.stage(&n[3..]).await.expect("stage");
    let o = import
        .commit(record("import-replace", "GP"), &key)
        .await
        .expect("a practice's replace");
    assert_eq!((o.added, o.removed), (1, 2));
    let held = s.lookup(&n, OptOutSet::ALL).await.expect("lookup").held;
    assert_eq!(held, vec![e, e, t1, t1], "B's objection to n2 stands");
    let st = s.status().await.expect("status");
    assert_eq!((st.type1, st.patients), (2, 2));
    let c = s.coverage().await.expect("coverage");
    let a_at = c
        .practices
        .get("A83007")
        .copied()
        .expect("A's list is dated");
    assert_eq!(c.as_of_ms(TYPE1), Some(a_at));

    // B's whole list: the type 1 list is as old as the older of the two.
    let mut import = s
        .begin_import(ImportMode::Replace, TYPE1, Some(&bp), "practice-B81001.txt")
        .await
        .expect("begin");
    import.stage(&n[2..3]).await.expect("stage");
    import
        .commit(record("import-replace", "GP"), &key)
        .await
        .expect("B's replace");
    let c = s.coverage().await.expect("coverage");
    assert_eq!(c.practices.len(), 2);
    assert_eq!(c.as_of_ms(TYPE1), c.practices.values().min().copied());
    assert_eq!(c.as_of_ms(TYPE1), Some(a_at));

    // An empty practice file is refused, as every empty REPLACE is.
    let empty = s
        .begin_import(ImportMode::Replace, TYPE1, Some(&bp), "empty.txt")
        .await
        .expect("begin");
    assert!(
        empty
            .commit(record("import-replace", "GP"), &key)
            .await
            .is_err()
    );
    // Naming no practice for type 1 (or one for the national type) is refused.
    assert!(
        s.change(
            ChangeKind::Add,
            TYPE1,
            None,
            &n[..1],
            "gp",
            &record("add", "GP")
        )
        .await
        .is_err()
    );
    assert!(
        s.change(
            ChangeKind::Add,
            NATIONAL,
            Some(&a),
            &n[..1],
            "x",
            &record("add", "X")
        )
        .await
        .is_err()
    );

    // The unknown practice: removing it clears what no practice was named for. (Records written
    // before practices were are read as the unknown practice's; removing A's objection from a
    // record held by the unknown practice leaves it.)
    let unknown = Practice::unknown();
    // The refused import's lock is let go in the background: a change may find it for a moment.
    let gone = loop {
        match s
            .change(
                ChangeKind::Remove,
                TYPE1,
                Some(&unknown),
                &n[2..3],
                "gp",
                &record("remove", "GP"),
            )
            .await
        {
            Err(StoreError::Busy(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => break other.expect("remove unknown"),
        }
    };
    assert_eq!(gone.applied, 0, "n2 is B's, not the unknown practice's");
    let held = s.lookup(&n, OptOutSet::ALL).await.expect("lookup").held;
    assert_eq!(held, vec![e, e, t1, t1]);
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
    generations,
);
