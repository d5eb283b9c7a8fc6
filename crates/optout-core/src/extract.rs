//! Reading extracts: CSV (the header, the NHS-number column, rows in chunks) and the national file
//! check's `.dat` format (one NHS number a line followed by a comma, no header). Errors name the
//! line. Used by `optout filter`, `optout admin import` and the fuzz targets.
//!
//! Strict where a lenient reader would lose rows silently: a quoted field never closed (a file cut
//! off mid-row would otherwise read the rest of the file into one field), a row with the wrong
//! number of fields, a NUL byte, or an NHS-number cell that is not UTF-8 stops the read with the
//! line. Accepted as real exports produce them: a UTF-8 byte-order mark, CRLF or LF, the
//! delimiters `,` `;` tab and `|`, and numbers with spaces around them.

use std::{
    collections::VecDeque,
    io::{BufRead, Read},
};

/// A reader that passes bytes through while following the CSV quoting, so that the end of the
/// input inside a quoted field, or a NUL byte anywhere, is an error naming the line instead of
/// data. Lines count from 1 (the header). It also numbers lines for the rows read: the `csv`
/// crate's own line numbers are one short after a CRLF.
pub struct Strict<R> {
    inner: R,
    delimiter: u8,
    state: Quoting,
    line: u64,
    /// Where the quoted field being read began.
    quote_line: u64,
    /// Bytes passed through so far.
    offset: u64,
    /// Offsets of the newlines passed through but not yet counted by [`Strict::line_at`].
    newlines: VecDeque<u64>,
    /// Newlines counted by [`Strict::line_at`].
    counted: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Quoting {
    FieldStart,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: its end, or the first half of an escaped `""`.
    QuoteInQuoted,
}

impl<R: Read> Strict<R> {
    /// Wraps `inner`, a CSV separated by `delimiter`.
    pub fn new(inner: R, delimiter: u8) -> Self {
        Strict {
            inner,
            delimiter,
            state: Quoting::FieldStart,
            line: 1,
            quote_line: 1,
            offset: 0,
            newlines: VecDeque::new(),
            counted: 0,
        }
    }

    /// The line of the byte at `offset` (a row's start as the `csv` crate gives it, which after a
    /// CRLF is the LF): one more than the newlines at or before it. Offsets must not go back.
    pub fn line_at(&mut self, offset: u64) -> u64 {
        while self.newlines.front().is_some_and(|n| *n <= offset) {
            self.newlines.pop_front();
            self.counted += 1;
        }
        self.counted + 1
    }

    fn scan(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        for &b in bytes {
            if b == 0 {
                return Err(invalid(format!("line {}: a NUL byte", self.line)));
            }
            if b == b'\n' {
                self.line += 1;
                self.newlines.push_back(self.offset);
            }
            self.offset += 1;
            self.state = match (self.state, b) {
                (Quoting::FieldStart, b'"') => {
                    self.quote_line = self.line;
                    Quoting::Quoted
                }
                (Quoting::Quoted, b'"') => Quoting::QuoteInQuoted,
                (Quoting::Quoted, _) => Quoting::Quoted,
                (Quoting::QuoteInQuoted, b'"') => Quoting::Quoted,
                (_, b'\n' | b'\r') => Quoting::FieldStart,
                (_, d) if d == self.delimiter => Quoting::FieldStart,
                _ => Quoting::Unquoted,
            };
        }
        Ok(())
    }
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

impl<R: Read> Read for Strict<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.state == Quoting::Quoted {
            return Err(invalid(format!(
                "line {}: a quoted field opened here is never closed (is the file cut off?)",
                self.quote_line
            )));
        }
        self.scan(&buf[..n])?;
        Ok(n)
    }
}

/// The field delimiters accepted.
pub const DELIMITERS: [u8; 4] = [b',', b';', b'\t', b'|'];

/// Opens a CSV extract separated by `delimiter`: reads its header and finds the NHS-number column
/// by name.
pub fn open_csv<R: Read>(
    input: R,
    column_name: &str,
    delimiter: u8,
) -> Result<(csv::Reader<Strict<R>>, csv::ByteRecord, usize), String> {
    if !DELIMITERS.contains(&delimiter) {
        return Err(format!(
            "the delimiter must be one of , ; tab |, not {:?}",
            char::from(delimiter)
        ));
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .delimiter(delimiter)
        .from_reader(Strict::new(input, delimiter));
    let header = reader
        .byte_headers()
        .map_err(|e| format!("reading the CSV header: {}", describe(&e)))?
        .clone();
    let column = header
        .iter()
        .position(|h| String::from_utf8_lossy(h).trim() == column_name)
        .ok_or_else(|| {
            let names: Vec<String> = header
                .iter()
                .map(|h| String::from_utf8_lossy(h).into_owned())
                .collect();
            let hint = if names.len() == 1
                && DELIMITERS.iter().any(|d| names[0].contains(char::from(*d)))
            {
                " (one column only: is the file separated by another delimiter? see --delimiter)"
            } else {
                ""
            };
            format!(
                "column {column_name:?} is not in the CSV header; the columns are: {}{hint}",
                names.join(", ")
            )
        })?;
    Ok((reader, header, column))
}

/// Reads every row, handing `sink` chunks of up to `batch` rows with their NHS-number cells, in
/// order; each row keeps its position (its line). Stops at the first malformed row with its line
/// number; rows before it were handed over.
pub fn for_each_chunk<R: Read>(
    mut reader: csv::Reader<Strict<R>>,
    column: usize,
    batch: usize,
    mut sink: impl FnMut(Vec<csv::ByteRecord>, Vec<String>) -> Result<(), String>,
) -> Result<(), String> {
    let batch = batch.max(1);
    let mut rows: Vec<csv::ByteRecord> = Vec::with_capacity(batch);
    let mut numbers: Vec<String> = Vec::with_capacity(batch);
    let mut record = csv::ByteRecord::new();
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                if let Some(p) = record.position() {
                    let mut p = p.clone();
                    p.set_line(reader.get_mut().line_at(p.byte()));
                    record.set_position(Some(p));
                }
                let cell = record.get(column).unwrap_or_default();
                let text = std::str::from_utf8(cell).map_err(|_| {
                    format!(
                        "line {}: the NHS-number column is not UTF-8 text",
                        line_of(&record)
                    )
                })?;
                numbers.push(text.to_string());
                rows.push(record.clone());
                if rows.len() == batch {
                    sink(
                        std::mem::replace(&mut rows, Vec::with_capacity(batch)),
                        std::mem::replace(&mut numbers, Vec::with_capacity(batch)),
                    )?;
                }
            }
            Err(e) => {
                let at = e
                    .position()
                    .map(|p| format!(" at line {}", reader.get_mut().line_at(p.byte())))
                    .unwrap_or_default();
                return Err(format!("malformed CSV{at}: {}", describe(&e)));
            }
        }
    }
    if !rows.is_empty() {
        sink(rows, numbers)?;
    }
    Ok(())
}

/// The line a row starts on (as read), or 0 when it has no position.
pub fn line_of(row: &csv::ByteRecord) -> u64 {
    row.position().map_or(0, csv::Position::line)
}

fn describe(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("{len} fields where the header has {expected_len}"),
        csv::ErrorKind::Io(io) => io.to_string(),
        _ => e.to_string(),
    }
}

/// Reads the national file check's format: each line one NHS number followed by a comma, no
/// header, LF or CRLF. Hands `sink` chunks of rows, each a record of two fields (the number as
/// written, the line's ending) positioned at its line, with the numbers. A line that is not a
/// number and a comma (a missing comma, a second field, a NUL byte, bytes that are not UTF-8)
/// stops the read with its line; an empty last line is the file's final newline.
pub fn for_each_dat_chunk<R: BufRead>(
    mut input: R,
    batch: usize,
    mut sink: impl FnMut(Vec<csv::ByteRecord>, Vec<String>) -> Result<(), String>,
) -> Result<(), String> {
    let batch = batch.max(1);
    let mut rows = Vec::with_capacity(batch);
    let mut numbers = Vec::with_capacity(batch);
    let mut raw = Vec::new();
    let mut line = 0u64;
    loop {
        raw.clear();
        let n = input
            .read_until(b'\n', &mut raw)
            .map_err(|e| format!("line {}: {e}", line + 1))?;
        if n == 0 {
            break;
        }
        line += 1;
        let (body, eol): (&[u8], &[u8]) = if let Some(b) = raw.strip_suffix(b"\r\n") {
            (b, b"\r\n")
        } else if let Some(b) = raw.strip_suffix(b"\n") {
            (b, b"\n")
        } else {
            (&raw[..], b"")
        };
        let bad = |why: &str| format!("line {line}: {why}; each line is an NHS number and a comma");
        if body.contains(&0) {
            return Err(bad("a NUL byte"));
        }
        let text = std::str::from_utf8(body).map_err(|_| bad("not UTF-8 text"))?;
        let number = text.strip_suffix(',').ok_or_else(|| {
            bad(if text.trim().is_empty() {
                "an empty line"
            } else {
                "no comma at the end"
            })
        })?;
        if number.contains(',') {
            return Err(bad("more than one field"));
        }
        let mut record = csv::ByteRecord::from(vec![number.as_bytes(), eol]);
        let mut position = csv::Position::new();
        position.set_line(line);
        record.set_position(Some(position));
        rows.push(record);
        numbers.push(number.to_string());
        if rows.len() == batch {
            sink(
                std::mem::replace(&mut rows, Vec::with_capacity(batch)),
                std::mem::replace(&mut numbers, Vec::with_capacity(batch)),
            )?;
        }
    }
    if !rows.is_empty() {
        sink(rows, numbers)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every NHS-number cell with its line, or the error.
    fn read(csv_text: &[u8], delimiter: u8) -> Result<Vec<(u64, String)>, String> {
        let (reader, _, column) = open_csv(csv_text, "nhs_number", delimiter)?;
        let mut out = Vec::new();
        for_each_chunk(reader, column, 2, |rows, numbers| {
            out.extend(rows.iter().map(line_of).zip(numbers));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn real_exports_are_read_with_their_lines() {
        let bom_crlf =
            b"\xEF\xBB\xBFname,nhs_number\r\nA,943 476 5919\r\n\"B, the second\",4010232137\r\n";
        assert_eq!(
            read(bom_crlf, b','),
            Ok(vec![(2, "943 476 5919".into()), (3, "4010232137".into())])
        );
        let multi_line = b"name;nhs_number\n\"two\nlines\";9434765919\nC; 4010232137 \n";
        assert_eq!(
            read(multi_line, b';'),
            Ok(vec![(2, "9434765919".into()), (4, " 4010232137 ".into())])
        );
        assert_eq!(
            read(
                b"nhs_number\tx\n9434765919\t\"a \"\"quoted\"\" word\"\n",
                b'\t'
            ),
            Ok(vec![(2, "9434765919".into())])
        );
        assert_eq!(
            read(b"a|nhs_number\n1|9434765919", b'|'),
            Ok(vec![(2, "9434765919".into())])
        );
    }

    #[test]
    fn what_would_lose_rows_silently_stops_with_the_line() {
        // A file cut off inside a quoted field: not one giant last field.
        let cut = b"name,nhs_number\nA,9434765919\n\"B is cut off,4010232137\nC,9434765919\n";
        let e = read(cut, b',').expect_err("unclosed quote");
        assert!(e.contains("line 3") && e.contains("never closed"), "{e}");
        let e = read(b"name,nhs_number\nA,9434765919\nB\n", b',').expect_err("short row");
        assert!(
            e.contains("line 3") && e.contains("1 fields where the header has 2"),
            "{e}"
        );
        let e = read(b"name,nhs_number\nA,94347\x0065919\n", b',').expect_err("NUL");
        assert!(e.contains("line 2") && e.contains("NUL"), "{e}");
        let e =
            read(b"name,nhs_number\nA,9434765919\nB,94\xff34765919\n", b',').expect_err("utf-8");
        assert!(e.contains("line 3") && e.contains("not UTF-8"), "{e}");
        // Invalid UTF-8 elsewhere in a row is that row's business, not the number's.
        assert!(read(b"name,nhs_number\n\xff,9434765919\n", b',').is_ok());
        let e = read(b"name;nhs_number\nA;1\n", b',').expect_err("wrong delimiter");
        assert!(e.contains("--delimiter"), "{e}");
        assert!(open_csv(&b"x"[..], "x", b'#').is_err());
    }

    fn dat(text: &[u8]) -> Result<Vec<(u64, String, Vec<u8>)>, String> {
        let mut out = Vec::new();
        for_each_dat_chunk(text, 2, |rows, numbers| {
            for (r, n) in rows.iter().zip(numbers) {
                out.push((line_of(r), n, r.get(1).unwrap_or_default().to_vec()));
            }
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn the_national_dat_format_is_read_line_by_line_with_its_endings() {
        assert_eq!(
            dat(b"9434765919,\r\n4010232137,\r\n"),
            Ok(vec![
                (1, "9434765919".into(), b"\r\n".to_vec()),
                (2, "4010232137".into(), b"\r\n".to_vec())
            ])
        );
        assert_eq!(
            dat(b"9434765919,\n123,\n4010232137,"),
            Ok(vec![
                (1, "9434765919".into(), b"\n".to_vec()),
                (2, "123".into(), b"\n".to_vec()),
                (3, "4010232137".into(), Vec::new())
            ])
        );
        let e = dat(b"9434765919,\n4010232137\n").expect_err("no comma");
        assert!(e.contains("line 2") && e.contains("no comma"), "{e}");
        let e = dat(b"9434765919,\n\n4010232137,\n").expect_err("blank line");
        assert!(e.contains("line 2"), "{e}");
        let e = dat(b"9434765919,x,\n").expect_err("two fields");
        assert!(e.contains("line 1"), "{e}");
        assert!(dat(b"").expect("empty").is_empty());
    }
}
