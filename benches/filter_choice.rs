//! Which bloom filter implementation to put behind `OptOutFilter`: the `bloomfilter` crate (two
//! SipHashes and k probes reduced by `%`), `fastbloom` 0.14 (one SipHash, ten probes anywhere in
//! the array by double hashing and multiply-shift), plain and with the prefetch of the next
//! numbers' first two probes that `OptOutFilter` used with it, and `OptOutFilter` now (a
//! cache-line-blocked filter: one block of 64 bytes a number, prefetched eight numbers ahead, as
//! the check path uses it), all holding the same opt-outs.
//!
//! For each: lookups of numbers never inserted (most traffic), in 1,000-number batches, and, at
//! setup (printed, not timed), bits per opt-out and the false-positive rate measured on 1,000,000
//! numbers never inserted. Two sizings: the 0.1% target, and a fixed 16 bits per opt-out.
//!
//!     cargo bench --bench filter_choice            # 5,000,000 opt-outs
//!     OPTOUT_BENCH_OPT_OUTS=100000 cargo bench --bench filter_choice

use std::hint::black_box;

mod support;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use optout::core::{NhsNumber, OptOutFilter};
use support::{opt_outs, valid};

/// A prefetch of the cache line holding `w`.
fn prefetch(w: &u64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing and cannot fault; SSE is the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            std::ptr::from_ref(w).cast::<i8>(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = w;
}

fn fp_rate(absent: &[NhsNumber], contains: impl Fn(NhsNumber) -> bool) -> f64 {
    absent.iter().filter(|n| contains(**n)).count() as f64 / absent.len() as f64
}

fn choice(c: &mut Criterion) {
    let count = opt_outs();
    let inserted = valid(4_000_000_000, count);
    let absent = valid(6_000_000_000, 1_000_000);

    let mut ours =
        OptOutFilter::with_seed(count as u64, 0.001, 1, *b"0123456789abcdefFEDCBA9876543210")
            .expect("valid rate");
    for n in &inserted {
        ours.insert(*n);
    }
    let mut before = bloomfilter::Bloom::new_for_fp_rate_with_seed(
        count,
        0.001,
        b"0123456789abcdefFEDCBA9876543210",
    )
    .expect("valid rate");
    for n in &inserted {
        before.set(&n.as_u64());
    }
    let fast_target = fastbloom::BloomFilter::with_false_pos(0.001)
        .seed(&7)
        .items(inserted.iter().map(|n| n.as_u64()));
    let fast_16 = fastbloom::BloomFilter::with_num_bits(count * 16)
        .seed(&7)
        .items(inserted.iter().map(|n| n.as_u64()));
    eprintln!(
        "filter_choice: {count} opt-outs; bits per opt-out / measured false-positive rate:\n  \
         bloomfilter (0.1% target): {:.2} / {:.4}%\n  \
         OptOutFilter (0.1% target): {:.2} / {:.4}%\n  \
         fastbloom (0.1% target):   {:.2} / {:.4}%\n  \
         fastbloom (16 bits):       {:.2} / {:.4}%",
        before.len() as f64 / count as f64,
        fp_rate(&absent, |n| before.check(&n.as_u64())) * 100.0,
        ours.stats().bits as f64 / count as f64,
        fp_rate(&absent, |n| ours.may_contain(n)) * 100.0,
        fast_target.num_bits() as f64 / count as f64,
        fp_rate(&absent, |n| fast_target.contains(&n.as_u64())) * 100.0,
        fast_16.num_bits() as f64 / count as f64,
        fp_rate(&absent, |n| fast_16.contains(&n.as_u64())) * 100.0,
    );

    let mut g = c.benchmark_group("filter_choice_absent");
    g.throughput(Throughput::Elements(1000));
    let mut at = 0;
    g.bench_function("bloomfilter", |b| {
        b.iter(|| {
            at = (at + 1000) % absent.len();
            for n in &absent[at..at + 1000] {
                black_box(before.check(&black_box(n.as_u64())));
            }
        })
    });
    let mut at = 0;
    g.bench_function("optout_filter_prefetched", |b| {
        b.iter(|| {
            at = (at + 1000) % (absent.len() - 1008);
            let batch = &absent[at..at + 1008];
            let mut ring: Vec<_> = batch[..8].iter().map(|n| ours.probe(*n)).collect();
            for p in &ring {
                ours.prefetch_probe(*p);
            }
            for j in 0..1000 {
                let next = ours.probe(batch[j + 8]);
                ours.prefetch_probe(next);
                let probe = std::mem::replace(&mut ring[j % 8], next);
                black_box(ours.may_contain_probe(black_box(probe)));
            }
        })
    });
    // fastbloom with the prefetch OptOutFilter used with it: the words of each number's first two
    // probes, eight numbers ahead (its double hashing, as fastbloom 0.14 computes it).
    let first_two = |h: u64| {
        let bits = fast_target.num_bits() as u64;
        let mut h1 = h;
        let h2 = (h1 >> 32).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        [0, 1].map(|_| {
            h1 = h1.wrapping_add(h2).rotate_left(5);
            (((h1 >> 32).wrapping_mul(bits)) >> 32) as usize / 64
        })
    };
    let words = fast_target.as_slice();
    let mut at = 0;
    g.bench_function("fastbloom_target_prefetched", |b| {
        b.iter(|| {
            at = (at + 1000) % (absent.len() - 1008);
            let batch = &absent[at..at + 1008];
            let hash = |n: &NhsNumber| fast_target.source_hash(&n.as_u64());
            let mut ring: Vec<u64> = batch[..8].iter().map(hash).collect();
            for j in 0..1000 {
                let next = hash(&batch[j + 8]);
                for w in first_two(next) {
                    if let Some(w) = words.get(w) {
                        prefetch(w);
                    }
                }
                let h = std::mem::replace(&mut ring[j % 8], next);
                black_box(fast_target.contains_hash(black_box(h)));
            }
        })
    });
    let mut at = 0;
    g.bench_function("fastbloom_target", |b| {
        b.iter(|| {
            at = (at + 1000) % absent.len();
            for n in &absent[at..at + 1000] {
                black_box(fast_target.contains(&black_box(n.as_u64())));
            }
        })
    });
    let mut at = 0;
    g.bench_function("fastbloom_16_bits", |b| {
        b.iter(|| {
            at = (at + 1000) % absent.len();
            for n in &absent[at..at + 1000] {
                black_box(fast_16.contains(&black_box(n.as_u64())));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, choice);
criterion_main!(benches);
