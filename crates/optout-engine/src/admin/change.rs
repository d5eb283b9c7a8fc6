//! Adding or removing one opt-out type for a list of numbers.

use std::time::Instant;

use super::{APPLY_WAIT, Admin, AdminError, ChangeKind, change_record, practice_named};
use crate::{
    core::{AuditRecord, NhsNumber, OptOutType, Practice, keys::Caller},
    store::WriteOutcome,
};

impl Admin {
    /// Adds or removes one type for every number, with its audit record, and waits (until
    /// `deadline`, at most a second) for this replica's filter to show it.
    pub async fn change(
        &self,
        caller: &Caller,
        kind: ChangeKind,
        (t, practice): (OptOutType, Option<&Practice>),
        numbers: &[NhsNumber],
        source: &str,
        deadline: Instant,
    ) -> Result<WriteOutcome, AdminError> {
        if numbers.is_empty() {
            return Err(AdminError::Invalid(
                "nhs_numbers is empty: nothing to change".into(),
            ));
        }
        practice_named(t, practice)?;
        let action = match kind {
            ChangeKind::Add => "add",
            ChangeKind::Remove => "remove",
        };
        let audit = AuditRecord {
            digests: self.audit_key.digests(numbers.iter().copied()),
            practice: practice.map(|p| p.name().to_string()),
            ..change_record(caller, action, t, source, numbers.len() as u64)
        };
        // No deadline on the write itself: once sent to the store it either commits or fails,
        // and cutting it off would leave the caller unsure which. The audit record is written in
        // the same transaction: no record, no change.
        let outcome = self
            .store
            .change(kind, t, practice, numbers, source, &audit)
            .await?;
        tracing::info!(
            action = ?kind,
            opt_out = t.name(),
            practice = practice.map(Practice::name),
            source,
            count = numbers.len(),
            applied = outcome.applied,
            version = %outcome.version,
            "opt-outs changed"
        );
        let wait = APPLY_WAIT.min(deadline.saturating_duration_since(Instant::now()));
        self.filter.wait_for_version(outcome.version, wait).await;
        Ok(outcome)
    }
}
