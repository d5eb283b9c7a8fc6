//! The opted-out filter: a bloom filter of every NHS number that holds any opt-out.
//!
//! It answers "definitely not opted out" (release without asking the store) or "maybe" (ask the
//! store). A bloom filter has no false negatives, so a number that was inserted always answers
//! "maybe": the property the whole service rests on. Removing an opt-out never deletes from the
//! filter (a bloom filter cannot); the store is the truth, and stale "maybes" are shed by building a
//! new generation.
//!
//! Pure: no I/O. A snapshot is bytes in, bytes out, so any store can keep it.

use std::hash::{Hash, Hasher};

use bloomfilter::{Bloom, reexports::siphasher::sip::SipHasher13};

use super::{NhsNumber, Version};

/// The smallest capacity a generation is sized for, so an empty store still gets a usable filter.
pub const MIN_CAPACITY: u64 = 1024;

/// A bloom filter generation of opted-out NHS numbers.
pub struct OptOutFilter {
    bloom: Bloom<u64>,
    /// The crate's two hash functions, rebuilt from its seed, to find a number's first two probe
    /// positions ahead of the lookup (see [`OptOutFilter::prefetch`]).
    probes: [SipHasher13; 2],
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
            probes: probes_of(&bloom),
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

    /// Asks the CPU to start loading the memory of `n`'s first two probes, so that a
    /// [`OptOutFilter::may_contain`] of `n` a little later finds it in cache.
    ///
    /// Why: the bit array is megabytes (9 MB at 5 million opt-outs), so every probe misses the
    /// caches, and the crate's lookup stops at the first clear bit, a branch the CPU cannot
    /// predict, so it cannot overlap one number's misses with the next's. Under load the probes
    /// were a third of the server's CPU, spent waiting. Asking ahead for the next numbers' first two
    /// probes (where an absent number's lookup almost always ends) overlaps those waits.
    ///
    /// A hint only: the positions are computed as the bloomfilter crate computes them (SipHash-1-3
    /// keyed by the two halves of its seed; a unit test pins that they match), and if a future
    /// version of the crate computed them otherwise, lookups would be exactly as correct, only
    /// slower.
    #[inline]
    pub fn prefetch(&self, n: NhsNumber) {
        let raw = self.bloom.as_slice();
        for bit in self.first_probes(n) {
            let byte = BITMAP_HEADER + usize::try_from(bit / 8).unwrap_or(0);
            if let Some(b) = raw.get(byte) {
                prefetch_read(b);
            }
        }
    }

    /// The bit positions of `n`'s first two probes, as the crate computes them.
    #[inline]
    fn first_probes(&self, n: NhsNumber) -> [u64; 2] {
        let bits = self.bloom.len();
        self.probes.map(|mut h| {
            n.as_u64().hash(&mut h);
            h.finish() % bits
        })
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
        // A bit array of no bits, or no probes, would divide by zero on the first lookup (or say
        // "absent" for every number): refused, never used.
        if matches!(bloom.len(), 0) || bloom.number_of_hash_functions() == 0 {
            return Err(FilterError::Snapshot(
                "the bit array or its probe count is empty",
            ));
        }
        Ok((
            OptOutFilter {
                probes: probes_of(&bloom),
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

/// Bytes in front of the bits in the crate's `as_slice` (version, length, k, seed).
const BITMAP_HEADER: usize = 1 + 8 + 4 + 32;

fn probes_of(bloom: &Bloom<u64>) -> [SipHasher13; 2] {
    let seed = bloom.seed();
    let mut k1 = [0u8; 16];
    let mut k2 = [0u8; 16];
    k1.copy_from_slice(&seed[..16]);
    k2.copy_from_slice(&seed[16..]);
    [
        SipHasher13::new_with_key(&k1),
        SipHasher13::new_with_key(&k2),
    ]
}

/// A prefetch of the cache line holding `b`: no load is waited for, nothing can fault.
#[inline]
fn prefetch_read(b: &u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: SSE is part of every x86_64 CPU (the target's baseline), and a prefetch reads
        // nothing and cannot fault; the pointer comes from a live reference anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(b).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = b;
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

    /// The bits set in the crate's array.
    fn set_bits(f: &OptOutFilter) -> Vec<u64> {
        let raw = &f.bloom.as_slice()[BITMAP_HEADER..];
        (0..f.bloom.len())
            .filter(|i| raw[(i / 8) as usize] & (1 << (i % 8)) != 0)
            .collect()
    }

    /// `prefetch` finds the first two probes where the crate puts them: one number in an empty
    /// filter sets exactly its k bits, and both computed positions are among them. (If the crate
    /// changed its hashing, this fails; lookups would stay correct, prefetching would be wasted.)
    #[test]
    fn prefetch_positions_are_the_crates_first_probes() {
        for (i, seed) in [[1u8; 32], *b"0123456789abcdefFEDCBA9876543210"]
            .into_iter()
            .enumerate()
        {
            let mut f = OptOutFilter::with_seed(10_000, 0.001, 1, seed).expect("valid rate");
            let n = nhs(9_434_765_919 - i as u64 * 9)
                .or(nhs(9_434_765_919))
                .expect("valid");
            f.insert(n);
            // The crate's whole probe sequence from the two hashes: h0, h1, then (h0 + i*h1) mod
            // the largest 64-bit prime, each mod the number of bits.
            let [h0, h1] = f.probes.map(|mut h| {
                n.as_u64().hash(&mut h);
                h.finish()
            });
            let bits = f.bloom.len();
            let mut want: Vec<u64> = (0..u64::from(f.bloom.number_of_hash_functions()))
                .map(|i| match i {
                    0 => h0 % bits,
                    1 => h1 % bits,
                    _ => h0.wrapping_add(i.wrapping_mul(h1)) % 0xFFFF_FFFF_FFFF_FFC5 % bits,
                })
                .collect();
            want.sort_unstable();
            want.dedup();
            assert_eq!(set_bits(&f), want, "the crate set other bits than computed");
            assert_eq!(f.first_probes(n), [h0 % bits, h1 % bits]);
            // And after a snapshot round trip, which rebuilds the hashers from the stored seed.
            let (back, _) = OptOutFilter::from_snapshot(&f.to_snapshot(Version::ZERO)).expect("ok");
            assert_eq!(back.first_probes(n), f.first_probes(n));
            f.prefetch(n);
        }
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
