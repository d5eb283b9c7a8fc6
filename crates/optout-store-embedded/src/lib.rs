//! The embedded consent store: one redb database file in a data directory.
//!
//! Why redb: a pure-Rust, ACID, copy-on-write B-tree store. A commit with `Durability::Immediate`
//! (the default) is fsynced before `commit` returns, so an acknowledged admin write survives a
//! crash, and a crash mid-write leaves the previous commit intact. Readers never block the writer.
//!
//! Layout (tables):
//! - `meta`: dataset marker, current version, counts, log bookkeeping;
//! - `optouts`: NHS number (u64) -> 13-byte entries (type, recorded-at ms, source id), one per type;
//! - `sources` / `source_ids`: source strings interned, so 5 million rows from one file share one
//!   string;
//! - `changes`: the change log, version -> added numbers, trimmed to a configured length;
//! - `audit`, `change_audit`: the checks trail and the changes trail, (ms, sequence) -> JSON, and
//!   `change_seals`, the seals over the changes trail;
//! - `import-<id>`: staging tables of imports under way, deleted on commit, abort or next open.
//!
//! redb is synchronous, so every call runs on tokio's blocking pool.
#![deny(missing_docs)]

use optout_core as core;
use optout_store as store;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableHandle, WriteTransaction,
};
use tokio::sync::watch;

use crate::core::{
    AuditKey, AuditQuery, AuditRecord, NhsNumber, OptOutSet, OptOutType, Practice, Version,
    coverage::{Coverage, CoverageMeta, CoverageMode},
};
use crate::store::{
    AuditTrail, Cause, ChangeEntry, ChangeFeed, ChangeKind, CheckReads, Feed, ImportMode,
    ImportOutcome, ImportSession, Lookup, OptOutRecord, RecordMac, StoreError, StoreStatus, Stored,
    StoredEntry, WriteOutcome, Writes, now_ms,
};

/// Numbers a scan reads in one transaction.
const SCAN_PAGE: usize = 65_536;

mod entries;
mod import;
mod schema;
mod writer;

#[cfg(test)]
mod tests;

use entries::*;
use import::*;
use schema::*;
use writer::*;

/// Settings of the embedded store.
#[derive(Clone, Debug)]
pub struct EmbeddedConfig {
    /// Where the database file lives.
    pub data_dir: PathBuf,
    /// How many change-log entries to keep.
    pub change_log_len: u64,
    /// Memory redb may use for its page cache (read cache and write buffer), in bytes. redb's
    /// own default is 1 GiB, which a replica fills after one pass over a 5 M list and keeps.
    pub cache_bytes: usize,
}

/// The page cache's default size: 4 MiB holds the B-tree's inner pages of a 5 M list; a leaf page
/// a lookup misses is read from the OS page cache (one `pread`). Measured on a 5 M import
/// (`scripts/bench-import.sh`): 16 MiB kept the replica at about 73 MiB while it staged, 4 MiB at
/// about 35 MiB (`--embedded-cache-mib`).
pub const DEFAULT_CACHE_BYTES: usize = 4 * 1024 * 1024;

/// The embedded store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    dataset_id: String,
    change_log_len: u64,
    /// The latest committed version, for the change feed's wait.
    latest: watch::Sender<Version>,
}

/// What opening found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    /// A new, empty dataset was initialised (no database existed).
    Initialised,
    /// An existing dataset was opened.
    Existing,
}

impl EmbeddedStore {
    /// Whether `data_dir` holds a database (for tools that must not create one).
    pub fn exists_in(data_dir: &Path) -> bool {
        data_dir.join(DB_FILE).exists()
    }

    /// Opens the store in `config.data_dir`.
    ///
    /// A data directory with no database file is a fresh install: the database is created and a
    /// new dataset marker written. A database file without the marker (or from another schema) is
    /// refused: it is not an empty opt-out list and must never be read as one.
    pub fn open(config: &EmbeddedConfig) -> Result<(Self, Opened), StoreError> {
        Self::open_or_init(config, CoverageMode::List, None)
    }

    /// [`EmbeddedStore::open`] off the async runtime (opening reads and may create the file).
    pub async fn open_async(config: EmbeddedConfig) -> Result<(Self, Opened), StoreError> {
        tokio::task::spawn_blocking(move || Self::open(&config))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store open task failed: {e}").into()))?
    }

    /// Initialises a store in a data directory that holds none, in the given national coverage
    /// mode (`optout init-store --data-dir`); refuses a directory that holds one already.
    pub fn init(config: &EmbeddedConfig, mode: CoverageMode) -> Result<Self, StoreError> {
        Self::init_owned(config, mode, None)
    }

    /// [`EmbeddedStore::init`] naming the organisation a population-mode store belongs to.
    pub fn init_owned(
        config: &EmbeddedConfig,
        mode: CoverageMode,
        owner: Option<&str>,
    ) -> Result<Self, StoreError> {
        let path = config.data_dir.join(DB_FILE);
        if path.exists() {
            return Err(StoreError::ImportRefused(
                format!(
                    "{} holds a store already; nothing was changed (a store's coverage mode is \
                     chosen once, when it is initialised)",
                    path.display()
                )
                .into(),
            ));
        }
        Self::open_or_init(config, mode, owner).map(|(store, _)| store)
    }

    fn open_or_init(
        config: &EmbeddedConfig,
        mode: CoverageMode,
        owner: Option<&str>,
    ) -> Result<(Self, Opened), StoreError> {
        let path = config.data_dir.join(DB_FILE);
        let fresh = !path.exists();
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            StoreError::Unavailable(
                format!(
                    "cannot create data directory {}: {e}",
                    config.data_dir.display()
                )
                .into(),
            )
        })?;
        let mut builder = redb::Builder::new();
        builder.set_cache_size(config.cache_bytes);
        let db = if fresh {
            builder.create(&path)
        } else {
            builder.open(&path)
        }
        .map_err(|e| {
            let why = if matches!(e, redb::DatabaseError::DatabaseAlreadyOpen) {
                format!(
                    "{} is already open in another process (another `optout serve` on the same \
                     --data-dir?): stop it, or give this one its own --data-dir",
                    path.display()
                )
            } else {
                format!("cannot open {}: {e}", path.display())
            };
            StoreError::Unavailable(why.into())
        })?;
        if fresh {
            initialise(&db, mode, owner)?;
        }
        let (dataset_id, version) = read_marker(&db, &path)?;
        remove_stale_staging(&db)?;
        let (latest, _) = watch::channel(version);
        Ok((
            EmbeddedStore {
                inner: Arc::new(Inner {
                    db,
                    dataset_id,
                    change_log_len: config.change_log_len.max(1),
                    latest,
                }),
            },
            if fresh {
                Opened::Initialised
            } else {
                Opened::Existing
            },
        ))
    }

    /// The path of the database file inside a data directory.
    pub fn db_path(data_dir: &Path) -> PathBuf {
        data_dir.join(DB_FILE)
    }

    /// The dataset marker.
    pub fn dataset_id(&self) -> &str {
        &self.inner.dataset_id
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(blocking_failed)?
    }
}

impl Inner {
    fn notify(&self, version: Version) {
        self.latest.send_if_modified(|v| {
            if version > *v {
                *v = version;
                true
            } else {
                false
            }
        });
    }

    fn read_feed(&self, after: Version, max: usize) -> Result<Feed, StoreError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let meta = txn.open_table(META).map_err(storage)?;
        let floor = get_version(&meta, K_LOG_FLOOR)?;
        let latest = get_version(&meta, K_VERSION)?;
        if after > latest {
            return Ok(Feed::Behind { store: latest });
        }
        if after < floor {
            return Ok(Feed::Trimmed);
        }
        let log = txn.open_table(CHANGES).map_err(storage)?;
        let start = (after.ms, after.seq);
        let mut out = Vec::new();
        for item in log.range(start..).map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let (ms, seq) = k.value();
            let version = Version { ms, seq };
            if version <= after {
                continue;
            }
            out.push(decode_change(version, v.value())?);
            if out.len() >= max {
                break;
            }
        }
        Ok(Feed::Changes(out))
    }
}

#[async_trait]
impl CheckReads for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn lookup(&self, numbers: &[NhsNumber], types: OptOutSet) -> Result<Lookup, StoreError> {
        let numbers = numbers.to_vec();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(storage)?;
            let version = read_version(&txn)?;
            let table = txn.open_table(OPTOUTS).map_err(storage)?;
            let held = numbers
                .iter()
                .map(|n| {
                    Ok(match table.get(n.as_u64()).map_err(storage)? {
                        Some(v) => held_types(v.value())?.intersection(types),
                        None => OptOutSet::EMPTY,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(Lookup { held, version })
        })
        .await
    }

    async fn coverage(&self) -> Result<Coverage, StoreError> {
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(storage)?;
            let meta = txn.open_table(META).map_err(storage)?;
            let coverage = get_coverage(&meta)?;
            let population = meta.get(K_POPULATION).map_err(storage)?;
            Coverage::from_stored(&coverage, population.as_ref().map(|p| p.value()))
                .map_err(|e| StoreError::Corrupt(e.into()))
        })
        .await
    }
}

#[async_trait]
impl Writes for EmbeddedStore {
    async fn change(
        &self,
        kind: ChangeKind,
        opt_out: OptOutType,
        practice: Option<&Practice>,
        numbers: &[NhsNumber],
        source: &str,
        audit: &AuditRecord,
    ) -> Result<WriteOutcome, StoreError> {
        crate::store::practice_ok(opt_out, practice)?;
        let numbers = numbers.to_vec();
        let source = source.to_string();
        let practice = practice.cloned();
        let mut audit = audit.clone();
        let outcome = self
            .blocking(move |inner| {
                let txn = inner.db.begin_write().map_err(storage)?;
                let mut writer = Writer::new(&txn, &source)?;
                let mut added = Vec::new();
                let (mut applied, mut lost) = (0u64, 0u64);
                {
                    let mut table = txn.open_table(OPTOUTS).map_err(storage)?;
                    let mut practices = txn.open_table(PRACTICES).map_err(storage)?;
                    for n in &numbers {
                        let v = n.as_u64();
                        // (changed, gained or lost the type)
                        let (changed, moved) = match (kind, &practice) {
                            (ChangeKind::Add, Some(p)) => {
                                writer.add_type1(&mut table, &mut practices, v, p)?
                            }
                            (ChangeKind::Remove, Some(p)) => {
                                writer.remove_type1(&mut table, &mut practices, v, p)?
                            }
                            (ChangeKind::Add, None) => {
                                let c = writer.add(&mut table, v, opt_out)?;
                                (c, c)
                            }
                            (ChangeKind::Remove, None) => {
                                let c = writer.remove(&mut table, v, opt_out)?;
                                (c, c)
                            }
                        };
                        if changed {
                            applied += 1;
                        }
                        if moved {
                            match kind {
                                ChangeKind::Add => added.push(*n),
                                ChangeKind::Remove => lost += 1,
                            }
                        }
                    }
                }
                let version = writer.finish(Some(&added), lost, inner.change_log_len)?;
                audit.version = version.to_string();
                audit.applied = applied;
                write_audit(&txn, CHANGE_AUDIT, std::slice::from_ref(&audit))?;
                txn.commit().map_err(storage)?;
                inner.notify(version);
                Ok(WriteOutcome { version, applied })
            })
            .await?;
        Ok(outcome)
    }

    async fn begin_import(
        &self,
        mode: ImportMode,
        opt_out: OptOutType,
        practice: Option<&Practice>,
        source: &str,
    ) -> Result<Box<dyn ImportSession>, StoreError> {
        crate::store::practice_ok(opt_out, practice)?;
        let table = format!("{STAGING_PREFIX}{}", crate::store::random_hex::<8>());
        let name = table.clone();
        self.blocking(move |inner| {
            let mut txn = inner.db.begin_write().map_err(storage)?;
            txn.set_durability(Durability::None).map_err(storage)?;
            txn.open_table(TableDefinition::<u64, ()>::new(&name))
                .map_err(storage)?;
            txn.commit().map_err(storage)
        })
        .await?;
        Ok(Box::new(EmbeddedImport {
            store: self.clone(),
            table,
            mode,
            opt_out,
            practice: practice.cloned(),
            source: source.to_string(),
            committed: false,
            failed: false,
            check: None,
        }))
    }

    async fn get(&self, number: NhsNumber) -> Result<(Vec<OptOutRecord>, Version), StoreError> {
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(storage)?;
            let version = read_version(&txn)?;
            let table = txn.open_table(OPTOUTS).map_err(storage)?;
            let Some(v) = table.get(number.as_u64()).map_err(storage)? else {
                return Ok((Vec::new(), version));
            };
            let sources = txn.open_table(SOURCES).map_err(storage)?;
            // A store made before practices were has no such table: every type 1 record is the
            // unknown practice's.
            let practices = match txn.open_table(PRACTICES) {
                Ok(t) => Some(t),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(storage(e)),
            };
            let mut records = decode_entries(v.value())?
                .into_iter()
                .map(|e| {
                    let source = sources
                        .get(e.source_id)
                        .map_err(storage)?
                        .map(|s| s.value().to_string())
                        .unwrap_or_default();
                    let practices = match (e.kind, &practices) {
                        (OptOutType::NationalDataOptOut, _) => Vec::new(),
                        (OptOutType::Type1, Some(t)) => stored_list(t, number.as_u64())?,
                        (OptOutType::Type1, None) => vec![Practice::unknown()],
                    };
                    Ok(OptOutRecord {
                        kind: e.kind,
                        recorded_at_ms: e.recorded_at_ms,
                        source,
                        practices,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            records.sort_by_key(|r| r.kind);
            Ok((records, version))
        })
        .await
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(storage)?;
            let meta = txn.open_table(META).map_err(storage)?;
            Ok(StoreStatus {
                national: get_u64(&meta, count_key(OptOutType::NationalDataOptOut))?,
                type1: get_u64(&meta, count_key(OptOutType::Type1))?,
                patients: get_u64(&meta, K_PATIENTS)?,
                version: get_version(&meta, K_VERSION)?,
                dataset_id: inner.dataset_id.clone(),
            })
        })
        .await
    }

    async fn acknowledge_regression(&self, audit: &AuditRecord) -> Result<String, StoreError> {
        let id = crate::store::random_hex::<16>();
        let audit = audit.clone();
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(storage)?;
            {
                let mut meta = txn.open_table(META).map_err(storage)?;
                meta.insert(K_REGRESSION_ACK, id.as_bytes())
                    .map_err(storage)?;
            }
            write_audit(&txn, CHANGE_AUDIT, std::slice::from_ref(&audit))?;
            txn.commit().map_err(storage)?;
            Ok(id)
        })
        .await
    }
}

#[async_trait]
impl ChangeFeed for EmbeddedStore {
    async fn changes_after(
        &self,
        after: Version,
        max: usize,
        wait: Duration,
    ) -> Result<Feed, StoreError> {
        // Subscribe before reading, so a commit between the read and the wait is not missed.
        let mut latest = self.inner.latest.subscribe();
        let feed = self
            .blocking(move |inner| inner.read_feed(after, max.max(1)))
            .await?;
        if !matches!(&feed, Feed::Changes(c) if c.is_empty()) {
            return Ok(feed);
        }
        let _ = tokio::time::timeout(wait, latest.wait_for(|v| *v > after)).await;
        self.blocking(move |inner| inner.read_feed(after, max.max(1)))
            .await
    }

    async fn open_dataset(&self) -> Result<String, StoreError> {
        Ok(self.inner.dataset_id.clone())
    }

    async fn regression_ack(&self) -> Result<Option<String>, StoreError> {
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(storage)?;
            let meta = txn.open_table(META).map_err(storage)?;
            Ok(meta
                .get(K_REGRESSION_ACK)
                .map_err(storage)?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned()))
        })
        .await
    }

    async fn scan_pages(
        &self,
        page: &mut (dyn for<'n> FnMut(&'n [NhsNumber]) + Send),
    ) -> Result<Version, StoreError> {
        // The version first, then the numbers a page (one read transaction) at a time.
        let version = self
            .blocking(|inner| read_version(&inner.db.begin_read().map_err(storage)?))
            .await?;
        let mut from = 0u64;
        loop {
            let numbers = self
                .blocking(move |inner| {
                    let txn = inner.db.begin_read().map_err(storage)?;
                    let table = txn.open_table(OPTOUTS).map_err(storage)?;
                    let mut numbers = Vec::with_capacity(SCAN_PAGE);
                    for item in table.range(from..).map_err(storage)?.take(SCAN_PAGE) {
                        let (k, _) = item.map_err(storage)?;
                        numbers.push(NhsNumber::from_stored(k.value()).map_err(|e| {
                            StoreError::Corrupt(
                                format!("stored key is not a valid NHS number: {e}").into(),
                            )
                        })?);
                    }
                    Ok(numbers)
                })
                .await?;
            page(&numbers);
            match numbers.last() {
                Some(last) if numbers.len() == SCAN_PAGE => from = last.as_u64() + 1,
                _ => return Ok(version),
            }
        }
    }
}

#[async_trait]
impl AuditTrail for EmbeddedStore {
    async fn trim_changes(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(storage)?;
            let removed = {
                let mut table = txn.open_table(CHANGE_AUDIT).map_err(storage)?;
                let old = table
                    .extract_from_if((0, 0)..(before_ms, 0), |_, _| true)
                    .map_err(storage)?;
                old.count() as u64
            };
            {
                // A seal is written after the records it covers: one older than the bound
                // covers only records older than it.
                let mut seals = txn.open_table(CHANGE_SEALS).map_err(storage)?;
                seals
                    .extract_from_if((0, 0)..(before_ms, 0), |_, _| true)
                    .map_err(storage)?
                    .count();
            }
            txn.commit().map_err(storage)?;
            Ok(removed)
        })
        .await
    }

    async fn record_access(&self, record: &AuditRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(storage)?;
            write_audit(&txn, CHANGE_AUDIT, std::slice::from_ref(&record))?;
            txn.commit().map_err(storage)
        })
        .await
    }

    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let records = records.to_vec();
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(storage)?;
            write_audit(&txn, AUDIT, &records)?;
            txn.commit().map_err(storage)
        })
        .await
    }

    async fn read_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let query = query.clone();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(storage)?;
            // Both trails share one sequence: merged by key, they are one order.
            let mut all = read_trail(&txn, CHANGE_AUDIT, &query)?;
            all.extend(read_trail(&txn, AUDIT, &query)?);
            all.sort_by_key(|(k, _)| *k);
            all.truncate(query.limit.max(1));
            Ok(all.into_iter().map(|(_, r)| r).collect())
        })
        .await
    }

    async fn stored(
        &self,
        part: Stored,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        let after = after.map(str::to_string);
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(storage)?;
            read_stored(&txn, part, after.as_deref(), limit)
        })
        .await
    }

    async fn last_seal(&self) -> Result<Option<StoredEntry>, StoreError> {
        self.blocking(move |inner| last_seal(&inner.db.begin_read().map_err(storage)?))
            .await
    }

    async fn append_seal(&self, after_seq: u64, line: &str) -> Result<bool, StoreError> {
        let line = line.to_string();
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(storage)?;
            let added = append_seal(&txn, after_seq, &line)?;
            txn.commit().map_err(storage)?;
            Ok(added)
        })
        .await
    }
}
