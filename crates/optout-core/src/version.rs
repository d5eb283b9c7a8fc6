//! The store version: a token that orders changes.
//!
//! It has the shape of a Redis stream entry id (`<milliseconds>-<sequence>`) so that every store
//! speaks the same token: the embedded store makes ids the same way, and the Redis store will use
//! its change log's entry ids as they are. Clients treat it as opaque and hand it back in
//! `at_least_version`.

use std::fmt;

/// A position in the change log. Ordered; `Version::ZERO` is before every change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Milliseconds since the Unix epoch when the change was made (never decreasing).
    pub ms: u64,
    /// Orders changes within one millisecond.
    pub seq: u64,
}

/// A version token that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a version: {0:?} (expected <milliseconds>-<sequence>, as returned by the service)")]
pub struct VersionError(pub String);

impl Version {
    /// Before every change: the version of a store that was initialised and never written.
    pub const ZERO: Version = Version { ms: 0, seq: 0 };

    /// The next version after `self` made at wall-clock time `now_ms`: never goes backwards, even
    /// if the clock does.
    pub fn next(self, now_ms: u64) -> Version {
        if now_ms > self.ms {
            Version { ms: now_ms, seq: 0 }
        } else {
            Version {
                ms: self.ms,
                seq: self.seq + 1,
            }
        }
    }

    /// Parses `<ms>-<seq>` or a bare `<ms>` (meaning sequence 0).
    pub fn parse(s: &str) -> Result<Version, VersionError> {
        let bad = || VersionError(s.chars().take(64).collect());
        let (ms, seq) = match s.split_once('-') {
            Some((ms, seq)) => (ms, seq),
            None => (s, "0"),
        };
        let num = |p: &str| {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                p.parse::<u64>().ok()
            }
        };
        Ok(Version {
            ms: num(ms).ok_or_else(bad)?,
            seq: num(seq).ok_or_else(bad)?,
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl std::str::FromStr for Version {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Version::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_stream_ids() {
        let v = Version::parse("1732800000000-7").expect("valid");
        assert_eq!(
            v,
            Version {
                ms: 1_732_800_000_000,
                seq: 7
            }
        );
        assert_eq!(v.to_string(), "1732800000000-7");
        assert_eq!(Version::parse("5"), Ok(Version { ms: 5, seq: 0 }));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "-", "1-", "-1", "a-1", "1-2-3", "+1-0", " 1-0"] {
            assert!(Version::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn next_never_goes_backwards() {
        let v = Version { ms: 100, seq: 3 };
        assert_eq!(v.next(200), Version { ms: 200, seq: 0 });
        assert_eq!(v.next(100), Version { ms: 100, seq: 4 });
        assert_eq!(v.next(50), Version { ms: 100, seq: 4 });
        assert!(v.next(50) > v);
    }
}
