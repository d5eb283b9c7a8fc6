//! The seam between the store and its topology, and the layout of one Redis (alone or behind
//! Sentinel).
//!
//! How opt-outs are laid out and read differs between one Redis (every key on one node, every
//! change one script) and a Redis Cluster (data in shards on many masters, a change in steps; see
//! `cluster.rs`). [`Layout`] is that difference: chosen once at connect, it carries every
//! operation whose Redis commands depend on the topology. Everything else (the change feed,
//! snapshots, imports, audit) is written once against the metadata keys, which every topology
//! keeps in one hash slot.

use std::{
    fmt::Write,
    sync::atomic::{AtomicU64, Ordering},
};

use async_trait::async_trait;
use redis::{ScriptInvocation, Value};

use super::{
    Bound, RedisStore,
    conn::Conn,
    reply::{
        array, bucket_pairs, flag, generation_of, stored_number, text_of, type_code, version_of,
    },
    scripts::{changed, store_error},
};
use crate::{
    core::{AuditRecord, NhsNumber, OptOutSet, OptOutType, Practice, Version},
    store::{ChangeKind, Lookup, OptOutRecord, StoreError, WriteOutcome, now_ms},
};

/// An admin change of one type for a list of numbers, with its audit record.
pub(super) struct Change<'a> {
    pub kind: ChangeKind,
    pub opt_out: OptOutType,
    /// Type 1: the practice whose objection is recorded or withdrawn.
    pub practice: Option<&'a Practice>,
    pub numbers: &'a [NhsNumber],
    pub source: &'a str,
    pub audit: &'a AuditRecord,
}

/// What differs between topologies. `s` is the store (connections, keys, scripts); `bound` the
/// dataset it is bound to.
#[async_trait]
pub(super) trait Layout: Send + Sync + 'static {
    /// The opt-out types of `types` held by each number, with the version the answer reflects.
    async fn lookup(
        &self,
        s: &RedisStore,
        bound: &Bound,
        numbers: &[NhsNumber],
        types: OptOutSet,
    ) -> Result<Lookup, StoreError>;

    /// The records of one number.
    async fn get(
        &self,
        s: &RedisStore,
        bound: &Bound,
        number: NhsNumber,
    ) -> Result<(Vec<OptOutRecord>, Version), StoreError>;

    /// Applies an admin change with its log entry and audit record; acknowledged only once
    /// replicated as asked.
    async fn change(
        &self,
        s: &RedisStore,
        bound: &Bound,
        c: Change<'_>,
    ) -> Result<WriteOutcome, StoreError>;

    /// Every opted-out number, a page at a time, and the version the follower replays the log
    /// from.
    async fn scan_pages(
        &self,
        s: &RedisStore,
        bound: &Bound,
        page: &mut (dyn for<'n> FnMut(&'n [NhsNumber]) + Send),
    ) -> Result<Version, StoreError>;

    /// Runs a script that changes opt-outs and waits until `s`'s replicas-ack confirmed it.
    async fn run_durable(
        &self,
        s: &RedisStore,
        inv: &ScriptInvocation<'_>,
        conn: &mut Conn,
    ) -> Result<Value, StoreError>;

    /// Shard tags a new store is initialised with (none on one node).
    fn new_shards(&self) -> Vec<String> {
        Vec::new()
    }

    /// `init`'s steps before the dataset marker is written (which makes the store usable).
    async fn prepare_init(
        &self,
        _s: &RedisStore,
        _tags: &[String],
        _id: &str,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// `init`'s steps after the dataset marker is written.
    async fn finish_init(
        &self,
        _s: &RedisStore,
        _tags: &[String],
        _id: &str,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// Checks a dataset being bound beyond its marker (eviction on every node, the shards).
    async fn check_binding(&self, _s: &RedisStore, _shards: &[String]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Finishes changes whose writer stopped half-way.
    async fn recover(&self, _s: &RedisStore) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Whether the node reached may have stopped being the master (Sentinel): then the feed and
    /// the safety check ask it `ROLE`.
    fn may_be_demoted(&self) -> bool {
        false
    }
}

/// One Redis, alone or the master Sentinel names: every key on one node, every change one script.
pub(super) struct Flat {
    /// Behind Sentinel: the node may be demoted under a connection.
    pub sentinel: bool,
    /// The generations the lookups last found current.
    pub generations: LastGenerations,
}

impl Flat {
    pub(super) fn new(sentinel: bool) -> Flat {
        Flat {
            sentinel,
            generations: LastGenerations::default(),
        }
    }
}

/// How many times a lookup is tried when imports keep replacing a generation under it.
const GENERATION_TRIES: usize = 3;

/// Adds the reads of the dataset marker, the version, the generations and whether the store
/// still holds the entry of `seen` (see `continuity.rs`) to `pipe`; their replies are
/// [`read_meta`]'s (every topology keeps these keys in one hash slot).
pub(super) fn push_meta_reads(pipe: &mut redis::Pipeline, s: &RedisStore, seen: Option<Version>) {
    pipe.hget(s.key("marker"), "dataset_id")
        .get(s.key("version"))
        .get(s.key("gen:1"))
        .get(s.key("gen:2"))
        .hget(s.key("ids"), seen.unwrap_or(Version::ZERO).to_string());
}

/// The version, the generations and whether the seen entry is held, from the replies of
/// [`push_meta_reads`] at the head of `reply`, if the store is still bound's dataset.
pub(super) fn read_meta(
    reply: &mut impl Iterator<Item = Value>,
    bound: &Bound,
) -> Result<(Version, Generations, bool), StoreError> {
    let marker = reply.next().as_ref().and_then(text_of).unwrap_or_default();
    if marker != bound.dataset {
        return Err(changed());
    }
    let version = version_of(&reply.next().unwrap_or(Value::Nil))?;
    let generations = Generations {
        national: generation_of(reply.next())?,
        type1: generation_of(reply.next())?,
    };
    // `HGET` rather than `HEXISTS`: the data reads are counted by their command in tests.
    let held = !matches!(reply.next(), None | Some(Value::Nil));
    Ok((version, generations, held))
}

/// The current generation of each opt-out type (`P gen:{t}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Generations {
    pub national: u64,
    pub type1: u64,
}

impl Generations {
    fn of(self, t: OptOutType) -> u64 {
        match t {
            OptOutType::NationalDataOptOut => self.national,
            OptOutType::Type1 => self.type1,
        }
    }
}

/// The generations the last lookup found, shared by concurrent lookups. A lookup that puts back
/// an older one than another's costs the next lookup a repeat, nothing more; and a store restored
/// to older generations is followed (the safety check reports the restore itself).
#[derive(Debug, Default)]
pub(super) struct LastGenerations {
    national: AtomicU64,
    type1: AtomicU64,
}

impl LastGenerations {
    fn load(&self) -> Generations {
        Generations {
            national: self.national.load(Ordering::Relaxed),
            type1: self.type1.load(Ordering::Relaxed),
        }
    }

    fn store(&self, g: Generations) {
        self.national.store(g.national, Ordering::Relaxed);
        self.type1.store(g.type1, Ordering::Relaxed);
    }
}

/// The types held by each number from the lookup's `HEXISTS` answers (one a number and type
/// asked, in [`OptOutSet::iter`] order). A count that does not match, or any answer [`flag`]
/// refuses, is an error, never "not held".
fn read_held(
    replies: impl ExactSizeIterator<Item = Value>,
    count: usize,
    types: OptOutSet,
) -> Result<Vec<OptOutSet>, StoreError> {
    let per = types.iter().count();
    if replies.len() != count * per {
        return Err(StoreError::Corrupt(
            format!(
                "a lookup of {count} numbers answered {} reads for {per} types each",
                replies.len()
            )
            .into(),
        ));
    }
    let mut held = vec![OptOutSet::EMPTY; count];
    let asked = (0..count).flat_map(|i| types.iter().map(move |t| (i, t)));
    for ((i, t), v) in asked.zip(replies) {
        if flag(&v)? {
            held[i].insert(t);
        }
    }
    Ok(held)
}

#[async_trait]
impl Layout for Flat {
    /// One `MULTI`/`EXEC` transaction: the marker, the version and the generations, then a
    /// `HEXISTS` per number and type asked, in keys named from the generations the last lookup
    /// found. The transaction is atomic, so when the generations it read are the ones its keys
    /// were named from, every read in it saw the same state; when an import swapped a generation
    /// in since, the lookup is repeated with the new one. (A Lua script did the same in one call,
    /// but costs Redis about a fifth more CPU a lookup: each `redis.call` converts its arguments and
    /// reply through Lua.)
    async fn lookup(
        &self,
        s: &RedisStore,
        bound: &Bound,
        numbers: &[NhsNumber],
        types: OptOutSet,
    ) -> Result<Lookup, StoreError> {
        for _ in 0..GENERATION_TRIES {
            let seen = s.must_hold()?;
            let gens = self.generations.load();
            let mut pipe = redis::Pipeline::with_capacity(5 + numbers.len() * types.iter().count());
            push_meta_reads(pipe.atomic(), s, seen);
            // Each key written into one buffer and each command allocated at its size: a lookup
            // sends a command a "maybe" number, and their allocations showed in the profile.
            let bases: Vec<String> = types
                .iter()
                .map(|t| s.flat_data_key_base(type_code(t), gens.of(t)))
                .collect();
            let mut key = String::new();
            for n in numbers {
                for base in &bases {
                    key.clear();
                    key.push_str(base);
                    let _ = write!(key, "{}", n.as_u64() % bound.buckets);
                    let mut hexists = redis::Cmd::with_capacity(3, key.len() + 32);
                    hexists.arg("HEXISTS").arg(key.as_str()).arg(n.as_u64());
                    pipe.add_command(hexists);
                }
            }
            let reply: Vec<Value> = pipe.query_async(&mut s.conn()).await.map_err(store_error)?;
            let mut reply = reply.into_iter();
            let (version, current, held) = read_meta(&mut reply, bound)?;
            s.prove_held(seen, held, version).await?;
            if types.iter().any(|t| current.of(t) != gens.of(t)) {
                self.generations.store(current);
                continue;
            }
            let held = read_held(reply, numbers.len(), types)?;
            return Ok(Lookup { held, version });
        }
        Err(StoreError::Unavailable(
            format!(
                "imports replaced the opt-out lists during {GENERATION_TRIES} lookups in a row; \
                 withholding"
            )
            .into(),
        ))
    }

    async fn get(
        &self,
        s: &RedisStore,
        bound: &Bound,
        number: NhsNumber,
    ) -> Result<(Vec<OptOutRecord>, Version), StoreError> {
        let reply: Value = s
            .inner
            .scripts
            .get
            .prepare_invoke()
            .arg(&s.inner.prefix)
            .arg(number.as_u64() % bound.buckets)
            .arg(number.as_u64())
            .invoke_async(&mut s.conn())
            .await
            .map_err(store_error)?;
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
                practices: match t {
                    OptOutType::Type1 => crate::stored_practices::of(&value),
                    OptOutType::NationalDataOptOut => Vec::new(),
                },
            });
        }
        Ok((records, version))
    }

    async fn change(
        &self,
        s: &RedisStore,
        bound: &Bound,
        c: Change<'_>,
    ) -> Result<WriteOutcome, StoreError> {
        let Change {
            kind,
            opt_out,
            practice,
            numbers,
            source,
            audit,
        } = c;
        let seen = s.seen();
        let (json, mac) = s.signed_record(audit)?;
        let mut inv = s.inner.scripts.change.prepare_invoke();
        inv.arg(&s.inner.prefix)
            .arg(&bound.dataset)
            .arg(match kind {
                ChangeKind::Add => "a",
                ChangeKind::Remove => "r",
            })
            .arg(type_code(opt_out))
            .arg(now_ms())
            .arg(source)
            .arg(s.inner.log_len)
            .arg(json)
            .arg(seen.unwrap_or(Version::ZERO).to_string())
            .arg(mac)
            .arg(practice.map(Practice::stored).unwrap_or_default())
            .arg(bucket_pairs(numbers, bound.buckets));
        let (id, applied, held): (String, u64, i64) =
            s.invoke_durable(&inv, &mut s.write_conn()).await?;
        let version = Version::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string().into()))?;
        s.wrote(seen, held == 1, version);
        Ok(WriteOutcome { version, applied })
    }

    async fn scan_pages(
        &self,
        s: &RedisStore,
        bound: &Bound,
        page: &mut (dyn for<'n> FnMut(&'n [NhsNumber]) + Send),
    ) -> Result<Version, StoreError> {
        let seen = s.must_hold()?;
        let mut pipe = redis::pipe();
        push_meta_reads(&mut pipe, s, seen);
        let reply: Vec<Value> = pipe.query_async(&mut s.conn()).await.map_err(store_error)?;
        // Read before the records: the follower replays the log from here, which adds whatever
        // the scan misses of later changes.
        let (version, _, held) = read_meta(&mut reply.into_iter(), bound)?;
        s.prove_held(seen, held, version).await?;
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
            let reply: Value = s
                .inner
                .scripts
                .scan
                .prepare_invoke()
                .arg(&s.inner.prefix)
                .arg(&bound.dataset)
                .arg(from)
                .arg(to)
                .invoke_async(&mut s.write_conn())
                .await
                .map_err(store_error)?;
            numbers.clear();
            for v in array(reply)? {
                numbers.push(stored_number(&v)?);
            }
            page(&numbers);
            from = to + 1;
        }
        Ok(version)
    }

    /// The script and `WAIT` in the same round trip on the same connection, so the confirmation
    /// is for this change.
    async fn run_durable(
        &self,
        s: &RedisStore,
        inv: &ScriptInvocation<'_>,
        conn: &mut Conn,
    ) -> Result<Value, StoreError> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(inv)
            .cmd("WAIT")
            .arg(s.inner.replicas_ack)
            .arg(s.ack_timeout_ms());
        let reply: Result<(Value, i64), _> = match pipe.query_async(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                inv.load_async(conn).await.map_err(store_error)?;
                pipe.query_async(conn).await
            }
            other => other,
        };
        let (value, acked) = reply.map_err(store_error)?;
        s.enough_acks(acked)?;
        Ok(value)
    }

    fn may_be_demoted(&self) -> bool {
        self.sentinel
    }
}
