//! What a store refuses before it writes, the same on every backend: a change or import that
//! names a practice wrongly, an import its coverage mode does not take, an empty REPLACE, a
//! national check older than the one in force.

use super::{ImportMode, NationalCheck, StoreError};
use crate::core::{OptOutType, Practice, coverage::CoverageMode};

/// Whether a change or an import of type `t` names its practice as it must: type 1 always (type 1
/// opt-outs belong to the practice that recorded them), the national type never.
pub fn practice_ok(t: OptOutType, practice: Option<&Practice>) -> Result<(), StoreError> {
    match (t, practice) {
        (OptOutType::Type1, None) => Err(StoreError::ImportRefused(
            "a type 1 opt-out belongs to the GP practice that recorded it: name the practice"
                .into(),
        )),
        (OptOutType::NationalDataOptOut, Some(_)) => Err(StoreError::ImportRefused(
            "a national data opt-out belongs to no practice: leave the practice out".into(),
        )),
        _ => Ok(()),
    }
}

/// Whether a store in `mode` takes an import of type `t`, in `import_mode`, with or without a
/// national check (and with how many patients in it). The store's mode is fixed at
/// initialisation, so this can be decided before the import's lock is taken.
pub fn import_allowed(
    mode: CoverageMode,
    t: OptOutType,
    import_mode: ImportMode,
    check: Option<&NationalCheck>,
) -> Result<(), StoreError> {
    let refused = |m: String| Err(StoreError::ImportRefused(m.into()));
    match check {
        Some(_) if t != OptOutType::NationalDataOptOut || import_mode != ImportMode::Replace => {
            refused(
                "a national check round trip replaces the national data opt-outs: use \
                 --type national (a REPLACE import)"
                    .into(),
            )
        }
        Some(_) if mode != CoverageMode::Population => refused(
            "this store is in list mode (its national list is complete, and a number it does \
             not hold is released): a national check round trip covers only the population \
             sent, so it needs a store initialised in population mode (optout init-store \
             --national-coverage population)"
                .into(),
        ),
        Some(c) if c.population.is_empty() => {
            refused("the national check's population is empty: nothing was checked".into())
        }
        None if mode == CoverageMode::Population
            && t == OptOutType::NationalDataOptOut
            && import_mode == ImportMode::Replace =>
        {
            refused(
                "this store is in population mode: a REPLACE of national data opt-outs must be \
                 a national check round trip (optout admin import --type national \
                 --from-national-check SENT RETURNED), so the population it covers is recorded \
                 with it"
                    .into(),
            )
        }
        _ => Ok(()),
    }
}

/// Refuses a REPLACE import that staged nothing (`empty`): it would remove every opt-out of its
/// type (of its practice, for type 1), and an empty or truncated file must not wipe a list. A
/// national check in which nobody had opted out is a valid empty list: its population says who
/// was checked.
pub fn refuse_empty_replace(
    mode: ImportMode,
    empty: bool,
    check: Option<&NationalCheck>,
    t: OptOutType,
) -> Result<(), StoreError> {
    if mode == ImportMode::Replace && empty && check.is_none() {
        return Err(StoreError::ImportRefused(
            format!(
                "a REPLACE import with no valid numbers would remove every {} opt-out; use \
                 `optout admin remove` (RemoveOptOuts) to remove opt-outs explicitly",
                t.name()
            )
            .into(),
        ));
    }
    Ok(())
}

/// Refuses every call of an import after one of its chunks failed to stage (`failed`): the
/// staged set lacks numbers, and a REPLACE applied without them would remove their opt-outs.
pub fn refuse_after_failed_stage(failed: bool) -> Result<(), StoreError> {
    if failed {
        return Err(StoreError::Unavailable(
            "part of this import could not be staged; nothing was applied, send it again".into(),
        ));
    }
    Ok(())
}

/// Refuses a national check older than the one in force (`in_force_ms`, the national list's
/// date), unless the admin said why: re-importing an old reply would move the list back in time
/// and clear its expiry. Called under the national type's import lock, so no other check can be
/// swapped in between.
pub fn check_not_older(
    check: Option<&NationalCheck>,
    in_force_ms: Option<u64>,
) -> Result<(), StoreError> {
    let (Some(c), Some(in_force)) = (check, in_force_ms) else {
        return Ok(());
    };
    if c.checked_at_ms >= in_force || c.older_reason.is_some() {
        return Ok(());
    }
    let at = |ms: u64| {
        i64::try_from(ms)
            .ok()
            .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
            .map_or_else(|| format!("{ms} ms"), |t| t.to_string())
    };
    Err(StoreError::ImportRefused(
        format!(
            "this national check (checked at {}) is older than the national check in force \
             (checked at {}): importing it would move the list back in time. Nothing was \
             imported. If that is meant, import it with the reason (--allow-older-check REASON, \
             older_check_reason), which is audited",
            at(c.checked_at_ms),
            at(in_force)
        )
        .into(),
    ))
}
