//! What an opt-out list covers, and how old it may be.
//!
//! An organisation cannot download the national data opt-out list: it sends its patient
//! population to the national "Check for National Data Opt-outs" service and gets back the numbers
//! without an opt-out. The opt-outs this service then holds are derived (sent minus returned), and
//! "no opt-out" is known only for the patients sent. So a store is in one of two modes for the
//! national type, chosen when it is initialised:
//!
//! - **list**: a complete list was imported (as a national operator would); a number the list
//!   does not hold has no opt-out.
//! - **population**: only the checked population is known; a number outside it is WITHHOLD
//!   (`NotInCheckedPopulation`). Membership is exact (a roaring bitmap of the nine-digit number
//!   bodies), never a bloom filter: a false "in the population" would release a patient never
//!   checked.
//!
//! And each type's list has an age (the date of the national check, or of the last complete
//! REPLACE import); past a configured maximum, every number that type applies to is WITHHOLD
//! (`ListTooOld`).

use std::time::Duration;

use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use crate::{NhsNumber, OptOutSet, OptOutType, Version, WithholdReason};

/// How a store answers for a number its national list does not hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CoverageMode {
    /// A complete list: absence means no opt-out.
    #[default]
    List,
    /// A checked population: absence means no opt-out only inside it.
    Population,
}

impl CoverageMode {
    /// The name on the command line and in status.
    pub fn name(self) -> &'static str {
        match self {
            CoverageMode::List => "list",
            CoverageMode::Population => "population",
        }
    }

    /// Parses [`CoverageMode::name`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "list" => Some(CoverageMode::List),
            "population" => Some(CoverageMode::Population),
            _ => None,
        }
    }
}

/// The patients a national check was sent for: exact membership of their numbers.
///
/// Kept as a roaring bitmap of number bodies (compact, the stored form), and read for checks in
/// whichever exact form is faster to ask: the roaring bitmap, or a flat bit array over the bodies'
/// span when that is at most [`DENSE_MAX_RATIO`] times the roaring size. A population scattered
/// over the England range (the realistic shape at scale) takes a binary search over thousands of
/// containers and then within one: about 220 ns a lookup at 5 M patients, cache misses included,
/// where the flat array is one memory access (`cargo bench --bench core -- population`).
#[derive(Clone, Debug, Default)]
pub struct Population(Repr);

#[derive(Clone, Debug)]
enum Repr {
    Sparse(RoaringBitmap),
    /// Bit `b - base` of `words` is set for body `b`.
    Dense {
        base: u32,
        words: Box<[u64]>,
        len: u64,
    },
}

impl Default for Repr {
    fn default() -> Self {
        Repr::Sparse(RoaringBitmap::new())
    }
}

/// How much larger than the roaring bitmap the flat array may be and still be chosen.
pub const DENSE_MAX_RATIO: usize = 4;

impl PartialEq for Population {
    fn eq(&self, other: &Self) -> bool {
        self.to_roaring() == other.to_roaring()
    }
}

impl Population {
    /// An empty population.
    pub fn new() -> Self {
        Population::default()
    }

    /// A number's nine-digit body: exact, since the tenth digit is the body's check digit.
    fn body(n: NhsNumber) -> u32 {
        // Ten digits at most, so the body is below 10^9 < 2^32.
        u32::try_from(n.as_u64() / 10).unwrap_or(u32::MAX)
    }

    fn to_roaring(&self) -> std::borrow::Cow<'_, RoaringBitmap> {
        match &self.0 {
            Repr::Sparse(r) => std::borrow::Cow::Borrowed(r),
            Repr::Dense { base, words, .. } => {
                let mut r = RoaringBitmap::new();
                for (i, w) in words.iter().enumerate() {
                    let mut w = *w;
                    while w != 0 {
                        let bit = w.trailing_zeros();
                        let offset = u32::try_from(i * 64).unwrap_or(u32::MAX) + bit;
                        r.insert(base.saturating_add(offset));
                        w &= w - 1;
                    }
                }
                std::borrow::Cow::Owned(r)
            }
        }
    }

    /// Adds a number; false if it was there already.
    pub fn insert(&mut self, n: NhsNumber) -> bool {
        if let Repr::Dense { .. } = self.0 {
            self.0 = Repr::Sparse(self.to_roaring().into_owned());
        }
        match &mut self.0 {
            Repr::Sparse(r) => r.insert(Self::body(n)),
            Repr::Dense { .. } => false,
        }
    }

    /// Whether the number was in the checked population.
    #[inline]
    pub fn contains(&self, n: NhsNumber) -> bool {
        let body = Self::body(n);
        match &self.0 {
            Repr::Sparse(r) => r.contains(body),
            Repr::Dense { base, words, .. } => body.checked_sub(*base).is_some_and(|off| {
                words
                    .get((off / 64) as usize)
                    .is_some_and(|w| w >> (off % 64) & 1 == 1)
            }),
        }
    }

    /// Starts loading the memory a later [`Population::contains`] of `n` reads (the flat form;
    /// a hint, nothing otherwise).
    #[inline]
    pub fn prefetch(&self, n: NhsNumber) {
        if let Repr::Dense { base, words, .. } = &self.0
            && let Some(w) = Self::body(n)
                .checked_sub(*base)
                .and_then(|off| words.get((off / 64) as usize))
        {
            crate::filter::prefetch_read(w);
        }
    }

    /// The form fastest to ask, where it costs at most [`DENSE_MAX_RATIO`] times the memory: for
    /// a population held by a replica to answer checks.
    pub fn for_lookups(self) -> Self {
        let Repr::Sparse(r) = &self.0 else {
            return self;
        };
        let (Some(min), Some(max)) = (r.min(), r.max()) else {
            return self;
        };
        let span_words = (u64::from(max - min) / 64 + 1) as usize;
        if span_words.saturating_mul(8) > r.serialized_size().saturating_mul(DENSE_MAX_RATIO) {
            return self;
        }
        let mut words = vec![0u64; span_words].into_boxed_slice();
        for b in r.iter() {
            let off = b - min;
            words[(off / 64) as usize] |= 1 << (off % 64);
        }
        Population(Repr::Dense {
            base: min,
            words,
            len: r.len(),
        })
    }

    /// Whether it is held as a flat bit array.
    pub fn is_dense(&self) -> bool {
        matches!(self.0, Repr::Dense { .. })
    }

    /// How many patients.
    pub fn len(&self) -> u64 {
        match &self.0 {
            Repr::Sparse(r) => r.len(),
            Repr::Dense { len, .. } => *len,
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The portable roaring serialisation (what the store keeps).
    pub fn to_bytes(&self) -> Vec<u8> {
        let r = self.to_roaring();
        let mut out = Vec::with_capacity(r.serialized_size());
        // Writing into a Vec cannot fail.
        let _ = r.serialize_into(&mut out);
        out
    }

    /// Reads [`Population::to_bytes`]; an unreadable population is an error, never empty.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        RoaringBitmap::deserialize_from(bytes)
            .map(|r| Population(Repr::Sparse(r)))
            .map_err(|e| format!("the stored population cannot be read: {e}"))
    }

    /// Bytes it takes in memory, near enough (the roaring serialisation, or the flat array).
    pub fn memory_bytes(&self) -> usize {
        match &self.0 {
            Repr::Sparse(r) => r.serialized_size(),
            Repr::Dense { words, .. } => words.len() * 8,
        }
    }

    /// Bytes the roaring serialisation takes.
    pub fn serialized_size(&self) -> usize {
        self.to_roaring().serialized_size()
    }
}

/// How old each type's list may be before its answers prove nothing (`None`: no limit). With a
/// limit, a list never imported whole proves nothing either (`ListNeverImported`): a new or lost
/// store does not release everyone. [`MaxAge::DEFAULT`] is the service's default; turning a limit
/// off is an explicit choice (and refused for a store in population mode), so there is no
/// `Default`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxAge {
    /// The national data opt-out list (the national check's refresh period).
    pub national: Option<Duration>,
    /// The type 1 list.
    pub type1: Option<Duration>,
}

impl MaxAge {
    /// The default limit of each type: 30 days, a monthly refresh with days to spare for a
    /// weekly one. NHS England's guidance asks for the national check before each use of the
    /// data; the limit is how long a replica trusts the last one.
    pub const DEFAULT_DAYS: u64 = 30;

    /// Both types limited to [`MaxAge::DEFAULT_DAYS`].
    pub const DEFAULT: MaxAge = MaxAge {
        national: Some(Duration::from_secs(MaxAge::DEFAULT_DAYS * 86_400)),
        type1: Some(Duration::from_secs(MaxAge::DEFAULT_DAYS * 86_400)),
    };

    /// No limits: lists never imported whole release what they do not hold. Explicit only
    /// (`--national-max-age-days none`); the tests of other subjects use it.
    pub const NONE: MaxAge = MaxAge {
        national: None,
        type1: None,
    };

    /// The limit for one type.
    pub fn of(&self, t: OptOutType) -> Option<Duration> {
        match t {
            OptOutType::NationalDataOptOut => self.national,
            OptOutType::Type1 => self.type1,
        }
    }
}

/// What the store's lists cover and how old they are, as of one store version. Held by every
/// replica next to its filter (installed with it, so both reflect the same version).
#[derive(Clone, Debug, PartialEq)]
pub struct Coverage {
    /// The national mode; `None` until read from the store (then nothing is released that the
    /// national type applies to: the replica does not know whether absence proves anything).
    pub national_mode: Option<CoverageMode>,
    /// The version of the change that last set it (an import, or the store's initialisation).
    pub version: Version,
    /// In population mode: the patients of the last national check (empty before the first).
    pub population: Population,
    /// When each type's list was last known complete, ms since the Unix epoch: the date of the
    /// national check, or of the last REPLACE import. Index: national, type 1.
    pub as_of_ms: [Option<u64>; 2],
    /// In population mode: the organisation (ODS code) whose patients were checked, named at
    /// initialisation. The national check's licence lets it apply the result to its own
    /// patients only, so checks from other organisations' keys are refused. `None`: a store
    /// initialised before owners were recorded.
    pub owner: Option<String>,
    /// Type 1: when each practice's list was last imported whole (a REPLACE scoped to the
    /// practice), ms. The type 1 list's date (`as_of_ms[1]`) is the oldest of them: the union of
    /// the practices' lists is as current as its stalest part.
    pub practices: std::collections::BTreeMap<String, u64>,
}

impl Default for Coverage {
    fn default() -> Self {
        Coverage::unknown()
    }
}

/// What a batch's releases must still pass ([`Coverage::rule`]).
#[derive(Clone, Copy, Debug)]
pub enum CoverageRule<'a> {
    /// Nothing: every release stands.
    Nothing,
    /// Every release is withheld for this reason.
    All(WithholdReason),
    /// A release stands only for a number in this population; others are
    /// [`WithholdReason::NotInCheckedPopulation`].
    Outside(&'a Population),
}

impl CoverageRule<'_> {
    /// Why a number this rule covers must be withheld, if it must.
    #[inline]
    pub fn withhold(self, n: NhsNumber) -> Option<WithholdReason> {
        match self {
            CoverageRule::Nothing => None,
            CoverageRule::All(r) => Some(r),
            CoverageRule::Outside(p) if p.contains(n) => None,
            CoverageRule::Outside(_) => Some(WithholdReason::NotInCheckedPopulation),
        }
    }
}

/// The fields of a [`Coverage`] other than the population, as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoverageMeta {
    /// The national mode.
    pub mode: CoverageMode,
    /// The version of the change that last set it ("" before any).
    #[serde(default)]
    pub version: String,
    /// The national list's date, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub national_as_of_ms: Option<u64>,
    /// The type 1 list's date, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type1_as_of_ms: Option<u64>,
    /// Patients in the population (population mode).
    #[serde(default)]
    pub population_len: u64,
    /// The organisation a population-mode store belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Type 1: each practice's last whole list, ms.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub type1_practices: std::collections::BTreeMap<String, u64>,
}

impl CoverageMeta {
    /// Records a whole list of one practice's type 1 opt-outs at `at_ms`: the type 1 list's date
    /// becomes the oldest practice's.
    pub fn practice_replaced(&mut self, practice: &str, at_ms: u64) {
        self.type1_practices.insert(practice.to_string(), at_ms);
        self.type1_as_of_ms = self.type1_practices.values().min().copied();
    }
}

fn index(t: OptOutType) -> usize {
    match t {
        OptOutType::NationalDataOptOut => 0,
        OptOutType::Type1 => 1,
    }
}

impl Coverage {
    /// Not read from the store yet.
    pub fn unknown() -> Self {
        Coverage {
            national_mode: None,
            version: Version::ZERO,
            population: Population::new(),
            as_of_ms: [None, None],
            owner: None,
            practices: std::collections::BTreeMap::new(),
        }
    }

    /// A store's coverage from its stored parts (the population only in population mode).
    pub fn from_stored(meta: &CoverageMeta, population: Option<&[u8]>) -> Result<Self, String> {
        let version = if meta.version.is_empty() {
            Version::ZERO
        } else {
            Version::parse(&meta.version).map_err(|e| format!("coverage version: {e}"))?
        };
        let population = match (meta.mode, population) {
            (CoverageMode::Population, Some(bytes)) => Population::from_bytes(bytes)?.for_lookups(),
            (CoverageMode::Population, None) if meta.population_len > 0 => {
                return Err(format!(
                    "the store records a population of {} patients but holds no population set",
                    meta.population_len
                ));
            }
            _ => Population::new(),
        };
        if meta.mode == CoverageMode::Population && population.len() != meta.population_len {
            return Err(format!(
                "the stored population holds {} patients where the store records {}",
                population.len(),
                meta.population_len
            ));
        }
        Ok(Coverage {
            national_mode: Some(meta.mode),
            version,
            population,
            as_of_ms: [meta.national_as_of_ms, meta.type1_as_of_ms],
            owner: meta.owner.clone(),
            practices: meta.type1_practices.clone(),
        })
    }

    /// The organisation whose checks this store answers alone, if it is in population mode and
    /// names one.
    pub fn population_owner(&self) -> Option<&str> {
        match self.national_mode {
            Some(CoverageMode::Population) => self.owner.as_deref(),
            _ => None,
        }
    }

    /// When a type's list was last known complete.
    pub fn as_of_ms(&self, t: OptOutType) -> Option<u64> {
        self.as_of_ms[index(t)]
    }

    /// When a type's list stops proving anything (`None`: no limit set). A list never imported
    /// has expired already (0).
    pub fn expires_at_ms(&self, t: OptOutType, max_age: &MaxAge) -> Option<u64> {
        let limit = max_age.of(t)?;
        let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        Some(self.as_of_ms(t).map_or(0, |at| at.saturating_add(limit_ms)))
    }

    /// Why a number that no opt-out withholds must still be withheld when `types` apply, if it
    /// must: a list of an applicable type too old (or never imported) under `max_age`; the
    /// national mode not known yet; or, in population mode, a number outside the checked
    /// population.
    #[inline]
    pub fn withhold(
        &self,
        types: OptOutSet,
        n: NhsNumber,
        now_ms: u64,
        max_age: &MaxAge,
    ) -> Option<WithholdReason> {
        self.rule(types, now_ms, max_age).withhold(n)
    }

    /// [`Coverage::withhold`] decided once for a whole batch (the same types, the same moment):
    /// what is left to ask per number is at most a population membership.
    pub fn rule(&self, types: OptOutSet, now_ms: u64, max_age: &MaxAge) -> CoverageRule<'_> {
        for t in OptOutType::ALL {
            if !types.contains(t) || max_age.of(t).is_none() {
                continue;
            }
            if self.as_of_ms(t).is_none() {
                return CoverageRule::All(WithholdReason::ListNeverImported);
            }
            if self
                .expires_at_ms(t, max_age)
                .is_some_and(|expires| now_ms >= expires)
            {
                return CoverageRule::All(WithholdReason::ListTooOld);
            }
        }
        if !types.contains(OptOutType::NationalDataOptOut) {
            return CoverageRule::Nothing;
        }
        match self.national_mode {
            None => CoverageRule::All(WithholdReason::StoreUnavailable),
            Some(CoverageMode::List) => CoverageRule::Nothing,
            // A checked population proves something only as long as its check is young: without
            // a maximum age it cannot be shown to be (the server refuses to start so; a store
            // that turned to population mode under a running replica lands here).
            Some(CoverageMode::Population) if max_age.national.is_none() => {
                CoverageRule::All(WithholdReason::ListTooOld)
            }
            Some(CoverageMode::Population) => CoverageRule::Outside(&self.population),
        }
    }

    /// Whether a check's answers depend on which version this coverage is paired with: in
    /// population mode, an answer from a store version other than the coverage's generation
    /// could pair a newer list with an older population, so such answers are withheld.
    pub fn pins_version(&self, types: OptOutSet) -> bool {
        types.contains(OptOutType::NationalDataOptOut)
            && self.national_mode != Some(CoverageMode::List)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nhs(v: u64) -> NhsNumber {
        NhsNumber::from_u64(v).expect("valid")
    }

    fn national() -> OptOutSet {
        [OptOutType::NationalDataOptOut].into_iter().collect()
    }

    fn both() -> OptOutSet {
        OptOutType::ALL.into_iter().collect()
    }

    fn type1() -> OptOutSet {
        [OptOutType::Type1].into_iter().collect()
    }

    fn population_mode(members: &[NhsNumber]) -> Coverage {
        let mut population = Population::new();
        for n in members {
            population.insert(*n);
        }
        let meta = CoverageMeta {
            mode: CoverageMode::Population,
            version: "5-0".into(),
            national_as_of_ms: Some(1_000),
            type1_as_of_ms: None,
            population_len: population.len(),
            owner: None,
            type1_practices: Default::default(),
        };
        Coverage::from_stored(&meta, Some(&population.to_bytes())).expect("reads back")
    }

    #[test]
    fn outside_the_checked_population_is_withheld_inside_is_not() {
        let (inside, outside) = (nhs(9_434_765_919), nhs(4_010_232_137));
        let c = population_mode(&[inside]);
        let young = MaxAge {
            national: Some(Duration::from_secs(86_400)),
            type1: None,
        };
        assert_eq!(c.withhold(national(), inside, 2_000, &young), None);
        assert_eq!(
            c.withhold(national(), outside, 2_000, &young),
            Some(WithholdReason::NotInCheckedPopulation)
        );
        assert_eq!(
            c.withhold(both(), outside, 2_000, &young),
            Some(WithholdReason::NotInCheckedPopulation)
        );
        // Type 1 only (the national type lifted): the population does not matter.
        assert_eq!(c.withhold(type1(), outside, 2_000, &young), None);
        // A population without a maximum age cannot be shown to be young.
        assert_eq!(
            c.withhold(national(), inside, 2_000, &MaxAge::NONE),
            Some(WithholdReason::ListTooOld)
        );
        assert!(c.pins_version(national()) && !c.pins_version(type1()));
    }

    #[test]
    fn list_mode_releases_absent_numbers_and_unknown_mode_does_not() {
        let list = Coverage::from_stored(&CoverageMeta::default(), None).expect("list");
        let n = nhs(4_010_232_137);
        assert_eq!(list.withhold(both(), n, 0, &MaxAge::NONE), None);
        // With the default limits, a list never imported whole proves nothing: a new (or lost)
        // store does not release everyone.
        assert_eq!(
            list.withhold(both(), n, 0, &MaxAge::DEFAULT),
            Some(WithholdReason::ListNeverImported)
        );
        let mut imported = list.clone();
        imported.as_of_ms = [Some(1_000), None];
        assert_eq!(
            imported.withhold(national(), n, 2_000, &MaxAge::DEFAULT),
            None,
            "the national list was imported whole and is young"
        );
        assert_eq!(
            imported.withhold(both(), n, 2_000, &MaxAge::DEFAULT),
            Some(WithholdReason::ListNeverImported),
            "type 1 applies too, and was never imported whole"
        );
        assert!(!list.pins_version(both()));
        assert_eq!(
            Coverage::unknown().withhold(both(), n, 0, &MaxAge::NONE),
            Some(WithholdReason::StoreUnavailable)
        );
        assert!(Coverage::unknown().pins_version(national()));
    }

    #[test]
    fn a_list_past_its_maximum_age_is_withheld_for_the_types_it_covers() {
        let n = nhs(9_434_765_919);
        let c = population_mode(&[n]);
        let day = Duration::from_secs(86_400);
        let max = MaxAge {
            national: Some(day),
            type1: Some(day),
        };
        let day_ms = 86_400_000;
        assert_eq!(
            c.expires_at_ms(OptOutType::NationalDataOptOut, &max),
            Some(1_000 + day_ms)
        );
        assert_eq!(c.withhold(national(), n, 999 + day_ms, &max), None);
        assert_eq!(
            c.withhold(national(), n, 1_000 + day_ms, &max),
            Some(WithholdReason::ListTooOld)
        );
        // Type 1 was never imported: with a limit set, it proves nothing.
        assert_eq!(c.expires_at_ms(OptOutType::Type1, &max), Some(0));
        assert_eq!(
            c.withhold(type1(), n, 5, &max),
            Some(WithholdReason::ListNeverImported)
        );
        // No limit, no expiry.
        assert_eq!(c.withhold(type1(), n, u64::MAX, &MaxAge::NONE), None);
    }

    #[test]
    fn a_stored_population_that_disagrees_with_its_count_is_refused() {
        let c = population_mode(&[nhs(9_434_765_919)]);
        let meta = CoverageMeta {
            mode: CoverageMode::Population,
            population_len: 2,
            ..CoverageMeta::default()
        };
        assert!(Coverage::from_stored(&meta, Some(&c.population.to_bytes())).is_err());
        assert!(Coverage::from_stored(&meta, None).is_err());
        assert!(Coverage::from_stored(&meta, Some(b"not roaring")).is_err());
    }

    #[test]
    fn membership_is_exact_for_every_number_of_a_range() {
        // Every valid number in a run, alternate ones in the population: no false member.
        let numbers: Vec<NhsNumber> = (4_010_232_000u64..4_010_262_000)
            .filter_map(|v| NhsNumber::from_u64(v).ok())
            .collect();
        let mut p = Population::new();
        for n in numbers.iter().step_by(2) {
            p.insert(*n);
        }
        for (i, n) in numbers.iter().enumerate() {
            assert_eq!(p.contains(*n), i % 2 == 0, "{n}");
        }
        let back = Population::from_bytes(&p.to_bytes()).expect("reads back");
        assert_eq!(back, p);
        // The flat form answers exactly the same, at both ends of its span and outside it.
        let dense = back.clone().for_lookups();
        assert!(dense.is_dense(), "a block this dense is held flat");
        assert_eq!(dense.len(), p.len());
        for (i, n) in numbers.iter().enumerate() {
            assert_eq!(dense.contains(*n), i % 2 == 0, "{n}");
        }
        for outside in [
            4_010_231_999u64,
            4_010_262_001,
            9_434_765_919,
            1_000_000_001,
        ] {
            if let Ok(n) = NhsNumber::from_u64(outside) {
                assert!(!dense.contains(n) && !p.contains(n), "{n}");
            }
        }
        assert_eq!(dense, p, "the same set");
        assert_eq!(Population::from_bytes(&dense.to_bytes()).expect("reads"), p);
        // A handful of numbers spread far apart stays roaring: the flat span would be huge.
        let mut sparse = Population::new();
        for v in [4_010_232_137u64, 9_434_765_919] {
            sparse.insert(NhsNumber::from_u64(v).expect("valid"));
        }
        assert!(!sparse.clone().for_lookups().is_dense());
    }
}
