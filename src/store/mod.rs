//! The consent store: the truth about who opted out.
//!
//! The check path asks it only about the numbers the filter could not rule out, in one batched
//! call per request. Admin writes go through it and each returns the version it took effect at;
//! the change feed lets every replica's filter follow those writes in order.
//!
//! Implementations: [`embedded::EmbeddedStore`] (redb, one replica, the default) and
//! [`redis::RedisStore`] (one Redis, Sentinel or Cluster, shared by many replicas). Both pass the
//! same contract suite (`tests/it/store_contract/`).

pub mod embedded;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;

pub use crate::core::seals::RecordMac;
use crate::core::{
    AuditKey, AuditQuery, AuditRecord, IMPORT_DIGEST_CHUNK, NhsNumber, OptOutSet, OptOutType,
    Practice, Version,
    coverage::{Coverage, CoverageMode, Population},
};

/// Which consent store the server answers from.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// The embedded store (redb) in a directory: one replica, no Redis.
    Embedded {
        /// The data directory; created, with a new empty dataset, if it holds no database.
        data_dir: std::path::PathBuf,
        /// Change-log entries kept.
        change_log_len: u64,
        /// The database's page cache, in bytes.
        cache_bytes: usize,
    },
    /// The shared Redis store: one Redis, Sentinel's master, or a Cluster.
    Redis(redis::RedisConfig),
}

/// Whether [`open`] may make a new, empty embedded store where none is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    /// The server: a data directory without a database gets a new, empty dataset (said in the
    /// log).
    IfMissing,
    /// Tools that read a store (`audit verify`): a directory without one is an error.
    Never,
}

/// A store [`open`] chose and opened, and what it did.
pub struct OpenedStore {
    /// The store.
    pub store: std::sync::Arc<dyn ConsentStore>,
    /// Whether a new, empty embedded dataset was initialised.
    pub created: bool,
    /// How to name it in messages.
    pub shown: String,
}

/// The one place a backend is chosen, for the server and the CLI: the embedded store opened (and
/// locked) now, so a data directory in use fails at once; Redis connected lazily. Records the
/// Redis store writes to the changes trail carry a MAC under `record_key`.
pub async fn open(
    config: &StoreConfig,
    record_key: Option<std::sync::Arc<AuditKey>>,
    create: Create,
) -> Result<OpenedStore, StoreError> {
    match config {
        StoreConfig::Redis(redis) => {
            let redis = redis::RedisConfig {
                record_key,
                ..redis.clone()
            };
            Ok(OpenedStore {
                store: std::sync::Arc::new(redis::RedisStore::connect(&redis)?),
                created: false,
                shown: format!(
                    "Redis store at {} (prefix {:?})",
                    redis.describe(),
                    redis.prefix
                ),
            })
        }
        StoreConfig::Embedded {
            data_dir,
            change_log_len,
            cache_bytes,
        } => {
            if create == Create::Never && !embedded::EmbeddedStore::exists_in(data_dir) {
                return Err(StoreError::NotInitialised(
                    format!("{}: no embedded store there", data_dir.display()).into(),
                ));
            }
            let config = embedded::EmbeddedConfig {
                data_dir: data_dir.clone(),
                change_log_len: *change_log_len,
                cache_bytes: *cache_bytes,
            };
            let (store, opened) =
                tokio::task::spawn_blocking(move || embedded::EmbeddedStore::open(&config))
                    .await
                    .map_err(|e| {
                        StoreError::Unavailable(format!("store open task failed: {e}").into())
                    })??;
            Ok(OpenedStore {
                store: std::sync::Arc::new(store),
                created: opened == embedded::Opened::Initialised,
                shown: format!("embedded store in {}", data_dir.display()),
            })
        }
    }
}

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

/// Whether a change or an import of type `t` names its practice as it must: type 1 always (type 1
/// opt-outs belong to the practice that recorded them), the national type never.
pub(crate) fn practice_ok(t: OptOutType, practice: Option<&Practice>) -> Result<(), StoreError> {
    match (t, practice) {
        (OptOutType::Type1, None) => Err(StoreError::ImportRefused(
            "a type 1 opt-out belongs to the GP practice that recorded it: name the practice"
                .into(),
        )),
        (OptOutType::NationalDataOptOut, Some(_)) => Err(StoreError::ImportRefused(
            "a national data opt-out belongs to no practice: leave the practice out".into(),
        )),
        _ => Ok(()),
    }
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

    /// Only the national coverage mode (fixed at initialisation): what [`ConsentStore::coverage`]
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
    /// built from [`ConsentStore::scan_pages`]).
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
    /// [`ConsentStore::open_dataset`] succeeds again). Called periodically by the filter follower.
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

/// Refuses a REPLACE import that staged nothing (`empty`): it would remove every opt-out of its
/// type (of its practice, for type 1), and an empty or truncated file must not wipe a list. A
/// national check in which nobody had opted out is a valid empty list: its population says who
/// was checked.
pub(crate) fn refuse_empty_replace(
    mode: ImportMode,
    empty: bool,
    check: Option<&NationalCheck>,
    t: OptOutType,
) -> Result<(), StoreError> {
    if mode == ImportMode::Replace && empty && check.is_none() {
        return Err(StoreError::ImportRefused(
            format!(
                "a REPLACE import with no valid numbers would remove every {} opt-out; use \
                 `optout admin remove` (RemoveOptOuts) to remove opt-outs explicitly",
                t.name()
            )
            .into(),
        ));
    }
    Ok(())
}

/// Refuses a national check older than the one in force (`in_force_ms`, the national list's
/// date), unless the admin said why: re-importing an old reply would move the list back in time
/// and clear its expiry. Called under the national type's import lock, so no other check can be
/// swapped in between.
pub(crate) fn check_not_older(
    check: Option<&NationalCheck>,
    in_force_ms: Option<u64>,
) -> Result<(), StoreError> {
    let (Some(c), Some(in_force)) = (check, in_force_ms) else {
        return Ok(());
    };
    if c.checked_at_ms >= in_force || c.older_reason.is_some() {
        return Ok(());
    }
    let at = |ms: u64| {
        i64::try_from(ms)
            .ok()
            .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
            .map_or_else(|| format!("{ms} ms"), |t| t.to_string())
    };
    Err(StoreError::ImportRefused(
        format!(
            "this national check (checked at {}) is older than the national check in force \
             (checked at {}): importing it would move the list back in time. Nothing was \
             imported. If that is meant, import it with the reason (--allow-older-check REASON, \
             older_check_reason), which is audited",
            at(c.checked_at_ms),
            at(in_force)
        )
        .into(),
    ))
}

/// The type 1 practices of a record as stored by the Redis backend (`recorded_at,source_id` before
/// practices were, `recorded_at,source_id,P1;P2` after), and the record with `practices` instead.
pub(crate) mod stored_practices {
    use optout_core::practice::{self, Practice};

    /// The practices of a stored type 1 value.
    pub(crate) fn of(value: &str) -> Vec<Practice> {
        practice::parse_list(value.splitn(3, ',').nth(2).unwrap_or(""))
    }

    /// `value` holding `practices` (which must not be empty).
    pub(crate) fn with(value: &str, practices: &[Practice]) -> String {
        let mut parts = value.splitn(3, ',');
        let at = parts.next().unwrap_or("0");
        let sid = parts.next().unwrap_or("0");
        format!("{at},{sid},{}", practice::join_list(practices))
    }
}

/// Whether a store in `mode` takes an import of type `t`, in `import_mode`, with or without a
/// national check (and with how many patients in it). The store's mode is fixed at
/// initialisation, so this can be decided before the import's lock is taken.
pub(crate) fn import_allowed(
    mode: CoverageMode,
    t: OptOutType,
    import_mode: ImportMode,
    check: Option<&NationalCheck>,
) -> Result<(), StoreError> {
    let refused = |m: String| Err(StoreError::ImportRefused(m.into()));
    match check {
        Some(_) if t != OptOutType::NationalDataOptOut || import_mode != ImportMode::Replace => {
            refused(
                "a national check round trip replaces the national data opt-outs: use \
                 --type national (a REPLACE import)"
                    .into(),
            )
        }
        Some(_) if mode != CoverageMode::Population => refused(
            "this store is in list mode (its national list is complete, and a number it does \
             not hold is released): a national check round trip covers only the population \
             sent, so it needs a store initialised in population mode (optout init-store \
             --national-coverage population)"
                .into(),
        ),
        Some(c) if c.population.is_empty() => {
            refused("the national check's population is empty: nothing was checked".into())
        }
        None if mode == CoverageMode::Population
            && t == OptOutType::NationalDataOptOut
            && import_mode == ImportMode::Replace =>
        {
            refused(
                "this store is in population mode: a REPLACE of national data opt-outs must be \
                 a national check round trip (optout admin import --type national \
                 --from-national-check SENT RETURNED), so the population it covers is recorded \
                 with it"
                    .into(),
            )
        }
        _ => Ok(()),
    }
}

/// A bulk import under way. Dropping it without commit changes nothing.
#[async_trait]
pub trait ImportSession: Send {
    /// Stages valid numbers (duplicates are fine).
    async fn stage(&mut self, numbers: &[NhsNumber]) -> Result<(), StoreError>;

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

/// `N` random bytes as lower-case hex: dataset markers, acknowledgement ids, lock tokens.
/// What an import changes, tallied as it is applied page by page: the counts, the added numbers
/// while few enough to list in the change log ([`LOG_LIST_MAX`]), and the numbers whose digests
/// wait for an audit part. Its memory is bounded whatever the import's size.
#[derive(Debug, Default)]
pub(crate) struct ImportTally {
    pub(crate) added: u64,
    pub(crate) removed: u64,
    listed: Vec<NhsNumber>,
    unlisted: bool,
    /// Added, then removed numbers not yet in an audit part.
    waiting: [Vec<NhsNumber>; 2],
}

impl ImportTally {
    /// A number the import added.
    pub(crate) fn add(&mut self, n: NhsNumber) {
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
    pub(crate) fn remove(&mut self, n: NhsNumber) {
        self.removed += 1;
        self.waiting[1].push(n);
    }

    /// The added numbers, when few enough to list in the change log.
    pub(crate) fn listed(&self) -> Option<&[NhsNumber]> {
        (!self.unlisted).then_some(self.listed.as_slice())
    }

    /// The audit parts ready to write for the import whose main record is `main`: every full
    /// part, and with `all` the rest too.
    pub(crate) fn parts(
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

pub(crate) fn random_hex<const N: usize>() -> String {
    let mut b = [0u8; N];
    rand::fill(&mut b);
    crate::core::trail::hex(&b)
}

/// Wall-clock time in ms since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
