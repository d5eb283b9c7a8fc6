//! Keeping the filter in step with the store.
//!
//! [`SyncedFilter`] is what the check path reads: the current filter generation, the store version
//! it reflects, and when it was last proven caught up with the store. [`follow`] is the one task
//! that writes it: it loads a generation from a scan, applies the change feed in order, and builds
//! new generations in the background when the filter outgrows its capacity or carries too many
//! stale "maybes" from removed opt-outs.
//!
//! The ordering that keeps invariant 1 (no released opt-out at a version the answer claims): a
//! change's added numbers go into the filter *before* the filter's version moves past that change,
//! and both happen under the write lock, so a reader sees either the old version or the new version
//! with the numbers in.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::RwLock;
use tokio::sync::watch;

use crate::{
    core::{FilterStats, NhsNumber, OptOutFilter, Version},
    store::{ChangeEntry, ConsentStore, Feed, StoreError},
};

/// How the filter is sized and how fresh it must be.
#[derive(Clone, Copy, Debug)]
pub struct FilterConfig {
    /// Items a generation is sized for at least.
    pub capacity: u64,
    /// The false-positive target.
    pub fp_rate: f64,
    /// Past this age without proof of being caught up, the filter's "absent" is not trusted.
    pub freshness_bound: Duration,
    /// How long one change-feed read waits for news; a read that returns proves freshness.
    pub heartbeat: Duration,
    /// How often a replica on a shared store publishes a filter snapshot for new replicas.
    pub snapshot_interval: Duration,
    /// How often the store is asked whether it is still safe (e.g. Redis's eviction policy).
    pub safety_check: Duration,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            capacity: 1_000_000,
            fp_rate: 0.001,
            freshness_bound: Duration::from_secs(2),
            heartbeat: Duration::from_millis(250),
            snapshot_interval: Duration::from_secs(60),
            safety_check: Duration::from_secs(5),
        }
    }
}

/// The filter state the check path reads.
pub struct SyncedFilter {
    state: RwLock<Generation>,
    config: FilterConfig,
    /// The version the filter reflects, for `at_least_version` waits.
    version: watch::Sender<Version>,
    /// Whether a generation has been loaded from the store.
    loaded: watch::Sender<bool>,
    /// When the filter was last proven caught up with the store, as ms since `epoch` plus one, so
    /// that `NEVER` (0) sorts first and `fetch_max` keeps the latest proof.
    caught_up_at: AtomicU64,
    epoch: Instant,
    /// Opt-outs removed since the current generation was built (stale "maybes").
    removed_since_build: AtomicU64,
    /// Where the current generation came from ("scan" or "snapshot"), for status.
    loaded_from: parking_lot::Mutex<&'static str>,
    /// The last proof of being caught up: when it was asked (as `caught_up_at`) and the version
    /// the filter then reflected. A caller's `at_least_version` beyond a proof asked after the
    /// call arrived is beyond anything the store holds.
    proof: watch::Sender<(u64, Version)>,
    /// Set when the store was seen behind what this replica already read: why. While set, every
    /// number is withheld and health says NOT_SERVING, until an admin acknowledges it.
    regressed: parking_lot::Mutex<Option<String>>,
    regressed_flag: std::sync::atomic::AtomicBool,
}

/// How a wait for `at_least_version` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionWait {
    /// The filter reflects the version.
    Reached,
    /// The store was asked after the wait began and was still short of the version: the version
    /// is beyond anything the store holds.
    Beyond,
    /// Neither within the time given.
    TimedOut,
}

const NEVER: u64 = 0;

/// One generation and the version it reflects.
pub struct Generation {
    filter: OptOutFilter,
    version: Version,
}

/// A read of the filter for one check.
pub struct FilterView<'a> {
    guard: parking_lot::RwLockReadGuard<'a, Generation>,
    /// Whether the filter's "absent" may be trusted (loaded and fresh).
    pub trusted: bool,
}

impl FilterView<'_> {
    /// The version the filter reflects.
    pub fn version(&self) -> Version {
        self.guard.version
    }

    /// Starts loading the memory a later `may_contain(n)` will read (a hint; see
    /// [`crate::core::OptOutFilter::prefetch`]).
    #[inline]
    pub fn prefetch(&self, n: NhsNumber) {
        self.guard.filter.prefetch(n)
    }

    /// False only when the number is certainly not opted out.
    #[inline]
    pub fn may_contain(&self, n: NhsNumber) -> bool {
        self.guard.filter.may_contain(n)
    }
}

/// A snapshot of the filter's state for status and metrics.
#[derive(Clone, Debug)]
pub struct SyncStatus {
    /// The generation's numbers.
    pub stats: FilterStats,
    /// The version it reflects.
    pub version: Version,
    /// Since it was last proven caught up; `None` if never.
    pub age: Option<Duration>,
    /// Whether that is within the bound (and a generation is loaded).
    pub fresh: bool,
    /// The bound.
    pub freshness_bound: Duration,
    /// Whether a generation is loaded, and from where ("scan", "snapshot"; "none" before).
    pub loaded_from: &'static str,
    /// Whether a generation is loaded for the store's current dataset.
    pub loaded: bool,
    /// Set while the replica fails closed on a store that went back in time: why.
    pub regressed: Option<String>,
}

impl SyncedFilter {
    /// An empty, unloaded filter: until [`follow`] loads it, every check asks the store.
    pub fn new(config: FilterConfig) -> Result<Arc<Self>, crate::core::FilterError> {
        let filter = OptOutFilter::new(crate::core::MIN_CAPACITY, config.fp_rate, 0)?;
        Ok(Arc::new(SyncedFilter {
            state: RwLock::new(Generation {
                filter,
                version: Version::ZERO,
            }),
            config,
            version: watch::channel(Version::ZERO).0,
            loaded: watch::channel(false).0,
            caught_up_at: AtomicU64::new(NEVER),
            epoch: Instant::now(),
            removed_since_build: AtomicU64::new(0),
            loaded_from: parking_lot::Mutex::new("none"),
            proof: watch::channel((NEVER, Version::ZERO)).0,
            regressed: parking_lot::Mutex::new(None),
            regressed_flag: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Reads the filter for one check.
    pub fn view(&self) -> FilterView<'_> {
        let trusted = self.is_fresh();
        FilterView {
            guard: self.state.read(),
            trusted,
        }
    }

    /// The version the filter reflects.
    pub fn version(&self) -> Version {
        *self.version.borrow()
    }

    /// Waits until the filter reflects at least `v`, for at most `timeout`; stops early when a
    /// read of the store asked after the wait began found the store short of `v` (a version
    /// nobody was ever given: answering it must not cost a store lookup per number).
    pub async fn wait_for_version(&self, v: Version, timeout: Duration) -> VersionWait {
        // Strictly later than now: a read asked in this same millisecond may predate the call.
        let since = self.now_ms() + 1;
        let mut versions = self.version.subscribe();
        let mut proofs = self.proof.subscribe();
        let wait = async {
            loop {
                if *versions.borrow_and_update() >= v {
                    return VersionWait::Reached;
                }
                let (at, seen) = *proofs.borrow_and_update();
                if at != NEVER && at > since && seen < v {
                    return VersionWait::Beyond;
                }
                tokio::select! {
                    r = versions.changed() => if r.is_err() { return VersionWait::TimedOut },
                    r = proofs.changed() => if r.is_err() { return VersionWait::TimedOut },
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(VersionWait::TimedOut)
    }

    /// Whether the store was seen going back in time and no admin has acknowledged it yet.
    #[inline]
    pub fn regressed(&self) -> bool {
        self.regressed_flag.load(Ordering::Acquire)
    }

    /// Why the replica fails closed on a store that went back in time, if it does.
    pub fn regression(&self) -> Option<String> {
        self.regressed.lock().clone()
    }

    /// Fails closed: the store lost changes this replica saw. Every number is withheld and health
    /// turns NOT_SERVING until [`SyncedFilter::clear_regression`].
    fn fail_closed_regressed(&self, e: &StoreError) {
        let why = e.to_string();
        tracing::error!(
            why = %why,
            "the consent store went back in time: withholding every number until an admin \
             restores the lost changes and runs `optout admin acknowledge-regression`"
        );
        metrics::counter!("optout_store_regressions_total").increment(1);
        metrics::gauge!("optout_store_regressed").set(1.0);
        *self.regressed.lock() = Some(why);
        self.regressed_flag.store(true, Ordering::Release);
        self.unload();
    }

    fn clear_regression(&self) {
        *self.regressed.lock() = None;
        self.regressed_flag.store(false, Ordering::Release);
        metrics::gauge!("optout_store_regressed").set(0.0);
    }

    /// A receiver that turns true once a generation is loaded.
    pub fn loaded(&self) -> watch::Receiver<bool> {
        self.loaded.subscribe()
    }

    fn is_fresh(&self) -> bool {
        self.age()
            .is_some_and(|age| age <= self.config.freshness_bound)
            && *self.loaded.borrow()
    }

    fn age(&self) -> Option<Duration> {
        let at = self.caught_up_at.load(Ordering::Acquire);
        if at == NEVER {
            return None;
        }
        let now = self.now_ms();
        Some(Duration::from_millis(now.saturating_sub(at - 1)))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Records that the filter was caught up with the store as of `at` (a time taken *before* the
    /// store was asked, so the claim is never later than the truth).
    fn mark_caught_up(&self, at: u64) {
        self.caught_up_at.fetch_max(at + 1, Ordering::AcqRel);
        let version = self.version();
        self.proof.send_replace((at + 1, version));
    }

    /// Status for GetStatus and metrics.
    pub fn status(&self) -> SyncStatus {
        let g = self.state.read();
        SyncStatus {
            stats: g.filter.stats(),
            version: g.version,
            age: self.age(),
            fresh: self.is_fresh(),
            freshness_bound: self.config.freshness_bound,
            loaded_from: *self.loaded_from.lock(),
            loaded: *self.loaded.borrow(),
            regressed: self.regression(),
        }
    }

    /// Stops trusting the filter at once (the store's dataset is gone or changed): every check
    /// asks the store, and health turns NOT_SERVING, until a generation is loaded again.
    fn unload(&self) {
        self.loaded.send_replace(false);
        self.caught_up_at.store(NEVER, Ordering::Release);
    }

    /// Applies change-log entries in order. Large entries go in chunks, each under a short write
    /// lock; the version moves only once all of an entry's numbers are in.
    fn apply(&self, entries: &[ChangeEntry]) {
        const CHUNK: usize = 16_384;
        for entry in entries {
            for chunk in entry.added.chunks(CHUNK) {
                let mut g = self.state.write();
                for n in chunk {
                    g.filter.insert(*n);
                }
            }
            let mut g = self.state.write();
            if entry.version > g.version {
                g.version = entry.version;
            }
            drop(g);
            self.removed_since_build
                .fetch_add(entry.removed, Ordering::Relaxed);
            self.version.send_if_modified(|v| {
                if entry.version > *v {
                    *v = entry.version;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// The current generation as snapshot bytes, with the version it reflects.
    fn snapshot(&self) -> (Version, Vec<u8>) {
        let g = self.state.read();
        (g.version, g.filter.to_snapshot(g.version))
    }

    /// Swaps in a new generation that reflects `version`.
    fn install(&self, filter: OptOutFilter, version: Version) {
        let mut g = self.state.write();
        *g = Generation { filter, version };
        drop(g);
        self.removed_since_build.store(0, Ordering::Relaxed);
        self.version.send_replace(version);
        self.loaded.send_replace(true);
    }

    fn needs_new_generation(&self) -> bool {
        let g = self.state.read();
        let stats = g.filter.stats();
        g.filter.is_over_capacity()
            || self.removed_since_build.load(Ordering::Relaxed) > (stats.capacity / 10).max(1024)
    }
}

/// Builds a generation from a full scan of the store, sized for what it holds plus room to grow.
async fn build_generation(
    store: &dyn ConsentStore,
    config: FilterConfig,
    generation: u64,
) -> Result<(OptOutFilter, Version), StoreError> {
    let scan = store.scan().await?;
    // Sized for what the store holds plus 4% to grow: within 5% of the bloom optimum (1.44 log2(1/p)
    // bits per opt-out) at the target rate. Outgrowing it triggers another background build.
    let needed = scan.numbers.len() as u64 + scan.numbers.len() as u64 / 25;
    let capacity = config.capacity.max(needed);
    tokio::task::spawn_blocking(move || {
        let mut filter = OptOutFilter::new(capacity, config.fp_rate, generation)
            .map_err(|e| StoreError::Corrupt(format!("filter: {e}")))?;
        for n in &scan.numbers {
            filter.insert(*n);
        }
        Ok((filter, scan.version))
    })
    .await
    .map_err(|e| StoreError::Unavailable(format!("filter build task failed: {e}")))?
}

/// Loads a first generation for the store's current dataset: from the newest snapshot when the
/// store shares them and the log still reaches back to it, else from a full scan.
async fn load_generation(
    store: &dyn ConsentStore,
    config: FilterConfig,
    generation: u64,
) -> Result<(OptOutFilter, Version, &'static str), StoreError> {
    store.open_dataset().await?;
    if store.shares_snapshots() {
        match store.load_snapshot().await? {
            Some(bytes) => match OptOutFilter::from_snapshot(&bytes) {
                Ok((filter, version)) => match catch_up(store, filter, version).await? {
                    Some((filter, version)) => return Ok((filter, version, "snapshot")),
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
    Ok((filter, version, "scan"))
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
                    for n in &e.added {
                        filter.insert(*n);
                    }
                    version = version.max(e.version);
                }
            }
        }
    }
}

/// The error for a store found behind `seen`.
fn behind(seen: Version, store: Version) -> StoreError {
    StoreError::Regressed(format!(
        "this replica read the store's change log up to version {seen}, and the store is now at \
         {store}: changes were lost (a Redis restarted from an older snapshot or AOF, a failover \
         to a replica that had not received them, or a restore from backup)"
    ))
}

/// Catches a finished background generation up with the log and swaps it in. Returns the error
/// only when the store went back in time (the caller fails closed); others are logged.
async fn swap_in(
    store: &dyn ConsentStore,
    synced: &SyncedFilter,
    handle: tokio::task::JoinHandle<Result<(OptOutFilter, Version), StoreError>>,
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
    match catch_up(store, filter, version).await {
        // Only the follower moves the version, so a generation caught up to at least the current
        // version holds everything the current one does.
        Ok(Some((filter, version))) if version >= synced.version() => {
            let stats = filter.stats();
            synced.install(filter, version);
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

/// Follows the store until `shutdown` turns true: the only writer of `synced`.
pub async fn follow(
    store: Arc<dyn ConsentStore>,
    synced: Arc<SyncedFilter>,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = synced.config;
    let mut backoff = Backoff::new();
    let mut generation = 0u64;
    let mut rebuild: Option<tokio::task::JoinHandle<Result<(OptOutFilter, Version), StoreError>>> =
        None;
    // Set when the log was trimmed past the filter's version, or the dataset changed: only a
    // full load can catch up.
    let mut must_rebuild = false;
    let mut last_safety_check = Instant::now();
    let mut last_snapshot = Instant::now();
    let mut published = Version::ZERO;
    // While failing closed on a store that went back in time: the store's acknowledgement id as
    // first read after failing closed (`None`: not read yet). A different one later means an
    // admin acknowledged this incident.
    let mut ack_then: Option<Option<String>> = None;

    loop {
        if *shutdown.borrow() {
            break;
        }
        if synced.regressed() {
            if !acknowledged(store.as_ref(), &mut ack_then).await {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.changed() => break,
                }
                continue;
            }
            tracing::warn!(
                "an admin acknowledged that the store went back in time; rebuilding the filter \
                 from what the store holds now"
            );
            synced.clear_regression();
            ack_then = None;
            must_rebuild = true;
        }
        // First load, or a log trimmed past our position: build a generation in the foreground.
        let needs_load = !*synced.loaded.borrow() || must_rebuild;
        if needs_load {
            let started = synced.now_ms();
            generation += 1;
            let built = tokio::select! {
                r = load_generation(store.as_ref(), config, generation) => r,
                _ = shutdown.changed() => break,
            };
            match built {
                Ok((filter, version, from)) => {
                    let stats = filter.stats();
                    synced.install(filter, version);
                    *synced.loaded_from.lock() = from;
                    must_rebuild = false;
                    synced.mark_caught_up(started);
                    tracing::info!(
                        items = stats.items,
                        bits = stats.bits,
                        generation = stats.generation,
                        %version,
                        from,
                        "filter loaded from the store"
                    );
                    backoff.reset();
                }
                Err(e @ StoreError::Regressed(_)) => {
                    synced.fail_closed_regressed(&e);
                    continue;
                }
                Err(e) => {
                    if matches!(e, StoreError::NotInitialised(_) | StoreError::Unsafe(_)) {
                        synced.unload();
                    }
                    tracing::warn!(error = %e, "cannot load the filter; checks ask the store meanwhile");
                    if backoff.wait(&mut shutdown).await {
                        break;
                    }
                    continue;
                }
            }
        }

        // A background generation finished: catch it up and swap it in.
        if rebuild.as_ref().is_some_and(|h| h.is_finished())
            && let Some(handle) = rebuild.take()
            && let Err(e) = swap_in(store.as_ref(), &synced, handle).await
        {
            synced.fail_closed_regressed(&e);
            continue;
        }
        if rebuild.is_none() && synced.needs_new_generation() {
            generation += 1;
            let store = store.clone();
            let g = generation;
            rebuild = Some(tokio::spawn(async move {
                build_generation(store.as_ref(), config, g).await
            }));
        }

        // A store that became unsafe (someone set an evicting policy) stops being trusted: the
        // filter unloads, the store has unbound itself, everything withholds until it is safe.
        if last_safety_check.elapsed() >= config.safety_check {
            last_safety_check = Instant::now();
            if let Err(e) = store.recover().await {
                tracing::warn!(error = %e, "cannot finish changes left half-done; retrying");
            }
            if let Err(e @ StoreError::Unsafe(_)) = store.check_safe().await {
                tracing::error!(error = %e, "failing closed until the store is safe again");
                synced.unload();
                must_rebuild = true;
                if backoff.wait(&mut shutdown).await {
                    break;
                }
                continue;
            }
        }

        let asked_at = synced.now_ms();
        let after = synced.version();
        let feed = tokio::select! {
            r = store.changes_after(after, 1024, config.heartbeat) => r,
            _ = shutdown.changed() => break,
        };
        let result = match &feed {
            Ok(_) => "ok",
            Err(StoreError::NotInitialised(_)) => "not_initialised",
            Err(_) => "error",
        };
        metrics::counter!("optout_store_feed_reads_total", "result" => result).increment(1);
        match feed {
            Ok(Feed::Changes(entries)) => {
                let caught_up = entries.len() < 1024;
                synced.apply(&entries);
                if caught_up {
                    synced.mark_caught_up(asked_at);
                }
                backoff.reset();
            }
            Ok(Feed::Trimmed) => {
                tracing::warn!(%after, "the change log no longer reaches this filter's version; rebuilding");
                must_rebuild = true;
            }
            Ok(Feed::Behind { store }) => synced.fail_closed_regressed(&behind(after, store)),
            Err(e @ StoreError::Regressed(_)) => synced.fail_closed_regressed(&e),
            Err(e @ StoreError::NotInitialised(_)) => {
                // The store was reset, flushed or re-initialised: what the filter says is about a
                // dataset the store no longer holds. Stop trusting it now; reload when a dataset
                // marker is back.
                tracing::error!(error = %e, "failing closed until the store's dataset is back");
                synced.unload();
                must_rebuild = true;
                if backoff.wait(&mut shutdown).await {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "change feed read failed; the filter ages until it succeeds");
                if backoff.wait(&mut shutdown).await {
                    break;
                }
            }
        }

        if store.shares_snapshots()
            && synced.is_fresh()
            && last_snapshot.elapsed() >= config.snapshot_interval
            && synced.version() > published
        {
            last_snapshot = Instant::now();
            let (version, bytes) = synced.snapshot();
            match store.publish_snapshot(version, &bytes).await {
                Ok(()) => {
                    published = version;
                    tracing::debug!(%version, bytes = bytes.len(), "filter snapshot published");
                }
                Err(e) => tracing::warn!(error = %e, "could not publish a filter snapshot"),
            }
        }
    }
    if let Some(h) = rebuild {
        h.abort();
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
