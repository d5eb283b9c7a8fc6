//! The filter command's CSV reader never panics, hands over every row once, in order, in chunks of
//! at most the batch size, each with its NHS-number cell; or stops with a line number.
#![no_main]
use libfuzzer_sys::fuzz_target;
use optout_core::extract::{for_each_chunk, open_csv};

fuzz_target!(|data: &[u8]| {
    let batch = usize::from(data.first().copied().unwrap_or(1) % 7) + 1;
    let Ok((reader, header, column)) = open_csv(data, "nhs_number", b',') else {
        return;
    };
    assert!(column < header.len());
    let mut rows = 0usize;
    let result = for_each_chunk(reader, column, batch, |chunk, numbers| {
        assert!(!chunk.is_empty() && chunk.len() <= batch);
        assert_eq!(chunk.len(), numbers.len());
        for r in &chunk {
            assert_eq!(r.len(), header.len());
        }
        rows += chunk.len();
        Ok(())
    });
    if let Err(e) = result {
        assert!(e.starts_with("malformed CSV at line "), "{e}");
    }
});
