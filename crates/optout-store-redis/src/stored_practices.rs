//! The type 1 practices of a record as this backend stores them in its value:
//! `recorded_at,source_id` before practices were, `recorded_at,source_id,P1;P2` after.

use optout_core::practice::{self, Practice};

/// The practices of a stored type 1 value.
pub fn of(value: &str) -> Vec<Practice> {
    practice::parse_list(value.splitn(3, ',').nth(2).unwrap_or(""))
}

/// `value` holding `practices` (which must not be empty).
pub fn with(value: &str, practices: &[Practice]) -> String {
    let mut parts = value.splitn(3, ',');
    let at = parts.next().unwrap_or("0");
    let sid = parts.next().unwrap_or("0");
    format!("{at},{sid},{}", practice::join_list(practices))
}
