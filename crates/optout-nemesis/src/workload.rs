//! The clients: random operations through random replicas, each recorded with its start, its
//! end and what came back.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use optout_proto as proto;
use parking_lot::Mutex;
use proto::{opt_out_admin_client::OptOutAdminClient, opt_out_check_client::OptOutCheckClient};
use rand::{Rng, SeedableRng, seq::IndexedRandom};
use rand_chacha::ChaCha8Rng;
use tonic::transport::{Channel, Endpoint};

use crate::history::{
    ChangeKind, ChangeOp, CheckAnswer, CheckOp, Fault, History, Kind, Outcome, Version, source_of,
};

/// The longest a client waits for a change (a cluster change may wait for a paused master).
pub const CHANGE_DEADLINE: Duration = Duration::from_secs(3);
/// The longest a client waits for a check.
pub const CHECK_DEADLINE: Duration = Duration::from_secs(2);

/// Where every client and the nemesis write what happened.
pub struct Recorder {
    started: Instant,
    seed: u64,
    next_id: AtomicU64,
    history: Mutex<History>,
    /// The newest acknowledged version, for `at_least_version`.
    newest: Mutex<Option<Version>>,
}

impl Recorder {
    /// A recorder for a run of `seed` on `topology`.
    pub fn new(seed: u64, topology: &str, bound_ms: u64, pool: Vec<u64>) -> Recorder {
        Recorder {
            started: Instant::now(),
            seed,
            next_id: AtomicU64::new(1),
            history: Mutex::new(History {
                seed,
                topology: topology.into(),
                bound_ms,
                pool,
                ..History::default()
            }),
            newest: Mutex::new(None),
        }
    }

    /// Microseconds since the run started.
    pub fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// A new operation id.
    pub fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The run's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Whether `client`'s last change was refused.
    pub fn last_refused(&self, client: usize) -> bool {
        self.history
            .lock()
            .changes
            .iter()
            .rev()
            .find(|c| c.client == client)
            .is_some_and(|c| matches!(c.outcome, Outcome::Refused { .. }))
    }

    /// Records a change.
    pub fn change(&self, op: ChangeOp) {
        if let Some(v) = op.acked() {
            let mut newest = self.newest.lock();
            *newest = (*newest).max(Some(v));
        }
        self.history.lock().changes.push(op);
    }

    /// Records a check.
    pub fn check(&self, op: CheckOp) {
        self.history.lock().checks.push(op);
    }

    /// Records a fault.
    pub fn fault(&self, f: Fault) {
        self.history.lock().faults.push(f);
    }

    /// The newest acknowledged version.
    pub fn newest(&self) -> Option<Version> {
        *self.newest.lock()
    }

    /// Changes a fault already recorded (the operator's acknowledgement of a restore).
    pub fn with_history<T>(&self, f: impl FnOnce(&mut History) -> T) -> T {
        f(&mut self.history.lock())
    }

    /// The history so far.
    pub fn snapshot(&self) -> History {
        self.history.lock().clone()
    }
}

/// The replicas as the clients see them: a channel each, and the incarnation counter that tells
/// which process answered.
#[derive(Clone)]
pub struct Targets {
    /// One lazily connected channel per replica.
    pub channels: Vec<Channel>,
    /// Each replica's incarnation counter.
    pub incarnations: Vec<Arc<AtomicU64>>,
}

impl Targets {
    /// Channels to `urls`.
    pub fn new(
        urls: &[String],
        incarnations: Vec<Arc<AtomicU64>>,
    ) -> Result<Targets, tonic::transport::Error> {
        let channels = urls
            .iter()
            .map(|u| {
                Ok(Endpoint::from_shared(u.clone())?
                    .connect_timeout(Duration::from_millis(500))
                    .connect_lazy())
            })
            .collect::<Result<Vec<_>, tonic::transport::Error>>()?;
        Ok(Targets {
            channels,
            incarnations,
        })
    }

    fn incarnation(&self, replica: usize) -> u64 {
        self.incarnations[replica].load(Ordering::SeqCst)
    }
}

/// Every type 1 change is one practice's: the history's model of type 1 as one set per number
/// stays exact (a patient holds type 1 while this practice does). Several practices are the
/// store contract's and tests/it/service.rs's.
const PRACTICE: &str = "A83007";

fn practice_of(k: Kind) -> String {
    match k {
        Kind::National => String::new(),
        Kind::Type1 => PRACTICE.into(),
    }
}

fn type_code(k: Kind) -> i32 {
    match k {
        Kind::National => proto::OptOutType::NationalDataOptOut as i32,
        Kind::Type1 => proto::OptOutType::Type1 as i32,
    }
}

/// Sends one change to `replica` and records it.
pub async fn change(
    rec: &Recorder,
    targets: &Targets,
    client: usize,
    replica: usize,
    kind: ChangeKind,
    opt_out: Kind,
    numbers: Vec<u64>,
) -> ChangeOp {
    let id = rec.id();
    let source = source_of(rec.seed(), id);
    let texts: Vec<String> = numbers.iter().map(|n| format!("{n:010}")).collect();
    let mut admin = OptOutAdminClient::new(targets.channels[replica].clone());
    let inc = targets.incarnation(replica);
    let start = rec.now();
    let call = async {
        match kind {
            ChangeKind::Add | ChangeKind::Remove => {
                let mut request = tonic::Request::new(proto::ChangeOptOutsRequest {
                    nhs_numbers: texts,
                    r#type: type_code(opt_out),
                    source,
                    practice: practice_of(opt_out),
                });
                request.set_timeout(CHANGE_DEADLINE);
                let r = if kind == ChangeKind::Add {
                    admin.add_opt_outs(request).await
                } else {
                    admin.remove_opt_outs(request).await
                };
                r.map(|r| r.into_inner().version)
            }
            ChangeKind::Merge | ChangeKind::Replace => {
                let mode = if kind == ChangeKind::Merge {
                    proto::ImportMode::Merge
                } else {
                    proto::ImportMode::Replace
                };
                // Two messages: the numbers may arrive in parts, the commit comes last.
                let half = texts.len() / 2;
                let messages = vec![
                    proto::ImportOptOutsRequest {
                        mode: mode as i32,
                        r#type: type_code(opt_out),
                        practice: practice_of(opt_out),
                        source,
                        nhs_numbers: texts[..half].to_vec(),
                        ..Default::default()
                    },
                    proto::ImportOptOutsRequest {
                        nhs_numbers: texts[half..].to_vec(),
                        commit: true,
                        ..Default::default()
                    },
                ];
                let mut request = tonic::Request::new(futures::stream::iter(messages));
                request.set_timeout(CHANGE_DEADLINE);
                admin
                    .import_opt_outs(request)
                    .await
                    .map(|r| r.into_inner().version)
            }
        }
    };
    let outcome = match tokio::time::timeout(CHANGE_DEADLINE + Duration::from_millis(200), call)
        .await
    {
        Ok(Ok(v)) => match Version::parse(&v) {
            Some(version) => Outcome::Ok { version },
            None => Outcome::Unknown {
                error: format!("acknowledged with a version that is not one: {v:?}"),
            },
        },
        Ok(Err(status)) => {
            let error = format!("{:?}: {}", status.code(), status.message());
            // The codes by which the service says nothing was changed. UNAVAILABLE is not
            // one of them: a change its replicas did not confirm in time was applied all the
            // same.
            use tonic::Code::*;
            match status.code() {
                Aborted | InvalidArgument | FailedPrecondition | PermissionDenied
                | Unauthenticated | ResourceExhausted | OutOfRange => Outcome::Refused { error },
                _ => Outcome::Unknown { error },
            }
        }
        Err(_) => Outcome::Unknown {
            error: "client deadline".into(),
        },
    };
    let end = rec.now();
    let op = ChangeOp {
        id,
        client,
        replica,
        incarnation: (targets.incarnation(replica) == inc).then_some(inc),
        kind,
        opt_out,
        numbers,
        start,
        end,
        outcome,
    };
    rec.change(op.clone());
    op
}

fn answer_of(numbers: usize, r: proto::CheckResponse) -> CheckAnswer {
    let decisions = r
        .decisions
        .iter()
        .map(|d| {
            let reason = proto::Reason::try_from(d.reason)
                .map(|r| r.as_str_name().to_string())
                .unwrap_or_else(|_| format!("reason {}", d.reason));
            (d.outcome == proto::Outcome::Release as i32, reason)
        })
        .collect::<Vec<_>>();
    debug_assert!(decisions.len() == numbers || decisions.is_empty());
    CheckAnswer {
        version: Version::parse(&r.version),
        decisions,
    }
}

fn check_request(numbers: &[u64], at_least: Option<Version>) -> proto::CheckRequest {
    proto::CheckRequest {
        nhs_numbers: numbers
            .iter()
            .map(|n| format!("{n:010}"))
            .collect::<Vec<_>>()
            .into(),
        purpose: proto::Purpose::Research as i32,
        origin: proto::DataOrigin::Unspecified as i32,
        at_least_version: at_least.map(|v| v.to_string()).unwrap_or_default(),
        extract_id: "nemesis".into(),
        ..Default::default()
    }
}

/// Sends one Check to `replica` and records it.
pub async fn check(
    rec: &Recorder,
    targets: &Targets,
    client: usize,
    replica: usize,
    numbers: Vec<u64>,
    at_least: Option<Version>,
) -> CheckOp {
    let id = rec.id();
    let mut checker = OptOutCheckClient::new(targets.channels[replica].clone());
    let inc = targets.incarnation(replica);
    let mut request = tonic::Request::new(check_request(&numbers, at_least));
    request.set_timeout(CHECK_DEADLINE);
    let start = rec.now();
    let answer = tokio::time::timeout(
        CHECK_DEADLINE + Duration::from_millis(200),
        checker.check(request),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(|r| answer_of(numbers.len(), r.into_inner()));
    let end = rec.now();
    let op = CheckOp {
        id,
        client,
        replica,
        incarnation: (targets.incarnation(replica) == inc).then_some(inc),
        stream: false,
        numbers,
        at_least,
        start,
        end,
        answer,
    };
    rec.check(op.clone());
    op
}

/// Sends a CheckStream of `messages` to `replica` and records each answer as a check whose start
/// is the stream's.
pub async fn check_stream(
    rec: &Recorder,
    targets: &Targets,
    client: usize,
    replica: usize,
    messages: Vec<Vec<u64>>,
    at_least: Option<Version>,
) {
    let mut checker = OptOutCheckClient::new(targets.channels[replica].clone());
    let inc = targets.incarnation(replica);
    let requests: Vec<proto::CheckRequest> = messages
        .iter()
        .map(|m| check_request(m, at_least))
        .collect();
    let mut request = tonic::Request::new(futures::stream::iter(requests));
    request.set_timeout(CHECK_DEADLINE);
    let start = rec.now();
    let mut answers: Vec<Option<CheckAnswer>> = Vec::new();
    let _ = tokio::time::timeout(CHECK_DEADLINE + Duration::from_millis(200), async {
        let Ok(response) = checker.check_stream(request).await else {
            return;
        };
        let mut stream = response.into_inner();
        while let Ok(Some(r)) = stream.message().await {
            let n = messages.get(answers.len()).map_or(0, Vec::len);
            answers.push(Some(answer_of(n, r)));
        }
    })
    .await;
    let end = rec.now();
    let same = targets.incarnation(replica) == inc;
    for (i, numbers) in messages.into_iter().enumerate() {
        rec.check(CheckOp {
            id: rec.id(),
            client,
            replica,
            incarnation: same.then_some(inc),
            stream: true,
            numbers,
            at_least,
            start,
            end,
            answer: answers.get(i).cloned().flatten(),
        });
    }
}

/// One client's loop: random operations on random replicas until `stop`.
pub async fn client_loop(
    rec: Arc<Recorder>,
    targets: Targets,
    client: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pool = rec.snapshot().pool;
    let replicas = targets.channels.len();
    let mut own: Option<Version> = None;
    while !stop.load(Ordering::Relaxed) {
        let replica = rng.random_range(0..replicas);
        let roll: u32 = rng.random_range(0..100);
        let pick = |rng: &mut ChaCha8Rng, most: usize| -> Vec<u64> {
            let k = rng.random_range(1..=most.min(pool.len()));
            let mut chosen: Vec<u64> = pool.choose_multiple(rng, k).copied().collect();
            chosen.sort_unstable();
            chosen
        };
        let opt_out = if rng.random_bool(0.7) {
            Kind::National
        } else {
            Kind::Type1
        };
        let at_least = match rng.random_range(0..4) {
            0 => own,
            1 => rec.newest(),
            _ => None,
        };
        // Imports are few: each holds its type's lock while it is applied (changes of the type
        // are refused meanwhile), which takes most of a second in a debug build.
        match roll {
            0..45 => {
                let numbers = if rng.random_bool(0.5) {
                    pool.clone()
                } else {
                    pick(&mut rng, pool.len())
                };
                check(&rec, &targets, client, replica, numbers, at_least).await;
            }
            45..55 => {
                let messages = (0..rng.random_range(2..=3))
                    .map(|_| pick(&mut rng, pool.len()))
                    .collect();
                check_stream(&rec, &targets, client, replica, messages, at_least).await;
            }
            55..76 => {
                let op = change(
                    &rec,
                    &targets,
                    client,
                    replica,
                    ChangeKind::Add,
                    opt_out,
                    pick(&mut rng, 3),
                )
                .await;
                own = own.max(op.acked());
            }
            76..99 => {
                let op = change(
                    &rec,
                    &targets,
                    client,
                    replica,
                    ChangeKind::Remove,
                    opt_out,
                    pick(&mut rng, 3),
                )
                .await;
                own = own.max(op.acked());
            }
            _ if rng.random_bool(0.7) => {
                let op = change(
                    &rec,
                    &targets,
                    client,
                    replica,
                    ChangeKind::Merge,
                    opt_out,
                    pick(&mut rng, 4),
                )
                .await;
                own = own.max(op.acked());
            }
            _ => {
                let op = change(
                    &rec,
                    &targets,
                    client,
                    replica,
                    ChangeKind::Replace,
                    opt_out,
                    pick(&mut rng, pool.len()),
                )
                .await;
                own = own.max(op.acked());
            }
        }
        // A client told to retry later (a refusal while an import holds the type) waits a
        // little, as a real one would, rather than filling the history with refusals.
        let refused = rec.last_refused(client);
        let pause = if refused {
            rng.random_range(200..500)
        } else {
            rng.random_range(0..30)
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}
