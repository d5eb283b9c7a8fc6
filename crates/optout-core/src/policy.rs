//! Purpose policy and decisions: which opt-outs apply to an extract, and what each number gets.
//!
//! Pure and the one place for the rule. The gRPC layer converts its enums into these and back.

/// The kinds of opt-out a patient can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OptOutType {
    /// The national data opt-out: no use for research or planning, whoever holds the data.
    NationalDataOptOut,
    /// The GP "type 1" opt-out: identifiable data must not leave the GP practice.
    Type1,
}

impl OptOutType {
    /// Both types, in the order reasons are reported.
    pub const ALL: [OptOutType; 2] = [OptOutType::NationalDataOptOut, OptOutType::Type1];

    /// A stable one-byte code used by the stores.
    pub fn code(self) -> u8 {
        match self {
            OptOutType::NationalDataOptOut => 1,
            OptOutType::Type1 => 2,
        }
    }

    /// The inverse of [`OptOutType::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(OptOutType::NationalDataOptOut),
            2 => Some(OptOutType::Type1),
            _ => None,
        }
    }

    /// A short name for messages and the command line.
    pub fn name(self) -> &'static str {
        match self {
            OptOutType::NationalDataOptOut => "national",
            OptOutType::Type1 => "type1",
        }
    }

    fn bit(self) -> u8 {
        1 << self.code()
    }
}

/// A set of opt-out types (what the store holds for one number).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptOutSet(u8);

impl OptOutSet {
    /// No opt-out.
    pub const EMPTY: OptOutSet = OptOutSet(0);

    /// Adds a type.
    pub fn insert(&mut self, t: OptOutType) {
        self.0 |= t.bit();
    }

    /// Whether the set holds a type.
    pub fn contains(self, t: OptOutType) -> bool {
        self.0 & t.bit() != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The types in the set, in reporting order.
    pub fn iter(self) -> impl Iterator<Item = OptOutType> {
        OptOutType::ALL
            .into_iter()
            .filter(move |t| self.contains(*t))
    }
}

impl FromIterator<OptOutType> for OptOutSet {
    fn from_iter<I: IntoIterator<Item = OptOutType>>(iter: I) -> Self {
        let mut s = OptOutSet::EMPTY;
        for t in iter {
            s.insert(t);
        }
        s
    }
}

/// Why the data is being extracted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// The patient's own care: exempt from opt-outs.
    DirectCare,
    /// Research.
    Research,
    /// Planning.
    Planning,
}

/// Who holds the data being extracted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataOrigin {
    /// Not said: both types apply (the strict reading).
    Unspecified,
    /// A GP practice: type 1 and national data opt-outs apply.
    GpPractice,
    /// Anyone else: national data opt-outs apply.
    Other,
}

/// What the policy makes of a purpose and an origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applicable {
    /// Opt-outs do not apply: every valid number is released.
    Exempt,
    /// These types withhold.
    Types(OptOutSet),
}

/// The purpose policy: which opt-out types withhold data for this purpose and origin.
pub fn applicable(purpose: Purpose, origin: DataOrigin) -> Applicable {
    match purpose {
        Purpose::DirectCare => Applicable::Exempt,
        Purpose::Research | Purpose::Planning => Applicable::Types(match origin {
            DataOrigin::Unspecified | DataOrigin::GpPractice => {
                OptOutType::ALL.into_iter().collect()
            }
            DataOrigin::Other => [OptOutType::NationalDataOptOut].into_iter().collect(),
        }),
    }
}

/// The answer for one number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// The data may be released.
    Release(ReleaseReason),
    /// The data must be withheld.
    Withhold(WithholdReason),
}

/// Why a number may be released.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReleaseReason {
    /// No opt-out that applies.
    NoOptOut,
    /// The purpose is exempt.
    PurposeExempt,
}

/// Why a number is withheld.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WithholdReason {
    /// A national data opt-out applies.
    NationalDataOptOut,
    /// A type 1 opt-out applies.
    Type1OptOut,
    /// Not a valid NHS number.
    InvalidNhsNumber,
    /// The store could not answer in time, or freshness could not be proven.
    StoreUnavailable,
    /// The store went back in time (lost acknowledged changes): withheld until an admin
    /// acknowledges it.
    StoreRegressed,
    /// The caller's `at_least_version` is beyond anything the store holds.
    VersionNotReached,
}

/// The decision for a valid number given the opt-outs the store holds for it.
pub fn decide(applicable: Applicable, held: OptOutSet) -> Decision {
    match applicable {
        Applicable::Exempt => Decision::Release(ReleaseReason::PurposeExempt),
        Applicable::Types(types) => {
            match OptOutType::ALL
                .into_iter()
                .find(|t| types.contains(*t) && held.contains(*t))
            {
                Some(OptOutType::NationalDataOptOut) => {
                    Decision::Withhold(WithholdReason::NationalDataOptOut)
                }
                Some(OptOutType::Type1) => Decision::Withhold(WithholdReason::Type1OptOut),
                None => Decision::Release(ReleaseReason::NoOptOut),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OptOutType::*;

    fn set(types: &[OptOutType]) -> OptOutSet {
        types.iter().copied().collect()
    }

    #[test]
    fn direct_care_is_exempt_whatever_the_origin_or_opt_outs() {
        for origin in [
            DataOrigin::Unspecified,
            DataOrigin::GpPractice,
            DataOrigin::Other,
        ] {
            let a = applicable(Purpose::DirectCare, origin);
            assert_eq!(a, Applicable::Exempt);
            assert_eq!(
                decide(a, set(&[NationalDataOptOut, Type1])),
                Decision::Release(ReleaseReason::PurposeExempt)
            );
        }
    }

    #[test]
    fn gp_and_unspecified_origins_apply_both_types() {
        for purpose in [Purpose::Research, Purpose::Planning] {
            for origin in [DataOrigin::GpPractice, DataOrigin::Unspecified] {
                let a = applicable(purpose, origin);
                assert_eq!(
                    decide(a, set(&[Type1])),
                    Decision::Withhold(WithholdReason::Type1OptOut)
                );
                assert_eq!(
                    decide(a, set(&[NationalDataOptOut])),
                    Decision::Withhold(WithholdReason::NationalDataOptOut)
                );
                assert_eq!(
                    decide(a, set(&[NationalDataOptOut, Type1])),
                    Decision::Withhold(WithholdReason::NationalDataOptOut)
                );
                assert_eq!(
                    decide(a, OptOutSet::EMPTY),
                    Decision::Release(ReleaseReason::NoOptOut)
                );
            }
        }
    }

    #[test]
    fn other_origins_apply_only_the_national_opt_out() {
        let a = applicable(Purpose::Research, DataOrigin::Other);
        assert_eq!(
            decide(a, set(&[Type1])),
            Decision::Release(ReleaseReason::NoOptOut)
        );
        assert_eq!(
            decide(a, set(&[NationalDataOptOut, Type1])),
            Decision::Withhold(WithholdReason::NationalDataOptOut)
        );
    }

    #[test]
    fn type_codes_round_trip() {
        for t in OptOutType::ALL {
            assert_eq!(OptOutType::from_code(t.code()), Some(t));
        }
        assert_eq!(OptOutType::from_code(0), None);
    }
}
