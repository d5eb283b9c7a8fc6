//! The NHS number: the one place where its rule lives.
//!
//! What is accepted (after trimming surrounding whitespace, which CSV cells often carry):
//! - ten digits: `9434765919`;
//! - the 3-3-4 form people read, with single spaces: `943 476 5919`;
//! - the same with single dashes: `943-476-5919`.
//!
//! Everything else is invalid and so withheld: other separators or mixed ones, nine digits (a
//! spreadsheet that dropped a leading zero: padding it back could turn a typo into another
//! patient's valid number, so we refuse to guess), a wrong check digit, a check digit of 10 (no
//! NHS number has such a prefix), the placeholders 000 000 0000 and 999 999 9999, which pass
//! the checksum but are not patients, and a number in the Scottish CHI range (010 101 0000 to
//! 311 299 9999) whose first six digits are not a calendar date (DDMMYY, the date of birth a CHI
//! number begins with). Synthetic test numbers (999 xxx xxxx) are valid.
//!
//! [`Scheme`] names the numbering scheme a number belongs to (England, Wales and the Isle of Man;
//! Scotland's CHI; Northern Ireland's H&C; ...), with the ranges of the PyPI `nhs-number` package,
//! against which `tests/it/nhs_oracle.rs` checks this rule.

use std::fmt;

/// A valid NHS number, held as its ten-digit value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NhsNumber(u64);

/// Why a string is not a valid NHS number. Carries no digits of the input, so it is safe to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NhsNumberError {
    /// Not ten digits in one of the accepted layouts.
    #[error("not 10 digits, nor 3-3-4 digits separated by single spaces or dashes")]
    Format,
    /// The tenth digit does not match the check digit computed from the first nine.
    #[error("the check digit does not match")]
    CheckDigit,
    /// The first nine digits give a check digit of 10: no NHS number has that prefix.
    #[error("the first nine digits give a check digit of 10, which no NHS number has")]
    CheckDigitTen,
    /// 000 000 0000 or 999 999 9999: they pass the checksum but are placeholders.
    #[error("a placeholder number, not a patient")]
    Placeholder,
    /// In the Scottish CHI range, but the first six digits are not a date of birth (DDMMYY).
    #[error(
        "in the Scottish CHI range (010 101 0000 to 311 299 9999) but its first six digits are \
         not a date (DDMMYY)"
    )]
    ChiDate,
}

/// The numbering scheme a ten-digit number falls in (ranges inclusive, as the PyPI `nhs-number`
/// package and the NHS Data Dictionary give them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// 400 000 0000 to 499 999 9999 and 600 000 0000 to 799 999 9999: NHS numbers of England,
    /// Wales and the Isle of Man.
    EnglandWalesIsleOfMan,
    /// 010 000 0000 to 311 299 9999: Scotland's Community Health Index; DDMMYY first.
    ScotlandChi,
    /// 320 000 0000 to 399 999 9999: Northern Ireland's Health and Care numbers.
    NorthernIrelandHc,
    /// 800 000 0000 to 859 999 9999: the Republic of Ireland's Individual Health Identifier.
    IrelandIhi,
    /// 900 000 0000 to 999 999 9999: not issued to patients; test and synthetic numbers.
    Test,
    /// 500 000 0000 to 599 999 9999: reserved, not to be issued.
    Reserved,
    /// Any other range: not allocated to any scheme.
    Unallocated,
}

impl Scheme {
    /// The scheme of a ten-digit value.
    pub fn of(value: u64) -> Scheme {
        match value {
            100_000_000..=3_112_999_999 => Scheme::ScotlandChi,
            3_200_000_000..=3_999_999_999 => Scheme::NorthernIrelandHc,
            4_000_000_000..=4_999_999_999 | 6_000_000_000..=7_999_999_999 => {
                Scheme::EnglandWalesIsleOfMan
            }
            5_000_000_000..=5_999_999_999 => Scheme::Reserved,
            8_000_000_000..=8_599_999_999 => Scheme::IrelandIhi,
            9_000_000_000..=9_999_999_999 => Scheme::Test,
            _ => Scheme::Unallocated,
        }
    }

    /// What to call it.
    pub fn describe(self) -> &'static str {
        match self {
            Scheme::EnglandWalesIsleOfMan => "NHS number (England, Wales, Isle of Man)",
            Scheme::ScotlandChi => "CHI number (Scotland)",
            Scheme::NorthernIrelandHc => "H&C number (Northern Ireland)",
            Scheme::IrelandIhi => "IHI range (Republic of Ireland)",
            Scheme::Test => "test and synthetic range (not issued to patients)",
            Scheme::Reserved => "reserved range (not to be issued)",
            Scheme::Unallocated => "unallocated range",
        }
    }
}

/// Whether DDMMYY (the first six digits) is a calendar date. Two-digit years are 1969-2068, as
/// Python's `%y` reads them; in that span a year is a leap year exactly when divisible by 4.
fn is_ddmmyy(digits: &[u8]) -> bool {
    let two = |i: usize| u32::from(digits[i]) * 10 + u32::from(digits[i + 1]);
    let (day, month, year) = (two(0), two(2), two(4));
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

const PLACEHOLDERS: [u64; 2] = [0, 9_999_999_999];

impl NhsNumber {
    /// Parses one NHS number in any accepted layout (see the module docs).
    pub fn parse(input: &str) -> Result<Self, NhsNumberError> {
        let bytes = input.trim().as_bytes();
        let mut digits = [0u8; 10];
        match bytes.len() {
            10 => {
                for (d, b) in digits.iter_mut().zip(bytes) {
                    *d = digit(*b)?;
                }
            }
            12 => {
                let sep = bytes[3];
                if (sep != b' ' && sep != b'-') || bytes[7] != sep {
                    return Err(NhsNumberError::Format);
                }
                let mut n = 0;
                for (i, b) in bytes.iter().enumerate() {
                    if i == 3 || i == 7 {
                        continue;
                    }
                    digits[n] = digit(*b)?;
                    n += 1;
                }
            }
            _ => return Err(NhsNumberError::Format),
        }
        Self::from_digits(&digits)
    }

    /// As [`NhsNumber::parse`], from bytes as received; bytes that are not UTF-8 are a format error.
    pub fn parse_bytes(input: &[u8]) -> Result<Self, NhsNumberError> {
        // The common form, ten ASCII digits, without the UTF-8 validation and trimming (both were
        // visible in the server's profile); anything else takes the general path.
        if let Ok(ten) = <&[u8; 10]>::try_from(input) {
            if let Some(n) = Self::valid_ten_ascii(ten) {
                return Ok(n);
            }
            if ten.iter().all(u8::is_ascii_digit) {
                return Self::from_digits(&ten.map(|b| b - b'0'));
            }
        }
        std::str::from_utf8(input)
            .map_err(|_| NhsNumberError::Format)
            .and_then(Self::parse)
    }

    /// The server's hot path: ten ASCII digits that make a valid number outside the CHI range,
    /// read as one 8-byte word and one 2-byte word (the digits checked, the value and the
    /// weighted sum of the check computed a word at a time, not a digit at a time: the scalar
    /// loops were 6.5% of the server's CPU under batches). `None` for anything else, which then
    /// takes the digit-by-digit path that names the error; so this only has to be right about
    /// what it accepts (`fast_path_agrees_with_the_rule_over_every_scheme`).
    fn valid_ten_ascii(ten: &[u8; 10]) -> Option<Self> {
        const ZEROS: u64 = 0x3030_3030_3030_3030;
        const HIGH: u64 = 0xF0F0_F0F0_F0F0_F0F0;
        const SIX: u64 = 0x0606_0606_0606_0606;
        const LOW16: u64 = 0x00FF_00FF_00FF_00FF;
        let (head, tail) = ten.split_first_chunk::<8>()?;
        let a = u64::from_le_bytes(*head);
        let (d8, d9) = (tail[0].wrapping_sub(b'0'), tail[1].wrapping_sub(b'0'));
        // Every byte 0x30..=0x39: its high nibble 3, and its low nibble still below 10 with 6
        // added (adding 6 to a nibble of 10 or more carries into the high nibble; a high nibble of
        // 3 plus that carry cannot carry into the next byte).
        if a & HIGH != ZEROS || a.wrapping_add(SIX) & HIGH != ZEROS || d8 > 9 || d9 > 9 {
            return None;
        }
        // Byte i is digit i (the first, most significant, in the lowest byte).
        let d = a - ZEROS;
        // The first eight digits' value: pairs, then fours, then all eight.
        let mut v = (d.wrapping_mul(10) + (d >> 8)) & LOW16;
        v = (v.wrapping_mul(100) + (v >> 16)) & 0x0000_FFFF_0000_FFFF;
        v = (v.wrapping_mul(10_000) + (v >> 32)) & 0xFFFF_FFFF;
        let value = v * 100 + u64::from(d8) * 10 + u64::from(d9);
        // Weights 10 down to 3 on the first eight digits: 2 on each, plus 8 - i on digit i, which
        // is the sum of the prefix sums. Byte j of `prefix` is digits 0..=j summed (at most 72, so
        // no byte carries into the next); byte 7 is the sum of all eight.
        let prefix = d.wrapping_mul(0x0101_0101_0101_0101);
        let pairs = (prefix & LOW16) + ((prefix >> 8) & LOW16);
        let of_prefixes = pairs.wrapping_mul(0x0001_0001_0001_0001) >> 48;
        let sum = 2 * (prefix >> 56) + of_prefixes + 2 * u64::from(d8);
        let check = match 11 - (sum % 11) {
            11 => 0,
            c => c,
        };
        // A check of 10 never equals a digit.
        if check != u64::from(d9) || PLACEHOLDERS.contains(&value) {
            return None;
        }
        let n = NhsNumber(value);
        (n.scheme() != Scheme::ScotlandChi).then_some(n)
    }

    /// Checks a ten-digit value against the rule.
    pub fn from_u64(value: u64) -> Result<Self, NhsNumberError> {
        Self::from_digits(&Self::digits_of(value)?)
    }

    /// A number as the store holds it: ten digits with a matching check digit, without the rules
    /// added since (the CHI date). A number stored before a rule came must still be read back: a
    /// store that could not be scanned because of one would withhold everyone. Input is always
    /// parsed by the full rule, so such a number is never asked about as valid.
    pub fn from_stored(value: u64) -> Result<Self, NhsNumberError> {
        Self::checksum(&Self::digits_of(value)?)
    }

    fn digits_of(value: u64) -> Result<[u8; 10], NhsNumberError> {
        if value > 9_999_999_999 {
            return Err(NhsNumberError::Format);
        }
        let mut digits = [0u8; 10];
        let mut v = value;
        for d in digits.iter_mut().rev() {
            *d = (v % 10) as u8;
            v /= 10;
        }
        Ok(digits)
    }

    /// The numbering scheme this number belongs to.
    pub fn scheme(self) -> Scheme {
        Scheme::of(self.0)
    }

    fn from_digits(digits: &[u8; 10]) -> Result<Self, NhsNumberError> {
        let n = Self::checksum(digits)?;
        if n.scheme() == Scheme::ScotlandChi && !is_ddmmyy(&digits[..6]) {
            return Err(NhsNumberError::ChiDate);
        }
        Ok(n)
    }

    fn checksum(digits: &[u8; 10]) -> Result<Self, NhsNumberError> {
        let sum: u32 = digits[..9]
            .iter()
            .zip((2..=10).rev())
            .map(|(d, w)| u32::from(*d) * w)
            .sum();
        let check = match 11 - (sum % 11) {
            11 => 0,
            10 => return Err(NhsNumberError::CheckDigitTen),
            c => c,
        };
        if u32::from(digits[9]) != check {
            return Err(NhsNumberError::CheckDigit);
        }
        let value = digits.iter().fold(0u64, |acc, d| acc * 10 + u64::from(*d));
        if PLACEHOLDERS.contains(&value) {
            return Err(NhsNumberError::Placeholder);
        }
        Ok(NhsNumber(value))
    }

    /// The ten-digit value, as stored.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

fn digit(b: u8) -> Result<u8, NhsNumberError> {
    if b.is_ascii_digit() {
        Ok(b - b'0')
    } else {
        Err(NhsNumberError::Format)
    }
}

/// The ten digits without separators. Personal data: never log it.
impl fmt::Display for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:010}", self.0)
    }
}

impl std::str::FromStr for NhsNumber {
    type Err = NhsNumberError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_examples_from_the_domain_notes_parse_in_every_layout() {
        for n in ["943 476 5919", "401 023 2137", "900 000 0009"] {
            let plain: String = n.chars().filter(|c| *c != ' ').collect();
            let dashed = n.replace(' ', "-");
            let want = NhsNumber::parse(&plain).expect("plain form is valid");
            assert_eq!(NhsNumber::parse(n), Ok(want), "{n}");
            assert_eq!(NhsNumber::parse(&dashed), Ok(want), "{dashed}");
            assert_eq!(NhsNumber::parse(&format!("  {n}\t")), Ok(want));
            assert_eq!(want.to_string(), plain);
        }
    }

    #[test]
    fn wrong_check_digits_are_rejected() {
        assert_eq!(
            NhsNumber::parse("987 654 4321"),
            Err(NhsNumberError::CheckDigit)
        );
        assert_eq!(
            NhsNumber::parse("485 777 3456"),
            Err(NhsNumberError::CheckDigit)
        );
        // The right check digits for those prefixes are 2 and 7.
        assert!(NhsNumber::parse("987 654 4322").is_ok());
        assert!(NhsNumber::parse("485 777 3457").is_ok());
    }

    #[test]
    fn a_check_digit_of_ten_is_invalid_whatever_the_last_digit() {
        for last in 0..=9 {
            assert_eq!(
                NhsNumber::parse(&format!("123456789{last}")),
                Err(NhsNumberError::CheckDigitTen)
            );
            assert_eq!(
                NhsNumber::parse(&format!("999000000{last}")),
                Err(NhsNumberError::CheckDigitTen)
            );
        }
    }

    /// The number with prefix `p` (nine digits) and its valid check digit.
    fn valid_with(p: u64) -> Option<String> {
        (0..10).map(|c| format!("{p:09}{c}")).find(|s| {
            NhsNumber::parse(s).is_ok() || NhsNumber::parse(s) == Err(NhsNumberError::ChiDate)
        })
    }

    #[test]
    fn a_chi_number_must_begin_with_a_date_of_birth() {
        // 01/01/00, 29/02/00 (2000 is a leap year), 31/12/99: dates; with a valid check digit.
        for ok in [10_100_123u64, 290_200_123, 311_299_123, 150_668_001] {
            let n = valid_with(ok).expect("a check digit exists");
            assert!(NhsNumber::parse(&n).is_ok(), "{n}");
            assert_eq!(
                NhsNumber::parse(&n).expect("valid").scheme(),
                Scheme::ScotlandChi
            );
        }
        // 29/02/01 (not a leap year), 31/04/97, 15/00/50, 15/13/50. (Day 00 or 32 and up are
        // below or above the CHI range: unallocated numbers, accepted like any other.)
        for bad in [290_201_123u64, 310_497_123, 150_050_123, 151_350_123] {
            let n = valid_with(bad).expect("a check digit exists");
            assert_eq!(NhsNumber::parse(&n), Err(NhsNumberError::ChiDate), "{n}");
            // Read back from a store that holds it from before the rule: still a number.
            let v: u64 = n.parse().expect("digits");
            assert!(NhsNumber::from_stored(v).is_ok());
            assert!(NhsNumber::from_u64(v).is_err());
        }
        assert_eq!(Scheme::of(3_113_000_000), Scheme::Unallocated);
        assert_eq!(Scheme::of(3_200_000_000), Scheme::NorthernIrelandHc);
        assert_eq!(Scheme::of(4_010_232_137), Scheme::EnglandWalesIsleOfMan);
        assert_eq!(Scheme::of(7_999_999_999), Scheme::EnglandWalesIsleOfMan);
        assert_eq!(Scheme::of(5_000_000_000), Scheme::Reserved);
        assert_eq!(Scheme::of(8_599_999_999), Scheme::IrelandIhi);
        assert_eq!(Scheme::of(8_600_000_000), Scheme::Unallocated);
        assert_eq!(Scheme::of(9_434_765_919), Scheme::Test);
        assert_eq!(Scheme::of(99_999_999), Scheme::Unallocated);
    }

    #[test]
    fn placeholders_pass_the_checksum_but_are_rejected() {
        assert_eq!(
            NhsNumber::parse("000 000 0000"),
            Err(NhsNumberError::Placeholder)
        );
        assert_eq!(
            NhsNumber::parse("9999999999"),
            Err(NhsNumberError::Placeholder)
        );
    }

    #[test]
    fn other_layouts_are_rejected() {
        for bad in [
            "",
            "943476591",     // nine digits: a dropped leading zero is not guessed back
            "94347659190",   // eleven
            "943 476-5919",  // mixed separators
            "943  476 5919", // double space
            "9434 76 5919",  // wrong grouping
            "943.476.5919",  // other separator
            "94347659l9",    // a letter
            "+943476591",    // a sign
            "９４３４７６５９１９", // full-width digits
        ] {
            assert_eq!(
                NhsNumber::parse(bad),
                Err(NhsNumberError::Format),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn from_u64_applies_the_same_rule() {
        assert_eq!(
            NhsNumber::from_u64(9_434_765_919).map(|n| n.as_u64()),
            Ok(9_434_765_919)
        );
        assert_eq!(
            NhsNumber::from_u64(9_876_544_321),
            Err(NhsNumberError::CheckDigit)
        );
        assert_eq!(
            NhsNumber::from_u64(10_000_000_000),
            Err(NhsNumberError::Format)
        );
        assert_eq!(NhsNumber::from_u64(0), Err(NhsNumberError::Placeholder));
    }

    #[test]
    fn scottish_chi_numbers_with_a_leading_zero_are_valid_as_ten_digits() {
        // 010 100 0000 range: the leading zero must be present.
        let n = (0..10)
            .map(|d| format!("010101000{d}"))
            .find(|s| NhsNumber::parse(s).is_ok())
            .expect("some check digit fits");
        assert!(NhsNumber::parse(&n[1..]).is_err());
    }

    /// The word-at-a-time fast path accepts exactly the numbers the digit-by-digit rule does,
    /// across every scheme's boundaries, and refuses nothing valid that it could take. A run of
    /// consecutive values at each edge, so every check digit and both sides of each range are
    /// seen.
    #[test]
    fn fast_path_agrees_with_the_rule_over_every_scheme() {
        let edges = [
            0u64,
            99_990_000,
            3_112_990_000,
            3_199_990_000,
            3_999_990_000,
            4_999_990_000,
            5_999_990_000,
            7_999_990_000,
            8_599_990_000,
            8_999_990_000,
            9_999_980_000,
            4_123_450_000,
        ];
        let mut accepted = 0;
        for from in edges {
            for value in from..(from + 20_000).min(10_000_000_000) {
                let text = format!("{value:010}");
                let digits: [u8; 10] = text.as_bytes().try_into().expect("ten digits");
                let rule = NhsNumber::from_digits(&digits.map(|b| b - b'0'));
                let fast = NhsNumber::valid_ten_ascii(&digits);
                if let Some(n) = fast {
                    accepted += 1;
                    assert_eq!(Ok(n), rule, "the fast path accepted {value:010}");
                } else if let Ok(n) = rule {
                    assert_eq!(
                        n.scheme(),
                        Scheme::ScotlandChi,
                        "the fast path refused the valid {value:010}"
                    );
                }
                assert_eq!(NhsNumber::parse_bytes(&digits), rule, "{value:010}");
            }
        }
        assert!(accepted > 10_000, "only {accepted} accepted");
        // Bytes just outside '0'..='9' in every position.
        for pos in 0..10 {
            for bad in [b'/', b':', b' ', 0x80, 0xB0, 0x39 + 0x10] {
                let mut digits = *b"9434765919";
                digits[pos] = bad;
                assert_eq!(NhsNumber::valid_ten_ascii(&digits), None, "{digits:?}");
            }
        }
        assert!(NhsNumber::valid_ten_ascii(b"9434765919").is_some());
    }

    proptest::proptest! {
        /// The bytes fast path answers exactly as parsing the text does: ten digits (every
        /// rule: check digit, placeholders, CHI dates), and any other bytes, near misses included.
        #[test]
        fn parse_bytes_agrees_with_parse(
            value in 0u64..10_000_000_000,
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..14),
            pick in 0u8..3,
        ) {
            let input: Vec<u8> = match pick {
                0 => format!("{value:010}").into_bytes(),
                1 => noise,
                _ => {
                    let mut b = format!("{value:010}").into_bytes();
                    if let Some(first) = noise.first() {
                        b[usize::from(*first) % 10] = *first;
                    }
                    b
                }
            };
            let want = std::str::from_utf8(&input)
                .map_err(|_| NhsNumberError::Format)
                .and_then(NhsNumber::parse);
            proptest::prop_assert_eq!(NhsNumber::parse_bytes(&input), want);
        }
    }
}
