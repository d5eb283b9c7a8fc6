//! A national check round trip received as an import: the population sent to the national
//! service, then the opt-outs (the numbers sent that did not come back), strictly, with the
//! check's date as the national list's date.

use super::{AdminError, Import, now_ms_i64};
use crate::{
    core::{NhsNumber, coverage::Population},
    store::NationalCheck,
};

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

    /// Makes this import a national check round trip: its population is recorded with it, and
    /// the check's date becomes the national list's date.
    pub(super) fn national_check(&mut self, check: NationalCheck) {
        self.check = Some((
            check.population.len(),
            check.checked_at_ms,
            check.older_reason.clone(),
        ));
        self.session.set_national_check(check);
    }
}
