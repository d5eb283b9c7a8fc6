//! Tamper evidence for the changes trail, which lives in the consent store.
//!
//! Each record a replica writes to a Redis store also carries a MAC of its content under the
//! audit key ([`record_mac`]), computed by the replica before the store's script runs (the script
//! adds the version and the count, which the MAC does not cover and the seal does). The sealer
//! seals only records whose MAC verifies, and the verifier requires it: a record added to the
//! trail by hand (issue 27 item 7: an `XADD` to `changes`, which the next seal used to cover as
//! genuine) is named, sealed or not; a copy of a genuine record is named as replayed. Records
//! without a MAC are accepted only where a seal covers them: written before MACs, and sealed by
//! a replica of that version. The embedded store's trail is written only through the service,
//! which holds its file locked, and carries no MACs ([`RecordMac::NotUsed`]).
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

/// The MAC a record of the changes trail carries: hex of the first 16 bytes of HMAC-SHA-256,
/// under the audit key, of a domain tag and the record's content (its JSON as the replica wrote
/// it).
pub fn record_mac(key: &AuditKey, content: &[u8]) -> String {
    let mut data = Vec::with_capacity(RECORD_MAC_DOMAIN.len() + content.len());
    data.extend_from_slice(RECORD_MAC_DOMAIN);
    data.extend_from_slice(content);
    trail::hex(&key.mac(&data)[..16])
}

/// Keeps a record's MAC apart from every other MAC made under the audit key.
const RECORD_MAC_DOMAIN: &[u8] = b"optout changes-trail record v1\n";

/// What a stored record carries to show a replica wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordMac {
    /// The content the writer MACed and the MAC stored beside it.
    Carried {
        /// The content as stored (a Redis record's `r` field).
        content: Vec<u8>,
        /// The MAC as stored (the `m` field).
        mac: String,
    },
    /// No MAC where the store writes them: written around the service, by a replica without the
    /// audit key, or before MACs were written.
    Absent,
    /// The store writes none (the embedded store), or the entry is a seal.
    NotUsed,
}

impl RecordMac {
    /// Whether a record with this MAC may be sealed under `key`.
    pub fn sealable(&self, key: &AuditKey) -> bool {
        match self {
            RecordMac::Carried { content, mac } => record_mac(key, content) == *mac,
            RecordMac::Absent => false,
            RecordMac::NotUsed => true,
        }
    }
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
    /// A record whose MAC does not verify under the audit key: written around the service.
    #[error("record {id}: its MAC does not verify under the audit key: added or altered by hand")]
    Forged {
        /// The record's id in the store.
        id: String,
    },
    /// A record without a MAC that no seal covers, in a store whose replicas MAC every record.
    #[error(
        "record {id}: carries no MAC and no seal covers it: added by hand, or written by a \
         replica without the audit key (or older than record MACs)"
    )]
    Unauthenticated {
        /// The record's id in the store.
        id: String,
    },
    /// A record whose content and MAC are those of an earlier record: a genuine record copied.
    #[error("record {id}: a copy of record {first} (the same content and MAC): replayed by hand")]
    Replayed {
        /// The copy's id in the store.
        id: String,
        /// The earlier record's id.
        first: String,
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
    /// The MACs of the records read so far, with their ids: a record's MAC is unique to its
    /// content (which carries its time, caller and numbers), so a repeat is a copy.
    macs: std::collections::HashMap<String, String>,
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
            macs: std::collections::HashMap::new(),
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

    /// The next record of the trail, in id order, with its bytes as stored and the MAC it carries.
    pub fn record(&mut self, id: &str, bytes: &[u8], mac: &RecordMac) -> Result<(), ChangesError> {
        let order = id_order(id).ok_or_else(|| ChangesError::Added { id: id.into() })?;
        let sealed = self.against_seals(id, order, bytes)?;
        match mac {
            RecordMac::Carried { content, mac } => {
                if record_mac(self.key, content) != *mac {
                    return Err(ChangesError::Forged { id: id.into() });
                }
                if let Some(first) = self.macs.insert(mac.clone(), id.to_string()) {
                    return Err(ChangesError::Replayed {
                        id: id.into(),
                        first,
                    });
                }
            }
            // Sealers seal no record without a MAC where MACs are written: none ever will. One
            // under a seal was written and sealed before MACs: the seal vouches for it.
            RecordMac::Absent if !sealed => {
                return Err(ChangesError::Unauthenticated { id: id.into() });
            }
            RecordMac::Absent | RecordMac::NotUsed => {}
        }
        if sealed {
            self.report.records += 1;
        } else {
            self.report.unsealed += 1;
        }
        Ok(())
    }

    /// Matches a record against the seals: `Ok(true)` when a seal covers it, `Ok(false)` when it
    /// is newer than every seal.
    fn against_seals(
        &mut self,
        id: &str,
        order: (u64, u64),
        bytes: &[u8],
    ) -> Result<bool, ChangesError> {
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
                Ok(true)
            }
            _ if self.sealed_upto.is_some_and(|upto| order < upto) => {
                Err(ChangesError::Added { id: id.into() })
            }
            _ => Ok(false),
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
        let unmaced: Vec<_> = recs
            .iter()
            .map(|(id, b)| (id.clone(), b.clone(), RecordMac::NotUsed))
            .collect();
        verify_maced(seals, &unmaced)
    }

    fn verify_maced(
        seals: &[String],
        recs: &[(String, Vec<u8>, RecordMac)],
    ) -> Result<ChangesReport, ChangesError> {
        let key = key();
        let mut v = Verifier::new(&key);
        let mut next = seals.iter();
        for (id, bytes, mac) in recs {
            let order = id_order(id).expect("id");
            while v.wants_seal(order) {
                match next.next() {
                    Some(line) => v.seal(line)?,
                    None => v.seals_done(),
                }
            }
            v.record(id, bytes, mac)?;
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

    /// A Redis record: its content MACed under `key`, stored with the MAC (as `bytes`).
    fn maced(i: u64, key: &AuditKey) -> (String, Vec<u8>, RecordMac) {
        let content = format!("{{\"record\":{i}}}").into_bytes();
        let mac = record_mac(key, &content);
        let mut bytes = content.clone();
        bytes.extend_from_slice(mac.as_bytes());
        (
            format!("{}-0", 2000 + i),
            bytes,
            RecordMac::Carried { content, mac },
        )
    }

    #[test]
    fn a_record_without_a_valid_mac_is_never_sealed_and_is_named_sealed_or_not() {
        let recs: Vec<_> = (1..=4).map(|i| maced(i, &key())).collect();
        let plain: Vec<_> = recs
            .iter()
            .map(|(id, b, _)| (id.clone(), b.clone()))
            .collect();
        let s = seals(&plain[..3], 3);
        let report = verify_maced(&s, &recs).expect("intact");
        assert_eq!((report.records, report.unsealed), (3, 1), "{report:?}");
        assert!(recs.iter().all(|(_, _, m)| m.sealable(&key())));

        // Forged under another key, or without one: the sealer leaves it out and the verifier
        // names it, at the unsealed tail as in a sealed stretch.
        let other = AuditKey::new(&[6u8; 32]).expect("key");
        let forged = maced(9, &other);
        assert!(!forged.2.sealable(&key()));
        assert!(!RecordMac::Absent.sealable(&key()));
        assert!(RecordMac::NotUsed.sealable(&key()));
        let mut tail = recs.clone();
        tail.push(forged.clone());
        assert_eq!(
            verify_maced(&s, &tail),
            Err(ChangesError::Forged {
                id: forged.0.clone()
            })
        );
        let mut bare = recs.clone();
        bare.push(("2010-0".into(), b"{}".to_vec(), RecordMac::Absent));
        assert_eq!(
            verify_maced(&s, &bare),
            Err(ChangesError::Unauthenticated {
                id: "2010-0".into()
            })
        );
        // Without a MAC but under a seal: written and sealed before MACs; the seal vouches.
        let mut old = recs.clone();
        old[1].2 = RecordMac::Absent;
        assert!(verify_maced(&s, &old).is_ok());

        // A genuine record copied to a new id: its MAC verifies, but it is a repeat.
        let mut copied = recs.clone();
        copied.push(("2010-0".into(), recs[1].1.clone(), recs[1].2.clone()));
        assert_eq!(
            verify_maced(&s, &copied),
            Err(ChangesError::Replayed {
                id: "2010-0".into(),
                first: recs[1].0.clone()
            })
        );
    }
}
