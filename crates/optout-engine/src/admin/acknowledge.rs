//! An admin's acknowledgement that a store which went back in time was restored (or its lost
//! changes knowingly given up), so replicas failing closed rebuild from it.

use super::{Admin, AdminError, now_ms_i64};
use crate::core::{AuditRecord, Version, keys::Caller};

impl Admin {
    /// Records that an admin restored the changes a store lost (or knowingly gave them up), so
    /// replicas failing closed rebuild from it. Returns the acknowledgement's id and this
    /// replica's filter version.
    pub async fn acknowledge_regression(
        &self,
        caller: &Caller,
        reason: &str,
    ) -> Result<(String, Version), AdminError> {
        if reason.trim().is_empty() {
            return Err(AdminError::Invalid(
                "reason is required: say what was restored and the incident reference".into(),
            ));
        }
        let record = AuditRecord {
            at_ms: now_ms_i64(),
            organisation: caller.organisation.clone(),
            key_id: caller.key_id.clone(),
            action: "acknowledge-regression".into(),
            source: Some(reason.to_string()),
            version: self.filter.version().to_string(),
            ..AuditRecord::default()
        };
        let id = self.store.acknowledge_regression(&record).await?;
        tracing::warn!(
            organisation = %caller.organisation,
            key = %caller.key_id,
            "store regression acknowledged by an admin; replicas rebuild from the store"
        );
        Ok((id, self.filter.version()))
    }
}
