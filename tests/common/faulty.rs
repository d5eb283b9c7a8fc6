//! A store that fails on purpose.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use optout::{
    core::{AuditQuery, AuditRecord, NhsNumber, OptOutSet, OptOutType, Version},
    store::{
        AuditTrail, ChangeFeed, ChangeKind, CheckReads, ConsentStore, Feed, ImportMode,
        ImportSession, Lookup, OptOutRecord, Scan, StoreError, StoreStatus, Stored, StoredEntry,
        WriteOutcome, Writes,
    },
};

/// The real embedded store with switches that make parts of it fail or stall, to pin what the
/// service does when its store cannot answer.
pub struct FaultyStore {
    pub inner: Arc<dyn ConsentStore>,
    pub feed_down: AtomicBool,
    pub lookup_down: AtomicBool,
    pub lookup_delay_ms: AtomicU64,
    /// Audit writes fail (and so do admin changes, which write their audit record with them).
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
}

impl FaultyStore {
    async fn rebuild_delay(&self) {
        let delay = self.rebuild_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }
}

fn down() -> StoreError {
    StoreError::Unavailable("switched off by the test".into())
}

#[async_trait]
impl CheckReads for FaultyStore {
    fn kind(&self) -> &'static str {
        "faulty-embedded"
    }

    async fn lookup(&self, numbers: &[NhsNumber], types: OptOutSet) -> Result<Lookup, StoreError> {
        let delay = self.lookup_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.lookup_down.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.lookup(numbers, types).await
    }

    async fn coverage(&self) -> Result<optout::core::coverage::Coverage, StoreError> {
        self.inner.coverage().await
    }
}

#[async_trait]
impl Writes for FaultyStore {
    async fn change(
        &self,
        kind: ChangeKind,
        opt_out: OptOutType,
        practice: Option<&optout::core::Practice>,
        numbers: &[NhsNumber],
        source: &str,
        audit: &AuditRecord,
    ) -> Result<WriteOutcome, StoreError> {
        if self.audit_down.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner
            .change(kind, opt_out, practice, numbers, source, audit)
            .await
    }

    async fn begin_import(
        &self,
        mode: ImportMode,
        opt_out: OptOutType,
        practice: Option<&optout::core::Practice>,
        source: &str,
    ) -> Result<Box<dyn ImportSession>, StoreError> {
        self.inner
            .begin_import(mode, opt_out, practice, source)
            .await
    }

    async fn get(&self, number: NhsNumber) -> Result<(Vec<OptOutRecord>, Version), StoreError> {
        self.inner.get(number).await
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        self.inner.status().await
    }

    async fn acknowledge_regression(&self, audit: &AuditRecord) -> Result<String, StoreError> {
        self.inner.acknowledge_regression(audit).await
    }
}

#[async_trait]
impl ChangeFeed for FaultyStore {
    async fn changes_after(
        &self,
        after: Version,
        max: usize,
        wait: Duration,
    ) -> Result<Feed, StoreError> {
        if self.feed_down.load(Ordering::SeqCst) {
            tokio::time::sleep(wait.min(Duration::from_millis(50))).await;
            return Err(down());
        }
        self.inner.changes_after(after, max, wait).await
    }

    async fn scan_pages(
        &self,
        page: &mut (dyn for<'n> FnMut(&'n [NhsNumber]) + Send),
    ) -> Result<Version, StoreError> {
        if self.feed_down.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.rebuild_delay().await;
        self.inner.scan_pages(page).await
    }

    async fn open_dataset(&self) -> Result<String, StoreError> {
        if self.feed_down.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.open_dataset().await
    }

    async fn load_snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        if self.feed_down.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.rebuild_delay().await;
        self.inner.load_snapshot().await
    }

    async fn publish_snapshot(&self, version: Version, bytes: &[u8]) -> Result<(), StoreError> {
        self.inner.publish_snapshot(version, bytes).await
    }

    fn shares_snapshots(&self) -> bool {
        self.inner.shares_snapshots()
    }

    async fn check_safe(&self) -> Result<(), StoreError> {
        self.inner.check_safe().await
    }

    async fn regression_ack(&self) -> Result<Option<String>, StoreError> {
        self.inner.regression_ack().await
    }
}

#[async_trait]
impl AuditTrail for FaultyStore {
    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let max = self.audit_max_records.load(Ordering::SeqCst);
        if self.audit_down.load(Ordering::SeqCst) || (max > 0 && records.len() as u64 > max) {
            return Err(down());
        }
        self.inner.append_audit(records).await
    }

    async fn trim_changes(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.inner.trim_changes(before_ms).await
    }

    async fn record_access(&self, record: &AuditRecord) -> Result<(), StoreError> {
        self.inner.record_access(record).await
    }

    async fn read_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.read_audit(query).await
    }

    async fn stored(
        &self,
        part: Stored,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.inner.stored(part, after, limit).await
    }

    async fn last_seal(&self) -> Result<Option<StoredEntry>, StoreError> {
        self.inner.last_seal().await
    }

    async fn append_seal(&self, after_seq: u64, line: &str) -> Result<bool, StoreError> {
        self.inner.append_seal(after_seq, line).await
    }
}
