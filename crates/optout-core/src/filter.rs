//! The opted-out filter: a bloom filter of every NHS number that holds any opt-out.
//!
//! It answers "definitely not opted out" (release without asking the store) or "maybe" (ask the
//! store). A bloom filter has no false negatives, so a number that was inserted always answers
//! "maybe": the property the whole service rests on. Removing an opt-out never deletes from the
//! filter (a bloom filter cannot); the store is the truth, and stale "maybes" are shed by building a
//! new generation.
//!
//! The implementation is the `fastbloom` crate, chosen by measurement (`cargo bench --bench
//! filter_choice`, 5 M opt-outs): one keyed SipHash-1-3 per number and its probes derived from it
//! (double hashing, multiply-shift instead of a division), about 1.4 times faster per absent
//! number than the `bloomfilter` crate's two SipHashes and `%`, at 14.4 bits per opt-out and a
//! measured false-positive rate of 0.096% for a 0.1% target (the `bloomfilter` crate: 14.4 bits,
//! 0.103%).
//!
//! Pure: no I/O. A snapshot is bytes in, bytes out, so any store can keep it.

use fastbloom::BloomFilter;

use super::{NhsNumber, Version};

/// The share of the false-positive target the bit array is sized for.
const SIZING_MARGIN: f64 = 0.8;

/// The smallest capacity a generation is sized for, so an empty store still gets a usable filter.
pub const MIN_CAPACITY: u64 = 1024;

/// A number's hash under one filter's seed (see [`OptOutFilter::probe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe(u64);

/// A bloom filter generation of opted-out NHS numbers.
pub struct OptOutFilter {
    bloom: BloomFilter,
    /// The key of the crate's SipHash (kept for snapshots: the crate does not expose it).
    seed: u128,
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
/// 1: the `bloomfilter` crate's bytes; 2: `fastbloom`'s words. A replica meeting another format
/// rebuilds from a scan; it never reads one format as the other.
const SNAPSHOT_FORMAT: u8 = 2;
/// Magic, format, six header words, the seed, the hash count, the word count.
const SNAPSHOT_HEADER: usize = 4 + 1 + 8 * 6 + 16 + 4 + 8;

impl OptOutFilter {
    /// An empty generation sized for `capacity` items at `target_fp_rate`, with a fresh random
    /// seed.
    pub fn new(capacity: u64, target_fp_rate: f64, generation: u64) -> Result<Self, FilterError> {
        Self::with_seed(capacity, target_fp_rate, generation, random_seed())
    }

    /// As [`OptOutFilter::new`] with a given seed (tests and benchmarks that must repeat).
    pub fn with_seed(
        capacity: u64,
        target_fp_rate: f64,
        generation: u64,
        seed: [u8; 32],
    ) -> Result<Self, FilterError> {
        if !(target_fp_rate > 0.0 && target_fp_rate < 1.0) {
            return Err(FilterError::FpRate(target_fp_rate));
        }
        let capacity = capacity.max(MIN_CAPACITY);
        let mut key = [0u8; 16];
        key.copy_from_slice(&seed[..16]);
        let seed = u128::from_le_bytes(key);
        let items = usize::try_from(capacity).unwrap_or(usize::MAX);
        // Sized for four fifths of the target: the crate's derived probes are not quite
        // independent, and sized for the target itself one seed measured 0.1047% for 0.1%. The
        // margin costs about half a bit per opt-out (14.9 bits at 0.1%).
        let bloom = BloomFilter::with_false_pos(target_fp_rate * SIZING_MARGIN)
            .seed(&seed)
            .expected_items(items);
        Ok(OptOutFilter {
            bloom,
            seed,
            capacity,
            target_fp_rate,
            items: 0,
            generation,
        })
    }

    /// Records an opted-out number. Counts it as an item only if it was not (apparently) there.
    pub fn insert(&mut self, n: NhsNumber) {
        if !self.bloom.insert(&n.as_u64()) {
            self.items += 1;
        }
    }

    /// False: the number is certainly not opted out. True: it may be; ask the store.
    #[inline]
    pub fn may_contain(&self, n: NhsNumber) -> bool {
        self.may_contain_probe(self.probe(n))
    }

    /// `n`'s hash under this filter's seed, computed once for both [`OptOutFilter::prefetch_probe`]
    /// and [`OptOutFilter::may_contain_probe`] (the hash was 3% of the server's CPU under batch
    /// load when computed twice). Valid for this filter only: another generation has another seed.
    #[inline]
    pub fn probe(&self, n: NhsNumber) -> Probe {
        Probe(self.bloom.source_hash(&n.as_u64()))
    }

    /// [`OptOutFilter::may_contain`] of the number `probe` was computed for, on this filter.
    #[inline]
    pub fn may_contain_probe(&self, probe: Probe) -> bool {
        self.bloom.contains_hash(probe.0)
    }

    /// Asks the CPU to start loading the memory of `n`'s first two probes, so that a
    /// [`OptOutFilter::may_contain`] of `n` a little later finds it in cache.
    ///
    /// Why: the bit array is megabytes (9 MB at 5 million opt-outs), so every probe misses the
    /// caches, and a lookup stops at the first clear bit, a branch the CPU cannot predict, so it
    /// cannot overlap one number's misses with the next's. Asking ahead for the next numbers'
    /// first two probes (where an absent number's lookup almost always ends) overlaps those waits.
    ///
    /// A hint only: the positions are computed as `fastbloom` 0.14 computes them (a unit test pins
    /// that they match); if a later version computed them otherwise, lookups would be exactly as
    /// correct, only slower.
    #[inline]
    pub fn prefetch(&self, n: NhsNumber) {
        self.prefetch_probe(self.probe(n));
    }

    /// [`OptOutFilter::prefetch`] of the number `probe` was computed for.
    #[inline]
    pub fn prefetch_probe(&self, probe: Probe) {
        let words = self.bloom.as_slice();
        for bit in self.first_probes(probe) {
            if let Some(w) = words.get(bit / 64) {
                prefetch_read(w);
            }
        }
    }

    /// The bit positions of `n`'s first two probes, as the crate computes them: its double
    /// hashing from the one SipHash of the number, reduced by multiply-shift.
    #[inline]
    fn first_probes(&self, probe: Probe) -> [usize; 2] {
        let bits = self.bloom.num_bits() as u64;
        let mut h1 = probe.0;
        let h2 = (h1 >> 32).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        [0, 1].map(|_| {
            h1 = h1.wrapping_add(h2).rotate_left(5);
            usize::try_from(((h1 >> 32).wrapping_mul(bits)) >> 32).unwrap_or(0)
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
        let bits = self.bloom.num_bits() as u64;
        let k = self.bloom.num_hashes();
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
    /// Layout (little-endian): magic `OOFS`, format byte (2), items, capacity, target rate (f64
    /// bits), generation, version ms, version seq, the 16-byte hash seed, the hash count (u32), the
    /// number of 64-bit words, the words, then a CRC-32 of everything before it.
    pub fn to_snapshot(&self, version: Version) -> Vec<u8> {
        let words = self.bloom.as_slice();
        let mut out = Vec::with_capacity(SNAPSHOT_HEADER + words.len() * 8 + 4);
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
        out.extend_from_slice(&self.seed.to_le_bytes());
        out.extend_from_slice(&self.bloom.num_hashes().to_le_bytes());
        out.extend_from_slice(&(words.len() as u64).to_le_bytes());
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a snapshot written by [`OptOutFilter::to_snapshot`].
    pub fn from_snapshot(bytes: &[u8]) -> Result<(Self, Version), FilterError> {
        if bytes.len() < 5 + 4 {
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
        if body.len() < SNAPSHOT_HEADER {
            return Err(FilterError::Snapshot("too short"));
        }
        let bytes_at = |start: usize, len: usize| {
            body.get(start..start + len)
                .ok_or(FilterError::Snapshot("header"))
        };
        let word = |i: usize| bytes_at(5 + 8 * i, 8).map(word_at);
        let items = word(0)?;
        let capacity = word(1)?;
        let target_fp_rate = f64::from_bits(word(2)?);
        let generation = word(3)?;
        let version = Version {
            ms: word(4)?,
            seq: word(5)?,
        };
        let mut seed = [0u8; 16];
        seed.copy_from_slice(bytes_at(53, 16)?);
        let seed = u128::from_le_bytes(seed);
        let mut k = [0u8; 4];
        k.copy_from_slice(bytes_at(69, 4)?);
        let hashes = u32::from_le_bytes(k);
        let count = word_at(bytes_at(73, 8)?);
        let data = &body[SNAPSHOT_HEADER..];
        // No words, or no probes, would answer "absent" for every number (or panic): refused.
        if count == 0 || hashes == 0 {
            return Err(FilterError::Snapshot(
                "the bit array or its probe count is empty",
            ));
        }
        if u64::try_from(data.len()).ok() != count.checked_mul(8) {
            return Err(FilterError::Snapshot(
                "the word count does not match the bits",
            ));
        }
        let words: Vec<u64> = data.chunks_exact(8).map(word_at).collect();
        let bloom = BloomFilter::from_vec(words).seed(&seed).hashes(hashes);
        Ok((
            OptOutFilter {
                bloom,
                seed,
                capacity,
                target_fp_rate,
                items,
                generation,
            },
            version,
        ))
    }
}

/// Eight little-endian bytes as a word.
fn word_at(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

/// A prefetch of the cache line holding `w`: no load is waited for, nothing can fault.
#[inline]
pub(crate) fn prefetch_read(w: &u64) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: SSE is part of every x86_64 CPU (the target's baseline), and a prefetch reads
        // nothing and cannot fault; the pointer comes from a live reference anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(w).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = w;
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

    /// `prefetch` finds the first two probes where the crate puts them: a filter with one hash
    /// sets exactly one bit per number, the first probe; with two, the first two. (If the crate
    /// changed its hashing, this fails; lookups would stay correct, prefetching would be wasted.)
    #[test]
    fn prefetch_positions_are_the_crates_first_probes() {
        let n = nhs(9_434_765_919).expect("valid");
        for hashes in [1u32, 2] {
            let mut f = OptOutFilter::with_seed(10_000, 0.001, 1, [5u8; 32]).expect("valid rate");
            f.bloom = BloomFilter::with_num_bits(1 << 16)
                .seed(&f.seed)
                .hashes(hashes);
            f.insert(n);
            let set: Vec<usize> = f
                .bloom
                .as_slice()
                .iter()
                .enumerate()
                .flat_map(|(i, w)| {
                    (0..64)
                        .filter(move |b| w & (1 << b) != 0)
                        .map(move |b| i * 64 + b)
                })
                .collect();
            let mut want = f.first_probes(f.probe(n))[..hashes as usize].to_vec();
            want.sort_unstable();
            want.dedup();
            assert_eq!(set, want, "the crate set other bits than computed");
            f.prefetch(n);
        }
        // After a snapshot round trip, which rebuilds the hasher from the stored seed.
        let f = OptOutFilter::with_seed(10_000, 0.001, 1, [6u8; 32]).expect("valid rate");
        let (back, _) = OptOutFilter::from_snapshot(&f.to_snapshot(Version::ZERO)).expect("ok");
        assert_eq!(back.first_probes(back.probe(n)), f.first_probes(f.probe(n)));
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

    /// At 5 M-like density (sized for what it holds), the filter stays within the issue's
    /// memory target: at most 16 bits per opt-out, and the measured rate near the target.
    #[test]
    fn sixteen_bits_or_fewer_per_opt_out_at_the_target_rate() {
        let f = OptOutFilter::with_seed(200_000, 0.001, 1, [9u8; 32]).expect("valid");
        let bits_per = f.stats().bits as f64 / 200_000.0;
        assert!(bits_per <= 16.0, "{bits_per} bits per opt-out");
    }

    #[test]
    fn a_snapshot_of_another_format_is_refused_not_misread() {
        let f = OptOutFilter::new(5000, 0.01, 1).expect("valid");
        let mut bytes = f.to_snapshot(Version::ZERO);
        bytes[4] = 1;
        let body = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            OptOutFilter::from_snapshot(&bytes),
            Err(FilterError::SnapshotFormat {
                expected: 2,
                got: 1
            })
        ));
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
