//! How many decisions of a batch fell on each outcome and reason, counted once per batch for the
//! metrics and the audit record; and the label each pair carries in metrics.

use crate::{Decision, ReleaseReason, WithholdReason};

/// How many decisions of one batch fell on each outcome and reason: counted once per batch, for
/// both the metrics and the audit record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionCounts([u64; REASON_LABELS.len()]);

impl DecisionCounts {
    /// The counts of a whole batch.
    pub fn of(decisions: &[Decision]) -> Self {
        let mut c = DecisionCounts::default();
        for d in decisions {
            c.add(d);
        }
        c
    }

    /// Counts one decision.
    #[inline]
    pub fn add(&mut self, d: &Decision) {
        self.0[reason_index(d)] += 1;
    }

    /// The withheld numbers by reason, for reasons that occurred.
    pub fn withheld(&self) -> impl Iterator<Item = (WithholdReason, u64)> + '_ {
        WITHHELD
            .iter()
            .zip(&self.0[2..2 + WITHHELD.len()])
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| (*r, *n))
    }

    /// Each (outcome, reason) label pair that occurred, with its count.
    pub fn labelled(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        self.0
            .iter()
            .zip(REASON_LABELS)
            .filter(|(n, _)| **n > 0)
            .map(|(n, (outcome, reason))| (outcome, reason, *n))
    }
}

/// The withhold reasons in the order of indices 2.. of [`REASON_LABELS`].
const WITHHELD: [WithholdReason; 9] = [
    WithholdReason::NationalDataOptOut,
    WithholdReason::Type1OptOut,
    WithholdReason::InvalidNhsNumber,
    WithholdReason::StoreUnavailable,
    WithholdReason::StoreRegressed,
    WithholdReason::VersionNotReached,
    WithholdReason::NotInCheckedPopulation,
    WithholdReason::ListTooOld,
    WithholdReason::ListNeverImported,
];

/// The (outcome, reason) label pair of each index of [`DecisionCounts`], as metrics name them.
pub const REASON_LABELS: [(&str, &str); 12] = [
    ("release", "no_opt_out"),
    ("release", "purpose_exempt"),
    ("withhold", "national_data_opt_out"),
    ("withhold", "type1_opt_out"),
    ("withhold", "invalid_nhs_number"),
    ("withhold", "store_unavailable"),
    ("withhold", "store_regressed"),
    ("withhold", "version_not_reached"),
    ("withhold", "not_in_checked_population"),
    ("withhold", "list_too_old"),
    ("withhold", "list_never_imported"),
    // Last, after the withhold reasons that `withheld` reads from index 2.
    ("release", "basis_exempt"),
];

fn reason_index(d: &Decision) -> usize {
    match d {
        Decision::Release(ReleaseReason::NoOptOut) => 0,
        Decision::Release(ReleaseReason::PurposeExempt) => 1,
        Decision::Withhold(WithholdReason::NationalDataOptOut) => 2,
        Decision::Withhold(WithholdReason::Type1OptOut) => 3,
        Decision::Withhold(WithholdReason::InvalidNhsNumber) => 4,
        Decision::Withhold(WithholdReason::StoreUnavailable) => 5,
        Decision::Withhold(WithholdReason::StoreRegressed) => 6,
        Decision::Withhold(WithholdReason::VersionNotReached) => 7,
        Decision::Withhold(WithholdReason::NotInCheckedPopulation) => 8,
        Decision::Withhold(WithholdReason::ListTooOld) => 9,
        Decision::Withhold(WithholdReason::ListNeverImported) => 10,
        Decision::Release(ReleaseReason::BasisExempt(_)) => 11,
    }
}
