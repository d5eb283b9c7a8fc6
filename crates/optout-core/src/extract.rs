//! Reading CSV extracts: the header, the NHS-number column, rows in chunks, and errors that name
//! the line. Used by `optout filter` and the fuzz targets.

use std::io::Read;

/// Opens a CSV extract: reads its header and finds the NHS-number column by name.
pub fn open_csv<R: Read>(
    input: R,
    column_name: &str,
) -> Result<(csv::Reader<R>, csv::ByteRecord, usize), String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(input);
    let header = reader
        .byte_headers()
        .map_err(|e| format!("reading the CSV header: {e}"))?
        .clone();
    let column = header
        .iter()
        .position(|h| String::from_utf8_lossy(h).trim() == column_name)
        .ok_or_else(|| {
            let names: Vec<String> = header
                .iter()
                .map(|h| String::from_utf8_lossy(h).into_owned())
                .collect();
            format!(
                "column {column_name:?} is not in the CSV header; the columns are: {}",
                names.join(", ")
            )
        })?;
    Ok((reader, header, column))
}

/// Reads every row, handing `sink` chunks of up to `batch` rows with their NHS-number cells, in
/// order. Stops at the first malformed row with its line number; rows before it were handed over.
pub fn for_each_chunk<R: Read>(
    mut reader: csv::Reader<R>,
    column: usize,
    batch: usize,
    mut sink: impl FnMut(Vec<csv::ByteRecord>, Vec<String>) -> Result<(), String>,
) -> Result<(), String> {
    let batch = batch.max(1);
    let mut rows: Vec<csv::ByteRecord> = Vec::with_capacity(batch);
    let mut record = csv::ByteRecord::new();
    let mut send = |rows: Vec<csv::ByteRecord>| {
        let numbers = rows
            .iter()
            .map(|r| String::from_utf8_lossy(r.get(column).unwrap_or_default()).into_owned())
            .collect();
        sink(rows, numbers)
    };
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                rows.push(record.clone());
                if rows.len() == batch {
                    send(std::mem::replace(&mut rows, Vec::with_capacity(batch)))?;
                }
            }
            Err(e) => {
                let line = e
                    .position()
                    .map_or_else(|| "?".to_string(), |p| p.line().to_string());
                return Err(format!("malformed CSV at line {line}: {}", describe(&e)));
            }
        }
    }
    if !rows.is_empty() {
        send(rows)?;
    }
    Ok(())
}

fn describe(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("{len} fields where the header has {expected_len}"),
        _ => e.to_string(),
    }
}
