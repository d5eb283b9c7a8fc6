//! Anchors of a replica's check log, kept outside it.
//!
//! The check log's chain ([`crate::trail`]) shows a line altered, removed or reordered, but not
//! lines cut from its end, nor whole segments deleted: what is left is still a valid chain
//! (issue 27 item 6). So the replica records where its log stands, in the changes trail of the
//! consent store (sealed there, so an anchor removed or altered shows too): at every rotation,
//! every anchor interval while checks are written, and at shutdown. An anchor names the log (the
//! id in its directory), the newest line's sequence number and chain link, and the oldest sequence
//! number still on disk. [`AnchorCheck`] compares a directory with the anchors of its log: the
//! log must reach the newest anchor, every anchored line still on disk must be the line that was
//! anchored, and no segment the newest anchor saw may be gone.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::trail;

/// The action of an anchor's record in the changes trail.
pub const ANCHOR_ACTION: &str = "check-log-anchor";

/// The file in a check-log directory that names the log.
pub const LOG_ID_FILE: &str = "checks.id";

/// Where a replica's check log stood.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogAnchor {
    /// The log's id (the contents of [`LOG_ID_FILE`] in its directory).
    pub log: String,
    /// The sequence number of the newest line written.
    pub seq: u64,
    /// That line's chain link: hex of the first 16 bytes of [`trail::line_hash`].
    pub link: String,
    /// The first sequence number still on disk, after retention.
    pub oldest: u64,
}

/// The link an anchor records for a sealed line.
pub fn anchor_link(line: &str) -> Option<String> {
    trail::line_hash(line).map(|h| trail::hex(&h[..16]))
}

/// What comparing a log with its anchors found, when nothing was wrong.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnchorReport {
    /// Anchors of this log found in the store.
    pub anchors: u64,
    /// The newest anchor's sequence number (0: none).
    pub anchored_upto: u64,
    /// Lines after the newest anchor: written since it, not provable yet.
    pub after_anchor: u64,
}

/// What is wrong with a log, as its anchors show.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnchorError {
    /// The log ends before a line an anchor recorded.
    #[error(
        "the log ends at line {ends}, but it reached line {anchored} (anchored at {at_ms} ms): \
         lines {from}..={anchored} were cut from its end",
        from = .ends + 1
    )]
    Cut {
        /// The last sequence number on disk (0: none).
        ends: u64,
        /// The newest anchored sequence number.
        anchored: u64,
        /// When that anchor was written, ms since the epoch.
        at_ms: i64,
    },
    /// A line on disk is not the line an anchor recorded at its sequence number.
    #[error(
        "line {seq} is not the line anchored at {at_ms} ms: the log was cut back past it and \
         written again"
    )]
    Rewritten {
        /// The sequence number.
        seq: u64,
        /// When the anchor was written.
        at_ms: i64,
    },
    /// The oldest lines on disk start after the oldest the newest anchor saw.
    #[error(
        "the log starts at line {first}, but line {oldest} was still on disk at {at_ms} ms (the \
         newest anchor): segments were deleted outside the retention"
    )]
    SegmentsRemoved {
        /// The first sequence number on disk.
        first: u64,
        /// The oldest sequence number the newest anchor saw.
        oldest: u64,
        /// When that anchor was written.
        at_ms: i64,
    },
    /// No anchor of this log although its lines are older than anchors take to be written.
    #[error(
        "no anchor of log {log} in the store, but its lines go back to {since_ms} ms: its id \
         file was replaced, or the replica never reached the store"
    )]
    NotAnchored {
        /// The log's id.
        log: String,
        /// When its first line was written.
        since_ms: i64,
    },
}

/// Compares a log with its anchors: feed every line in order ([`AnchorCheck::line`]), then
/// [`AnchorCheck::finish`].
pub struct AnchorCheck {
    log: String,
    /// Anchors by the sequence number they recorded: (when, link).
    by_seq: HashMap<u64, Vec<(i64, String)>>,
    /// The newest anchor: (when, anchor).
    newest: Option<(i64, LogAnchor)>,
    anchors: u64,
    first: Option<u64>,
    last: u64,
}

impl AnchorCheck {
    /// A check of log `log` against `anchors` (with when each was written); anchors of other
    /// logs are ignored.
    pub fn new(log: &str, anchors: impl IntoIterator<Item = (i64, LogAnchor)>) -> Self {
        let mut check = AnchorCheck {
            log: log.to_string(),
            by_seq: HashMap::new(),
            newest: None,
            anchors: 0,
            first: None,
            last: 0,
        };
        for (at, a) in anchors {
            if a.log != log {
                continue;
            }
            check.anchors += 1;
            check
                .by_seq
                .entry(a.seq)
                .or_default()
                .push((at, a.link.clone()));
            // The newest by sequence number: a log cut and written again reaches the same
            // numbers later, and its older anchors are checked by their links.
            if check
                .newest
                .as_ref()
                .is_none_or(|(t, n)| (a.seq, at) > (n.seq, *t))
            {
                check.newest = Some((at, a));
            }
        }
        check
    }

    /// The next line on disk, with its sequence number.
    pub fn line(&mut self, seq: u64, line: &str) -> Result<(), AnchorError> {
        self.first.get_or_insert(seq);
        self.last = seq;
        if let Some(anchored) = self.by_seq.get(&seq) {
            let link = anchor_link(line);
            for (at, want) in anchored {
                if link.as_deref() != Some(want.as_str()) {
                    return Err(AnchorError::Rewritten { seq, at_ms: *at });
                }
            }
        }
        Ok(())
    }

    /// After the last line: `first_at_ms` is when the first line was written, `grace_ms` how old
    /// a log may be without an anchor (a few anchor intervals), `now_ms` the time now.
    pub fn finish(
        self,
        first_at_ms: Option<i64>,
        grace_ms: i64,
        now_ms: i64,
    ) -> Result<AnchorReport, AnchorError> {
        let Some((at_ms, newest)) = self.newest else {
            return match first_at_ms {
                Some(since_ms) if now_ms.saturating_sub(since_ms) > grace_ms => {
                    Err(AnchorError::NotAnchored {
                        log: self.log,
                        since_ms,
                    })
                }
                _ => Ok(AnchorReport {
                    after_anchor: self.first.map_or(0, |f| self.last.saturating_sub(f) + 1),
                    ..AnchorReport::default()
                }),
            };
        };
        if self.first.is_none() || self.last < newest.seq {
            return Err(AnchorError::Cut {
                ends: if self.first.is_some() { self.last } else { 0 },
                anchored: newest.seq,
                at_ms,
            });
        }
        if let Some(first) = self.first
            && first > newest.oldest
        {
            return Err(AnchorError::SegmentsRemoved {
                first,
                oldest: newest.oldest,
                at_ms,
            });
        }
        Ok(AnchorReport {
            anchors: self.anchors,
            anchored_upto: newest.seq,
            after_anchor: self.last - newest.seq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuditKey, AuditRecord, trail::ChainHead};

    /// A sealed log of `n` lines.
    fn log(n: u64) -> Vec<String> {
        let key = AuditKey::new(&[4u8; 32]).expect("key");
        let mut head = ChainHead::START;
        (0..n)
            .map(|i| {
                let r = AuditRecord {
                    at_ms: 1_000 + i as i64,
                    action: "check".into(),
                    ..AuditRecord::default()
                };
                let (line, next) = trail::seal(head, &r, &key).expect("seal");
                head = next;
                line
            })
            .collect()
    }

    fn anchor(lines: &[String], seq: u64, oldest: u64) -> LogAnchor {
        LogAnchor {
            log: "L".into(),
            seq,
            link: anchor_link(&lines[seq as usize - 1]).expect("a sealed line"),
            oldest,
        }
    }

    /// Lines `from..=to` (1-based) of `lines` checked against `anchors`.
    fn check(
        lines: &[String],
        from: u64,
        to: u64,
        anchors: &[LogAnchor],
    ) -> Result<AnchorReport, AnchorError> {
        let mut c = AnchorCheck::new("L", anchors.iter().cloned().map(|a| (a.seq as i64, a)));
        for seq in from..=to {
            c.line(seq, &lines[seq as usize - 1])?;
        }
        c.finish(Some(0), 600_000, 1_000)
    }

    #[test]
    fn a_log_cut_short_rewritten_or_missing_its_oldest_segments_is_named() {
        let lines = log(10);
        let anchors = [anchor(&lines, 4, 1), anchor(&lines, 8, 1)];
        let report = check(&lines, 1, 10, &anchors).expect("intact");
        assert_eq!(
            (report.anchors, report.anchored_upto, report.after_anchor),
            (2, 8, 2)
        );
        // Lines after the newest anchor may be cut unseen; up to it, not.
        assert!(check(&lines, 1, 8, &anchors).is_ok());
        assert!(matches!(
            check(&lines, 1, 7, &anchors),
            Err(AnchorError::Cut {
                ends: 7,
                anchored: 8,
                ..
            })
        ));
        // Cut back to 3 and written again: line 4 is another line than the one anchored.
        let other = log(12);
        let mut rewritten = lines[..3].to_vec();
        let key = AuditKey::new(&[4u8; 32]).expect("key");
        let mut head = ChainHead {
            seq: 3,
            hash: trail::line_hash(&lines[2]).expect("hash"),
        };
        for i in 0..6 {
            let r = AuditRecord {
                at_ms: 9_000 + i,
                action: "check".into(),
                ..AuditRecord::default()
            };
            let (line, next) = trail::seal(head, &r, &key).expect("seal");
            head = next;
            rewritten.push(line);
        }
        assert_ne!(rewritten[3], other[3]);
        assert!(matches!(
            check(&rewritten, 1, 9, &anchors),
            Err(AnchorError::Rewritten { seq: 4, .. })
        ));
        // The oldest segment (lines 1-3) deleted by hand: the newest anchor saw line 1.
        assert!(matches!(
            check(&lines, 4, 10, &anchors),
            Err(AnchorError::SegmentsRemoved {
                first: 4,
                oldest: 1,
                ..
            })
        ));
        // Deleted by retention before the newest anchor: it saw line 4 as the oldest.
        let retained = [anchor(&lines, 4, 1), anchor(&lines, 8, 4)];
        assert!(check(&lines, 4, 10, &retained).is_ok());
        // Every line gone.
        assert!(matches!(
            check(&lines, 1, 0, &anchors),
            Err(AnchorError::Cut {
                ends: 0,
                anchored: 8,
                ..
            })
        ));
        // Anchors of another log say nothing of this one.
        let mut foreign = anchor(&lines, 9, 1);
        foreign.log = "M".into();
        assert!(
            check(
                &lines,
                1,
                8,
                &[anchors[0].clone(), anchors[1].clone(), foreign]
            )
            .is_ok()
        );
    }

    #[test]
    fn a_log_without_anchors_is_refused_once_it_is_older_than_the_grace() {
        let lines = log(3);
        let mut young = AnchorCheck::new("L", []);
        let mut old = AnchorCheck::new("L", []);
        for (i, l) in lines.iter().enumerate() {
            young.line(i as u64 + 1, l).expect("line");
            old.line(i as u64 + 1, l).expect("line");
        }
        let report = young.finish(Some(1_000), 600_000, 60_000).expect("young");
        assert_eq!(report.after_anchor, 3);
        assert!(matches!(
            old.finish(Some(1_000), 600_000, 700_000),
            Err(AnchorError::NotAnchored { .. })
        ));
    }
}
