//! How opt-outs and change-log entries are encoded in their tables.

use super::*;

/// One recorded opt-out inside an `optouts` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) kind: OptOutType,
    pub(super) recorded_at_ms: i64,
    pub(super) source_id: u32,
}

pub(super) fn decode_entries(bytes: &[u8]) -> Result<Vec<Entry>, StoreError> {
    if !bytes.len().is_multiple_of(ENTRY_LEN) {
        return Err(StoreError::Corrupt(
            format!("opt-out record of {} bytes", bytes.len()).into(),
        ));
    }
    bytes
        .chunks_exact(ENTRY_LEN)
        .map(|c| {
            let kind = OptOutType::from_code(c[0])
                .ok_or_else(|| StoreError::Corrupt(format!("opt-out type code {}", c[0]).into()))?;
            let mut at = [0u8; 8];
            at.copy_from_slice(&c[1..9]);
            let mut src = [0u8; 4];
            src.copy_from_slice(&c[9..13]);
            Ok(Entry {
                kind,
                recorded_at_ms: i64::from_le_bytes(at),
                source_id: u32::from_le_bytes(src),
            })
        })
        .collect()
}

pub(super) fn encode_entries(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        out.push(e.kind.code());
        out.extend_from_slice(&e.recorded_at_ms.to_le_bytes());
        out.extend_from_slice(&e.source_id.to_le_bytes());
    }
    out
}

/// The types in an encoded value, without decoding the rest (the check path). A value that does
/// not parse is an error, never "no opt-out": a corrupt record must withhold, not release.
pub(super) fn held_types(bytes: &[u8]) -> Result<OptOutSet, StoreError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(ENTRY_LEN) {
        return Err(StoreError::Corrupt(
            format!("opt-out record of {} bytes", bytes.len()).into(),
        ));
    }
    bytes
        .chunks_exact(ENTRY_LEN)
        .map(|c| {
            OptOutType::from_code(c[0])
                .ok_or_else(|| StoreError::Corrupt(format!("opt-out type code {}", c[0]).into()))
        })
        .collect()
}

/// The second word of an entry that does not list its added numbers (no NHS number is this big).
const UNLISTED: u64 = u64::MAX;

/// A change-log entry: the count removed, then the numbers added; `None` for an import too big
/// to list them ([`UNLISTED`]).
pub(super) fn encode_change(added: Option<&[NhsNumber]>, removed: u64) -> Vec<u8> {
    let Some(added) = added else {
        return encode_unlisted(removed);
    };
    let mut out = Vec::with_capacity(8 + added.len() * 8);
    out.extend_from_slice(&removed.to_le_bytes());
    for n in added {
        out.extend_from_slice(&n.as_u64().to_le_bytes());
    }
    out
}

/// The entry of a change that does not list its added numbers.
fn encode_unlisted(removed: u64) -> Vec<u8> {
    let mut out = removed.to_le_bytes().to_vec();
    out.extend_from_slice(&UNLISTED.to_le_bytes());
    out
}

pub(super) fn decode_change(version: Version, bytes: &[u8]) -> Result<ChangeEntry, StoreError> {
    if bytes.len() < 8 || !bytes.len().is_multiple_of(8) {
        return Err(StoreError::Corrupt(
            format!("change-log entry {version} of {} bytes", bytes.len()).into(),
        ));
    }
    let mut words = bytes.chunks_exact(8).map(|c| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        u64::from_le_bytes(w)
    });
    let removed = words.next().unwrap_or(0);
    if bytes.len() == 16 && words.clone().next() == Some(UNLISTED) {
        return Ok(ChangeEntry {
            version,
            added: Vec::new(),
            removed,
            unlisted: true,
        });
    }
    let added = words
        .map(|v| {
            NhsNumber::from_stored(v).map_err(|e| {
                StoreError::Corrupt(
                    format!("change-log entry {version} holds an invalid number: {e}").into(),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ChangeEntry {
        version,
        added,
        removed,
        unlisted: false,
    })
}
