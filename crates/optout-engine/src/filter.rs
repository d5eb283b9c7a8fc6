//! The filter as the check path reads it.
//!
//! [`SyncedFilter`] is the current filter generation, the store version it reflects, and when it
//! was last proven caught up with the store. [`super::follower::Follower`] is the one task that
//! writes it.
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
    time::Duration,
};

use parking_lot::RwLock;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{
    core::{
        FilterStats, NhsNumber, OptOutFilter, OptOutType, Version,
        coverage::{Coverage, CoverageMode, MaxAge},
    },
    store::{ChangeEntry, CheckReads, StoreError},
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
    /// How old each type's list may be before nothing it says is released.
    pub max_list_age: MaxAge,
}

impl FilterConfig {
    /// The defaults (also those of the `optout serve` flags).
    pub const DEFAULT: FilterConfig = FilterConfig {
        capacity: 1_000_000,
        fp_rate: 0.001,
        freshness_bound: Duration::from_secs(2),
        heartbeat: Duration::from_millis(250),
        snapshot_interval: Duration::from_secs(60),
        safety_check: Duration::from_secs(5),
        max_list_age: MaxAge::DEFAULT,
    };
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self::DEFAULT
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
    /// When the store last answered this replica (a feed read, a lookup), as `caught_up_at`:
    /// with the filter not fresh, whether the replica can still answer by asking the store.
    store_answered_at: AtomicU64,
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

/// One generation, the version it reflects, and what the store's lists covered at that version
/// (read with the generation and swapped in with it, so the check path never pairs a filter with
/// a population from another version).
pub struct Generation {
    filter: OptOutFilter,
    version: Version,
    coverage: Arc<Coverage>,
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

    /// What the lists covered at that version (unknown until a generation is loaded).
    pub fn coverage(&self) -> Arc<Coverage> {
        self.guard.coverage.clone()
    }

    /// Whether each number may be opted out (false: certainly not), in order, into `out`. Each
    /// number is hashed once, and the memory of the numbers [`SCREEN_AHEAD`] places on is
    /// prefetched while this one is looked up (see [`crate::core::OptOutFilter::prefetch`]), so
    /// their cache misses overlap.
    pub fn may_contain_each(
        &self,
        numbers: impl ExactSizeIterator<Item = NhsNumber>,
        out: &mut Vec<bool>,
    ) {
        let filter = &self.guard.filter;
        let mut numbers = numbers.map(|n| filter.probe(n));
        let mut ring = [None; SCREEN_AHEAD];
        for slot in ring.iter_mut() {
            *slot = numbers.next();
            if let Some(p) = *slot {
                filter.prefetch_probe(p);
            }
        }
        out.reserve(numbers.len() + SCREEN_AHEAD);
        let mut at = 0;
        while let Some(probe) = ring[at].take() {
            if let Some(next) = numbers.next() {
                filter.prefetch_probe(next);
                ring[at] = Some(next);
            }
            out.push(filter.may_contain_probe(probe));
            at = (at + 1) % SCREEN_AHEAD;
        }
    }
}

/// How many numbers ahead [`FilterView::may_contain_each`] prefetches.
pub const SCREEN_AHEAD: usize = 8;

/// One type's list as status, metrics and health show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListState {
    /// The type.
    pub t: OptOutType,
    /// Its coverage mode ("unknown" until read).
    pub mode: &'static str,
    /// Population mode: the patients checked.
    pub population: u64,
    /// When it was last known complete, ms.
    pub as_of_ms: Option<u64>,
    /// The maximum age set for it.
    pub max_age: Option<Duration>,
    /// When it stops proving anything, ms (0: it never did); `None`: no maximum age.
    pub expires_at_ms: Option<u64>,
    /// Whether it has expired now.
    pub expired: bool,
    /// Population mode: the organisation whose checks alone the store answers.
    pub owner: Option<String>,
    /// Type 1: each practice's last whole list, ms.
    pub practices: Vec<(String, u64)>,
}

impl SyncStatus {
    /// Each type's list, as of now.
    pub fn lists_now(&self) -> [ListState; 2] {
        self.lists(crate::store::now_ms())
    }

    /// Each type's list, as of `now_ms`.
    pub fn lists(&self, now_ms: u64) -> [ListState; 2] {
        OptOutType::ALL.map(|t| {
            let c = &self.coverage;
            let mode = match (t, c.national_mode) {
                (_, None) => "unknown",
                (OptOutType::NationalDataOptOut, Some(m)) => m.name(),
                (OptOutType::Type1, Some(_)) => "list",
            };
            let population = match (t, c.national_mode) {
                (OptOutType::NationalDataOptOut, Some(CoverageMode::Population)) => {
                    c.population.len()
                }
                _ => 0,
            };
            let expires_at_ms = c.expires_at_ms(t, &self.max_list_age);
            ListState {
                t,
                mode,
                population,
                as_of_ms: c.as_of_ms(t),
                max_age: self.max_list_age.of(t),
                expires_at_ms,
                expired: expires_at_ms.is_some_and(|e| now_ms >= e),
                owner: match t {
                    OptOutType::NationalDataOptOut => c.population_owner().map(str::to_string),
                    OptOutType::Type1 => None,
                },
                practices: match t {
                    OptOutType::NationalDataOptOut => Vec::new(),
                    OptOutType::Type1 => {
                        c.practices.iter().map(|(p, at)| (p.clone(), *at)).collect()
                    }
                },
            }
        })
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
    /// What the store's lists covered at the generation's version.
    pub coverage: Arc<Coverage>,
    /// How old each list may be.
    pub max_list_age: MaxAge,
}

impl SyncedFilter {
    /// An empty, unloaded filter: until [`follow`](crate::follower::follow) loads it, every check asks the store.
    pub fn new(config: FilterConfig) -> Result<Arc<Self>, crate::core::FilterError> {
        let filter = OptOutFilter::new(crate::core::MIN_CAPACITY, config.fp_rate, 0)?;
        Ok(Arc::new(SyncedFilter {
            state: RwLock::new(Generation {
                filter,
                version: Version::ZERO,
                coverage: Arc::new(Coverage::unknown()),
            }),
            config,
            version: watch::channel(Version::ZERO).0,
            loaded: watch::channel(false).0,
            caught_up_at: AtomicU64::new(NEVER),
            store_answered_at: AtomicU64::new(NEVER),
            epoch: Instant::now(),
            removed_since_build: AtomicU64::new(0),
            loaded_from: parking_lot::Mutex::new("none"),
            proof: watch::channel((NEVER, Version::ZERO)).0,
            regressed: parking_lot::Mutex::new(None),
            regressed_flag: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// What the lists covered at the loaded generation's version (no freshness read: for what
    /// does not depend on it, such as a population store's owner).
    pub fn coverage(&self) -> Arc<Coverage> {
        self.state.read().coverage.clone()
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
    pub(super) fn fail_closed_regressed(&self, e: &StoreError) {
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

    pub(super) fn clear_regression(&self) {
        *self.regressed.lock() = None;
        self.regressed_flag.store(false, Ordering::Release);
        metrics::gauge!("optout_store_regressed").set(0.0);
    }

    /// A receiver that turns true once a generation is loaded.
    pub fn loaded(&self) -> watch::Receiver<bool> {
        self.loaded.subscribe()
    }

    pub(super) fn is_fresh(&self) -> bool {
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

    pub(super) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Records that the filter was caught up with the store as of `at` (a time taken *before* the
    /// store was asked, so the claim is never later than the truth).
    pub(super) fn mark_caught_up(&self, at: u64) {
        self.caught_up_at.fetch_max(at + 1, Ordering::AcqRel);
        let version = self.version();
        self.proof.send_replace((at + 1, version));
    }

    /// Stops trusting the filter's "absent" until the follower proves it caught up again: the
    /// follower learned that the store holds changes the filter lacks and cannot apply from the
    /// log (an import too big to list, a log trimmed past the filter). Without this the filter
    /// would be trusted until the freshness bound ran out, though known to be behind. Checks ask
    /// the store meanwhile; health is unchanged (the filter stays loaded).
    pub(super) fn distrust(&self) {
        self.caught_up_at.store(NEVER, Ordering::Release);
    }

    /// Records that the store answered a call of this replica just now.
    pub(crate) fn store_answered(&self) {
        let now = self.now_ms();
        self.store_answered_at.fetch_max(now + 1, Ordering::AcqRel);
    }

    /// Readiness: whether this replica can answer checks, i.e. a generation is loaded and either
    /// the filter is proven fresh or the store answered within the freshness bound (so the
    /// "maybe"s and the numbers an unproven filter cannot rule out are asked of it). A replica
    /// that lost its store and can no longer prove its filter answers every number WITHHOLD
    /// (`store-unavailable`): it is not ready, and leaves the Service, until either holds again.
    /// Liveness is another matter (the process runs).
    pub fn ready(&self) -> bool {
        if !*self.loaded.borrow() || self.regressed() {
            return false;
        }
        if self.is_fresh() {
            return true;
        }
        let at = self.store_answered_at.load(Ordering::Acquire);
        at != NEVER
            && Duration::from_millis(self.now_ms().saturating_sub(at - 1))
                <= self.config.freshness_bound
    }

    /// How the filter is sized and how fresh it must be.
    pub fn config(&self) -> FilterConfig {
        self.config
    }

    /// Whether a generation is loaded.
    pub(super) fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Where the current generation came from ("scan" or "snapshot").
    pub(super) fn set_loaded_from(&self, from: &'static str) {
        *self.loaded_from.lock() = from;
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
            coverage: g.coverage.clone(),
            max_list_age: self.config.max_list_age,
        }
    }

    /// Stops trusting the filter at once (the store's dataset is gone or changed): every check
    /// asks the store, and health turns NOT_SERVING, until a generation is loaded again.
    pub(super) fn unload(&self) {
        // What the old dataset covered says nothing about the next one's.
        self.state.write().coverage = Arc::new(Coverage::unknown());
        self.loaded.send_replace(false);
        self.caught_up_at.store(NEVER, Ordering::Release);
    }

    /// Applies change-log entries in order, up to the first that does not list its numbers (an
    /// import too big to list: the filter must be rebuilt from a scan); returns whether it met
    /// one. Large entries go in chunks, each under a short write lock; the version moves only once
    /// all of an entry's numbers are in.
    pub(super) fn apply(&self, entries: &[ChangeEntry]) -> bool {
        const CHUNK: usize = 16_384;
        for entry in entries {
            if entry.unlisted {
                return true;
            }
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
        false
    }

    /// The current generation as snapshot bytes, with the version it reflects.
    pub(super) fn snapshot(&self) -> (Version, Vec<u8>) {
        let g = self.state.read();
        (g.version, g.filter.to_snapshot(g.version))
    }

    /// Whether the coverage has been read from the store (for the current dataset).
    pub(super) fn coverage_known(&self) -> bool {
        self.state.read().coverage.national_mode.is_some()
    }

    /// Before a generation loads: learns from the store whether it is in list mode, and if so
    /// its coverage (the lists' dates), so that the store's answers stand meanwhile as they
    /// always did. The mode is read first, so a population is never read here: in population
    /// mode it is only ever installed with the generation it belongs to, and the coverage stays
    /// unknown (releases the national type applies to are withheld) until then. Returns the
    /// list-mode coverage in force after it, if that is what it is.
    pub(crate) async fn learn_list_coverage(
        &self,
        store: &dyn CheckReads,
    ) -> Option<Arc<Coverage>> {
        if let Ok(CoverageMode::List) = store.coverage_mode().await
            && let Ok(coverage) = store.coverage().await
            && coverage.national_mode == Some(CoverageMode::List)
        {
            let mut g = self.state.write();
            if g.coverage.national_mode.is_none() {
                g.coverage = Arc::new(coverage);
            }
        }
        let current = self.state.read().coverage.clone();
        (current.national_mode == Some(CoverageMode::List)).then_some(current)
    }

    /// Swaps in a new generation that reflects `version`, with the coverage read for it.
    pub(super) fn install(&self, filter: OptOutFilter, version: Version, coverage: Coverage) {
        let coverage = Arc::new(coverage);
        let mut g = self.state.write();
        *g = Generation {
            filter,
            version,
            coverage,
        };
        drop(g);
        self.removed_since_build.store(0, Ordering::Relaxed);
        self.version.send_replace(version);
        self.loaded.send_replace(true);
    }

    pub(super) fn needs_new_generation(&self) -> bool {
        let g = self.state.read();
        let stats = g.filter.stats();
        g.filter.is_over_capacity()
            || self.removed_since_build.load(Ordering::Relaxed) > (stats.capacity / 10).max(1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batched screen answers exactly as one `may_contain` a number does, for batches
    /// shorter than, equal to and longer than the prefetch distance (a slip in the ring would
    /// answer for the wrong number: a release of an opted-out one).
    #[test]
    fn may_contain_each_answers_as_may_contain_in_order() {
        let numbers: Vec<NhsNumber> = (4_010_232_137u64..)
            .filter_map(|v| NhsNumber::from_u64(v).ok())
            .take(200)
            .collect();
        let mut inner = OptOutFilter::new(1_000, 0.001, 1).expect("filter");
        for n in numbers.iter().step_by(3) {
            inner.insert(*n);
        }
        let synced = SyncedFilter::new(FilterConfig {
            capacity: 1_000,
            ..FilterConfig::DEFAULT
        })
        .expect("filter");
        synced.install(inner, Version::ZERO, Coverage::unknown());
        let view = synced.view();
        for len in [0, 1, SCREEN_AHEAD - 1, SCREEN_AHEAD, SCREEN_AHEAD + 1, 200] {
            let batch = &numbers[..len];
            let mut got = Vec::new();
            view.may_contain_each(batch.iter().copied(), &mut got);
            let want: Vec<bool> = batch
                .iter()
                .map(|n| view.guard.filter.may_contain(*n))
                .collect();
            assert_eq!(got, want, "batch of {len}");
            let inserted = batch.iter().step_by(3).count();
            assert!(
                got.iter().filter(|m| **m).count() >= inserted,
                "no false negative"
            );
        }
    }
}
