//! The synthetic population: which valid NHS numbers are planted as opt-outs, regenerable from a
//! seed without storing them.
//!
//! Numbers come from the England range (prefixes 400,000,000 to 499,999,999). Index `i` maps to
//! prefix `400,000,000 + (i * STRIDE + offset) mod 10^8`; STRIDE is coprime with 10^8, so the map
//! is a permutation and membership is a multiplication by STRIDE's inverse. Planted numbers are
//! indices `0..limit` whose prefix has a valid check digit; clean numbers are indices from `limit`
//! on. About 1 prefix in 11 has no valid check digit and is skipped.

use optout_core::NhsNumber;

const BASE: u64 = 400_000_000;
const SPACE: u64 = 100_000_000;
const STRIDE: u64 = 61_681_723;

/// A seeded population of `count` planted opt-outs.
#[derive(Clone, Debug)]
pub struct Population {
    offset: u64,
    inverse: u64,
    /// Indices below this are planted (valid ones), at or above are clean.
    limit: u64,
    count: u64,
    /// Clean indices drawn from: `limit..limit + pool` (all of the rest when `None`). Bounded, it
    /// is the checked population of a store in population mode (with the planted ones).
    pool: Option<u64>,
}

fn inverse_mod(a: u64, m: u64) -> u64 {
    // Extended Euclid on i128.
    let (mut t, mut new_t) = (0i128, 1i128);
    let (mut r, mut new_r) = (i128::from(m), i128::from(a));
    while new_r != 0 {
        let q = r / new_r;
        (t, new_t) = (new_t, t - q * new_t);
        (r, new_r) = (new_r, r - q * new_r);
    }
    u64::try_from(t.rem_euclid(i128::from(m))).unwrap_or(0)
}

/// The valid NHS number with this 9-digit prefix, if its check digit is not 10.
pub fn with_check_digit(prefix: u64) -> Option<NhsNumber> {
    let mut sum = 0;
    let mut p = prefix;
    for w in 2..=10u64 {
        sum += (p % 10) * w;
        p /= 10;
    }
    let check = match 11 - sum % 11 {
        11 => 0,
        10 => return None,
        c => c,
    };
    NhsNumber::from_u64(prefix * 10 + check).ok()
}

impl Population {
    /// `count` planted opt-outs (at most about 90 million) under `seed`.
    pub fn new(seed: u64, count: u64) -> Population {
        let mut p = Population {
            offset: seed % SPACE,
            inverse: inverse_mod(STRIDE, SPACE),
            limit: 0,
            count: count.min(SPACE / 2),
            pool: None,
        };
        let mut found = 0;
        let mut i = 0;
        while found < p.count {
            if p.at(i).is_some() {
                found += 1;
            }
            i += 1;
        }
        p.limit = i;
        p
    }

    fn prefix(&self, i: u64) -> u64 {
        BASE + (i.wrapping_mul(STRIDE) % SPACE + self.offset) % SPACE
    }

    fn at(&self, i: u64) -> Option<NhsNumber> {
        with_check_digit(self.prefix(i))
    }

    /// The same population, with clean numbers drawn only from the first `pool` clean indices
    /// (0: from all of them).
    pub fn with_pool(mut self, pool: u64) -> Population {
        self.pool = (pool > 0).then_some(pool.min(SPACE - self.limit));
        self
    }

    /// The checked population of a store in population mode: every planted number and every
    /// clean one the traffic draws from, in index order (needs a pool).
    pub fn checked(&self) -> impl Iterator<Item = NhsNumber> + '_ {
        (0..self.limit + self.pool.unwrap_or(0)).filter_map(|i| self.at(i))
    }

    /// How many opt-outs are planted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Every planted number, in index order.
    pub fn planted(&self) -> impl Iterator<Item = NhsNumber> + '_ {
        (0..self.limit).filter_map(|i| self.at(i))
    }

    /// Whether a number is planted.
    pub fn is_planted(&self, n: NhsNumber) -> bool {
        let prefix = n.as_u64() / 10;
        if !(BASE..BASE + SPACE).contains(&prefix) {
            return false;
        }
        let shifted = (prefix - BASE + SPACE - self.offset) % SPACE;
        let i = u64::try_from(u128::from(shifted) * u128::from(self.inverse) % u128::from(SPACE))
            .unwrap_or(u64::MAX);
        i < self.limit
    }

    /// A random number of the traffic: planted with probability `share`, clean otherwise.
    pub fn draw(&self, rng: &mut impl rand::Rng, share: f64) -> NhsNumber {
        loop {
            let i = if rng.random_bool(share.clamp(0.0, 1.0)) && self.limit > 0 {
                rng.random_range(0..self.limit)
            } else {
                rng.random_range(self.limit..self.pool.map_or(SPACE, |p| self.limit + p))
            };
            if let Some(n) = self.at(i) {
                return n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_numbers_are_known_and_clean_ones_are_not() {
        let p = Population::new(42, 10_000);
        let planted: Vec<NhsNumber> = p.planted().collect();
        assert_eq!(planted.len(), 10_000);
        assert!(planted.iter().all(|n| p.is_planted(*n)));
        let mut rng = rand::rng();
        let mut seen_planted = 0;
        for _ in 0..10_000 {
            let n = p.draw(&mut rng, 0.05);
            if p.is_planted(n) {
                seen_planted += 1;
            }
        }
        assert!((300..700).contains(&seen_planted), "{seen_planted}");
        assert_eq!(inverse_mod(STRIDE, SPACE) * STRIDE % SPACE, 1);
        let other = Population::new(43, 10_000);
        assert!(planted.iter().filter(|n| other.is_planted(**n)).count() < 100);
    }
}
