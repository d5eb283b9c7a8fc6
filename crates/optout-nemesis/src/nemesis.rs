//! The nemesis: random faults, each injected and healed, and recorded with its interval. Two
//! loops run at once: one against the Redis processes, one against the replicas, so a replica
//! can die while a Redis master is paused (a change cut off between its steps).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use optout_proto as proto;
use rand::{Rng, SeedableRng, seq::IndexedRandom};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Mutex;

use crate::{
    NemesisError,
    history::{ChangeKind, Fault, Kind, Loss},
    procs::Replica,
    topology::{Store, Topology},
    workload::{Recorder, Targets, change},
};

/// What the nemesis and the operator share with the run.
pub(crate) struct Ctx {
    pub(crate) rec: Arc<Recorder>,
    pub(crate) store: Mutex<Store>,
    pub(crate) replicas: Mutex<Vec<Replica>>,
    pub(crate) targets: Targets,
    pub(crate) stop: Arc<AtomicBool>,
}

/// The operator's client id in the history.
pub(crate) const OPERATOR: usize = usize::MAX;

fn ms(rng: &mut ChaCha8Rng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..hi))
}

/// Sleeps `d`, or less if the run stops meanwhile; whether it stopped.
async fn pause_or_stop(ctx: &Ctx, d: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < deadline {
        if ctx.stop.load(Ordering::Relaxed) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50).min(d)).await;
    }
    ctx.stop.load(Ordering::Relaxed)
}

/// Faults against Redis until the run stops; each is healed before the next.
pub(crate) async fn store_faults(ctx: Arc<Ctx>, seed: u64) -> Result<(), NemesisError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let topology = ctx.store.lock().await.topology;
    let menu: &[(&str, u32)] = match topology {
        Topology::Single => &[("redis-kill", 3), ("redis-pause", 3), ("redis-restore", 2)],
        Topology::Sentinel => &[
            ("redis-kill", 3),
            ("redis-pause", 3),
            ("lagging-failover", 2),
            ("sentinel-failover", 1),
        ],
        Topology::Cluster => &[
            ("redis-kill", 3),
            ("redis-pause", 4),
            ("lagging-failover", 1),
        ],
    };
    // A failover takes a few seconds (down after 1 s, then an election): leave room between them
    // for operations to land.
    let (lo, hi) = match topology {
        Topology::Single => (300, 1500),
        _ => (1000, 4000),
    };
    loop {
        if pause_or_stop(&ctx, ms(&mut rng, lo, hi)).await {
            return Ok(());
        }
        let kind = menu
            .choose_weighted(&mut rng, |(_, w)| *w)
            .map(|(k, _)| *k)
            .unwrap_or("redis-pause");
        let hold = ms(&mut rng, 300, 2500);
        let masters = ctx.store.lock().await.masters().await;
        let Some(&target) = masters.choose(&mut rng) else {
            continue; // no master right now (a failover under way)
        };
        match kind {
            "redis-kill" => kill_node(&ctx, target, hold, topology != Topology::Single).await?,
            "redis-pause" => {
                let start = ctx.rec.now();
                let paused = ctx
                    .store
                    .lock()
                    .await
                    .pause(target, u64::try_from(hold.as_millis()).unwrap_or(1000))
                    .await;
                if paused.is_ok() {
                    tokio::time::sleep(hold).await;
                    ctx.rec.fault(Fault {
                        kind: kind.into(),
                        target: format!("redis {target}"),
                        start,
                        end: ctx.rec.now(),
                        loss: None,
                        may_lose_unacknowledged: false,
                    });
                }
            }
            "redis-restore" => restore(&ctx, target, hold, &mut rng).await?,
            "lagging-failover" => lagging_failover(&ctx, target, hold).await?,
            _ => {
                let start = ctx.rec.now();
                let store = ctx.store.lock().await;
                if store.sentinel_failover().await.is_ok() {
                    wait_master_moves(&store, target).await;
                    drop(store);
                    ctx.rec.fault(Fault {
                        kind: kind.into(),
                        target: format!("redis {target}"),
                        start,
                        end: ctx.rec.now(),
                        loss: None,
                        may_lose_unacknowledged: true,
                    });
                }
            }
        }
    }
}

/// kill -9 of the node on `port`, `hold`, then a restart on its own data (a master that was
/// failed over meanwhile comes back as a replica).
async fn kill_node(
    ctx: &Ctx,
    port: u16,
    hold: Duration,
    failover: bool,
) -> Result<(), NemesisError> {
    let start = ctx.rec.now();
    if let Some(n) = ctx.store.lock().await.node(port) {
        n.kill();
    }
    tokio::time::sleep(hold).await;
    if let Some(n) = ctx.store.lock().await.node(port) {
        n.restart()?;
    }
    ctx.rec.fault(Fault {
        kind: "redis-kill".into(),
        target: format!("redis {port}"),
        start,
        end: ctx.rec.now(),
        loss: None,
        // A master killed before its replica received an unacknowledged change, then failed
        // over, loses it; one Redis keeps everything (append-only, fsync always).
        may_lose_unacknowledged: failover,
    });
    Ok(())
}

/// Waits (up to 10 s) until the master is no longer the node on `old`.
async fn wait_master_moves(store: &Store, old: u16) {
    for _ in 0..50 {
        if !store.masters().await.contains(&old) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The replica of `master` stops receiving writes (SIGSTOP) while changes go on (unacknowledged:
/// too few replicas confirm them), then the master is killed and the replica resumed, so it is
/// promoted without them; the old master comes back later as a replica.
async fn lagging_failover(ctx: &Ctx, master: u16, hold: Duration) -> Result<(), NemesisError> {
    let start = ctx.rec.now();
    let mut store = ctx.store.lock().await;
    let Some(replica) = store.replica_of(master).await else {
        return Ok(());
    };
    if let Some(n) = store.node(replica) {
        n.pause();
    }
    drop(store);
    tokio::time::sleep(hold.min(Duration::from_millis(900))).await;
    let mut store = ctx.store.lock().await;
    if let Some(n) = store.node(master) {
        n.kill();
    }
    if let Some(n) = store.node(replica) {
        n.resume();
    }
    wait_master_moves(&store, master).await;
    if let Some(n) = store.node(master) {
        n.restart()?;
    }
    drop(store);
    ctx.rec.fault(Fault {
        kind: "lagging-failover".into(),
        target: format!("redis {master} -> {replica}"),
        start,
        end: ctx.rec.now(),
        loss: None,
        may_lose_unacknowledged: true,
    });
    Ok(())
}

/// A restore of one Redis from a copy of its append-only files taken `hold` earlier, while
/// changes went on; then the operator re-adds the acknowledged adds it knows were lost and
/// acknowledges the regression.
async fn restore(
    ctx: &Ctx,
    port: u16,
    hold: Duration,
    rng: &mut ChaCha8Rng,
) -> Result<(), NemesisError> {
    let copy = {
        let store = ctx.store.lock().await;
        let copy = store.copy_dir("aof-copy");
        let copied_at = ctx.rec.now();
        let Some(node) = store.nodes.iter().find(|n| n.port == port) else {
            return Ok(());
        };
        node.copy_data(&copy)?;
        (copy, copied_at)
    };
    tokio::time::sleep(hold).await;
    let start = ctx.rec.now();
    if let Some(n) = ctx.store.lock().await.node(port) {
        n.restore_data(&copy.0)?;
    }
    let restored_at = ctx.rec.now();
    ctx.rec.fault(Fault {
        kind: "redis-restore".into(),
        target: format!("redis {port}"),
        start,
        end: restored_at,
        loss: Some(Loss {
            copied_at: copy.1,
            restored_at,
            acknowledged_at: None,
        }),
        may_lose_unacknowledged: false,
    });
    tokio::time::sleep(ms(rng, 300, 2000)).await;
    readd_lost(ctx, copy.1, start).await;
    if acknowledge(
        ctx,
        "nemesis: restored from an older copy; lost adds re-added",
    )
    .await
    {
        let at = ctx.rec.now();
        ctx.rec.with_history(|h| {
            if let Some(l) = h
                .faults
                .iter_mut()
                .find(|f| f.start == start)
                .and_then(|f| f.loss.as_mut())
            {
                l.acknowledged_at = Some(at);
            }
        });
    }
    Ok(())
}

/// The operator re-adds every number an acknowledged change added between `copied_at` and
/// `lost_at` (what a restore from a copy taken at `copied_at` lost), until each re-add is
/// acknowledged (10 s at most).
async fn readd_lost(ctx: &Ctx, copied_at: u64, lost_at: u64) {
    let history = ctx.rec.snapshot();
    let mut lost: std::collections::BTreeMap<Kind, Vec<u64>> = Default::default();
    for c in &history.changes {
        if c.acked().is_some()
            && c.end > copied_at
            && c.start < lost_at
            && c.kind != ChangeKind::Remove
        {
            lost.entry(c.opt_out).or_default().extend(&c.numbers);
        }
    }
    for (kind, mut numbers) in lost {
        numbers.sort_unstable();
        numbers.dedup();
        for attempt in 0..20 {
            let replica = attempt % ctx.targets.channels.len();
            let op = change(
                &ctx.rec,
                &ctx.targets,
                OPERATOR,
                replica,
                ChangeKind::Add,
                kind,
                numbers.clone(),
            )
            .await;
            if op.acked().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The operator acknowledges a store regression (10 s of attempts); whether it was recorded.
pub(crate) async fn acknowledge(ctx: &Ctx, reason: &str) -> bool {
    for attempt in 0..20 {
        let replica = attempt % ctx.targets.channels.len();
        let mut admin = proto::opt_out_admin_client::OptOutAdminClient::new(
            ctx.targets.channels[replica].clone(),
        );
        let mut request = tonic::Request::new(proto::AcknowledgeStoreRegressionRequest {
            reason: reason.into(),
        });
        request.set_timeout(Duration::from_secs(2));
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_secs(3),
            admin.acknowledge_store_regression(request),
        )
        .await
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

/// Faults against the replicas until the run stops: kill -9 and restart, SIGSTOP and SIGCONT.
pub(crate) async fn replica_faults(ctx: Arc<Ctx>, seed: u64) -> Result<(), NemesisError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    loop {
        if pause_or_stop(&ctx, ms(&mut rng, 500, 3000)).await {
            return Ok(());
        }
        let r = rng.random_range(0..ctx.targets.channels.len());
        let kill = rng.random_bool(0.5);
        let hold = ms(&mut rng, 100, 2500);
        let start = ctx.rec.now();
        if kill {
            if let Some(x) = ctx.replicas.lock().await.get_mut(r) {
                x.kill();
            }
            tokio::time::sleep(hold.min(Duration::from_millis(1500))).await;
            if let Some(x) = ctx.replicas.lock().await.get_mut(r) {
                x.restart()?;
            }
        } else {
            if let Some(x) = ctx.replicas.lock().await.get(r) {
                x.pause();
            }
            tokio::time::sleep(hold).await;
            if let Some(x) = ctx.replicas.lock().await.get(r) {
                x.resume();
            }
        }
        ctx.rec.fault(Fault {
            kind: if kill {
                "replica-kill"
            } else {
                "replica-pause"
            }
            .into(),
            target: format!("replica {r}"),
            start,
            end: ctx.rec.now(),
            loss: None,
            may_lose_unacknowledged: false,
        });
    }
}
