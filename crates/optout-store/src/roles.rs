//! A store assembled from its roles. Each role may come from a different object: the same store
//! for all four ([`Roles::of`]), or a wrapper of one role in front of it (the tests' fault
//! injection wraps the reads, the feed or the trail, and nothing else). This is the one place that
//! forwards the whole contract, every method, defaults included, so a wrapper of one role never
//! hides what the store underneath does in another.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

use crate::{
    AuditTrail, ChangeFeed, ChangeKind, CheckReads, ConsentStore, Feed, ImportMode, ImportSession,
    Lookup, OptOutRecord, Scan, StoreError, StoreStatus, Stored, StoredEntry, WriteOutcome, Writes,
    core::{
        AuditQuery, AuditRecord, NhsNumber, OptOutSet, OptOutType, Practice, Version,
        coverage::{Coverage, CoverageMode},
    },
};

/// A [`ConsentStore`] made of one object per role.
#[derive(Clone)]
pub struct Roles {
    /// Lookups and coverage, for the check path.
    pub reads: Arc<dyn CheckReads>,
    /// Changes, imports, look-ups, status, acknowledgements.
    pub writes: Arc<dyn Writes>,
    /// The change feed, scans, snapshots, the dataset and its continuity.
    pub feed: Arc<dyn ChangeFeed>,
    /// Both audit trails and the seals.
    pub audit: Arc<dyn AuditTrail>,
}

impl Roles {
    /// Every role played by `store`; replace one field to put a wrapper in front of that role.
    pub fn of(store: Arc<dyn ConsentStore>) -> Self {
        Roles {
            reads: store.clone(),
            writes: store.clone(),
            feed: store.clone(),
            audit: store,
        }
    }
}

#[async_trait]
impl CheckReads for Roles {
    fn kind(&self) -> &'static str {
        self.reads.kind()
    }

    async fn lookup(&self, numbers: &[NhsNumber], types: OptOutSet) -> Result<Lookup, StoreError> {
        self.reads.lookup(numbers, types).await
    }

    async fn coverage(&self) -> Result<Coverage, StoreError> {
        self.reads.coverage().await
    }

    async fn coverage_mode(&self) -> Result<CoverageMode, StoreError> {
        self.reads.coverage_mode().await
    }
}

#[async_trait]
impl Writes for Roles {
    async fn change(
        &self,
        kind: ChangeKind,
        opt_out: OptOutType,
        practice: Option<&Practice>,
        numbers: &[NhsNumber],
        source: &str,
        audit: &AuditRecord,
    ) -> Result<WriteOutcome, StoreError> {
        self.writes
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
        self.writes
            .begin_import(mode, opt_out, practice, source)
            .await
    }

    async fn get(&self, number: NhsNumber) -> Result<(Vec<OptOutRecord>, Version), StoreError> {
        self.writes.get(number).await
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        self.writes.status().await
    }

    async fn acknowledge_regression(&self, audit: &AuditRecord) -> Result<String, StoreError> {
        self.writes.acknowledge_regression(audit).await
    }
}

#[async_trait]
impl ChangeFeed for Roles {
    async fn changes_after(
        &self,
        after: Version,
        max: usize,
        wait: Duration,
    ) -> Result<Feed, StoreError> {
        self.feed.changes_after(after, max, wait).await
    }

    async fn scan_pages(
        &self,
        page: &mut (dyn for<'n> FnMut(&'n [NhsNumber]) + Send),
    ) -> Result<Version, StoreError> {
        self.feed.scan_pages(page).await
    }

    async fn scan(&self) -> Result<Scan, StoreError> {
        self.feed.scan().await
    }

    async fn open_dataset(&self) -> Result<String, StoreError> {
        self.feed.open_dataset().await
    }

    async fn check_safe(&self) -> Result<(), StoreError> {
        self.feed.check_safe().await
    }

    async fn recover(&self) -> Result<u64, StoreError> {
        self.feed.recover().await
    }

    async fn load_snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.feed.load_snapshot().await
    }

    async fn publish_snapshot(&self, version: Version, bytes: &[u8]) -> Result<(), StoreError> {
        self.feed.publish_snapshot(version, bytes).await
    }

    fn shares_snapshots(&self) -> bool {
        self.feed.shares_snapshots()
    }

    async fn regression_ack(&self) -> Result<Option<String>, StoreError> {
        self.feed.regression_ack().await
    }

    fn forget_history(&self) {
        self.feed.forget_history()
    }

    fn seen_version(&self) -> Version {
        self.feed.seen_version()
    }
}

#[async_trait]
impl AuditTrail for Roles {
    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        self.audit.append_audit(records).await
    }

    async fn record_access(&self, record: &AuditRecord) -> Result<(), StoreError> {
        self.audit.record_access(record).await
    }

    async fn trim_changes(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.audit.trim_changes(before_ms).await
    }

    async fn read_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        self.audit.read_audit(query).await
    }

    async fn stored(
        &self,
        part: Stored,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.audit.stored(part, after, limit).await
    }

    async fn last_seal(&self) -> Result<Option<StoredEntry>, StoreError> {
        self.audit.last_seal().await
    }

    async fn append_seal(&self, after_seq: u64, line: &str) -> Result<bool, StoreError> {
        self.audit.append_seal(after_seq, line).await
    }
}
