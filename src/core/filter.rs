//! The opted-out filter: a bloom filter of every NHS number that holds any opt-out.
//!
//! It answers "definitely not opted out" (release without asking the store) or "maybe" (ask the
//! store). A bloom filter has no false negatives, so a number that was inserted always answers
//! "maybe": the property the whole service rests on. Removing an opt-out never deletes from the
//! filter (a bloom filter cannot); the store is the truth, and stale "maybes" are shed by building a
//! new generation.
//!
//! Pure: no I/O. A snapshot is bytes in, bytes out, so any store can keep it.

use bloomfilter::Bloom;

use super::{NhsNumber, Version};

/// The smallest capacity a generation is sized for, so an empty store still gets a usable filter.
pub const MIN_CAPACITY: u64 = 1024;

/// A bloom filter generation of opted-out NHS numbers.
pub struct OptOutFilter {
    bloom: Bloom<u64>,
    capacity: u64,
    target_fp_rate: f64,
    items: u64,
    generation: u64,
}

/// Why a filter cannot be made or read.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The false-positive target is not strictly between 0 and 1.
    #[error("false-positive rate must be strictly between 0 and 1, got {0}")]
    FpRate(f64),
    /// The snapshot bytes are not a snapshot of this format.
    #[error("filter snapshot is corrupt: {0}")]
    Snapshot(&'static str),
    /// The snapshot was written by another format version.
    #[error("filter snapshot format {got}, expected {expected}")]
    SnapshotFormat {
        /// What this code reads.
        expected: u8,
        /// What the snapshot says.
        got: u8,
    },
}

/// Numbers that describe a filter generation, for status and metrics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FilterStats {
    /// Numbers inserted into this generation.
    pub items: u64,
    /// Items the generation was sized for.
    pub capacity: u64,
    /// Size of the bit array.
    pub bits: u64,
    /// Hash functions per lookup.
    pub hash_functions: u32,
    /// The configured false-positive target.
    pub target_fp_rate: f64,
    /// The expected false-positive rate at the current number of items.
    pub estimated_fp_rate: f64,
    /// Incremented on every rebuild.
    pub generation: u64,
}

const SNAPSHOT_MAGIC: &[u8; 4] = b"OOFS";
const SNAPSHOT_FORMAT: u8 = 1;
const SNAPSHOT_HEADER: usize = 4 + 1 + 8 * 6;

impl OptOutFilter {
    /// An empty generation sized for `capacity` items at `target_fp_rate`, with a fresh random
    /// seed.
    pub fn new(capacity: u64, target_fp_rate: f64, generation: u64) -> Result<Self, FilterError> {
        Self::with_seed(capacity, target_fp_rate, generation, random_seed())
    }

    /// As [`OptOutFilter::new`] with a given seed (tests and benchmarks that must repeat).
    ///
    /// The bloomfilter crate keys its two SipHash functions with the two 16-byte halves of the
    /// seed; equal halves make both hashes equal, so every probe lands on one line of positions and
    /// the false-positive rate gets many times worse. Such a seed has its second half flipped.
    pub fn with_seed(
        capacity: u64,
        target_fp_rate: f64,
        generation: u64,
        mut seed: [u8; 32],
    ) -> Result<Self, FilterError> {
        if !(target_fp_rate > 0.0 && target_fp_rate < 1.0) {
            return Err(FilterError::FpRate(target_fp_rate));
        }
        if seed[..16] == seed[16..] {
            for b in &mut seed[16..] {
                *b = !*b;
            }
        }
        let capacity = capacity.max(MIN_CAPACITY);
        let items = usize::try_from(capacity).unwrap_or(usize::MAX);
        let bloom = Bloom::new_for_fp_rate_with_seed(items, target_fp_rate, &seed)
            .map_err(FilterError::Snapshot)?;
        Ok(OptOutFilter {
            bloom,
            capacity,
            target_fp_rate,
            items: 0,
            generation,
        })
    }

    /// Records an opted-out number. Counts it as an item only if it was not (apparently) there.
    pub fn insert(&mut self, n: NhsNumber) {
        if !self.bloom.check_and_set(&n.as_u64()) {
            self.items += 1;
        }
    }

    /// False: the number is certainly not opted out. True: it may be; ask the store.
    #[inline]
    pub fn may_contain(&self, n: NhsNumber) -> bool {
        self.bloom.check(&n.as_u64())
    }

    /// Whether more items went in than the generation was sized for.
    pub fn is_over_capacity(&self) -> bool {
        self.items > self.capacity
    }

    /// Items inserted.
    pub fn items(&self) -> u64 {
        self.items
    }

    /// The generation number.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The status numbers.
    pub fn stats(&self) -> FilterStats {
        let bits = self.bloom.len();
        let k = self.bloom.number_of_hash_functions();
        // The classic estimate (1 - e^(-k n / m))^k.
        let estimated = if bits == 0 {
            1.0
        } else {
            (1.0 - (-(f64::from(k)) * self.items as f64 / bits as f64).exp()).powi(k as i32)
        };
        FilterStats {
            items: self.items,
            capacity: self.capacity,
            bits,
            hash_functions: k,
            target_fp_rate: self.target_fp_rate,
            estimated_fp_rate: estimated,
            generation: self.generation,
        }
    }

    /// Serialises the generation and the store version it reflects.
    ///
    /// Layout (little-endian): magic `OOFS`, format byte, items, capacity, target rate (f64 bits),
    /// generation, version ms, version seq, then the bloomfilter crate's own bytes (its header
    /// carries the seed and hash count), then a CRC-32 of everything before it.
    pub fn to_snapshot(&self, version: Version) -> Vec<u8> {
        let bloom = self.bloom.as_slice();
        let mut out = Vec::with_capacity(SNAPSHOT_HEADER + bloom.len() + 4);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.push(SNAPSHOT_FORMAT);
        for v in [
            self.items,
            self.capacity,
            self.target_fp_rate.to_bits(),
            self.generation,
            version.ms,
            version.seq,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(bloom);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a snapshot written by [`OptOutFilter::to_snapshot`].
    pub fn from_snapshot(bytes: &[u8]) -> Result<(Self, Version), FilterError> {
        if bytes.len() < SNAPSHOT_HEADER + 4 {
            return Err(FilterError::Snapshot("too short"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let crc = u32::from_le_bytes(crc.try_into().map_err(|_| FilterError::Snapshot("crc"))?);
        if crc32fast::hash(body) != crc {
            return Err(FilterError::Snapshot("checksum mismatch"));
        }
        if &body[..4] != SNAPSHOT_MAGIC {
            return Err(FilterError::Snapshot("not a filter snapshot"));
        }
        if body[4] != SNAPSHOT_FORMAT {
            return Err(FilterError::SnapshotFormat {
                expected: SNAPSHOT_FORMAT,
                got: body[4],
            });
        }
        let word = |i: usize| {
            let start = 5 + 8 * i;
            body[start..start + 8]
                .try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| FilterError::Snapshot("header"))
        };
        let items = word(0)?;
        let capacity = word(1)?;
        let target_fp_rate = f64::from_bits(word(2)?);
        let generation = word(3)?;
        let version = Version {
            ms: word(4)?,
            seq: word(5)?,
        };
        let bloom = Bloom::from_slice(&body[SNAPSHOT_HEADER..]).map_err(FilterError::Snapshot)?;
        Ok((
            OptOutFilter {
                bloom,
                capacity,
                target_fp_rate,
                items,
                generation,
            },
            version,
        ))
    }
}

fn random_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    rand::fill(&mut seed);
    seed
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nhs(v: u64) -> Option<NhsNumber> {
        NhsNumber::from_u64(v).ok()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The invariant the service rests on: no false negatives, whatever the capacity (even
        /// far exceeded), the rate and the seed, and across a snapshot round trip.
        #[test]
        fn never_answers_absent_for_an_inserted_number(
            values in proptest::collection::vec(4_000_000_000u64..8_000_000_000, 1..3000),
            capacity in 1u64..5000,
            fp in 0.0001f64..0.5,
            seed in any::<[u8; 32]>(),
        ) {
            let mut f = OptOutFilter::with_seed(capacity, fp, 1, seed).expect("valid rate");
            let numbers: Vec<NhsNumber> = values.into_iter().filter_map(nhs).collect();
            for n in &numbers {
                f.insert(*n);
            }
            for n in &numbers {
                prop_assert!(f.may_contain(*n));
            }
            let (back, _) = OptOutFilter::from_snapshot(&f.to_snapshot(Version::ZERO)).expect("round trip");
            for n in &numbers {
                prop_assert!(back.may_contain(*n));
            }
        }
    }

    fn valid_numbers(from: u64, count: usize) -> Vec<NhsNumber> {
        (from..).filter_map(nhs).take(count).collect()
    }

    fn measured_fp_rate(f: &OptOutFilter, probes: &[NhsNumber]) -> f64 {
        probes.iter().filter(|n| f.may_contain(**n)).count() as f64 / probes.len() as f64
    }

    #[test]
    fn false_positive_rate_is_near_target_at_capacity() {
        let inserted = valid_numbers(4_000_000_000, 20_000);
        let probes = valid_numbers(6_000_000_000, 100_000);
        let mut f = OptOutFilter::new(20_000, 0.001, 1).expect("valid");
        for n in &inserted {
            f.insert(*n);
        }
        let rate = measured_fp_rate(&f, &probes);
        assert!(rate < 0.003, "measured {rate}");
        let est = f.stats().estimated_fp_rate;
        assert!(est > 0.0005 && est < 0.002, "estimate {est}");
    }

    #[test]
    fn a_seed_with_equal_halves_is_not_used_as_is() {
        let inserted = valid_numbers(4_000_000_000, 20_000);
        let probes = valid_numbers(6_000_000_000, 100_000);
        let mut f = OptOutFilter::with_seed(20_000, 0.001, 1, [7u8; 32]).expect("valid");
        for n in &inserted {
            f.insert(*n);
        }
        let rate = measured_fp_rate(&f, &probes);
        assert!(rate < 0.003, "equal-halves seed gave {rate}");
    }

    #[test]
    fn snapshot_round_trip_keeps_everything() {
        let mut f = OptOutFilter::new(5000, 0.01, 9).expect("valid");
        for n in valid_numbers(4_000_000_000, 100) {
            f.insert(n);
        }
        let v = Version { ms: 123, seq: 4 };
        let (back, got) = OptOutFilter::from_snapshot(&f.to_snapshot(v)).expect("round trip");
        assert_eq!(got, v);
        assert_eq!(back.stats(), f.stats());
    }

    #[test]
    fn corrupt_snapshots_are_refused() {
        let f = OptOutFilter::new(5000, 0.01, 1).expect("valid");
        let mut bytes = f.to_snapshot(Version::ZERO);
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        assert!(OptOutFilter::from_snapshot(&bytes).is_err());
        assert!(OptOutFilter::from_snapshot(b"short").is_err());
    }

    #[test]
    fn rejects_rates_outside_zero_one() {
        for bad in [0.0, 1.0, -0.1, f64::NAN] {
            assert!(OptOutFilter::new(10, bad, 1).is_err());
        }
    }

    #[test]
    fn counts_items_and_knows_when_it_is_over_capacity() {
        let mut f = OptOutFilter::new(MIN_CAPACITY, 0.01, 1).expect("valid");
        let numbers = valid_numbers(4_000_000_000, MIN_CAPACITY as usize + 10);
        for n in &numbers {
            f.insert(*n);
            f.insert(*n); // a second insert of the same number is not a new item
        }
        assert!(f.items() <= numbers.len() as u64);
        assert!(f.items() > MIN_CAPACITY);
        assert!(f.is_over_capacity());
    }
}
