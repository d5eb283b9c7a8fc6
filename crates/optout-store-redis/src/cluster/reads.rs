//! Reads on a Redis Cluster: lookups (one pipeline per master), gets and scans, each proven
//! consistent by the metadata read before and after it.

use super::*;

/// Metadata read after the data: the proof that the data was read under these generations.
pub(super) struct Meta {
    pub(super) version: Version,
    pub(super) gens: (u64, u64),
}

/// The shards each master serves: `group_of[shard]` is its master's group, `route_slot[group]` a
/// slot of that master to route the group's pipeline by.
pub(super) struct Masters {
    pub(super) group_of: Vec<usize>,
    pub(super) route_slot: Vec<u16>,
}

/// Shard pipelines of a bulk read (scan) in flight at once.
pub(super) const SCAN_PARALLEL: usize = 4;

impl Cluster {
    pub(super) fn shard_of(bound: &Bound, number: NhsNumber) -> usize {
        ((number.as_u64() % bound.buckets) % bound.shards.len() as u64) as usize
    }

    /// The marker, the version and both current generations, in one round trip.
    pub(super) async fn read_meta(
        &self,
        s: &RedisStore,
        bound: &Bound,
        extra: &[String],
    ) -> Result<(Meta, Vec<Value>), StoreError> {
        self.read_meta_with(s, bound, extra, false).await
    }

    /// [`Self::read_meta`], with the names of sources `extra`, and when `pending` the numbers of
    /// the adds under way (last in the reply).
    pub(super) async fn read_meta_with(
        &self,
        s: &RedisStore,
        bound: &Bound,
        extra: &[String],
        pending: bool,
    ) -> Result<(Meta, Vec<Value>), StoreError> {
        let seen = s.must_hold()?;
        let mut pipe = redis::pipe();
        push_meta_reads(&mut pipe, s, seen);
        for sid in extra {
            pipe.hget(s.key("src"), sid);
        }
        if pending {
            pipe.hkeys(s.key("pending"));
        }
        let reply: Vec<Value> = pipe.query_async(&mut s.conn()).await.map_err(store_error)?;
        let mut it = reply.into_iter();
        let (version, g, held) = read_meta(&mut it, bound)?;
        s.prove_held(seen, held, version).await?;
        let gens = (g.national, g.type1);
        Ok((Meta { version, gens }, it.collect()))
    }

    pub(super) fn check_shard_marker(
        bound: &Bound,
        marker: Option<&Value>,
    ) -> Result<(), StoreError> {
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
    pub(super) async fn masters(
        &self,
        s: &RedisStore,
        bound: &Bound,
    ) -> Result<Arc<Masters>, StoreError> {
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

    pub(super) async fn lookup_cluster(
        &self,
        s: &RedisStore,
        bound: &Bound,
        numbers: &[NhsNumber],
        types: OptOutSet,
    ) -> Result<Lookup, StoreError> {
        let result = self.lookup_by_master(s, bound, numbers, types).await;
        if result.is_err() {
            // A slot may have moved or a master failed over: learn the masters again next time.
            *self.masters.lock() = None;
        }
        result
    }

    pub(super) async fn lookup_by_master(
        &self,
        s: &RedisStore,
        bound: &Bound,
        numbers: &[NhsNumber],
        types: OptOutSet,
    ) -> Result<Lookup, StoreError> {
        let masters = self.masters(s, bound).await?;
        // Each number's HEXISTS go into a pipeline in the order of `types.iter()`.
        let per = types.iter().count();
        let groups = Self::group_by_master(bound, &masters, numbers);
        let Conn::Cluster(cluster) = &s.inner.conn else {
            return Err(StoreError::Unavailable(
                "not a Redis Cluster connection".into(),
            ));
        };
        let (groups, masters) = (&groups, &masters);
        let (mut held, meta, _, pending) = self
            .under_current_generations(s, bound, true, |(g1, g2)| async move {
                // One pipeline per master: a HEXISTS per number and type asked, then each
                // shard's marker.
                let reads = groups.iter().map(|(&g, (idx, shards))| {
                    let mut pipe = redis::pipe();
                    for &i in idx {
                        let n = numbers[i].as_u64();
                        let b = n % bound.buckets;
                        for t in types.iter() {
                            let (code, generation) = match t {
                                OptOutType::NationalDataOptOut => ("1", g1),
                                OptOutType::Type1 => ("2", g2),
                            };
                            pipe.cmd("HEXISTS")
                                .arg(s.data_key(bound, code, generation, b))
                                .arg(n);
                        }
                    }
                    for &shard in shards {
                        pipe.get(s.shard_marker(&bound.shards[shard]));
                    }
                    let count = idx.len() * per + shards.len();
                    cluster.pipeline_to_slot(pipe, count, masters.route_slot[g])
                });
                let replies = futures::future::join_all(reads).await;
                let mut held = vec![OptOutSet::EMPTY; numbers.len()];
                for ((idx, shards), reply) in groups.values().zip(replies) {
                    let reply = reply.map_err(store_error)?;
                    Self::read_group(bound, types, idx, shards.len(), &reply, &mut held)?;
                }
                Ok((held, Vec::new()))
            })
            .await?;
        // An add logged at or before the version this answer claims, whose shard write has not
        // landed yet, is in `pending`: held, as the claimed version says (found by the nemesis:
        // a check answered "no opt-out" at the very version of an add still under way).
        let pending: std::collections::HashSet<u64> = pending
            .iter()
            .flat_map(|v| array(v.clone()).unwrap_or_default())
            .map(|v| stored_number(&v).map(|n| n.as_u64()))
            .collect::<Result<_, _>>()?;
        if !pending.is_empty() {
            for (h, n) in held.iter_mut().zip(numbers) {
                if pending.contains(&n.as_u64()) {
                    *h = types;
                }
            }
        }
        Ok(Lookup {
            held,
            version: meta.version,
        })
    }

    /// Per master: the positions of the numbers it holds, and the shards they are in.
    fn group_by_master(
        bound: &Bound,
        masters: &Masters,
        numbers: &[NhsNumber],
    ) -> HashMap<usize, (Vec<usize>, Vec<usize>)> {
        let mut groups: HashMap<usize, (Vec<usize>, Vec<usize>)> = HashMap::new();
        for (i, n) in numbers.iter().enumerate() {
            let shard = Self::shard_of(bound, *n);
            let (idx, shards) = groups.entry(masters.group_of[shard]).or_default();
            idx.push(i);
            if !shards.contains(&shard) {
                shards.push(shard);
            }
        }
        groups
    }

    /// One master's pipeline reply: a flag per number (`idx`) and type asked, then its shards'
    /// markers, each checked; the flags go into `held`.
    fn read_group(
        bound: &Bound,
        types: OptOutSet,
        idx: &[usize],
        shards: usize,
        reply: &[Value],
        held: &mut [OptOutSet],
    ) -> Result<(), StoreError> {
        let per = types.iter().count();
        if reply.len() != idx.len() * per + shards {
            return Err(StoreError::Corrupt(
                format!(
                    "a shard pipeline of {} commands answered {}",
                    idx.len() * per + shards,
                    reply.len()
                )
                .into(),
            ));
        }
        for marker in &reply[idx.len() * per..] {
            Self::check_shard_marker(bound, Some(marker))?;
        }
        for (&i, flags) in idx.iter().zip(reply.chunks(per.max(1))) {
            for (t, f) in types.iter().zip(flags) {
                if flag(f)? {
                    held[i].insert(t);
                }
            }
        }
        Ok(())
    }

    pub(super) async fn get_cluster(
        &self,
        s: &RedisStore,
        bound: &Bound,
        number: NhsNumber,
    ) -> Result<(Vec<OptOutRecord>, Version), StoreError> {
        let n = number.as_u64();
        let b = n % bound.buckets;
        let shard = Self::shard_of(bound, number);
        let (values, meta, sources, _) = self
            .under_current_generations(s, bound, false, |(g1, g2)| async move {
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
                    .map(|(_, v)| v.split(',').nth(1).unwrap_or_default().to_string())
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
                practices: match t {
                    OptOutType::Type1 => crate::stored_practices::of(v),
                    OptOutType::NationalDataOptOut => Vec::new(),
                },
            })
            .collect();
        Ok((records, meta.version))
    }

    /// Reads the metadata, reads with `read` under its generations, then reads the metadata
    /// again (with the source names `read` asks for) and repeats if an import replaced a
    /// generation meanwhile: an import's generation is drawn at random and never current
    /// before its swap, so equal before and after means unchanged throughout (short of a store
    /// going back in time, as with a counter). The answer claims the version read *before* the
    /// data: every change finished by then is in the data; one finished later may not be, so
    /// claiming the later version could answer "no opt-out" at a version that includes the
    /// opt-out. With `pending`, the numbers of the adds under way at that version are read with
    /// it (the last value returned): logged, so within the claimed version, but perhaps not in
    /// their shards yet.
    pub(super) async fn under_current_generations<T, F>(
        &self,
        s: &RedisStore,
        bound: &Bound,
        pending: bool,
        mut read: impl FnMut((u64, u64)) -> F,
    ) -> Result<(T, Meta, Vec<Value>, Vec<Value>), StoreError>
    where
        F: Future<Output = Result<(T, Vec<String>), StoreError>>,
    {
        for _ in 0..3 {
            let (before, under_way) = self.read_meta_with(s, bound, &[], pending).await?;
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
                return Ok((value, before, sources, under_way));
            }
        }
        Err(StoreError::Unavailable(
            "imports replaced the opt-out lists during three reads in a row; withholding".into(),
        ))
    }

    pub(super) async fn scan_cluster(
        &self,
        s: &RedisStore,
        bound: &Bound,
        page: &mut (dyn for<'n> FnMut(&'n [NhsNumber]) + Send),
    ) -> Result<Version, StoreError> {
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
        page(&numbers);
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
            numbers.clear();
            for list in reply {
                for v in array(list)? {
                    numbers.push(stored_number(&v)?);
                }
            }
            page(&numbers);
        }
        let (after, _) = self.read_meta(s, bound, &[]).await?;
        if after.gens != before.gens {
            return Err(StoreError::Unavailable(
                "an import was applied during the scan; scanning again".into(),
            ));
        }
        Ok(before.version)
    }
}
