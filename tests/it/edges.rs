//! Holding the one rule at the edges: a Redis that loses or reorders acknowledged writes, stored
//! data that does not parse, and callers who push on the limits. Each test names the rule it pins,
//! and runs against real redis-server processes (or the real embedded store) and the real server.

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use crate::common::*;
use optout::{
    api::proto::{self, Outcome, Reason},
    core::OptOutFilter,
    store::{ChangeFeed, Writes, redis::RedisStore},
};

type Answer = Vec<(Outcome, Reason)>;

async fn check_at(server: &TestServer, numbers: &[String], at_least: &str) -> Answer {
    let mut client = server.check_client().await;
    let mut req = check_request(numbers.to_vec(), proto::Purpose::Research);
    req.at_least_version = at_least.to_string();
    let r = client.check(req).await.expect("check").into_inner();
    r.decisions.iter().map(outcome).collect()
}

async fn add(server: &TestServer, numbers: &[String]) -> String {
    server
        .admin_client()
        .await
        .add_opt_outs(change_request(
            numbers.to_vec(),
            proto::OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add")
        .into_inner()
        .version
}

async fn wait_health(server: &TestServer, want: i32, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if server.health().await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// A Redis that keeps RDB snapshots only (the test takes them with SAVE): a crash loses every
/// write since the last one. The service is told to trust it (`assume_durable`), as an operator
/// of a managed Redis could, so that the loss itself can be shown.
fn rdb_only_redis(scratch: &std::path::Path) -> (RedisServer, optout::server::ServerConfig) {
    let redis = RedisServer::start_with(vec!["--appendonly".into(), "no".into()]);
    let mut config = redis_config(&redis, "edges:", scratch);
    if let Some(r) = config.redis_mut() {
        r.assume_durable = true;
    }
    (redis, config)
}

#[tokio::test]
async fn a_redis_that_could_lose_acknowledged_changes_is_refused() {
    for (aof, fsync) in [("no", "always"), ("yes", "everysec")] {
        let scratch = tempfile::tempdir().expect("tempdir");
        let redis = RedisServer::start_with(vec![
            "--appendonly".into(),
            aof.into(),
            "--appendfsync".into(),
            fsync.into(),
        ]);
        let config = redis_config(&redis, "edges:", scratch.path());
        let store = RedisStore::connect(config.redis().expect("redis")).expect("connect");
        let refused = store
            .init(64)
            .await
            .expect_err("init-store refuses a Redis that can lose writes");
        let text = refused.to_string();
        assert!(
            text.contains("appendfsync always") && text.contains("--redis-replicas-ack"),
            "the refusal says what to set: {text}"
        );
        // Initialised behind the check's back, serve still refuses it: NOT_SERVING.
        let mut trusting = config.clone();
        if let Some(r) = trusting.redis_mut() {
            r.assume_durable = true;
        }
        init_redis(&trusting).await;
        let server = TestServer::start_unready(
            Arc::new(RedisStore::connect(config.redis().expect("redis")).expect("connect")),
            config,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            server.health().await,
            NOT_SERVING,
            "appendonly {aof}, {fsync}"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn replica_fails_closed_when_redis_loses_acknowledged_writes() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let (mut redis, config) = rdb_only_redis(scratch.path());
    init_redis(&config).await;
    let server = TestServer::start_redis(config).await;
    let n = valid_numbers(4_010_000_000, 3);
    let (kept, lost, never) = (&n[0], &n[1], &n[2]);
    add(&server, std::slice::from_ref(kept)).await;
    redis.save().await;
    let v = add(&server, std::slice::from_ref(lost)).await;
    assert_eq!(
        check_at(&server, std::slice::from_ref(lost), &v).await[0].0,
        Outcome::Withhold
    );

    // Redis crashes and comes back from the older snapshot: the marker is there, `lost` is not.
    redis.restart();
    assert!(
        wait_health(&server, NOT_SERVING, Duration::from_secs(10)).await,
        "the replica fails closed when the store went back in time"
    );
    let answer = check_at(&server, &n, "").await;
    assert!(
        answer
            .iter()
            .all(|a| *a == (Outcome::Withhold, Reason::StoreRegressed)),
        "every number withheld as STORE_REGRESSED: {answer:?}"
    );
    // It stays so: no silent rebuild.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(server.health().await, NOT_SERVING);
    let status = server
        .admin_client()
        .await
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(!status.store_regressed.is_empty(), "status says why");

    // The operator restores the lost change, then acknowledges, with a reason.
    let mut admin = server.admin_client().await;
    admin
        .add_opt_outs(change_request(
            vec![lost.clone()],
            proto::OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("restore the lost change");
    let refused = admin
        .acknowledge_store_regression(proto::AcknowledgeStoreRegressionRequest {
            reason: String::new(),
        })
        .await
        .expect_err("a reason is required");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    admin
        .acknowledge_store_regression(proto::AcknowledgeStoreRegressionRequest {
            reason: "INC-42: restored from the admin log".into(),
        })
        .await
        .expect("acknowledge");
    assert!(
        wait_health(&server, SERVING, Duration::from_secs(10)).await,
        "serving again once acknowledged"
    );
    let answer = check_at(&server, &n, "").await;
    assert_eq!(answer[0].0, Outcome::Withhold, "{kept} withheld");
    assert_eq!(answer[1].0, Outcome::Withhold, "{lost} withheld");
    assert_eq!(answer[2], (Outcome::Release, Reason::NoOptOut), "{never}");
    let audit = admin
        .read_audit(proto::ReadAuditRequest {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("audit")
        .into_inner();
    assert!(
        audit
            .records
            .iter()
            .any(|e| e.action == "acknowledge-regression"
                && e.source.contains("INC-42")
                && e.organisation == "anonymous"),
        "the acknowledgement is in the audit with who and why"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_store_answer_older_than_the_filter_is_withheld() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let (mut redis, config) = rdb_only_redis(scratch.path());
    init_redis(&config).await;
    let faulty = FaultyStore::new(Arc::new(
        RedisStore::connect(config.redis().expect("redis")).expect("connect"),
    ));
    let server = TestServer::start_on(faulty.store(), config).await;
    let n = valid_numbers(4_020_000_000, 2);
    add(&server, &n[..1]).await;
    redis.save().await;
    add(&server, &n[1..]).await;
    // The follower cannot see what happens next; only the check path can notice.
    faulty.feed_down.store(true, Ordering::SeqCst);
    redis.restart();
    // The check connection reconnects on its first use after the restart.
    let mut admin = server.admin_client().await;
    for _ in 0..50 {
        if admin
            .get_opt_out(proto::GetOptOutRequest {
                nhs_number: n[0].clone(),
            })
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = check_at(&server, &n[1..], "").await;
    assert_eq!(
        answer[0].0,
        Outcome::Withhold,
        "a store answer from before the filter's version proves nothing: {answer:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_unreadable_filter_snapshot_is_never_used() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start();
    let config = redis_config(&redis, "edges:", scratch.path());
    let dataset = init_redis(&config).await;
    let store = RedisStore::connect(config.redis().expect("redis")).expect("connect");
    store.open_dataset().await.expect("open");
    let n = valid_numbers(4_030_000_000, 1);
    let opted = optout::core::NhsNumber::parse(&n[0]).expect("valid");
    let audit = optout::core::AuditRecord::default();
    let written = store
        .change(
            optout::store::ChangeKind::Add,
            optout::core::OptOutType::NationalDataOptOut,
            None,
            &[opted],
            "test",
            &audit,
        )
        .await
        .expect("add");
    // A snapshot at the store's version whose bit array is empty, with a valid checksum.
    let good = OptOutFilter::new(1000, 0.001, 1)
        .expect("filter")
        .to_snapshot(written.version);
    let header = 4 + 1 + 8 * 6;
    let mut body = good[..header + 45].to_vec();
    body[header + 1..header + 9].copy_from_slice(&0u64.to_le_bytes());
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    assert!(OptOutFilter::from_snapshot(&body).is_err());
    let mut value = dataset.into_bytes();
    value.extend_from_slice(&body);
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("SET")
        .arg("edges:snapshot")
        .arg(value)
        .query_async(&mut conn)
        .await
        .expect("plant the snapshot");
    let _: () = redis::cmd("SET")
        .arg("edges:snapshot_version")
        .arg(written.version.to_string())
        .query_async(&mut conn)
        .await
        .expect("plant its version");

    let server = TestServer::start_redis(config).await;
    let answer = check_at(&server, &n, "").await;
    assert_eq!(
        answer[0],
        (Outcome::Withhold, Reason::NationalDataOptOut),
        "built from a scan, not from the broken snapshot"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_corrupt_embedded_record_is_withheld() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = valid_numbers(4_040_000_000, 1);
    let server = TestServer::start(dir.path()).await;
    add(&server, &n).await;
    server.stop().await;
    {
        // A store call cut off by the stop may still finish on tokio's blocking pool (it cannot
        // be cancelled) and hold the database for a moment.
        let path = optout::store::embedded::EmbeddedStore::db_path(dir.path());
        let db = poll!(
            "the stopped server lets go of the database",
            Duration::from_secs(10),
            {
                match redb::Database::open(&path) {
                    Ok(db) => break db,
                    Err(redb::DatabaseError::DatabaseAlreadyOpen) => {}
                    Err(e) => panic!("open the database: {e}"),
                }
            }
        );
        let txn = db.begin_write().expect("write");
        {
            let mut table = txn
                .open_table(redb::TableDefinition::<u64, &[u8]>::new("optouts"))
                .expect("optouts");
            // One record of an opt-out type code this build does not know.
            let corrupt = [9u8; 13];
            table
                .insert(n[0].parse::<u64>().expect("digits"), corrupt.as_slice())
                .expect("insert");
        }
        txn.commit().expect("commit");
    }
    let server = TestServer::start(dir.path()).await;
    let answer = check_at(&server, &n, "").await;
    assert_eq!(
        answer[0].0,
        Outcome::Withhold,
        "a record that does not parse is never 'no opt-out': {answer:?}"
    );
    server.stop().await;
}

fn hexists_calls(info: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_hexists:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_far_future_version_is_withheld_without_asking_the_store() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start();
    let config = redis_config(&redis, "edges:", scratch.path());
    init_redis(&config).await;
    let server = TestServer::start_redis(config).await;
    let mut conn = redis.connection().await;
    let before: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO");
    let numbers = valid_numbers(4_050_000_000, 10_000);
    let started = std::time::Instant::now();
    let answer = check_at(&server, &numbers, "99999999999999-0").await;
    let took = started.elapsed();
    assert!(
        answer
            .iter()
            .all(|a| *a == (Outcome::Withhold, Reason::VersionNotReached)),
        "every number withheld as VERSION_NOT_REACHED"
    );
    let after: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO");
    let lookups = hexists_calls(&after) - hexists_calls(&before);
    assert!(
        lookups < 100,
        "a version nobody was given costs no per-number lookups: {lookups} HEXISTS in {took:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn redis_passwords_never_reach_logs_or_help() {
    use optout::store::redis::{RedisConfig, SentinelConfig, Topology};
    let mut config = RedisConfig::new("redis://:s3cret@127.0.0.1:1");
    assert!(
        !config.describe().contains("s3cret"),
        "{}",
        config.describe()
    );
    config.node_url = Some("redis://:s3cret@127.0.0.1:1".into());
    config.topology = Topology::Sentinel(SentinelConfig {
        addrs: vec!["redis://:s3cret@127.0.0.1:2".into(), "127.0.0.1:3".into()],
        master_name: "mymaster".into(),
    });
    assert!(
        !config.describe().contains("s3cret"),
        "{}",
        config.describe()
    );
    config.topology = Topology::Cluster(vec!["redis://:s3cret@127.0.0.1:4".into()]);
    assert!(
        !config.describe().contains("s3cret"),
        "{}",
        config.describe()
    );

    for var in [
        "OPTOUT_REDIS_URL",
        "OPTOUT_REDIS_SENTINEL",
        "OPTOUT_REDIS_CLUSTER",
    ] {
        let help = std::process::Command::new(env!("CARGO_BIN_EXE_optout"))
            .args(["serve", "--help"])
            .env(var, "redis://:s3cret@127.0.0.1:6379")
            .output()
            .expect("optout serve --help");
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(text.contains(var), "help names {var}");
        assert!(!text.contains("s3cret"), "help hides the value of {var}");
    }
}

#[tokio::test]
async fn labels_are_bounded_and_never_carry_an_nhs_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(dir.path()).await;
    let mut client = server.check_client().await;
    let numbers = valid_numbers(4_080_000_000, 1);
    for (extract_id, ok) in [
        ("study-17 2026-11-29T12:00:00Z".to_string(), true),
        ("x".repeat(129), false),
        ("study for 943 476 5919".to_string(), false),
        ("ref9434765919".to_string(), false),
        ("line\nbreak".to_string(), false),
    ] {
        let mut req = check_request(numbers.clone(), proto::Purpose::Research);
        req.extract_id = extract_id.clone();
        match client.check(req).await {
            Ok(_) => assert!(ok, "{extract_id:?} is refused"),
            Err(e) => {
                assert!(!ok, "{extract_id:?} is accepted: {e:?}");
                assert_eq!(e.code(), tonic::Code::InvalidArgument);
                assert!(e.message().contains("extract_id"), "{}", e.message());
            }
        }
    }
    let mut request = change_request(numbers, proto::OptOutType::NationalDataOptOut);
    request.source = "ticket about 9434765919".into();
    let e = server
        .admin_client()
        .await
        .add_opt_outs(request)
        .await
        .expect_err("a source with an NHS number");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn the_audit_queue_is_bounded_by_bytes_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    // Far longer than the test: only the byte bound can stop releases here.
    config.audit_bound = Duration::from_secs(120);
    config.audit_queue_bytes = 4 * 1024 * 1024;
    let faulty = FaultyStore::new(Arc::new(
        optout::server::open_embedded(&config)
            .await
            .expect("embedded store"),
    ));
    let server = TestServer::start_on(faulty.store(), config).await;
    let mut client = server.check_client().await;
    let numbers = valid_numbers(4_090_000_000, 10_000);
    let releases = |answer: &Answer| answer.iter().all(|a| a.0 == Outcome::Release);
    faulty.audit_down.store(true, Ordering::SeqCst);
    // 10,000 released numbers hold about 80 KB each until written: 4 MiB is about 50 checks.
    let mut released_while_down = 0;
    for _ in 0..120 {
        let r = client
            .check(check_request(numbers.clone(), proto::Purpose::Research))
            .await
            .expect("check")
            .into_inner();
        let answer: Answer = r.decisions.iter().map(outcome).collect();
        if releases(&answer) {
            released_while_down += 1;
        }
    }
    assert!(
        (40..=60).contains(&released_while_down),
        "releases stop once 4 MiB of records wait: {released_while_down} of 120 released"
    );
    // The store takes records again: the queue drains and checks release again.
    faulty.audit_down.store(false, Ordering::SeqCst);
    eventually!("checks release again", Duration::from_secs(10), {
        let r = client
            .check(check_request(numbers.clone(), proto::Purpose::Research))
            .await
            .expect("check")
            .into_inner();
        releases(&r.decisions.iter().map(outcome).collect())
    });
    server.stop().await;
}

#[tokio::test]
async fn an_audit_batch_the_store_refuses_never_wedges_the_checks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.audit_bound = Duration::from_millis(500);
    let faulty = FaultyStore::new(Arc::new(
        optout::server::open_embedded(&config)
            .await
            .expect("embedded store"),
    ));
    // The store takes records one at a time only: every batch of several fails as a whole.
    faulty.audit_max_records.store(1, Ordering::SeqCst);
    let server = TestServer::start_on(faulty.store(), config).await;
    let mut client = server.check_client().await;
    let numbers = valid_numbers(4_095_000_000, 10);
    for i in 0..30 {
        let mut req = check_request(numbers.clone(), proto::Purpose::Research);
        req.extract_id = format!("burst-{i}");
        client.check(req).await.expect("check");
    }
    // Every record gets written (the failing batches are split), so checks release again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let written = server
            .admin_client()
            .await
            .read_audit(proto::ReadAuditRequest {
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_inner()
            .records
            .iter()
            .filter(|r| r.extract_id.starts_with("burst-"))
            .count();
        let answer = check_at(&server, &numbers, "").await;
        if written == 30 && answer.iter().all(|a| a.0 == Outcome::Release) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "wedged: {written} of 30 records written, answer {:?}",
            answer[0]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.stop().await;
}

/// A replica that has read an import too big to list in the change log knows its filter lacks
/// that import's opt-outs until it is rebuilt from the store: it stops trusting the filter at
/// once (checks ask the store), rather than answering from it until the freshness bound runs out.
#[tokio::test]
async fn a_filter_known_to_lack_an_import_is_not_trusted_while_it_is_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    // Long enough that within this test only knowing, not ageing, can end the trust.
    config.filter.freshness_bound = Duration::from_secs(60);
    let embedded = optout::server::open_embedded(&config)
        .await
        .expect("embedded store");
    let faulty = FaultyStore::new(Arc::new(embedded));
    let server = TestServer::start_on(faulty.store(), config).await;
    let numbers = valid_numbers(4_600_000_000, optout::store::LOG_LIST_MAX + 1);
    // The rebuild the import calls for (a scan, or a snapshot and the log after it) is slow.
    faulty.rebuild_delay_ms.store(5_000, Ordering::SeqCst);
    let r = server
        .admin_client()
        .await
        .import_opt_outs(tokio_stream::iter(import_in_chunks(&numbers, 2_000)))
        .await
        .expect("import")
        .into_inner();
    assert_eq!(r.added, numbers.len() as u64);
    // The follower reads the import's log entry within its heartbeat (250 ms) and starts the
    // rebuild, which takes 5 s.
    tokio::time::sleep(Duration::from_millis(750)).await;
    let answer = check_at(&server, &numbers[..3], "").await;
    assert!(
        answer
            .iter()
            .all(|a| *a == (Outcome::Withhold, Reason::NationalDataOptOut)),
        "opt-outs of an import the filter is known to lack were answered from it: {answer:?}"
    );
    faulty.rebuild_delay_ms.store(0, Ordering::SeqCst);
    server.stop().await;
}
