//! Reading both audit trails (the changes trail in the store, this replica's check log), and
//! recording every admin read in the changes trail first.

use super::{Admin, AdminError, now_ms_i64};
use crate::core::{AuditQuery, AuditRecord, NhsNumber, keys::Caller};

/// Which audit records to read; `number` is digested under the audit key, never stored.
pub struct AuditSearch {
    /// From, ms since the Unix epoch (0: the beginning).
    pub from_ms: i64,
    /// To, ms since the Unix epoch (0: now).
    pub to_ms: i64,
    /// Only this organisation.
    pub organisation: Option<String>,
    /// Only this extract.
    pub extract_id: Option<String>,
    /// Only records about this patient.
    pub number: Option<NhsNumber>,
    /// Most records returned.
    pub limit: usize,
}

impl Admin {
    /// Audit records of both trails, oldest first. The read is recorded first, with the digest of
    /// the patient asked about, if any.
    pub async fn read_audit(
        &self,
        caller: &Caller,
        search: AuditSearch,
    ) -> Result<Vec<AuditRecord>, AdminError> {
        self.record_access(caller, "read-audit", search.number)
            .await?;
        let query = AuditQuery {
            from_ms: search.from_ms,
            to_ms: search.to_ms,
            organisation: search.organisation,
            extract_id: search.extract_id,
            digest: search.number.map(|n| self.audit_key.lookup(n)),
            action: None,
            limit: search.limit,
        };
        let mut records = self.store.read_audit(&query).await?;
        if let Some(files) = &self.check_files {
            // This replica's check log; other replicas' are read where they are shipped to.
            records.extend(files.read(query.clone()).await?);
            records.sort_by_key(|r| r.at_ms);
            records.truncate(query.limit.max(1));
        }
        Ok(records)
    }

    /// Writes the record of an admin's read to the changes trail.
    pub(super) async fn record_access(
        &self,
        caller: &Caller,
        action: &str,
        about: Option<NhsNumber>,
    ) -> Result<(), AdminError> {
        let record = AuditRecord {
            at_ms: now_ms_i64(),
            organisation: caller.organisation.clone(),
            key_id: caller.key_id.clone(),
            action: action.into(),
            count: u64::from(about.is_some()),
            digests: self.audit_key.digests(about),
            version: self.filter.version().to_string(),
            ..AuditRecord::default()
        };
        Ok(self.store.record_access(&record).await?)
    }
}
