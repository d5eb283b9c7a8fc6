//! Reading Redis replies: versions, texts, integers, arrays, stored numbers. Anything of an
//! unexpected shape is [`StoreError::Corrupt`], never "not held".

use std::borrow::Cow;

use redis::Value;

use crate::{
    core::{AuditRecord, NhsNumber, OptOutType, Version},
    store::StoreError,
};

pub(super) fn version_of(v: &Value) -> Result<Version, StoreError> {
    match v {
        Value::Nil => Ok(Version::ZERO),
        Value::BulkString(b) => {
            let s = String::from_utf8_lossy(b);
            Version::parse(&s).map_err(|e| StoreError::Corrupt(e.to_string().into()))
        }
        Value::SimpleString(s) => {
            Version::parse(s).map_err(|e| StoreError::Corrupt(e.to_string().into()))
        }
        other => Err(StoreError::Corrupt(
            format!("expected a version, got {other:?}").into(),
        )),
    }
}

/// A generation as `GET P gen:{t}` answers it: none yet is generation 0; anything but a count is
/// corrupt (read as 0 it would name empty keys, and every number would read "not held").
pub(super) fn generation_of(v: Option<Value>) -> Result<u64, StoreError> {
    match v {
        Some(Value::Nil) => Ok(0),
        Some(v) => int_of(&v)
            .and_then(|g| u64::try_from(g).ok())
            .ok_or_else(|| StoreError::Corrupt(format!("a generation reads {v:?}").into())),
        None => Err(StoreError::Corrupt(
            "a lookup's answer ended before the generations".into(),
        )),
    }
}

/// A HEXISTS answer: 0 or 1. Anything else (an error in the pipeline, a nil) is an error, never
/// "not held".
pub(super) fn flag(v: &Value) -> Result<bool, StoreError> {
    match v {
        Value::Int(0) => Ok(false),
        Value::Int(1) => Ok(true),
        Value::ServerError(e) => Err(StoreError::Unavailable(format!("redis: {e:?}").into())),
        other => Err(StoreError::Corrupt(
            format!("expected 0 or 1 from HEXISTS, got {other:?}").into(),
        )),
    }
}

pub(super) fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Every text in a reply, however nested (a cluster's per-master answers arrive as a map).
pub(super) fn texts_of(v: Value) -> Vec<String> {
    match v {
        Value::Array(a) | Value::Set(a) => a.into_iter().flat_map(texts_of).collect(),
        Value::Map(m) => m.into_iter().flat_map(|(_, v)| texts_of(v)).collect(),
        Value::VerbatimString { text, .. } => vec![text],
        other => text_of(&other).into_iter().collect(),
    }
}

pub(super) fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text_of(other).and_then(|s| s.parse().ok()),
    }
}

pub(super) fn array(v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(StoreError::Corrupt(
            format!("expected an array, got {other:?}").into(),
        )),
    }
}

/// Numbers as a change-log entry holds them (read back by [`numbers_csv`]).
pub(super) fn csv_of(numbers: &[NhsNumber]) -> String {
    let mut csv = String::with_capacity(numbers.len() * 11);
    for (i, n) in numbers.iter().enumerate() {
        if i > 0 {
            csv.push(',');
        }
        csv.push_str(&n.as_u64().to_string());
    }
    csv
}

/// An NHS number as stored in a bucket's field.
pub(super) fn stored_number(v: &Value) -> Result<NhsNumber, StoreError> {
    int_of(v)
        .and_then(|i| u64::try_from(i).ok())
        .and_then(|i| NhsNumber::from_stored(i).ok())
        .ok_or_else(|| StoreError::Corrupt("stored field is not an NHS number".into()))
}

pub(super) fn numbers_csv(s: &str) -> Result<Vec<NhsNumber>, StoreError> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|p| {
            p.parse::<u64>()
                .ok()
                .and_then(|v| NhsNumber::from_stored(v).ok())
                .ok_or_else(|| {
                    StoreError::Corrupt("change-log entry holds an invalid number".into())
                })
        })
        .collect()
}

pub(super) fn audit_json(r: &AuditRecord) -> Result<String, StoreError> {
    serde_json::to_string(r).map_err(|e| StoreError::Corrupt(format!("audit record: {e}").into()))
}

pub(super) fn type_code(t: OptOutType) -> &'static str {
    match t {
        OptOutType::NationalDataOptOut => "1",
        OptOutType::Type1 => "2",
    }
}

/// `(bucket, number)` argument pairs for a list of numbers.
pub(super) fn bucket_pairs(numbers: &[NhsNumber], buckets: u64) -> Vec<String> {
    let mut args = Vec::with_capacity(numbers.len() * 2);
    for n in numbers {
        args.push((n.as_u64() % buckets).to_string());
        args.push(n.as_u64().to_string());
    }
    args
}

/// A text reply's bytes, borrowed from the reply where it holds them (an integer is written out).
fn bytes_of(v: &Value) -> Option<Cow<'_, [u8]>> {
    match v {
        Value::BulkString(b) => Some(Cow::Borrowed(b)),
        Value::SimpleString(s) => Some(Cow::Borrowed(s.as_bytes())),
        Value::Int(i) => Some(Cow::Owned(i.to_string().into_bytes())),
        _ => None,
    }
}

/// An array reply's elements, borrowed (nil: none).
fn elements(v: &Value) -> Result<&[Value], StoreError> {
    match v {
        Value::Array(a) => Ok(a),
        Value::Nil => Ok(&[]),
        other => Err(StoreError::Corrupt(
            format!("expected an array, got {other:?}").into(),
        )),
    }
}

/// A hash's field names (an HKEYS reply), sorted and distinct for look-ups by binary search,
/// borrowed from the reply: an import compares millions of them, and a `String` each was most of
/// its server CPU.
pub(super) fn field_set(v: &Value) -> Result<Vec<Cow<'_, [u8]>>, StoreError> {
    let mut fields = elements(v)?
        .iter()
        .map(field_text)
        .collect::<Result<Vec<_>, _>>()?;
    fields.sort_unstable();
    fields.dedup();
    Ok(fields)
}

/// A hash's fields with their values (an HGETALL reply: pairs in an array, or a RESP3 map),
/// sorted by field and distinct, borrowed from the reply.
pub(super) fn field_pairs(v: &Value) -> Result<FieldPairs<'_>, StoreError> {
    let mut pairs: FieldPairs<'_> = match v {
        Value::Map(m) => m
            .iter()
            .map(|(k, v)| Ok((field_text(k)?, field_text(v)?)))
            .collect::<Result<_, StoreError>>()?,
        other => {
            let flat = elements(other)?.chunks_exact(2);
            if !flat.remainder().is_empty() {
                return Err(StoreError::Corrupt(
                    "a hash's fields and values came back unpaired".into(),
                ));
            }
            flat.map(|p| Ok((field_text(&p[0])?, field_text(&p[1])?)))
                .collect::<Result<_, StoreError>>()?
        }
    };
    pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    pairs.dedup_by(|a, b| a.0 == b.0);
    Ok(pairs)
}

/// A hash's fields and values, sorted by field ([`field_pairs`]).
pub(super) type FieldPairs<'a> = Vec<(Cow<'a, [u8]>, Cow<'a, [u8]>)>;

/// A hash's field or value as text; anything else is corrupt, never skipped.
fn field_text(v: &Value) -> Result<Cow<'_, [u8]>, StoreError> {
    bytes_of(v)
        .ok_or_else(|| StoreError::Corrupt(format!("a hash's field or value reads {v:?}").into()))
}

/// Whether a sorted field list ([`field_set`]) holds `field`.
pub(super) fn holds(fields: &[Cow<'_, [u8]>], field: &[u8]) -> bool {
    fields.binary_search_by(|f| f.as_ref().cmp(field)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn fields_are_found_as_the_reply_holds_them() -> Result<(), StoreError> {
        let keys = Value::Array(vec![
            bulk("9434765919"),
            bulk("4010232137"),
            bulk("9434765919"),
        ]);
        let fields = field_set(&keys)?;
        assert_eq!(fields.len(), 2, "duplicates fold");
        assert!(holds(&fields, b"9434765919") && holds(&fields, b"4010232137"));
        assert!(!holds(&fields, b"943476591"));
        assert!(field_set(&Value::Nil)?.is_empty());
        let all = Value::Array(vec![
            bulk("9434765919"),
            bulk("1,2"),
            bulk("4010232137"),
            bulk("3,4"),
        ]);
        let pairs = field_pairs(&all)?;
        assert_eq!(pairs[0].0.as_ref(), b"4010232137");
        assert_eq!(pairs[0].1.as_ref(), b"3,4");
        let map = Value::Map(vec![(bulk("9434765919"), bulk("1,2"))]);
        assert_eq!(field_pairs(&map)?[0].1.as_ref(), b"1,2");
        Ok(())
    }

    /// A reply of an unexpected shape is corrupt, never fewer fields: an import that skipped one
    /// would count and carry the rest as if it were not held.
    #[test]
    fn an_unexpected_field_is_corrupt_not_skipped() {
        let keys = Value::Array(vec![bulk("9434765919"), Value::Nil]);
        assert!(matches!(field_set(&keys), Err(StoreError::Corrupt(_))));
        let odd = Value::Array(vec![bulk("9434765919"), bulk("1,2"), bulk("4010232137")]);
        assert!(matches!(field_pairs(&odd), Err(StoreError::Corrupt(_))));
        let nested = Value::Array(vec![bulk("9434765919"), Value::Array(vec![])]);
        assert!(matches!(field_pairs(&nested), Err(StoreError::Corrupt(_))));
        assert!(matches!(field_set(&bulk("x")), Err(StoreError::Corrupt(_))));
    }
}
