//! The keys-file parser never panics on any text, and every key it accepts has a valid id.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(keys) = optout_core::keys::parse_keys_file(text)
    {
        for (id, caller, _) in keys {
            assert_eq!(id.len(), 12);
            assert!(!caller.organisation.is_empty());
        }
    }
});
