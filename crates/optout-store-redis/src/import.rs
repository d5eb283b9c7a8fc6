//! Bulk imports: staged into a new generation of their type, compared with the current one under
//! the type's lock, and swapped in by one script, so no check ever sees half of an import.

use std::borrow::Cow;

use async_trait::async_trait;
use redis::{AsyncCommands, Value};

use super::{
    Bound, RedisStore,
    conn::Conn,
    lease::LockLease,
    reply::{csv_of, field_pairs, field_set, holds, type_code},
    scripts::store_error,
};
use crate::{
    core::{AuditKey, AuditRecord, NhsNumber, OptOutType, Practice, Version},
    store::{
        ImportMode, ImportOutcome, ImportSession, ImportTally, NationalCheck, StoreError,
        import_allowed, now_ms, random_hex, refuse_after_failed_stage,
    },
};

/// Numbers a staging piece carries: one transaction, which holds Redis for about 4 ms (1 us a
/// number), the longest a lookup waits behind an import. About 100 bytes a number while its
/// commands are built and sent (the redis crate's argument copies and their encoding).
const PIECE: usize = 4_096;
/// An NHS number has 10 digits: below 2^34. Staging packs the bucket above it to sort in place.
const NUMBER_BITS: u32 = 34;
const NUMBER_MASK: u64 = (1 << NUMBER_BITS) - 1;
/// Buckets below 2^30 fit above the number (every layout the store chooses does).
const BUCKET_BITS: u32 = 64 - NUMBER_BITS;

impl RedisStore {
    pub(super) async fn start_import(
        &self,
        mode: ImportMode,
        opt_out: OptOutType,
        practice: Option<&Practice>,
        source: &str,
    ) -> Result<Box<dyn ImportSession>, StoreError> {
        let bound = self.bound()?;
        let generation = new_generation();
        let source_id = self.source_id(source).await?;
        Ok(Box::new(RedisImport {
            store: self.clone(),
            bound,
            mode,
            opt_out,
            generation,
            value: match practice {
                Some(p) => format!("{},{source_id},{}", now_ms(), p.stored()),
                None => format!("{},{source_id}", now_ms()),
            },
            practice: practice.cloned(),
            staged: 0,
            committed: false,
            check: None,
            in_flight: None,
            failed: false,
        }))
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
            .map_err(store_error)
    }

    /// Unlinks every bucket of a generation nobody reads any more, in the background, unless it
    /// is (again) the current one: the swap that replaced it may have been lost (a store restored
    /// from an older copy), and the swap of an import whose call was cut off may have landed
    /// after all (its reply lost), making the "abandoned" staged generation the current one.
    /// Deleting the current generation would read as "nobody opted out" (found by the nemesis:
    /// a restore during an import's clean-up emptied the national list).
    ///
    /// On one node the check and the unlink are one script, per chunk. On a Cluster the buckets
    /// live in the shards' slots and the generation pointer in the metadata's, so the pointer is
    /// read before each shard's chunk: on the same connection as the swap (commands of one
    /// connection run in order, so a swap sent before is seen), though not atomically with the
    /// unlink.
    fn unlink_generation(&self, t: &'static str, generation: u64, bound: &Bound) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.clone();
        let bound = bound.clone();
        handle.spawn(async move {
            let mut conn = store.write_conn();
            let pointer = store.key(&format!("gen:{t}"));
            let current = generation.to_string();
            for group in store.bucket_groups(&bound) {
                let keys: Vec<String> = group
                    .iter()
                    .map(|&b| store.data_key(&bound, t, generation, b))
                    .collect();
                let unlinked: Result<i64, redis::RedisError> = if bound.shards.is_empty() {
                    let mut inv = store.inner.scripts.unlink.prepare_invoke();
                    for k in &keys {
                        inv.key(k);
                    }
                    inv.arg(&pointer)
                        .arg(&current)
                        .invoke_async(&mut conn)
                        .await
                } else {
                    match conn.get::<_, Option<String>>(&pointer).await {
                        Ok(g) if g.as_deref() == Some(current.as_str()) => Ok(0),
                        Ok(_) => redis::cmd("UNLINK")
                            .arg(&keys)
                            .query_async::<()>(&mut conn)
                            .await
                            .map(|()| 1),
                        Err(e) => Err(e),
                    }
                };
                match unlinked {
                    Ok(1) => {}
                    Ok(_) => {
                        tracing::warn!(
                            opt_out_type = t,
                            generation,
                            "not unlinking an opt-out generation: it is the current one (a \
                             swap whose reply was lost, or a store restored from an older copy)"
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not unlink an unused opt-out generation");
                        return;
                    }
                }
            }
        });
    }
}

/// A new generation for an import to stage into: drawn at random, below 2^53 so that Lua's
/// numbers hold it exactly, and never 0 (the list before any import). Not a counter in Redis:
/// a counter goes back when a failover promotes a replica that had not received its last
/// increments (or a store is restored from an older copy), and two imports were then handed
/// the same generation; the clean-up of the one that was cut off unlinked the other's staged
/// list before its swap, which then swapped in a list short of numbers (found by the nemesis
/// behind Sentinel). Two imports drawing the same of 2^53 values is no risk worth a round trip.
fn new_generation() -> u64 {
    loop {
        let g = rand::random::<u64>() >> 11;
        if g != 0 {
            return g;
        }
    }
}

/// How long a staged population waits for its swap (an import that never commits leaves it to
/// expire).
const STAGED_POPULATION_TTL_MS: u64 = 86_400_000;

/// An import staged into a new generation of its type.
struct RedisImport {
    store: RedisStore,
    bound: Bound,
    mode: ImportMode,
    opt_out: OptOutType,
    generation: u64,
    /// The record value of every staged number: `recorded_at_ms,source_id` (type 1:
    /// `recorded_at_ms,source_id,practice`).
    value: String,
    /// Type 1: the practice whose list this is. A REPLACE replaces its objections only: a number
    /// another practice holds keeps type 1.
    practice: Option<Practice>,
    /// The numbers the staged chunks put in the generation (new fields, so each number once):
    /// what the comparison must find there before the swap.
    staged: u64,
    committed: bool,
    /// Set when this import is a national check round trip.
    check: Option<NationalCheck>,
    /// The last staged chunk's writes, still under way; they answer how many numbers they added.
    in_flight: Option<tokio::task::JoinHandle<Result<u64, StoreError>>>,
    /// A chunk could not be staged: the import can no longer be committed.
    failed: bool,
}

impl RedisImport {
    fn bucket_key(&self, generation: &str, b: u64) -> String {
        self.store
            .data_key(&self.bound, type_code(self.opt_out), generation, b)
    }
}

/// One chunk of an import's numbers being written into its generation.
struct Stager {
    store: RedisStore,
    bound: Bound,
    t: &'static str,
    generation: String,
    value: String,
}

impl Stager {
    /// Writes the chunk; how many of its numbers were not in the generation yet.
    async fn run(self, numbers: Vec<NhsNumber>) -> Result<u64, StoreError> {
        // The numbers sorted by bucket, so that a multi-field HSET carries every number of its
        // bucket in the chunk (the per-command cost is most of Redis's: at 50,000 numbers a
        // chunk 1.4 numbers shared an HSET, at 1,000,000 about 15). Sorted in the chunk's own
        // memory, the bucket packed above the number's 34 bits, so a chunk costs 8 bytes a
        // number; off the runtime's threads, as a million numbers take tens of milliseconds.
        let buckets = self.bound.buckets;
        let packed = buckets < 1 << BUCKET_BITS;
        let keys = tokio::task::spawn_blocking(move || {
            let mut keys: Vec<u64> = numbers.into_iter().map(NhsNumber::as_u64).collect();
            if packed {
                for k in &mut keys {
                    *k |= (*k % buckets) << NUMBER_BITS;
                }
                keys.sort_unstable();
            } else {
                keys.sort_unstable_by_key(|&n| (n % buckets, n));
            }
            keys
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("an import's sort failed: {e}").into()))?;
        let bucket_of = |k: u64| {
            if packed {
                k >> NUMBER_BITS
            } else {
                k % buckets
            }
        };
        let number = |k: u64| if packed { k & NUMBER_MASK } else { k };
        // Sent in pieces of about PIECE numbers, one MULTI/EXEC pipeline per shard (one in all
        // without a cluster) each; a piece's commands are built while the previous one is
        // written.
        let shards = self.bound.shards.len().max(1) as u64;
        let mut pipes = new_pieces(shards);
        let mut in_pipes = 0;
        let mut in_flight = None;
        let mut added = 0;
        for group in keys.chunk_by(|&a, &b| bucket_of(a) == bucket_of(b)) {
            let b = bucket_of(group[0]);
            let mut hset = redis::cmd("HSET");
            hset.arg(
                self.store
                    .data_key(&self.bound, self.t, &self.generation, b),
            );
            for &k in group {
                hset.arg(number(k)).arg(self.value.as_str());
            }
            // In range: b % shards < shards.
            pipes[(b % shards) as usize].add_command(hset);
            in_pipes += group.len();
            if in_pipes >= PIECE {
                let piece = std::mem::replace(&mut pipes, new_pieces(shards));
                if let Some(previous) = in_flight.replace(self.send(piece)) {
                    match joined(previous.await) {
                        Ok(n) => added += n,
                        Err(e) => {
                            // Nothing of the chunk is left writing once it has failed: an
                            // abandoned import's generation is unlinked after its chunk's task
                            // ends.
                            if let Some(next) = in_flight.take() {
                                let _ = next.await;
                            }
                            return Err(e);
                        }
                    }
                }
                in_pipes = 0;
            }
        }
        drop(keys);
        if let Some(previous) = in_flight.take() {
            added += joined(previous.await)?;
        }
        Ok(added + joined(self.send(pipes).await)?)
    }

    /// Starts writing one piece: its pipelines, one a shard, sent together. Answers how many
    /// numbers it added (each `HSET` answers its new fields).
    fn send(
        &self,
        pipes: Vec<redis::Pipeline>,
    ) -> tokio::task::JoinHandle<Result<u64, StoreError>> {
        let sends: Vec<_> = pipes
            .into_iter()
            .filter(|pipe| !pipe.is_empty())
            .map(|pipe| {
                let mut conn = self.store.write_conn();
                async move { pipe.query_async::<Vec<u64>>(&mut conn).await }
            })
            .collect();
        tokio::spawn(async move {
            let mut added = 0;
            for r in futures::future::join_all(sends).await {
                added += r.map_err(store_error)?.iter().sum::<u64>();
            }
            Ok(added)
        })
    }
}

/// One MULTI/EXEC pipeline a shard. Under `appendfsync always` Redis fsyncs once per pass of its
/// event loop that wrote, and reads 16 KiB of a connection a pass: a plain pipeline cost an fsync
/// every 400 numbers or so; a transaction's queued commands write nothing until its EXEC, so a
/// piece costs one. (Measured on 5 M: 433 against 548 k/s.)
fn new_pieces(shards: u64) -> Vec<redis::Pipeline> {
    (0..shards)
        .map(|_| {
            let mut pipe = redis::pipe();
            pipe.atomic();
            pipe
        })
        .collect()
}

fn joined<T>(r: Result<Result<T, StoreError>, tokio::task::JoinError>) -> Result<T, StoreError> {
    r.map_err(|e| StoreError::Unavailable(format!("an import's staging task failed: {e}").into()))?
}

#[async_trait]
impl ImportSession for RedisImport {
    fn set_national_check(&mut self, check: NationalCheck) {
        self.check = Some(check);
    }

    /// The chunk is written by a task of its own while the next one is received: at most one
    /// chunk is being staged, and its error surfaces at the next chunk or at commit.
    async fn stage(&mut self, numbers: Vec<NhsNumber>) -> Result<(), StoreError> {
        self.settle().await?;
        let stager = Stager {
            store: self.store.clone(),
            bound: self.bound.clone(),
            t: type_code(self.opt_out),
            generation: self.generation.to_string(),
            value: self.value.clone(),
        };
        self.in_flight = Some(tokio::spawn(stager.run(numbers)));
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
        self.settle().await?;
        let store = self.store.clone();
        let mut conn = store.write_conn();
        // The mode is fixed at initialisation, so it can be read before the lock.
        let mode = store.read_coverage_mode().await?;
        import_allowed(mode, self.opt_out, self.mode, self.check.as_ref())?;
        let t = type_code(self.opt_out);
        let other = match self.opt_out {
            OptOutType::NationalDataOptOut => "2",
            OptOutType::Type1 => "1",
        };
        let Some(lease) = LockLease::take(&store, store.key(&format!("lock:{t}"))).await? else {
            return Err(StoreError::Busy(
                "another import of this opt-out type is being applied; nothing was changed, \
                 retry"
                    .into(),
            ));
        };
        // Under the lock: no other national check can be swapped in between.
        if self.check.is_some() {
            let in_force = store.read_national_as_of().await?;
            crate::store::check_not_older(self.check.as_ref(), in_force)?;
        }
        let result = self
            .diff_and_swap(&mut conn, t, other, &lease.token, audit, key)
            .await;
        // Released: by the swap when it succeeded, else now (and on any other way out, the
        // call cut off included, when `lease` is dropped).
        drop(lease);
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
    /// Waits for the chunk being staged. Once a chunk has failed, every later chunk and the
    /// commit fail too.
    async fn settle(&mut self) -> Result<(), StoreError> {
        refuse_after_failed_stage(self.failed)?;
        let result = match self.in_flight.take() {
            None => Ok(0),
            Some(h) => joined(h.await),
        };
        self.failed = result.is_err();
        self.staged += result?;
        Ok(())
    }

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
        let (current, other_gen) = self.generations(conn, t, other).await?;
        let staged_gen = self.generation.to_string();
        let mut diff = Diff::default();
        // The parts (digests of what the import adds and removes) go to the changes trail as they
        // fill, before the swap; the main record, written with the swap, names them.
        let id = random_hex::<8>();
        audit.part_of = Some(id.clone());
        // Bucket groups share a hash slot in a cluster, so each group is one pipeline.
        for group in store.bucket_groups(&self.bound) {
            self.diff_group(
                conn,
                &group,
                [&current, &staged_gen, &other_gen],
                other,
                &mut diff,
            )
            .await?;
            let parts = diff.tally.parts(&audit, key, &id, false);
            self.write_parts(conn, &parts).await?;
        }
        let Diff {
            mut tally,
            total,
            patients,
            staged,
        } = diff;
        if staged != self.staged {
            // Staged on a master that was then replaced by a replica that had not received every
            // chunk (or a store restored from an older copy): applied, the import would be
            // acknowledged without the lost numbers, and a REPLACE would remove them.
            return Err(StoreError::Unavailable(
                format!(
                    "the import staged {} numbers and the store holds {staged} of them: staged \
                     chunks were lost (a failover, or a store restored from an older copy); \
                     nothing was changed: import again",
                    self.staged
                )
                .into(),
            ));
        }
        crate::store::refuse_empty_replace(
            self.mode,
            staged == 0,
            self.check.as_ref(),
            self.opt_out,
        )?;
        audit.applied = tally.added + tally.removed;
        let parts = tally.parts(&audit, key, &id, true);
        self.write_parts(conn, &parts).await?;
        // The population goes next to the staged generation (same slot as the swap's keys), so
        // the swap script moves it into place with the rest; it expires if the swap never comes.
        if let Some(check) = &self.check {
            let () = redis::cmd("SET")
                .arg(store.key(&format!("population:{staged_gen}")))
                .arg(check.population.to_bytes())
                .arg("PX")
                .arg(STAGED_POPULATION_TTL_MS)
                .query_async(conn)
                .await
                .map_err(store_error)?;
        }
        let swap = Swap {
            t,
            token,
            staged_gen: &staged_gen,
            // A REPLACE changes the list's date (and a national check the population): logged
            // unlisted, so every replica rebuilds and reads the coverage with its scan.
            added: if self.mode == ImportMode::Replace {
                None
            } else {
                tally.listed()
            },
            removed: tally.removed,
            total,
            patients,
            audit: &audit,
        };
        let (version, old_generation) = self.swap(conn, swap).await?;
        Ok((
            ImportOutcome {
                added: tally.added,
                removed: tally.removed,
                version,
            },
            old_generation,
        ))
    }

    /// The current generations of this type and the other. In a cluster a change runs in steps:
    /// an import waits until none of its type is under way (none can start while the lock is
    /// held), so none lands in the replaced generation.
    async fn generations(
        &self,
        conn: &mut Conn,
        t: &str,
        other: &str,
    ) -> Result<(String, String), StoreError> {
        let store = &self.store;
        let (current, other_gen, in_flight): (Option<u64>, Option<u64>, Option<i64>) =
            redis::pipe()
                .get(store.key(&format!("gen:{t}")))
                .get(store.key(&format!("gen:{other}")))
                .hget(store.key("intents_of"), t)
                .query_async(conn)
                .await
                .map_err(store_error)?;
        if in_flight.unwrap_or(0) > 0 {
            return Err(StoreError::Unavailable(
                "a change of this opt-out type is under way (or being finished after a crash); \
                 retry the import in a few seconds"
                    .into(),
            ));
        }
        Ok((
            current.unwrap_or(0).to_string(),
            other_gen.unwrap_or(0).to_string(),
        ))
    }

    /// Appends an import's parts to the changes trail, before its swap. Parts whose main record
    /// never comes belong to an import that was not applied.
    async fn write_parts(&self, conn: &mut Conn, parts: &[AuditRecord]) -> Result<(), StoreError> {
        for chunk in parts.chunks(16) {
            let mut pipe = redis::pipe();
            for part in chunk {
                let xadd = pipe.cmd("XADD").arg(self.store.key("changes")).arg("*");
                self.store.push_record(xadd, part)?;
                xadd.ignore();
            }
            let () = pipe.query_async(conn).await.map_err(store_error)?;
        }
        Ok(())
    }

    /// The one script that makes the staged generation current, with the counts, the change-log
    /// entry and the audit record. Returns the version and the replaced generation.
    async fn swap(&self, conn: &mut Conn, s: Swap<'_>) -> Result<(Version, u64), StoreError> {
        let store = &self.store;
        let seen = store.seen();
        let (json, mac) = store.signed_record(s.audit)?;
        let mut inv = store.inner.scripts.swap.prepare_invoke();
        inv.key(store.key("marker"))
            .arg(&store.inner.prefix)
            .arg(&self.bound.dataset)
            .arg(s.t)
            .arg(s.token)
            .arg(s.staged_gen)
            .arg(s.added.map(csv_of).unwrap_or_default())
            .arg(s.removed)
            .arg(s.total)
            .arg(s.patients)
            .arg(store.inner.log_len)
            .arg(json)
            .arg(s.audit.applied)
            .arg(if s.added.is_some() {
                "listed"
            } else {
                "unlisted"
            })
            // The list's date (REPLACE only) and the population's size (a national check only).
            .arg(match (self.mode, &self.check) {
                (_, Some(c)) => c.checked_at_ms.to_string(),
                (ImportMode::Replace, None) => now_ms().to_string(),
                (ImportMode::Merge, None) => String::new(),
            })
            .arg(
                self.check
                    .as_ref()
                    .map(|c| c.population.len().to_string())
                    .unwrap_or_default(),
            )
            .arg(seen.unwrap_or(Version::ZERO).to_string())
            .arg(mac)
            .arg(
                self.practice
                    .as_ref()
                    .map(Practice::stored)
                    .unwrap_or_default(),
            );
        let (id, old, held): (String, u64, i64) = store.invoke_durable(&inv, conn).await?;
        let version = Version::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string().into()))?;
        store.wrote(seen, held == 1, version);
        Ok((version, old))
    }

    /// Compares one group of buckets (one hash slot in a cluster): what the import adds, what it
    /// removes, and how the patients count moves; carries the records that stay into the staged
    /// generation. `gens` are the current, staged and other type's generations.
    async fn diff_group(
        &self,
        conn: &mut Conn,
        group: &[u64],
        gens: [&str; 3],
        other: &str,
        diff: &mut Diff,
    ) -> Result<(), StoreError> {
        let [current, staged_gen, other_gen] = gens;
        let store = &self.store;
        let mut read = redis::pipe();
        for &b in group {
            read.hgetall(self.bucket_key(current, b))
                .hkeys(self.bucket_key(staged_gen, b))
                .hkeys(store.data_key(&self.bound, other, other_gen, b));
        }
        let replies: Vec<Value> = read.query_async(conn).await.map_err(store_error)?;
        // Every field is compared as the reply holds it (borrowed, sorted): a `String` and a hash
        // entry a field were most of an import's server CPU.
        let nil = Value::Nil;
        let reply = |i: usize| replies.get(i).unwrap_or(&nil);
        let mut carry = redis::pipe();
        let mut carrying = false;
        for (i, &b) in group.iter().enumerate() {
            let old = field_pairs(reply(i * 3))?;
            let new = field_set(reply(i * 3 + 1))?;
            let in_other = field_set(reply(i * 3 + 2))?;
            let in_old = |n: &[u8]| old.binary_search_by(|(f, _)| f.as_ref().cmp(n)).is_ok();
            for n in &new {
                if !in_old(n) {
                    if let Some(n) = parse_number(n) {
                        diff.tally.add(n);
                    }
                    if !holds(&in_other, n) {
                        diff.patients += 1;
                    }
                }
            }
            let key = self.bucket_key(staged_gen, b);
            let mut kept = 0u64;
            for (n, v) in &old {
                let staged = holds(&new, n);
                let v = String::from_utf8_lossy(v);
                match self.carried(&v, staged) {
                    Some(value) => {
                        carry.hset(&key, n.as_ref(), value.as_ref()).ignore();
                        carrying = true;
                        if !staged {
                            kept += 1;
                        }
                    }
                    None => {
                        if let Some(n) = parse_number(n) {
                            diff.tally.remove(n);
                        }
                        if !holds(&in_other, n) {
                            diff.patients -= 1;
                        }
                    }
                }
            }
            diff.total += u64::try_from(new.len()).unwrap_or(0) + kept;
            diff.staged += u64::try_from(new.len()).unwrap_or(0);
        }
        if carrying {
            let _: () = carry.query_async(conn).await.map_err(store_error)?;
        }
        Ok(())
    }
}

impl RedisImport {
    /// What becomes of a current record `v` in the staged generation (`None`: the number loses
    /// the type); `staged`: the import holds the number. MERGE keeps every record and REPLACE
    /// only the staged ones, each with its original date and source. Type 1 is one practice's
    /// list: a staged number gains the practice, and a REPLACE withdraws the practice from a
    /// number it does not hold, which keeps type 1 while another practice holds it.
    /// A record kept as it was is borrowed: a national import carries millions of them.
    fn carried<'v>(&self, v: &'v str, staged: bool) -> Option<Cow<'v, str>> {
        use crate::stored_practices;
        let Some(p) = &self.practice else {
            return (self.mode == ImportMode::Merge || staged).then_some(Cow::Borrowed(v));
        };
        let list = stored_practices::of(v);
        if staged {
            let list = optout_core::practice::with(&list, p).unwrap_or(list);
            return Some(Cow::Owned(stored_practices::with(v, &list)));
        }
        if self.mode == ImportMode::Merge {
            return Some(Cow::Borrowed(v));
        }
        match optout_core::practice::without(&list, p) {
            None => Some(Cow::Borrowed(v)),
            Some(rest) if rest.is_empty() => None,
            Some(rest) => Some(Cow::Owned(stored_practices::with(v, &rest))),
        }
    }
}

/// The arguments of the swap script.
struct Swap<'a> {
    t: &'a str,
    token: &'a str,
    staged_gen: &'a str,
    /// The added numbers, when few enough to list in the change log.
    added: Option<&'a [NhsNumber]>,
    removed: u64,
    total: u64,
    patients: i64,
    audit: &'a AuditRecord,
}

/// What an import changes, gathered bucket group by bucket group.
#[derive(Default)]
struct Diff {
    tally: ImportTally,
    /// Opt-outs of the type once applied.
    total: u64,
    /// Change of the distinct patients count.
    patients: i64,
    /// Numbers the import holds.
    staged: u64,
}

/// A stored field as an NHS number (`None` if it is not one).
fn parse_number(n: &[u8]) -> Option<NhsNumber> {
    std::str::from_utf8(n)
        .ok()?
        .parse()
        .ok()
        .and_then(|v| NhsNumber::from_stored(v).ok())
}

impl Drop for RedisImport {
    /// An import that was not committed leaves a generation nobody reads: unlink it. If this
    /// process dies first, its keys stay until removed by hand (they are never read).
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let (store, t, generation, bound) = (
            self.store.clone(),
            type_code(self.opt_out),
            self.generation,
            self.bound.clone(),
        );
        match (self.in_flight.take(), tokio::runtime::Handle::try_current()) {
            // Unlinked after the chunk in flight lands, so none of it is left behind.
            (Some(h), Ok(rt)) => {
                rt.spawn(async move {
                    let _ = h.await;
                    store.unlink_generation(t, generation, &bound);
                });
            }
            _ => store.unlink_generation(t, generation, &bound),
        }
    }
}
