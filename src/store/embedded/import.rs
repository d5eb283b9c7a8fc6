//! Imports staged in their own table, applied in one durable transaction.

use super::*;

/// An import staged in its own table. Staging commits are not fsynced (`Durability::None`): a
/// crash loses the staging table, which is what an interrupted import should do anyway. The final
/// apply is one durable transaction.
pub(super) struct EmbeddedImport {
    pub(super) store: EmbeddedStore,
    pub(super) table: String,
    pub(super) mode: ImportMode,
    pub(super) opt_out: OptOutType,
    pub(super) source: String,
    pub(super) committed: bool,
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
                        ).into()));
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
                                StoreError::Corrupt(format!("staged number invalid: {e}").into())
                            })?);
                        }
                    }
                }
                txn.delete_table(staging_def).map_err(storage)?;
                let version = writer.finish(&added, removed, inner.change_log_len)?;
                audit.version = version.to_string();
                audit.applied = added.len() as u64 + removed;
                write_import_audit(&txn, &mut audit, &key, &added, &removed_numbers)?;
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

/// The main record of an import (the counts) and, in the same transaction, the digests of the
/// numbers it added and removed in bounded parts that name it.
fn write_import_audit(
    txn: &WriteTransaction,
    audit: &mut AuditRecord,
    key: &AuditKey,
    added: &[NhsNumber],
    removed: &[NhsNumber],
) -> Result<(), StoreError> {
    let id = crate::store::random_hex::<8>();
    audit.part_of = Some(id.clone());
    write_audit(txn, CHANGE_AUDIT, std::slice::from_ref(audit))?;
    for part in audit
        .import_parts(key, added, &id)
        .chain(audit.import_parts(key, removed, &id))
    {
        write_audit(txn, CHANGE_AUDIT, std::slice::from_ref(&part))?;
    }
    Ok(())
}
