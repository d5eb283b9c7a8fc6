//! Black-box tests: the real server on 127.0.0.1 port 0 over the embedded store, called through
//! the generated gRPC clients.

use crate::common;

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use crate::common::{
    FaultyStore, RedisServer, TestServer, change_request, check_request, init_redis, outcome,
    redis_config, test_config, valid_numbers,
};
use optout::{
    api::proto::{
        DataOrigin, GetOptOutRequest, GetStatusRequest, ImportMode, ImportOptOutsRequest,
        OptOutType, Outcome, Purpose, Reason,
    },
    server::open_embedded,
    store::ConsentStore,
};
use tokio_stream::StreamExt;
use tonic::Code;

const RESEARCH: Purpose = Purpose::Research;

async fn decisions(
    server: &TestServer,
    numbers: &[String],
    purpose: Purpose,
) -> Vec<(Outcome, Reason)> {
    let mut client = server.check_client().await;
    let r = client
        .check(check_request(numbers.to_vec(), purpose))
        .await
        .expect("check succeeds")
        .into_inner();
    assert_eq!(r.decisions.len(), numbers.len());
    r.decisions.iter().map(outcome).collect()
}

#[tokio::test]
async fn added_opt_out_is_withheld_and_removed_one_is_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(dir.path()).await;
    let n = valid_numbers(4_000_000_000, 3);
    assert_eq!(
        decisions(&server, &n, RESEARCH).await,
        vec![(Outcome::Release, Reason::NoOptOut); 3]
    );

    let mut admin = server.admin_client().await;
    let added = admin
        .add_opt_outs(change_request(
            vec![n[1].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add")
        .into_inner();
    assert_eq!(added.applied, 1);
    assert_eq!(
        decisions(&server, &n, RESEARCH).await,
        vec![
            (Outcome::Release, Reason::NoOptOut),
            (Outcome::Withhold, Reason::NationalDataOptOut),
            (Outcome::Release, Reason::NoOptOut),
        ]
    );

    let removed = admin
        .remove_opt_outs(change_request(
            vec![n[1].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("remove")
        .into_inner();
    assert_eq!(removed.applied, 1);
    assert!(
        removed.version > added.version,
        "{} > {}",
        removed.version,
        added.version
    );
    assert_eq!(
        decisions(&server, &n, RESEARCH).await,
        vec![(Outcome::Release, Reason::NoOptOut); 3]
    );
    server.stop().await;
}

#[tokio::test]
async fn opt_outs_survive_a_restart_on_the_same_data_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = valid_numbers(4_100_000_000, 2);
    let server = TestServer::start(dir.path()).await;
    let mut admin = server.admin_client().await;
    admin
        .add_opt_outs(change_request(vec![n[0].clone()], OptOutType::Type1))
        .await
        .expect("add");
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    assert_eq!(
        decisions(&server, &n, RESEARCH).await,
        vec![
            (Outcome::Withhold, Reason::Type1OptOut),
            (Outcome::Release, Reason::NoOptOut)
        ]
    );
    let got = server
        .admin_client()
        .await
        .get_opt_out(GetOptOutRequest {
            nhs_number: n[0].clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.opt_outs.len(), 1);
    assert_eq!(got.opt_outs[0].source, "test");
    assert_eq!(got.opt_outs[0].r#type, OptOutType::Type1 as i32);
    server.stop().await;
}

#[tokio::test]
async fn invalid_numbers_are_withheld_one_by_one_in_input_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(dir.path()).await;
    let numbers: Vec<String> = [
        "943 476 5919", // valid, spaced
        "987 654 4321", // wrong check digit
        "401-023-2137", // valid, dashed
        "123 456 7890", // check digit 10
        "000 000 0000", // placeholder
        "43476591",     // too short
        "9000000009",   // valid
        "310 497 1234", // CHI range, check digit right, but 31 April is no date of birth
        "150 668 0011", // CHI: born 15 June 1968
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let invalid = (Outcome::Withhold, Reason::InvalidNhsNumber);
    let release = (Outcome::Release, Reason::NoOptOut);
    assert_eq!(
        decisions(&server, &numbers, RESEARCH).await,
        vec![
            release, invalid, release, invalid, invalid, invalid, release, invalid, release
        ]
    );
    // Direct care does not make an invalid number valid.
    let direct = decisions(&server, &numbers, Purpose::DirectCare).await;
    assert_eq!(direct[1], invalid);
    assert_eq!(direct[0], (Outcome::Release, Reason::PurposeExempt));

    // The server decodes numbers as raw bytes (no String per number): bytes that are not UTF-8
    // are one invalid number, not a failed request, and the numbers around them are answered.
    let mut raw = check_request(Vec::new(), RESEARCH);
    raw.nhs_numbers = [&b"9434765919"[..], &b"943\xff765919"[..]]
        .into_iter()
        .collect();
    let mut client = server.check_client().await;
    let r = client
        .check(raw)
        .await
        .expect("check succeeds")
        .into_inner();
    let got: Vec<_> = r.decisions.iter().map(outcome).collect();
    assert_eq!(got, vec![release, invalid]);
    server.stop().await;
}

#[tokio::test]
async fn requests_without_purpose_or_numbers_or_over_the_limit_are_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.limits.max_batch = 100;
    let server = TestServer::start_with(config).await;
    let mut client = server.check_client().await;

    let err = client
        .check(check_request(
            valid_numbers(4_000_000_000, 1),
            Purpose::Unspecified,
        ))
        .await
        .expect_err("unspecified purpose");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("purpose"), "{}", err.message());

    let err = client
        .check(check_request(vec![], RESEARCH))
        .await
        .expect_err("empty batch");
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = client
        .check(check_request(valid_numbers(4_000_000_000, 101), RESEARCH))
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 100"), "{}", err.message());
    assert!(err.message().contains("CheckStream"), "{}", err.message());

    let mut bad_version = check_request(valid_numbers(4_000_000_000, 1), RESEARCH);
    bad_version.at_least_version = "yesterday".into();
    let err = client.check(bad_version).await.expect_err("bad version");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("at_least_version"),
        "{}",
        err.message()
    );
    server.stop().await;
}

#[tokio::test]
async fn direct_care_releases_opted_out_patients_as_exempt_and_origin_selects_types() {
    let dir = tempfile::tempdir().expect("tempdir");
    origin_selects_types(TestServer::start(dir.path()).await).await;
}

/// The same on Redis, whose lookup reads only the types the origin makes applicable.
#[tokio::test]
async fn origin_selects_types_on_redis_too() {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = redis_config(&redis, "optout:", scratch.path());
    init_redis(&config).await;
    origin_selects_types(TestServer::start_redis(config).await).await;
}

async fn origin_selects_types(server: TestServer) {
    let n = valid_numbers(4_200_000_000, 2);
    let mut admin = server.admin_client().await;
    admin
        .add_opt_outs(change_request(
            vec![n[0].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add national");
    admin
        .add_opt_outs(change_request(vec![n[1].clone()], OptOutType::Type1))
        .await
        .expect("add type 1");

    assert_eq!(
        decisions(&server, &n, Purpose::DirectCare).await,
        vec![(Outcome::Release, Reason::PurposeExempt); 2]
    );

    let mut client = server.check_client().await;
    let mut other = check_request(n.clone(), Purpose::Planning);
    other.origin = DataOrigin::Other as i32;
    let r = client.check(other).await.expect("check").into_inner();
    let got: Vec<_> = r.decisions.iter().map(outcome).collect();
    assert_eq!(
        got,
        vec![
            (Outcome::Withhold, Reason::NationalDataOptOut),
            (Outcome::Release, Reason::NoOptOut) // type 1 does not apply outside GP data
        ]
    );

    let mut gp = check_request(n.clone(), Purpose::Planning);
    gp.origin = DataOrigin::GpPractice as i32;
    let r = client.check(gp).await.expect("check").into_inner();
    let got: Vec<_> = r.decisions.iter().map(outcome).collect();
    assert_eq!(
        got,
        vec![
            (Outcome::Withhold, Reason::NationalDataOptOut),
            (Outcome::Withhold, Reason::Type1OptOut)
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn admin_change_with_an_invalid_number_writes_nothing_and_names_positions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(dir.path()).await;
    let mut admin = server.admin_client().await;
    let mut numbers = valid_numbers(4_300_000_000, 3);
    numbers.insert(1, "987 654 4321".into());
    numbers.push("12345".into());
    let err = admin
        .add_opt_outs(change_request(
            numbers.clone(),
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect_err("invalid number");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("positions 1 ("), "{}", err.message());
    assert!(err.message().contains("4 ("), "{}", err.message());
    assert!(
        !err.message().contains("9876544321"),
        "no numbers in errors"
    );

    let status = admin
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.national_data_opt_outs, 0);
    assert_eq!(status.version, "0-0");

    let err = admin
        .add_opt_outs(optout::api::proto::ChangeOptOutsRequest {
            nhs_numbers: valid_numbers(4_300_000_000, 1),
            r#type: OptOutType::Type1 as i32,
            source: "  ".into(),
            practice: common::PRACTICE.into(),
        })
        .await
        .expect_err("no source");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("source"), "{}", err.message());
    server.stop().await;
}

#[tokio::test]
async fn check_stream_of_a_million_numbers_answers_every_one_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(dir.path()).await;
    let all = valid_numbers(5_000_000_000, 1_000_000);
    // Plant every 1000th number as an opt-out: 1,000 of them.
    let planted: Vec<String> = all.iter().step_by(1000).cloned().collect();
    server
        .admin_client()
        .await
        .add_opt_outs(change_request(
            planted.clone(),
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("plant");

    let batches: Vec<_> = all
        .chunks(10_000)
        .map(|c| check_request(c.to_vec(), RESEARCH))
        .collect();
    let sent = batches.len();
    let mut client = server.check_client().await;
    let mut responses = client
        .check_stream(tokio_stream::iter(batches))
        .await
        .expect("stream opens")
        .into_inner();
    let (mut released, mut withheld, mut messages, mut position) = (0usize, 0usize, 0usize, 0usize);
    while let Some(r) = responses.next().await {
        let r = r.expect("stream message");
        assert_eq!(r.decisions.len(), 10_000);
        for d in &r.decisions {
            let expect_withheld = position % 1000 == 0;
            match outcome(d) {
                (Outcome::Withhold, Reason::NationalDataOptOut) if expect_withheld => withheld += 1,
                (Outcome::Release, Reason::NoOptOut) if !expect_withheld => released += 1,
                other => panic!("number {position}: unexpected {other:?}"),
            }
            position += 1;
        }
        messages += 1;
    }
    assert_eq!(messages, sent);
    assert_eq!(withheld, planted.len());
    assert_eq!(released + withheld, 1_000_000);
    server.stop().await;
}

fn import_message(numbers: Vec<String>, commit: bool) -> ImportOptOutsRequest {
    ImportOptOutsRequest {
        mode: ImportMode::Replace as i32,
        r#type: OptOutType::NationalDataOptOut as i32,
        source: "replace.csv".into(),
        nhs_numbers: numbers,
        commit,
        ..Default::default()
    }
}

#[tokio::test]
async fn replace_import_that_breaks_off_changes_nothing_and_a_committed_one_replaces() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(dir.path()).await;
    let old = valid_numbers(4_400_000_000, 5);
    let new = valid_numbers(4_500_000_000, 5);
    let mut admin = server.admin_client().await;
    admin
        .add_opt_outs(change_request(old.clone(), OptOutType::NationalDataOptOut))
        .await
        .expect("seed old set");
    let before = admin
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();

    // 1. The client sends part of a REPLACE import, then its connection dies.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut breaking = server.admin_client().await;
    let call = tokio::spawn(async move {
        breaking
            .import_opt_outs(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(import_message(new[..3].to_vec(), false))
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(200)).await;
    call.abort();
    drop(tx);
    let _ = call.await;

    // 2. A stream that ends cleanly but without the commit marker.
    let err = admin
        .import_opt_outs(tokio_stream::iter(vec![import_message(new.clone(), false)]))
        .await
        .expect_err("no commit");
    assert_eq!(err.code(), Code::Aborted);

    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = admin
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(after.version, before.version, "nothing was written");
    assert_eq!(after.national_data_opt_outs, 5);
    let mut both = old.clone();
    both.extend(new.iter().cloned());
    let got = decisions(&server, &both, RESEARCH).await;
    assert!(
        got[..5]
            .iter()
            .all(|d| *d == (Outcome::Withhold, Reason::NationalDataOptOut))
    );
    assert!(
        got[5..]
            .iter()
            .all(|d| *d == (Outcome::Release, Reason::NoOptOut))
    );

    // 3. The same import, committed, with an invalid number that is rejected and counted.
    let mut with_bad = new.clone();
    with_bad.insert(2, "987 654 4321".into());
    let r = admin
        .import_opt_outs(tokio_stream::iter(vec![
            import_message(with_bad[..3].to_vec(), false),
            import_message(with_bad[3..].to_vec(), true),
        ]))
        .await
        .expect("committed import")
        .into_inner();
    assert_eq!((r.received, r.added, r.removed, r.rejected), (6, 5, 5, 1));
    assert_eq!(r.rejected_positions, vec![2]);
    let got = decisions(&server, &both, RESEARCH).await;
    assert!(
        got[..5]
            .iter()
            .all(|d| *d == (Outcome::Release, Reason::NoOptOut))
    );
    assert!(
        got[5..]
            .iter()
            .all(|d| *d == (Outcome::Withhold, Reason::NationalDataOptOut))
    );
    server.stop().await;
}

#[tokio::test]
async fn a_store_that_cannot_answer_turns_maybes_into_withhold_within_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path());
    let inner: Arc<dyn ConsentStore> = Arc::new(open_embedded(&config).await.expect("store"));
    let faulty = FaultyStore::new(inner);
    let server = TestServer::start_on(faulty.store(), config).await;
    let n = valid_numbers(4_600_000_000, 2);
    server
        .admin_client()
        .await
        .add_opt_outs(change_request(
            vec![n[0].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add");

    // The store errors: the opted-out number is withheld as unavailable, the other released by
    // the filter without asking.
    faulty.lookup_down.store(true, Ordering::SeqCst);
    assert_eq!(
        decisions(&server, &n, RESEARCH).await,
        vec![
            (Outcome::Withhold, Reason::StoreUnavailable),
            (Outcome::Release, Reason::NoOptOut)
        ]
    );

    // The store hangs: the answer still comes within the client's deadline.
    faulty.lookup_down.store(false, Ordering::SeqCst);
    faulty.lookup_delay_ms.store(10_000, Ordering::SeqCst);
    let mut client = server.check_client().await;
    let mut request = tonic::Request::new(check_request(n.clone(), RESEARCH));
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let r = client
        .check(request)
        .await
        .expect("answered in time")
        .into_inner();
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        outcome(&r.decisions[0]),
        (Outcome::Withhold, Reason::StoreUnavailable)
    );
    assert_eq!(
        outcome(&r.decisions[1]),
        (Outcome::Release, Reason::NoOptOut)
    );
    faulty.lookup_delay_ms.store(0, Ordering::SeqCst);
    server.stop().await;
}

#[tokio::test]
async fn a_filter_that_cannot_prove_freshness_stops_trusting_its_absent_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.filter.freshness_bound = Duration::from_millis(1500);
    let inner: Arc<dyn ConsentStore> = Arc::new(open_embedded(&config).await.expect("store"));
    let faulty = FaultyStore::new(inner);
    let server = TestServer::start_on(faulty.store(), config).await;
    let n = valid_numbers(4_700_000_000, 2);

    // The change feed breaks: the filter no longer hears of new opt-outs.
    faulty.feed_down.store(true, Ordering::SeqCst);
    // Let a feed read already waiting inside the store (up to one heartbeat) finish first.
    tokio::time::sleep(Duration::from_millis(400)).await;
    // A short deadline, so the write does not spend the freshness bound waiting for the filter.
    let mut add = tonic::Request::new(change_request(
        vec![n[0].clone()],
        OptOutType::NationalDataOptOut,
    ));
    add.set_timeout(Duration::from_millis(200));
    let added = server
        .admin_client()
        .await
        .add_opt_outs(add)
        .await
        .expect("the write itself succeeds")
        .into_inner();

    // With the writer's version: the filter is behind it, so the store answers, at once (the
    // filter is still within its freshness bound here, so this is the version rule at work).
    let mut client = server.check_client().await;
    let mut with_version = check_request(n.clone(), RESEARCH);
    with_version.at_least_version = added.version.clone();
    let mut with_version = tonic::Request::new(with_version);
    with_version.set_timeout(Duration::from_millis(200));
    let r = client
        .check(with_version)
        .await
        .expect("check")
        .into_inner();
    assert_eq!(
        outcome(&r.decisions[0]),
        (Outcome::Withhold, Reason::NationalDataOptOut)
    );
    assert_eq!(
        outcome(&r.decisions[1]),
        (Outcome::Release, Reason::NoOptOut)
    );
    assert!(r.version >= added.version);

    // Without it, once the bound has passed: every number goes to the store.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let status = server
        .admin_client()
        .await
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(!status.filter.expect("filter status").fresh);
    assert_eq!(
        decisions(&server, &n, RESEARCH).await,
        vec![
            (Outcome::Withhold, Reason::NationalDataOptOut),
            (Outcome::Release, Reason::NoOptOut)
        ]
    );
    // And if the store cannot answer either, nothing is released.
    faulty.lookup_down.store(true, Ordering::SeqCst);
    assert_eq!(
        decisions(&server, &n, RESEARCH).await,
        vec![(Outcome::Withhold, Reason::StoreUnavailable); 2]
    );

    // The feed comes back: the filter catches up and is trusted again.
    faulty.lookup_down.store(false, Ordering::SeqCst);
    faulty.feed_down.store(false, Ordering::SeqCst);
    eventually!(
        "filter caught up after the feed returned",
        Duration::from_secs(5),
        {
            let s = server
                .admin_client()
                .await
                .get_status(GetStatusRequest {})
                .await
                .expect("status")
                .into_inner();
            let f = s.filter.expect("filter");
            f.fresh && f.version == added.version
        }
    );
    server.stop().await;
}

#[tokio::test]
async fn status_reports_counts_filter_and_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(dir.path()).await;
    let mut admin = server.admin_client().await;
    let n = valid_numbers(4_800_000_000, 4);
    admin
        .add_opt_outs(change_request(n.clone(), OptOutType::NationalDataOptOut))
        .await
        .expect("add");
    admin
        .add_opt_outs(change_request(n[..2].to_vec(), OptOutType::Type1))
        .await
        .expect("add");
    let s = admin
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        (s.national_data_opt_outs, s.type_1_opt_outs, s.patients),
        (4, 2, 4)
    );
    assert_eq!(s.store_kind, "embedded");
    assert_eq!(s.dataset_id.len(), 32);
    let f = s.filter.expect("filter");
    assert_eq!(f.items, 4);
    assert!(f.bits > 0 && f.hash_functions > 0);
    assert!((f.target_false_positive_rate - 0.001).abs() < 1e-12);
    assert!(f.fresh);
    assert_eq!(f.version, s.version);
    assert_eq!(server.health().await, 1, "SERVING");
    server.stop().await;
}

#[tokio::test]
async fn the_filter_is_rebuilt_larger_when_outgrown_and_keeps_every_opt_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.filter.capacity = 1024; // the minimum
    let server = TestServer::start_with(config).await;
    let mut admin = server.admin_client().await;
    let planted = valid_numbers(4_900_000_000, 5000);
    for chunk in planted.chunks(1000) {
        admin
            .add_opt_outs(change_request(
                chunk.to_vec(),
                OptOutType::NationalDataOptOut,
            ))
            .await
            .expect("add");
    }
    let f = poll!(
        "a larger generation was swapped in",
        Duration::from_secs(10),
        {
            let f = admin
                .get_status(GetStatusRequest {})
                .await
                .expect("status")
                .into_inner()
                .filter
                .expect("filter");
            if f.capacity >= 5000 && f.generation > 1 {
                break f;
            }
        }
    );
    assert!(f.estimated_false_positive_rate < 0.002, "{f:?}");
    let got = decisions(&server, &planted, RESEARCH).await;
    assert!(
        got.iter()
            .all(|d| *d == (Outcome::Withhold, Reason::NationalDataOptOut))
    );
    server.stop().await;
}
