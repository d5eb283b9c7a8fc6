//! Outgrowing one Redis: Redis Sentinel (and Redis Cluster) as real topologies of redis-server
//! processes on free loopback ports, started and stopped by PID by each test, under steady checks
//! from a generated gRPC client against the real server.

use crate::common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::common::{
    Cluster, SentinelSet, ServeProcess, TestServer, change_request, check_request, init_redis,
    outcome, valid_numbers,
};
use optout::{
    api::proto::{OptOutType, Outcome, Purpose, Reason},
    store::redis::key_slot,
};
use tonic_health::pb::health_check_response::ServingStatus;

const RESEARCH: Purpose = Purpose::Research;
const WITHHELD: (Outcome, Reason) = (Outcome::Withhold, Reason::NationalDataOptOut);
const RELEASED: (Outcome, Reason) = (Outcome::Release, Reason::NoOptOut);

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

/// Steady checks of planted opted-out numbers (must never be released) and clean ones, each with a
/// 1 s deadline; the worker panics on a leak or an unanswered check and returns its slowest answer.
struct Load {
    stop: Arc<AtomicBool>,
    checks: Arc<AtomicU64>,
    /// When each answer arrived, to compare the rate before a fault with the rate after it.
    answered: Arc<parking_lot::Mutex<Vec<Instant>>>,
    worker: tokio::task::JoinHandle<Duration>,
}

impl Load {
    fn start(server: Arc<TestServer>, opted: Vec<String>, clean: Vec<String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let checks = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let worker = {
            let (stop, checks, answered) = (stop.clone(), checks.clone(), answered.clone());
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
                    answered.lock().push(Instant::now());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                slowest
            })
        };
        Load {
            stop,
            checks,
            answered,
            worker,
        }
    }

    /// Checks answered per second in the `window` before `until`.
    fn rate_before(&self, until: Instant, window: Duration) -> f64 {
        let from = until - window;
        let n = self
            .answered
            .lock()
            .iter()
            .filter(|t| **t > from && **t <= until)
            .count();
        n as f64 / window.as_secs_f64()
    }

    async fn finish(self) -> (u64, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        let slowest = self.worker.await.expect("no opted-out number was released");
        (self.checks.load(Ordering::SeqCst), slowest)
    }
}

/// After a failover: how fast the service came back and its check rate before and after; then,
/// as the new master has no replica, a change is refused (not acknowledged) until `rejoin` brings
/// the old master back as its replica, after which the change is accepted and withheld.
async fn after_failover(
    server: &TestServer,
    load: &Load,
    killed: Instant,
    promoted: Duration,
    clean: &[String],
    rejoin: impl FnOnce(),
) {
    eprintln!(
        "master killed: promoted after {promoted:?}, service answering fully after {:?}",
        killed.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "checks/s in the second before the kill {:.0}, in the last second {:.0}",
        load.rate_before(killed, Duration::from_secs(1)),
        load.rate_before(Instant::now(), Duration::from_secs(1))
    );
    let later = valid_numbers(4_400_000_000, 1);
    let refused = add(server, &later)
        .await
        .expect_err("an unconfirmable change is not acknowledged");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("replicas"), "{refused:?}");
    rejoin();
    eventually!(
        "a change is confirmed once the old master rejoins as a replica",
        Duration::from_secs(30),
        async { add(server, &later).await.is_ok() }.await
    );
    assert_eq!(decide(server, &later).await, vec![WITHHELD]);
    assert_eq!(decide(server, &clean[..1]).await, vec![RELEASED]);
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
    assert!(decide(&server, &opted[..1]).await == vec![WITHHELD]);
    // Through Sentinel too, the store's connections to the master run with TCP_NODELAY.
    common::assert_nodelay(&[set.master.port], 2).await;
    let load = Load::start(server.clone(), opted.clone(), clean.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // One sentinel is down as well (the service asks the others; two of three still elect).
    set.sentinels[0].kill();
    // Acknowledged means confirmed by the replica (WAIT), so the master may die the moment after.
    let last = valid_numbers(4_300_000_000, 1);
    add(&server, &last)
        .await
        .expect("an add confirmed by the replica");
    set.master.kill();
    let killed = Instant::now();
    let replica = set.replica.port;
    eventually!(
        "Sentinel promoted the replica",
        Duration::from_secs(30),
        async { set.master_port().await == Some(replica) }.await
    );
    let promoted = killed.elapsed();
    eventually!(
        "the service answers from the new master by itself",
        Duration::from_secs(20),
        async {
            decide(&server, &clean[..1]).await == vec![RELEASED]
                && decide(&server, &last).await == vec![WITHHELD]
                && server.health().await == ServingStatus::Serving as i32
        }
        .await
    );
    after_failover(&server, &load, killed, promoted, &clean, || {
        set.master.restart()
    })
    .await;

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

#[tokio::test]
async fn a_cluster_shards_the_opt_outs_and_a_master_failover_releases_none() {
    let mut cluster = Cluster::start().await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = cluster.config(scratch.path());
    init_redis(&config).await;
    let server = Arc::new(TestServer::start_redis(config.clone()).await);
    let opted = valid_numbers(4_100_000_000, 300);
    let clean = valid_numbers(4_200_000_000, 50);
    add(&server, &opted).await.expect("seed opt-outs");

    // The opt-outs are spread over every master, and the store's connections to each run with
    // TCP_NODELAY.
    let roles = cluster.roles().await;
    let masters: Vec<u16> = roles.iter().filter(|r| r.1).map(|r| r.0).collect();
    assert!(decide(&server, &opted[..1]).await == vec![WITHHELD]);
    common::assert_nodelay(&masters, 1).await;
    for (port, master, _, _) in roles {
        if master {
            let keys: i64 = redis::cmd("DBSIZE")
                .query_async(&mut cluster.node(port).connection().await)
                .await
                .expect("dbsize");
            assert!(keys > 20, "master on {port} holds {keys} keys");
        }
    }

    let load = Load::start(server.clone(), opted[..50].to_vec(), clean.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Kill the master of the metadata's slot (the change log, versions, generations): the one
    // every check and change needs. Its replica is promoted by the cluster itself.
    let meta_slot = key_slot(b"{optout:}marker");
    let (victim, replica) = cluster.master_of(meta_slot).await.expect("a master");
    let replica = replica.expect("the master has a replica");
    let last = valid_numbers(4_300_000_000, 1);
    add(&server, &last)
        .await
        .expect("an add confirmed by the replicas");
    cluster.node(victim).kill();
    let killed = Instant::now();
    eventually!(
        "the cluster promoted the replica",
        Duration::from_secs(30),
        async { cluster.master_of(meta_slot).await.map(|m| m.0) == Some(replica) }.await
    );
    let promoted = killed.elapsed();
    eventually!(
        "the service answers from the promoted master by itself",
        Duration::from_secs(20),
        async {
            decide(&server, &clean[..1]).await == vec![RELEASED]
                && decide(&server, &last).await == vec![WITHHELD]
                && decide(&server, &opted[250..])
                    .await
                    .iter()
                    .all(|d| *d == WITHHELD)
                && server.health().await == ServingStatus::Serving as i32
        }
        .await
    );
    after_failover(&server, &load, killed, promoted, &clean, || {
        cluster.node(victim).restart()
    })
    .await;

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

#[tokio::test]
async fn on_a_cluster_imports_are_all_or_nothing_and_removals_gets_and_scans_work() {
    let cluster = Cluster::start().await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = cluster.config(scratch.path());
    init_redis(&config).await;
    // A store that looked up numbers before the imports: it remembers the generations it read.
    use optout::store::{ChangeFeed, CheckReads, Writes};
    let store =
        optout::store::redis::RedisStore::connect(config.redis().expect("redis")).expect("connect");
    store.open_dataset().await.expect("open");
    let new_only =
        optout::core::NhsNumber::parse(&valid_numbers(4_500_000_000, 1)[0]).expect("valid");
    let before = store
        .lookup(&[new_only], optout::core::OptOutSet::ALL)
        .await
        .expect("lookup");
    assert!(before.held[0].is_empty());

    common::replace_import_never_shows_half_a_list(config.clone()).await;

    // The generations it remembers were replaced twice: its next lookup must notice, not answer
    // from a generation that no longer holds the list.
    let after = store
        .lookup(&[new_only], optout::core::OptOutSet::ALL)
        .await
        .expect("lookup");
    assert!(
        after.held[0].contains(optout::core::OptOutType::NationalDataOptOut),
        "a lookup read a replaced generation"
    );

    // Every replaced generation (the first import's, and the list before it) is unlinked from
    // every master: the national list's keys are all of the current generation. (Generations
    // are drawn at random: read the current one.)
    let mut meta = redis::cluster::ClusterClient::new(cluster.urls())
        .expect("client")
        .get_async_connection()
        .await
        .expect("cluster");
    let current_gen: String = redis::cmd("GET")
        .arg("{optout:}gen:1")
        .query_async(&mut meta)
        .await
        .expect("gen:1");
    let national_keys = || async {
        let mut by_gen: std::collections::BTreeMap<String, usize> = Default::default();
        for n in &cluster.nodes {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("optout:*d:1:*")
                .query_async(&mut n.connection().await)
                .await
                .unwrap_or_default();
            for g in keys.iter().filter_map(|k| common::national_generation(k)) {
                *by_gen.entry(g.to_string()).or_default() += 1;
            }
        }
        by_gen
    };
    eventually!(
        "the replaced generations are unlinked on every master",
        Duration::from_secs(10),
        national_keys().await.keys().all(|g| *g == current_gen)
    );
    let current = national_keys()
        .await
        .get(&current_gen)
        .copied()
        .unwrap_or(0);
    assert!(current > 100, "the current generation's buckets: {current}");

    // Removal, get and scan, at the store's own interface.
    let all = store.scan().await.expect("scan");
    assert_eq!(all.numbers.len(), 3000, "the scan reads every shard");
    let server = TestServer::start_redis(config.clone()).await;
    let one = all.numbers[17];
    assert_eq!(decide(&server, &[one.to_string()]).await, vec![WITHHELD]);
    let (records, _) = store.get(one).await.expect("get");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].source, "replace");
    server
        .admin_client()
        .await
        .remove_opt_outs(change_request(
            vec![one.to_string()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("remove");
    assert_eq!(decide(&server, &[one.to_string()]).await, vec![RELEASED]);
    assert!(store.get(one).await.expect("get").0.is_empty());
    assert_eq!(store.scan().await.expect("scan").numbers.len(), 2999);
    let status = store.status().await.expect("status");
    assert_eq!((status.national, status.patients), (2999, 2999));
    server.stop().await;
}

#[tokio::test]
async fn a_cluster_master_that_comes_back_empty_fails_closed() {
    let mut cluster = Cluster::start().await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = cluster.config(scratch.path());
    init_redis(&config).await;
    let server = Arc::new(TestServer::start_redis(config.clone()).await);
    let opted = valid_numbers(4_100_000_000, 300);
    add(&server, &opted).await.expect("seed opt-outs");
    let load = Load::start(server.clone(), opted.clone(), Vec::new());

    // A master that holds opt-outs but not the metadata restarts at once without its data (no
    // persistence); it keeps its slots, and its replica resynchronises from it, empty too.
    let meta = cluster
        .master_of(key_slot(b"{optout:}marker"))
        .await
        .expect("a master")
        .0;
    let victim = cluster
        .roles()
        .await
        .into_iter()
        .find(|(p, m, _, _)| *m && *p != meta)
        .expect("another master")
        .0;
    cluster.node(victim).restart_empty();
    tokio::time::sleep(Duration::from_millis(2000)).await;

    // Its opt-outs are not released: the checks above assert it on every answer, and now all of
    // the numbers are withheld though the data of some of them is gone.
    let answers = decide(&server, &opted).await;
    assert_eq!(answers.len(), opted.len());
    assert!(answers.iter().all(|(o, _)| *o == Outcome::Withhold));
    let (checks, _) = load.finish().await;
    // Kept coming: each check waits at most its 1 s deadline for the emptied shard, over the
    // 2 s and more above. (It was `> 5`, which the whole suite running alongside once made 5.)
    assert!(checks >= 3, "checks kept coming: {checks}");
    Arc::try_unwrap(server)
        .ok()
        .expect("sole owner")
        .stop()
        .await;
}

/// Found by the nemesis (Cluster): a check asked while an add was half done (logged, so in
/// every filter and within the version the answer claims, but not yet in its shard) answered
/// "no opt-out" at the add's own version. An answer must reflect the version it claims: the
/// numbers of adds under way at that version are held.
#[tokio::test]
async fn on_a_cluster_a_check_during_a_half_done_add_withholds_it_at_the_version_it_claims() {
    let (cluster, _scratch, config) = common::initialised_cluster().await;
    let writer = TestServer::start_redis(config.clone()).await;
    let reader = TestServer::start_redis(config.clone()).await;
    let (n, shard_master) = cluster.number_off_the_metadata_master(4_065_000_000).await;

    // The add's first step (the log) lands; its shard write waits behind the pause.
    cluster.pause_writes(shard_master, 3000).await;
    let mut admin = writer.admin_client().await;
    let request = change_request(vec![n.clone()], OptOutType::NationalDataOptOut);
    let adding = tokio::spawn(async move { admin.add_opt_outs(request).await });
    cluster.wait_version_moves("0-0").await;
    // The reader's filter reads the log entry: the number is a "maybe", asked of the store.
    let logged = poll!(
        "the reader's filter reads the add",
        Duration::from_secs(5),
        {
            let status = reader
                .admin_client()
                .await
                .get_status(optout::api::proto::GetStatusRequest {})
                .await
                .expect("status")
                .into_inner();
            if let Some(f) = status.filter.filter(|f| f.version != "0-0") {
                break f.version;
            }
        }
    );
    let mut client = reader.check_client().await;
    let answer = client
        .check(check_request(vec![n.clone()], RESEARCH))
        .await
        .expect("check")
        .into_inner();
    let decisions: Vec<_> = answer.decisions.iter().map(outcome).collect();
    assert!(
        adding.await.expect("task").is_ok(),
        "acknowledged once the pause ends"
    );
    assert_eq!(
        decisions,
        vec![WITHHELD],
        "a check answering at {} (the add was logged at {logged}) released the number",
        answer.version
    );
    reader.stop().await;
    writer.stop().await;
}

#[tokio::test]
async fn on_a_cluster_a_filter_built_while_an_add_is_half_done_still_holds_it() {
    let cluster = Cluster::start().await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = cluster.config(scratch.path());
    init_redis(&config).await;
    let writer = TestServer::start_redis(config.clone()).await;
    let (n, shard_master) = cluster.number_off_the_metadata_master(4_060_000_000).await;

    // The add's first step (the log) lands; its shard write waits behind the pause.
    cluster.pause_writes(shard_master, 3000).await;
    let mut admin = writer.admin_client().await;
    let request = change_request(vec![n.clone()], OptOutType::NationalDataOptOut);
    let adding = tokio::spawn(async move { admin.add_opt_outs(request).await });
    cluster.wait_version_moves("0-0").await;
    // A new replica builds its filter now: the scan reads a version that includes the add, and
    // a shard that does not hold it yet.
    let reader = TestServer::start_redis(config.clone()).await;
    let version = adding
        .await
        .expect("task")
        .expect("the add is acknowledged once the pause ends")
        .into_inner()
        .version;

    let mut client = reader.check_client().await;
    let mut req = check_request(vec![n.clone()], RESEARCH);
    req.at_least_version = version.clone();
    let answer: Vec<_> = client
        .check(req)
        .await
        .expect("check")
        .into_inner()
        .decisions
        .iter()
        .map(outcome)
        .collect();
    assert_eq!(
        answer,
        vec![WITHHELD],
        "the add acknowledged at {version} is withheld by the replica that scanned mid-way"
    );
    reader.stop().await;
    writer.stop().await;
}

#[tokio::test]
async fn on_a_cluster_a_change_cut_off_between_its_steps_is_finished_and_audited() {
    let cluster = Cluster::start().await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = cluster.config(scratch.path());
    init_redis(&config).await;
    let server = TestServer::start_redis(config.clone()).await;
    let (n, shard_master) = cluster.number_off_the_metadata_master(4_070_000_000).await;
    add(&server, std::slice::from_ref(&n)).await.expect("add");

    // A removal whose caller gives up (and whose handler is dropped, as in a crash) while its
    // shard's master is paused: the first step is done, the rest is not.
    let version = cluster.version().await.expect("version");
    cluster.pause_writes(shard_master, 2000).await;
    let mut admin = server.admin_client().await;
    let mut request = tonic::Request::new(change_request(
        vec![n.clone()],
        OptOutType::NationalDataOptOut,
    ));
    request.set_timeout(Duration::from_millis(400));
    let cut = admin.remove_opt_outs(request).await;
    assert!(cut.is_err(), "the caller gave up: {cut:?}");
    cluster.wait_version_moves(&version).await;

    // The change is finished (by the replica's recovery) with its audit record and counts.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let audit = admin
            .read_audit(optout::api::proto::ReadAuditRequest {
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_inner();
        let status = admin
            .get_status(optout::api::proto::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        let recorded = audit
            .records
            .iter()
            .any(|r| r.action == "remove" && r.applied == 1);
        if recorded && status.national_data_opt_outs == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a change that took effect is audited and counted: audit {:?}, count {}",
            audit.records.iter().map(|r| &r.action).collect::<Vec<_>>(),
            status.national_data_opt_outs
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        decide(&server, std::slice::from_ref(&n)).await,
        vec![RELEASED]
    );
    server.stop().await;
}

#[tokio::test]
async fn on_a_cluster_a_writer_killed_between_the_steps_leaves_a_change_that_is_finished() {
    let cluster = Cluster::start().await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = cluster.config(scratch.path());
    init_redis(&config).await;
    let observer = TestServer::start_redis(config.clone()).await;
    let mut writer = ServeProcess::start(&cluster.serve_flags(), scratch.path()).await;
    let (n, shard_master) = cluster.number_off_the_metadata_master(4_080_000_000).await;

    // The add's first step lands; the writer process is killed while its shard step waits.
    cluster.pause_writes(shard_master, 2000).await;
    let channel = tonic::transport::Channel::from_shared(writer.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect to the writer");
    let mut admin = optout::api::proto::opt_out_admin_client::OptOutAdminClient::new(channel);
    let request = change_request(vec![n.clone()], OptOutType::NationalDataOptOut);
    let adding = tokio::spawn(async move { admin.add_opt_outs(request).await });
    cluster.wait_version_moves("0-0").await;
    writer.child.kill().expect("SIGKILL the writer");
    let _ = writer.child.wait();
    assert!(adding.await.expect("task").is_err(), "never acknowledged");

    // Another replica finishes it: recorded in the audit, counted, and withheld.
    let mut admin = observer.admin_client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let audit = admin
            .read_audit(optout::api::proto::ReadAuditRequest {
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_inner();
        let count = admin
            .get_status(optout::api::proto::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner()
            .national_data_opt_outs;
        if audit
            .records
            .iter()
            .any(|r| r.action == "add" && r.applied == 1)
            && count == 1
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed writer's change is audited and counted: count {count}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        decide(&observer, std::slice::from_ref(&n)).await,
        vec![WITHHELD]
    );
    observer.stop().await;
}

/// Issue 27, item 1: a removal whose writer dies between its steps (its shard's master paused)
/// is finished later by another replica's recovery; an add of the same number made meanwhile
/// must not be undone by it. Changes of one number now run one after the other: the add is
/// refused (ABORTED, retry) until the removal is finished, then applied after it.
#[tokio::test]
async fn on_a_cluster_a_removal_finished_late_never_undoes_a_later_add() {
    let (cluster, scratch, config) = common::initialised_cluster().await;
    let a = TestServer::start_redis(config.clone()).await;
    let mut b = ServeProcess::start(&cluster.serve_flags(), scratch.path()).await;
    let (n, shard_master) = cluster.number_off_the_metadata_master(4_090_000_000).await;
    add(&a, std::slice::from_ref(&n))
        .await
        .expect("N opted out");
    let version = cluster.version().await.expect("version");

    // The removal's first step lands through B; its shard step waits behind the pause; B dies.
    cluster.pause_writes(shard_master, 1500).await;
    let paused_at = Instant::now();
    let mut admin_b =
        optout::api::proto::opt_out_admin_client::OptOutAdminClient::new(b.channel().await);
    let request = change_request(vec![n.clone()], OptOutType::NationalDataOptOut);
    let removing = tokio::spawn(async move { admin_b.remove_opt_outs(request).await });
    cluster.wait_version_moves(&version).await;
    b.kill();
    assert!(removing.await.expect("task").is_err(), "never acknowledged");
    tokio::time::sleep(Duration::from_millis(1600).saturating_sub(paused_at.elapsed())).await;

    // After the pause, the patient opts out again through A: acknowledged once it can be
    // ordered after the removal (retried while refused).
    let mut admin_a = a.admin_client().await;
    let added = poll!("the add is acknowledged", Duration::from_secs(30), {
        match admin_a
            .add_opt_outs(change_request(
                vec![n.clone()],
                OptOutType::NationalDataOptOut,
            ))
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(e) => assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}"),
        }
    });
    // The removal is finished (recorded) by now or soon; whenever it is, N stays opted out.
    poll!(
        "the removal is finished and recorded",
        Duration::from_secs(20),
        {
            let audit = admin_a
                .read_audit(optout::api::proto::ReadAuditRequest {
                    limit: 100,
                    ..Default::default()
                })
                .await
                .expect("audit")
                .into_inner();
            if audit.records.iter().any(|r| r.action == "remove") {
                break;
            }
        }
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut client = a.check_client().await;
    let mut req = check_request(vec![n.clone()], RESEARCH);
    req.at_least_version = added.version.clone();
    let answer: Vec<_> = client
        .check(req)
        .await
        .expect("check")
        .into_inner()
        .decisions
        .iter()
        .map(outcome)
        .collect();
    assert_eq!(
        answer,
        vec![WITHHELD],
        "the add acknowledged at {} (applied {}) was undone by the older removal",
        added.version,
        added.applied
    );
    a.stop().await;
}

/// Issue 27, item 4: a change's first step (log entry, intent, audit record) is lost from the
/// metadata (here deleted from outside, as a failover of the metadata's master before it passed
/// them on would) while its shard step waits; the last step then finds neither the intent nor a
/// record that it finished. It must fail, and the change must not be acknowledged: the shards
/// changed with no log entry and no audit record.
#[tokio::test]
async fn on_a_cluster_a_change_whose_first_step_was_lost_is_not_acknowledged() {
    let (cluster, _scratch, config) = common::initialised_cluster().await;
    let a = TestServer::start_redis(config.clone()).await;
    let (n, shard_master) = cluster.number_off_the_metadata_master(4_095_000_000).await;
    let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("cluster client");
    let mut conn = client.get_async_connection().await.expect("connect");

    cluster.pause_writes(shard_master, 1500).await;
    let mut admin = a.admin_client().await;
    let request = change_request(vec![n.clone()], OptOutType::NationalDataOptOut);
    let adding = tokio::spawn(async move { admin.add_opt_outs(request).await });
    cluster.wait_version_moves("0-0").await;
    let id: String = redis::cmd("GET")
        .arg("{optout:}version")
        .query_async(&mut conn)
        .await
        .expect("version");
    let _: () = redis::pipe()
        .del(format!("{{optout:}}intent:{id}"))
        .hdel("{optout:}intents", &id)
        .query_async(&mut conn)
        .await
        .expect("lose step 1");
    let outcome = adding.await.expect("task");
    assert!(
        outcome.is_err(),
        "a change whose first step the store lost was acknowledged: {outcome:?}"
    );
    a.stop().await;
}
