//! The checker: reads a [`History`] and says whether the one rule held. It shares no code with
//! the service: versions, types and the effect of each change are its own (`history.rs`), and
//! it knows the service only as a client does.
//!
//! The rules (issue 27):
//! - **(a) released**: no check released a number whose add took effect at V and was not
//!   followed by a removal, when the answer reflects a version >= V (its own, or the
//!   `at_least_version` it was asked for) or was asked more than the freshness bound after the
//!   add was acknowledged.
//! - **(b) recorded**: every acknowledged change has exactly one record in the changes trail, at
//!   its version; an unacknowledged one at most one; no record names a change that was not made.
//! - **(c) kept, and back**: after the faults heal, the store holds every add that took effect
//!   and was not removed, and every replica is SERVING again.
//!
//! Which changes took effect: an acknowledged one at its version; an unacknowledged one (an
//! error, a timeout) if the changes trail records it, at the recorded version. One the trail
//! does not record did not take effect, unless a fault could have erased its record after a
//! replica saw it (a master killed before its replica received an unacknowledged change, or a
//! restore from an older copy): then it *may* have, and a removal of that kind excuses a release
//! of its numbers (it cannot oblige anything).
//!
//! Changes that a restore from an older copy lost (those that took effect after the copy) bind
//! only the replicas that provably knew them before the restore (the replica that acknowledged
//! one, or one that answered at a version at or past it), until the operator acknowledges the
//! regression; the operator re-adds what it knows was lost first, and those re-adds bind as any
//! change does.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use crate::history::{ChangeKind, ChangeOp, CheckOp, Fault, History, Kind, Version, source_of};

/// Which rule a violation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// (a) an opted-out number was released.
    Released,
    /// (b) the changes trail does not match the changes.
    Recorded,
    /// (c) the store lost an add that took effect and was not removed.
    Kept,
    /// (c) a replica did not come back after the faults healed.
    Back,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Rule::Released => "(a) released an opt-out",
            Rule::Recorded => "(b) changes trail",
            Rule::Kept => "(c) store lost an opt-out",
            Rule::Back => "(c) replica not back",
        })
    }
}

/// One broken rule, with what the history says around it.
#[derive(Clone, Debug)]
pub struct Violation {
    /// The rule.
    pub rule: Rule,
    /// What happened, in a line.
    pub message: String,
    /// The operations around it: the changes of the number in version order, the check, the
    /// faults in force.
    pub context: String,
}

/// What the checker found.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// Broken rules.
    pub violations: Vec<Violation>,
    /// Odd but safe (an opt-out the store still holds after its removal took effect).
    pub notes: Vec<String>,
    /// Releases checked against an opt-out that bound them (how much the rules were exercised).
    pub releases_checked: u64,
    /// Withholds of a number whose latest binding change was an add (the rule's positive cases).
    pub opt_outs_withheld: u64,
}

/// Whether a change took effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Took {
    /// At this version.
    Effect(Version),
    /// Perhaps: its record could have been erased by a fault.
    Maybe,
}

/// One change of one (number, type).
#[derive(Clone, Copy, Debug)]
struct Entry {
    op: usize,
    took: Took,
    /// Held after it.
    held: bool,
}

/// Checks a history against rules (a), (b) and (c).
pub fn check(h: &History) -> Verdict {
    let mut v = Verdict::default();
    let audit = audit_by_source(h);
    let took: Vec<Option<Took>> = h
        .changes
        .iter()
        .map(|c| took_effect(h, c, audit.as_ref()))
        .collect();
    // Per (number, type): the changes that may have touched it, those with a version in version
    // order, then the maybes.
    let mut index: BTreeMap<(u64, Kind), Vec<Entry>> = BTreeMap::new();
    for (i, c) in h.changes.iter().enumerate() {
        let Some(t) = took[i] else { continue };
        for &n in &h.pool {
            for k in Kind::BOTH {
                if let Some(held) = c.effect(n, k) {
                    index.entry((n, k)).or_default().push(Entry {
                        op: i,
                        took: t,
                        held,
                    });
                }
            }
        }
    }
    for entries in index.values_mut() {
        entries.sort_by_key(|e| match e.took {
            Took::Effect(v) => (0, Some(v)),
            Took::Maybe => (1, None),
        });
    }
    released(h, &index, &mut v);
    recorded(h, audit.as_ref(), &mut v);
    kept(h, &index, &mut v);
    for r in &h.replicas {
        if !r.serving {
            v.violations.push(Violation {
                rule: Rule::Back,
                message: format!(
                    "replica {} was not SERVING after the faults healed: {}",
                    r.replica, r.why
                ),
                context: String::new(),
            });
        }
    }
    v
}

/// The changes trail's records by source.
fn audit_by_source(h: &History) -> Option<HashMap<&str, Vec<&crate::history::AuditSeen>>> {
    let audit = h.audit.as_ref()?;
    let mut by: HashMap<&str, Vec<_>> = HashMap::new();
    for r in audit {
        by.entry(r.source.as_str()).or_default().push(r);
    }
    Some(by)
}

fn took_effect(
    h: &History,
    c: &ChangeOp,
    audit: Option<&HashMap<&str, Vec<&crate::history::AuditSeen>>>,
) -> Option<Took> {
    if let Some(v) = c.acked() {
        return Some(Took::Effect(v));
    }
    if matches!(c.outcome, crate::history::Outcome::Refused { .. }) {
        return None; // rule (b) holds the service to it
    }
    let source = source_of(h.seed, c.id);
    let recorded = audit.and_then(|a| a.get(source.as_str()));
    if let Some(version) = recorded.and_then(|r| r.first()).and_then(|r| r.version) {
        return Some(Took::Effect(version));
    }
    // No record (or no trail to read): it took effect only if a fault could have erased it after
    // it landed.
    let erasable = audit.is_none()
        || h.faults.iter().any(|f| match &f.loss {
            // A restore erases what landed after the copy and before the node stopped.
            Some(l) => c.end > l.copied_at && c.start < f.start,
            // A failover may lose what the old master had not passed on, however long ago.
            None => f.may_lose_unacknowledged && f.end > c.start,
        });
    erasable.then_some(Took::Maybe)
}

/// The restore that lost `c`, if one did: `c` landed after the copy and before the node was
/// stopped. (A change in flight across either moment may or may not be lost: counted lost.)
fn lost_by<'h>(h: &'h History, c: &ChangeOp) -> Option<&'h Fault> {
    h.faults.iter().find(|f| {
        f.loss
            .as_ref()
            .is_some_and(|l| c.end > l.copied_at && c.start < f.start)
    })
}

/// Rule (a), for every released number of every answered check.
fn released(h: &History, index: &BTreeMap<(u64, Kind), Vec<Entry>>, v: &mut Verdict) {
    let bound_us = h.bound_ms * 1000;
    for c in &h.checks {
        let Some(answer) = &c.answer else { continue };
        let reflects = answer.version.max(c.at_least);
        for (&n, (released, _)) in c.numbers.iter().zip(&answer.decisions) {
            for k in Kind::BOTH {
                let Some(entries) = index.get(&(n, k)) else {
                    continue;
                };
                // The changes this answer must reflect: at or below its version, or
                // acknowledged more than the bound before it was asked.
                let binding = entries.iter().rev().find(|e| {
                    let Took::Effect(ver) = e.took else {
                        return false;
                    };
                    let op = &h.changes[e.op];
                    reflects.is_some_and(|r| ver <= r)
                        || (op.acked().is_some() && op.end + bound_us < c.start)
                });
                let Some(a) = binding.filter(|a| a.held) else {
                    continue;
                };
                if !*released {
                    v.opt_outs_withheld += 1;
                    continue;
                }
                v.releases_checked += 1;
                if excused(h, entries, a, c) {
                    continue;
                }
                let add = &h.changes[a.op];
                v.violations.push(Violation {
                    rule: Rule::Released,
                    message: format!(
                        "check {} at replica {} released {n} ({k:?}) answering at {} (asked at \
                         least {}), {:.3} s after change {} holding it took effect at {} \
                         (acknowledged: {})",
                        c.id,
                        c.replica,
                        show(answer.version),
                        show(c.at_least),
                        c.start.saturating_sub(add.end) as f64 / 1e6,
                        add.id,
                        show(match a.took {
                            Took::Effect(v) => Some(v),
                            Took::Maybe => None,
                        }),
                        add.acked().is_some(),
                    ),
                    context: context(h, n, k, entries, Some(c)),
                });
            }
        }
    }
}

/// Whether a release of the binding add `a` by check `c` is explained: a later removal that
/// took effect (or may have) before the check was answered, or a restore that lost the add
/// before this replica could know of it.
fn excused(h: &History, entries: &[Entry], a: &Entry, c: &CheckOp) -> bool {
    let Took::Effect(av) = a.took else {
        return true;
    };
    let removed_after = entries.iter().any(|e| {
        !e.held
            && h.changes[e.op].start < c.end
            && match e.took {
                Took::Effect(v) => v > av,
                Took::Maybe => true,
            }
    });
    if removed_after {
        return true;
    }
    let add = &h.changes[a.op];
    let Some(restore) = lost_by(h, add) else {
        return false;
    };
    let Some(loss) = &restore.loss else {
        return false;
    };
    if c.end <= restore.start {
        return false; // answered before the store lost it
    }
    if loss.acknowledged_at.is_some_and(|at| c.start > at) {
        return true; // the operator gave up what it did not re-add
    }
    !knew(h, c, add, av, restore.start)
}

/// Whether the replica incarnation that answered `c` provably knew `add` (at `av`) before the
/// store lost it at `lost_at`: it acknowledged the add itself, or answered an earlier check at a
/// version at or past it.
fn knew(h: &History, c: &CheckOp, add: &ChangeOp, av: Version, lost_at: u64) -> bool {
    let Some(inc) = c.incarnation else {
        return false;
    };
    if add.replica == c.replica && add.incarnation == Some(inc) {
        return true;
    }
    h.checks.iter().any(|c0| {
        c0.replica == c.replica
            && c0.incarnation == Some(inc)
            && c0.end < lost_at
            && c0.end <= c.start
            && c0
                .answer
                .as_ref()
                .and_then(|a| a.version)
                .is_some_and(|v0| v0 >= av)
    })
}

/// The audit action of a change.
fn action(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Add => "add",
        ChangeKind::Remove => "remove",
        ChangeKind::Merge => "import-merge",
        ChangeKind::Replace => "import-replace",
    }
}

/// Rule (b).
fn recorded(
    h: &History,
    audit: Option<&HashMap<&str, Vec<&crate::history::AuditSeen>>>,
    v: &mut Verdict,
) {
    let Some(audit) = audit else { return };
    let mut known = std::collections::HashSet::new();
    for c in &h.changes {
        let source = source_of(h.seed, c.id);
        let records = audit.get(source.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        known.insert(source.clone());
        let mut broken = |message: String| {
            v.violations.push(Violation {
                rule: Rule::Recorded,
                message,
                context: describe_change(h, c, None),
            })
        };
        if records.len() > 1 {
            broken(format!(
                "change {} ({source}) has {} records in the changes trail",
                c.id,
                records.len()
            ));
            continue;
        }
        if let Some(r) = records.first()
            && r.action != action(c.kind)
        {
            broken(format!(
                "change {} ({source}) is recorded as {:?}, not {:?}",
                c.id,
                r.action,
                action(c.kind)
            ));
        }
        if matches!(c.outcome, crate::history::Outcome::Refused { .. }) && !records.is_empty() {
            broken(format!(
                "change {} ({source}) was refused as not applied, and the changes trail records \
                 it",
                c.id
            ));
            continue;
        }
        let Some(version) = c.acked() else { continue };
        match records.first() {
            None if lost_by(h, c).is_some() => {}
            None => broken(format!(
                "change {} ({source}) was acknowledged at {version} and has no record in the \
                 changes trail",
                c.id
            )),
            Some(r) if r.version != Some(version) => broken(format!(
                "change {} ({source}) was acknowledged at {version} and recorded at {}",
                c.id,
                show(r.version)
            )),
            Some(_) => {}
        }
    }
    let prefix = format!("nemesis-{}-", h.seed);
    for source in audit.keys() {
        if source.starts_with(&prefix) && !known.contains(*source) {
            v.violations.push(Violation {
                rule: Rule::Recorded,
                message: format!("the changes trail records {source}, which no client sent"),
                context: String::new(),
            });
        }
    }
}

/// Rule (c): the store at the end.
fn kept(h: &History, index: &BTreeMap<(u64, Kind), Vec<Entry>>, v: &mut Verdict) {
    let Some(state) = &h.final_state else { return };
    let held: HashMap<u64, &Vec<Kind>> = state.iter().map(|(n, ks)| (*n, ks)).collect();
    for (&(n, k), entries) in index {
        let last = entries
            .iter()
            .rev()
            .find(|e| matches!(e.took, Took::Effect(_)));
        let Some(last) = last else { continue };
        let holds = held.get(&n).is_some_and(|ks| ks.contains(&k));
        let maybe = |want: bool| {
            entries
                .iter()
                .any(|e| e.took == Took::Maybe && e.held == want)
        };
        let op = &h.changes[last.op];
        if last.held && !holds && !maybe(false) && lost_by(h, op).is_none() {
            v.violations.push(Violation {
                rule: Rule::Kept,
                message: format!(
                    "the store does not hold {n} ({k:?}) after the faults healed, though change \
                     {} added it and nothing removed it",
                    op.id
                ),
                context: context(h, n, k, entries, None),
            });
        } else if !last.held && holds && !maybe(true) && lost_by(h, op).is_none() {
            v.notes.push(format!(
                "the store still holds {n} ({k:?}) after change {} removed it (safe: withheld)",
                op.id
            ));
        }
    }
}

fn show(v: Option<Version>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn secs(us: u64) -> String {
    format!("{:.3}", us as f64 / 1e6)
}

fn describe_change(h: &History, c: &ChangeOp, took: Option<Took>) -> String {
    let _ = h;
    format!(
        "  change {:>5} {:?} {:?} {:?} via replica {} (incarnation {:?}) [{} .. {}] {} {}\n",
        c.id,
        c.kind,
        c.opt_out,
        c.numbers,
        c.replica,
        c.incarnation,
        secs(c.start),
        secs(c.end),
        match &c.outcome {
            crate::history::Outcome::Ok { version } => format!("acknowledged at {version}"),
            crate::history::Outcome::Unknown { error } => format!("unknown ({error})"),
            crate::history::Outcome::Refused { error } => format!("refused ({error})"),
        },
        match took {
            Some(Took::Effect(v)) => format!("took effect at {v}"),
            Some(Took::Maybe) => "may have taken effect".into(),
            None => String::new(),
        }
    )
}

/// The changes of `(n, k)` in version order, the check, and the faults around it.
fn context(h: &History, n: u64, k: Kind, entries: &[Entry], c: Option<&CheckOp>) -> String {
    let mut out = format!("changes of {n} ({k:?}), in version order:\n");
    for e in entries {
        out.push_str(&describe_change(h, &h.changes[e.op], Some(e.took)));
    }
    let (from, to) = match c {
        Some(c) => {
            let _ = writeln!(
                out,
                "the check: {} at replica {} (incarnation {:?}) [{} .. {}], at least {}, \
                 answer {:?}",
                c.id,
                c.replica,
                c.incarnation,
                secs(c.start),
                secs(c.end),
                show(c.at_least),
                c.answer.as_ref().map(|a| (
                    show(a.version),
                    c.numbers.iter().zip(&a.decisions).collect::<Vec<_>>()
                ))
            );
            (c.start.saturating_sub(10_000_000), c.end)
        }
        None => (0, u64::MAX),
    };
    out.push_str("faults in force around it:\n");
    for f in h.faults.iter().filter(|f| f.end >= from && f.start <= to) {
        let _ = writeln!(
            out,
            "  {} {} [{} .. {}]{}",
            f.kind,
            f.target,
            secs(f.start),
            secs(f.end),
            f.loss
                .as_ref()
                .map(|l| format!(
                    " copied at {}, restored at {}, acknowledged at {}",
                    secs(l.copied_at),
                    secs(l.restored_at),
                    l.acknowledged_at.map_or("-".into(), secs)
                ))
                .unwrap_or_default()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    //! The checker must catch what it is for: each rule is shown failing on a history that
    //! breaks it, and passing on the same history made right.
    use super::*;
    use crate::history::{AuditSeen, CheckAnswer, Loss, Outcome, ReplicaEnd};

    const N: u64 = 9434765919;

    fn v(ms: u64) -> Version {
        Version { ms, seq: 0 }
    }

    fn change(id: u64, kind: ChangeKind, start: u64, end: u64, outcome: Outcome) -> ChangeOp {
        ChangeOp {
            id,
            client: 0,
            replica: 0,
            incarnation: Some(0),
            kind,
            opt_out: Kind::National,
            numbers: vec![N],
            start,
            end,
            outcome,
        }
    }

    fn ok(ms: u64) -> Outcome {
        Outcome::Ok { version: v(ms) }
    }

    fn unknown() -> Outcome {
        Outcome::Unknown {
            error: "deadline".into(),
        }
    }

    fn check_op(id: u64, start: u64, version: u64, released: bool) -> CheckOp {
        CheckOp {
            id,
            client: 1,
            replica: 1,
            incarnation: Some(0),
            stream: false,
            numbers: vec![N],
            at_least: None,
            start,
            end: start + 1000,
            answer: Some(CheckAnswer {
                version: Some(v(version)),
                decisions: vec![(released, "x".into())],
            }),
        }
    }

    fn history(changes: Vec<ChangeOp>, checks: Vec<CheckOp>) -> History {
        let audit = changes
            .iter()
            .filter_map(|c| {
                c.acked().map(|ver| AuditSeen {
                    source: source_of(1, c.id),
                    action: action(c.kind).into(),
                    version: Some(ver),
                })
            })
            .collect();
        History {
            seed: 1,
            topology: "test".into(),
            bound_ms: 1000,
            pool: vec![N],
            changes,
            checks,
            faults: Vec::new(),
            audit: Some(audit),
            final_state: Some(vec![(N, vec![Kind::National])]),
            replicas: vec![ReplicaEnd {
                replica: 0,
                serving: true,
                why: String::new(),
            }],
        }
    }

    fn rules(h: &History) -> Vec<Rule> {
        check(h).violations.iter().map(|v| v.rule).collect()
    }

    #[test]
    fn a_release_after_an_acknowledged_add_is_caught_by_version_and_by_time() {
        let add = change(1, ChangeKind::Add, 0, 10_000, ok(100));
        // At the add's version: bound by version.
        let h = history(vec![add.clone()], vec![check_op(2, 20_000, 100, true)]);
        assert_eq!(rules(&h), vec![Rule::Released]);
        // At an older version, but asked past the bound: bound by time.
        let h = history(vec![add.clone()], vec![check_op(2, 1_020_000, 99, true)]);
        assert_eq!(rules(&h), vec![Rule::Released]);
        // Older and within the bound: allowed.
        let h = history(vec![add.clone()], vec![check_op(2, 20_000, 99, true)]);
        assert_eq!(rules(&h), Vec::<Rule>::new());
        // Withheld: the rule held.
        let h = history(vec![add], vec![check_op(2, 20_000, 100, false)]);
        assert_eq!(check(&h).opt_outs_withheld, 1);
        assert!(rules(&h).is_empty());
    }

    #[test]
    fn a_removal_ordered_before_the_add_does_not_excuse_a_release_but_one_after_does() {
        // Item 1 of issue 27: a removal whose writer died is finished after a later add. Its
        // record says version 90 (before the add's 100): the release is a violation.
        let add = change(2, ChangeKind::Add, 50_000, 60_000, ok(100));
        let removal = change(1, ChangeKind::Remove, 0, 30_000, unknown());
        let mut h = history(vec![removal, add], vec![check_op(3, 3_000_000, 120, true)]);
        h.audit.as_mut().expect("audit").push(AuditSeen {
            source: source_of(1, 1),
            action: "remove".into(),
            version: Some(v(90)),
        });
        assert_eq!(rules(&h), vec![Rule::Released]);
        // Recorded at 110, after the add: the release is explained.
        h.audit.as_mut().expect("audit")[1].version = Some(v(110));
        h.final_state = Some(vec![(N, vec![])]);
        assert_eq!(rules(&h), Vec::<Rule>::new());
    }

    #[test]
    fn an_unrecorded_unacknowledged_removal_excuses_only_when_a_fault_could_erase_its_record() {
        let add = change(1, ChangeKind::Add, 0, 10_000, ok(100));
        let removal = change(2, ChangeKind::Remove, 20_000, 500_000, unknown());
        let mut h = history(vec![add, removal], vec![check_op(3, 2_000_000, 120, true)]);
        assert_eq!(rules(&h), vec![Rule::Released]);
        h.faults.push(Fault {
            kind: "master-kill".into(),
            target: "x".into(),
            start: 100_000,
            end: 900_000,
            loss: None,
            may_lose_unacknowledged: true,
        });
        assert_eq!(rules(&h), Vec::<Rule>::new());
    }

    #[test]
    fn a_change_lost_by_a_restore_binds_the_replicas_that_knew_it_until_acknowledged() {
        // Item 2 of issue 27: an add acknowledged after the copy, the store restored, a new
        // write moves the version on.
        let add = change(1, ChangeKind::Add, 1_000_000, 1_010_000, ok(100));
        let mut knew = check_op(2, 1_100_000, 100, false);
        knew.replica = 1;
        let mut after = check_op(3, 3_000_000, 200, true);
        after.replica = 1;
        let mut h = history(vec![add], vec![knew, after.clone()]);
        h.audit = Some(Vec::new());
        h.final_state = Some(vec![(N, vec![])]);
        h.faults.push(Fault {
            kind: "redis-restore".into(),
            target: "x".into(),
            start: 2_000_000,
            end: 2_200_000,
            loss: Some(Loss {
                copied_at: 500_000,
                restored_at: 2_200_000,
                acknowledged_at: None,
            }),
            may_lose_unacknowledged: true,
        });
        assert_eq!(rules(&h), vec![Rule::Released], "{:?}", check(&h));
        // A replica that never answered at or past it cannot know it was lost.
        h.checks[0].incarnation = Some(7);
        assert_eq!(rules(&h), Vec::<Rule>::new());
        // The acknowledging replica knows it.
        h.changes[0].replica = 1;
        assert_eq!(rules(&h), vec![Rule::Released]);
        // Once the operator acknowledged the regression, it binds no more.
        h.faults[0].loss.as_mut().expect("loss").acknowledged_at = Some(2_500_000);
        assert_eq!(rules(&h), Vec::<Rule>::new());
    }

    #[test]
    fn the_trail_must_hold_each_acknowledged_change_once_at_its_version() {
        let add = change(1, ChangeKind::Add, 0, 10_000, ok(100));
        let mut h = history(vec![add], Vec::new());
        assert!(rules(&h).is_empty());
        let record = h.audit.as_ref().expect("audit")[0].clone();
        h.audit.as_mut().expect("audit").push(record);
        assert_eq!(rules(&h), vec![Rule::Recorded]);
        h.audit.as_mut().expect("audit").pop();
        h.audit.as_mut().expect("audit")[0].version = Some(v(101));
        assert_eq!(rules(&h), vec![Rule::Recorded]);
        h.audit = Some(vec![AuditSeen {
            source: source_of(1, 9),
            action: "add".into(),
            version: Some(v(5)),
        }]);
        assert_eq!(rules(&h), vec![Rule::Recorded, Rule::Recorded]);
    }

    #[test]
    fn the_store_must_keep_an_add_and_every_replica_must_come_back() {
        let add = change(1, ChangeKind::Add, 0, 10_000, ok(100));
        let mut h = history(vec![add], Vec::new());
        h.final_state = Some(vec![(N, vec![])]);
        assert_eq!(rules(&h), vec![Rule::Kept]);
        h.final_state = Some(vec![(N, vec![Kind::National])]);
        h.replicas[0].serving = false;
        assert_eq!(rules(&h), vec![Rule::Back]);
    }

    #[test]
    fn a_replace_removes_what_it_does_not_name() {
        let add = change(1, ChangeKind::Add, 0, 10_000, ok(100));
        let mut replace = change(2, ChangeKind::Replace, 20_000, 30_000, ok(110));
        replace.numbers = vec![4010232137];
        let h = {
            let mut h = history(vec![add, replace], vec![check_op(3, 3_000_000, 120, true)]);
            h.final_state = Some(vec![(N, vec![])]);
            h
        };
        assert_eq!(rules(&h), Vec::<Rule>::new());
    }
}
