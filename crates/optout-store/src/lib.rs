//! The consent store: the truth about who opted out.
//!
//! The check path asks it only about the numbers the filter could not rule out, in one batched
//! call per request. Admin writes go through it and each returns the version it took effect at;
//! the change feed lets every replica's filter follow those writes in order.
//!
//! Implementations, each a crate that knows only this one: `optout-store-embedded` (redb, one
//! replica, the default) and `optout-store-redis` (one Redis, Sentinel or Cluster, shared by many
//! replicas). Both pass the same contract suite (`tests/it/store_contract/`).
#![deny(missing_docs)]

use optout_core as core;

mod roles;
mod rules;

use std::time::Duration;

use async_trait::async_trait;

pub use crate::core::seals::RecordMac;
use crate::core::{
    AuditKey, AuditQuery, AuditRecord, IMPORT_DIGEST_CHUNK, NhsNumber, OptOutSet, OptOutType,
    Practice, Version,
    coverage::{Coverage, CoverageMode, Population},
};
pub use roles::Roles;
pub use rules::{
    check_not_older, import_allowed, practice_ok, refuse_after_failed_stage, refuse_empty_replace,
};

/// What can go wrong in a store. Every variant turns into WITHHOLD on the check path. Each
/// carries a [`Cause`]: what to tell the caller, and the redis or redb error underneath (its
/// [`std::error::Error::source`]), so logs keep the whole chain.
#[derive(Debug)]
pub enum StoreError {
    /// The store cannot be reached or did not answer.
    Unavailable(Cause),
    /// The store holds no dataset marker: it was never initialised, or was reset.
    NotInitialised(Cause),
    /// Data in the store does not have the expected shape.
    Corrupt(Cause),
    /// The store is configured so that it could lose opt-outs (a Redis that evicts keys).
    Unsafe(Cause),
    /// A change was applied on the Redis master but too few replicas confirmed it in time, so a
    /// failover could still lose it: not acknowledged, the caller should retry.
    Unconfirmed(Cause),
    /// An import cannot be applied as asked.
    ImportRefused(Cause),
    /// Refused before anything changed, because another change holds what this one needs (an
    /// import of the type is being applied): nothing happened, the caller may retry.
    Busy(Cause),
    /// The store is behind what this replica already saw: it lost changes (see [`Feed::Behind`]).
    Regressed(Cause),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(c) => write!(f, "consent store unavailable: {c}"),
            StoreError::NotInitialised(c) => {
                write!(f, "consent store holds no initialised dataset: {c}")
            }
            StoreError::Corrupt(c) => write!(f, "consent store data is corrupt: {c}"),
            StoreError::Unsafe(c) => write!(f, "consent store is not safe to answer from: {c}"),
            StoreError::Unconfirmed(c) => {
                write!(f, "consent store change not confirmed by its replicas: {c}")
            }
            StoreError::ImportRefused(c) => write!(f, "{c}"),
            StoreError::Busy(c) => write!(f, "{c}"),
            StoreError::Regressed(c) => write!(f, "consent store went back in time: {c}"),
        }
    }
}

/// The source is the redis or redb error underneath, when there is one.
impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause()
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A store error's message and, when it wraps one, the error underneath.
#[derive(Debug)]
pub struct Cause {
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Cause {
    /// A message with the error it comes from.
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Cause {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// What to tell the caller.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<T: Into<String>> From<T> for Cause {
    fn from(message: T) -> Self {
        Cause {
            message: message.into(),
            source: None,
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl StoreError {
    /// What to tell the caller, without the variant's prefix.
    pub fn message(&self) -> &str {
        self.cause().message()
    }

    fn cause(&self) -> &Cause {
        match self {
            StoreError::Unavailable(c)
            | StoreError::NotInitialised(c)
            | StoreError::Corrupt(c)
            | StoreError::Unsafe(c)
            | StoreError::Unconfirmed(c)
            | StoreError::ImportRefused(c)
            | StoreError::Busy(c)
            | StoreError::Regressed(c) => c,
        }
    }
}

/// One opt-out as recorded: its type, when and from where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptOutRecord {
    /// The type.
    pub kind: OptOutType,
    /// When it was recorded, ms since the Unix epoch.
    pub recorded_at_ms: i64,
    /// Where the change came from.
    pub source: String,
    /// Type 1: the practices holding it (the unknown practice for records from before
    /// practices were); empty for the national type.
    pub practices: Vec<Practice>,
}

/// The answer of a batched lookup.
#[derive(Clone, Debug)]
pub struct Lookup {
    /// The types held, one per asked number, same order.
    pub held: Vec<OptOutSet>,
    /// The version the answer reflects.
    pub version: Version,
}

/// Add or remove one type for a list of numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// Record the opt-out.
    Add,
    /// Remove the opt-out.
    Remove,
}

/// The result of an admin change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// The version the change took effect at.
    pub version: Version,
    /// Numbers that actually changed.
    pub applied: u64,
}

/// How an import combines with what is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportMode {
    /// Add the imported numbers.
    Merge,
    /// The stored set of the type becomes the imported set.
    Replace,
}

/// The result of a committed import.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImportOutcome {
    /// Numbers that gained the type.
    pub added: u64,
    /// Numbers that lost the type.
    pub removed: u64,
    /// The version the import took effect at.
    pub version: Version,
}

/// One entry of the change log, as much as a filter needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeEntry {
    /// The version of this change.
    pub version: Version,
    /// Numbers that gained an opt-out: the filter must hold them before it claims this version.
    pub added: Vec<NhsNumber>,
    /// How many opt-outs were removed (stale "maybes" in the filter until the next generation).
    pub removed: u64,
    /// The change added more numbers than a log entry lists ([`LOG_LIST_MAX`]: a big import):
    /// `added` is empty, and a filter holds them only once rebuilt from a scan.
    pub unlisted: bool,
}

/// The most added numbers a change-log entry lists. A bigger change (an import) is logged without
/// them, and every replica rebuilds its filter from a scan, page by page: no replica ever holds
/// millions of numbers in one entry, one reply or one list.
pub const LOG_LIST_MAX: usize = 10_000;

/// What the change feed has after a version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Feed {
    /// The changes after the asked version, oldest first (possibly none: nothing new yet). Either
    /// way, the store answered, which is what keeps a filter fresh.
    Changes(Vec<ChangeEntry>),
    /// The log no longer reaches back to the asked version: rebuild from a scan.
    Trimmed,
    /// The store is behind the asked version: it lost changes a reader already saw (restored from
    /// an older copy, a crash that lost acknowledged writes, a failover to a lagging replica).
    /// Never rebuilt from silently: the replica fails closed until an admin acknowledges it.
    Behind {
        /// The store's current version.
        store: Version,
    },
}

/// Every opted-out number, consistent with one version.
#[derive(Clone, Debug)]
pub struct Scan {
    /// Numbers holding any opt-out.
    pub numbers: Vec<NhsNumber>,
    /// The version the scan reflects.
    pub version: Version,
}

/// Counts and identity of the stored dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStatus {
    /// National data opt-outs.
    pub national: u64,
    /// Type 1 opt-outs.
    pub type1: u64,
    /// Numbers holding any opt-out.
    pub patients: u64,
    /// The current version.
    pub version: Version,
    /// The marker of the dataset the store holds.
    pub dataset_id: String,
}

/// A part of the changes trail read exactly as stored, for sealing and verifying it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// The records (admin changes and reads).
    Records,
    /// The seals over them (see `optout_core::seals`).
    Seals,
}

/// One stored record or seal: its id (`<ms>-<seq>`, increasing), its bytes as stored, and the
/// MAC a record carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEntry {
    /// The id in the store.
    pub id: String,
    /// The bytes as stored (a record's fields, a seal's line).
    pub bytes: Vec<u8>,
    /// What the record carries to show a replica wrote it: the backend says where its content
    /// and MAC are, the sealer and the verifier check them ([`RecordMac::NotUsed`] for a seal).
    pub mac: RecordMac,
}

/// What the check path reads: lookups and what the lists cover (and which store this is).
#[async_trait]
pub trait CheckReads: Send + Sync + 'static {
    /// A short name for status and logs ("embedded", "redis").
    fn kind(&self) -> &'static str;

    /// The opt-out types held by each number, of those in `types`, in one round trip. A type
    /// not asked is never reported: the check asks only for those its purpose and origin make
    /// applicable, which halves the store's work when only one applies (`OptOutSet::ALL` for
    /// everything).
    async fn lookup(&self, numbers: &[NhsNumber], types: OptOutSet) -> Result<Lookup, StoreError>;

    /// What the lists cover (the national mode, the checked population) and how old they are,
    /// read in one consistent step. Changed only by REPLACE imports (each logged unlisted, so a
    /// replica re-reads it with the scan that rebuilds its filter) and by initialisation.
    async fn coverage(&self) -> Result<Coverage, StoreError>;

    /// Only the national coverage mode (fixed at initialisation): what [`CheckReads::coverage`]
    /// says, without reading a population.
    async fn coverage_mode(&self) -> Result<CoverageMode, StoreError> {
        Ok(self.coverage().await?.national_mode.unwrap_or_default())
    }
}

/// Admin writes and reads of one number: changes, imports, look-ups, counts, acknowledgements.
#[async_trait]
pub trait Writes: Send + Sync + 'static {
    /// Adds or removes one type for every number, atomically with its change-log entry and its
    /// audit record (whose `version` and `applied` the store fills in): if the audit record cannot
    /// be written, the change does not happen.
    ///
    /// Type 1 changes name the practice (see [`practice_ok`]): an add records the practice's
    /// objection, a removal withdraws it, and the number holds type 1 while any practice does.
    /// `applied` counts the numbers whose opt-outs changed (a practice added to a number another
    /// practice already holds counts, though the number held type 1 already).
    async fn change(
        &self,
        kind: ChangeKind,
        opt_out: OptOutType,
        practice: Option<&Practice>,
        numbers: &[NhsNumber],
        source: &str,
        audit: &AuditRecord,
    ) -> Result<WriteOutcome, StoreError>;

    /// Starts a bulk import. Nothing is visible until the session commits. A type 1 import is
    /// one practice's list: a REPLACE replaces that practice's opt-outs only (and dates its list).
    async fn begin_import(
        &self,
        mode: ImportMode,
        opt_out: OptOutType,
        practice: Option<&Practice>,
        source: &str,
    ) -> Result<Box<dyn ImportSession>, StoreError>;

    /// The opt-outs recorded for one number.
    async fn get(&self, number: NhsNumber) -> Result<(Vec<OptOutRecord>, Version), StoreError>;

    /// Counts, version and dataset marker.
    async fn status(&self) -> Result<StoreStatus, StoreError>;

    /// Records an admin's acknowledgement that the store went back in time and the lost changes
    /// were restored (or knowingly given up), with its audit record, atomically. Returns its id.
    async fn acknowledge_regression(&self, audit: &AuditRecord) -> Result<String, StoreError>;
}

/// What a follower reads to keep a filter: the change feed, scans, snapshots, and the proofs
/// that the store is the one it was and has not gone back in time.
#[async_trait]
pub trait ChangeFeed: Send + Sync + 'static {
    /// The changes after `after`, at most `max` entries; waits up to `wait` for one if there is
    /// none yet.
    async fn changes_after(
        &self,
        after: Version,
        max: usize,
        wait: Duration,
    ) -> Result<Feed, StoreError>;

    /// Every opted-out number, handed to `page` a page at a time (a number held under both types
    /// may come twice), and the version the scan reflects: read before the records, so replaying
    /// the change log from it adds whatever a change made during the scan. Memory stays one page,
    /// whatever the store holds.
    async fn scan_pages(
        &self,
        page: &mut (dyn for<'n> FnMut(&'n [NhsNumber]) + Send),
    ) -> Result<Version, StoreError>;

    /// Every opted-out number at once, with the version it reflects (tests and tools; a filter is
    /// built from [`ChangeFeed::scan_pages`]).
    async fn scan(&self) -> Result<Scan, StoreError> {
        let mut numbers = Vec::new();
        let version = self
            .scan_pages(&mut |p: &[NhsNumber]| numbers.extend_from_slice(p))
            .await?;
        Ok(Scan { numbers, version })
    }

    /// Binds to the dataset the store holds now and returns its marker. Until a store is bound,
    /// and whenever its marker is missing or differs from the bound one (a store that was reset,
    /// flushed or re-initialised), every call fails with [`StoreError::NotInitialised`].
    async fn open_dataset(&self) -> Result<String, StoreError>;

    /// Whether the store is still configured so that it cannot silently lose opt-outs. On
    /// [`StoreError::Unsafe`] the store has also unbound itself (every call fails until
    /// [`ChangeFeed::open_dataset`] succeeds again). Called periodically by the filter follower.
    async fn check_safe(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Finishes changes whose writer stopped half-way (a store whose changes take several steps,
    /// a Redis Cluster); returns how many. Called periodically by the filter follower.
    async fn recover(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// The newest published filter snapshot of the bound dataset, if any.
    async fn load_snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }

    /// Publishes a filter snapshot reflecting `version`, unless a newer one is already there.
    async fn publish_snapshot(&self, _version: Version, _bytes: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether snapshots are worth publishing (a store shared by replicas).
    fn shares_snapshots(&self) -> bool {
        false
    }

    /// The id of the newest admin acknowledgement that the store went back in time, if any. A
    /// replica that failed closed on [`Feed::Behind`] resumes once this differs from what it was
    /// when the replica failed closed.
    async fn regression_ack(&self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    /// Forgets the versions this replica saw the store reach: an admin acknowledged that the
    /// store lost some of them, and the replica rebuilds from what it holds now. (A store that
    /// proves its continuity on every read, as the Redis store does, fails reads with
    /// [`StoreError::Regressed`] until then.)
    fn forget_history(&self) {}

    /// The newest version this replica saw the store reach (what continuity is proven against);
    /// [`Version::ZERO`] for a store that does not prove it.
    fn seen_version(&self) -> Version {
        Version::ZERO
    }
}

/// The audit trails: check records, admin reads, retention, and the changes trail's seals.
#[async_trait]
pub trait AuditTrail: Send + Sync + 'static {
    /// Appends check records durably, to the checks trail.
    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError>;

    /// Records an admin's read (who looked up which patient, who read the audit) durably, in the
    /// changes trail with the admin changes: never trimmed by check traffic.
    async fn record_access(&self, record: &AuditRecord) -> Result<(), StoreError>;

    /// Deletes the records of the changes trail from before `before_ms` (ms since the Unix epoch,
    /// by the time the store wrote them); returns how many. Only when an operator set a retention.
    async fn trim_changes(&self, before_ms: u64) -> Result<u64, StoreError>;

    /// Reads audit records of both trails (changes and checks), oldest first.
    async fn read_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;

    /// Entries of one part of the changes trail after the id `after` (`None`: from the oldest),
    /// oldest first, at most `limit`.
    async fn stored(
        &self,
        part: Stored,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError>;

    /// The last seal of the changes trail.
    async fn last_seal(&self) -> Result<Option<StoredEntry>, StoreError>;

    /// Appends a seal when the last seal has sequence number `after_seq` (0: none yet); `false`
    /// when another writer sealed first.
    async fn append_seal(&self, after_seq: u64, line: &str) -> Result<bool, StoreError>;
}

/// The consent store: every role. A store implements the four; each part of the service takes
/// the role it uses (`Arc<dyn ConsentStore>` upcasts to any of them).
pub trait ConsentStore: CheckReads + Writes + ChangeFeed + AuditTrail {}

impl<T: CheckReads + Writes + ChangeFeed + AuditTrail + ?Sized> ConsentStore for T {}

/// A national check round trip: the patients sent to the national service and when.
#[derive(Clone, Debug)]
pub struct NationalCheck {
    /// Every NHS number sent.
    pub population: Population,
    /// When the check was made, ms since the Unix epoch.
    pub checked_at_ms: u64,
    /// Set when an admin imports a check older than the one in force on purpose: why.
    pub older_reason: Option<String>,
}

/// A bulk import under way. Dropping it without commit changes nothing.
#[async_trait]
pub trait ImportSession: Send {
    /// Stages valid numbers (duplicates are fine), in any order: the session may reorder them in
    /// place. A store may write them in the background: a failure then surfaces at the next call.
    /// Once a call has failed, every later one fails, commit included.
    async fn stage(&mut self, numbers: Vec<NhsNumber>) -> Result<(), StoreError>;

    /// Makes this import a national check round trip (a REPLACE of national opt-outs on a store
    /// in population mode): the population the check was sent for, recorded with the opt-outs
    /// at commit, atomically, and the date of the check as the list's date.
    fn set_national_check(&mut self, check: NationalCheck);

    /// Applies the staged set atomically, with its audit record: the store fills in the version,
    /// the number of changes and the digests of the numbers added and removed.
    async fn commit(
        self: Box<Self>,
        audit: AuditRecord,
        key: &AuditKey,
    ) -> Result<ImportOutcome, StoreError>;
}

/// What an import changes, tallied as it is applied page by page: the counts, the added numbers
/// while few enough to list in the change log ([`LOG_LIST_MAX`]), and the numbers whose digests
/// wait for an audit part. Its memory is bounded whatever the import's size.
#[derive(Debug, Default)]
pub struct ImportTally {
    /// Numbers the import added.
    pub added: u64,
    /// Numbers the import removed.
    pub removed: u64,
    listed: Vec<NhsNumber>,
    unlisted: bool,
    /// Added, then removed numbers not yet in an audit part.
    waiting: [Vec<NhsNumber>; 2],
}

impl ImportTally {
    /// A number the import added.
    pub fn add(&mut self, n: NhsNumber) {
        self.added += 1;
        if !self.unlisted {
            if self.listed.len() < LOG_LIST_MAX {
                self.listed.push(n);
            } else {
                self.unlisted = true;
                self.listed = Vec::new();
            }
        }
        self.waiting[0].push(n);
    }

    /// A number the import removed.
    pub fn remove(&mut self, n: NhsNumber) {
        self.removed += 1;
        self.waiting[1].push(n);
    }

    /// The added numbers, when few enough to list in the change log.
    pub fn listed(&self) -> Option<&[NhsNumber]> {
        (!self.unlisted).then_some(self.listed.as_slice())
    }

    /// The audit parts ready to write for the import whose main record is `main`: every full
    /// part, and with `all` the rest too.
    pub fn parts(
        &mut self,
        main: &AuditRecord,
        key: &AuditKey,
        import_id: &str,
        all: bool,
    ) -> Vec<AuditRecord> {
        let mut out = Vec::new();
        for (i, added) in [(0, true), (1, false)] {
            let waiting = &mut self.waiting[i];
            while waiting.len() >= IMPORT_DIGEST_CHUNK || (all && !waiting.is_empty()) {
                let chunk: Vec<NhsNumber> = waiting
                    .drain(..waiting.len().min(IMPORT_DIGEST_CHUNK))
                    .collect();
                out.push(main.import_part(key, &chunk, import_id, added));
            }
        }
        out
    }
}

/// `N` random bytes as lower-case hex: dataset markers, acknowledgement ids, lock tokens.
pub fn random_hex<const N: usize>() -> String {
    let mut b = [0u8; N];
    rand::fill(&mut b);
    crate::core::trail::hex(&b)
}

/// Wall-clock time in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
