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

/// The (outcome, reason) label pair of each index of [`DecisionCounts`], as metrics name them:
/// the words of [`crate::Decision::outcome`], [`ReleaseReason::name`] and
/// [`WithholdReason::name`] (a unit test holds them equal), so a reason is spelt the same in a
/// metric, a log line, an audit record and the command line.
pub const REASON_LABELS: [(&str, &str); 12] = [
    ("release", ReleaseReason::NoOptOut.name()),
    ("release", ReleaseReason::PurposeExempt.name()),
    ("withhold", WithholdReason::NationalDataOptOut.name()),
    ("withhold", WithholdReason::Type1OptOut.name()),
    ("withhold", WithholdReason::InvalidNhsNumber.name()),
    ("withhold", WithholdReason::StoreUnavailable.name()),
    ("withhold", WithholdReason::StoreRegressed.name()),
    ("withhold", WithholdReason::VersionNotReached.name()),
    ("withhold", WithholdReason::NotInCheckedPopulation.name()),
    ("withhold", WithholdReason::ListTooOld.name()),
    ("withhold", WithholdReason::ListNeverImported.name()),
    // Last, after the withhold reasons that `withheld` reads from index 2.
    (
        "release",
        ReleaseReason::BasisExempt(crate::LegalBasis::Consent).name(),
    ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LegalBasis;

    fn reason_name(d: Decision) -> &'static str {
        match d {
            Decision::Release(r) => r.name(),
            Decision::Withhold(r) => r.name(),
        }
    }

    #[test]
    fn every_decision_is_counted_under_its_own_outcome_and_reason_name() {
        let mut all: Vec<Decision> = WITHHELD.iter().map(|r| Decision::Withhold(*r)).collect();
        all.extend([
            Decision::Release(ReleaseReason::NoOptOut),
            Decision::Release(ReleaseReason::PurposeExempt),
        ]);
        all.extend(
            LegalBasis::EXEMPT
                .iter()
                .map(|b| Decision::Release(ReleaseReason::BasisExempt(*b))),
        );
        let mut seen = std::collections::HashSet::new();
        for d in all {
            let i = reason_index(&d);
            assert_eq!(REASON_LABELS[i], (d.outcome(), reason_name(d)), "{d:?}");
            seen.insert(i);
            let counts = DecisionCounts::of(&[d]);
            let labelled: Vec<_> = counts.labelled().collect();
            assert_eq!(labelled, [(d.outcome(), reason_name(d), 1)], "{d:?}");
        }
        assert_eq!(
            seen.len(),
            REASON_LABELS.len(),
            "every label is some decision's"
        );
    }
}
