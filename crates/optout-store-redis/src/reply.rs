//! Reading Redis replies: versions, texts, integers, arrays, stored numbers. Anything of an
//! unexpected shape is [`StoreError::Corrupt`], never "not held".

use std::collections::HashMap;

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

pub(super) fn pairs_map(v: Value) -> Result<HashMap<String, String>, StoreError> {
    match v {
        Value::Map(m) => Ok(m
            .iter()
            .filter_map(|(k, v)| Some((text_of(k)?, text_of(v)?)))
            .collect()),
        other => {
            let a = array(other)?;
            Ok(a.chunks(2)
                .filter_map(|p| Some((text_of(p.first()?)?, text_of(p.get(1)?)?)))
                .collect())
        }
    }
}
