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
//! - `import-<id>`: staging tables of imports under way, deleted on commit, abort or next open.
//!
//! redb is synchronous, so every call runs on tokio's blocking pool.

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

use super::{
    ChangeEntry, ChangeKind, ConsentStore, Feed, ImportMode, ImportOutcome, ImportSession, Lookup,
    OptOutRecord, Scan, StoreError, StoreStatus, WriteOutcome, now_ms,
};
use crate::core::{AuditKey, AuditQuery, AuditRecord, NhsNumber, OptOutSet, OptOutType, Version};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const OPTOUTS: TableDefinition<u64, &[u8]> = TableDefinition::new("optouts");
const SOURCES: TableDefinition<u32, &str> = TableDefinition::new("sources");
const SOURCE_IDS: TableDefinition<&str, u32> = TableDefinition::new("source_ids");
const CHANGES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("changes");
/// Audit records: (ms, sequence) -> JSON.
const AUDIT: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("audit");

const DB_FILE: &str = "optout.redb";
const STAGING_PREFIX: &str = "import-";
const SCHEMA: u64 = 1;
const ENTRY_LEN: usize = 13;

const K_DATASET: &str = "dataset_id";
const K_SCHEMA: &str = "schema";
const K_VERSION: &str = "version";
const K_LOG_FLOOR: &str = "log_floor";
const K_LOG_LEN: &str = "log_len";
const K_PATIENTS: &str = "patients";
const K_NEXT_SOURCE: &str = "next_source_id";
const K_AUDIT_SEQ: &str = "audit_seq";
const K_REGRESSION_ACK: &str = "regression_ack";

fn count_key(t: OptOutType) -> &'static str {
    match t {
        OptOutType::NationalDataOptOut => "count_national",
        OptOutType::Type1 => "count_type1",
    }
}

/// Settings of the embedded store.
#[derive(Clone, Debug)]
pub struct EmbeddedConfig {
    /// Where the database file lives.
    pub data_dir: PathBuf,
    /// How many change-log entries to keep.
    pub change_log_len: u64,
}

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

fn storage<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Unavailable(format!("embedded store: {e}"))
}

fn blocking_failed(e: tokio::task::JoinError) -> StoreError {
    StoreError::Unavailable(format!("embedded store task failed: {e}"))
}

impl EmbeddedStore {
    /// Opens the store in `config.data_dir`.
    ///
    /// A data directory with no database file is a fresh install: the database is created and a
    /// new dataset marker written. A database file without the marker (or from another schema) is
    /// refused: it is not an empty opt-out list and must never be read as one.
    pub fn open(config: &EmbeddedConfig) -> Result<(Self, Opened), StoreError> {
        let path = config.data_dir.join(DB_FILE);
        let fresh = !path.exists();
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                config.data_dir.display()
            ))
        })?;
        let db = if fresh {
            Database::create(&path)
        } else {
            Database::open(&path)
        }
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        if fresh {
            initialise(&db)?;
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

fn initialise(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut meta = txn.open_table(META).map_err(storage)?;
        let id = super::random_hex::<16>();
        meta.insert(K_DATASET, id.as_bytes()).map_err(storage)?;
        meta.insert(K_SCHEMA, SCHEMA.to_le_bytes().as_slice())
            .map_err(storage)?;
        put_version(&mut meta, K_VERSION, Version::ZERO)?;
        put_version(&mut meta, K_LOG_FLOOR, Version::ZERO)?;
        txn.open_table(OPTOUTS).map_err(storage)?;
        txn.open_table(SOURCES).map_err(storage)?;
        txn.open_table(SOURCE_IDS).map_err(storage)?;
        txn.open_table(CHANGES).map_err(storage)?;
        txn.open_table(AUDIT).map_err(storage)?;
    }
    txn.commit().map_err(storage)
}

/// Writes audit records in a transaction; each gets the next sequence number.
fn write_audit(txn: &WriteTransaction, records: &[AuditRecord]) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META).map_err(storage)?;
    let mut seq = get_u64(&meta, K_AUDIT_SEQ)?;
    let mut audit = txn.open_table(AUDIT).map_err(storage)?;
    for r in records {
        let json =
            serde_json::to_vec(r).map_err(|e| StoreError::Corrupt(format!("audit record: {e}")))?;
        seq += 1;
        audit
            .insert((u64::try_from(r.at_ms).unwrap_or(0), seq), json.as_slice())
            .map_err(storage)?;
    }
    put_u64(&mut meta, K_AUDIT_SEQ, seq)
}

fn read_marker(db: &Database, path: &Path) -> Result<(String, Version), StoreError> {
    let missing = || {
        StoreError::NotInitialised(format!(
            "{} has no dataset marker; refusing to read it as an empty opt-out list",
            path.display()
        ))
    };
    let txn = db.begin_read().map_err(storage)?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Err(missing()),
        Err(e) => return Err(storage(e)),
    };
    let id = meta
        .get(K_DATASET)
        .map_err(storage)?
        .map(|v| String::from_utf8_lossy(v.value()).into_owned())
        .ok_or_else(missing)?;
    let schema = get_u64(&meta, K_SCHEMA)?;
    if schema != SCHEMA {
        return Err(StoreError::Corrupt(format!(
            "{} has schema {schema}, this build reads schema {SCHEMA}",
            path.display()
        )));
    }
    let version = get_version(&meta, K_VERSION)?;
    Ok((id, version))
}

fn remove_stale_staging(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(storage)?;
    let stale: Vec<String> = txn
        .list_tables()
        .map_err(storage)?
        .map(|t| t.name().to_string())
        .filter(|n| n.starts_with(STAGING_PREFIX))
        .collect();
    for name in &stale {
        txn.delete_table(TableDefinition::<u64, ()>::new(name))
            .map_err(storage)?;
    }
    txn.commit().map_err(storage)
}

fn get_u64<T: ReadableTable<&'static str, &'static [u8]>>(
    meta: &T,
    key: &str,
) -> Result<u64, StoreError> {
    match meta.get(key).map_err(storage)? {
        None => Ok(0),
        Some(v) => v
            .value()
            .try_into()
            .map(u64::from_le_bytes)
            .map_err(|_| StoreError::Corrupt(format!("meta {key} is not 8 bytes"))),
    }
}

fn put_u64(meta: &mut redb::Table<&str, &[u8]>, key: &str, v: u64) -> Result<(), StoreError> {
    meta.insert(key, v.to_le_bytes().as_slice())
        .map(|_| ())
        .map_err(storage)
}

fn get_version<T: ReadableTable<&'static str, &'static [u8]>>(
    meta: &T,
    key: &str,
) -> Result<Version, StoreError> {
    match meta.get(key).map_err(storage)? {
        None => Ok(Version::ZERO),
        Some(v) => {
            let b = v.value();
            if b.len() != 16 {
                return Err(StoreError::Corrupt(format!("meta {key} is not 16 bytes")));
            }
            let (ms, seq) = b.split_at(8);
            let word = |s: &[u8]| {
                s.try_into()
                    .map(u64::from_le_bytes)
                    .map_err(|_| StoreError::Corrupt(format!("meta {key}")))
            };
            Ok(Version {
                ms: word(ms)?,
                seq: word(seq)?,
            })
        }
    }
}

fn put_version(
    meta: &mut redb::Table<&str, &[u8]>,
    key: &str,
    v: Version,
) -> Result<(), StoreError> {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&v.ms.to_le_bytes());
    b[8..].copy_from_slice(&v.seq.to_le_bytes());
    meta.insert(key, b.as_slice()).map(|_| ()).map_err(storage)
}

/// One recorded opt-out inside an `optouts` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    kind: OptOutType,
    recorded_at_ms: i64,
    source_id: u32,
}

fn decode_entries(bytes: &[u8]) -> Result<Vec<Entry>, StoreError> {
    if !bytes.len().is_multiple_of(ENTRY_LEN) {
        return Err(StoreError::Corrupt(format!(
            "opt-out record of {} bytes",
            bytes.len()
        )));
    }
    bytes
        .chunks_exact(ENTRY_LEN)
        .map(|c| {
            let kind = OptOutType::from_code(c[0])
                .ok_or_else(|| StoreError::Corrupt(format!("opt-out type code {}", c[0])))?;
            let mut at = [0u8; 8];
            at.copy_from_slice(&c[1..9]);
            let mut src = [0u8; 4];
            src.copy_from_slice(&c[9..13]);
            Ok(Entry {
                kind,
                recorded_at_ms: i64::from_le_bytes(at),
                source_id: u32::from_le_bytes(src),
            })
        })
        .collect()
}

fn encode_entries(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        out.push(e.kind.code());
        out.extend_from_slice(&e.recorded_at_ms.to_le_bytes());
        out.extend_from_slice(&e.source_id.to_le_bytes());
    }
    out
}

/// The types in an encoded value, without decoding the rest (the check path). A value that does
/// not parse is an error, never "no opt-out": a corrupt record must withhold, not release.
fn held_types(bytes: &[u8]) -> Result<OptOutSet, StoreError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(ENTRY_LEN) {
        return Err(StoreError::Corrupt(format!(
            "opt-out record of {} bytes",
            bytes.len()
        )));
    }
    bytes
        .chunks_exact(ENTRY_LEN)
        .map(|c| {
            OptOutType::from_code(c[0])
                .ok_or_else(|| StoreError::Corrupt(format!("opt-out type code {}", c[0])))
        })
        .collect()
}

fn encode_change(added: &[NhsNumber], removed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + added.len() * 8);
    out.extend_from_slice(&removed.to_le_bytes());
    for n in added {
        out.extend_from_slice(&n.as_u64().to_le_bytes());
    }
    out
}

fn decode_change(version: Version, bytes: &[u8]) -> Result<ChangeEntry, StoreError> {
    if bytes.len() < 8 || !bytes.len().is_multiple_of(8) {
        return Err(StoreError::Corrupt(format!(
            "change-log entry {version} of {} bytes",
            bytes.len()
        )));
    }
    let mut words = bytes.chunks_exact(8).map(|c| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        u64::from_le_bytes(w)
    });
    let removed = words.next().unwrap_or(0);
    let added = words
        .map(|v| {
            NhsNumber::from_u64(v).map_err(|e| {
                StoreError::Corrupt(format!(
                    "change-log entry {version} holds an invalid number: {e}"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ChangeEntry {
        version,
        added,
        removed,
    })
}

/// The bookkeeping of one write transaction: it allocates the version, keeps counts, interns the
/// source and appends the change-log entry, so that every write path does these the same way.
struct Writer<'t> {
    txn: &'t WriteTransaction,
    now: u64,
    source_id: u32,
    counts: [i64; 2],
    patients: i64,
}

impl<'t> Writer<'t> {
    fn new(txn: &'t WriteTransaction, source: &str) -> Result<Self, StoreError> {
        let source_id = intern_source(txn, source)?;
        Ok(Writer {
            txn,
            now: now_ms(),
            source_id,
            counts: [0, 0],
            patients: 0,
        })
    }

    /// Records `t` for `n` if not yet there. Returns whether it changed anything.
    fn add(
        &mut self,
        table: &mut redb::Table<u64, &[u8]>,
        n: u64,
        t: OptOutType,
    ) -> Result<bool, StoreError> {
        let mut entries = match table.get(n).map_err(storage)? {
            Some(v) => decode_entries(v.value())?,
            None => Vec::new(),
        };
        if entries.iter().any(|e| e.kind == t) {
            return Ok(false);
        }
        if entries.is_empty() {
            self.patients += 1;
        }
        entries.push(Entry {
            kind: t,
            recorded_at_ms: i64::try_from(self.now).unwrap_or(i64::MAX),
            source_id: self.source_id,
        });
        table
            .insert(n, encode_entries(&entries).as_slice())
            .map_err(storage)?;
        self.counts[usize::from(t.code() - 1)] += 1;
        Ok(true)
    }

    /// Removes `t` from `n` if there. Returns whether it changed anything.
    fn remove(
        &mut self,
        table: &mut redb::Table<u64, &[u8]>,
        n: u64,
        t: OptOutType,
    ) -> Result<bool, StoreError> {
        let mut entries = match table.get(n).map_err(storage)? {
            Some(v) => decode_entries(v.value())?,
            None => return Ok(false),
        };
        let before = entries.len();
        entries.retain(|e| e.kind != t);
        if entries.len() == before {
            return Ok(false);
        }
        if entries.is_empty() {
            table.remove(n).map_err(storage)?;
            self.patients -= 1;
        } else {
            table
                .insert(n, encode_entries(&entries).as_slice())
                .map_err(storage)?;
        }
        self.counts[usize::from(t.code() - 1)] -= 1;
        Ok(true)
    }

    /// Allocates the version, updates counts and appends the change-log entry (trimming it).
    fn finish(
        self,
        added: &[NhsNumber],
        removed: u64,
        log_len: u64,
    ) -> Result<Version, StoreError> {
        let mut meta = self.txn.open_table(META).map_err(storage)?;
        let version = get_version(&meta, K_VERSION)?.next(self.now);
        put_version(&mut meta, K_VERSION, version)?;
        for t in OptOutType::ALL {
            let key = count_key(t);
            let v =
                get_u64(&meta, key)?.saturating_add_signed(self.counts[usize::from(t.code() - 1)]);
            put_u64(&mut meta, key, v)?;
        }
        let patients = get_u64(&meta, K_PATIENTS)?.saturating_add_signed(self.patients);
        put_u64(&mut meta, K_PATIENTS, patients)?;

        let mut log = self.txn.open_table(CHANGES).map_err(storage)?;
        log.insert(
            (version.ms, version.seq),
            encode_change(added, removed).as_slice(),
        )
        .map_err(storage)?;
        let mut len = get_u64(&meta, K_LOG_LEN)? + 1;
        let mut floor = get_version(&meta, K_LOG_FLOOR)?;
        while len > log_len {
            let Some((k, _)) = log.pop_first().map_err(storage)? else {
                break;
            };
            let (ms, seq) = k.value();
            floor = Version { ms, seq };
            len -= 1;
        }
        put_u64(&mut meta, K_LOG_LEN, len)?;
        put_version(&mut meta, K_LOG_FLOOR, floor)?;
        Ok(version)
    }
}

fn intern_source(txn: &WriteTransaction, source: &str) -> Result<u32, StoreError> {
    let mut ids = txn.open_table(SOURCE_IDS).map_err(storage)?;
    if let Some(id) = ids.get(source).map_err(storage)? {
        return Ok(id.value());
    }
    let mut meta = txn.open_table(META).map_err(storage)?;
    let id = u32::try_from(get_u64(&meta, K_NEXT_SOURCE)?)
        .map_err(|_| StoreError::Corrupt("source id space exhausted".into()))?;
    put_u64(&mut meta, K_NEXT_SOURCE, u64::from(id) + 1)?;
    ids.insert(source, id).map_err(storage)?;
    txn.open_table(SOURCES)
        .map_err(storage)?
        .insert(id, source)
        .map_err(storage)?;
    Ok(id)
}

fn read_version(txn: &ReadTransaction) -> Result<Version, StoreError> {
    let meta = txn.open_table(META).map_err(storage)?;
    get_version(&meta, K_VERSION)
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
impl ConsentStore for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn lookup(&self, numbers: &[NhsNumber]) -> Result<Lookup, StoreError> {
        let numbers = numbers.to_vec();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(storage)?;
            let version = read_version(&txn)?;
            let table = txn.open_table(OPTOUTS).map_err(storage)?;
            let held = numbers
                .iter()
                .map(|n| {
                    Ok(match table.get(n.as_u64()).map_err(storage)? {
                        Some(v) => held_types(v.value())?,
                        None => OptOutSet::EMPTY,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(Lookup { held, version })
        })
        .await
    }

    async fn change(
        &self,
        kind: ChangeKind,
        opt_out: OptOutType,
        numbers: &[NhsNumber],
        source: &str,
        audit: &AuditRecord,
    ) -> Result<WriteOutcome, StoreError> {
        let numbers = numbers.to_vec();
        let source = source.to_string();
        let mut audit = audit.clone();
        let outcome = self
            .blocking(move |inner| {
                let txn = inner.db.begin_write().map_err(storage)?;
                let mut writer = Writer::new(&txn, &source)?;
                let mut added = Vec::new();
                let mut applied = 0u64;
                {
                    let mut table = txn.open_table(OPTOUTS).map_err(storage)?;
                    for n in &numbers {
                        let changed = match kind {
                            ChangeKind::Add => writer.add(&mut table, n.as_u64(), opt_out)?,
                            ChangeKind::Remove => writer.remove(&mut table, n.as_u64(), opt_out)?,
                        };
                        if changed {
                            applied += 1;
                            if kind == ChangeKind::Add {
                                added.push(*n);
                            }
                        }
                    }
                }
                let removed = if kind == ChangeKind::Remove {
                    applied
                } else {
                    0
                };
                let version = writer.finish(&added, removed, inner.change_log_len)?;
                audit.version = version.to_string();
                audit.applied = applied;
                write_audit(&txn, std::slice::from_ref(&audit))?;
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
        source: &str,
    ) -> Result<Box<dyn ImportSession>, StoreError> {
        let table = format!("{STAGING_PREFIX}{}", super::random_hex::<8>());
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
            source: source.to_string(),
            committed: false,
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
            let mut records = decode_entries(v.value())?
                .into_iter()
                .map(|e| {
                    let source = sources
                        .get(e.source_id)
                        .map_err(storage)?
                        .map(|s| s.value().to_string())
                        .unwrap_or_default();
                    Ok(OptOutRecord {
                        kind: e.kind,
                        recorded_at_ms: e.recorded_at_ms,
                        source,
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

    async fn acknowledge_regression(&self, audit: &AuditRecord) -> Result<String, StoreError> {
        let id = super::random_hex::<16>();
        let audit = audit.clone();
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(storage)?;
            {
                let mut meta = txn.open_table(META).map_err(storage)?;
                meta.insert(K_REGRESSION_ACK, id.as_bytes())
                    .map_err(storage)?;
            }
            write_audit(&txn, std::slice::from_ref(&audit))?;
            txn.commit().map_err(storage)?;
            Ok(id)
        })
        .await
    }

    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let records = records.to_vec();
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(storage)?;
            write_audit(&txn, &records)?;
            txn.commit().map_err(storage)
        })
        .await
    }

    async fn read_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let query = query.clone();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(storage)?;
            let audit = match txn.open_table(AUDIT) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(storage(e)),
            };
            let from = u64::try_from(query.from_ms).unwrap_or(0);
            let to = if query.to_ms <= 0 {
                u64::MAX
            } else {
                u64::try_from(query.to_ms).unwrap_or(u64::MAX)
            };
            let mut out = Vec::new();
            for item in audit.range((from, 0)..=(to, u64::MAX)).map_err(storage)? {
                let (_, v) = item.map_err(storage)?;
                let r: AuditRecord = serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt(format!("audit record: {e}")))?;
                if query.matches(&r) {
                    out.push(r);
                    if out.len() >= query.limit.max(1) {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn scan(&self) -> Result<Scan, StoreError> {
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(storage)?;
            let version = read_version(&txn)?;
            let table = txn.open_table(OPTOUTS).map_err(storage)?;
            let mut numbers =
                Vec::with_capacity(usize::try_from(table.len().map_err(storage)?).unwrap_or(0));
            for item in table.iter().map_err(storage)? {
                let (k, _) = item.map_err(storage)?;
                numbers.push(NhsNumber::from_u64(k.value()).map_err(|e| {
                    StoreError::Corrupt(format!("stored key is not a valid NHS number: {e}"))
                })?);
            }
            Ok(Scan { numbers, version })
        })
        .await
    }
}

/// An import staged in its own table. Staging commits are not fsynced (`Durability::None`): a
/// crash loses the staging table, which is what an interrupted import should do anyway. The final
/// apply is one durable transaction.
struct EmbeddedImport {
    store: EmbeddedStore,
    table: String,
    mode: ImportMode,
    opt_out: OptOutType,
    source: String,
    committed: bool,
}

#[async_trait]
impl ImportSession for EmbeddedImport {
    async fn stage(&mut self, numbers: &[NhsNumber]) -> Result<(), StoreError> {
        let numbers = numbers.to_vec();
        let name = self.table.clone();
        self.store
            .blocking(move |inner| {
                let mut txn = inner.db.begin_write().map_err(storage)?;
                txn.set_durability(Durability::None).map_err(storage)?;
                {
                    let mut t = txn
                        .open_table(TableDefinition::<u64, ()>::new(&name))
                        .map_err(storage)?;
                    for n in &numbers {
                        t.insert(n.as_u64(), ()).map_err(storage)?;
                    }
                }
                txn.commit().map_err(storage)
            })
            .await
    }

    async fn commit(
        mut self: Box<Self>,
        audit: AuditRecord,
        key: &AuditKey,
    ) -> Result<ImportOutcome, StoreError> {
        let name = self.table.clone();
        let key = key.clone();
        let mut audit = audit;
        let (mode, t, source) = (self.mode, self.opt_out, self.source.clone());
        let outcome = self
            .store
            .blocking(move |inner| {
                let txn = inner.db.begin_write().map_err(storage)?;
                let staging_def = TableDefinition::<u64, ()>::new(&name);
                let mut writer = Writer::new(&txn, &source)?;
                let mut added = Vec::new();
                let mut removed = 0u64;
                let mut removed_numbers = Vec::new();
                {
                    let staging = txn.open_table(staging_def).map_err(storage)?;
                    if mode == ImportMode::Replace && staging.is_empty().map_err(storage)? {
                        return Err(StoreError::ImportRefused(format!(
                            "a REPLACE import with no valid numbers would remove every {} opt-out; \
                             use RemoveOptOuts to remove opt-outs explicitly",
                            t.name()
                        )));
                    }
                    let mut table = txn.open_table(OPTOUTS).map_err(storage)?;
                    if mode == ImportMode::Replace {
                        let mut gone = Vec::new();
                        for item in table.iter().map_err(storage)? {
                            let (k, v) = item.map_err(storage)?;
                            if held_types(v.value())?.contains(t)
                                && staging.get(k.value()).map_err(storage)?.is_none()
                            {
                                gone.push(k.value());
                            }
                        }
                        for n in gone {
                            if writer.remove(&mut table, n, t)? {
                                removed += 1;
                                if let Ok(n) = NhsNumber::from_u64(n) {
                                    removed_numbers.push(n);
                                }
                            }
                        }
                    }
                    for item in staging.iter().map_err(storage)? {
                        let (k, _) = item.map_err(storage)?;
                        let n = k.value();
                        if writer.add(&mut table, n, t)? {
                            added.push(NhsNumber::from_u64(n).map_err(|e| {
                                StoreError::Corrupt(format!("staged number invalid: {e}"))
                            })?);
                        }
                    }
                }
                txn.delete_table(staging_def).map_err(storage)?;
                let version = writer.finish(&added, removed, inner.change_log_len)?;
                audit.version = version.to_string();
                audit.applied = added.len() as u64 + removed;
                audit.digests = key.digests(added.iter().chain(&removed_numbers).copied());
                write_audit(&txn, std::slice::from_ref(&audit))?;
                txn.commit().map_err(storage)?;
                inner.notify(version);
                Ok(ImportOutcome {
                    added: added.len() as u64,
                    removed,
                    version,
                })
            })
            .await;
        // Whether it applied or failed, the staging table is gone or will be removed below.
        self.committed = outcome.is_ok();
        outcome
    }
}

impl Drop for EmbeddedImport {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // An import that broke off or failed: drop its staging table. Best effort: the next open
        // removes any staging table left behind.
        let inner = self.store.inner.clone();
        let name = std::mem::take(&mut self.table);
        let cleanup = move || {
            let result = (|| -> Result<(), redb::Error> {
                let txn = inner.db.begin_write()?;
                txn.delete_table(TableDefinition::<u64, ()>::new(&name))?;
                txn.commit()?;
                Ok(())
            })();
            if let Err(e) = result {
                tracing::warn!(error = %e, "could not remove an abandoned import's staging table");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(cleanup);
            }
            Err(_) => cleanup(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(count: usize) -> Vec<NhsNumber> {
        (4_000_000_000u64..)
            .filter_map(|v| NhsNumber::from_u64(v).ok())
            .take(count)
            .collect()
    }

    fn open(dir: &Path, log: u64) -> EmbeddedStore {
        EmbeddedStore::open(&EmbeddedConfig {
            data_dir: dir.to_path_buf(),
            change_log_len: log,
        })
        .expect("opens")
        .0
    }

    #[tokio::test]
    async fn writes_advance_the_version_and_feed_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), 100);
        let ns = numbers(3);
        let a = store
            .change(
                ChangeKind::Add,
                OptOutType::Type1,
                &ns,
                "t1",
                &AuditRecord::default(),
            )
            .await
            .expect("add");
        assert_eq!(a.applied, 3);
        let again = store
            .change(
                ChangeKind::Add,
                OptOutType::Type1,
                &ns[..1],
                "t1",
                &AuditRecord::default(),
            )
            .await
            .expect("add again");
        assert_eq!(again.applied, 0);
        assert!(again.version > a.version);
        let Feed::Changes(c) = store
            .changes_after(Version::ZERO, 10, Duration::ZERO)
            .await
            .expect("feed")
        else {
            panic!("not trimmed")
        };
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].added, ns);
        assert!(c[1].added.is_empty());
        let st = store.status().await.expect("status");
        assert_eq!((st.type1, st.national, st.patients), (3, 0, 3));
    }

    #[tokio::test]
    async fn a_trimmed_log_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), 2);
        for n in numbers(5) {
            store
                .change(
                    ChangeKind::Add,
                    OptOutType::NationalDataOptOut,
                    &[n],
                    "s",
                    &AuditRecord::default(),
                )
                .await
                .expect("add");
        }
        assert_eq!(
            store
                .changes_after(Version::ZERO, 10, Duration::ZERO)
                .await
                .expect("feed"),
            Feed::Trimmed
        );
        let latest = store.status().await.expect("status").version;
        assert_eq!(
            store
                .changes_after(latest, 10, Duration::ZERO)
                .await
                .expect("feed"),
            Feed::Changes(vec![])
        );
    }

    #[tokio::test]
    async fn a_database_without_marker_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A redb file that is not one of ours (or lost its meta table).
        Database::create(EmbeddedStore::db_path(dir.path())).expect("create");
        let err = EmbeddedStore::open(&EmbeddedConfig {
            data_dir: dir.path().to_path_buf(),
            change_log_len: 10,
        })
        .err()
        .expect("refused");
        assert!(matches!(err, StoreError::NotInitialised(_)), "{err}");
    }

    #[tokio::test]
    async fn records_keep_type_time_and_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), 10);
        let n = numbers(1)[0];
        store
            .change(
                ChangeKind::Add,
                OptOutType::Type1,
                &[n],
                "practice-A.csv",
                &AuditRecord::default(),
            )
            .await
            .expect("add");
        store
            .change(
                ChangeKind::Add,
                OptOutType::NationalDataOptOut,
                &[n],
                "ticket-9",
                &AuditRecord::default(),
            )
            .await
            .expect("add");
        let (records, _) = store.get(n).await.expect("get");
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].kind, OptOutType::NationalDataOptOut);
        assert_eq!(records[0].source, "ticket-9");
        assert_eq!(records[1].source, "practice-A.csv");
        assert!(records[1].recorded_at_ms > 1_700_000_000_000);
        store
            .change(
                ChangeKind::Remove,
                OptOutType::NationalDataOptOut,
                &[n],
                "t",
                &AuditRecord::default(),
            )
            .await
            .expect("remove");
        let lookup = store.lookup(&[n]).await.expect("lookup");
        assert!(lookup.held[0].contains(OptOutType::Type1));
        assert!(!lookup.held[0].contains(OptOutType::NationalDataOptOut));
    }
}
