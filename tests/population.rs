//! Population mode and list age (issue 18): a store fed by national check round trips knows
//! "no opt-out" only for the population it checked, and a list past its maximum age proves
//! nothing. Against the real server, the `optout` binary, the embedded store and a real Redis.

#[macro_use]
mod common;

use std::time::Duration;

use common::{
    RedisServer, TestServer, check_request, optout, outcome, redis_config, text, valid_numbers,
};
use optout::{
    api::proto::{self, ImportMode, ImportOptOutsRequest, OptOutType, Outcome, Purpose, Reason},
    core::coverage::CoverageMode,
};

/// The national check's file format: a number and a comma a line.
fn dat(numbers: &[String]) -> String {
    numbers.iter().map(|n| format!("{n},\r\n")).collect()
}

async fn decisions(
    server: &TestServer,
    numbers: &[String],
    purpose: Purpose,
) -> Vec<(Outcome, Reason)> {
    server
        .check_client()
        .await
        .check(check_request(numbers.to_vec(), purpose))
        .await
        .expect("check")
        .into_inner()
        .decisions
        .iter()
        .map(outcome)
        .collect()
}

const NATIONAL: (Outcome, Reason) = (Outcome::Withhold, Reason::NationalDataOptOut);
const RELEASED: (Outcome, Reason) = (Outcome::Release, Reason::NoOptOut);
const OUTSIDE: (Outcome, Reason) = (Outcome::Withhold, Reason::NotInCheckedPopulation);
const TOO_OLD: (Outcome, Reason) = (Outcome::Withhold, Reason::ListTooOld);

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// A round trip as gRPC messages: the population in two messages, the opt-outs with them.
fn round_trip(
    sent: &[String],
    opted_out: &[String],
    checked_at_ms: i64,
) -> Vec<ImportOptOutsRequest> {
    let half = sent.len() / 2;
    let opt_outs_in = |part: &[String]| -> Vec<String> {
        part.iter()
            .filter(|n| opted_out.contains(n))
            .cloned()
            .collect()
    };
    vec![
        ImportOptOutsRequest {
            mode: ImportMode::Replace as i32,
            r#type: OptOutType::NationalDataOptOut as i32,
            source: "national check".into(),
            national_checked_at_unix_ms: checked_at_ms,
            population: sent[..half].to_vec(),
            nhs_numbers: opt_outs_in(&sent[..half]),
            ..Default::default()
        },
        ImportOptOutsRequest {
            population: sent[half..].to_vec(),
            nhs_numbers: opt_outs_in(&sent[half..]),
            commit: true,
            ..Default::default()
        },
    ]
}

#[tokio::test]
async fn a_national_check_round_trip_is_imported_and_numbers_outside_its_population_are_withheld() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf8").to_string();
    let init = optout(
        [
            "init-store",
            "--data-dir",
            &data_arg,
            "--national-coverage",
            "population",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert!(init.status.success(), "stderr: {}", text(&init.stderr));
    assert!(text(&init.stdout).contains("national coverage population"));
    let again = optout(
        ["init-store", "--data-dir", &data_arg]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert!(!again.status.success(), "a store is initialised once");

    let server = TestServer::start(&data).await;
    let n = valid_numbers(4_100_000_000, 12);
    let (sent, outside) = (&n[..10], &n[10..]);

    // Nothing checked yet: nobody is known to have no opt-out.
    assert_eq!(
        decisions(&server, &n[..1], Purpose::Research).await,
        vec![OUTSIDE]
    );

    let write = |name: &str, body: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).expect("write");
        p.to_str().expect("utf8").to_string()
    };
    let sent_file = write("sent.dat", dat(sent));
    let import = |returned: String, extra: &[&str]| {
        let mut a: Vec<String> = [
            "admin",
            "--server",
            &server.url,
            "import",
            "--type",
            "national",
            "--from-national-check",
            &sent_file,
            &returned,
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        optout(a)
    };

    // A reply naming a number that was not sent: not one round trip.
    let mut foreign = sent[3..].to_vec();
    foreign.push(outside[0].clone());
    let out = import(write("foreign.dat", dat(&foreign)), &[]).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("line 8") && err.contains("not in the file sent"),
        "{err}"
    );
    // The national service's error reply.
    let out = import(
        write(
            "error.dat",
            "The file contains one or more invalid NHS Numbers\r\n".into(),
        ),
        &[],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("error reply"),
        "{}",
        text(&out.stderr)
    );
    // An empty reply while the file sent was not.
    let out = import(write("empty.dat", String::new()), &[]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("reply is empty"),
        "{}",
        text(&out.stderr)
    );
    // A plain list REPLACE would say nothing about who was checked: refused in population mode.
    let list = write("list.txt", sent.join("\n"));
    let out = optout(
        [
            "admin",
            "--server",
            &server.url,
            "import",
            "--type",
            "national",
            "--mode",
            "replace",
            &list,
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("population mode"),
        "{}",
        text(&out.stderr)
    );
    let status = server.status().await;
    assert_eq!(status.national_data_opt_outs, 0, "nothing was imported");

    // The round trip: the first three sent did not come back, so they opted out.
    let returned = write("returned.dat", dat(&sent[3..]));
    let checked_at = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    let out = import(returned, &["--checked-at", &checked_at.to_string()]).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout)
            .contains("national check of 10 patients (3 with a national data opt-out)"),
        "{}",
        text(&out.stdout)
    );
    poll!("the import is answered", Duration::from_secs(10), {
        if decisions(&server, &sent[..1], Purpose::Research).await == vec![NATIONAL] {
            break;
        }
    });
    let all = decisions(&server, &n, Purpose::Research).await;
    let mut want = vec![NATIONAL; 3];
    want.extend([RELEASED; 7]);
    want.extend([OUTSIDE; 2]);
    assert_eq!(all, want);
    // Direct care is exempt from opt-outs, so the population does not matter to it.
    assert!(
        decisions(&server, outside, Purpose::DirectCare)
            .await
            .iter()
            .all(|d| d.0 == Outcome::Release)
    );

    // Status shows the mode, the population and the check's date.
    let out = optout(
        ["admin", "--server", &server.url, "status"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let shown = text(&out.stdout);
    assert!(
        shown.contains("population mode, population 10")
            && shown.contains(&format!(
                "as of {}",
                jiff::Timestamp::from_millisecond(checked_at.as_millisecond()).expect("ms")
            )),
        "{shown}"
    );
    // The import's record carries the population and the date.
    let audit = server
        .admin_client()
        .await
        .read_audit(proto::ReadAuditRequest::default())
        .await
        .expect("audit")
        .into_inner();
    let record = audit
        .records
        .iter()
        .find(|r| r.action == "import-replace")
        .expect("the import is audited");
    assert_eq!(
        (record.population, record.checked_at_unix_ms),
        (10, checked_at.as_millisecond())
    );
    server.stop().await;
}

#[tokio::test]
async fn a_list_past_its_maximum_age_is_withheld_until_a_fresh_check_is_imported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = optout::store::embedded::EmbeddedConfig {
        data_dir: data.clone(),
        change_log_len: 100,
        cache_bytes: optout::store::embedded::DEFAULT_CACHE_BYTES,
    };
    drop(
        optout::store::embedded::EmbeddedStore::init(&config, CoverageMode::Population)
            .expect("init"),
    );
    let mut c = common::test_config(&data);
    c.max_list_age.national = Some(Duration::from_secs(86_400));
    let server = TestServer::start_with(c).await;
    let n = valid_numbers(4_200_000_000, 4);

    // Never imported, and a maximum age is set: too old already.
    assert_eq!(
        decisions(&server, &n[..1], Purpose::Research).await,
        vec![TOO_OLD]
    );
    // A check made two days ago: imported, and past its age at once.
    let admin = || async { server.admin_client().await };
    admin()
        .await
        .import_opt_outs(tokio_stream::iter(round_trip(
            &n,
            &n[..1],
            now_ms() - 2 * 86_400_000,
        )))
        .await
        .expect("import");
    poll!("the old list is in force", Duration::from_secs(10), {
        let s = server.status().await;
        if s.national_data_opt_outs == 1 && s.lists.first().is_some_and(|l| l.population == 4) {
            assert!(s.lists[0].expired, "{:?}", s.lists[0]);
            break;
        }
    });
    assert_eq!(
        decisions(&server, &n, Purpose::Research).await,
        vec![NATIONAL, TOO_OLD, TOO_OLD, TOO_OLD],
        "an opt-out still withholds as one; the rest cannot be released"
    );
    // Health says so (without taking the replica out of traffic).
    poll!("health shows the expired list", Duration::from_secs(15), {
        if health_of(&server, "lists").await == proto_health::NOT_SERVING {
            break;
        }
    });
    assert_eq!(server.health().await, proto_health::SERVING);

    // A fresh check recovers.
    admin()
        .await
        .import_opt_outs(tokio_stream::iter(round_trip(
            &n,
            &n[..1],
            now_ms() - 60_000,
        )))
        .await
        .expect("import");
    poll!("the fresh list is in force", Duration::from_secs(10), {
        if decisions(&server, &n, Purpose::Research).await
            == vec![NATIONAL, RELEASED, RELEASED, RELEASED]
        {
            break;
        }
    });
    poll!("health recovers", Duration::from_secs(15), {
        if health_of(&server, "lists").await == proto_health::SERVING {
            break;
        }
    });
    server.stop().await;
}

mod proto_health {
    pub const SERVING: i32 = 1;
    pub const NOT_SERVING: i32 = 2;
}

async fn health_of(server: &TestServer, service: &str) -> i32 {
    let mut client = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

#[tokio::test]
async fn population_mode_on_redis_is_shared_by_every_replica_and_bad_round_trips_are_refused() {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = redis_config(&redis, "optout:", scratch.path());
    optout::store::redis::RedisStore::connect(config.redis().expect("redis"))
        .expect("connect")
        .init_with(64, CoverageMode::Population)
        .await
        .expect("init");
    let a = TestServer::start_redis(config.clone()).await;
    let b = TestServer::start_redis(config.clone()).await;
    let n = valid_numbers(4_300_000_000, 8);
    let (sent, outside) = (&n[..6], &n[6..]);

    // An opt-out outside the population sent before it: refused whole.
    let mut bad = round_trip(sent, &sent[..2], now_ms());
    bad[1].nhs_numbers.push(outside[0].clone());
    let err = a
        .admin_client()
        .await
        .import_opt_outs(tokio_stream::iter(bad))
        .await
        .expect_err("an opt-out outside the population");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("not in the population"),
        "{}",
        err.message()
    );
    // A plain list REPLACE of national opt-outs: refused in population mode.
    let err = a
        .admin_client()
        .await
        .import_opt_outs(tokio_stream::iter(vec![common::import(&sent[..2], true)]))
        .await
        .expect_err("a list replace");
    assert!(
        err.message().contains("population mode"),
        "{}",
        err.message()
    );
    // Type 1 is a complete list from the practice systems: its REPLACE is fine.
    a.admin_client()
        .await
        .import_opt_outs(tokio_stream::iter(vec![ImportOptOutsRequest {
            r#type: OptOutType::Type1 as i32,
            ..common::import(&n[7..], true)
        }]))
        .await
        .expect("type 1 replace");

    let r = a
        .admin_client()
        .await
        .import_opt_outs(tokio_stream::iter(round_trip(sent, &sent[..2], now_ms())))
        .await
        .expect("round trip")
        .into_inner();
    assert_eq!((r.added, r.removed), (2, 0));
    // The replica that did not apply it answers the same: population and opt-outs together.
    let mut want = vec![NATIONAL; 2];
    want.extend([RELEASED; 4]);
    want.extend([OUTSIDE, (Outcome::Withhold, Reason::Type1OptOut)]);
    poll!(
        "B answers from the new population",
        Duration::from_secs(20),
        {
            if decisions(&b, &n, Purpose::Research).await == want {
                break;
            }
        }
    );
    assert_eq!(decisions(&a, &n, Purpose::Research).await, want);
    let s = b.status().await;
    let national = &s.lists[0];
    assert_eq!(
        (national.mode.as_str(), national.population),
        ("population", 6)
    );
    assert_eq!(s.lists[1].mode, "list");

    // A later check of a smaller population: who left it is withheld again, on both replicas.
    let r = a
        .admin_client()
        .await
        .import_opt_outs(tokio_stream::iter(round_trip(
            &sent[1..],
            &sent[1..2],
            now_ms(),
        )))
        .await
        .expect("second round trip")
        .into_inner();
    assert_eq!((r.added, r.removed), (0, 1));
    poll!("B follows the second check", Duration::from_secs(20), {
        let d = decisions(&b, &sent[..2], Purpose::Research).await;
        if d == vec![OUTSIDE, NATIONAL] {
            break;
        }
    });
    a.stop().await;
    b.stop().await;
}
