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

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use futures::StreamExt;
use parking_lot::Mutex;
use redis::{AsyncCommands, ScriptInvocation, Value};

use super::{
    Bound, RedisStore,
    conn::{Conn, key_slot, shard_tags},
    layout::{Change, Layout},
    reply::{
        array, audit_json, csv_of, int_of, numbers_csv, stored_number, text_of, type_code,
        version_of,
    },
    scripts::{changed, store_error},
};
use crate::{
    core::{NhsNumber, OptOutSet, OptOutType, Version},
    store::{ChangeKind, Lookup, OptOutRecord, Scan, StoreError, WriteOutcome, now_ms},
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
    ) -> Result<Lookup, StoreError> {
        self.lookup_cluster(s, bound, numbers).await
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

    async fn scan(&self, s: &RedisStore, bound: &Bound) -> Result<Scan, StoreError> {
        self.scan_cluster(s, bound).await
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
struct Intent {
    /// Type code ("1" national, "2" type 1).
    t: String,
    add: bool,
    /// Generations of the type and of the other type when it began.
    g: String,
    go: String,
    /// The record value of an added number: `recorded_at_ms,source_id`.
    value: String,
    numbers: Vec<NhsNumber>,
}

impl Intent {
    /// From the `intent:{id}` hash step 1 wrote; `None` if it is gone (the change finished).
    fn from_fields(fields: &HashMap<String, String>) -> Result<Option<Intent>, StoreError> {
        if fields.is_empty() {
            return Ok(None);
        }
        let field = |k: &str| fields.get(k).cloned().unwrap_or_default();
        Ok(Some(Intent {
            t: field("t"),
            add: field("k") == "a",
            g: field("g"),
            go: field("go"),
            value: field("v"),
            numbers: numbers_csv(&field("n"))?,
        }))
    }
}

/// Metadata read after the data: the proof that the data was read under these generations.
struct Meta {
    version: Version,
    gens: (u64, u64),
}

/// The shards each master serves: `group_of[shard]` is its master's group, `route_slot[group]` a
/// slot of that master to route the group's pipeline by.
struct Masters {
    group_of: Vec<usize>,
    route_slot: Vec<u16>,
}

/// A HEXISTS answer: 0 or 1. Anything else (an error in the pipeline, a nil) is an error, never
/// "not held".
fn flag(v: &Value) -> Result<bool, StoreError> {
    match v {
        Value::Int(0) => Ok(false),
        Value::Int(1) => Ok(true),
        Value::ServerError(e) => Err(StoreError::Unavailable(format!("redis: {e:?}").into())),
        other => Err(StoreError::Corrupt(
            format!("expected 0 or 1 from HEXISTS, got {other:?}").into(),
        )),
    }
}

/// Shard pipelines of a bulk read (scan) in flight at once.
const SCAN_PARALLEL: usize = 4;

impl Cluster {
    fn shard_of(bound: &Bound, number: NhsNumber) -> usize {
        ((number.as_u64() % bound.buckets) % bound.shards.len() as u64) as usize
    }

    /// The marker, the version and both current generations, in one round trip.
    async fn read_meta(
        &self,
        s: &RedisStore,
        bound: &Bound,
        extra: &[String],
    ) -> Result<(Meta, Vec<Value>), StoreError> {
        self.read_meta_with(s, bound, extra, false).await
    }

    /// [`Self::read_meta`], with the names of sources `extra`, and when `pending` the numbers of
    /// the adds under way (last in the reply).
    async fn read_meta_with(
        &self,
        s: &RedisStore,
        bound: &Bound,
        extra: &[String],
        pending: bool,
    ) -> Result<(Meta, Vec<Value>), StoreError> {
        let mut pipe = redis::pipe();
        pipe.hget(s.key("marker"), "dataset_id")
            .get(s.key("version"))
            .get(s.key("gen:1"))
            .get(s.key("gen:2"));
        for sid in extra {
            pipe.hget(s.key("src"), sid);
        }
        if pending {
            pipe.hkeys(s.key("pending"));
        }
        let reply: Vec<Value> = pipe.query_async(&mut s.conn()).await.map_err(store_error)?;
        let mut it = reply.into_iter();
        let marker = it.next().as_ref().and_then(text_of).unwrap_or_default();
        if marker != bound.dataset {
            return Err(changed());
        }
        let version = version_of(&it.next().unwrap_or(Value::Nil))?;
        let mut next_gen = || {
            it.next()
                .as_ref()
                .and_then(int_of)
                .and_then(|g| u64::try_from(g).ok())
                .unwrap_or(0)
        };
        let gens = (next_gen(), next_gen());
        Ok((Meta { version, gens }, it.collect()))
    }

    fn check_shard_marker(bound: &Bound, marker: Option<&Value>) -> Result<(), StoreError> {
        if marker.and_then(text_of).as_deref() == Some(bound.dataset.as_str()) {
            Ok(())
        } else {
            Err(StoreError::NotInitialised(
                "a Redis Cluster shard's dataset marker is missing or differs (a master that \
                 restarted empty, or a reset); failing closed"
                    .into(),
            ))
        }
    }

    /// Which shards each master serves, from `CLUSTER SLOTS` (cached until an error).
    async fn masters(&self, s: &RedisStore, bound: &Bound) -> Result<Arc<Masters>, StoreError> {
        if let Some(m) = self.masters.lock().clone() {
            return Ok(m);
        }
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut s.conn())
            .await
            .map_err(store_error)?;
        // [[start, end, [host, port, id], replicas...], ...]
        let mut ranges = Vec::new();
        for range in array(slots)? {
            let range = array(range)?;
            let bound_of = |i: usize| {
                range
                    .get(i)
                    .and_then(int_of)
                    .and_then(|v| u16::try_from(v).ok())
            };
            let master = range.get(2).cloned().map(array).transpose()?.map(|m| {
                m.iter()
                    .take(2)
                    .filter_map(text_of)
                    .collect::<Vec<_>>()
                    .join(":")
            });
            if let (Some(lo), Some(hi), Some(master)) = (bound_of(0), bound_of(1), master) {
                ranges.push((lo, hi, master));
            }
        }
        let mut by_master: HashMap<&str, Vec<usize>> = HashMap::new();
        for (shard, tag) in bound.shards.iter().enumerate() {
            let slot = key_slot(s.shard_marker(tag).as_bytes());
            let (_, _, master) = ranges
                .iter()
                .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
                .ok_or_else(|| {
                    StoreError::Unavailable(
                        format!("no Redis Cluster master serves slot {slot}").into(),
                    )
                })?;
            by_master.entry(master.as_str()).or_default().push(shard);
        }
        let mut group_of = vec![0; bound.shards.len()];
        let mut route_slot = Vec::new();
        for (g, shards) in by_master.into_values().enumerate() {
            for &shard in &shards {
                group_of[shard] = g;
            }
            route_slot.push(key_slot(
                s.shard_marker(&bound.shards[shards[0]]).as_bytes(),
            ));
        }
        let masters = Arc::new(Masters {
            group_of,
            route_slot,
        });
        *self.masters.lock() = Some(masters.clone());
        Ok(masters)
    }

    async fn lookup_cluster(
        &self,
        s: &RedisStore,
        bound: &Bound,
        numbers: &[NhsNumber],
    ) -> Result<Lookup, StoreError> {
        let result = self.lookup_by_master(s, bound, numbers).await;
        if result.is_err() {
            // A slot may have moved or a master failed over: learn the masters again next time.
            *self.masters.lock() = None;
        }
        result
    }

    async fn lookup_by_master(
        &self,
        s: &RedisStore,
        bound: &Bound,
        numbers: &[NhsNumber],
    ) -> Result<Lookup, StoreError> {
        let masters = self.masters(s, bound).await?;
        // Per master: the numbers it holds, and the shards they are in.
        let mut groups: HashMap<usize, (Vec<usize>, Vec<usize>)> = HashMap::new();
        for (i, n) in numbers.iter().enumerate() {
            let shard = Self::shard_of(bound, *n);
            let (idx, shards) = groups.entry(masters.group_of[shard]).or_default();
            idx.push(i);
            if !shards.contains(&shard) {
                shards.push(shard);
            }
        }
        let Conn::Cluster(cluster) = &s.inner.conn else {
            return Err(StoreError::Unavailable(
                "not a Redis Cluster connection".into(),
            ));
        };
        let (groups, masters) = (&groups, &masters);
        let (held, meta, _) = self
            .under_current_generations(s, bound, |(g1, g2)| async move {
                // One pipeline per master: two HEXISTS per number, then each shard's marker.
                let reads = groups.iter().map(|(&g, (idx, shards))| {
                    let mut pipe = redis::pipe();
                    for &i in idx {
                        let n = numbers[i].as_u64();
                        let b = n % bound.buckets;
                        pipe.cmd("HEXISTS")
                            .arg(s.data_key(bound, "1", g1, b))
                            .arg(n);
                        pipe.cmd("HEXISTS")
                            .arg(s.data_key(bound, "2", g2, b))
                            .arg(n);
                    }
                    for &shard in shards {
                        pipe.get(s.shard_marker(&bound.shards[shard]));
                    }
                    let count = idx.len() * 2 + shards.len();
                    cluster.pipeline_to_slot(pipe, count, masters.route_slot[g])
                });
                let replies = futures::future::join_all(reads).await;
                let mut held = vec![OptOutSet::EMPTY; numbers.len()];
                for ((idx, shards), reply) in groups.values().zip(replies) {
                    let reply = reply.map_err(store_error)?;
                    if reply.len() != idx.len() * 2 + shards.len() {
                        return Err(StoreError::Corrupt(
                            format!(
                                "a shard pipeline of {} commands answered {}",
                                idx.len() * 2 + shards.len(),
                                reply.len()
                            )
                            .into(),
                        ));
                    }
                    for marker in &reply[idx.len() * 2..] {
                        Self::check_shard_marker(bound, Some(marker))?;
                    }
                    for (j, &i) in idx.iter().enumerate() {
                        if flag(&reply[j * 2])? {
                            held[i].insert(OptOutType::NationalDataOptOut);
                        }
                        if flag(&reply[j * 2 + 1])? {
                            held[i].insert(OptOutType::Type1);
                        }
                    }
                }
                Ok((held, Vec::new()))
            })
            .await?;
        Ok(Lookup {
            held,
            version: meta.version,
        })
    }

    async fn get_cluster(
        &self,
        s: &RedisStore,
        bound: &Bound,
        number: NhsNumber,
    ) -> Result<(Vec<OptOutRecord>, Version), StoreError> {
        let n = number.as_u64();
        let b = n % bound.buckets;
        let shard = Self::shard_of(bound, number);
        let (values, meta, sources) = self
            .under_current_generations(s, bound, |(g1, g2)| async move {
                let (v1, v2, marker): (Option<String>, Option<String>, Value) = redis::pipe()
                    .hget(s.data_key(bound, "1", g1, b), n)
                    .hget(s.data_key(bound, "2", g2, b), n)
                    .get(s.shard_marker(&bound.shards[shard]))
                    .query_async(&mut s.conn())
                    .await
                    .map_err(store_error)?;
                Self::check_shard_marker(bound, Some(&marker))?;
                let values: Vec<(OptOutType, String)> = OptOutType::ALL
                    .into_iter()
                    .zip([v1, v2])
                    .filter_map(|(t, v)| Some((t, v.filter(|v| !v.is_empty())?)))
                    .collect();
                // The sources' names are read with the generations, by their ids.
                let sids = values
                    .iter()
                    .map(|(_, v)| v.rsplit(',').next().unwrap_or_default().to_string())
                    .collect();
                Ok((values, sids))
            })
            .await?;
        let records = values
            .iter()
            .zip(sources.iter().map(|s| text_of(s).unwrap_or_default()))
            .map(|((t, v), source)| OptOutRecord {
                kind: *t,
                recorded_at_ms: v
                    .split(',')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                source,
            })
            .collect();
        Ok((records, meta.version))
    }

    /// Reads the metadata, reads with `read` under its generations, then reads the metadata
    /// again (with the source names `read` asks for) and repeats if an import replaced a
    /// generation meanwhile: generations only grow, so equal before and after means unchanged
    /// throughout. The answer claims the version read *before* the data: every change finished
    /// by then is in the data; one finished later may not be, so claiming the later version could
    /// answer "no opt-out" at a version that includes the opt-out.
    async fn under_current_generations<T, F>(
        &self,
        s: &RedisStore,
        bound: &Bound,
        mut read: impl FnMut((u64, u64)) -> F,
    ) -> Result<(T, Meta, Vec<Value>), StoreError>
    where
        F: Future<Output = Result<(T, Vec<String>), StoreError>>,
    {
        for _ in 0..3 {
            let (before, _) = self.read_meta(s, bound, &[]).await?;
            let (value, sids) = read(before.gens).await?;
            let (after, sources) = self.read_meta(s, bound, &sids).await?;
            if after.version < before.version {
                return Err(StoreError::Regressed(
                    format!(
                        "the store's version went from {} to {} during one lookup",
                        before.version, after.version
                    )
                    .into(),
                ));
            }
            if after.gens == before.gens {
                return Ok((value, before, sources));
            }
        }
        Err(StoreError::Unavailable(
            "imports replaced the opt-out lists during three reads in a row; withholding".into(),
        ))
    }

    async fn change_cluster(
        &self,
        s: &RedisStore,
        bound: &Bound,
        c: Change<'_>,
    ) -> Result<WriteOutcome, StoreError> {
        let Change {
            kind,
            opt_out,
            numbers,
            source,
            audit,
        } = c;
        let t = type_code(opt_out);
        let add = kind == ChangeKind::Add;
        // 1. Metadata, atomically: refuse during an import; log the change (adds and removals
        // alike, before any record changes) and register it as an intent holding everything
        // needed to finish it, its audit record included.
        let now = now_ms();
        let mut inv = s.inner.scripts.cluster_begin.prepare_invoke();
        inv.key(s.key("marker"))
            .arg(&s.inner.prefix)
            .arg(&bound.dataset)
            .arg(t)
            .arg(source)
            .arg(s.inner.log_len)
            .arg(if add { "a" } else { "r" })
            .arg(csv_of(numbers))
            .arg(now)
            .arg(audit_json(audit)?);
        let (id, g, go, sid): (String, String, String, String) = inv
            .invoke_async(&mut s.write_conn())
            .await
            .map_err(store_error)?;
        // 2 and 3: the records in each shard, then the counts and the audit record. The intent
        // is at hand: what step 1 stored, so a recovery finishes it the same way.
        let intent = Intent {
            t: t.to_string(),
            add,
            g,
            go,
            value: format!("{now},{sid}"),
            numbers: numbers.to_vec(),
        };
        let applied = self.finish_intent(s, bound, &id, &intent).await?;
        s.confirm_everywhere().await?;
        Ok(WriteOutcome {
            version: Version::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string().into()))?,
            applied,
        })
    }

    /// Carries a registered change to its end: each shard's records (once per shard, however
    /// often this runs: a shard remembers its result), then one metadata step that counts it,
    /// writes its audit record and retires the intent. Safe to run concurrently with the change
    /// itself or another replica's recovery. Returns the numbers that changed.
    async fn finish_intent(
        &self,
        s: &RedisStore,
        bound: &Bound,
        id: &str,
        intent: &Intent,
    ) -> Result<u64, StoreError> {
        let Intent {
            t,
            add,
            g,
            go,
            value,
            numbers,
        } = intent;
        let add = *add;
        let other = if t == "1" { "2" } else { "1" };
        let mut groups: HashMap<usize, Vec<NhsNumber>> = HashMap::new();
        for n in numbers {
            groups
                .entry(Self::shard_of(bound, *n))
                .or_default()
                .push(*n);
        }
        let writes = groups.iter().map(|(&shard, list)| {
            let tag = &bound.shards[shard];
            let mut inv = s.inner.scripts.cluster_shard.prepare_invoke();
            inv.key(s.shard_marker(tag))
                .arg(&bound.dataset)
                .arg(if add { "a" } else { "r" })
                .arg(value)
                .arg(format!("{}{{{tag}}}done:{id}", s.inner.data_prefix));
            for n in list {
                let b = n.as_u64() % bound.buckets;
                inv.arg(s.data_key(bound, t, g, b))
                    .arg(s.data_key(bound, other, go, b))
                    .arg(n.as_u64());
            }
            let mut conn = s.write_conn();
            async move { inv.invoke_async::<(i64, i64)>(&mut conn).await }
        });
        let (mut applied, mut patients) = (0i64, 0i64);
        for r in futures::future::join_all(writes).await {
            let (a, p) = r.map_err(store_error)?;
            applied += a;
            patients += p;
        }
        let mut inv = s.inner.scripts.cluster_end.prepare_invoke();
        inv.key(s.key("marker"))
            .arg(&s.inner.prefix)
            .arg(&bound.dataset)
            .arg(id)
            .arg(applied)
            .arg(patients)
            .arg(s.inner.audit_len);
        let done: i64 = inv
            .invoke_async(&mut s.write_conn())
            .await
            .map_err(store_error)?;
        Ok(u64::try_from(done).unwrap_or(0))
    }

    /// Finishes the changes whose writer stopped between the steps (a crash, a lost connection,
    /// a paused master): every registered intent older than `grace`. Their log entries are
    /// already read by the filters, so until then they are "maybe"s, never releases.
    async fn recover_intents(&self, s: &RedisStore, grace_ms: u64) -> Result<u64, StoreError> {
        let bound = s.bound()?;
        let pending: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(s.key("intents"))
            .query_async(&mut s.write_conn())
            .await
            .map_err(store_error)?;
        let now = now_ms();
        let mut finished = 0;
        for (id, at) in pending {
            if at
                .parse::<u64>()
                .is_ok_and(|at| now.saturating_sub(at) < grace_ms)
            {
                continue;
            }
            let fields: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(s.key(&format!("intent:{id}")))
                .query_async(&mut s.write_conn())
                .await
                .map_err(store_error)?;
            let Some(intent) = Intent::from_fields(&fields)? else {
                continue; // finished meanwhile
            };
            self.finish_intent(s, &bound, &id, &intent).await?;
            finished += 1;
            tracing::warn!(version = %id, "finished an opt-out change its writer left half-done");
        }
        Ok(finished)
    }

    async fn scan_cluster(&self, s: &RedisStore, bound: &Bound) -> Result<Scan, StoreError> {
        // Read before the records: the follower replays the log from here. The numbers of adds
        // under way are read in the same step: an add logged before this version whose shard
        // write lands after its shard is scanned is in neither the scan nor the replayed log, so
        // it goes into the filter from here (a finished add is in its shard before it finishes).
        let (before, pending) = self.read_meta_with(s, bound, &[], true).await?;
        let (g1, g2) = before.gens;
        let mut numbers = Vec::new();
        for v in pending
            .iter()
            .flat_map(|v| array(v.clone()).unwrap_or_default())
        {
            numbers.push(stored_number(&v)?);
        }
        let groups = s.bucket_groups(bound);
        let reads = futures::stream::iter(groups.into_iter().map(|group| {
            let shard = (group[0] % bound.shards.len() as u64) as usize;
            let mut pipe = redis::pipe();
            for &b in &group {
                pipe.hkeys(s.data_key(bound, "1", g1, b))
                    .hkeys(s.data_key(bound, "2", g2, b));
            }
            pipe.get(s.shard_marker(&bound.shards[shard]));
            let mut conn = s.write_conn();
            async move { pipe.query_async::<Vec<Value>>(&mut conn).await }
        }))
        .buffer_unordered(SCAN_PARALLEL);
        futures::pin_mut!(reads);
        while let Some(reply) = reads.next().await {
            let mut reply = reply.map_err(store_error)?;
            let marker = reply.pop();
            Self::check_shard_marker(bound, marker.as_ref())?;
            for list in reply {
                for v in array(list)? {
                    numbers.push(stored_number(&v)?);
                }
            }
        }
        let (after, _) = self.read_meta(s, bound, &[]).await?;
        if after.gens != before.gens {
            return Err(StoreError::Unavailable(
                "an import was applied during the scan; scanning again".into(),
            ));
        }
        Ok(Scan {
            numbers,
            version: before.version,
        })
    }
}
