//! Population mode and list age (issue 18): a store fed by national check round trips knows
//! "no opt-out" only for the population it checked, and a list past its maximum age proves
//! nothing. Against the real server, the `optout` binary, the embedded store and a real Redis.

use crate::common;

use std::time::Duration;

use crate::common::{
    RedisServer, TestServer, check_request, optout, outcome, redis_config, text, valid_numbers,
};
use optout::{
    api::proto::{self, ImportMode, ImportOptOutsRequest, OptOutType, Outcome, Purpose, Reason},
    core::coverage::{CoverageMode, MaxAge},
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
        .decide(check_request(numbers.to_vec(), purpose))
        .await
}

const NATIONAL: (Outcome, Reason) = (Outcome::Withhold, Reason::NationalDataOptOut);
const RELEASED: (Outcome, Reason) = (Outcome::Release, Reason::NoOptOut);
const OUTSIDE: (Outcome, Reason) = (Outcome::Withhold, Reason::NotInCheckedPopulation);
const TOO_OLD: (Outcome, Reason) = (Outcome::Withhold, Reason::ListTooOld);

/// The test configuration with the default maximum age of the national list: a store in
/// population mode does not serve without one.
fn population_config(data: &std::path::Path) -> optout::server::ServerConfig {
    let mut c = common::test_config(data);
    c.max_list_age.national = MaxAge::DEFAULT.national;
    c
}

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
            "--organisation",
            "A83007",
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

    let server = TestServer::start_with(population_config(&data)).await;
    let n = valid_numbers(4_100_000_000, 12);
    let (sent, outside) = (&n[..10], &n[10..]);

    // Nothing checked yet: nobody is known to have no opt-out.
    assert_eq!(
        decisions(&server, &n[..1], Purpose::Research).await,
        vec![(Outcome::Withhold, Reason::ListNeverImported)]
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
        if extra.is_empty() {
            a.extend(["--checked-at".to_string(), "2026-01-05".to_string()]);
        }
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
    common::assert_stderr_has(&out, "error reply");
    // An empty reply while the file sent was not.
    let out = import(write("empty.dat", String::new()), &[]).await;
    assert!(!out.status.success());
    common::assert_stderr_has(&out, "reply is empty");
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
    common::assert_stderr_has(&out, "population mode");
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
                "as of {:.3}",
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

    // Never imported, and a maximum age is set: it proves nothing.
    assert_eq!(
        decisions(&server, &n[..1], Purpose::Research).await,
        vec![(Outcome::Withhold, Reason::ListNeverImported)]
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
    let mut config = redis_config(&redis, "optout:", scratch.path());
    config.max_list_age.national = MaxAge::DEFAULT.national;
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
            practice: common::PRACTICE.into(),
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
    // A reply of an older check, imported again through the other replica: refused, under the
    // national type's import lock.
    let err = b
        .admin_client()
        .await
        .import_opt_outs(tokio_stream::iter(round_trip(
            sent,
            &sent[..2],
            now_ms() - 86_400_000,
        )))
        .await
        .expect_err("an older check");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("older than the national check in force"),
        "{}",
        err.message()
    );
    a.stop().await;
    b.stop().await;
}

/// `optout serve` on `data` with `flags`, waited for at most 15 s: its exit status and stderr,
/// or `None` if it was still running (then killed).
fn serve_exits(
    data: &std::path::Path,
    flags: &[&str],
) -> Option<(std::process::ExitStatus, String)> {
    let mut child = std::process::Command::new(common::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(flags)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("optout serve");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Some((status, err));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Issue 28 item 4: a national list cannot go stale unnoticed. The check's date is never a file's
/// modification time; an older check than the one in force is refused unless a reason is given
/// (and audited); a maximum age is the default, so a store in population mode does not serve
/// without one, and a fresh list-mode store does not release everyone.
#[tokio::test]
async fn a_national_list_cannot_go_stale_unnoticed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf8").to_string();
    let init = optout(common::args(&[
        "init-store",
        "--data-dir",
        &data_arg,
        "--national-coverage",
        "population",
        "--organisation",
        "RX1",
    ]))
    .await;
    assert!(init.status.success(), "stderr: {}", text(&init.stderr));
    // Population mode does not serve without a maximum age for the national list, from the
    // command line or the library.
    let (status, stderr) = serve_exits(&data, &["--national-max-age-days", "none"])
        .expect("optout serve refused to start");
    assert!(
        !status.success() && stderr.contains("needs a maximum age"),
        "{stderr}"
    );
    let mut none = population_config(&data);
    none.max_list_age = MaxAge::NONE;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let refused = optout::server::run(listener, none, async {})
        .await
        .expect_err("population mode without a maximum list age");
    assert!(
        refused.to_string().contains("needs a maximum age"),
        "{refused}"
    );
    let server = TestServer::start_with(population_config(&data)).await;
    let n = valid_numbers(4_400_000_000, 6);
    let write = |name: &str, body: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).expect("write");
        p.to_str().expect("utf8").to_string()
    };
    let sent = write("sent.dat", dat(&n));
    let returned = write("returned.dat", dat(&n[1..]));
    let import = |extra: &[&str]| {
        let mut a = common::args(&[
            "admin",
            "--server",
            &server.url,
            "import",
            "--type",
            "national",
            "--from-national-check",
            &sent,
            &returned,
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        optout(a)
    };
    // Without --checked-at the date would be RETURNED's modification time, set after the check
    // (the list would look younger than it is): refused as a usage error.
    let out = import(&[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    common::assert_stderr_has(&out, "--checked-at");
    let day = |days_ago: i64| {
        (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * days_ago)).to_string()
    };
    let out = import(&["--checked-at", &day(1)]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // An older reply imported again would move the list back in time: refused, nothing changed.
    let out = import(&["--checked-at", &day(3)]).await;
    assert!(!out.status.success(), "an older check was imported");
    common::assert_stderr_has(&out, "older than the national check in force");
    let status = server.status().await;
    let as_of = status.lists[0].as_of_unix_ms;
    assert!(
        as_of > now_ms() - 2 * 86_400_000,
        "the list's date did not move back"
    );
    // Meant, and said why: imported, and the reason is in the audit.
    let out = import(&[
        "--checked-at",
        &day(3),
        "--allow-older-check",
        "INC-4411: the newer reply was for another population",
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let audit = server
        .admin_client()
        .await
        .read_audit(proto::ReadAuditRequest::default())
        .await
        .expect("audit")
        .into_inner();
    assert!(
        audit
            .records
            .iter()
            .any(|r| r.action == "import-replace" && r.override_reason.starts_with("INC-4411")),
        "the override is audited"
    );
    server.stop().await;

    // By default (the service's own configuration, not the tests'), a fresh list-mode store
    // releases nobody: no list has been imported whole.
    let fresh = dir.path().join("fresh");
    let server = TestServer::start_with(optout::server::ServerConfig::new(fresh)).await;
    let v = server
        .admin_client()
        .await
        .add_opt_outs(common::change_request(
            vec![n[0].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add")
        .into_inner()
        .version;
    let mut req = check_request(n[..2].to_vec(), Purpose::Research);
    req.at_least_version = v;
    req.origin = proto::DataOrigin::Other as i32;
    let ask = |req: proto::CheckRequest| server.decide(req);
    const NEVER: (Outcome, Reason) = (Outcome::Withhold, Reason::ListNeverImported);
    assert_eq!(
        ask(req.clone()).await,
        vec![NATIONAL, NEVER],
        "an opt-out withholds as one; absence proves nothing yet"
    );
    // The whole national list imported: absence proves no national opt-out.
    let r = server
        .admin_client()
        .await
        .import_opt_outs(tokio_stream::iter(vec![common::import(&n[..1], true)]))
        .await
        .expect("replace")
        .into_inner();
    req.at_least_version = r.version;
    assert_eq!(ask(req.clone()).await, vec![NATIONAL, RELEASED]);
    // GP-held data: type 1 applies too, and its list was never imported whole.
    req.origin = proto::DataOrigin::GpPractice as i32;
    assert_eq!(ask(req).await, vec![NATIONAL, NEVER]);
    server.stop().await;
}

/// Issue 28 item 4: the national check's licence lets an organisation apply its result to its
/// own patients only. A population-mode store names its organisation at init-store and answers
/// checks from that organisation's keys alone.
#[tokio::test]
async fn a_population_store_answers_only_the_organisation_it_belongs_to() {
    use optout::auth::{Role, new_key};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf8").to_string();
    let init = |extra: &[&str]| {
        let mut a = common::args(&[
            "init-store",
            "--data-dir",
            &data_arg,
            "--national-coverage",
            "population",
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        optout(a)
    };
    let out = init(&[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    common::assert_stderr_has(&out, "--organisation");
    let out = init(&["--organisation", "RX1"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("checks of organisation RX1 only"),
        "{}",
        text(&out.stdout)
    );

    let (own, e1) = new_key("RX1", &[Role::Checker]);
    let (other, e2) = new_key("RX2", &[Role::Checker]);
    let (admin, e3) = new_key("RX1", &[Role::Admin]);
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, format!("{e1}\n{e2}\n{e3}")).expect("keys");
    let mut config = population_config(&data);
    config.keys_file = Some(keys);
    let server = TestServer::start_with(config).await;
    let n = valid_numbers(4_500_000_000, 3);
    let mut import = tonic::Request::new(tokio_stream::iter(round_trip(&n, &n[..1], now_ms())));
    import.metadata_mut().insert(
        "authorization",
        format!("Bearer {admin}").parse().expect("header"),
    );
    server
        .admin_client()
        .await
        .import_opt_outs(import)
        .await
        .expect("round trip");
    let ask = |key: String| {
        let numbers = n.clone();
        let server = &server;
        async move {
            let mut req = tonic::Request::new(check_request(numbers, Purpose::Research));
            req.get_mut().origin = proto::DataOrigin::Other as i32;
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {key}").parse().expect("header"),
            );
            server.check_client().await.check(req).await.map(|r| {
                r.into_inner()
                    .decisions
                    .iter()
                    .map(outcome)
                    .collect::<Vec<_>>()
            })
        }
    };
    poll!(
        "the owner's checks are answered",
        Duration::from_secs(10),
        {
            if ask(own.clone()).await.ok() == Some(vec![NATIONAL, RELEASED, RELEASED]) {
                break;
            }
        }
    );
    let e = ask(other).await.expect_err("another organisation's key");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("organisation RX1"), "{e:?}");
    let mut status = tonic::Request::new(proto::GetStatusRequest {});
    status.metadata_mut().insert(
        "authorization",
        format!("Bearer {admin}").parse().expect("header"),
    );
    let s = server
        .admin_client()
        .await
        .get_status(status)
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.lists[0].owner, "RX1");
    server.stop().await;
}
