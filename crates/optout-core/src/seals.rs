//! Tamper evidence for the changes trail, which lives in the consent store.
//!
//! A record of the changes trail is written by the store together with the change it records (in
//! Redis by the change's own script, which cannot compute a MAC without being handed the key, and
//! in the Cluster by a step that must not fail). So the service seals the trail just after: a
//! *seal* lists the records written since the one before, each by its id in the store and a hash
//! of its bytes exactly as stored, and is itself a line of a sealed trail ([`crate::trail`]): a
//! sequence number, a hash-chain link to the seal before it, the audit key's id and a MAC. Seals
//! are written every second or so by whichever replica gets there first (a compare-and-set on the
//! last seal's sequence number).
//!
//! [`Verifier`] walks the seals and the records side by side, both in id order, and names the
//! first record that was altered (its hash differs), removed (sealed, but gone) or added by hand
//! (present inside a sealed stretch, but in no seal). A seal altered, removed or reordered breaks
//! the seals' own chain. Records written after the last seal are counted as not yet sealed.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    AuditKey,
    trail::{self, ChainHead, TrailError},
};

/// One seal: the records it covers, oldest first, as `[id, hash]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesSeal {
    /// The records covered, oldest first: their id in the store and [`record_hash`].
    pub records: Vec<(String, String)>,
}

impl ChangesSeal {
    /// The id of the last record covered.
    pub fn upto(&self) -> Option<&str> {
        self.records.last().map(|(id, _)| id.as_str())
    }
}

/// Records a seal covers at most (a seal line stays under about 64 KiB).
pub const SEAL_MAX_RECORDS: usize = 1000;

/// The hash of a record's stored bytes: hex of the first 16 bytes of SHA-256 (the seal's MAC
/// makes it binding).
pub fn record_hash(bytes: &[u8]) -> String {
    trail::hex(&Sha256::digest(bytes)[..16])
}

/// A record id of either store (`<ms>-<seq>`), as a sortable pair; `None` if it is not one.
pub fn id_order(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// What verifying the changes trail found, when nothing was wrong.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangesReport {
    /// Seals checked.
    pub seals: u64,
    /// Records found as sealed.
    pub records: u64,
    /// Records written after the last seal (sealed within about a second while a replica runs).
    pub unsealed: u64,
    /// Sealed records older than the oldest record present: deleted by the retention
    /// (`--audit-changes-max-age-days`) or by hand; the trail verifies from where it starts.
    pub gone_before_start: u64,
    /// The last seal's sequence number.
    pub last_seal: u64,
}

/// What is wrong with the changes trail.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangesError {
    /// A seal line does not verify (`line` counts seals from the first one read, 1-based).
    #[error("seal {0}")]
    Seal(TrailError),
    /// A seal whose records are not a seal's payload, or ids that are not record ids.
    #[error("seal {seq}: {problem}")]
    BadSeal {
        /// The seal's sequence number.
        seq: u64,
        /// What is wrong with it.
        problem: String,
    },
    /// A record whose bytes are not what was sealed.
    #[error("record {id}: altered since it was sealed (seal {seal})")]
    Altered {
        /// The record's id in the store.
        id: String,
        /// The sequence number of the seal that covers it.
        seal: u64,
    },
    /// A sealed record that is no longer in the store.
    #[error("record {id}: removed (sealed by seal {seal}, no longer in the store)")]
    Removed {
        /// The id it had.
        id: String,
        /// The seal that covers it.
        seal: u64,
    },
    /// A record inside a sealed stretch that no seal lists: written around the service.
    #[error("record {id}: not in any seal although seals cover later records: added by hand")]
    Added {
        /// The record's id in the store.
        id: String,
    },
}

/// Checks the changes trail: feed it seal lines in sequence order ([`Verifier::seal`]) and
/// records in id order ([`Verifier::record`]); [`Verifier::wants_seal`] says when it needs the next
/// seal before it can judge a record.
pub struct Verifier<'k> {
    key: &'k AuditKey,
    head: Option<ChainHead>,
    /// Sealed records not yet matched: (order, id, hash, seal).
    pending: VecDeque<((u64, u64), String, String, u64)>,
    /// The id order of the last sealed record.
    sealed_upto: Option<(u64, u64)>,
    seals_done: bool,
    seen_record: bool,
    report: ChangesReport,
}

impl<'k> Verifier<'k> {
    /// A verifier under `key`.
    pub fn new(key: &'k AuditKey) -> Self {
        Verifier {
            key,
            head: None,
            pending: VecDeque::new(),
            sealed_upto: None,
            seals_done: false,
            seen_record: false,
            report: ChangesReport::default(),
        }
    }

    /// Whether a record with this id order cannot be judged before more seals are read.
    pub fn wants_seal(&self, order: (u64, u64)) -> bool {
        !self.seals_done && self.sealed_upto.is_none_or(|upto| upto < order)
    }

    /// No more seals.
    pub fn seals_done(&mut self) {
        self.seals_done = true;
    }

    /// The next seal line. The first one read is checked from its own link (older seals may have
    /// gone with the records they covered); each later one must follow it.
    pub fn seal(&mut self, line: &str) -> Result<(), ChangesError> {
        let first = self.report.seals + 1;
        let head = trail::verify([line], self.key, self.head, first).map_err(ChangesError::Seal)?;
        let bad = |problem: &str| ChangesError::BadSeal {
            seq: head.seq,
            problem: problem.into(),
        };
        let (_, seal) = trail::open_line::<ChangesSeal>(line)
            .ok_or_else(|| bad("its record is not a list of sealed records"))?;
        for (id, hash) in seal.records {
            let order = id_order(&id).ok_or_else(|| bad("a record id is not <ms>-<seq>"))?;
            if self.sealed_upto.is_some_and(|upto| upto >= order) {
                return Err(bad("its records do not follow the seal before it"));
            }
            self.sealed_upto = Some(order);
            self.pending.push_back((order, id, hash, head.seq));
        }
        self.head = Some(head);
        self.report.seals += 1;
        self.report.last_seal = head.seq;
        Ok(())
    }

    /// The next record of the trail, in id order, with its bytes as stored.
    pub fn record(&mut self, id: &str, bytes: &[u8]) -> Result<(), ChangesError> {
        let order = id_order(id).ok_or_else(|| ChangesError::Added { id: id.into() })?;
        while let Some((o, sealed_id, _, seal)) = self.pending.front() {
            if *o >= order {
                break;
            }
            // Sealed but gone: before the first record present it is the retention's doing.
            if self.seen_record {
                return Err(ChangesError::Removed {
                    id: sealed_id.clone(),
                    seal: *seal,
                });
            }
            self.report.gone_before_start += 1;
            self.pending.pop_front();
        }
        self.seen_record = true;
        match self.pending.front() {
            Some((o, _, hash, seal)) if *o == order => {
                if *hash != record_hash(bytes) {
                    return Err(ChangesError::Altered {
                        id: id.into(),
                        seal: *seal,
                    });
                }
                self.pending.pop_front();
                self.report.records += 1;
                Ok(())
            }
            _ if self.sealed_upto.is_some_and(|upto| order < upto) => {
                Err(ChangesError::Added { id: id.into() })
            }
            _ => {
                self.report.unsealed += 1;
                Ok(())
            }
        }
    }

    /// After the last record: sealed records left over were removed.
    pub fn finish(mut self) -> Result<ChangesReport, ChangesError> {
        match self.pending.pop_front() {
            Some((_, id, _, seal)) if self.seen_record => Err(ChangesError::Removed { id, seal }),
            Some(_) => {
                // No record left at all: all of them older than the oldest present.
                self.report.gone_before_start += 1 + self.pending.len() as u64;
                Ok(self.report)
            }
            None => Ok(self.report),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AuditKey {
        AuditKey::new(&[5u8; 32]).expect("key")
    }

    fn records(n: u64) -> Vec<(String, Vec<u8>)> {
        (1..=n)
            .map(|i| {
                (
                    format!("{}-0", 1000 + i),
                    format!("record {i}").into_bytes(),
                )
            })
            .collect()
    }

    /// Seals of `per` records each over `recs`.
    fn seals(recs: &[(String, Vec<u8>)], per: usize) -> Vec<String> {
        let mut head = ChainHead::START;
        recs.chunks(per)
            .map(|chunk| {
                let seal = ChangesSeal {
                    records: chunk
                        .iter()
                        .map(|(id, b)| (id.clone(), record_hash(b)))
                        .collect(),
                };
                let (line, next) = trail::seal(head, &seal, &key()).expect("seal");
                head = next;
                line
            })
            .collect()
    }

    fn verify(seals: &[String], recs: &[(String, Vec<u8>)]) -> Result<ChangesReport, ChangesError> {
        let key = key();
        let mut v = Verifier::new(&key);
        let mut next = seals.iter();
        for (id, bytes) in recs {
            let order = id_order(id).expect("id");
            while v.wants_seal(order) {
                match next.next() {
                    Some(line) => v.seal(line)?,
                    None => v.seals_done(),
                }
            }
            v.record(id, bytes)?;
        }
        for line in next {
            v.seal(line)?;
        }
        v.finish()
    }

    #[test]
    fn sealed_records_verify_and_the_first_altered_removed_or_added_one_is_named() {
        let recs = records(10);
        let s = seals(&recs[..8], 3);
        let report = verify(&s, &recs).expect("intact");
        assert_eq!(
            (report.seals, report.records, report.unsealed),
            (3, 8, 2),
            "{report:?}"
        );

        let mut altered = recs.clone();
        altered[4].1[0] ^= 1;
        assert_eq!(
            verify(&s, &altered),
            Err(ChangesError::Altered {
                id: "1005-0".into(),
                seal: 2
            })
        );

        let mut removed = recs.clone();
        removed.remove(5);
        assert_eq!(
            verify(&s, &removed),
            Err(ChangesError::Removed {
                id: "1006-0".into(),
                seal: 2
            })
        );
        // The last sealed record removed: found at the end.
        let mut tail = recs[..8].to_vec();
        tail.pop();
        assert!(matches!(
            verify(&s, &tail),
            Err(ChangesError::Removed { id, .. }) if id == "1008-0"
        ));

        let mut added = recs.clone();
        added.insert(3, ("1003-5".into(), b"forged".to_vec()));
        assert_eq!(
            verify(&s, &added),
            Err(ChangesError::Added {
                id: "1003-5".into()
            })
        );

        // Two records' contents swapped: the first of them is altered.
        let mut swapped = recs.clone();
        let (a, b) = (swapped[1].1.clone(), swapped[2].1.clone());
        swapped[1].1 = b;
        swapped[2].1 = a;
        assert!(matches!(
            verify(&s, &swapped),
            Err(ChangesError::Altered { id, .. }) if id == "1002-0"
        ));

        // A seal removed or edited breaks the seals' chain.
        let mut fewer = s.clone();
        fewer.remove(1);
        assert!(matches!(verify(&fewer, &recs), Err(ChangesError::Seal(_))));
        let mut edited = s.clone();
        edited[0] = edited[0].replacen("1001-0", "1001-1", 1);
        assert!(matches!(verify(&edited, &recs), Err(ChangesError::Seal(_))));

        // The oldest records trimmed with their seal: verifies from where the trail starts.
        let report = verify(&s[1..], &recs[4..]).expect("trimmed");
        assert_eq!(report.gone_before_start, 1, "{report:?}");
        assert_eq!(report.records, 4);
    }
}
