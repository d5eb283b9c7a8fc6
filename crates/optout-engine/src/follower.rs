//! The filter follower: the one task that writes a [`SyncedFilter`].
//!
//! It loads a generation (from a published snapshot or a scan), applies the change feed in order,
//! builds new generations in the background when the filter outgrows its capacity or carries too
//! many stale "maybes", asks the store every few seconds whether it is still safe, publishes
//! snapshots for new replicas, and fails closed when the store went back in time until an admin
//! acknowledges it. [`Follower::run`] is a loop of named steps, each one method.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio::{sync::watch, task::JoinHandle};

use super::filter::{FilterConfig, SyncedFilter};
use crate::{
    core::{AuditKey, NhsNumber, OptOutFilter, Version, coverage::Coverage},
    store::{ConsentStore, Feed, StoreError},
};

/// Change-log entries asked for per feed read.
const FEED_BATCH: usize = 1024;
/// How often a replica failing closed on a store that went back in time looks for an admin's
/// acknowledgement.
const ACK_POLL: Duration = Duration::from_millis(500);

/// What a step says the loop should do next.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    /// Go on to the next step.
    Next,
    /// Start the loop again from the top.
    Again,
    /// Shutdown: stop.
    Stop,
}

/// Runs the steps in order; a step that says other than [`Flow::Next`] ends the round.
macro_rules! step {
    ($e:expr) => {
        match $e {
            Flow::Next => {}
            other => return other,
        }
    };
}

type Build = JoinHandle<Result<(OptOutFilter, Version), StoreError>>;

/// Follows a store for one filter.
pub struct Follower {
    store: Arc<dyn ConsentStore>,
    synced: Arc<SyncedFilter>,
    shutdown: watch::Receiver<bool>,
    config: FilterConfig,
    backoff: Backoff,
    /// The number of the newest generation started.
    generation: u64,
    /// A generation being built in the background.
    rebuild: Option<Build>,
    /// Set when the log was trimmed past the filter's version, or the dataset changed: only a
    /// full load can catch up.
    must_rebuild: bool,
    last_safety_check: Instant,
    last_snapshot: Instant,
    published: Version,
    /// While failing closed on a store that went back in time: the store's acknowledgement id as
    /// first read after failing closed (`None`: not read yet). A different one later means an
    /// admin acknowledged this incident.
    ack_then: Option<Option<String>>,
    /// The key shared snapshots are sealed with and must be sealed with to be loaded (the audit
    /// key every replica shares); `None` (development, no audit key) takes them unsealed.
    snapshot_key: Option<AuditKey>,
}

impl Follower {
    /// A follower of `store` for `synced`, until `shutdown` turns true.
    pub fn new(
        store: Arc<dyn ConsentStore>,
        synced: Arc<SyncedFilter>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let config = synced.config();
        Follower {
            store,
            synced,
            shutdown,
            config,
            backoff: Backoff::new(),
            generation: 0,
            rebuild: None,
            must_rebuild: false,
            last_safety_check: Instant::now(),
            last_snapshot: Instant::now(),
            published: Version::ZERO,
            ack_then: None,
            snapshot_key: None,
        }
    }

    /// Seals the snapshots this replica publishes with `key`, and loads only snapshots sealed
    /// with it (see [`seal_snapshot`]).
    pub fn with_snapshot_key(mut self, key: Option<AuditKey>) -> Self {
        self.snapshot_key = key;
        self
    }

    /// Follows the store until shutdown: the only writer of the filter.
    pub async fn run(mut self) {
        while !*self.shutdown.borrow() {
            if self.round().await == Flow::Stop {
                break;
            }
        }
        if let Some(h) = self.rebuild.take() {
            h.abort();
        }
    }

    /// One round of the steps.
    async fn round(&mut self) -> Flow {
        step!(self.resume_after_regression().await);
        step!(self.load_if_needed().await);
        step!(self.rotate_generation().await);
        step!(self.check_store_safety().await);
        step!(self.follow_feed().await);
        self.publish_snapshot().await;
        Flow::Next
    }

    /// Failing closed on a store that went back in time: waits for an admin's acknowledgement,
    /// then rebuilds from what the store holds now.
    async fn resume_after_regression(&mut self) -> Flow {
        if !self.synced.regressed() {
            return Flow::Next;
        }
        if !acknowledged(self.store.as_ref(), &mut self.ack_then).await {
            return tokio::select! {
                _ = tokio::time::sleep(ACK_POLL) => Flow::Again,
                _ = self.shutdown.changed() => Flow::Stop,
            };
        }
        tracing::warn!(
            "an admin acknowledged that the store went back in time; rebuilding the filter from \
             what the store holds now"
        );
        self.synced.clear_regression();
        self.store.forget_history();
        self.ack_then = None;
        self.must_rebuild = true;
        Flow::Next
    }

    /// First load, or a log trimmed past our position: builds a generation in the foreground.
    async fn load_if_needed(&mut self) -> Flow {
        if self.synced.is_loaded() && !self.must_rebuild {
            return Flow::Next;
        }
        let started = self.synced.now_ms();
        if !self.synced.coverage_known() {
            self.synced.learn_list_coverage(self.store.as_ref()).await;
        }
        self.generation += 1;
        let built = tokio::select! {
            r = load_generation(
                self.store.as_ref(),
                self.config,
                self.generation,
                self.snapshot_key.as_ref(),
            ) => r,
            _ = self.shutdown.changed() => return Flow::Stop,
        };
        match built {
            Ok((filter, version, from, coverage)) => {
                let stats = filter.stats();
                self.synced.install(filter, version, coverage);
                self.synced.set_loaded_from(from);
                super::release_freed_memory();
                self.must_rebuild = false;
                self.synced.mark_caught_up(started);
                tracing::info!(
                    items = stats.items,
                    bits = stats.bits,
                    generation = stats.generation,
                    %version,
                    from,
                    "filter loaded from the store"
                );
                self.backoff.reset();
                Flow::Next
            }
            Err(e @ StoreError::Regressed(_)) => {
                self.synced.fail_closed_regressed(&e);
                Flow::Again
            }
            Err(e) => {
                if matches!(e, StoreError::NotInitialised(_) | StoreError::Unsafe(_)) {
                    self.synced.unload();
                }
                tracing::warn!(error = %e, "cannot load the filter; checks ask the store meanwhile");
                self.back_off(Flow::Again).await
            }
        }
    }

    /// Swaps in a background generation that finished; starts one when the filter needs it.
    async fn rotate_generation(&mut self) -> Flow {
        if self.rebuild.as_ref().is_some_and(|h| h.is_finished())
            && let Some(handle) = self.rebuild.take()
            && let Err(e) = swap_in(self.store.as_ref(), &self.synced, handle).await
        {
            self.synced.fail_closed_regressed(&e);
            return Flow::Again;
        }
        if self.rebuild.is_none() && self.synced.needs_new_generation() {
            self.generation += 1;
            let (store, config, g) = (self.store.clone(), self.config, self.generation);
            self.rebuild = Some(tokio::spawn(async move {
                build_generation(store.as_ref(), config, g).await
            }));
        }
        Flow::Next
    }

    /// Every few seconds: finishes changes left half-done, and stops trusting a store that became
    /// unsafe (someone set an evicting policy): the filter unloads, the store has unbound itself,
    /// everything withholds until it is safe.
    async fn check_store_safety(&mut self) -> Flow {
        if self.last_safety_check.elapsed() < self.config.safety_check {
            return Flow::Next;
        }
        self.last_safety_check = Instant::now();
        if let Err(e) = self.store.recover().await {
            tracing::warn!(error = %e, "cannot finish changes left half-done; retrying");
        }
        if let Err(e @ StoreError::Unsafe(_)) = self.store.check_safe().await {
            tracing::error!(error = %e, "failing closed until the store is safe again");
            self.synced.unload();
            self.must_rebuild = true;
            return self.back_off(Flow::Again).await;
        }
        Flow::Next
    }

    /// Reads the change feed once and applies it; an answer, even an empty one, proves freshness.
    async fn follow_feed(&mut self) -> Flow {
        let asked_at = self.synced.now_ms();
        let after = self.synced.version();
        let feed = tokio::select! {
            r = self.store.changes_after(after, FEED_BATCH, self.config.heartbeat) => r,
            _ = self.shutdown.changed() => return Flow::Stop,
        };
        let result = match &feed {
            Ok(_) => "ok",
            Err(StoreError::NotInitialised(_)) => "not_initialised",
            Err(_) => "error",
        };
        metrics::counter!("optout_store_feed_reads_total", "result" => result).increment(1);
        if feed.is_ok() {
            self.synced.store_answered();
        }
        match feed {
            Ok(Feed::Changes(entries)) => {
                let caught_up = entries.len() < FEED_BATCH;
                if self.synced.apply(&entries) {
                    tracing::info!(
                        %after,
                        "an import too big to list its numbers in the change log; rebuilding \
                         the filter from the store (checks ask the store until then)"
                    );
                    self.synced.distrust();
                    self.must_rebuild = true;
                    return Flow::Next;
                }
                if caught_up {
                    self.synced.mark_caught_up(asked_at);
                }
                self.backoff.reset();
                Flow::Next
            }
            Ok(Feed::Trimmed) => {
                tracing::warn!(%after, "the change log no longer reaches this filter's version; rebuilding");
                self.synced.distrust();
                self.must_rebuild = true;
                Flow::Next
            }
            Ok(Feed::Behind { store }) => {
                self.synced.fail_closed_regressed(&behind(after, store));
                Flow::Next
            }
            Err(e @ StoreError::Regressed(_)) => {
                self.synced.fail_closed_regressed(&e);
                Flow::Next
            }
            Err(e @ StoreError::NotInitialised(_)) => {
                // The store was reset, flushed or re-initialised: what the filter says is about a
                // dataset the store no longer holds. Stop trusting it now; reload when a dataset
                // marker is back.
                tracing::error!(error = %e, "failing closed until the store's dataset is back");
                self.synced.unload();
                self.must_rebuild = true;
                self.back_off(Flow::Next).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "change feed read failed; the filter ages until it succeeds");
                self.back_off(Flow::Next).await
            }
        }
    }

    /// On a shared store, a fresh filter publishes a snapshot now and then for new replicas.
    async fn publish_snapshot(&mut self) {
        if !self.store.shares_snapshots()
            || !self.synced.is_fresh()
            || self.last_snapshot.elapsed() < self.config.snapshot_interval
            || self.synced.version() <= self.published
        {
            return;
        }
        self.last_snapshot = Instant::now();
        let (version, bytes) = self.synced.snapshot();
        let bytes = seal_snapshot(self.snapshot_key.as_ref(), bytes);
        match self.store.publish_snapshot(version, &bytes).await {
            Ok(()) => {
                self.published = version;
                tracing::debug!(%version, bytes = bytes.len(), "filter snapshot published");
            }
            Err(e) => tracing::warn!(error = %e, "could not publish a filter snapshot"),
        }
    }

    /// Waits out the backoff; `then` unless shutdown came first.
    async fn back_off(&mut self, then: Flow) -> Flow {
        if self.backoff.wait(&mut self.shutdown).await {
            Flow::Stop
        } else {
            then
        }
    }
}

/// Follows the store until `shutdown` turns true: the only writer of `synced`.
pub async fn follow(
    store: Arc<dyn ConsentStore>,
    synced: Arc<SyncedFilter>,
    shutdown: watch::Receiver<bool>,
) {
    Follower::new(store, synced, shutdown).run().await;
}

/// The store's coverage for a generation that reflects `version`, read after the generation was
/// built: a later REPLACE is logged unlisted, so the generation cannot pass it without another
/// rebuild. `None` when the coverage is newer than the generation (a REPLACE landed in between):
/// a newer population must never be paired with an older filter.
async fn coverage_for(
    store: &dyn ConsentStore,
    version: Version,
) -> Result<Option<Coverage>, StoreError> {
    let coverage = store.coverage().await?;
    Ok((coverage.version <= version).then_some(coverage))
}

/// A REPLACE import landed while a generation was built.
fn replaced_meanwhile() -> StoreError {
    StoreError::Unavailable(
        "a REPLACE import was applied while the filter was built; building again".into(),
    )
}

/// Builds a generation from a full scan of the store, sized for what it holds plus room to grow.
async fn build_generation(
    store: &dyn ConsentStore,
    config: FilterConfig,
    generation: u64,
) -> Result<(OptOutFilter, Version), StoreError> {
    // Sized for what the store holds plus 4% to grow: within 5% of the bloom optimum (1.44 log2(1/p)
    // bits per opt-out) at the target rate. Outgrowing it triggers another background build. The
    // counts are read before the scan; opt-outs added meanwhile are few and the filter absorbs them.
    let status = store.status().await?;
    let held = status.national + status.type1;
    let capacity = config.capacity.max(held + held / 25);
    let mut filter = OptOutFilter::new(capacity, config.fp_rate, generation)
        .map_err(|e| StoreError::Corrupt(format!("filter: {e}").into()))?;
    // Page by page into the filter: memory is the filter and one page, never the whole list.
    let version = store
        .scan_pages(&mut |page: &[NhsNumber]| {
            for n in page {
                filter.insert(*n);
            }
        })
        .await?;
    Ok((filter, version))
}

/// Loads a first generation for the store's current dataset: from the newest snapshot when the
/// store shares them and the log still reaches back to it, else from a full scan.
async fn load_generation(
    store: &dyn ConsentStore,
    config: FilterConfig,
    generation: u64,
    snapshot_key: Option<&AuditKey>,
) -> Result<(OptOutFilter, Version, &'static str, Coverage), StoreError> {
    store.open_dataset().await?;
    if store.shares_snapshots() {
        match store.load_snapshot().await? {
            Some(blob) => match open_snapshot(snapshot_key, &blob)
                .and_then(|bytes| OptOutFilter::from_snapshot(bytes).map_err(|e| e.to_string()))
            {
                Ok((filter, version)) => match catch_up(store, filter, version).await? {
                    Some((filter, version)) => {
                        let coverage = coverage_for(store, version)
                            .await?
                            .ok_or_else(replaced_meanwhile)?;
                        return Ok((filter, version, "snapshot", coverage));
                    }
                    None => tracing::info!(
                        %version,
                        "the change log no longer reaches back to the snapshot; scanning"
                    ),
                },
                Err(e) => tracing::warn!(error = %e, "ignoring an unreadable filter snapshot"),
            },
            None => tracing::info!("no filter snapshot published yet; scanning"),
        }
    }
    let (filter, version) = build_generation(store, config, generation).await?;
    let coverage = coverage_for(store, version)
        .await?
        .ok_or_else(replaced_meanwhile)?;
    Ok((filter, version, "scan", coverage))
}

/// Brings a freshly built generation up to the store's tip by replaying the change log.
async fn catch_up(
    store: &dyn ConsentStore,
    mut filter: OptOutFilter,
    mut version: Version,
) -> Result<Option<(OptOutFilter, Version)>, StoreError> {
    loop {
        match store.changes_after(version, 1024, Duration::ZERO).await? {
            Feed::Trimmed => return Ok(None),
            Feed::Behind { store } => return Err(behind(version, store)),
            Feed::Changes(entries) if entries.is_empty() => return Ok(Some((filter, version))),
            Feed::Changes(entries) => {
                for e in entries {
                    if e.unlisted {
                        // Only a scan holds its numbers: build again from one.
                        return Ok(None);
                    }
                    for n in &e.added {
                        filter.insert(*n);
                    }
                    version = version.max(e.version);
                }
            }
        }
    }
}

/// What a sealed snapshot starts with, before its MAC.
const SEALED: &[u8] = b"optout-snapshot-sealed-v1:";

/// A snapshot sealed with `key` (the audit key every replica shares): its MAC (HMAC-SHA-256 of
/// the snapshot, under the key's MAC key, domain-separated from the audit trails' lines) goes in
/// front. A snapshot carries its own CRC, which tells a torn one, not a forged one: anyone who
/// can write to Redis could otherwise publish an empty filter at the current version, which a
/// cold replica would load and release everyone from (issue 27, item 10). Without a key
/// (development), unsealed.
pub fn seal_snapshot(key: Option<&AuditKey>, bytes: Vec<u8>) -> Vec<u8> {
    let Some(key) = key else {
        return bytes;
    };
    let mut out = Vec::with_capacity(SEALED.len() + 32 + bytes.len());
    out.extend_from_slice(SEALED);
    out.extend_from_slice(&snapshot_mac(key, &bytes));
    out.extend_from_slice(&bytes);
    out
}

/// The snapshot inside `blob`, if it is sealed with `key` (any, without a key).
fn open_snapshot<'b>(key: Option<&AuditKey>, blob: &'b [u8]) -> Result<&'b [u8], String> {
    let sealed = blob
        .strip_prefix(SEALED)
        .filter(|rest| rest.len() >= 32)
        .map(|rest| rest.split_at(32));
    match (key, sealed) {
        (None, Some((_, bytes))) => Ok(bytes),
        (None, None) => Ok(blob),
        (Some(_), None) => Err("the snapshot is not sealed with the audit key".into()),
        (Some(key), Some((mac, bytes))) => {
            use subtle::ConstantTimeEq;
            if bool::from(snapshot_mac(key, bytes).ct_eq(mac)) {
                Ok(bytes)
            } else {
                Err("the snapshot's seal does not match this replica's audit key".into())
            }
        }
    }
}

fn snapshot_mac(key: &AuditKey, bytes: &[u8]) -> [u8; 32] {
    let mut data = Vec::with_capacity(SEALED.len() + bytes.len());
    data.extend_from_slice(SEALED);
    data.extend_from_slice(bytes);
    key.mac(&data)
}

/// The error for a store found behind `seen`.
fn behind(seen: Version, store: Version) -> StoreError {
    StoreError::Regressed(format!(
        "this replica read the store's change log up to version {seen}, and the store is now at \
         {store}: changes were lost (a Redis restarted from an older snapshot or AOF, a failover \
         to a replica that had not received them, or a restore from backup)"
    ).into())
}

/// Catches a finished background generation up with the log and swaps it in. Returns the error
/// only when the store went back in time (the caller fails closed); others are logged.
async fn swap_in(
    store: &dyn ConsentStore,
    synced: &SyncedFilter,
    handle: Build,
) -> Result<(), StoreError> {
    let (filter, version) = match handle.await {
        Ok(Ok(built)) => built,
        Ok(Err(e @ StoreError::Regressed(_))) => return Err(e),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot build a new filter generation");
            return Ok(());
        }
        Err(e) => {
            tracing::warn!(error = %e, "filter build task failed");
            return Ok(());
        }
    };
    let caught_up = match catch_up(store, filter, version).await {
        Ok(Some((filter, version))) => match coverage_for(store, version).await {
            Ok(Some(coverage)) => Ok(Some((filter, version, coverage))),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        },
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    match caught_up {
        // Only the follower moves the version, so a generation caught up to at least the current
        // version holds everything the current one does.
        Ok(Some((filter, version, coverage))) if version >= synced.version() => {
            let stats = filter.stats();
            synced.install(filter, version, coverage);
            super::release_freed_memory();
            tracing::info!(
                items = stats.items,
                capacity = stats.capacity,
                generation = stats.generation,
                "new filter generation swapped in"
            );
        }
        Ok(_) => tracing::info!("new filter generation fell behind the log; will retry"),
        Err(e @ StoreError::Regressed(_)) => return Err(e),
        Err(e) => tracing::warn!(error = %e, "cannot catch up the new filter generation"),
    }
    Ok(())
}

/// While failing closed on a store that went back in time: whether an admin acknowledged it
/// since. `ack_then` keeps the store's acknowledgement id as first read after failing closed
/// (`None` until it could be read); a different one later is this incident's acknowledgement.
async fn acknowledged(store: &dyn ConsentStore, ack_then: &mut Option<Option<String>>) -> bool {
    match (store.regression_ack().await, &*ack_then) {
        (Ok(now), None) => {
            *ack_then = Some(now);
            false
        }
        (Ok(now), Some(then)) => now != *then,
        (Err(e), _) => {
            tracing::debug!(error = %e, "cannot read the regression acknowledgement");
            false
        }
    }
}

/// Exponential backoff between failed store calls, 50 ms to 2 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(50))
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(50);
    }
    /// Sleeps; true if shutdown came first.
    async fn wait(&mut self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = shutdown.changed() => true,
        }
    }
}
