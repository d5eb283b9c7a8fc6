//! The NHS number rule against an independent oracle: the PyPI `nhs-number` package (pinned in
//! `tests/nhs-oracle-requirements.txt`, installed by `scripts/test.sh`), over a million random
//! ten-digit strings, every boundary of the numbering ranges, and every DDMMYY prefix of the
//! Scottish CHI range with a valid check digit. Zero disagreements, apart from the two docs/src/using.md
//! lists: 000 000 0000 and 999 999 9999 pass the checksum, and the oracle accepts them, but they
//! are placeholders, not patients.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use optout::core::NhsNumber;

/// Deliberate disagreements (docs/src/using.md, "What is accepted as an NHS number").
const PLACEHOLDERS: [&str; 2] = ["0000000000", "9999999999"];

/// A small deterministic generator (splitmix64): the same candidates on every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The nine digits `prefix` with the check digit that makes them valid, if there is one.
fn with_check_digit(prefix: u64) -> Option<String> {
    let digits: Vec<u32> = format!("{prefix:09}")
        .bytes()
        .map(|b| u32::from(b - b'0'))
        .collect();
    let sum: u32 = digits.iter().zip((2..=10).rev()).map(|(d, w)| d * w).sum();
    match 11 - sum % 11 {
        10 => None,
        11 => Some(format!("{prefix:09}0")),
        c => Some(format!("{prefix:09}{c}")),
    }
}

fn candidates() -> Vec<String> {
    let mut rng = SplitMix(0x5EED);
    let mut out: Vec<String> = (0..1_000_000)
        .map(|_| format!("{:010}", rng.next() % 10_000_000_000))
        .collect();
    // Every range boundary, a number either side, and every check digit of their prefixes.
    let bounds: [u64; 18] = [
        10,
        99_999_999,
        100_000_000,
        3_112_999_999,
        3_113_000_000,
        3_199_999_999,
        3_200_000_000,
        3_999_999_999,
        4_000_000_000,
        4_999_999_999,
        5_000_000_000,
        5_999_999_999,
        6_000_000_000,
        7_999_999_999,
        8_000_000_000,
        8_599_999_999,
        9_000_000_000,
        9_999_999_999,
    ];
    for b in bounds {
        for v in b.saturating_sub(1)..=(b + 1).min(9_999_999_999) {
            out.push(format!("{v:010}"));
            for last in 0..10 {
                out.push(format!("{:09}{last}", v / 10));
            }
        }
    }
    // Every DDMMYY from 000000 to 311399 (days and months out of range too), with random middle
    // digits and the check digit that makes them valid: the CHI date rule, all of it.
    for day in 0..=31u64 {
        for month in 0..=13u64 {
            for year in 0..=99u64 {
                let prefix = ((day * 100 + month) * 100 + year) * 1000 + rng.next() % 1000;
                out.extend(with_check_digit(prefix));
            }
        }
    }
    out
}

fn oracle_python() -> String {
    if let Ok(p) = std::env::var("OPTOUT_NHS_ORACLE_PYTHON") {
        return p;
    }
    let local = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/tools/nhs-oracle/bin/python"
    );
    assert!(
        std::path::Path::new(local).exists(),
        "the NHS number oracle is not installed: run `bash scripts/test.sh` (it installs the \
         pinned nhs-number package into target/tools/nhs-oracle), or set \
         OPTOUT_NHS_ORACLE_PYTHON to a python that can `import nhs_number`"
    );
    local.to_string()
}

#[test]
fn the_rule_agrees_with_the_nhs_number_package_on_every_candidate() {
    let all = candidates();
    let mut child = Command::new(oracle_python())
        .args([
            "-c",
            "import sys, nhs_number\n\
             lines = sys.stdin.read().split('\\n')[:-1]\n\
             sys.stdout.write(''.join('1' if nhs_number.is_valid(l) else '0' for l in lines))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the oracle's python starts");
    let mut input = child.stdin.take().expect("stdin");
    let text: String = all.iter().map(|c| format!("{c}\n")).collect();
    let writer = std::thread::spawn(move || input.write_all(text.as_bytes()));
    let out = child.wait_with_output().expect("the oracle answers");
    writer.join().expect("join").expect("write");
    assert!(out.status.success(), "the oracle failed");
    let verdicts = String::from_utf8(out.stdout).expect("ascii");
    assert_eq!(verdicts.len(), all.len(), "one verdict a candidate");

    let mut disagreements = Vec::new();
    let mut valid = 0usize;
    for (c, v) in all.iter().zip(verdicts.bytes()) {
        let ours = NhsNumber::parse(c).is_ok();
        valid += usize::from(ours);
        if ours != (v == b'1') && !PLACEHOLDERS.contains(&c.as_str()) {
            disagreements.push(format!("{c}: ours {ours}, oracle {}", v == b'1'));
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} disagreements, first: {:?}",
        disagreements.len(),
        &disagreements[..disagreements.len().min(10)]
    );
    // The candidates exercise both answers, not just one.
    assert!(valid > 100_000 && valid < all.len() / 2, "{valid} valid");
    for p in PLACEHOLDERS {
        assert!(NhsNumber::parse(p).is_err());
    }
}
