//! Applying opt-out changes inside one write transaction: records, counts, sources, the log.

use super::*;

/// The bookkeeping of one write transaction: it allocates the version, keeps counts, interns the
/// source and appends the change-log entry, so that every write path does these the same way.
pub(super) struct Writer<'t> {
    pub(super) txn: &'t WriteTransaction,
    pub(super) now: u64,
    pub(super) source_id: u32,
    pub(super) counts: [i64; 2],
    pub(super) patients: i64,
}

impl<'t> Writer<'t> {
    pub(super) fn new(txn: &'t WriteTransaction, source: &str) -> Result<Self, StoreError> {
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
    pub(super) fn add(
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
    pub(super) fn remove(
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

    /// Records type 1 from `practice` for `n`. Returns whether anything changed, and whether `n`
    /// gained type 1 (it held it from no practice before).
    pub(super) fn add_type1(
        &mut self,
        table: &mut redb::Table<u64, &[u8]>,
        practices: &mut redb::Table<u64, &str>,
        n: u64,
        practice: &Practice,
    ) -> Result<(bool, bool), StoreError> {
        if self.add(table, n, OptOutType::Type1)? {
            practices.insert(n, practice.stored()).map_err(storage)?;
            return Ok((true, true));
        }
        let list = stored_list(practices, n)?;
        match crate::core::practice::with(&list, practice) {
            None => Ok((false, false)),
            Some(list) => {
                practices
                    .insert(n, crate::core::practice::join_list(&list).as_str())
                    .map_err(storage)?;
                Ok((true, false))
            }
        }
    }

    /// Withdraws `practice`'s type 1 for `n`. Returns whether anything changed, and whether `n`
    /// lost type 1 (no practice holds it any more).
    pub(super) fn remove_type1(
        &mut self,
        table: &mut redb::Table<u64, &[u8]>,
        practices: &mut redb::Table<u64, &str>,
        n: u64,
        practice: &Practice,
    ) -> Result<(bool, bool), StoreError> {
        let holds = match table.get(n).map_err(storage)? {
            Some(v) => held_types(v.value())?.contains(OptOutType::Type1),
            None => false,
        };
        if !holds {
            return Ok((false, false));
        }
        let list = stored_list(practices, n)?;
        match crate::core::practice::without(&list, practice) {
            None => Ok((false, false)),
            Some(rest) if rest.is_empty() => {
                practices.remove(n).map_err(storage)?;
                self.remove(table, n, OptOutType::Type1)?;
                Ok((true, true))
            }
            Some(rest) => {
                practices
                    .insert(n, crate::core::practice::join_list(&rest).as_str())
                    .map_err(storage)?;
                Ok((true, false))
            }
        }
    }

    /// Allocates the version, updates counts and appends the change-log entry (trimming it).
    pub(super) fn finish(
        self,
        added: Option<&[NhsNumber]>,
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

/// The practices holding `n`'s type 1 opt-out (the unknown practice with no row).
pub(super) fn stored_list(
    practices: &impl redb::ReadableTable<u64, &'static str>,
    n: u64,
) -> Result<Vec<Practice>, StoreError> {
    Ok(crate::core::practice::parse_list(
        practices
            .get(n)
            .map_err(storage)?
            .as_ref()
            .map_or("", |v| v.value()),
    ))
}

pub(super) fn intern_source(txn: &WriteTransaction, source: &str) -> Result<u32, StoreError> {
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
