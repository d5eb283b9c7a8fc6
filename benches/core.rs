//! What the check path spends per NHS number before any store round trip: parsing the string the
//! client sent, and asking the opted-out filter; and the audit digest of each released number. Most numbers of real traffic (about 95%) are not
//! opted out and end there, so these two set the ceiling of numbers per second per core.
//!
//! The filter is sized and filled like production: 5,000,000 opt-outs at a 0.1% false-positive
//! target (set OPTOUT_BENCH_OPT_OUTS for another size; CI runs this once with a small one).
//! Lookups are of numbers that were inserted ("present") and of numbers that were not ("absent",
//! the common case); a bloom filter answers "absent" at the first unset bit, so it is cheaper.

use std::hint::black_box;

mod support;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use optout::core::{NhsNumber, OptOutFilter};
use support::{opt_outs, valid};

fn parse(c: &mut Criterion) {
    let numbers = valid(4_000_000_000, 1000);
    let plain: Vec<String> = numbers.iter().map(|n| n.to_string()).collect();
    let spaced: Vec<String> = plain
        .iter()
        .map(|s| format!("{} {} {}", &s[..3], &s[3..6], &s[6..]))
        .collect();
    let mut g = c.benchmark_group("nhs_number_parse");
    g.throughput(Throughput::Elements(plain.len() as u64));
    g.bench_function("ten_digits", |b| {
        b.iter(|| {
            for s in &plain {
                let _ = black_box(NhsNumber::parse(black_box(s)));
            }
        })
    });
    // The server's path: the bytes as received.
    g.bench_function("ten_digits_bytes", |b| {
        b.iter(|| {
            for s in &plain {
                let _ = black_box(NhsNumber::parse_bytes(black_box(s.as_bytes())));
            }
        })
    });
    g.bench_function("spaced_3_3_4", |b| {
        b.iter(|| {
            for s in &spaced {
                let _ = black_box(NhsNumber::parse(black_box(s)));
            }
        })
    });
    g.finish();
}

fn filter(c: &mut Criterion) {
    let count = opt_outs();
    let inserted = valid(4_000_000_000, count);
    let mut f =
        OptOutFilter::with_seed(count as u64, 0.001, 1, *b"0123456789abcdefFEDCBA9876543210")
            .expect("valid rate");
    for n in &inserted {
        f.insert(*n);
    }
    let present: Vec<NhsNumber> = inserted.iter().step_by(7).copied().collect();
    // Many distinct numbers, 1,000 per iteration in turn: traffic does not ask the same 1,000
    // numbers again and again, and the same ones would stay in the CPU cache and hide the misses
    // that dominate a filter of millions.
    let absent = valid(6_000_000_000, 1_000_000);
    let mut g = c.benchmark_group("filter_lookup");
    g.throughput(Throughput::Elements(1000));
    let mut at = 0;
    g.bench_function("absent", |b| {
        b.iter(|| {
            at = (at + 1000) % absent.len();
            for n in &absent[at..at + 1000] {
                black_box(f.may_contain(black_box(*n)));
            }
        })
    });
    // As the check path does it: the first probes of the number 8 ahead are prefetched.
    let mut at = 0;
    g.bench_function("absent_prefetched", |b| {
        b.iter(|| {
            at = (at + 1000) % absent.len();
            let batch = &absent[at..at + 1000];
            for (i, n) in batch.iter().enumerate() {
                if let Some(next) = batch.get(i + 8) {
                    f.prefetch(*next);
                }
                black_box(f.may_contain(black_box(*n)));
            }
        })
    });
    let mut at = 0;
    g.bench_function("present", |b| {
        b.iter(|| {
            at = (at + 1000) % present.len().max(1000);
            for n in present[at..].iter().take(1000) {
                black_box(f.may_contain(black_box(*n)));
            }
        })
    });
    g.finish();
}

/// The audit encryption of the numbers, computed (off the hot path, but on the same cores) for every released number.
fn audit_digest(c: &mut Criterion) {
    let key = optout::core::AuditKey::new(&[7u8; 32]).expect("key");
    let numbers = valid(4_000_000_000, 1000);
    let mut g = c.benchmark_group("audit_digest");
    g.throughput(Throughput::Elements(1000));
    // What records hold now: the numbers AES-128-CTR encrypted, a block of keystream for four.
    g.bench_function("aes128_ctr", |b| {
        b.iter(|| black_box(key.digests(black_box(numbers.iter().copied()))))
    });
    // The baseline: the 8-byte truncated AES digests records held before, one AES a number.
    g.bench_function("aes256_truncated", |b| {
        b.iter(|| black_box(key.aes8_digests(black_box(numbers.iter().copied()))))
    });
    g.finish();
}

/// Population mode's membership test (an exact roaring set of number bodies), asked for every
/// released number: its cost per lookup, and its memory per million patients for two shapes of
/// population, printed first. Scattered: numbers drawn across the England range (400 000 000 0 to
/// 499 999 999 9), as a practice's or a region's patients are. Consecutive: a block of numbers as
/// allocated, the densest case.
fn population(c: &mut Criterion) {
    use optout::core::coverage::Population;
    let count = opt_outs();
    let scattered: Vec<NhsNumber> = {
        // A fixed multiplicative walk over the range: reproducible, no RNG needed.
        let mut v = Vec::with_capacity(count);
        let mut x: u64 = 12_345;
        while v.len() < count {
            x = (x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407))
                >> 1;
            if let Ok(n) = NhsNumber::from_u64(4_000_000_000 + x % 1_000_000_000) {
                v.push(n);
            }
        }
        v
    };
    let consecutive = valid(4_000_000_000, count);
    let mut sets = Vec::new();
    for (name, numbers) in [("scattered", &scattered), ("consecutive", &consecutive)] {
        let mut p = Population::new();
        for n in numbers.iter() {
            p.insert(*n);
        }
        let flat = p.clone().for_lookups();
        let mib_per_million =
            |bytes: usize| bytes as f64 * 1_000_000.0 / p.len() as f64 / (1024.0 * 1024.0);
        println!(
            "population {name}: {} patients; roaring {} bytes ({:.2} MiB per million patients); \
             held for lookups as {} ({} bytes, {:.2} MiB per million)",
            p.len(),
            p.serialized_size(),
            mib_per_million(p.serialized_size()),
            if flat.is_dense() {
                "a flat bit array"
            } else {
                "roaring"
            },
            flat.memory_bytes(),
            mib_per_million(flat.memory_bytes()),
        );
        sets.push((format!("{name}_roaring"), p, numbers));
        sets.push((format!("{name}_held"), flat, numbers));
    }
    let absent = valid(6_000_000_000, 1_000_000);
    let mut g = c.benchmark_group("population_contains");
    g.throughput(Throughput::Elements(1000));
    for (name, p, members) in &sets {
        let mut at = 0;
        g.bench_function(format!("{name}_member"), |b| {
            b.iter(|| {
                at = (at + 1000) % members.len().saturating_sub(1000).max(1);
                for n in &members[at..at + 1000] {
                    black_box(p.contains(black_box(*n)));
                }
            })
        });
        let mut at = 0;
        g.bench_function(format!("{name}_outside"), |b| {
            b.iter(|| {
                at = (at + 1000) % absent.len().saturating_sub(1000).max(1);
                for n in &absent[at..at + 1000] {
                    black_box(p.contains(black_box(*n)));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, parse, filter, audit_digest, population);
criterion_main!(benches);
