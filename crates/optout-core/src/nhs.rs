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
//! NHS number has such a prefix), and the placeholders 000 000 0000 and 999 999 9999, which pass
//! the checksum but are not patients. Synthetic test numbers (999 xxx xxxx) are valid.

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
        std::str::from_utf8(input)
            .map_err(|_| NhsNumberError::Format)
            .and_then(Self::parse)
    }

    /// Checks a ten-digit value (as stored) against the rule.
    pub fn from_u64(value: u64) -> Result<Self, NhsNumberError> {
        if value > 9_999_999_999 {
            return Err(NhsNumberError::Format);
        }
        let mut digits = [0u8; 10];
        let mut v = value;
        for d in digits.iter_mut().rev() {
            *d = (v % 10) as u8;
            v /= 10;
        }
        Self::from_digits(&digits)
    }

    fn from_digits(digits: &[u8; 10]) -> Result<Self, NhsNumberError> {
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
}
