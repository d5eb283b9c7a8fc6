//! Admin operations, free of any transport: opt-out changes, imports, look-ups, the audit trail,
//! status, and acknowledging a store that went back in time. Each change is audited with the
//! organisation and key that made it, in the same store transaction as the change (no record, no
//! change), and waits briefly for this replica's filter to show it (read-your-writes).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    check_files::CheckFiles,
    filter::{SyncStatus, SyncedFilter},
};
use crate::{
    auth::Caller,
    core::{
        AuditKey, AuditQuery, AuditRecord, NhsNumber, NhsNumberError, OptOutType, Practice,
        Version, coverage::Population,
    },
    store::{
        ConsentStore, ImportOutcome, ImportSession, NationalCheck, OptOutRecord, StoreError,
        StoreStatus, WriteOutcome, now_ms,
    },
};

/// How many valid numbers an import stages per store call.
const STAGE_CHUNK: usize = 50_000;
/// How long an admin write waits for this replica's filter to show it before answering (the write
/// is durable either way; the wait gives the caller read-your-writes on this replica).
const APPLY_WAIT: Duration = Duration::from_secs(1);

pub use crate::store::{ChangeKind, ImportMode};

/// Why an admin operation was not done: the engine's one error type. The api maps its
/// [`AdminError::kind`] to a status, and needs no store type to do it.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request cannot be carried out as asked; nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// The store refused or failed (its error keeps the cause underneath, for the logs).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What kind of failure an [`AdminError`] is, for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong as sent.
    Invalid,
    /// The request cannot be carried out in the state the store is in (an import refused, a
    /// store not initialised); nothing changed.
    Refused,
    /// Another change of the same numbers or an import is under way: nothing changed, retry.
    /// A definite answer, where `Unavailable` may hide a change that was applied.
    Busy,
    /// The store could not be asked, or could not confirm (a change may have been applied).
    Unavailable,
    /// The store holds what it cannot have written.
    Corrupt,
}

impl AdminError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AdminError::Invalid(_) => ErrorKind::Invalid,
            AdminError::Store(e) => match e {
                StoreError::NotInitialised(_) | StoreError::ImportRefused(_) => ErrorKind::Refused,
                StoreError::Busy(_) => ErrorKind::Busy,
                StoreError::Corrupt(_) => ErrorKind::Corrupt,
                StoreError::Unavailable(_)
                | StoreError::Unsafe(_)
                | StoreError::Unconfirmed(_)
                | StoreError::Regressed(_) => ErrorKind::Unavailable,
            },
        }
    }

    /// What to tell the caller.
    pub fn message(&self) -> String {
        match self {
            AdminError::Invalid(m) => m.clone(),
            AdminError::Store(e) => e.message().to_string(),
        }
    }
}

/// The admin engine of one replica.
#[derive(Clone)]
pub struct Admin {
    store: Arc<dyn ConsentStore>,
    filter: Arc<SyncedFilter>,
    audit_key: AuditKey,
    /// This replica's check log on disk, when checks are recorded there.
    check_files: Option<CheckFiles>,
}

/// What `status` reports: the store's counts and the filter's state.
pub struct Status {
    /// The store's counts, version and dataset.
    pub store: StoreStatus,
    /// Which store ("embedded", "redis").
    pub store_kind: &'static str,
    /// This replica's filter.
    pub filter: SyncStatus,
}

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
    /// Admin over a store and this replica's filter; changes are audited under `audit_key`.
    pub fn new(
        store: Arc<dyn ConsentStore>,
        filter: Arc<SyncedFilter>,
        audit_key: AuditKey,
        check_files: Option<CheckFiles>,
    ) -> Self {
        Admin {
            store,
            filter,
            audit_key,
            check_files,
        }
    }

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

    /// The opt-outs recorded for one number. The look-up is recorded first (who looked up which
    /// patient, by digest): if it cannot be recorded, nothing is shown.
    pub async fn get(
        &self,
        caller: &Caller,
        n: NhsNumber,
    ) -> Result<(Vec<OptOutRecord>, Version), AdminError> {
        self.record_access(caller, "get", Some(n)).await?;
        Ok(self.store.get(n).await?)
    }

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
            digest: search.number.map(|n| self.audit_key.digest(n)),
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
    async fn record_access(
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

    /// The store's counts and this replica's filter.
    pub async fn status(&self) -> Result<Status, AdminError> {
        Ok(Status {
            store: self.store.status().await?,
            store_kind: self.store.kind(),
            filter: self.filter.status(),
        })
    }

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

/// An import under way.
pub struct Import {
    admin: Admin,
    caller: Caller,
    mode: ImportMode,
    t: OptOutType,
    source: String,
    session: Box<dyn ImportSession>,
    pending: Vec<NhsNumber>,
    /// Type 1: the practice whose list this is.
    practice: Option<Practice>,
    /// Set for a national check round trip: (patients sent, when checked, why an older check
    /// is imported), for the record.
    check: Option<(u64, u64, Option<String>)>,
    /// A national check round trip being received: the population sent so far.
    building: Option<NationalCheck>,
    /// Numbers received so far (valid or not): the position of the next one.
    received: u64,
    /// Population numbers received so far.
    sent: u64,
}

impl Import {
    /// Opens a national check round trip (a REPLACE of national opt-outs on a store in
    /// population mode): the population is received with the opt-outs, before them, and the
    /// check's date, `checked_at_ms`, becomes the list's date. A date in the future (beyond a
    /// minute of clock difference) is refused.
    pub fn open_national_check(
        &mut self,
        checked_at_ms: i64,
        older_reason: Option<String>,
    ) -> Result<(), AdminError> {
        let now = now_ms_i64();
        if checked_at_ms <= 0 || checked_at_ms > now.saturating_add(60_000) {
            return Err(AdminError::Invalid(format!(
                "national_checked_at_unix_ms {checked_at_ms} is not a time in the past: give when \
                 the national check was made. Nothing was imported"
            )));
        }
        self.building = Some(NationalCheck {
            population: Population::new(),
            checked_at_ms: u64::try_from(checked_at_ms).unwrap_or(0),
            older_reason,
        });
        Ok(())
    }

    /// Adds population numbers to the national check being received, strictly: the national
    /// service refuses a whole file for one invalid number, so a population with one was never
    /// checked.
    pub fn add_population(&mut self, numbers: &[String]) -> Result<(), AdminError> {
        let Some(check) = &mut self.building else {
            if numbers.is_empty() {
                return Ok(());
            }
            return Err(AdminError::Invalid(
                "population is set, but the first message did not open a national check \
                 (national_checked_at_unix_ms). Nothing was imported"
                    .into(),
            ));
        };
        for s in numbers {
            let n = NhsNumber::parse(s).map_err(|e| {
                AdminError::Invalid(format!(
                    "population position {}: {e}; the national service refuses a file with an \
                     invalid number, so it was never checked. Nothing was imported",
                    self.sent
                ))
            })?;
            check.population.insert(n);
            self.sent += 1;
        }
        Ok(())
    }

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

    /// Makes this import a national check round trip: its population is recorded with it, and
    /// the check's date becomes the national list's date.
    fn national_check(&mut self, check: NationalCheck) {
        self.check = Some((
            check.population.len(),
            check.checked_at_ms,
            check.older_reason.clone(),
        ));
        self.session.set_national_check(check);
    }

    /// Stages valid numbers (duplicates are fine).
    pub async fn stage(
        &mut self,
        numbers: impl IntoIterator<Item = NhsNumber>,
    ) -> Result<(), AdminError> {
        self.pending.extend(numbers);
        if self.pending.len() >= STAGE_CHUNK {
            self.session.stage(&self.pending).await?;
            self.pending.clear();
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
            self.session.stage(&self.pending).await?;
            self.pending = Vec::new();
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
        super::release_freed_memory();
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

/// A type 1 change or import names its practice, a national one none (the store's rule, asked
/// before the store is: a request that breaks it is invalid as sent). Whether the unknown practice
/// may be named is the parse's (`Practice::parse`): only removals may.
fn practice_named(t: OptOutType, practice: Option<&Practice>) -> Result<(), AdminError> {
    crate::store::practice_ok(t, practice).map_err(|e| AdminError::Invalid(e.message().into()))
}

/// The audit record of an admin change, before the store fills in what it changed.
fn change_record(
    caller: &Caller,
    action: &str,
    t: OptOutType,
    source: &str,
    count: u64,
) -> AuditRecord {
    AuditRecord {
        at_ms: now_ms_i64(),
        organisation: caller.organisation.clone(),
        key_id: caller.key_id.clone(),
        action: action.into(),
        opt_out_type: Some(t.name().into()),
        source: Some(source.into()),
        count,
        ..AuditRecord::default()
    }
}

fn now_ms_i64() -> i64 {
    i64::try_from(now_ms()).unwrap_or(i64::MAX)
}
