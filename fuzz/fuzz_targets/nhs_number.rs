//! The NHS number parser never panics, and whatever it accepts round-trips: its ten digits parse
//! to the same number, obey the modulus-11 rule, and are not a placeholder.
#![no_main]
use libfuzzer_sys::fuzz_target;
use optout_core::NhsNumber;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(n) = NhsNumber::parse(&text) {
        let digits = n.to_string();
        assert_eq!(digits.len(), 10);
        assert_eq!(NhsNumber::parse(&digits), Ok(n));
        assert_eq!(NhsNumber::from_u64(n.as_u64()), Ok(n));
        let d: Vec<u32> = digits.bytes().map(|b| u32::from(b - b'0')).collect();
        let sum: u32 = d[..9].iter().zip((2..=10).rev()).map(|(x, w)| x * w).sum();
        let check = (11 - sum % 11) % 11;
        assert!(check != 10 && check == d[9]);
        assert!(n.as_u64() != 0 && n.as_u64() != 9_999_999_999);
    }
});
