//! GP practices: whose type 1 opt-out it is.
//!
//! A type 1 opt-out is an objection recorded at a GP practice, and type 1 lists come from the
//! practices, one practice's file at a time. So each type 1 opt-out carries the ODS code of the
//! practice that recorded it; a patient may hold type 1 from several practices and keeps it while
//! any holds it. Type 1 opt-outs recorded before practices were (no practice named) belong to the
//! *unknown practice*, which only an explicit removal clears.
//!
//! The stores keep a type 1 record's practices as codes joined by [`SEPARATOR`]; the unknown
//! practice is [`UNKNOWN_STORED`], which no ODS code can be.

use std::fmt;

/// The ODS code of a GP practice (or the unknown practice of type 1 data recorded before
/// practices were).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Practice(String);

/// How the unknown practice is stored.
pub const UNKNOWN_STORED: &str = "?";

/// What separates practices in a stored list.
pub const SEPARATOR: char = ';';

/// How the unknown practice is named on the command line and in the API: only a removal may
/// name it.
pub const UNKNOWN_NAME: &str = "unknown";

impl Practice {
    /// A practice named in a request: an ODS code (3 to 10 letters and digits, upper-cased), or
    /// `unknown` when `unknown_allowed` (removals).
    pub fn parse(code: &str, unknown_allowed: bool) -> Result<Practice, String> {
        let c = code.trim();
        if c == UNKNOWN_NAME {
            return if unknown_allowed {
                Ok(Practice::unknown())
            } else {
                Err(
                    "practice \"unknown\" holds the type 1 opt-outs recorded before practices \
                     were: it can only be removed from, never added to or imported"
                        .into(),
                )
            };
        }
        if !(3..=10).contains(&c.len()) || !c.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!(
                "practice {c:?} is not an ODS code (3 to 10 letters and digits, such as A83007)"
            ));
        }
        Ok(Practice(c.to_ascii_uppercase()))
    }

    /// The unknown practice.
    pub fn unknown() -> Practice {
        Practice(UNKNOWN_STORED.to_string())
    }

    /// Whether this is the unknown practice.
    pub fn is_unknown(&self) -> bool {
        self.0 == UNKNOWN_STORED
    }

    /// As stored.
    pub fn stored(&self) -> &str {
        &self.0
    }

    /// A practice as stored (no validation beyond being non-empty: stores hold what requests
    /// validated).
    pub fn from_stored(s: &str) -> Option<Practice> {
        (!s.is_empty()).then(|| Practice(s.to_string()))
    }

    /// The name in answers and records: the ODS code, or `unknown`.
    pub fn name(&self) -> &str {
        if self.is_unknown() {
            UNKNOWN_NAME
        } else {
            &self.0
        }
    }
}

impl fmt::Display for Practice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The practices of a stored type 1 record (`""`, from a record written before practices were:
/// the unknown practice).
pub fn parse_list(stored: &str) -> Vec<Practice> {
    let list: Vec<Practice> = stored
        .split(SEPARATOR)
        .filter_map(Practice::from_stored)
        .collect();
    if list.is_empty() {
        vec![Practice::unknown()]
    } else {
        list
    }
}

/// A stored list of practices.
pub fn join_list(list: &[Practice]) -> String {
    let names: Vec<&str> = list.iter().map(Practice::stored).collect();
    names.join(&SEPARATOR.to_string())
}

/// `list` with `p` added, or `None` if it holds it already.
pub fn with(list: &[Practice], p: &Practice) -> Option<Vec<Practice>> {
    if list.contains(p) {
        return None;
    }
    let mut out = list.to_vec();
    out.push(p.clone());
    Some(out)
}

/// `list` without `p` (empty: the patient holds no type 1 any more), or `None` if it does not
/// hold it.
pub fn without(list: &[Practice], p: &Practice) -> Option<Vec<Practice>> {
    if !list.contains(p) {
        return None;
    }
    Some(list.iter().filter(|q| *q != p).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_validated_and_the_unknown_practice_only_removed() {
        assert_eq!(
            Practice::parse(" a83007 ", false).map(|p| p.stored().to_string()),
            Ok("A83007".into())
        );
        assert!(Practice::parse("A8", false).is_err());
        assert!(Practice::parse("A83;007", false).is_err());
        assert!(
            Practice::parse("?", true).is_err(),
            "the stored token is not a name"
        );
        assert!(Practice::parse("unknown", false).is_err());
        assert!(Practice::parse("unknown", true).is_ok_and(|p| p.is_unknown()));
        assert_eq!(Practice::unknown().name(), "unknown");
    }

    #[test]
    fn lists_round_trip_and_legacy_records_belong_to_the_unknown_practice() {
        let a = Practice::parse("A83007", false).expect("a");
        let b = Practice::parse("B81001", false).expect("b");
        assert_eq!(parse_list(""), vec![Practice::unknown()]);
        let ab = with(std::slice::from_ref(&a), &b).expect("b added");
        assert_eq!(parse_list(&join_list(&ab)), ab);
        assert_eq!(with(&ab, &a), None, "held already");
        assert_eq!(without(&ab, &a), Some(vec![b.clone()]));
        assert_eq!(
            without(std::slice::from_ref(&b), &b),
            Some(vec![]),
            "the last practice"
        );
        assert_eq!(without(&[b], &a), None);
        let legacy = parse_list("");
        assert_eq!(without(&legacy, &Practice::unknown()), Some(vec![]));
    }
}
