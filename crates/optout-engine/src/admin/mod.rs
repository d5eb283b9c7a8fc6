//! Admin use cases, free of any transport, one module each: `change` (add or remove opt-outs),
//! `import` (a whole list, staged and swapped in) and `national_check` (a national check round
//! trip received as an import), `get` (one patient's opt-outs), `audit` (reading both trails),
//! `status`, and `acknowledge` (a store that went back in time). Each change is audited with
//! the organisation and key that made it, in the same store transaction as the change (no record,
//! no change), and waits briefly for this replica's filter to show it (read-your-writes). Every
//! use case fails with the engine's one error type, [`AdminError`], whose [`ErrorKind`] the api
//! maps to a status.

mod acknowledge;
mod audit;
mod change;
mod get;
mod import;
mod national_check;
mod status;

use std::{sync::Arc, time::Duration};

pub use audit::AuditSearch;
pub use import::Import;
pub use status::Status;

use super::{check_files::CheckFiles, filter::SyncedFilter};
pub use crate::store::{ChangeKind, ImportMode};
use crate::{
    core::{AuditKey, AuditRecord, OptOutType, Practice, keys::Caller},
    store::{ConsentStore, StoreError, now_ms},
};

/// How long an admin write waits for this replica's filter to show it before answering (the write
/// is durable either way; the wait gives the caller read-your-writes on this replica).
const APPLY_WAIT: Duration = Duration::from_secs(1);

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
