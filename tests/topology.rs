//! Outgrowing one Redis: Redis Sentinel (and Redis Cluster) as real topologies of redis-server
//! processes on free loopback ports, started and stopped by PID by each test, under steady checks
//! from a generated gRPC client against the real server.

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    RedisServer, TestServer, change_request, check_request, init_redis, outcome, redis_config,
    valid_numbers,
};
use optout::{
    api::proto::{OptOutType, Outcome, Purpose, Reason},
    server::ServerConfig,
    store::redis::SentinelConfig,
};
use tonic_health::pb::health_check_response::ServingStatus;

const RESEARCH: Purpose = Purpose::Research;
const WITHHELD: (Outcome, Reason) = (Outcome::Withhold, Reason::NationalDataOptOut);
const RELEASED: (Outcome, Reason) = (Outcome::Release, Reason::NoOptOut);
const MASTER: &str = "optout-test";

async fn decide(server: &TestServer, numbers: &[String]) -> Vec<(Outcome, Reason)> {
    let mut client = server.check_client().await;
    let mut req = tonic::Request::new(check_request(numbers.to_vec(), RESEARCH));
    req.set_timeout(Duration::from_millis(1000));
    match client.check(req).await {
        Ok(r) => r.into_inner().decisions.iter().map(outcome).collect(),
        Err(_) => Vec::new(),
    }
}

async fn add(server: &TestServer, numbers: &[String]) -> Result<(), tonic::Status> {
    server
        .admin_client()
        .await
        .add_opt_outs(change_request(
            numbers.to_vec(),
            OptOutType::NationalDataOptOut,
        ))
        .await
        .map(|_| ())
}

/// One master, one replica and three sentinels (quorum 2).
struct SentinelSet {
    master: RedisServer,
    replica: RedisServer,
    sentinels: Vec<RedisServer>,
}

impl SentinelSet {
    async fn start() -> SentinelSet {
        // No 5 s pause before the replica's first sync.
        let master = RedisServer::start_with(vec!["--repl-diskless-sync-delay".into(), "0".into()]);
        let replica = RedisServer::start_replica_of(master.port);
        let sentinels = (0..3)
            .map(|_| RedisServer::start_sentinel(master.port, MASTER))
            .collect();
        let set = SentinelSet {
            master,
            replica,
            sentinels,
        };
        // The replica must be in sync before a change can be confirmed by it, and a failover
        // needs every sentinel to know the replica and a majority of its peers.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut conn = set.master.connection().await;
        loop {
            let (_, confirmed): ((), i64) = redis::pipe()
                .set("test:probe", 1)
                .cmd("WAIT")
                .arg(1)
                .arg(200)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if confirmed == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replica did not come in sync within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for s in &set.sentinels {
            loop {
                let info = sentinel_master(s).await;
                let known = |k: &str| info.get(k).and_then(|v| v.parse::<u32>().ok());
                if known("num-slaves") >= Some(1) && known("num-other-sentinels") >= Some(2) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "sentinels did not discover the replica and each other within 30 s: {info:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        set
    }

    fn addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }

    /// The master's port as the first sentinel that answers names it.
    async fn master_port(&self) -> Option<u16> {
        for s in &self.sentinels {
            let Ok(client) = redis::Client::open(s.url()) else {
                continue;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                continue;
            };
            let addr: Result<Option<(String, u16)>, _> = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER)
                .query_async(&mut conn)
                .await;
            if let Ok(Some((_, port))) = addr {
                return Some(port);
            }
        }
        None
    }

    /// The service's configuration: the sentinels, one replica must confirm each change.
    fn config(&self, scratch: &std::path::Path) -> ServerConfig {
        let mut config = redis_config(&self.master, "optout:", scratch);
        let r = config.redis.as_mut().expect("redis");
        r.sentinel = Some(SentinelConfig {
            addrs: self.addrs(),
            master_name: MASTER.into(),
        });
        r.replicas_ack = 1;
        r.replicas_ack_timeout = Duration::from_millis(500);
        r.response_timeout = Duration::from_millis(500);
        config
    }
}

async fn sentinel_master(sentinel: &RedisServer) -> HashMap<String, String> {
    let mut conn = sentinel.connection().await;
    redis::cmd("SENTINEL")
        .arg("MASTER")
        .arg(MASTER)
        .query_async(&mut conn)
        .await
        .unwrap_or_default()
}

/// Steady checks of planted opted-out numbers (must never be released) and clean ones, each with a
/// 1 s deadline; the worker panics on a leak or an unanswered check and returns its slowest answer.
struct Load {
    stop: Arc<AtomicBool>,
    checks: Arc<AtomicU64>,
    worker: tokio::task::JoinHandle<Duration>,
}

impl Load {
    fn start(server: Arc<TestServer>, opted: Vec<String>, clean: Vec<String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let checks = Arc::new(AtomicU64::new(0));
        let worker = {
            let (stop, checks) = (stop.clone(), checks.clone());
            tokio::spawn(async move {
                let mut client = server.check_client().await;
                let mut batch = opted.clone();
                batch.extend(clean);
                let mut slowest = Duration::ZERO;
                while !stop.load(Ordering::SeqCst) {
                    let mut req = tonic::Request::new(check_request(batch.clone(), RESEARCH));
                    req.set_timeout(Duration::from_millis(1000));
                    let started = Instant::now();
                    let r = client
                        .check(req)
                        .await
                        .expect("every check is answered within its deadline")
                        .into_inner();
                    slowest = slowest.max(started.elapsed());
                    for (i, d) in r.decisions.iter().take(opted.len()).enumerate() {
                        assert_eq!(
                            outcome(d).0,
                            Outcome::Withhold,
                            "opted-out number {i} released"
                        );
                    }
                    checks.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                slowest
            })
        };
        Load {
            stop,
            checks,
            worker,
        }
    }

    async fn finish(self) -> (u64, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        let slowest = self.worker.await.expect("no opted-out number was released");
        (self.checks.load(Ordering::SeqCst), slowest)
    }
}

async fn eventually<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_sentinel_failover_releases_no_opt_out_and_the_service_follows_the_new_master() {
    let mut set = SentinelSet::start().await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = set.config(scratch.path());
    init_redis(&config).await;
    let server = Arc::new(TestServer::start_redis(config.clone()).await);
    let opted = valid_numbers(4_100_000_000, 50);
    let clean = valid_numbers(4_200_000_000, 50);
    add(&server, &opted).await.expect("seed opt-outs");
    let load = Load::start(server.clone(), opted.clone(), clean.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Acknowledged means confirmed by the replica (WAIT), so the master may die the moment after.
    let last = valid_numbers(4_300_000_000, 1);
    add(&server, &last)
        .await
        .expect("an add confirmed by the replica");
    set.master.kill();
    let killed = Instant::now();
    let replica = set.replica.port;
    eventually(
        "Sentinel promoted the replica",
        Duration::from_secs(30),
        || async { set.master_port().await == Some(replica) },
    )
    .await;
    let promoted = killed.elapsed();
    eventually(
        "the service answers from the new master by itself",
        Duration::from_secs(20),
        || async {
            decide(&server, &clean[..1]).await == vec![RELEASED]
                && decide(&server, &last).await == vec![WITHHELD]
                && server.health().await == ServingStatus::Serving as i32
        },
    )
    .await;
    eprintln!(
        "master killed: promoted after {promoted:?}, service answering fully after {:?}",
        killed.elapsed()
    );

    // The new master has no replica now: a change cannot be confirmed, so it is not acknowledged.
    let later = valid_numbers(4_400_000_000, 1);
    let refused = add(&server, &later)
        .await
        .expect_err("an unconfirmable change is not acknowledged");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("replicas"), "{refused:?}");

    // The old master comes back; Sentinel turns it into a replica and changes are confirmed again.
    set.master.restart();
    eventually(
        "a change is confirmed once the old master rejoins as a replica",
        Duration::from_secs(30),
        || async { add(&server, &later).await.is_ok() },
    )
    .await;
    assert_eq!(decide(&server, &later).await, vec![WITHHELD]);
    assert_eq!(decide(&server, &clean[..1]).await, vec![RELEASED]);

    let (checks, slowest) = load.finish().await;
    assert!(checks > 20, "checks kept coming: {checks}");
    assert!(
        slowest < Duration::from_millis(1000),
        "slowest answer {slowest:?}"
    );
    Arc::try_unwrap(server)
        .ok()
        .expect("sole owner")
        .stop()
        .await;
}
