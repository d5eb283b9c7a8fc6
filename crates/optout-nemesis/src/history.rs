//! What happened in a run, as the clients and the nemesis saw it: every operation with its start,
//! its end and its result, every fault with its interval, and what was read at the end. The
//! checker reads nothing else.
//!
//! Times are microseconds since the run started, on one monotonic clock (the nemesis process's).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A store version as the service writes it: `<ms>-<seq>`, ordered by both parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    /// The milliseconds part.
    pub ms: u64,
    /// The sequence part.
    pub seq: u64,
}

impl Version {
    /// Parses `<ms>-<seq>`; `None` for anything else (an empty version included).
    pub fn parse(s: &str) -> Option<Version> {
        let (ms, seq) = s.split_once('-')?;
        Some(Version {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The two opt-out types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// The national data opt-out.
    National,
    /// The GP type 1 opt-out.
    Type1,
}

impl Kind {
    /// Both, in a fixed order.
    pub const BOTH: [Kind; 2] = [Kind::National, Kind::Type1];
}

/// What a change does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    /// AddOptOuts.
    Add,
    /// RemoveOptOuts.
    Remove,
    /// ImportOptOuts, MERGE: adds its numbers.
    Merge,
    /// ImportOptOuts, REPLACE: the type's set becomes its numbers.
    Replace,
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Acknowledged at this version.
    Ok {
        /// The version the service returned.
        version: Version,
    },
    /// An error or a timeout: it may or may not have taken effect.
    Unknown {
        /// The error as the client saw it.
        error: String,
    },
    /// A definite refusal (ABORTED, INVALID_ARGUMENT, FAILED_PRECONDITION, ...): the service
    /// says nothing was changed.
    Refused {
        /// The error as the client saw it.
        error: String,
    },
}

/// An admin change (add, remove, import).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChangeOp {
    /// Unique in the run; the change's `source` is `nemesis-<seed>-<id>`, so its record in the
    /// changes trail can be found.
    pub id: u64,
    /// Which client (or the operator) sent it.
    pub client: usize,
    /// Which replica it went to, and that replica's incarnation when it was sent and when it
    /// ended (`None` if they differ: it was restarted in between).
    pub replica: usize,
    /// See [`ChangeOp::replica`].
    pub incarnation: Option<u64>,
    /// What it does.
    pub kind: ChangeKind,
    /// The type it changes.
    pub opt_out: Kind,
    /// The numbers it names.
    pub numbers: Vec<u64>,
    /// When it was sent.
    pub start: u64,
    /// When its answer came (or the client gave up).
    pub end: u64,
    /// The answer.
    pub outcome: Outcome,
}

impl ChangeOp {
    /// What this change leaves of `(number, kind)`: `Some(true)` held, `Some(false)` not held,
    /// `None` untouched.
    pub fn effect(&self, number: u64, kind: Kind) -> Option<bool> {
        if self.opt_out != kind {
            return None;
        }
        let named = self.numbers.contains(&number);
        match self.kind {
            ChangeKind::Add | ChangeKind::Merge => named.then_some(true),
            ChangeKind::Remove => named.then_some(false),
            ChangeKind::Replace => Some(named),
        }
    }

    /// The acknowledged version, if acknowledged.
    pub fn acked(&self) -> Option<Version> {
        match self.outcome {
            Outcome::Ok { version } => Some(version),
            Outcome::Unknown { .. } | Outcome::Refused { .. } => None,
        }
    }
}

/// One answer to a Check (or to one message of a CheckStream).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckOp {
    /// Unique in the run.
    pub id: u64,
    /// Which client sent it.
    pub client: usize,
    /// Which replica answered, and its incarnation (as for [`ChangeOp`]).
    pub replica: usize,
    /// See [`CheckOp::replica`].
    pub incarnation: Option<u64>,
    /// Whether it was a message of a CheckStream (its `start` is the stream's).
    pub stream: bool,
    /// The numbers asked, in order.
    pub numbers: Vec<u64>,
    /// The `at_least_version` sent, if any.
    pub at_least: Option<Version>,
    /// When it was sent.
    pub start: u64,
    /// When the answer came (or the client gave up).
    pub end: u64,
    /// The answer: the version it reflects and one decision per number; `None` on an error.
    pub answer: Option<CheckAnswer>,
}

/// A check's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckAnswer {
    /// The version the answer says it reflects (`None` if empty or not a version).
    pub version: Option<Version>,
    /// Per number: released or not, and the reason's name.
    pub decisions: Vec<(bool, String)>,
}

/// A fault the nemesis injected and healed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fault {
    /// What it was ("redis-kill", "replica-pause", ...).
    pub kind: String,
    /// Which process (a Redis port, a replica index).
    pub target: String,
    /// When it began and when it was healed.
    pub start: u64,
    /// See [`Fault::start`].
    pub end: u64,
    /// A restore from an older copy: what it can lose (changes made after the copy).
    pub loss: Option<Loss>,
    /// Whether it can lose changes that were not acknowledged (a master killed before its
    /// replica received them): an unacknowledged change missing from the changes trail may then
    /// still have been seen by a replica before it was lost.
    pub may_lose_unacknowledged: bool,
}

/// The window of a restore from an older copy of a Redis node's data.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Loss {
    /// When the copy was taken: changes that started later are lost; those in flight may be.
    pub copied_at: u64,
    /// When the node came back from the copy.
    pub restored_at: u64,
    /// When the operator acknowledged the regression (after re-adding what it knew was lost):
    /// from then on a lost change no longer binds any replica. `None`: never.
    pub acknowledged_at: Option<u64>,
}

/// A main record of the changes trail (imports' parts are not counted), as read at the end.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditSeen {
    /// The change's source.
    pub source: String,
    /// "add", "remove", "import-merge", "import-replace".
    pub action: String,
    /// The version it records (`None` if not a version).
    pub version: Option<Version>,
}

/// How a replica ended the run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaEnd {
    /// Its index.
    pub replica: usize,
    /// Whether its readiness (the `optout.v1.OptOutCheck` health service) said SERVING.
    pub serving: bool,
    /// What its status said when it did not (the regression reason, the freshness).
    pub why: String,
}

/// The whole history of a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct History {
    /// The seed the run's schedule came from.
    pub seed: u64,
    /// The topology's name.
    pub topology: String,
    /// The replicas' freshness bound, ms.
    pub bound_ms: u64,
    /// The numbers the operations use.
    pub pool: Vec<u64>,
    /// Every admin change.
    pub changes: Vec<ChangeOp>,
    /// Every check answer (and unanswered check).
    pub checks: Vec<CheckOp>,
    /// Every fault.
    pub faults: Vec<Fault>,
    /// The changes trail's main records with a nemesis source, read after the faults healed
    /// (`None`: could not be read).
    pub audit: Option<Vec<AuditSeen>>,
    /// The opt-outs the store held per pool number at the end (`None`: could not be read).
    pub final_state: Option<Vec<(u64, Vec<Kind>)>>,
    /// How each replica ended.
    pub replicas: Vec<ReplicaEnd>,
}

/// The source a change of the nemesis carries.
pub fn source_of(seed: u64, id: u64) -> String {
    format!("nemesis-{seed}-{id}")
}
