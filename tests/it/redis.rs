//! Replicas on a shared Redis store: real redis-server processes on free loopback ports, owned and
//! stopped by each test; the real server on 127.0.0.1 port 0; generated gRPC clients.

use crate::common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::common::{
    FaultyStore, RedisServer, TestServer, change_request, check_request, init_redis, outcome,
    redis_config, valid_numbers,
};
use optout::api::proto::{
    GetStatusRequest, ImportOptOutsRequest, OptOutType, Outcome, Purpose, Reason,
};
use redis::AsyncCommands;
use tonic_health::pb::health_check_response::ServingStatus;

const RESEARCH: Purpose = Purpose::Research;

async fn decide(server: &TestServer, numbers: &[String], at_least: &str) -> Vec<(Outcome, Reason)> {
    let mut client = server.check_client().await;
    let mut req = check_request(numbers.to_vec(), RESEARCH);
    req.at_least_version = at_least.to_string();
    let r = client.check(req).await.expect("check").into_inner();
    r.decisions.iter().map(outcome).collect()
}

async fn status(server: &TestServer) -> optout::api::proto::GetStatusResponse {
    server
        .admin_client()
        .await
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

const WITHHELD: (Outcome, Reason) = (Outcome::Withhold, Reason::NationalDataOptOut);
const RELEASED: (Outcome, Reason) = (Outcome::Release, Reason::NoOptOut);

#[tokio::test]
async fn an_opt_out_added_through_one_replica_is_withheld_by_the_other() {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = redis_config(&redis, "optout:", scratch.path());
    init_redis(&config).await;
    let a = TestServer::start_redis(config.clone()).await;
    let b = TestServer::start_redis(config.clone()).await;
    let n = valid_numbers(4_000_000_000, 3);

    let added = a
        .admin_client()
        .await
        .add_opt_outs(change_request(
            vec![n[0].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add through A")
        .into_inner();
    // With the version A returned: B answers for it at once.
    assert_eq!(
        decide(&b, &n[..1], &added.version).await,
        vec![WITHHELD],
        "B with at_least_version"
    );
    // Without it: within the freshness bound.
    let n2 = n[1].clone();
    let started = Instant::now();
    a.admin_client()
        .await
        .add_opt_outs(change_request(
            vec![n2.clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add through A");
    loop {
        if decide(&b, std::slice::from_ref(&n2), "").await == vec![WITHHELD] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_millis(2000),
            "B withheld the new opt-out within the 2 s freshness bound"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(decide(&b, &n[2..], "").await, vec![RELEASED]);
    let s = status(&b).await;
    assert_eq!(s.store_kind, "redis");
    assert_eq!(s.national_data_opt_outs, 2);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn redis_killed_while_checks_run_never_releases_an_opt_out_and_recovers() {
    let mut redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = redis_config(&redis, "optout:", scratch.path());
    init_redis(&config).await;
    let server = Arc::new(TestServer::start_redis(config.clone()).await);
    let opted = valid_numbers(4_100_000_000, 50);
    let clean = valid_numbers(4_200_000_000, 50);
    server
        .admin_client()
        .await
        .add_opt_outs(change_request(
            opted.clone(),
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("seed");
    let mut batch = opted.clone();
    batch.extend(clean.iter().cloned());

    let stop = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicU64::new(0));
    let clean_released = Arc::new(AtomicU64::new(0));
    let worker = {
        let (server, stop, checks, clean_released) = (
            server.clone(),
            stop.clone(),
            checks.clone(),
            clean_released.clone(),
        );
        let batch = batch.clone();
        tokio::spawn(async move {
            let mut client = server.check_client().await;
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                let mut req = tonic::Request::new(check_request(batch.clone(), RESEARCH));
                req.set_timeout(Duration::from_millis(500));
                let started = Instant::now();
                let r = client
                    .check(req)
                    .await
                    .expect("every check is answered")
                    .into_inner();
                slowest = slowest.max(started.elapsed());
                for (i, d) in r.decisions.iter().enumerate() {
                    let (o, _) = outcome(d);
                    if i < 50 {
                        assert_eq!(o, Outcome::Withhold, "opted-out number {i} released");
                    } else if o == Outcome::Release {
                        clean_released.fetch_add(1, Ordering::SeqCst);
                    }
                }
                checks.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            slowest
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    // Well past the freshness bound with Redis dead: nothing at all is released now.
    let before = clean_released.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        clean_released.load(Ordering::SeqCst),
        before,
        "nothing released while unprovable"
    );
    let during = checks.load(Ordering::SeqCst);
    // Issue 27: a replica that can neither prove its filter nor reach its store is not ready
    // (it would withhold everything): out of the Service; alive all the same.
    assert_eq!(
        server.health_of("optout.v1.OptOutCheck").await,
        ServingStatus::NotServing as i32,
        "readiness while the store is unreachable and the filter unproven"
    );
    assert_eq!(server.health().await, ServingStatus::NotServing as i32);
    assert_eq!(
        server.health_of("liveness").await,
        ServingStatus::Serving as i32
    );

    redis.restart();
    eventually!(
        "recovered within 10 s of Redis returning",
        Duration::from_secs(10),
        decide(&server, &clean[..1], "").await == vec![RELEASED]
            && server.health().await == ServingStatus::Serving as i32
    );
    stop.store(true, Ordering::SeqCst);
    let slowest = worker.await.expect("no opted-out number was released");
    assert!(checks.load(Ordering::SeqCst) > during, "checks kept coming");
    assert!(
        slowest < Duration::from_millis(1500),
        "slowest answer {slowest:?}"
    );
    assert_eq!(decide(&server, &opted[..1], "").await, vec![WITHHELD]);
    Arc::try_unwrap(server)
        .ok()
        .expect("sole owner")
        .stop()
        .await;
}

#[tokio::test]
async fn a_redis_that_comes_back_empty_or_is_flushed_fails_closed() {
    for flush in [false, true] {
        let mut redis = RedisServer::start();
        let scratch = tempfile::tempdir().expect("tempdir");
        let config = redis_config(&redis, "optout:", scratch.path());
        init_redis(&config).await;
        let server = TestServer::start_redis(config.clone()).await;
        let n = valid_numbers(4_300_000_000, 2);
        server
            .admin_client()
            .await
            .add_opt_outs(change_request(
                vec![n[0].clone()],
                OptOutType::NationalDataOptOut,
            ))
            .await
            .expect("add");

        if flush {
            let mut c = redis.connection().await;
            let _: () = redis::cmd("FLUSHALL")
                .query_async(&mut c)
                .await
                .expect("flushall");
        } else {
            redis.restart_empty();
        }
        // From the moment the data is gone, the opt-out is never released.
        let started = Instant::now();
        let mut not_serving = false;
        while started.elapsed() < Duration::from_secs(4) {
            let got = decide(&server, &n, "").await;
            assert_eq!(
                got[0].0,
                Outcome::Withhold,
                "flush={flush}: opted-out number released"
            );
            if server.health().await == ServingStatus::NotServing as i32 {
                not_serving = true;
                // Once it fails closed, nothing is released, even the number with no opt-out.
                let after = decide(&server, &n, "").await;
                assert_eq!(after[0].0, Outcome::Withhold, "flush={flush}");
                assert_eq!(after[1].0, Outcome::Withhold, "flush={flush}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(not_serving, "flush={flush}: health turned NOT_SERVING");
        // A replica started now also refuses to serve from the empty store.
        let late = TestServer::start_unready(
            Arc::new(
                optout::store::redis::RedisStore::connect(config.redis().expect("redis"))
                    .expect("connect"),
            ),
            config.clone(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(late.health().await, ServingStatus::NotServing as i32);
        assert_eq!(decide(&late, &n, "").await[0].0, Outcome::Withhold);
        late.stop().await;
        server.stop().await;
    }
}

#[tokio::test]
async fn a_filter_snapshot_staged_short_is_dropped_never_placed() {
    // A snapshot is staged a chunk at a time; a staging key that expired half-way and was made
    // again by a later chunk holds only the tail. Placed, a new replica would start from a
    // filter missing opt-outs (its seal the last guard). snapshot.lua must drop it (-1).
    let (redis, _scratch, _) = common::initialised_redis().await;
    let mut conn = redis.connection().await;
    let dataset: String = conn
        .hget("optout:marker", "dataset_id")
        .await
        .expect("the marker's dataset id");
    let script = redis::Script::new(include_str!(
        "../../crates/optout-store-redis/src/lua/snapshot.lua"
    ));
    let whole = format!("{dataset}{}", "filter bits ".repeat(100));
    let tail = &whole[whole.len() / 2..];
    let staged = "optout:snapshot_staging:test";
    let mut place = async |bytes: &str| -> i64 {
        let () = conn.set(staged, bytes).await.expect("stage");
        script
            .key("optout:marker")
            .key(staged)
            .arg("optout:")
            .arg(&dataset)
            .arg(0)
            .arg(0)
            .arg(whole.len())
            .invoke_async(&mut conn)
            .await
            .expect("snapshot.lua")
    };
    assert_eq!(place(tail).await, -1, "a staged snapshot not whole");
    let (left, placed): (bool, bool) = redis::pipe()
        .exists(staged)
        .exists("optout:snapshot")
        .query_async(&mut redis.connection().await)
        .await
        .expect("exists");
    assert!(!left && !placed, "staged left {left}, placed {placed}");
    // The same call with the whole snapshot staged places it: the refusal above was the length.
    assert_eq!(place(&whole).await, 1, "the whole snapshot");
    let got: String = redis
        .connection()
        .await
        .get("optout:snapshot")
        .await
        .expect("placed");
    assert_eq!(got, whole);
}

#[tokio::test]
async fn a_new_replica_starts_from_the_snapshot_and_a_replica_behind_a_trimmed_log_rebuilds() {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut config = redis_config(&redis, "optout:", scratch.path());
    config.redis_mut().expect("redis").log_len = 50;
    init_redis(&config).await;
    let a = TestServer::start_redis(config.clone()).await;

    // A replica whose change feed is cut off.
    let faulty = FaultyStore::new(Arc::new(
        optout::store::redis::RedisStore::connect(config.redis().expect("redis")).expect("connect"),
    ));
    let behind = TestServer::start_on(faulty.store(), config.clone()).await;
    faulty.feed_down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let generation_before = status(&behind).await.filter.expect("filter").generation;

    // 100,000 opt-outs in 100 changes through A: far past the 50 entries the log keeps.
    let all = valid_numbers(5_000_000_000, 100_000);
    let mut admin = a.admin_client().await;
    let mut last = String::new();
    for chunk in all.chunks(1000) {
        last = admin
            .add_opt_outs(change_request(
                chunk.to_vec(),
                OptOutType::NationalDataOptOut,
            ))
            .await
            .expect("add")
            .into_inner()
            .version;
    }
    // A publishes a snapshot (every 200 ms here); wait until it covers the last change.
    let mut conn = redis.connection().await;
    poll!("snapshot published", Duration::from_secs(10), {
        let v: Option<String> = conn.get("optout:snapshot_version").await.expect("get");
        if v.as_deref() == Some(last.as_str()) {
            break;
        }
    });
    let c = TestServer::start_redis(config.clone()).await;
    let s = status(&c).await;
    let f = s.filter.expect("filter");
    assert_eq!(f.loaded_from, "snapshot");
    assert_eq!(f.version, last);
    let sample: Vec<String> = all.iter().step_by(997).cloned().collect();
    assert!(decide(&c, &sample, "").await.iter().all(|d| *d == WITHHELD));

    // The replica that was cut off finds its position trimmed away and rebuilds.
    faulty.feed_down.store(false, Ordering::SeqCst);
    poll!("the replica behind rebuilt", Duration::from_secs(20), {
        let f = status(&behind).await.filter.expect("filter");
        if f.generation > generation_before && f.version >= last && f.fresh {
            break;
        }
    });
    assert!(
        decide(&behind, &sample, "")
            .await
            .iter()
            .all(|d| *d == WITHHELD)
    );
    a.stop().await;
    behind.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn a_replace_import_racing_with_checks_never_shows_half_a_list() {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = redis_config(&redis, "optout:", scratch.path());
    init_redis(&config).await;
    common::replace_import_never_shows_half_a_list(config).await;
}

#[tokio::test]
async fn foreign_keys_are_never_touched_and_a_store_is_initialised_once() {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = redis_config(&redis, "optout:", scratch.path());
    let mut conn = redis.connection().await;
    let _: () = conn.set("other-app:key", "mine").await.expect("set");
    let _: () = conn
        .set("optout", "not under the prefix")
        .await
        .expect("set");
    let _: () = conn.hset("other-app:hash", "f", "v").await.expect("hset");

    // Before initialisation, a replica does not serve.
    let early = TestServer::start_unready(
        Arc::new(
            optout::store::redis::RedisStore::connect(config.redis().expect("redis"))
                .expect("connect"),
        ),
        config.clone(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(early.health().await, ServingStatus::NotServing as i32);

    init_redis(&config).await;
    let again = optout::store::redis::RedisStore::connect(config.redis().expect("redis"))
        .expect("connect")
        .init(64)
        .await;
    assert!(again.is_err(), "a second init is refused");
    early.wait_serving().await;

    let n = valid_numbers(4_600_000_000, 200);
    let mut admin = early.admin_client().await;
    admin
        .add_opt_outs(change_request(n.clone(), OptOutType::Type1))
        .await
        .expect("add");
    admin
        .remove_opt_outs(change_request(n[..50].to_vec(), OptOutType::Type1))
        .await
        .expect("remove");
    let r = admin
        .import_opt_outs(tokio_stream::iter(vec![ImportOptOutsRequest {
            r#type: OptOutType::Type1 as i32,
            practice: common::PRACTICE.into(),
            ..common::import(&n[100..], true)
        }]))
        .await
        .expect("import")
        .into_inner();
    assert_eq!((r.added, r.removed), (0, 50));
    let s = status(&early).await;
    assert_eq!((s.type_1_opt_outs, s.patients), (100, 100));

    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("keys");
    for k in &keys {
        assert!(
            k.starts_with("optout:")
                || ["other-app:key", "optout", "other-app:hash"].contains(&k.as_str()),
            "unexpected key {k}"
        );
    }
    let v: String = conn.get("other-app:key").await.expect("get");
    assert_eq!(v, "mine");
    let v: String = conn.get("optout").await.expect("get");
    assert_eq!(v, "not under the prefix");
    let v: String = conn.hget("other-app:hash", "f").await.expect("hget");
    assert_eq!(v, "v");
    early.stop().await;
}

#[tokio::test]
async fn checks_answer_from_redis_in_one_round_trip_per_request() {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut config = redis_config(&redis, "optout:", scratch.path());
    // No snapshot publishing during the measurement: its script would be counted too.
    config.filter.snapshot_interval = Duration::from_secs(3600);
    init_redis(&config).await;
    let server = TestServer::start_redis(config.clone()).await;
    let n = valid_numbers(4_700_000_000, 1000);
    server
        .admin_client()
        .await
        .add_opt_outs(change_request(
            n[..100].to_vec(),
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut conn = redis.connection().await;
    let before: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("info");
    let got = decide(&server, &n, "").await;
    let after: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("info");
    assert!(got[..100].iter().all(|d| *d == WITHHELD));
    assert!(got[100..].iter().all(|d| *d == RELEASED));
    let calls = |info: &str, cmd: &str| -> u64 {
        info.lines()
            .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    let lookups = calls(&after, "exec") - calls(&before, "exec");
    let reads = calls(&after, "hexists") - calls(&before, "hexists");
    // One transaction for the 100+ maybes (nothing else on one Redis runs one), with a HEXISTS
    // per maybe and type (no origin given: both types apply); the first lookup of a process may
    // be repeated once, to learn the generations.
    assert!(
        (1..=2).contains(&lookups),
        "{lookups} transactions for one check of 1000 numbers"
    );
    assert!(
        (200..=2 * 2 * 110).contains(&reads) && reads % 2 == 0,
        "{reads} HEXISTS for one check of 1000 numbers with 100 opt-outs"
    );
    server.stop().await;
}

#[tokio::test]
async fn every_connection_to_redis_sends_without_waiting_for_an_ack() {
    // Nagle's algorithm (the redis crate's default) holds a small write while an earlier one is
    // unacknowledged, and the peer may delay its ACK by 40 ms: a lookup stalled for nothing.
    let (redis, _scratch, config) = common::initialised_redis().await;
    let server = TestServer::start_redis(config).await;
    let n = valid_numbers(4_700_000_000, 10);
    server
        .admin_client()
        .await
        .add_opt_outs(change_request(
            n[..2].to_vec(),
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add");
    let got = decide(&server, &n, "").await;
    assert!(got[..2].iter().all(|d| *d == WITHHELD));
    // The check, write and feed connections at least (this test opened none of its own).
    common::assert_nodelay(&[redis.port], 3).await;
    server.stop().await;
}

#[tokio::test]
async fn audit_records_live_in_redis_with_the_change_and_hold_digests_only() {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut config = redis_config(&redis, "optout:", scratch.path());
    config.audit_key = Some(optout::core::AuditKey::new(&[9u8; 32]).expect("key"));
    init_redis(&config).await;
    let a = TestServer::start_redis(config.clone()).await;
    let b = TestServer::start_redis(config.clone()).await;
    let n = valid_numbers(4_800_000_000, 3);
    a.admin_client()
        .await
        .add_opt_outs(change_request(
            vec![n[0].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add");
    let mut req = check_request(n.clone(), RESEARCH);
    req.extract_id = "extract-7".into();
    b.check_client().await.check(req).await.expect("check");
    let started = Instant::now();
    let about = |nhs: &str| optout::api::proto::ReadAuditRequest {
        nhs_number: nhs.to_string(),
        ..Default::default()
    };
    // Records written by either replica are read by the other (shared store, shared key).
    loop {
        let records = a
            .admin_client()
            .await
            .read_audit(about(&n[1]))
            .await
            .expect("read")
            .into_inner()
            .records;
        if records
            .iter()
            .any(|r| r.action == "check" && r.extract_id == "extract-7")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "check recorded in Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let changed: Vec<_> = b
        .admin_client()
        .await
        .read_audit(about(&n[0]))
        .await
        .expect("read")
        .into_inner()
        .records
        .into_iter()
        .filter(|r| r.action != "read-audit")
        .collect();
    assert_eq!(
        changed.len(),
        1,
        "n0 was changed, and withheld (not released) by the check"
    );
    assert_eq!(changed[0].action, "add");
    assert!(!changed[0].version.is_empty());
    let mut conn = redis.connection().await;
    let mut raw = String::new();
    for stream in ["optout:audit", "optout:changes"] {
        let page: redis::Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .expect("xrange");
        raw.push_str(&format!("{page:?}"));
    }
    let changes: u64 = redis::cmd("XLEN")
        .arg("optout:changes")
        .query_async(&mut conn)
        .await
        .expect("xlen");
    assert!(changes >= 1, "the change is in the changes trail");
    for number in &n {
        assert!(
            !raw.contains(number.as_str()),
            "plain NHS number in the Redis audit stream"
        );
    }
    a.stop().await;
    b.stop().await;
}

/// A Redis that may evict any key when full could silently delete opt-out records (and release
/// those patients): init refuses it, a replica stays NOT_SERVING and withholds, and once the
/// policy is noeviction the replica serves by itself.
#[tokio::test]
async fn a_redis_that_may_evict_opt_outs_is_refused() {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = redis_config(&redis, "optout:", scratch.path());
    let mut c = redis.connection().await;
    let set_policy = |policy: &'static str| {
        let mut c = c.clone();
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory-policy")
                .arg(policy)
                .query_async(&mut c)
                .await
                .expect("config set");
        }
    };
    set_policy("allkeys-lru").await;
    let store =
        optout::store::redis::RedisStore::connect(config.redis().expect("redis")).expect("connect");
    let refused = store.init(64).await.expect_err("init refuses allkeys-lru");
    assert!(refused.to_string().contains("allkeys-lru"), "{refused}");
    assert!(refused.to_string().contains("noeviction"), "{refused}");

    // Initialised while safe, then switched to an evicting policy before a replica starts.
    set_policy("noeviction").await;
    init_redis(&config).await;
    set_policy("allkeys-lfu").await;
    let replica = TestServer::start_unready(Arc::new(store), config.clone()).await;
    let n = valid_numbers(4_700_000_000, 3);
    for _ in 0..10 {
        assert_eq!(replica.health().await, ServingStatus::NotServing as i32);
        for (o, _) in decide(&replica, &n, "").await {
            assert_eq!(o, Outcome::Withhold, "answered from a Redis that may evict");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    set_policy("volatile-lru").await;
    replica.wait_serving().await;
    assert_eq!(decide(&replica, &n, "").await, vec![RELEASED; 3]);

    // Switched to an evicting policy while serving: within the safety check (5 s) the replica
    // stops answering from that Redis; the opted-out number is never released meanwhile.
    let added = replica
        .admin_client()
        .await
        .add_opt_outs(change_request(
            vec![n[0].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add")
        .into_inner();
    assert_eq!(decide(&replica, &n, &added.version).await[0], WITHHELD);
    set_policy("allkeys-random").await;
    poll!(
        "still SERVING 10 s after the policy became allkeys-random",
        Duration::from_secs(10),
        {
            let got = decide(&replica, &n, "").await;
            assert_eq!(got[0].0, Outcome::Withhold, "opted-out number released");
            if replica.health().await == ServingStatus::NotServing as i32 {
                // Failed closed: nothing at all is released now.
                let after = decide(&replica, &n, "").await;
                assert!(
                    after.iter().all(|(o, _)| *o == Outcome::Withhold),
                    "{after:?}"
                );
                break;
            }
        }
    );
    set_policy("noeviction").await;
    replica.wait_serving().await;
    assert_eq!(
        decide(&replica, &n, "").await,
        vec![WITHHELD, RELEASED, RELEASED]
    );
    let _: () = redis::cmd("PING").query_async(&mut c).await.expect("ping");
    replica.stop().await;
}

#[tokio::test]
async fn a_burst_of_checks_never_pushes_the_record_of_a_change_out_of_the_audit() {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut config = redis_config(&redis, "optout:", scratch.path());
    // A check trail kept short on purpose: check records are trimmed past it.
    config.redis_mut().expect("redis").audit_len = 5;
    init_redis(&config).await;
    let server = TestServer::start_redis(config.clone()).await;
    let n = valid_numbers(4_810_000_000, 2);
    server
        .admin_client()
        .await
        .add_opt_outs(change_request(
            vec![n[0].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add");
    // 300 checks of another number: 300 check records, three of Redis's stream nodes.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut client = server.check_client().await;
    let stream = tokio::spawn(async move {
        let mut answers = client
            .check_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        let mut answered = 0;
        while answers.message().await.expect("answer").is_some() {
            answered += 1;
        }
        answered
    });
    for i in 0..300 {
        let mut req = check_request(vec![n[1].clone()], RESEARCH);
        req.extract_id = format!("burst-{i}");
        tx.send(req).await.expect("send");
    }
    drop(tx);
    assert_eq!(stream.await.expect("join"), 300);
    let mut conn = redis.connection().await;
    eventually!("the check records are written", Duration::from_secs(10), {
        let last: redis::Value = redis::cmd("XREVRANGE")
            .arg("optout:audit")
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .expect("xrevrange");
        format!("{last:?}").contains("burst-299")
    });
    let records = server
        .admin_client()
        .await
        .read_audit(optout::api::proto::ReadAuditRequest {
            nhs_number: n[0].clone(),
            ..Default::default()
        })
        .await
        .expect("read")
        .into_inner()
        .records;
    assert!(
        records.iter().any(|r| r.action == "add"),
        "the record of the opt-out change is still in the trail: {records:?}"
    );
    server.stop().await;
}

/// An import too big for its change-log entry to list its numbers: the other replica rebuilds
/// its filter from a scan, page by page, and withholds every imported number from it.
#[tokio::test]
async fn an_import_too_big_to_list_is_followed_by_a_rebuild_that_withholds_it_all() {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = redis_config(&redis, "optout:", scratch.path());
    init_redis(&config).await;
    let a = TestServer::start_redis(config.clone()).await;
    let b = TestServer::start_redis(config.clone()).await;
    let before = status(&b).await.filter.expect("filter").generation;

    let n = valid_numbers(5_100_000_000, optout::store::LOG_LIST_MAX + 2_000);
    let messages: Vec<ImportOptOutsRequest> = common::import_in_chunks(&n, 5_000)
        .into_iter()
        .map(|m| ImportOptOutsRequest {
            source: "big.csv".into(),
            ..m
        })
        .collect();
    let imported = a
        .admin_client()
        .await
        .import_opt_outs(tokio_stream::iter(messages))
        .await
        .expect("import")
        .into_inner();
    assert_eq!(imported.added, n.len() as u64);

    poll!("B rebuilt past the import", Duration::from_secs(20), {
        let f = status(&b).await.filter.expect("filter");
        if f.generation > before && f.version >= imported.version && f.fresh {
            // Items count inserts that set a new bit: all but the odd collision.
            assert!(f.items + 50 >= n.len() as u64, "{f:?}");
            break;
        }
    });
    // Fresh, and at or past the import's version: answered from the filter, which must hold it.
    let sample: Vec<String> = n.iter().step_by(101).cloned().collect();
    assert!(decide(&b, &sample, "").await.iter().all(|d| *d == WITHHELD));
    assert!(
        decide(&b, &sample, &imported.version)
            .await
            .iter()
            .all(|d| *d == WITHHELD)
    );
    a.stop().await;
    b.stop().await;
}

/// An import holds its type's lock while it is applied (changes of that type wait). Before the
/// lock was a lease, a call cut off mid-commit (a client deadline) or a replica killed mid-commit
/// left it for ten minutes, and every add and removal of the type was refused meanwhile (found by
/// the nemesis: most of its changes came back UNAVAILABLE). Now the lock is released when the
/// call is cut off, and lapses within its lease when the replica dies.
#[tokio::test]
async fn an_import_cut_off_or_killed_mid_commit_holds_back_changes_for_its_lease_at_most() {
    let (redis, scratch, config) = common::initialised_redis().await;
    let observer = TestServer::start_redis(config).await;
    let flags = vec!["--redis-url".to_string(), redis.url()];
    let mut writer = common::ServeProcess::start(&flags, scratch.path()).await;
    let mut conn = redis.connection().await;
    // Enough that applying it takes a while (it compares every bucket, then swaps).
    let numbers = valid_numbers(4_200_000_000, 30_000);
    let import = |timeout: Option<Duration>| {
        let channel = writer.url.clone();
        let numbers = numbers.clone();
        async move {
            let channel = tonic::transport::Channel::from_shared(channel)
                .expect("url")
                .connect()
                .await
                .expect("connect");
            let mut admin =
                optout::api::proto::opt_out_admin_client::OptOutAdminClient::new(channel);
            let mut request = tonic::Request::new(futures::stream::iter(common::import_in_chunks(
                &numbers, 1_000,
            )));
            if let Some(t) = timeout {
                request.set_timeout(t);
            }
            admin.import_opt_outs(request).await
        }
    };
    // Waits until the import holds the national list's lock.
    async fn locked(conn: &mut redis::aio::MultiplexedConnection) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let held: bool = conn.exists("optout:lock:1").await.expect("EXISTS");
            if held {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the import took its lock within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let add_succeeds_within = |limit: Duration| {
        let observer = &observer;
        let n = numbers[0].clone();
        async move {
            let started = Instant::now();
            let mut admin = observer.admin_client().await;
            loop {
                let added = admin
                    .add_opt_outs(change_request(
                        vec![n.clone()],
                        OptOutType::NationalDataOptOut,
                    ))
                    .await;
                if added.is_ok() {
                    return started.elapsed();
                }
                assert!(
                    started.elapsed() < limit,
                    "an add of the type is still refused {limit:?} after the import stopped: \
                     {added:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // 1. The caller gives up while the import is applied: the lock goes with the call.
    let cut = tokio::spawn(import(None));
    locked(&mut conn).await;
    cut.abort();
    let _ = cut.await;
    let took = add_succeeds_within(Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(5), "{took:?}");

    // 2. The replica applying it is killed: the lock lapses within its lease (10 s).
    let killed = tokio::spawn(import(None));
    locked(&mut conn).await;
    writer.kill();
    let _ = killed.await;
    let took = add_succeeds_within(Duration::from_secs(15)).await;
    assert!(took < Duration::from_secs(15), "{took:?}");
    observer.stop().await;
}

/// Issue 27, item 2: a Redis restored from an older copy of its append-only file loses an
/// acknowledged add; a write lands before the replicas read again, so the store's version (a
/// clock-based stream id) is ahead of what they saw and a version comparison notices nothing. The
/// lost opt-out must not be released by a replica that saw it (here both: the writer, and the other
/// once its filter reached it): they prove the store still holds what they saw, find it does not,
/// and fail closed until an admin acknowledges.
#[tokio::test]
async fn a_redis_restored_from_an_older_aof_is_noticed_although_a_write_lands_first() {
    let (mut redis, scratch, config) = common::initialised_redis().await;
    let a = TestServer::start_redis(config.clone()).await;
    let b = TestServer::start_redis(config).await;
    let n = valid_numbers(4_300_000_000, 3);
    async fn add(server: &TestServer, number: &str) -> Result<String, tonic::Status> {
        server
            .admin_client()
            .await
            .add_opt_outs(change_request(
                vec![number.to_string()],
                OptOutType::NationalDataOptOut,
            ))
            .await
            .map(|r| r.into_inner().version)
    }
    add(&a, &n[0]).await.expect("add N1");
    let backup = scratch.path().join("backup");
    redis.copy_data(&backup);
    let v2 = add(&a, &n[1]).await.expect("add N2, acknowledged");
    eventually!(
        "replica B's filter reflects N2",
        Duration::from_secs(10),
        status(&b).await.filter.is_some_and(|f| f.version == v2)
    );
    redis.restore_data(&backup);
    // An unrelated write lands before the replicas read the store again (retried while Redis
    // comes back; through B, whose connections the restart broke too).
    poll!("an unrelated add succeeds", Duration::from_secs(10), {
        if add(&b, &n[2]).await.is_ok() {
            break;
        }
    });
    for (name, server) in [("A (the writer)", &a), ("B", &b)] {
        let seen = decide(server, &n[1..2], "").await;
        assert_eq!(
            seen[0].0,
            Outcome::Withhold,
            "{name} released the lost N2: {seen:?}"
        );
    }
    for server in [&a, &b] {
        eventually!(
            "both replicas report that the store went back in time",
            Duration::from_secs(10),
            !status(server).await.store_regressed.is_empty()
        );
        assert_eq!(
            decide(server, &n[1..2], "").await,
            vec![(Outcome::Withhold, Reason::StoreRegressed)]
        );
    }
    // The operator restores the lost change, then acknowledges: both serve again, N2 withheld.
    add(&a, &n[1]).await.expect("N2 re-added");
    a.admin_client()
        .await
        .acknowledge_store_regression(optout::api::proto::AcknowledgeStoreRegressionRequest {
            reason: "INC-27: restored from an older AOF; N2 re-added".into(),
        })
        .await
        .expect("acknowledged");
    for server in [&a, &b] {
        eventually!(
            "the replica serves again",
            Duration::from_secs(15),
            status(server).await.store_regressed.is_empty()
        );
        assert_eq!(
            decide(server, &n[..2], "").await,
            vec![WITHHELD, WITHHELD],
            "N1 and the re-added N2"
        );
    }
    a.stop().await;
    b.stop().await;
}

/// Found by the nemesis (one Redis): an import's clean-up unlinked a generation that was the
/// current one, emptying the list (every number of the type then read "no opt-out"). Here the
/// shape that needs no restore: the import's call is cut off while its swap waits (Redis paused
/// for writes), so the import looks abandoned and its staged generation is unlinked; but the swap
/// was sent first, lands when the pause ends, and the "abandoned" generation is the current one.
/// Scenario retried until the cut lands between the last write before the swap and the swap.
#[tokio::test]
async fn an_import_cut_off_while_its_swap_waits_does_not_unlink_the_list_it_swapped_in() {
    let (redis, _scratch, config) = common::initialised_redis().await;
    let server = TestServer::start_redis(config).await;
    let mut conn = redis.connection().await;
    // Numbers in the first buckets, so an import's comparison carries them over in its first
    // round trip and then only reads until its swap.
    let numbers: Vec<String> = valid_numbers(4_400_000_000, 200_000)
        .into_iter()
        .filter(|n| n.parse::<u64>().expect("digits") % 65_536 < 200)
        .take(20)
        .collect();
    assert_eq!(numbers.len(), 20);
    let merge = |deadline: Option<Duration>| {
        let (url, numbers) = (server.url.clone(), numbers.clone());
        async move {
            let channel = tonic::transport::Channel::from_shared(url)
                .expect("url")
                .connect()
                .await
                .expect("connect");
            let mut admin =
                optout::api::proto::opt_out_admin_client::OptOutAdminClient::new(channel);
            let mut message = common::import(&numbers, true);
            message.mode = optout::api::proto::ImportMode::Merge as i32;
            let mut request = tonic::Request::new(futures::stream::iter(vec![message]));
            if let Some(d) = deadline {
                request.set_timeout(d);
            }
            admin.import_opt_outs(request).await
        }
    };
    merge(None).await.expect("the first import");
    let mut hit = false;
    for _attempt in 0..6 {
        // Watches Redis execute commands (MONITOR) and pauses its writes right after the
        // comparison's first write (the carried records, after the lock was taken): the swap,
        // a few milliseconds of reads later, then waits. The generation written is the staged one.
        let watcher = {
            let port = redis.port;
            std::thread::spawn(move || pause_after_first_carry(port, "\"optout:d:1:"))
        };
        let cut = tokio::spawn(merge(Some(Duration::from_millis(1_500))));
        let staged = tokio::task::spawn_blocking(move || watcher.join())
            .await
            .expect("join")
            .expect("watcher");
        let outcome = cut.await.expect("task");
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        let current: String = conn.get("optout:gen:1").await.expect("gen:1");
        if outcome.is_err() && current == staged {
            hit = true;
            // The list swapped in must still hold every number, in the store and in checks.
            let held: i64 = redis::cmd("HLEN")
                .arg(format!(
                    "optout:d:1:{staged}:{}",
                    numbers[0].parse::<u64>().expect("digits") % 65_536
                ))
                .query_async(&mut conn)
                .await
                .expect("HLEN");
            assert!(held >= 1, "the current generation was unlinked");
            let got = decide(&server, &numbers, "").await;
            assert!(
                got.iter().all(|d| d.0 == Outcome::Withhold),
                "an opted-out number released after the clean-up: {got:?}"
            );
            break;
        }
    }
    assert!(
        hit,
        "the cut never landed between the comparison and the swap in 6 attempts"
    );
    server.stop().await;
}

/// On Redis at `port`: waits (MONITOR) for the lock of an import to be taken, then for the first
/// write to a key starting `prefix` (quoted, as MONITOR prints it: `"optout:d:1:`), pauses Redis's
/// writes for 3 s at once, and returns the generation of the key written.
fn pause_after_first_carry(port: u16, prefix: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut pauser = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut monitor = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    monitor.write_all(b"MONITOR\r\n").expect("MONITOR");
    monitor
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut lines = BufReader::new(monitor).lines();
    let mut locked = false;
    while let Some(Ok(line)) = lines.next() {
        if line.contains("\"SET\" \"optout:lock:1\"") {
            locked = true;
        } else if locked
            && line.contains("\"HSET\" ")
            && let Some((_, key)) = line.split_once(prefix)
        {
            pauser
                .write_all(b"CLIENT PAUSE 3000 WRITE\r\n")
                .expect("CLIENT PAUSE");
            return key.split(':').next().unwrap_or_default().to_string();
        }
    }
    panic!("no import took its lock and carried records within 10 s");
}

/// Issue 27, item 10: a filter snapshot in Redis carried a CRC, not a MAC, so anyone who can
/// write to Redis could publish an empty filter at the current version, which a cold replica
/// loaded and released everyone from. Snapshots are sealed with the audit key every replica
/// shares: a forged one is ignored and the cold replica scans.
#[tokio::test]
async fn a_forged_filter_snapshot_in_redis_is_not_loaded() {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut config = redis_config(&redis, "optout:", scratch.path());
    config.audit_key = Some(optout::core::AuditKey::new(&[7u8; 32]).expect("key"));
    init_redis(&config).await;
    let a = TestServer::start_redis(config.clone()).await;
    let n = valid_numbers(4_500_000_000, 3);
    let version = a
        .admin_client()
        .await
        .add_opt_outs(change_request(n.clone(), OptOutType::NationalDataOptOut))
        .await
        .expect("add")
        .into_inner()
        .version;
    let mut conn = redis.connection().await;
    poll!("A publishes a sealed snapshot", Duration::from_secs(10), {
        let v: Option<String> = conn.get("optout:snapshot_version").await.expect("get");
        if v.as_deref() == Some(version.as_str()) {
            break;
        }
    });
    a.stop().await;
    // From outside: an empty filter at the current version, in the store's own framing.
    let dataset: String = conn
        .hget("optout:marker", "dataset_id")
        .await
        .expect("marker");
    let empty = optout::core::OptOutFilter::new(10_000, 0.001, 1).expect("filter");
    let mut forged = dataset.into_bytes();
    forged.extend(empty.to_snapshot(optout::core::Version::parse(&version).expect("version")));
    let _: () = conn.set("optout:snapshot", forged).await.expect("forge");

    let cold = TestServer::start_redis(config).await;
    let f = status(&cold).await.filter.expect("filter");
    assert_eq!(f.loaded_from, "scan", "the forged snapshot was loaded");
    assert_eq!(
        decide(&cold, &n, "").await,
        vec![WITHHELD, WITHHELD, WITHHELD]
    );
    cold.stop().await;
}

/// Issue 27, item 3's server side: a store that lost its data (FLUSHALL) and was initialised
/// again is a new, empty dataset. Replicas that served the old one used to load it and release
/// everyone; since they prove the store's continuity, they find the history they saw gone and
/// fail closed until an admin acknowledges (having restored the lists). A replica started
/// afterwards has seen nothing and loads the new dataset.
#[tokio::test]
async fn a_store_initialised_again_after_it_lost_its_data_is_not_served_by_replicas_that_knew_it() {
    let (redis, _scratch, config) = common::initialised_redis().await;
    let server = TestServer::start_redis(config.clone()).await;
    let n = valid_numbers(4_310_000_000, 2);
    server
        .admin_client()
        .await
        .add_opt_outs(change_request(n.clone(), OptOutType::NationalDataOptOut))
        .await
        .expect("add");
    let mut c = redis.connection().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut c)
        .await
        .expect("flushall");
    init_redis(&config).await;
    let regressed = async |server: &TestServer| {
        server
            .admin_client()
            .await
            .get_status(GetStatusRequest {})
            .await
            .map(|r| r.into_inner().store_regressed)
            .unwrap_or_default()
    };
    eventually!(
        "the replica that knew the old dataset fails closed",
        Duration::from_secs(10),
        !regressed(&server).await.is_empty()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        decide(&server, &n, "").await,
        vec![
            (Outcome::Withhold, Reason::StoreRegressed),
            (Outcome::Withhold, Reason::StoreRegressed)
        ],
        "the opt-outs of the lost dataset are not released from the new, empty one"
    );
    // The admin restores the list, then acknowledges: served again, from the new dataset.
    let mut admin = server.admin_client().await;
    admin
        .add_opt_outs(change_request(n.clone(), OptOutType::NationalDataOptOut))
        .await
        .expect("restored through the failing-closed replica");
    admin
        .acknowledge_store_regression(optout::api::proto::AcknowledgeStoreRegressionRequest {
            reason: "INC-27: store flushed and re-initialised; list re-imported".into(),
        })
        .await
        .expect("acknowledged");
    eventually!(
        "served again",
        Duration::from_secs(15),
        regressed(&server).await.is_empty()
            && decide(&server, &n, "").await == vec![WITHHELD, WITHHELD]
    );
    server.stop().await;
}

/// Type 1 records written before practices were (`recorded_at,source_id`, no practices) belong to
/// the unknown practice: a practice's removal or REPLACE leaves them, `admin get` says "unknown",
/// and only a removal naming the unknown practice clears them.
#[tokio::test]
async fn type_1_records_from_before_practices_belong_to_the_unknown_practice() {
    let (redis, _scratch, config) = common::initialised_redis().await;
    let server = TestServer::start_redis(config).await;
    let n = valid_numbers(4_080_000_000, 2);
    let mut admin = server.admin_client().await;
    admin
        .add_opt_outs(change_request(n.clone(), OptOutType::Type1))
        .await
        .expect("add");
    // Rewrite both records as an older replica wrote them.
    let mut conn = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("optout:d:2:*")
        .query_async(&mut conn)
        .await
        .expect("keys");
    for k in &keys {
        let fields: std::collections::HashMap<String, String> =
            conn.hgetall(k).await.expect("hgetall");
        for (number, value) in fields {
            let legacy: Vec<&str> = value.splitn(3, ',').take(2).collect();
            let _: () = conn.hset(k, &number, legacy.join(",")).await.expect("hset");
        }
    }
    let practices = |r: optout::api::proto::GetOptOutResponse| r.opt_outs[0].practices.clone();
    let got = admin
        .get_opt_out(optout::api::proto::GetOptOutRequest {
            nhs_number: n[0].clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(practices(got), vec!["unknown".to_string()]);
    // A83007's removal and A83007's REPLACE leave them.
    let r = admin
        .remove_opt_outs(change_request(n[..1].to_vec(), OptOutType::Type1))
        .await
        .expect("remove")
        .into_inner();
    assert_eq!(r.applied, 0);
    let other = valid_numbers(4_090_000_000, 1);
    let r = admin
        .import_opt_outs(tokio_stream::iter(vec![ImportOptOutsRequest {
            r#type: OptOutType::Type1 as i32,
            practice: common::PRACTICE.into(),
            ..common::import(&other, true)
        }]))
        .await
        .expect("A83007's list")
        .into_inner();
    assert_eq!((r.added, r.removed), (1, 0));
    assert_eq!(status(&server).await.type_1_opt_outs, 3);
    // Adding a practice to a legacy record keeps the unknown practice beside it.
    let mut add_b = change_request(n[1..].to_vec(), OptOutType::Type1);
    add_b.practice = "B81001".into();
    admin.add_opt_outs(add_b).await.expect("add B");
    let got = admin
        .get_opt_out(optout::api::proto::GetOptOutRequest {
            nhs_number: n[1].clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(practices(got), vec!["unknown".to_string(), "B81001".into()]);
    // The unknown practice cannot be added to, only removed from.
    let mut unknown = change_request(n[..1].to_vec(), OptOutType::Type1);
    unknown.practice = "unknown".into();
    let e = admin
        .add_opt_outs(unknown.clone())
        .await
        .expect_err("adding to the unknown practice");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let r = admin
        .remove_opt_outs(unknown)
        .await
        .expect("remove unknown")
        .into_inner();
    assert_eq!(r.applied, 1);
    let mut unknown = change_request(n[1..].to_vec(), OptOutType::Type1);
    unknown.practice = "unknown".into();
    admin
        .remove_opt_outs(unknown)
        .await
        .expect("remove unknown");
    let mut req = check_request(n.clone(), RESEARCH);
    req.at_least_version = status(&server).await.version;
    assert_eq!(
        server.decide(req).await,
        vec![
            (Outcome::Release, Reason::NoOptOut),
            (Outcome::Withhold, Reason::Type1OptOut)
        ],
        "n0 held by no practice now; n1 still B81001's"
    );
    server.stop().await;
}
