//! Tamper-evident audit trails: each record is one JSON line that carries its sequence number,
//! the hash of the line before it (a chain), the id of the audit key, and a MAC under that key.
//!
//! A line is `{"seq":N,"prev":"<hex>","kid":"<id>","r":{record},"mac":"<hex>"}`. Its body is
//! the line without `,"mac":"<hex>"` (so ending `}` after the record); its hash is
//! `SHA-256(prev hash || body)`, and the MAC is HMAC-SHA-256 of that hash under the audit key's
//! trail MAC key. Editing a byte breaks that line's MAC; removing or reordering lines breaks the
//! chain (and the sequence) at the first line after the change; a line added by someone without
//! the key cannot carry a valid MAC. The first line of a trail links to [`GENESIS`].
//!
//! Lines stay one JSON object each, so a log shipper (Fluent Bit, Vector) reads them as they are.

use std::io::Write as _;

use sha2::{Digest, Sha256};

use crate::AuditKey;
#[cfg(doc)]
use crate::{AuditRecord, seals::ChangesSeal};

/// The `prev` of the first line of a trail.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// Where a trail's chain stands: the last sequence number and the hash of its line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainHead {
    /// The last line's sequence number (0: none yet).
    pub seq: u64,
    /// The last line's hash ([`GENESIS`] before the first).
    pub hash: [u8; 32],
}

impl ChainHead {
    /// The head of an empty trail.
    pub const START: ChainHead = ChainHead {
        seq: 0,
        hash: GENESIS,
    };
}

/// Why a trail does not verify: the 1-based line and what is wrong with it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct TrailError {
    /// The 1-based line of the trail (over all the files given, in order).
    pub line: u64,
    /// What is wrong.
    pub problem: String,
}

/// Lowercase hex of bytes (hashes, MACs, key ids).
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

fn link(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    h.finalize().into()
}

/// Seals `record` (an [`AuditRecord`], or a [`ChangesSeal`]) as the line after `head`; returns the
/// line (no newline) and the new head.
pub fn seal<T: serde::Serialize>(
    head: ChainHead,
    record: &T,
    key: &AuditKey,
) -> Result<(String, ChainHead), serde_json::Error> {
    let mut line = Vec::with_capacity(512);
    let head = seal_into(head, key, &mut line, |out| {
        serde_json::to_writer(out, record)
    })?;
    // Only JSON and hex went in.
    let line = String::from_utf8(line).unwrap_or_else(|_| unreachable!("a sealed line is UTF-8"));
    Ok((line, head))
}

/// [`seal`], appending the line (no newline) to `out`: many records sealed into one buffer without
/// a string of their own each. `record` appends the record's JSON (`serde_json::to_writer`, or
/// [`AuditRecord::write_json`](crate::AuditRecord::write_json)).
pub fn seal_into(
    head: ChainHead,
    key: &AuditKey,
    out: &mut Vec<u8>,
    record: impl FnOnce(&mut Vec<u8>) -> Result<(), serde_json::Error>,
) -> Result<ChainHead, serde_json::Error> {
    let seq = head.seq + 1;
    let start = out.len();
    let mut hex_buf = [0u8; 64];
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{{\"seq\":{seq},\"prev\":\"");
    out.extend_from_slice(hex_into(&head.hash, &mut hex_buf));
    out.extend_from_slice(b"\",\"kid\":\"");
    out.extend_from_slice(key.id_str().as_bytes());
    out.extend_from_slice(b"\",\"r\":");
    if let Err(e) = record(&mut *out) {
        out.truncate(start);
        return Err(e);
    }
    out.push(b'}');
    let hash = link(&head.hash, &out[start..]);
    out.pop();
    out.extend_from_slice(b",\"mac\":\"");
    out.extend_from_slice(hex_into(&key.mac(&hash), &mut hex_buf));
    out.extend_from_slice(b"\"}");
    Ok(ChainHead { seq, hash })
}

/// Lowercase hex of 32 bytes into `buf`.
fn hex_into<'a>(bytes: &[u8; 32], buf: &'a mut [u8; 64]) -> &'a [u8] {
    // 64 bytes of room for 32 bytes: cannot fail.
    let _ = hex::encode_to_slice(bytes, buf);
    buf
}

/// The parts of a line a reader needs: its record, sequence and MAC-checked hash.
#[derive(serde::Deserialize)]
struct Parsed<R> {
    seq: u64,
    prev: String,
    kid: String,
    r: R,
    mac: String,
}

/// A line whose record is not read (checking and hashing need only its bytes).
type Unread = Parsed<serde::de::IgnoredAny>;

/// What was hashed and MAC'd of a sealed line: the line without its `,"mac":"..."`.
fn sealed_body(line: &str, mac: &str) -> Option<String> {
    line.strip_suffix(&format!(",\"mac\":\"{mac}\"}}"))
        .map(|b| format!("{b}}}"))
}

/// The chain hash of a sealed line (what the next line's `prev` must be), without checking its
/// MAC; `None` if it is not a sealed line.
pub fn line_hash(line: &str) -> Option<[u8; 32]> {
    let p: Unread = serde_json::from_str(line).ok()?;
    let body = sealed_body(line, &p.mac)?;
    Some(link(&unhex32(&p.prev)?, body.as_bytes()))
}

/// Reads one line without checking it (for queries): its sequence number and record
/// (an [`AuditRecord`] or a [`ChangesSeal`]).
pub fn open_line<R: serde::de::DeserializeOwned>(line: &str) -> Option<(u64, R)> {
    let p: Parsed<R> = serde_json::from_str(line).ok()?;
    Some((p.seq, p.r))
}

/// Checks lines in order against `key`, from `head`: [`ChainHead::START`] for a whole trail, or
/// `None` for one whose oldest files were deleted by retention (checked from its first line's own
/// `prev`: the link to the deleted part cannot be checked). `first_line` numbers the first line
/// in errors. On success, the head after the last line.
pub fn verify<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    key: &AuditKey,
    mut head: Option<ChainHead>,
    first_line: u64,
) -> Result<ChainHead, TrailError> {
    let mut last = head.unwrap_or(ChainHead::START);
    for (at, line) in (first_line..).zip(lines) {
        let bad = |problem: String| TrailError { line: at, problem };
        let p: Unread =
            serde_json::from_str(line).map_err(|e| bad(format!("not a trail record ({e})")))?;
        let body = sealed_body(line, &p.mac)
            .ok_or_else(|| bad("the MAC is not where a sealed line has it".into()))?;
        let prev = unhex32(&p.prev).ok_or_else(|| bad("prev is not a hash".into()))?;
        if p.kid != key.id() {
            return Err(bad(format!(
                "sealed under audit key {}, not the key given ({})",
                p.kid,
                key.id()
            )));
        }
        let hash = link(&prev, body.as_bytes());
        if hex(&key.mac(&hash)) != p.mac {
            return Err(bad("the MAC does not match: the line was altered".into()));
        }
        if let Some(h) = head {
            if p.seq != h.seq + 1 {
                return Err(bad(format!(
                    "sequence {} follows {}: a record was removed or moved",
                    p.seq, h.seq
                )));
            }
            if prev != h.hash {
                return Err(bad(
                    "does not link to the line before it: a record was removed or moved".into(),
                ));
            }
        }
        last = ChainHead { seq: p.seq, hash };
        head = Some(last);
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuditRecord;

    fn key() -> AuditKey {
        AuditKey::new(&[3u8; 32]).expect("key")
    }

    fn trail(n: usize) -> Vec<String> {
        let mut head = ChainHead::START;
        (0..n)
            .map(|i| {
                let r = AuditRecord {
                    action: "check".into(),
                    organisation: format!("RX{i}"),
                    count: i as u64,
                    ..AuditRecord::default()
                };
                let (line, next) = seal(head, &r, &key()).expect("seal");
                head = next;
                line
            })
            .collect()
    }

    fn check(lines: &[String]) -> Result<ChainHead, TrailError> {
        verify(
            lines.iter().map(String::as_str),
            &key(),
            Some(ChainHead::START),
            1,
        )
    }

    #[test]
    fn a_sealed_trail_verifies_and_names_the_first_line_altered_removed_or_moved() {
        let lines = trail(5);
        assert_eq!(check(&lines).expect("intact").seq, 5);
        assert!(serde_json::from_str::<serde_json::Value>(&lines[0]).is_ok());

        // One byte edited: that line's MAC fails.
        let mut edited = lines.clone();
        edited[2] = edited[2].replacen("RX2", "RX9", 1);
        let e = check(&edited).expect_err("edited");
        assert_eq!(e.line, 3, "{e}");
        assert!(e.problem.contains("altered"), "{e}");

        // One record deleted: the next line no longer follows.
        let mut deleted = lines.clone();
        deleted.remove(1);
        let e = check(&deleted).expect_err("deleted");
        assert_eq!(e.line, 2, "{e}");
        assert!(e.problem.contains("removed or moved"), "{e}");

        // Two records swapped.
        let mut swapped = lines.clone();
        swapped.swap(3, 4);
        let e = check(&swapped).expect_err("swapped");
        assert_eq!(e.line, 4, "{e}");

        // Under another key, nothing verifies.
        let other = AuditKey::new(&[4u8; 32]).expect("key");
        let e = verify(
            lines.iter().map(String::as_str),
            &other,
            Some(ChainHead::START),
            1,
        )
        .expect_err("other key");
        assert_eq!(e.line, 1);

        // A trail whose first files were deleted by retention verifies from where it starts.
        assert_eq!(
            verify(lines[2..].iter().map(String::as_str), &key(), None, 1)
                .expect("tail")
                .seq,
            5
        );
        assert_eq!(open_line::<AuditRecord>(&lines[4]).expect("read").0, 5);
    }

    #[test]
    fn lines_sealed_into_one_buffer_are_the_lines_sealed_one_by_one() {
        let lines = trail(3);
        let records: Vec<AuditRecord> = lines
            .iter()
            .map(|l| open_line::<AuditRecord>(l).expect("read").1)
            .collect();
        let mut buf = Vec::new();
        let mut head = ChainHead::START;
        for r in &records {
            head = seal_into(head, &key(), &mut buf, |out| r.write_json(out)).expect("seal");
            buf.push(b'\n');
        }
        let text = String::from_utf8(buf).expect("utf-8");
        let joined: Vec<String> = text.lines().map(str::to_string).collect();
        assert_eq!(joined, lines);
        assert_eq!(check(&joined).expect("intact").seq, 3);
        assert!(lines[0].starts_with(&format!("{{\"seq\":1,\"prev\":\"{}\",", "0".repeat(64))));
    }
}
