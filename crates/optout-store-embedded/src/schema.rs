//! The database layout: tables, meta keys, the marker, versions, and the audit table.

use super::*;

pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(super) const OPTOUTS: TableDefinition<u64, &[u8]> = TableDefinition::new("optouts");
pub(super) const SOURCES: TableDefinition<u32, &str> = TableDefinition::new("sources");
pub(super) const SOURCE_IDS: TableDefinition<&str, u32> = TableDefinition::new("source_ids");
pub(super) const CHANGES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("changes");
/// Audit records: (ms, sequence) -> JSON.
pub(super) const AUDIT: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("audit");
/// The changes trail: admin changes and reads, apart from check records. Key `(at_ms, seq)`, the
/// sequence shared with `audit`, so the two trails merge into one order.
pub(super) const CHANGE_AUDIT: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("change_audit");

/// Seals over the changes trail (`optout_core::seals`): (ms, the seal's sequence number) -> line.
pub(super) const CHANGE_SEALS: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("change_seals");

/// Type 1: the practices holding each number's type 1 opt-out, joined (`optout_core::practice`).
/// A number holding type 1 with no row here holds it from the unknown practice (recorded before
/// practices were).
pub(super) const PRACTICES: TableDefinition<u64, &str> = TableDefinition::new("type1_practices");

pub(super) const DB_FILE: &str = "optout.redb";
pub(super) const STAGING_PREFIX: &str = "import-";
pub(super) const SCHEMA: u64 = 1;
pub(super) const ENTRY_LEN: usize = 13;

pub(super) const K_DATASET: &str = "dataset_id";
pub(super) const K_SCHEMA: &str = "schema";
pub(super) const K_VERSION: &str = "version";
pub(super) const K_LOG_FLOOR: &str = "log_floor";
pub(super) const K_LOG_LEN: &str = "log_len";
pub(super) const K_PATIENTS: &str = "patients";
pub(super) const K_NEXT_SOURCE: &str = "next_source_id";
pub(super) const K_AUDIT_SEQ: &str = "audit_seq";
pub(super) const K_REGRESSION_ACK: &str = "regression_ack";
/// What the lists cover (`CoverageMeta` as JSON); absent in a store made before it: list mode.
pub(super) const K_COVERAGE: &str = "coverage";
/// The checked population (population mode), roaring-serialised.
pub(super) const K_POPULATION: &str = "population";

pub(super) fn count_key(t: OptOutType) -> &'static str {
    match t {
        OptOutType::NationalDataOptOut => "count_national",
        OptOutType::Type1 => "count_type1",
    }
}

/// A redb error, kept as the source.
pub(super) fn storage<E: std::error::Error + Send + Sync + 'static>(e: E) -> StoreError {
    StoreError::Unavailable(Cause::with_source(format!("embedded store: {e}"), e))
}

/// A blocking task that panicked or was cancelled, kept as the source.
pub(super) fn blocking_failed(e: tokio::task::JoinError) -> StoreError {
    StoreError::Unavailable(Cause::with_source(
        format!("embedded store task failed: {e}"),
        e,
    ))
}

pub(super) fn initialise(
    db: &Database,
    mode: CoverageMode,
    owner: Option<&str>,
) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut meta = txn.open_table(META).map_err(storage)?;
        let coverage = CoverageMeta {
            mode,
            owner: owner.map(str::to_string),
            ..CoverageMeta::default()
        };
        put_coverage(&mut meta, &coverage)?;
        let id = crate::store::random_hex::<16>();
        meta.insert(K_DATASET, id.as_bytes()).map_err(storage)?;
        meta.insert(K_SCHEMA, SCHEMA.to_le_bytes().as_slice())
            .map_err(storage)?;
        put_version(&mut meta, K_VERSION, Version::ZERO)?;
        put_version(&mut meta, K_LOG_FLOOR, Version::ZERO)?;
        txn.open_table(OPTOUTS).map_err(storage)?;
        txn.open_table(SOURCES).map_err(storage)?;
        txn.open_table(SOURCE_IDS).map_err(storage)?;
        txn.open_table(PRACTICES).map_err(storage)?;
        txn.open_table(CHANGES).map_err(storage)?;
        txn.open_table(AUDIT).map_err(storage)?;
        txn.open_table(CHANGE_AUDIT).map_err(storage)?;
        txn.open_table(CHANGE_SEALS).map_err(storage)?;
    }
    txn.commit().map_err(storage)
}

/// Writes audit records in a transaction; each gets the next sequence number.
pub(super) fn write_audit(
    txn: &WriteTransaction,
    trail: TableDefinition<(u64, u64), &[u8]>,
    records: &[AuditRecord],
) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META).map_err(storage)?;
    let mut seq = get_u64(&meta, K_AUDIT_SEQ)?;
    let mut audit = txn.open_table(trail).map_err(storage)?;
    // Keys only grow, also when the clock steps back: a trail is sealed and verified in key order.
    let mut floor = audit
        .last()
        .map_err(storage)?
        .map_or(0, |(k, _)| k.value().0);
    for r in records {
        let json = serde_json::to_vec(r)
            .map_err(|e| StoreError::Corrupt(format!("audit record: {e}").into()))?;
        seq += 1;
        floor = floor.max(u64::try_from(r.at_ms).unwrap_or(0));
        audit
            .insert((floor, seq), json.as_slice())
            .map_err(storage)?;
    }
    put_u64(&mut meta, K_AUDIT_SEQ, seq)
}

/// Entries of the changes trail or its seals after the id `after`, as stored.
pub(super) fn read_stored(
    txn: &ReadTransaction,
    part: Stored,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<StoredEntry>, StoreError> {
    let def = match part {
        Stored::Records => CHANGE_AUDIT,
        Stored::Seals => CHANGE_SEALS,
    };
    let table = match txn.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(storage(e)),
    };
    let start = match after {
        None => (0, 0),
        Some(id) => {
            let (ms, seq) = crate::core::seals::id_order(id).ok_or_else(|| {
                StoreError::Corrupt(format!("{id:?} is not a changes trail id").into())
            })?;
            match seq.checked_add(1) {
                Some(next) => (ms, next),
                None => (ms.saturating_add(1), 0),
            }
        }
    };
    let mut out = Vec::new();
    for item in table.range(start..).map_err(storage)?.take(limit.max(1)) {
        let (k, v) = item.map_err(storage)?;
        let (ms, seq) = k.value();
        out.push(StoredEntry {
            id: format!("{ms}-{seq}"),
            bytes: v.value().to_vec(),
            // Written only through the service, which holds the file locked.
            mac: RecordMac::NotUsed,
        });
    }
    Ok(out)
}

/// The last seal of the changes trail.
pub(super) fn last_seal(txn: &ReadTransaction) -> Result<Option<StoredEntry>, StoreError> {
    let table = match txn.open_table(CHANGE_SEALS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(storage(e)),
    };
    Ok(table.last().map_err(storage)?.map(|(k, v)| {
        let (ms, seq) = k.value();
        StoredEntry {
            id: format!("{ms}-{seq}"),
            bytes: v.value().to_vec(),
            mac: RecordMac::NotUsed,
        }
    }))
}

/// Appends a seal if the last one has sequence `after_seq`; keyed by time and its sequence.
pub(super) fn append_seal(
    txn: &WriteTransaction,
    after_seq: u64,
    line: &str,
) -> Result<bool, StoreError> {
    let mut table = txn.open_table(CHANGE_SEALS).map_err(storage)?;
    let (last_ms, last_seq) = table
        .last()
        .map_err(storage)?
        .map_or((0, 0), |(k, _)| k.value());
    if last_seq != after_seq {
        return Ok(false);
    }
    table
        .insert((last_ms.max(now_ms()), after_seq + 1), line.as_bytes())
        .map_err(storage)?;
    Ok(true)
}

pub(super) fn read_marker(db: &Database, path: &Path) -> Result<(String, Version), StoreError> {
    let missing = || {
        StoreError::NotInitialised(
            format!(
                "{} has no dataset marker; refusing to read it as an empty opt-out list",
                path.display()
            )
            .into(),
        )
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
        return Err(StoreError::Corrupt(
            format!(
                "{} has schema {schema}, this build reads schema {SCHEMA}",
                path.display()
            )
            .into(),
        ));
    }
    let version = get_version(&meta, K_VERSION)?;
    Ok((id, version))
}

pub(super) fn remove_stale_staging(db: &Database) -> Result<(), StoreError> {
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

pub(super) fn get_u64<T: ReadableTable<&'static str, &'static [u8]>>(
    meta: &T,
    key: &str,
) -> Result<u64, StoreError> {
    match meta.get(key).map_err(storage)? {
        None => Ok(0),
        Some(v) => v
            .value()
            .try_into()
            .map(u64::from_le_bytes)
            .map_err(|_| StoreError::Corrupt(format!("meta {key} is not 8 bytes").into())),
    }
}

pub(super) fn put_u64(
    meta: &mut redb::Table<&str, &[u8]>,
    key: &str,
    v: u64,
) -> Result<(), StoreError> {
    meta.insert(key, v.to_le_bytes().as_slice())
        .map(|_| ())
        .map_err(storage)
}

pub(super) fn get_version<T: ReadableTable<&'static str, &'static [u8]>>(
    meta: &T,
    key: &str,
) -> Result<Version, StoreError> {
    match meta.get(key).map_err(storage)? {
        None => Ok(Version::ZERO),
        Some(v) => {
            let b = v.value();
            if b.len() != 16 {
                return Err(StoreError::Corrupt(
                    format!("meta {key} is not 16 bytes").into(),
                ));
            }
            let (ms, seq) = b.split_at(8);
            let word = |s: &[u8]| {
                s.try_into()
                    .map(u64::from_le_bytes)
                    .map_err(|_| StoreError::Corrupt(format!("meta {key}").into()))
            };
            Ok(Version {
                ms: word(ms)?,
                seq: word(seq)?,
            })
        }
    }
}

pub(super) fn put_version(
    meta: &mut redb::Table<&str, &[u8]>,
    key: &str,
    v: Version,
) -> Result<(), StoreError> {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&v.ms.to_le_bytes());
    b[8..].copy_from_slice(&v.seq.to_le_bytes());
    meta.insert(key, b.as_slice()).map(|_| ()).map_err(storage)
}

pub(super) fn read_version(txn: &ReadTransaction) -> Result<Version, StoreError> {
    let meta = txn.open_table(META).map_err(storage)?;
    get_version(&meta, K_VERSION)
}

/// An audit record with its key in its trail: `(at_ms, seq)`.
pub(super) type Keyed = ((u64, u64), AuditRecord);

/// The first `query.limit` matching records of one trail, with their keys.
pub(super) fn read_trail(
    txn: &ReadTransaction,
    trail: TableDefinition<(u64, u64), &[u8]>,
    query: &AuditQuery,
) -> Result<Vec<Keyed>, StoreError> {
    let table = match txn.open_table(trail) {
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
    for item in table.range((from, 0)..=(to, u64::MAX)).map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        let r: AuditRecord = serde_json::from_slice(v.value())
            .map_err(|e| StoreError::Corrupt(format!("audit record: {e}").into()))?;
        if query.matches(&r) {
            out.push((k.value(), r));
            if out.len() >= query.limit.max(1) {
                break;
            }
        }
    }
    Ok(out)
}

/// The coverage record (list mode when absent: a store made before coverage existed).
pub(super) fn get_coverage(
    meta: &impl redb::ReadableTable<&'static str, &'static [u8]>,
) -> Result<CoverageMeta, StoreError> {
    match meta.get(K_COVERAGE).map_err(storage)? {
        None => Ok(CoverageMeta::default()),
        Some(v) => serde_json::from_slice(v.value()).map_err(|e| {
            StoreError::Corrupt(format!("the coverage record cannot be read: {e}").into())
        }),
    }
}

pub(super) fn put_coverage(
    meta: &mut redb::Table<&'static str, &'static [u8]>,
    coverage: &CoverageMeta,
) -> Result<(), StoreError> {
    let json = serde_json::to_vec(coverage)
        .map_err(|e| StoreError::Corrupt(format!("coverage: {e}").into()))?;
    meta.insert(K_COVERAGE, json.as_slice()).map_err(storage)?;
    Ok(())
}
