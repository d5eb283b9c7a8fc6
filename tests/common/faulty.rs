//! A store that fails on purpose: switches, and a wrapper in front of each role they break. The
//! roles nothing breaks come from the real store untouched (`Roles` forwards every method, so a
//! wrapper never hides what the store underneath does).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use optout::{
    core::{AuditQuery, AuditRecord, NhsNumber, OptOutSet, OptOutType, Practice, Version},
    store::{
        AuditTrail, ChangeFeed, ChangeKind, CheckReads, ConsentStore, Feed, ImportMode,
        ImportSession, Lookup, OptOutRecord, Roles, StoreError, StoreStatus, Stored, StoredEntry,
        WriteOutcome, Writes,
    },
};

/// The switches. [`FaultyStore::store`] is the real store with them in front of its roles.
pub struct FaultyStore {
    inner: Arc<dyn ConsentStore>,
    /// The change feed, scans, snapshot loads and the dataset check fail.
    pub feed_down: AtomicBool,
    pub lookup_down: AtomicBool,
    pub lookup_delay_ms: AtomicU64,
    /// Audit writes fail, and so do admin changes, which write their record of the changes trail
    /// in their own transaction.
    pub audit_down: AtomicBool,
    /// Audit writes of more records than this at once fail (0: no limit), as a store that
    /// refuses a write too large for it would.
    pub audit_max_records: AtomicU64,
    /// Reads of the whole store (a scan, a snapshot) wait this long first: a slow rebuild.
    pub rebuild_delay_ms: AtomicU64,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ConsentStore>) -> Arc<Self> {
        Arc::new(FaultyStore {
            inner,
            feed_down: AtomicBool::new(false),
            lookup_down: AtomicBool::new(false),
            lookup_delay_ms: AtomicU64::new(0),
            audit_down: AtomicBool::new(false),
            audit_max_records: AtomicU64::new(0),
            rebuild_delay_ms: AtomicU64::new(0),
        })
    }

    /// The store to serve from: each role the switches can break wrapped, one wrapper a role.
    pub fn store(self: &Arc<Self>) -> Arc<dyn ConsentStore> {
        Arc::new(Roles {
            reads: Arc::new(Reads(self.clone())),
            writes: Arc::new(Changes(self.clone())),
            feed: Arc::new(FeedFaults(self.clone())),
            audit: Arc::new(Trail(self.clone())),
        })
    }

    fn fail_if(&self, flag: &AtomicBool) -> Result<(), StoreError> {
        if flag.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("switched off by the test".into()))
        } else {
            Ok(())
        }
    }

    async fn rebuild_delay(&self) {
        let delay = self.rebuild_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }
}

/// The check path's reads: down, or slow.
struct Reads(Arc<FaultyStore>);

#[async_trait]
impl CheckReads for Reads {
    fn kind(&self) -> &'static str {
        "faulty"
    }

    async fn lookup(&self, numbers: &[NhsNumber], types: OptOutSet) -> Result<Lookup, StoreError> {
        let delay = self.0.lookup_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.0.fail_if(&self.0.lookup_down)?;
        self.0.inner.lookup(numbers, types).await
    }

    async fn coverage(&self) -> Result<optout::core::coverage::Coverage, StoreError> {
        self.0.inner.coverage().await
    }
}

/// Admin changes: refused while the trail they are recorded in is down.
struct Changes(Arc<FaultyStore>);

#[async_trait]
impl Writes for Changes {
    async fn change(
        &self,
        kind: ChangeKind,
        opt_out: OptOutType,
        practice: Option<&Practice>,
        numbers: &[NhsNumber],
        source: &str,
        audit: &AuditRecord,
    ) -> Result<WriteOutcome, StoreError> {
        self.0.fail_if(&self.0.audit_down)?;
        self.0
            .inner
            .change(kind, opt_out, practice, numbers, source, audit)
            .await
    }

    async fn begin_import(
        &self,
        mode: ImportMode,
        opt_out: OptOutType,
        practice: Option<&Practice>,
        source: &str,
    ) -> Result<Box<dyn ImportSession>, StoreError> {
        self.0
            .inner
            .begin_import(mode, opt_out, practice, source)
            .await
    }

    async fn get(&self, number: NhsNumber) -> Result<(Vec<OptOutRecord>, Version), StoreError> {
        self.0.inner.get(number).await
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        self.0.inner.status().await
    }

    async fn acknowledge_regression(&self, audit: &AuditRecord) -> Result<String, StoreError> {
        self.0.inner.acknowledge_regression(audit).await
    }
}

/// The change feed and what rebuilds a filter: down, or a slow rebuild.
struct FeedFaults(Arc<FaultyStore>);

#[async_trait]
impl ChangeFeed for FeedFaults {
    async fn changes_after(
        &self,
        after: Version,
        max: usize,
        wait: Duration,
    ) -> Result<Feed, StoreError> {
        if self.0.feed_down.load(Ordering::SeqCst) {
            tokio::time::sleep(wait.min(Duration::from_millis(50))).await;
        }
        self.0.fail_if(&self.0.feed_down)?;
        self.0.inner.changes_after(after, max, wait).await
    }

    async fn scan_pages(
        &self,
        page: &mut (dyn for<'n> FnMut(&'n [NhsNumber]) + Send),
    ) -> Result<Version, StoreError> {
        self.0.fail_if(&self.0.feed_down)?;
        self.0.rebuild_delay().await;
        self.0.inner.scan_pages(page).await
    }

    async fn open_dataset(&self) -> Result<String, StoreError> {
        self.0.fail_if(&self.0.feed_down)?;
        self.0.inner.open_dataset().await
    }

    async fn load_snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.fail_if(&self.0.feed_down)?;
        self.0.rebuild_delay().await;
        self.0.inner.load_snapshot().await
    }

    async fn publish_snapshot(&self, version: Version, bytes: &[u8]) -> Result<(), StoreError> {
        self.0.inner.publish_snapshot(version, bytes).await
    }

    fn shares_snapshots(&self) -> bool {
        self.0.inner.shares_snapshots()
    }

    async fn check_safe(&self) -> Result<(), StoreError> {
        self.0.inner.check_safe().await
    }

    async fn recover(&self) -> Result<u64, StoreError> {
        self.0.inner.recover().await
    }

    async fn regression_ack(&self) -> Result<Option<String>, StoreError> {
        self.0.inner.regression_ack().await
    }

    fn forget_history(&self) {
        self.0.inner.forget_history()
    }

    fn seen_version(&self) -> Version {
        self.0.inner.seen_version()
    }
}

/// The audit trails: appends down, or refused above a size.
struct Trail(Arc<FaultyStore>);

#[async_trait]
impl AuditTrail for Trail {
    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let max = self.0.audit_max_records.load(Ordering::SeqCst);
        self.0.fail_if(&self.0.audit_down)?;
        if max > 0 && records.len() as u64 > max {
            return Err(StoreError::Unavailable("too many records at once".into()));
        }
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
