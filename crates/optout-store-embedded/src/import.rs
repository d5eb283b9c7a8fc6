//! Imports staged in their own table, applied in one durable transaction.

use super::*;
use crate::store::{ImportTally, NationalCheck, import_allowed, refuse_after_failed_stage};

/// An import staged in its own table. Staging commits are not fsynced (`Durability::None`): a
/// crash loses the staging table, which is what an interrupted import should do anyway. The final
/// apply is one durable transaction.
pub(super) struct EmbeddedImport {
    pub(super) store: EmbeddedStore,
    pub(super) table: String,
    pub(super) mode: ImportMode,
    pub(super) opt_out: OptOutType,
    /// Type 1: the practice whose list this is.
    pub(super) practice: Option<Practice>,
    pub(super) source: String,
    pub(super) committed: bool,
    /// A chunk could not be staged: the import can no longer be committed.
    pub(super) failed: bool,
    /// Set when this import is a national check round trip.
    pub(super) check: Option<NationalCheck>,
}

#[async_trait]
impl ImportSession for EmbeddedImport {
    fn set_national_check(&mut self, check: NationalCheck) {
        self.check = Some(check);
    }

    async fn stage(&mut self, mut numbers: Vec<NhsNumber>) -> Result<(), StoreError> {
        refuse_after_failed_stage(self.failed)?;
        let name = self.table.clone();
        let result = self
            .store
            .blocking(move |inner| {
                // In key order, each B-tree page is written once per chunk, not once per number.
                numbers.sort_unstable();
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
            .await;
        self.failed = result.is_err();
        result
    }

    async fn commit(
        mut self: Box<Self>,
        audit: AuditRecord,
        key: &AuditKey,
    ) -> Result<ImportOutcome, StoreError> {
        refuse_after_failed_stage(self.failed)?;
        let name = self.table.clone();
        let key = key.clone();
        let mut audit = audit;
        let (mode, t, source) = (self.mode, self.opt_out, self.source.clone());
        let practice = self.practice.clone();
        let check = self.check.take();
        let outcome = self
            .store
            .blocking(move |inner| {
                let txn = inner.db.begin_write().map_err(storage)?;
                let staging_def = TableDefinition::<u64, ()>::new(&name);
                let mut apply = Apply {
                    txn: &txn,
                    writer: Writer::new(&txn, &source)?,
                    tally: ImportTally::default(),
                    id: crate::store::random_hex::<8>(),
                    key: &key,
                    t,
                    practice: practice.as_ref(),
                };
                audit.part_of = Some(apply.id.clone());
                let mut coverage = get_coverage(&txn.open_table(META).map_err(storage)?)?;
                import_allowed(coverage.mode, t, mode, check.as_ref())?;
                crate::store::check_not_older(check.as_ref(), coverage.national_as_of_ms)?;
                {
                    let staging = txn.open_table(staging_def).map_err(storage)?;
                    crate::store::refuse_empty_replace(
                        mode,
                        staging.is_empty().map_err(storage)?,
                        check.as_ref(),
                        t,
                    )?;
                    let mut table = txn.open_table(OPTOUTS).map_err(storage)?;
                    let mut practices = txn.open_table(PRACTICES).map_err(storage)?;
                    if mode == ImportMode::Replace {
                        apply.remove_unstaged(&mut table, &mut practices, &staging, &audit)?;
                    }
                    apply.add_staged(&mut table, &mut practices, &staging, &audit)?;
                }
                txn.delete_table(staging_def).map_err(storage)?;
                let Apply {
                    writer, mut tally, ..
                } = apply;
                // A REPLACE changes the list's date (and a national check the population): logged
                // unlisted, so every replica rebuilds and reads the coverage with its scan.
                let listed = if mode == ImportMode::Replace {
                    None
                } else {
                    tally.listed()
                };
                let version = writer.finish(listed, tally.removed, inner.change_log_len)?;
                if mode == ImportMode::Replace {
                    let mut meta = txn.open_table(META).map_err(storage)?;
                    let as_of = check.as_ref().map_or(now_ms(), |c| c.checked_at_ms);
                    match (t, &practice) {
                        (OptOutType::NationalDataOptOut, _) => {
                            coverage.national_as_of_ms = Some(as_of)
                        }
                        // One practice's whole list: the type 1 list is as old as its oldest
                        // practice's.
                        (OptOutType::Type1, Some(p)) => {
                            coverage.practice_replaced(p.stored(), as_of)
                        }
                        (OptOutType::Type1, None) => coverage.type1_as_of_ms = Some(as_of),
                    }
                    coverage.version = version.to_string();
                    if let Some(c) = &check {
                        coverage.population_len = c.population.len();
                        meta.insert(K_POPULATION, c.population.to_bytes().as_slice())
                            .map_err(storage)?;
                    }
                    put_coverage(&mut meta, &coverage)?;
                }
                audit.version = version.to_string();
                audit.applied = tally.added + tally.removed;
                let id = audit.part_of.clone().unwrap_or_default();
                let rest = tally.parts(&audit, &key, &id, true);
                write_audit(&txn, CHANGE_AUDIT, &rest)?;
                write_audit(&txn, CHANGE_AUDIT, std::slice::from_ref(&audit))?;
                txn.commit().map_err(storage)?;
                inner.notify(version);
                Ok(ImportOutcome {
                    added: tally.added,
                    removed: tally.removed,
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

/// Numbers an import reads from a table at once, so that what it holds stays bounded.
const PAGE: usize = 65_536;

/// An import being applied in its transaction, a page at a time: the audit parts of its added
/// and removed numbers are written as they fill (the main record, with the counts, last).
struct Apply<'t> {
    txn: &'t WriteTransaction,
    writer: Writer<'t>,
    tally: ImportTally,
    id: String,
    key: &'t AuditKey,
    t: OptOutType,
    /// Type 1: the practice whose list this is (its objections only are replaced).
    practice: Option<&'t Practice>,
}

impl Apply<'_> {
    /// REPLACE: removes the type (type 1: this practice's objection) from every number that was
    /// not staged.
    fn remove_unstaged(
        &mut self,
        table: &mut redb::Table<u64, &[u8]>,
        practices: &mut redb::Table<u64, &str>,
        staging: &redb::Table<u64, ()>,
        main: &AuditRecord,
    ) -> Result<(), StoreError> {
        let mut from = 0u64;
        loop {
            let mut gone = Vec::new();
            let mut last = None;
            for item in table.range(from..).map_err(storage)?.take(PAGE) {
                let (k, v) = item.map_err(storage)?;
                last = Some(k.value());
                if held_types(v.value())?.contains(self.t)
                    && staging.get(k.value()).map_err(storage)?.is_none()
                {
                    gone.push(k.value());
                }
            }
            for n in gone {
                let lost = match self.practice {
                    Some(p) => self.writer.remove_type1(table, practices, n, p)?.1,
                    None => self.writer.remove(table, n, self.t)?,
                };
                if lost {
                    self.tally.remove(NhsNumber::from_stored(n).map_err(|e| {
                        StoreError::Corrupt(format!("stored number invalid: {e}").into())
                    })?);
                }
            }
            self.write_parts(main)?;
            match last {
                Some(n) => from = n + 1,
                None => return Ok(()),
            }
        }
    }

    /// Adds the type (type 1: this practice's objection) to every staged number.
    fn add_staged(
        &mut self,
        table: &mut redb::Table<u64, &[u8]>,
        practices: &mut redb::Table<u64, &str>,
        staging: &redb::Table<u64, ()>,
        main: &AuditRecord,
    ) -> Result<(), StoreError> {
        for (i, item) in staging.iter().map_err(storage)?.enumerate() {
            let (k, _) = item.map_err(storage)?;
            let n = k.value();
            let gained = match self.practice {
                Some(p) => self.writer.add_type1(table, practices, n, p)?.1,
                None => self.writer.add(table, n, self.t)?,
            };
            if gained {
                self.tally.add(NhsNumber::from_stored(n).map_err(|e| {
                    StoreError::Corrupt(format!("staged number invalid: {e}").into())
                })?);
            }
            if i % PAGE == PAGE - 1 {
                self.write_parts(main)?;
            }
        }
        self.write_parts(main)
    }

    /// Writes the audit parts that are full.
    fn write_parts(&mut self, main: &AuditRecord) -> Result<(), StoreError> {
        let parts = self.tally.parts(main, self.key, &self.id, false);
        write_audit(self.txn, CHANGE_AUDIT, &parts)
    }
}
