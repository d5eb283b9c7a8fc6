//! A change on a Redis Cluster, in three steps (begin, each shard, end), and the recovery of
//! changes whose writer stopped between them.

use super::*;

/// A change registered by step 1: what its shard steps need.
pub(super) struct Intent {
    /// Type code ("1" national, "2" type 1).
    pub(super) t: String,
    pub(super) add: bool,
    /// Generations of the type and of the other type when it began.
    pub(super) g: String,
    pub(super) go: String,
    /// The record value of an added number: `recorded_at_ms,source_id`.
    pub(super) value: String,
    pub(super) numbers: Vec<NhsNumber>,
    /// Type 1: the practice whose objection is recorded or withdrawn ('' otherwise, and in an
    /// intent written before practices were).
    pub(super) practice: String,
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
            practice: field("pr"),
        }))
    }
}

impl Cluster {
    pub(super) async fn change_cluster(
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
        let t = type_code(opt_out);
        let add = kind == ChangeKind::Add;
        // 1. Metadata, atomically: refuse during an import; log the change (adds and removals
        // alike, before any record changes) and register it as an intent holding everything
        // needed to finish it, its audit record included.
        let now = now_ms();
        let seen = s.seen();
        let (json, mac) = s.signed_record(audit)?;
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
            .arg(json)
            .arg(seen.unwrap_or(Version::ZERO).to_string())
            .arg(mac)
            .arg(practice.map(Practice::stored).unwrap_or_default());
        let (id, g, go, sid, held): (String, String, String, String, i64) = inv
            .invoke_async(&mut s.write_conn())
            .await
            .map_err(store_error)?;
        let version = Version::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string().into()))?;
        s.wrote(seen, held == 1, version);
        // 2 and 3: the records in each shard, then the counts and the audit record. The intent
        // is at hand: what step 1 stored, so a recovery finishes it the same way.
        let intent = Intent {
            t: t.to_string(),
            add,
            g,
            go,
            value: format!("{now},{sid}"),
            numbers: numbers.to_vec(),
            practice: practice.map(|p| p.stored().to_string()).unwrap_or_default(),
        };
        let applied = self.finish_intent(s, bound, &id, &intent).await?;
        s.confirm_everywhere().await?;
        Ok(WriteOutcome { version, applied })
    }

    /// Carries a registered change to its end: each shard's records (once per shard, however
    /// often this runs: a shard remembers its result), then one metadata step that counts it,
    /// writes its audit record and retires the intent. Safe to run concurrently with the change
    /// itself or another replica's recovery. Returns the numbers that changed.
    pub(super) async fn finish_intent(
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
            practice,
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
                .arg(format!("{}{{{tag}}}done:{id}", s.inner.data_prefix))
                .arg(practice);
            for n in list {
                let b = n.as_u64() % bound.buckets;
                inv.arg(s.data_key(bound, t, g, b))
                    .arg(s.data_key(bound, other, go, b))
                    .arg(n.as_u64());
            }
            let mut conn = s.write_conn();
            async move { inv.invoke_async::<(i64, i64, i64)>(&mut conn).await }
        });
        let (mut moved, mut patients, mut applied) = (0i64, 0i64, 0i64);
        for r in futures::future::join_all(writes).await {
            let (m, p, a) = r.map_err(store_error)?;
            moved += m;
            patients += p;
            applied += a;
        }
        let mut inv = s.inner.scripts.cluster_end.prepare_invoke();
        inv.key(s.key("marker"))
            .arg(&s.inner.prefix)
            .arg(&bound.dataset)
            .arg(id)
            .arg(moved)
            .arg(patients)
            .arg(applied);
        let done: i64 = inv.invoke_async(&mut s.write_conn()).await.map_err(|e| {
            if matches!(ScriptError::of(&e), Some((ScriptError::Lost, _))) {
                tracing::error!(
                    version = %id,
                    numbers = numbers.len(),
                    "a change's first step was lost by the store (a failover of the \
                     metadata's master) after its shards were changed: those changes have no \
                     log entry or audit record; the change is not acknowledged"
                );
            }
            store_error(e)
        })?;
        Ok(u64::try_from(done).unwrap_or(0))
    }

    /// Finishes the changes whose writer stopped between the steps (a crash, a lost connection,
    /// a paused master): every registered intent older than `grace`. Their log entries are
    /// already read by the filters, so until then they are "maybe"s, never releases.
    pub(super) async fn recover_intents(
        &self,
        s: &RedisStore,
        grace_ms: u64,
    ) -> Result<u64, StoreError> {
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
}
