//! The gRPC layer: thin adapters that validate, convert, call the check engine or the store, and
//! convert back. The engine's errors become gRPC statuses in one place (`admin::admin_status`).

mod admin;
mod check;
pub mod gate;

use std::time::{Duration, Instant};

use tonic::{Status, metadata::MetadataMap};

pub use admin::AdminService;
pub use check::CheckService;

use crate::core::{NhsNumber, NhsNumberError};

pub use optout_proto as proto;
pub(crate) use optout_proto::convert::{
    decision_to_proto, legal_basis_from_proto, opt_out_type, opt_out_type_to_proto, origin,
    purpose, version_field,
};

/// Request limits. Every request is bounded in size and time.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most NHS numbers in one Check message (and one CheckStream message).
    pub max_batch: usize,
    /// Most NHS numbers in one AddOptOuts or RemoveOptOuts request (bulk loads use ImportOptOuts).
    pub max_admin_batch: usize,
    /// The deadline of a request that carries none (`grpc-timeout`); a shorter client deadline wins.
    pub default_deadline: Duration,
    /// Largest encoded message accepted.
    pub max_message_bytes: usize,
    /// CheckStream messages processed at once per stream (responses stay in order).
    pub stream_concurrency: usize,
    /// How long one request may take, a whole stream included, before it is cut off.
    pub request_timeout: Duration,
}

impl Limits {
    /// The defaults (also those of the `optout serve` flags).
    pub const DEFAULT: Limits = Limits {
        max_batch: 10_000,
        max_admin_batch: 10_000,
        default_deadline: Duration::from_secs(2),
        max_message_bytes: 4 * 1024 * 1024,
        stream_concurrency: 4,
        request_timeout: Duration::from_secs(300),
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Share of the deadline kept back for encoding and sending the answer.
const SEND_MARGIN: f64 = 0.1;

/// When a request's answer must be ready: the client's `grpc-timeout` if shorter than the default,
/// less a margin for sending it.
pub(crate) fn deadline(metadata: &MetadataMap, default: Duration) -> Instant {
    let budget = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(default, |client| client.min(default));
    Instant::now() + budget.mul_f64(1.0 - SEND_MARGIN)
}

/// Parses the `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The source of an admin change: required, short, printable.
pub(crate) fn source_field(source: &str) -> Result<&str, Status> {
    if source.trim().is_empty() {
        return Err(Status::invalid_argument(
            "source is required: say where the change came from (a file name, a ticket)",
        ));
    }
    label_field("source", source, LABEL_MAX)
}

/// The most bytes of a caller's label (`source`, `extract_id`): they go into every audit record.
pub(crate) const LABEL_MAX: usize = 128;

/// A caller's free-text label as it goes into the audit: trimmed, at most `max` bytes, printable,
/// and holding nothing that is a valid NHS number (no number enters the audit in clear).
pub(crate) fn label_field<'a>(name: &str, value: &'a str, max: usize) -> Result<&'a str, Status> {
    let s = value.trim();
    if s.len() > max {
        return Err(Status::invalid_argument(format!(
            "{name} is {} bytes; at most {max}",
            s.len()
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{name} contains control characters; only printable text is accepted"
        )));
    }
    if holds_nhs_number(s) {
        return Err(Status::invalid_argument(format!(
            "{name} holds a valid NHS number; it is written to the audit log, where NHS numbers \
             never appear in clear: use a reference that identifies no patient"
        )));
    }
    Ok(s)
}

/// Whether any part of `s` that stands alone (no digit right before or after it) parses as a
/// valid NHS number in an accepted form: ten digits, or 3-3-4 with single spaces or dashes.
fn holds_nhs_number(s: &str) -> bool {
    let b = s.as_bytes();
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    (0..b.len()).any(|start| {
        if !digit(start) || (start > 0 && digit(start - 1)) {
            return false;
        }
        // The ten-digit form, and the 3-3-4 form (12 bytes).
        [10usize, 12].into_iter().any(|len| {
            start + len <= b.len()
                && !digit(start + len)
                && s.get(start..start + len)
                    .is_some_and(|candidate| NhsNumber::parse(candidate).is_ok())
        })
    })
}

/// Invalid numbers found while validating a list, by position. Never holds the numbers.
pub(crate) struct Rejections {
    count: u64,
    shown: Vec<(u64, NhsNumberError)>,
}

impl Rejections {
    const SHOWN: usize = 20;

    pub(crate) fn new() -> Self {
        Rejections {
            count: 0,
            shown: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, position: u64, e: NhsNumberError) {
        self.count += 1;
        if self.shown.len() < Self::SHOWN {
            self.shown.push((position, e));
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    pub(crate) fn positions(&self) -> impl Iterator<Item = u64> + '_ {
        self.shown.iter().map(|(p, _)| *p)
    }

    /// "2 invalid NHS numbers in nhs_numbers at positions 0 (the check digit does not match),
    /// 3 (...)".
    pub(crate) fn describe(&self, field: &str) -> String {
        let list: Vec<String> = self
            .shown
            .iter()
            .map(|(p, e)| format!("{p} ({e})"))
            .collect();
        let more = self.count - self.shown.len() as u64;
        format!(
            "{} invalid NHS number{} in {field} at zero-based position{} {}{}",
            self.count,
            if self.count == 1 { "" } else { "s" },
            if self.count == 1 { "" } else { "s" },
            list.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )
    }
}

/// Parses every number of an admin list; any invalid one fails the whole request.
pub(crate) fn all_valid(field: &str, numbers: &[String]) -> Result<Vec<NhsNumber>, Status> {
    let mut out = Vec::with_capacity(numbers.len());
    let mut rejected = Rejections::new();
    for (i, s) in numbers.iter().enumerate() {
        match NhsNumber::parse(s) {
            Ok(n) => out.push(n),
            Err(e) => rejected.push(i as u64, e),
        }
    }
    if rejected.count() > 0 {
        return Err(Status::invalid_argument(format!(
            "{}; nothing was written",
            rejected.describe(field)
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }

    #[test]
    fn rejections_name_positions_not_numbers() {
        let numbers: Vec<String> = ["9434765919", "9876544321", "12", "4010232137"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let err = all_valid("nhs_numbers", &numbers).expect_err("two invalid");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let msg = err.message();
        assert!(msg.contains("2 invalid NHS numbers"), "{msg}");
        assert!(
            msg.contains("positions 1 (the check digit does not match), 2 (not 10 digits"),
            "{msg}"
        );
        assert!(!msg.contains("9876544321"), "{msg}");
    }
}
