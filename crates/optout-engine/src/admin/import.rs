//! An import: a whole list (MERGE or REPLACE) received in parts, staged, and applied atomically
//! with its audit record. Nothing is visible until the commit; dropping it changes nothing.

use super::{APPLY_WAIT, Admin, AdminError, ImportMode, change_record, practice_named};
use crate::{
    core::{NhsNumber, NhsNumberError, OptOutType, Practice, keys::Caller},
    store::{ImportOutcome, ImportSession, NationalCheck},
};

/// How many valid numbers an import stages per store call: 8 bytes a number held, twice while a
/// chunk is written and the next received (16 MiB). Each store does better with more at once:
/// Redis shares a multi-field HSET between the chunk's numbers in one bucket (15 a command at a
/// million, 1.4 at 50,000), the embedded store writes each B-tree page once a chunk. Seeding 5 M:
/// 255 against 532-571 k/s on Redis, 143 against 592 k/s embedded, peak RSS lower on both.
const STAGE_CHUNK: usize = 1_000_000;

impl Admin {
    /// Starts an import: numbers are staged as they come, and nothing is visible until
    /// [`Import::commit`]. Dropping the import changes nothing.
    pub async fn start_import(
        &self,
        caller: &Caller,
        mode: ImportMode,
        (t, practice): (OptOutType, Option<&Practice>),
        source: &str,
    ) -> Result<Import, AdminError> {
        practice_named(t, practice)?;
        let session = self.store.begin_import(mode, t, practice, source).await?;
        Ok(Import {
            admin: self.clone(),
            caller: caller.clone(),
            mode,
            t,
            practice: practice.cloned(),
            source: source.to_string(),
            session,
            pending: Vec::with_capacity(STAGE_CHUNK),
            check: None,
            building: None,
            received: 0,
            sent: 0,
        })
    }
}

/// An import under way.
pub struct Import {
    pub(super) admin: Admin,
    pub(super) caller: Caller,
    pub(super) mode: ImportMode,
    pub(super) t: OptOutType,
    pub(super) source: String,
    pub(super) session: Box<dyn ImportSession>,
    pub(super) pending: Vec<NhsNumber>,
    /// Type 1: the practice whose list this is.
    pub(super) practice: Option<Practice>,
    /// Set for a national check round trip: (patients sent, when checked, why an older check
    /// is imported), for the record.
    pub(super) check: Option<(u64, u64, Option<String>)>,
    /// A national check round trip being received: the population sent so far.
    pub(super) building: Option<NationalCheck>,
    /// Numbers received so far (valid or not): the position of the next one.
    pub(super) received: u64,
    /// Population numbers received so far.
    pub(super) sent: u64,
}

impl Import {
    /// Receives opt-outs as sent: valid numbers are staged, and an invalid one is skipped and
    /// passed to `rejected` with its position, except in a national check, which holds only
    /// valid numbers of the population sent before them (a national check's opt-outs are the
    /// numbers sent that did not come back).
    pub async fn receive(
        &mut self,
        numbers: &[String],
        rejected: &mut (dyn FnMut(u64, NhsNumberError) + Send),
    ) -> Result<(), AdminError> {
        let mut valid = Vec::with_capacity(numbers.len());
        for s in numbers {
            let position = self.received;
            match (NhsNumber::parse(s), &self.building) {
                (Ok(n), Some(c)) if !c.population.contains(n) => {
                    return Err(AdminError::Invalid(format!(
                        "nhs_numbers position {position}: not in the population sent before it; \
                         a national check's opt-outs are the numbers sent that did not come \
                         back. Nothing was imported"
                    )));
                }
                (Ok(n), _) => valid.push(n),
                (Err(e), Some(_)) => {
                    return Err(AdminError::Invalid(format!(
                        "nhs_numbers position {position}: {e}; a national check holds only valid \
                         numbers. Nothing was imported"
                    )));
                }
                (Err(e), None) => rejected(position, e),
            }
            self.received += 1;
        }
        self.stage(valid).await
    }

    /// Numbers received so far, valid or not.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Stages valid numbers (duplicates are fine).
    pub async fn stage(
        &mut self,
        numbers: impl IntoIterator<Item = NhsNumber>,
    ) -> Result<(), AdminError> {
        self.pending.extend(numbers);
        if self.pending.len() >= STAGE_CHUNK {
            let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(STAGE_CHUNK));
            self.session.stage(chunk).await?;
        }
        Ok(())
    }

    /// Applies the staged set atomically with its audit record (with the national check being
    /// received, if any; `rejected`: the invalid numbers skipped), and waits a moment for this
    /// replica's filter to show it.
    pub async fn commit(mut self, rejected: u64) -> Result<ImportOutcome, AdminError> {
        let received = self.received;
        if let Some(check) = self.building.take() {
            self.national_check(check);
        }
        if !self.pending.is_empty() {
            self.session
                .stage(std::mem::take(&mut self.pending))
                .await?;
        }
        let action = match self.mode {
            ImportMode::Merge => "import-merge",
            ImportMode::Replace => "import-replace",
        };
        let mut audit = change_record(&self.caller, action, self.t, &self.source, received);
        audit.practice = self.practice.as_ref().map(|p| p.name().to_string());
        if let Some((population, checked_at_ms, older)) = self.check.take() {
            audit.population = Some(population);
            audit.checked_at_ms = Some(checked_at_ms);
            audit.override_reason = older;
        }
        let outcome = self.session.commit(audit, &self.admin.audit_key).await?;
        crate::release_freed_memory();
        tracing::info!(
            mode = ?self.mode,
            opt_out = self.t.name(),
            practice = self.practice.as_ref().map(Practice::name),
            source = self.source,
            received,
            rejected,
            added = outcome.added,
            removed = outcome.removed,
            version = %outcome.version,
            "opt-outs imported"
        );
        self.admin
            .filter
            .wait_for_version(outcome.version, APPLY_WAIT)
            .await;
        Ok(outcome)
    }
}
