//! Unit tests of the engine over the real embedded store: the check path, the audit gate, and the
//! follower's freshness under paused tokio time. Faults are injected by [`Switches`], which wrap
//! roles of the real store and fail chosen calls at once (no I/O, so paused time cannot race it).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::watch;

use super::{
    check::{CheckInput, CheckOutput, Checker, Requester},
    check_log::{CheckLog, Sink},
    filter::{FilterConfig, SyncedFilter},
    follower::Follower,
};
use crate::{
    core::keys::Caller,
    core::{
        AuditKey, AuditQuery, AuditRecord, DataOrigin, Decision, NhsNumber, OptOutSet, OptOutType,
        Purpose, ReleaseReason, Version, WithholdReason,
    },
    store::{
        AuditTrail, ChangeFeed, ChangeKind, CheckReads, ConsentStore, Feed, Lookup, Roles,
        StoreError, Stored, StoredEntry,
    },
};
use optout_store_embedded::{EmbeddedConfig, EmbeddedStore};

/// Switches that make the embedded store's reads, feed or audit appends fail, each role broken
/// by a wrapper of that role alone (the rest of the store is the real one, through [`Roles`]).
struct Switches {
    inner: Arc<EmbeddedStore>,
    down: AtomicBool,
    audit_down: AtomicBool,
    /// The feed says the store went back in time (as a Redis restored from an older copy would).
    behind: AtomicBool,
}

impl Switches {
    fn fail_if(&self, flag: &AtomicBool) -> Result<(), StoreError> {
        if flag.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("switched off by the test".into()))
        } else {
            Ok(())
        }
    }

    /// The real store with the switches in front of its reads, its feed and its trail.
    fn store(self: &Arc<Self>) -> Arc<dyn ConsentStore> {
        Arc::new(Roles {
            reads: Arc::new(ReadSwitch(self.clone())),
            feed: Arc::new(FeedSwitch(self.clone())),
            audit: Arc::new(TrailSwitch(self.clone())),
            ..Roles::of(self.inner.clone())
        })
    }
}

struct ReadSwitch(Arc<Switches>);

#[async_trait]
impl CheckReads for ReadSwitch {
    fn kind(&self) -> &'static str {
        "switch"
    }

    async fn lookup(&self, numbers: &[NhsNumber], types: OptOutSet) -> Result<Lookup, StoreError> {
        self.0.fail_if(&self.0.down)?;
        self.0.inner.lookup(numbers, types).await
    }

    async fn coverage(&self) -> Result<crate::core::coverage::Coverage, StoreError> {
        self.0.inner.coverage().await
    }
}

struct FeedSwitch(Arc<Switches>);

#[async_trait]
impl ChangeFeed for FeedSwitch {
    async fn changes_after(
        &self,
        after: Version,
        max: usize,
        wait: Duration,
    ) -> Result<Feed, StoreError> {
        self.0.fail_if(&self.0.down)?;
        if self.0.behind.load(Ordering::SeqCst) {
            return Ok(Feed::Behind {
                store: Version::ZERO,
            });
        }
        self.0.inner.changes_after(after, max, wait).await
    }

    async fn scan_pages(
        &self,
        page: &mut (dyn for<'n> FnMut(&'n [NhsNumber]) + Send),
    ) -> Result<Version, StoreError> {
        self.0.fail_if(&self.0.down)?;
        self.0.inner.scan_pages(page).await
    }

    async fn open_dataset(&self) -> Result<String, StoreError> {
        self.0.fail_if(&self.0.down)?;
        self.0.inner.open_dataset().await
    }

    async fn regression_ack(&self) -> Result<Option<String>, StoreError> {
        self.0.inner.regression_ack().await
    }
}

struct TrailSwitch(Arc<Switches>);

#[async_trait]
impl AuditTrail for TrailSwitch {
    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        self.0.fail_if(&self.0.audit_down)?;
        self.0.inner.append_audit(records).await
    }

    async fn trim_changes(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.0.inner.trim_changes(before_ms).await
    }

    async fn record_access(&self, record: &AuditRecord) -> Result<(), StoreError> {
        self.0.inner.record_access(record).await
    }

    async fn read_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        self.0.inner.read_audit(query).await
    }

    async fn stored(
        &self,
        part: Stored,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.0.inner.stored(part, after, limit).await
    }

    async fn last_seal(&self) -> Result<Option<StoredEntry>, StoreError> {
        self.0.inner.last_seal().await
    }

    async fn append_seal(&self, after_seq: u64, line: &str) -> Result<bool, StoreError> {
        self.0.inner.append_seal(after_seq, line).await
    }
}

/// A store, a filter followed by a running follower, a check log and a checker.
struct Rig {
    _dir: tempfile::TempDir,
    switches: Arc<Switches>,
    store: Arc<dyn ConsentStore>,
    filter: Arc<SyncedFilter>,
    log: Arc<CheckLog>,
    checker: Checker,
    stop: watch::Sender<bool>,
}

fn number(n: u64) -> NhsNumber {
    // The first valid NHS number at or after `n`.
    (n..)
        .find_map(|v| NhsNumber::from_u64(v).ok())
        .expect("a valid number")
}

impl Rig {
    async fn start(audit_bound: Duration) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = EmbeddedConfig {
            data_dir: dir.path().to_path_buf(),
            change_log_len: 1000,
            cache_bytes: optout_store_embedded::DEFAULT_CACHE_BYTES,
        };
        let (inner, _) = EmbeddedStore::open(&config).expect("open");
        let switches = Arc::new(Switches {
            inner: Arc::new(inner),
            down: AtomicBool::new(false),
            audit_down: AtomicBool::new(false),
            behind: AtomicBool::new(false),
        });
        // Lists without a maximum age: the rig's store is fed by single changes (the ages are
        // `Coverage::rule`'s and tests/it/population.rs's).
        let filter = SyncedFilter::new(FilterConfig {
            capacity: 1000,
            max_list_age: crate::core::coverage::MaxAge::NONE,
            ..FilterConfig::DEFAULT
        })
        .expect("filter");
        let (stop, stop_rx) = watch::channel(false);
        let store = switches.store();
        let dyn_store = store.clone();
        tokio::spawn(Follower::new(dyn_store.clone(), filter.clone(), stop_rx.clone()).run());
        let key = AuditKey::new(&[7u8; 32]).expect("key");
        let (log, _task) = CheckLog::start(
            Sink::Store(dyn_store.clone()),
            key,
            audit_bound,
            1 << 20,
            stop_rx,
        );
        let checker = Checker::new(dyn_store, filter.clone(), log.clone());
        let mut loaded = filter.loaded();
        loaded.wait_for(|l| *l).await.expect("the filter loads");
        Rig {
            _dir: dir,
            switches,
            store,
            filter,
            log,
            checker,
            stop,
        }
    }

    async fn add(&self, n: NhsNumber, t: OptOutType) -> Version {
        let audit = AuditRecord {
            action: "add".into(),
            ..AuditRecord::default()
        };
        let practice = crate::core::Practice::parse("A83007", false).expect("practice");
        let practice = (t == OptOutType::Type1).then_some(&practice);
        self.store
            .change(ChangeKind::Add, t, practice, &[n], "test", &audit)
            .await
            .expect("add")
            .version
    }

    async fn check(&self, numbers: &[Option<NhsNumber>], purpose: Purpose) -> CheckOutput {
        let caller = Caller::anonymous();
        let who = Requester {
            caller: &caller,
            extract_id: "unit",
            basis_reference: "",
        };
        let input = CheckInput {
            numbers,
            purpose,
            origin: DataOrigin::Unspecified,
            basis: crate::core::LegalBasis::None,
            at_least_version: None,
            deadline: std::time::Instant::now() + Duration::from_secs(5),
        };
        self.checker.check(&who, input).await
    }

    /// Waits, in the runtime's (paused or real) time, until `cond` holds.
    async fn until(&self, what: &str, cond: impl Fn(&Rig) -> bool) {
        for _ in 0..2000 {
            if cond(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting until {what}");
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

const UNAVAILABLE: Decision = Decision::Withhold(WithholdReason::StoreUnavailable);

#[tokio::test]
async fn a_check_releases_only_what_it_can_prove_and_records_what_it_released() {
    let rig = Rig::start(Duration::from_secs(5)).await;
    let (opted, free) = (number(4_000_000_000), number(4_100_000_000));
    let version = rig.add(opted, OptOutType::NationalDataOptOut).await;
    rig.filter
        .wait_for_version(version, Duration::from_secs(5))
        .await;
    let out = rig
        .check(&[Some(opted), Some(free), None], Purpose::Research)
        .await;
    assert_eq!(
        out.decisions,
        vec![
            Decision::Withhold(WithholdReason::NationalDataOptOut),
            Decision::Release(ReleaseReason::NoOptOut),
            Decision::Withhold(WithholdReason::InvalidNhsNumber),
        ]
    );
    assert!(out.version >= version);
    rig.until("the check is recorded", |r| r.log.backlog() == 0)
        .await;
    let records = rig
        .store
        .read_audit(&AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .expect("audit");
    let check = records
        .iter()
        .find(|r| r.action == "check")
        .expect("a check record");
    assert_eq!((check.count, check.applied), (3, 1));
    assert_eq!(check.extract_id.as_deref(), Some("unit"));
}

#[tokio::test(start_paused = true)]
async fn a_filter_that_cannot_prove_it_is_fresh_sends_every_number_to_the_store() {
    let rig = Rig::start(Duration::from_secs(5)).await;
    let free = number(4_200_000_000);
    rig.until("the filter is fresh", |r| r.filter.view().trusted)
        .await;
    assert_eq!(
        rig.check(&[Some(free)], Purpose::Research).await.decisions,
        vec![Decision::Release(ReleaseReason::NoOptOut)]
    );
    // The store stops answering: the filter ages past its bound and stops being trusted, and
    // the store cannot answer either, so nothing is released.
    rig.switches.down.store(true, Ordering::SeqCst);
    tokio::time::advance(FilterConfig::DEFAULT.freshness_bound * 2).await;
    rig.until("the filter is stale", |r| !r.filter.view().trusted)
        .await;
    assert_eq!(
        rig.check(&[Some(free)], Purpose::Research).await.decisions,
        vec![UNAVAILABLE]
    );
    // Back: the next feed read proves it fresh again.
    rig.switches.down.store(false, Ordering::SeqCst);
    rig.until("the filter is fresh again", |r| r.filter.view().trusted)
        .await;
    assert_eq!(
        rig.check(&[Some(free)], Purpose::Research).await.decisions,
        vec![Decision::Release(ReleaseReason::NoOptOut)]
    );
}

#[tokio::test(start_paused = true)]
async fn nothing_is_released_while_checks_cannot_be_recorded_past_the_bound() {
    let bound = Duration::from_secs(1);
    let rig = Rig::start(bound).await;
    let n = number(4_300_000_000);
    // Direct care is exempt: released without the store, so only the audit gate can withhold.
    let exempt = Decision::Release(ReleaseReason::PurposeExempt);
    assert_eq!(
        rig.check(&[Some(n)], Purpose::DirectCare).await.decisions,
        vec![exempt]
    );
    rig.switches.audit_down.store(true, Ordering::SeqCst);
    // Within the bound, releases go on (their records wait in the queue).
    assert_eq!(
        rig.check(&[Some(n)], Purpose::DirectCare).await.decisions,
        vec![exempt]
    );
    tokio::time::advance(bound * 2).await;
    rig.until("the log stops accepting", |r| !r.log.accepting())
        .await;
    assert_eq!(
        rig.check(&[Some(n)], Purpose::DirectCare).await.decisions,
        vec![UNAVAILABLE]
    );
    rig.switches.audit_down.store(false, Ordering::SeqCst);
    rig.until("the log accepts again", |r| r.log.accepting())
        .await;
    assert_eq!(
        rig.check(&[Some(n)], Purpose::DirectCare).await.decisions,
        vec![exempt]
    );
}

#[tokio::test]
async fn a_store_that_went_back_in_time_is_not_trusted_again_until_an_admin_acknowledges_it() {
    let rig = Rig::start(Duration::from_secs(5)).await;
    let free = number(4_400_000_000);
    rig.until("the filter is fresh", |r| r.filter.view().trusted)
        .await;
    rig.switches.behind.store(true, Ordering::SeqCst);
    rig.until("the follower fails closed", |r| r.filter.regressed())
        .await;
    let regressed = Decision::Withhold(WithholdReason::StoreRegressed);
    assert_eq!(
        rig.check(&[Some(free)], Purpose::Research).await.decisions,
        vec![regressed]
    );
    // The store answers normally again (restored), but nothing is trusted without an admin.
    rig.switches.behind.store(false, Ordering::SeqCst);
    // Several acknowledgement polls (every 500 ms) and feed reads go by: still failing closed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(rig.filter.regressed(), "no silent rebuild");
    assert_eq!(
        rig.check(&[Some(free)], Purpose::Research).await.decisions,
        vec![regressed]
    );
    let ack = AuditRecord {
        action: "acknowledge-regression".into(),
        ..AuditRecord::default()
    };
    rig.store
        .acknowledge_regression(&ack)
        .await
        .expect("acknowledge");
    rig.until("the follower rebuilds and serves", |r| {
        !r.filter.regressed() && r.filter.view().trusted
    })
    .await;
    assert_eq!(
        rig.check(&[Some(free)], Purpose::Research).await.decisions,
        vec![Decision::Release(ReleaseReason::NoOptOut)]
    );
}
