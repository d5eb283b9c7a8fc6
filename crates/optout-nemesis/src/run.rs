//! One run: set up the topology and the replicas, drive the clients and the nemesis for the
//! run's length, heal, read the end state, and check the history.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use optout_proto as proto;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Mutex;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    NemesisError,
    checker::{self, Verdict},
    history::{AuditSeen, History, Kind, ReplicaEnd, Version},
    nemesis::{self, Ctx},
    procs::{Programs, Replica, run_optout},
    topology::{Store, Topology},
    valid_nhs_number,
    workload::{self, Recorder, Targets},
};

/// What a run is.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The Redis topology.
    pub topology: Topology,
    /// Where the schedule comes from.
    pub seed: u64,
    /// How long clients and the nemesis run before the faults are healed.
    pub duration: Duration,
    /// `optout serve` processes.
    pub replicas: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// NHS numbers the operations use (few, so that operations on one number meet often).
    pub pool: usize,
    /// The replicas' `--freshness-bound-ms`.
    pub bound_ms: u64,
    /// The programs.
    pub programs: Programs,
    /// Where to keep the run's files (its processes' data and logs, and `history.json`); a
    /// temporary directory when `None`, kept only when the run breaks a rule.
    pub dir: Option<PathBuf>,
}

impl RunConfig {
    /// A short run on `topology` with `seed`: 3 replicas, 4 clients, 10 numbers, a 1 s bound.
    pub fn new(topology: Topology, seed: u64, duration: Duration, programs: Programs) -> Self {
        RunConfig {
            topology,
            seed,
            duration,
            replicas: 3,
            clients: 4,
            pool: 10,
            bound_ms: 1000,
            programs,
            dir: None,
        }
    }
}

/// What a run did and what the checker said.
#[derive(Debug)]
pub struct RunReport {
    /// The topology.
    pub topology: Topology,
    /// The seed.
    pub seed: u64,
    /// How long it took, set-up and checks included.
    pub took: Duration,
    /// Operations by kind and outcome ("add ok", "check unknown", ...).
    pub ops: BTreeMap<String, u64>,
    /// Faults by kind.
    pub faults: BTreeMap<String, u64>,
    /// The checker's verdict.
    pub verdict: Verdict,
    /// Where the history and the processes' logs were kept (when a rule broke, or asked for).
    pub kept: Option<PathBuf>,
}

impl RunReport {
    /// Operations in all.
    pub fn op_count(&self) -> u64 {
        self.ops.values().sum()
    }

    /// Faults in all.
    pub fn fault_count(&self) -> u64 {
        self.faults.values().sum()
    }
}

/// Valid NHS numbers for the pool, from the seed, in the English ranges.
fn pool(seed: u64, size: usize) -> Vec<u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut out = Vec::new();
    while out.len() < size {
        let n = rng.random_range(4_000_000_000..5_000_000_000u64);
        if valid_nhs_number(n) && !out.contains(&n) {
            out.push(n);
        }
    }
    out.sort_unstable();
    out
}

/// Runs one seeded run and checks its history.
pub async fn run(config: RunConfig) -> Result<RunReport, NemesisError> {
    let began = Instant::now();
    let temp = tempfile::Builder::new()
        .prefix("optout-nemesis-")
        .tempdir()?;
    let dir = config
        .dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let programs = &config.programs;
    let store = Store::start(config.topology, programs, dir.join("redis")).await?;
    store.init(programs).await?;
    let key = run_optout(programs, &["keys".into(), "audit-key".into()])?;
    let key_file = dir.join("audit.key");
    std::fs::write(&key_file, key.trim())?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    // A short change log on some seeds, so that replicas also fall behind a trimmed log.
    let log_len = if rng.random_bool(0.3) { "20" } else { "100000" };
    let mut args = store.flags();
    args.extend(
        [
            "--freshness-bound-ms",
            &config.bound_ms.to_string(),
            "--snapshot-interval-secs",
            "1",
            "--redis-timeout-ms",
            "500",
            "--redis-log-len",
            log_len,
            "--audit-key-file",
            &key_file.display().to_string(),
            "--audit-seal-interval-ms",
            "500",
            "--shutdown-grace-secs",
            "1",
            // The nemesis searches the store protocol under faults, through single changes from
            // an empty store; with the default list ages every answer would be "never imported"
            // and the history would prove nothing. tests/it/population.rs holds the ages.
            "--national-max-age-days",
            "none",
            "--type-1-max-age-days",
            "none",
        ]
        .map(String::from),
    );
    let mut replicas = Vec::new();
    for i in 0..config.replicas {
        replicas.push(Replica::start(
            programs,
            i,
            &dir.join(format!("replica-{i}")),
            args.clone(),
        )?);
    }
    let urls: Vec<String> = replicas.iter().map(Replica::url).collect();
    let targets = Targets::new(&urls, replicas.iter().map(Replica::incarnation).collect())
        .map_err(|e| NemesisError::Setup(e.to_string()))?;
    for (i, _) in urls.iter().enumerate() {
        if !wait_serving(&targets, i, Duration::from_secs(30)).await {
            return Err(NemesisError::Setup(format!(
                "replica {i} did not become SERVING (see {})",
                replicas[i].log().display()
            )));
        }
    }
    let rec = Arc::new(Recorder::new(
        config.seed,
        config.topology.name(),
        config.bound_ms,
        pool(config.seed, config.pool),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let ctx = Arc::new(Ctx {
        rec: rec.clone(),
        store: Mutex::new(store),
        replicas: Mutex::new(replicas),
        targets: targets.clone(),
        stop: stop.clone(),
    });
    let clients: Vec<_> = (0..config.clients)
        .map(|c| {
            tokio::spawn(workload::client_loop(
                rec.clone(),
                targets.clone(),
                c,
                config.seed.wrapping_add(1 + c as u64),
                stop.clone(),
            ))
        })
        .collect();
    let store_nemesis = tokio::spawn(nemesis::store_faults(ctx.clone(), config.seed ^ 0xfa17));
    let replica_nemesis = tokio::spawn(nemesis::replica_faults(ctx.clone(), config.seed ^ 0x4e91));
    tokio::time::sleep(config.duration).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let faulted = [store_nemesis.await, replica_nemesis.await];
    for f in faulted {
        match f {
            Ok(r) => r?,
            Err(e) => return Err(NemesisError::Fault(format!("nemesis task: {e}"))),
        }
    }

    // Heal: every process back, the topology settled, the operator acting on what replicas say.
    ctx.store.lock().await.heal().await?;
    for r in ctx.replicas.lock().await.iter_mut() {
        r.resume();
        if !r.running() {
            r.restart()?;
        }
    }
    let mut notes = Vec::new();
    let ends = come_back(&ctx, &mut notes).await;
    // Changes cut off between their steps are finished by a replica within about 7 s.
    let settle = if config.topology == Topology::Cluster {
        8
    } else {
        1
    };
    tokio::time::sleep(Duration::from_secs(settle)).await;
    // Every replica answers every number at the newest acknowledged version: rule (a) applies.
    let numbers = rec.snapshot().pool;
    for i in 0..config.replicas {
        workload::check(
            &rec,
            &targets,
            usize::MAX - 1,
            i,
            numbers.clone(),
            rec.newest(),
        )
        .await;
    }
    let audit = read_changes_trail(&targets, config.seed).await;
    let final_state = read_final_state(&targets, &numbers).await;
    rec.with_history(|h| {
        h.replicas = ends;
        h.audit = audit;
        h.final_state = final_state;
    });
    let history = rec.snapshot();
    let mut verdict = checker::check(&history);
    verdict.notes.extend(notes);
    let kept = if verdict.violations.is_empty() && config.dir.is_none() {
        None
    } else {
        let path = dir.join("history.json");
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&history).unwrap_or_default(),
        )?;
        Some(dir.clone())
    };
    // Stop everything before the directory goes.
    drop(ctx);
    if kept.is_some() && config.dir.is_none() {
        let _ = temp.keep();
    }
    Ok(RunReport {
        topology: config.topology,
        seed: config.seed,
        took: began.elapsed(),
        ops: count_ops(&history),
        faults: history.faults.iter().fold(BTreeMap::new(), |mut m, f| {
            *m.entry(f.kind.clone()).or_insert(0) += 1;
            m
        }),
        verdict,
        kept,
    })
}

fn count_ops(h: &History) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for c in &h.changes {
        let kind = format!("{:?}", c.kind).to_lowercase();
        let outcome = match c.outcome {
            crate::history::Outcome::Ok { .. } => "ok",
            crate::history::Outcome::Unknown { .. } => "unknown",
            crate::history::Outcome::Refused { .. } => "refused",
        };
        *m.entry(format!("{kind} {outcome}")).or_insert(0) += 1;
    }
    for c in &h.checks {
        let kind = if c.stream { "stream check" } else { "check" };
        let outcome = if c.answer.is_some() { "ok" } else { "unknown" };
        *m.entry(format!("{kind} {outcome}")).or_insert(0) += 1;
    }
    m
}

/// Whether replica `i`'s readiness (`optout.v1.OptOutCheck`) says SERVING within `within`.
async fn wait_serving(targets: &Targets, i: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if serving(targets, i).await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn serving(targets: &Targets, i: usize) -> bool {
    let mut health = HealthClient::new(targets.channels[i].clone());
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: "optout.v1.OptOutCheck".into(),
    });
    request.set_timeout(Duration::from_secs(1));
    matches!(
        tokio::time::timeout(Duration::from_secs(2), health.check(request)).await,
        Ok(Ok(r)) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    )
}

async fn status(targets: &Targets, i: usize) -> Option<proto::GetStatusResponse> {
    let mut admin =
        proto::opt_out_admin_client::OptOutAdminClient::new(targets.channels[i].clone());
    let mut request = tonic::Request::new(proto::GetStatusRequest {});
    request.set_timeout(Duration::from_secs(2));
    tokio::time::timeout(Duration::from_secs(3), admin.get_status(request))
        .await
        .ok()?
        .ok()
        .map(tonic::Response::into_inner)
}

/// After the faults heal: each replica must be SERVING again within a minute. A replica that
/// failed closed on a store that went back in time says so; the operator then acknowledges it
/// (noted in the report: after a fault that loses nothing acknowledged, that is a false alarm
/// worth knowing about).
async fn come_back(ctx: &Ctx, notes: &mut Vec<String>) -> Vec<ReplicaEnd> {
    let n = ctx.targets.channels.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut acknowledged_at: Option<Instant> = None;
    loop {
        let mut all = true;
        for i in 0..n {
            if serving(&ctx.targets, i).await {
                continue;
            }
            all = false;
            if let Some(s) = status(&ctx.targets, i).await
                && !s.store_regressed.is_empty()
                && acknowledged_at.is_none_or(|t| t.elapsed() > Duration::from_secs(5))
            {
                notes.push(format!(
                    "replica {i} failed closed after the faults healed: {}; the operator \
                     acknowledged it",
                    s.store_regressed
                ));
                nemesis::acknowledge(ctx, "nemesis: the faults are healed").await;
                acknowledged_at = Some(Instant::now());
            }
        }
        if all || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut ends = Vec::new();
    for i in 0..n {
        let serving = serving(&ctx.targets, i).await;
        let why = if serving {
            String::new()
        } else {
            match status(&ctx.targets, i).await {
                Some(s) => format!(
                    "store_regressed {:?}, filter {:?}",
                    s.store_regressed,
                    s.filter.map(|f| (f.version, f.fresh, f.loaded_from))
                ),
                None => "its status cannot be read".into(),
            }
        };
        ends.push(ReplicaEnd {
            replica: i,
            serving,
            why,
        });
    }
    ends
}

/// The changes trail's main records of this run's changes, read through replica 0 in windows
/// small enough that none is cut by the read's limit.
async fn read_changes_trail(targets: &Targets, seed: u64) -> Option<Vec<AuditSeen>> {
    const LIMIT: u32 = 10_000;
    let prefix = format!("nemesis-{seed}-");
    let mut out = Vec::new();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis(),
    )
    .ok()?;
    // Windows of time, halved whenever one comes back full.
    let mut windows = vec![(now - 3_600_000, now + 60_000)];
    while let Some((from, to)) = windows.pop() {
        let mut admin =
            proto::opt_out_admin_client::OptOutAdminClient::new(targets.channels[0].clone());
        let mut request = tonic::Request::new(proto::ReadAuditRequest {
            from_unix_ms: from,
            to_unix_ms: to,
            limit: LIMIT,
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(10));
        let records = tokio::time::timeout(Duration::from_secs(11), admin.read_audit(request))
            .await
            .ok()?
            .ok()?
            .into_inner()
            .records;
        if records.len() >= LIMIT as usize && to > from {
            let mid = from + (to - from) / 2;
            windows.push((from, mid));
            windows.push((mid + 1, to));
            continue;
        }
        for r in records {
            let main = matches!(
                r.action.as_str(),
                "add" | "remove" | "import-merge" | "import-replace"
            );
            if main && r.source.starts_with(&prefix) {
                out.push(AuditSeen {
                    source: r.source,
                    action: r.action,
                    version: Version::parse(&r.version),
                });
            }
        }
    }
    Some(out)
}

/// What the store holds for each number, through replica 0.
async fn read_final_state(targets: &Targets, numbers: &[u64]) -> Option<Vec<(u64, Vec<Kind>)>> {
    let mut out = Vec::new();
    for &n in numbers {
        let mut admin =
            proto::opt_out_admin_client::OptOutAdminClient::new(targets.channels[0].clone());
        let mut request = tonic::Request::new(proto::GetOptOutRequest {
            nhs_number: format!("{n:010}"),
        });
        request.set_timeout(Duration::from_secs(3));
        let records = tokio::time::timeout(Duration::from_secs(4), admin.get_opt_out(request))
            .await
            .ok()?
            .ok()?
            .into_inner()
            .opt_outs;
        let kinds = records
            .iter()
            .filter_map(|r| match proto::OptOutType::try_from(r.r#type) {
                Ok(proto::OptOutType::NationalDataOptOut) => Some(Kind::National),
                Ok(proto::OptOutType::Type1) => Some(Kind::Type1),
                _ => None,
            })
            .collect();
        out.push((n, kinds));
    }
    Some(out)
}
