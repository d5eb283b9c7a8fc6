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

    /// Its name wherever a person or a script reads or writes it: the command line's `--type`,
    /// every command's output, log fields, metric labels and audit records (`national`,
    /// `type-1`). The one spelling; the API's is `OPT_OUT_TYPE_TYPE_1`, Rust's `Type1`.
    pub const fn name(self) -> &'static str {
        match self {
            OptOutType::NationalDataOptOut => "national",
            OptOutType::Type1 => "type-1",
        }
    }

    /// The type a name stands for: [`OptOutType::name`], or a spelling that older audit records
    /// and scripts hold (`type1`, `Type1`, `NationalDataOptOut`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "national" | "NationalDataOptOut" | "national-data-opt-out" => {
                Some(OptOutType::NationalDataOptOut)
            }
            "type-1" | "type1" | "Type1" => Some(OptOutType::Type1),
            _ => None,
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
    /// Every type (a unit test holds it to [`OptOutType::ALL`]).
    pub const ALL: OptOutSet = OptOutSet(0b110);

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

    /// The types in both sets.
    pub fn intersection(self, other: OptOutSet) -> OptOutSet {
        OptOutSet(self.0 & other.0)
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

impl Purpose {
    /// Every purpose.
    pub const ALL: [Purpose; 3] = [Purpose::DirectCare, Purpose::Research, Purpose::Planning];

    /// What a key may claim when its keys-file entry lists no purposes: research and planning.
    /// Direct care releases every valid number, so it is granted only by name.
    pub const DEFAULT_GRANTED: [Purpose; 2] = [Purpose::Research, Purpose::Planning];

    /// The inverse of [`Purpose::name`].
    pub fn parse(name: &str) -> Option<Purpose> {
        Purpose::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The name on the command line and in audit records.
    pub fn name(self) -> &'static str {
        match self {
            Purpose::DirectCare => "direct-care",
            Purpose::Research => "research",
            Purpose::Planning => "planning",
        }
    }
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

impl DataOrigin {
    /// The name on the command line and in audit records.
    pub fn name(self) -> &'static str {
        match self {
            DataOrigin::Unspecified => "unspecified",
            DataOrigin::GpPractice => "gp-practice",
            DataOrigin::Other => "other",
        }
    }
}

/// The legal basis an extract for research or planning relies on. The national data opt-out does
/// not apply under the exempt ones (National Data Opt-out Operational Policy Guidance, "when the
/// opt-out does not apply" and the specific exemptions of its chapter 7); the type 1 opt-out, an
/// objection recorded at the GP practice, is lifted by only two of them (see
/// [`LegalBasis::lifts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LegalBasis {
    /// None claimed: the opt-outs apply.
    None,
    /// The patient's explicit consent to this use.
    Consent,
    /// A legal requirement: a statute (a direction under the Health and Social Care Act 2012,
    /// s254/s259) or a court order. Type 1 stands: it exists to keep GP data in the practice in
    /// exactly these collections.
    LegalRequirement,
    /// An overriding public interest.
    PublicInterest,
    /// The data is anonymised in line with the ICO code of practice.
    Anonymised,
    /// An approval under section 251 whose Confidentiality Advisory Group decision expressly sets
    /// the national data opt-out aside. CAG's standard condition is that the opt-out *applies*; a
    /// section 251 approval alone is not this basis. Wire value of the former `section-251`.
    CagOptOutSetAside,
    /// Communicable disease and other risks to public health (regulation 3 of the Health Service
    /// (Control of Patient Information) Regulations 2002).
    PublicHealth,
    /// Non-contracted activity invoice validation, a specific exemption of the guidance.
    InvoiceValidation,
    /// Data for the Office for National Statistics to produce official statistics (Statistics
    /// and Registration Service Act 2007), a specific exemption of the guidance.
    OfficialStatistics,
    /// A direction that explicitly sets type 1 objections aside (NHS England has directed this
    /// for named collections, such as pandemic planning). The one basis besides consent that lifts
    /// type 1; granted to a key separately from `legal-requirement`.
    DirectionType1SetAside,
}

impl LegalBasis {
    /// Every basis that lifts an opt-out.
    pub const EXEMPT: [LegalBasis; 9] = [
        LegalBasis::Consent,
        LegalBasis::LegalRequirement,
        LegalBasis::PublicInterest,
        LegalBasis::Anonymised,
        LegalBasis::CagOptOutSetAside,
        LegalBasis::PublicHealth,
        LegalBasis::InvoiceValidation,
        LegalBasis::OfficialStatistics,
        LegalBasis::DirectionType1SetAside,
    ];

    /// The name used in keys files, the command line and audit records.
    pub fn name(self) -> &'static str {
        match self {
            LegalBasis::None => "none",
            LegalBasis::Consent => "consent",
            LegalBasis::LegalRequirement => "legal-requirement",
            LegalBasis::PublicInterest => "public-interest",
            LegalBasis::Anonymised => "anonymised",
            LegalBasis::CagOptOutSetAside => "cag-opt-out-set-aside",
            LegalBasis::PublicHealth => "public-health",
            LegalBasis::InvoiceValidation => "invoice-validation",
            LegalBasis::OfficialStatistics => "official-statistics",
            LegalBasis::DirectionType1SetAside => "direction-type-1-set-aside",
        }
    }

    /// The inverse of [`LegalBasis::name`].
    pub fn parse(name: &str) -> Option<LegalBasis> {
        [LegalBasis::None]
            .into_iter()
            .chain(LegalBasis::EXEMPT)
            .find(|b| b.name() == name)
    }

    /// What `basis_reference` must name under this basis, for messages.
    pub fn reference_hint(self) -> &'static str {
        match self {
            LegalBasis::None => "nothing",
            LegalBasis::Consent => "the consent study or record",
            LegalBasis::LegalRequirement => "the statute, direction or court order",
            LegalBasis::PublicInterest => "the public interest decision",
            LegalBasis::Anonymised => "the anonymisation assessment",
            LegalBasis::CagOptOutSetAside => {
                "the CAG approval that sets the opt-out aside, by its reference (such as 19/CAG/0123)"
            }
            LegalBasis::PublicHealth => "the regulation 3 notice or the UKHSA request",
            LegalBasis::InvoiceValidation => "the CAG approval of the invoice validation flow",
            LegalBasis::OfficialStatistics => "the ONS data request or agreement",
            LegalBasis::DirectionType1SetAside => {
                "the direction that sets type 1 aside, by its name and date"
            }
        }
    }

    /// What is wrong with `reference` for this basis, if anything: every exempt basis needs one,
    /// and a CAG basis one that names the approval (it contains "CAG").
    pub fn reference_problem(self, reference: &str) -> Option<String> {
        if self == LegalBasis::None {
            return None;
        }
        let r = reference.trim();
        if r.is_empty() {
            return Some(format!(
                "legal_basis {}: basis_reference is required ({})",
                self.name(),
                self.reference_hint()
            ));
        }
        if matches!(
            self,
            LegalBasis::CagOptOutSetAside | LegalBasis::InvoiceValidation
        ) && !r.to_ascii_uppercase().contains("CAG")
        {
            return Some(format!(
                "legal_basis {}: basis_reference {r:?} is not a CAG approval reference ({})",
                self.name(),
                self.reference_hint()
            ));
        }
        None
    }

    /// Whether this basis lifts opt-outs of type `t`. The national data opt-out: every exempt
    /// basis. The type 1 opt-out only for the patient's own consent (it supersedes their general
    /// objection for this use) and a direction that expressly sets type 1 aside. A legal
    /// requirement alone does not: type 1 objections exist to keep GP data in the practice in
    /// the collections the law mandates (Health and Social Care Act 2012, s259). Under every
    /// other basis a GP practice's type 1 objections stand. Where guidance leaves room, the
    /// narrower reading is taken: a wrongly withheld row costs one row, a wrongly released one
    /// breaks a choice.
    pub fn lifts(self, t: OptOutType) -> bool {
        match (self, t) {
            (LegalBasis::None, _) => false,
            (_, OptOutType::NationalDataOptOut) => true,
            (LegalBasis::Consent | LegalBasis::DirectionType1SetAside, OptOutType::Type1) => true,
            (_, OptOutType::Type1) => false,
        }
    }
}

/// What the policy makes of a purpose, an origin and a legal basis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applicable {
    /// No opt-out applies: every valid number is released, for this reason.
    Exempt(ReleaseReason),
    /// These types withhold; a number holding none of them is released for this reason.
    Types(OptOutSet, ReleaseReason),
}

impl Applicable {
    /// Why a number that no applicable opt-out withholds is released.
    pub fn release(self) -> ReleaseReason {
        match self {
            Applicable::Exempt(r) | Applicable::Types(_, r) => r,
        }
    }

    /// The opt-out types that can withhold a number (none when exempt): all a store lookup
    /// needs to read.
    pub fn types(self) -> OptOutSet {
        match self {
            Applicable::Exempt(_) => OptOutSet::EMPTY,
            Applicable::Types(t, _) => t,
        }
    }
}

/// The purpose policy: which opt-out types withhold data for this purpose, origin and basis.
pub fn applicable(purpose: Purpose, origin: DataOrigin, basis: LegalBasis) -> Applicable {
    if purpose == Purpose::DirectCare {
        return Applicable::Exempt(ReleaseReason::PurposeExempt);
    }
    let by_origin: OptOutSet = match origin {
        DataOrigin::Unspecified | DataOrigin::GpPractice => OptOutType::ALL.into_iter().collect(),
        DataOrigin::Other => [OptOutType::NationalDataOptOut].into_iter().collect(),
    };
    let types: OptOutSet = by_origin.iter().filter(|t| !basis.lifts(*t)).collect();
    let release = if basis == LegalBasis::None {
        ReleaseReason::NoOptOut
    } else {
        ReleaseReason::BasisExempt(basis)
    };
    if types.is_empty() {
        Applicable::Exempt(release)
    } else {
        Applicable::Types(types, release)
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

impl Decision {
    /// The outcome's name: `release` or `withhold`.
    pub const fn outcome(self) -> &'static str {
        match self {
            Decision::Release(_) => "release",
            Decision::Withhold(_) => "withhold",
        }
    }
}

/// Why a number may be released.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReleaseReason {
    /// No opt-out that applies.
    NoOptOut,
    /// The purpose is exempt.
    PurposeExempt,
    /// The extract's legal basis lifts the opt-outs that would otherwise apply.
    BasisExempt(LegalBasis),
}

impl ReleaseReason {
    /// The name of the reason's kind in metric labels (`no-opt-out`, `purpose-exempt`,
    /// `basis-exempt`); the API names each exempt basis (`REASON_EXEMPT_CONSENT`).
    pub const fn name(self) -> &'static str {
        match self {
            ReleaseReason::NoOptOut => "no-opt-out",
            ReleaseReason::PurposeExempt => "purpose-exempt",
            ReleaseReason::BasisExempt(_) => "basis-exempt",
        }
    }
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
    /// The store holds the national opt-outs of a checked population (population mode), and
    /// this number was not in it: it was never checked.
    NotInCheckedPopulation,
    /// The list of an opt-out type that applies is older than its configured maximum age: it no
    /// longer proves anything.
    ListTooOld,
    /// The list of an opt-out type that applies was never imported whole (a REPLACE, or a
    /// national check): a number it does not hold proves nothing.
    ListNeverImported,
}

impl WithholdReason {
    /// The name in audit records, on the command line and in metric labels (the API's reason in
    /// kebab case: `REASON_TYPE_1_OPT_OUT` is `type-1-opt-out`).
    pub const fn name(self) -> &'static str {
        match self {
            WithholdReason::NationalDataOptOut => "national-data-opt-out",
            WithholdReason::Type1OptOut => "type-1-opt-out",
            WithholdReason::InvalidNhsNumber => "invalid-nhs-number",
            WithholdReason::StoreUnavailable => "store-unavailable",
            WithholdReason::StoreRegressed => "store-regressed",
            WithholdReason::VersionNotReached => "version-not-reached",
            WithholdReason::NotInCheckedPopulation => "not-in-checked-population",
            WithholdReason::ListTooOld => "list-too-old",
            WithholdReason::ListNeverImported => "list-never-imported",
        }
    }
}

/// The decision for a valid number given the opt-outs the store holds for it.
pub fn decide(applicable: Applicable, held: OptOutSet) -> Decision {
    match applicable {
        Applicable::Exempt(r) => Decision::Release(r),
        Applicable::Types(types, release) => {
            match OptOutType::ALL
                .into_iter()
                .find(|t| types.contains(*t) && held.contains(*t))
            {
                Some(OptOutType::NationalDataOptOut) => {
                    Decision::Withhold(WithholdReason::NationalDataOptOut)
                }
                Some(OptOutType::Type1) => Decision::Withhold(WithholdReason::Type1OptOut),
                None => Decision::Release(release),
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
    fn the_set_of_every_type_and_intersections() {
        assert_eq!(OptOutSet::ALL, OptOutType::ALL.into_iter().collect());
        assert_eq!(
            OptOutSet::ALL.intersection(set(&[Type1])),
            set(&[Type1]),
            "intersection"
        );
    }

    #[test]
    fn direct_care_is_exempt_whatever_the_origin_or_opt_outs() {
        for origin in [
            DataOrigin::Unspecified,
            DataOrigin::GpPractice,
            DataOrigin::Other,
        ] {
            let a = applicable(Purpose::DirectCare, origin, LegalBasis::None);
            assert_eq!(a, Applicable::Exempt(ReleaseReason::PurposeExempt));
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
                let a = applicable(purpose, origin, LegalBasis::None);
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
        let a = applicable(Purpose::Research, DataOrigin::Other, LegalBasis::None);
        assert_eq!(
            decide(a, set(&[Type1])),
            Decision::Release(ReleaseReason::NoOptOut)
        );
        assert_eq!(
            decide(a, set(&[NationalDataOptOut, Type1])),
            Decision::Withhold(WithholdReason::NationalDataOptOut)
        );
    }

    /// Every basis, origin and pair of opt-outs: the national opt-out is lifted by every exempt
    /// basis; type 1 only by consent and a legal requirement, and only where it applies at all.
    #[test]
    fn the_exemption_matrix() {
        let held = set(&[NationalDataOptOut, Type1]);
        for basis in LegalBasis::EXEMPT {
            assert_eq!(LegalBasis::parse(basis.name()), Some(basis));
            let exempt = Decision::Release(ReleaseReason::BasisExempt(basis));
            // Data from outside GP practices: only the national opt-out applied, now lifted.
            let other = applicable(Purpose::Research, DataOrigin::Other, basis);
            assert_eq!(decide(other, held), exempt, "{basis:?}");
            assert_eq!(decide(other, OptOutSet::EMPTY), exempt);
            for origin in [DataOrigin::GpPractice, DataOrigin::Unspecified] {
                let a = applicable(Purpose::Planning, origin, basis);
                let type1_stands = !basis.lifts(Type1);
                assert_eq!(
                    decide(a, held),
                    if type1_stands {
                        Decision::Withhold(WithholdReason::Type1OptOut)
                    } else {
                        exempt
                    },
                    "{basis:?} {origin:?}"
                );
                assert_eq!(decide(a, set(&[NationalDataOptOut])), exempt);
            }
        }
        assert!(LegalBasis::Consent.lifts(Type1));
        assert!(
            !LegalBasis::LegalRequirement.lifts(Type1),
            "a legal requirement alone does not set aside a GP practice's type 1 objection"
        );
        assert!(LegalBasis::DirectionType1SetAside.lifts(Type1));
        for b in [
            LegalBasis::PublicInterest,
            LegalBasis::Anonymised,
            LegalBasis::CagOptOutSetAside,
            LegalBasis::PublicHealth,
            LegalBasis::InvoiceValidation,
            LegalBasis::OfficialStatistics,
            LegalBasis::None,
        ] {
            assert!(!b.lifts(Type1), "{b:?}");
        }
        // Every exempt basis lifts the national opt-out; only consent and a direction that sets
        // type 1 aside lift type 1 (two of nine).
        assert!(
            LegalBasis::EXEMPT
                .iter()
                .all(|b| b.lifts(NationalDataOptOut))
        );
        assert_eq!(
            LegalBasis::EXEMPT.iter().filter(|b| b.lifts(Type1)).count(),
            2
        );
        // The former name is not a basis: a key granted "section-251" must be re-granted.
        assert_eq!(LegalBasis::parse("section-251"), None);
        assert!(!LegalBasis::None.lifts(NationalDataOptOut));
        assert_eq!(LegalBasis::parse("none"), Some(LegalBasis::None));
        assert_eq!(LegalBasis::parse("Consent"), None);
        // Direct care stays direct care whatever basis is named.
        assert_eq!(
            applicable(Purpose::DirectCare, DataOrigin::Other, LegalBasis::Consent),
            Applicable::Exempt(ReleaseReason::PurposeExempt)
        );
    }

    #[test]
    fn references_name_what_each_basis_rests_on() {
        assert!(LegalBasis::None.reference_problem("").is_none());
        for b in LegalBasis::EXEMPT {
            let e = b.reference_problem("  ").expect("a reference is required");
            assert!(e.contains(b.name()) && e.contains("required"), "{e}");
        }
        let e = LegalBasis::CagOptOutSetAside
            .reference_problem("IRAS 12345")
            .expect("not a CAG reference");
        assert!(e.contains("not a CAG approval reference"), "{e}");
        assert!(
            LegalBasis::CagOptOutSetAside
                .reference_problem("19/CAG/0123")
                .is_none()
        );
        assert!(
            LegalBasis::Consent
                .reference_problem("IRAS 12345")
                .is_none()
        );
    }

    #[test]
    fn purposes_parse_and_direct_care_is_not_granted_by_default() {
        for p in Purpose::ALL {
            assert_eq!(Purpose::parse(p.name()), Some(p));
        }
        assert!(!Purpose::DEFAULT_GRANTED.contains(&Purpose::DirectCare));
        assert_eq!(Purpose::parse("direct_care"), None);
    }

    #[test]
    fn type_codes_round_trip() {
        for t in OptOutType::ALL {
            assert_eq!(OptOutType::from_code(t.code()), Some(t));
        }
        assert_eq!(OptOutType::from_code(0), None);
    }
}
