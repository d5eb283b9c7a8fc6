//! Callers, roles, TLS, rate limits and the audit log, against the real server.

use crate::common;

use std::{
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use crate::common::{
    FaultyStore, TestServer, change_request, check_request, outcome, test_config, valid_numbers,
};
use optout::{
    api::{
        gate::RateLimit,
        proto::{
            DataOrigin, GetOptOutRequest, GetStatusRequest, ImportMode, ImportOptOutsRequest,
            LegalBasis, OptOutType, Outcome, Purpose, ReadAuditRequest, Reason,
            opt_out_admin_client::OptOutAdminClient, opt_out_check_client::OptOutCheckClient,
        },
    },
    auth::{Role, new_key},
    core::AuditKey,
    server::{ServerConfig, TlsFiles, open_embedded},
    store::{AuditTrail, ConsentStore},
};
use tonic::{
    Code, Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, ClientTlsConfig},
};

/// Sends a fixed `authorization` header (or none).
#[derive(Clone)]
struct Key(Option<String>);

impl Interceptor for Key {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(k) = &self.0 {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {k}")
                    .parse()
                    .map_err(|_| Status::internal("key"))?,
            );
        }
        Ok(r)
    }
}

type Authed = InterceptedService<Channel, Key>;

fn check_client(ch: Channel, key: Option<&str>) -> OptOutCheckClient<Authed> {
    OptOutCheckClient::with_interceptor(ch, Key(key.map(str::to_string)))
}

fn admin_client(ch: Channel, key: Option<&str>) -> OptOutAdminClient<Authed> {
    OptOutAdminClient::with_interceptor(ch, Key(key.map(str::to_string)))
}

struct Keys {
    checker: String,
    admin: String,
    other_checker: String,
}

/// Writes a keys file with a checker and an admin of RX1, and a checker of RX2.
fn write_keys(path: &Path) -> Keys {
    let (checker, e1) = new_key("RX1", &[Role::Checker]);
    let (admin, e2) = new_key("RX1", &[Role::Admin]);
    let (other_checker, e3) = new_key("RX2", &[Role::Checker]);
    std::fs::write(path, format!("{e1}\n{e2}\n{e3}")).expect("write keys");
    Keys {
        checker,
        admin,
        other_checker,
    }
}

fn secured(dir: &Path) -> (ServerConfig, Keys) {
    let mut config = test_config(&dir.join("data"));
    let keys_path = dir.join("keys.toml");
    let keys = write_keys(&keys_path);
    config.keys_file = Some(keys_path);
    config.keys_reload = Duration::from_millis(100);
    config.audit_key = Some(AuditKey::new(&[42u8; 32]).expect("key"));
    config.audit_bound = Duration::from_millis(500);
    (config, keys)
}

/// Calls every RPC once with `key`; returns the code of each (Ok as `Code::Ok`).
async fn every_rpc(ch: Channel, key: Option<&str>) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), Status>| r.map_or_else(|s| s.code(), |()| Code::Ok);
    let n = valid_numbers(4_000_000_000, 2);
    let mut c = check_client(ch.clone(), key);
    let mut a = admin_client(ch, key);
    let mut out = Vec::new();
    out.push((
        "Check",
        code(
            c.check(check_request(n.clone(), Purpose::Research))
                .await
                .map(|_| ()),
        ),
    ));
    let stream = c
        .check_stream(tokio_stream::iter(vec![check_request(
            n.clone(),
            Purpose::Research,
        )]))
        .await;
    let stream_code = match stream {
        Err(s) => s.code(),
        Ok(r) => {
            let mut s = r.into_inner();
            match s.message().await {
                Ok(_) => Code::Ok,
                Err(e) => e.code(),
            }
        }
    };
    out.push(("CheckStream", stream_code));
    out.push((
        "AddOptOuts",
        code(
            a.add_opt_outs(change_request(vec![n[0].clone()], OptOutType::Type1))
                .await
                .map(|_| ()),
        ),
    ));
    out.push((
        "RemoveOptOuts",
        code(
            a.remove_opt_outs(change_request(vec![n[0].clone()], OptOutType::Type1))
                .await
                .map(|_| ()),
        ),
    ));
    out.push((
        "ImportOptOuts",
        code(
            a.import_opt_outs(tokio_stream::iter(vec![ImportOptOutsRequest {
                mode: ImportMode::Merge as i32,
                r#type: OptOutType::Type1 as i32,
                practice: common::PRACTICE.into(),
                source: "matrix".into(),
                nhs_numbers: vec![n[1].clone()],
                commit: true,
                ..Default::default()
            }]))
            .await
            .map(|_| ()),
        ),
    ));
    out.push((
        "GetOptOut",
        code(
            a.get_opt_out(GetOptOutRequest {
                nhs_number: n[0].clone(),
            })
            .await
            .map(|_| ()),
        ),
    ));
    out.push((
        "GetStatus",
        code(a.get_status(GetStatusRequest {}).await.map(|_| ())),
    ));
    out.push((
        "ReadAudit",
        code(a.read_audit(ReadAuditRequest::default()).await.map(|_| ())),
    ));
    out
}

#[tokio::test]
async fn every_rpc_admits_exactly_the_roles_it_should() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, keys) = secured(dir.path());
    let server = TestServer::start_with(config).await;
    let ch = server.channel().await;
    let unknown = new_key("RX9", &[Role::Admin]).0;
    let checks = ["Check", "CheckStream"];
    for (who, key) in [
        ("no key", None),
        ("unknown key", Some(unknown.as_str())),
        ("checker", Some(keys.checker.as_str())),
        ("admin", Some(keys.admin.as_str())),
    ] {
        for (rpc, code) in every_rpc(ch.clone(), key).await {
            let want = match who {
                "no key" | "unknown key" => Code::Unauthenticated,
                "checker" if checks.contains(&rpc) => Code::Ok,
                "checker" => Code::PermissionDenied,
                _ => Code::Ok,
            };
            assert_eq!(code, want, "{who} calling {rpc}");
        }
    }
    // Health stays open for probes.
    assert_eq!(server.health().await, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_key_added_to_or_removed_from_the_keys_file_takes_effect_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, keys) = secured(dir.path());
    let path = config.keys_file.clone().expect("keys file");
    let server = TestServer::start_with(config).await;
    let ch = server.channel().await;
    let (new, entry) = new_key("RX3", &[Role::Checker]);
    let req = || check_request(valid_numbers(4_000_000_000, 1), Purpose::Research);
    let err = check_client(ch.clone(), Some(&new))
        .check(req())
        .await
        .expect_err("not yet");
    assert_eq!(err.code(), Code::Unauthenticated);

    let before = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, format!("{before}\n{entry}")).expect("append");
    eventually!(
        "new key accepted after reload",
        Duration::from_secs(5),
        check_client(ch.clone(), Some(&new))
            .check(req())
            .await
            .is_ok()
    );
    // An invalid file keeps the keys in force.
    std::fs::write(&path, "this is not toml [[").expect("write");
    tokio::time::sleep(Duration::from_millis(400)).await;
    check_client(ch.clone(), Some(&keys.checker))
        .check(req())
        .await
        .expect("old keys still in force");
    // Removing a key revokes it.
    std::fs::write(&path, &before).expect("write");
    poll!(
        "removed key refused after reload",
        Duration::from_secs(5),
        {
            match check_client(ch.clone(), Some(&new)).check(req()).await {
                Err(e) if e.code() == Code::Unauthenticated => break,
                _ => {}
            }
        }
    );
    server.stop().await;
}

#[tokio::test]
async fn one_organisation_over_its_rate_limit_does_not_starve_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut config, keys) = secured(dir.path());
    config.rate_limit = RateLimit {
        per_second: 5,
        burst: 5,
    };
    let server = TestServer::start_with(config).await;
    let ch = server.channel().await;
    let req = || check_request(valid_numbers(4_000_000_000, 1), Purpose::Research);
    let mut greedy = check_client(ch.clone(), Some(&keys.checker));
    let mut exhausted = None;
    for _ in 0..50 {
        if let Err(e) = greedy.check(req()).await {
            exhausted = Some(e);
            break;
        }
    }
    let e = exhausted.expect("RX1 hit its limit");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("RX1"), "{}", e.message());
    check_client(ch, Some(&keys.other_checker))
        .check(req())
        .await
        .expect("RX2 is still served");
    server.stop().await;
}

#[tokio::test]
async fn the_rate_limit_charges_every_number_and_every_stream_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut config, keys) = secured(dir.path());
    config.rate_limit = RateLimit {
        per_second: 5,
        burst: 5,
    };
    let server = TestServer::start_with(config).await;
    let ch = server.channel().await;
    let mut client = check_client(ch.clone(), Some(&keys.checker));
    // One stream of 40 one-number messages: charged per message, not once for the stream.
    let messages: Vec<_> = (0..40)
        .map(|i| check_request(valid_numbers(4_000_000_000 + i * 100, 1), Purpose::Research))
        .collect();
    let mut answers = client
        .check_stream(tokio_stream::iter(messages))
        .await
        .expect("stream opens")
        .into_inner();
    let mut answered = 0;
    let ended = loop {
        match answers.message().await {
            Ok(Some(_)) => answered += 1,
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    let e = ended.expect("the stream is cut off at the rate limit");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        answered <= 8,
        "{answered} messages answered under 5 numbers/s"
    );
    // A message of more numbers than the burst is refused, whatever the budget.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let big = client
        .check(check_request(
            valid_numbers(4_000_000_000, 6),
            Purpose::Research,
        ))
        .await
        .expect_err("6 numbers at once under a burst of 5");
    assert_eq!(big.code(), Code::ResourceExhausted);
    assert!(big.message().contains("at once"), "{}", big.message());
    server.stop().await;
}

#[tokio::test]
async fn a_revoked_key_stops_its_open_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, keys) = secured(dir.path());
    let keys_path = config.keys_file.clone().expect("keys file");
    let server = TestServer::start_with(config).await;
    let mut client = check_client(server.channel().await, Some(&keys.checker));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let message = || check_request(valid_numbers(4_000_000_000, 1), Purpose::Research);
    tx.send(message()).await.expect("send");
    let mut answers = client
        .check_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    answers
        .message()
        .await
        .expect("answered while the key is in force")
        .expect("a response");
    // The checker's key is removed from the file; the stream stays open.
    let (_, other) = new_key("RX9", &[Role::Checker]);
    std::fs::write(&keys_path, other).expect("rewrite keys");
    tokio::time::sleep(Duration::from_millis(600)).await;
    tx.send(message()).await.expect("send");
    let revoked = answers
        .message()
        .await
        .expect_err("no answer once the key is revoked");
    assert_eq!(revoked.code(), Code::Unauthenticated, "{revoked:?}");
    server.stop().await;
}

/// Issue 27, item 8: a key revoked while its import stream is open stops it, as it stops an open
/// CheckStream: checks re-checked the key per message, imports did not, so a REPLACE could
/// commit after its admin key was revoked.
#[tokio::test]
async fn a_revoked_admin_key_stops_its_open_import() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, keys) = secured(dir.path());
    let keys_path = config.keys_file.clone().expect("keys file");
    let server = TestServer::start_with(config).await;
    let mut admin = admin_client(server.channel().await, Some(&keys.admin));
    let n = valid_numbers(4_000_000_000, 4);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut first = optout::api::proto::ImportOptOutsRequest {
        mode: optout::api::proto::ImportMode::Merge as i32,
        r#type: optout::api::proto::OptOutType::NationalDataOptOut as i32,
        source: "revoked".into(),
        nhs_numbers: n[..2].to_vec(),
        ..Default::default()
    };
    tx.send(first.clone()).await.expect("send");
    let importing = tokio::spawn(async move {
        admin
            .import_opt_outs(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The admin's key is removed from the file while the stream is open; then the commit comes.
    let checker = write_keys_without_admin(&keys_path);
    tokio::time::sleep(Duration::from_millis(600)).await;
    first.nhs_numbers = n[2..].to_vec();
    first.commit = true;
    tx.send(first).await.expect("send");
    drop(tx);
    let outcome = importing.await.expect("task");
    let e = outcome.expect_err("no import once the key is revoked");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Nothing was imported.
    let mut c = check_client(server.channel().await, Some(&checker));
    let answer = c
        .check(check_request(n.clone(), Purpose::Research))
        .await
        .expect("check")
        .into_inner();
    assert!(
        answer
            .decisions
            .iter()
            .all(|d| d.outcome == optout::api::proto::Outcome::Release as i32),
        "{answer:?}"
    );
    server.stop().await;
}

/// Rewrites the keys file with a checker of RX1 only; returns it.
fn write_keys_without_admin(path: &Path) -> String {
    let (checker, entry) = new_key("RX1", &[Role::Checker]);
    std::fs::write(path, entry).expect("rewrite keys");
    checker
}

#[tokio::test]
async fn connections_past_the_cap_are_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.max_connections = 2;
    config.max_connections_per_peer = Some(2);
    let server = TestServer::start_with(config).await;
    // The health probes of the start closed their connections; give the server a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let req = || check_request(valid_numbers(4_000_000_000, 1), Purpose::Research);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = check_client(server.channel().await, None);
        c.check(req()).await.expect("within the cap");
        held.push(c);
    }
    let third = match Channel::from_shared(server.url.clone())
        .expect("url")
        .connect()
        .await
    {
        Ok(ch) => check_client(ch, None).check(req()).await.map(|_| ()),
        Err(e) => Err(Status::unavailable(e.to_string())),
    };
    assert!(third.is_err(), "a third connection is closed: {third:?}");
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    check_client(server.channel().await, None)
        .check(req())
        .await
        .expect("a connection is free again");
    server.stop().await;
}

/// Opens a raw HTTP/2 connection (preface and an empty SETTINGS frame) and reads until the
/// server closes it; how long that took, or `None` if it was still open after `within`.
async fn closed_after(server: &TestServer, within: Duration) -> Option<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_all).await.ok()
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.limits.request_timeout = Duration::from_millis(300);
    config.idle_timeout = Duration::from_millis(500);
    let server = TestServer::start_with(config).await;
    let took = closed_after(&server, Duration::from_secs(5))
        .await
        .expect("an unused connection is closed");
    assert!(
        took >= Duration::from_millis(500),
        "not before the idle timeout: {took:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_old_connection_is_told_to_go_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.max_connection_age = Duration::from_millis(500);
    config.shutdown_grace = Duration::from_millis(200);
    let server = TestServer::start_with(config).await;
    closed_after(&server, Duration::from_secs(5))
        .await
        .expect("a connection past its age is closed");
    server.stop().await;
}

#[tokio::test]
async fn a_request_past_the_request_timeout_is_cut_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.limits.request_timeout = Duration::from_millis(300);
    let server = TestServer::start_with(config).await;
    let mut client = check_client(server.channel().await, None);
    // A stream that sends one message and then nothing, and is never closed.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(check_request(
        valid_numbers(4_000_000_000, 1),
        Purpose::Research,
    ))
    .await
    .expect("send");
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        let mut answers = client
            .check_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        while answers.message().await?.is_some() {}
        Ok::<(), Status>(())
    })
    .await
    .expect("the server ends the request, the client need not");
    assert!(ended.is_err(), "ended with an error status: {ended:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(tx);
    server.stop().await;
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate naming `org`.
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki(org: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "optout test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().expect("key");
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    sp.subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    let server_cert = sp.signed_by(&server_key, &issuer).expect("server cert");

    let client_key = KeyPair::generate().expect("key");
    let mut cp = CertificateParams::new(Vec::<String>::new()).expect("params");
    cp.distinguished_name.push(DnType::OrganizationName, org);
    cp.distinguished_name
        .push(DnType::CommonName, "extract-system");
    let client_cert = cp.signed_by(&client_key, &issuer).expect("client cert");
    Pki {
        ca: ca_cert.pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    }
}

async fn tls_channel(url: &str, pki: &Pki, with_client_cert: bool) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    if with_client_cert {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            &pki.client_cert,
            &pki.client_key,
        ));
    }
    Channel::from_shared(url.replace("http://", "https://"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn tls_and_mutual_tls_with_certificates_made_at_test_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki("RX1");

    // TLS: a client that trusts the CA is served; a plaintext client is not.
    let (mut config, keys) = secured(dir.path());
    config.tls = Some(TlsFiles {
        cert_pem: pki.server_cert.clone().into_bytes(),
        key_pem: pki.server_key.clone().into_bytes(),
        client_ca_pem: None,
    });
    let server = TestServer::start_unready(
        Arc::new(open_embedded(&config).await.expect("store")),
        config,
    )
    .await;
    let ch = tls_channel(&server.url, &pki, false)
        .await
        .expect("TLS connects");
    let r = check_client(ch, Some(&keys.checker))
        .check(check_request(
            valid_numbers(4_000_000_000, 1),
            Purpose::Research,
        ))
        .await
        .expect("check over TLS")
        .into_inner();
    assert_eq!(outcome(&r.decisions[0]).0, Outcome::Release);
    let plain = Channel::from_shared(server.url.clone())
        .expect("url")
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(
            check_client(ch, Some(&keys.checker))
                .check(check_request(
                    valid_numbers(4_000_000_000, 1),
                    Purpose::Research
                ))
                .await
                .is_err(),
            "plaintext must not be served"
        );
    }
    server.stop().await;

    // Mutual TLS: the client certificate is required and must name the key's organisation.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let (mut config, keys) = secured(dir2.path());
    config.tls = Some(TlsFiles {
        cert_pem: pki.server_cert.clone().into_bytes(),
        key_pem: pki.server_key.clone().into_bytes(),
        client_ca_pem: Some(pki.ca.clone().into_bytes()),
    });
    let server = TestServer::start_unready(
        Arc::new(open_embedded(&config).await.expect("store")),
        config,
    )
    .await;
    let req = || check_request(valid_numbers(4_000_000_000, 1), Purpose::Research);
    let ch = tls_channel(&server.url, &pki, true)
        .await
        .expect("mTLS connects");
    check_client(ch.clone(), Some(&keys.checker))
        .check(req())
        .await
        .expect("RX1 key with an RX1 certificate");
    let err = check_client(ch, Some(&keys.other_checker))
        .check(req())
        .await
        .expect_err("RX2 key with an RX1 certificate");
    assert_eq!(err.code(), Code::PermissionDenied);
    match tls_channel(&server.url, &pki, false).await {
        Err(_) => {}
        Ok(ch) => assert!(
            check_client(ch, Some(&keys.checker))
                .check(req())
                .await
                .is_err(),
            "no client certificate, no service"
        ),
    }
    server.stop().await;
}

#[tokio::test]
async fn looking_up_a_patient_or_reading_the_audit_is_itself_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, keys) = secured(dir.path());
    let server = TestServer::start_with(config).await;
    let ch = server.channel().await;
    let mut admin = admin_client(ch, Some(&keys.admin));
    let n = valid_numbers(4_450_000_000, 2);
    admin
        .get_opt_out(GetOptOutRequest {
            nhs_number: n[0].clone(),
        })
        .await
        .expect("get");
    let about = |nhs: &str| ReadAuditRequest {
        nhs_number: nhs.to_string(),
        ..Default::default()
    };
    let first = admin
        .read_audit(about(&n[0]))
        .await
        .expect("read")
        .into_inner();
    let actions: Vec<(&str, &str, u64)> = first
        .records
        .iter()
        .map(|r| (r.action.as_str(), r.organisation.as_str(), r.digests))
        .collect();
    // The look-up, then this very read: both by the admin's organisation, both about n0.
    assert_eq!(actions, vec![("get", "RX1", 1), ("read-audit", "RX1", 1)]);
    assert!(first.records.iter().all(|r| !r.key_id.is_empty()));
    // Another patient's trail holds none of it.
    let other = admin
        .read_audit(about(&n[1]))
        .await
        .expect("read")
        .into_inner();
    assert_eq!(
        other
            .records
            .iter()
            .map(|r| r.action.as_str())
            .collect::<Vec<_>>(),
        vec!["read-audit"]
    );
    server.stop().await;
}

#[tokio::test]
async fn audit_records_every_change_and_check_and_holds_no_nhs_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, keys) = secured(dir.path());
    let data_dir = config.data_dir().expect("embedded").to_path_buf();
    let server = TestServer::start_with(config).await;
    let ch = server.channel().await;
    let mut admin = admin_client(ch.clone(), Some(&keys.admin));
    let mut checker = check_client(ch, Some(&keys.checker));
    let n = valid_numbers(4_400_000_000, 6);

    admin
        .add_opt_outs(change_request(
            n[..3].to_vec(),
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add");
    admin
        .remove_opt_outs(change_request(
            vec![n[2].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("remove");
    admin
        .import_opt_outs(tokio_stream::iter(vec![ImportOptOutsRequest {
            mode: ImportMode::Replace as i32,
            r#type: OptOutType::Type1 as i32,
            practice: common::PRACTICE.into(),
            source: "practice.csv".into(),
            nhs_numbers: n[3..5].to_vec(),
            commit: true,
            ..Default::default()
        }]))
        .await
        .expect("import");
    let mut req = check_request(n.clone(), Purpose::Research);
    req.extract_id = "study-42".into();
    checker.check(req).await.expect("check");

    // Check records are written in batches: wait for it.
    let all = poll!("check recorded", Duration::from_secs(5), {
        let r = admin
            .read_audit(ReadAuditRequest::default())
            .await
            .expect("read")
            .into_inner()
            .records;
        if r.iter().any(|e| e.action == "check") {
            break r;
        }
    });
    // Each of these reads is recorded too (see the test above); here, the rest of the trail.
    let all: Vec<_> = all
        .into_iter()
        .filter(|e| e.action != "read-audit")
        .collect();
    let actions: Vec<&str> = all.iter().map(|e| e.action.as_str()).collect();
    // An import's parts are written as they fill, its main record (with the counts) last.
    assert_eq!(
        actions,
        vec!["add", "remove", "import-added", "import-replace", "check"]
    );
    let add = &all[0];
    assert_eq!(
        (
            add.organisation.as_str(),
            add.count,
            add.applied,
            add.digests
        ),
        ("RX1", 3, 3, 3)
    );
    assert_eq!(add.opt_out_type, "national");
    assert_eq!(add.source, "test");
    assert!(!add.version.is_empty() && !add.key_id.is_empty());
    // An import: the main record with the counts, its digests in bounded parts that name it.
    let import = &all[3];
    assert_eq!((import.count, import.applied, import.digests), (2, 2, 0));
    let part = &all[2];
    assert_eq!((part.count, part.digests), (2, 2));
    assert!(!import.part_of.is_empty() && part.part_of == import.part_of);
    let check = &all[4];
    assert_eq!(check.extract_id, "study-42");
    assert_eq!(check.count, 6);
    assert_eq!(check.purpose, "research");
    // n0, n1 national; n3, n4 type 1 (unspecified origin applies both): 4 withheld, 2 released.
    assert_eq!(check.applied, 2);
    assert_eq!(check.withheld.values().sum::<u64>(), 4);

    // "Who released data about this patient?"
    let about = |nhs: &str| ReadAuditRequest {
        nhs_number: nhs.to_string(),
        ..ReadAuditRequest::default()
    };
    let released = admin
        .read_audit(about(&n[5]))
        .await
        .expect("read")
        .into_inner()
        .records;
    assert_eq!(
        released
            .iter()
            .map(|e| e.action.as_str())
            .filter(|a| *a != "read-audit")
            .collect::<Vec<_>>(),
        vec!["check"]
    );
    let changed = admin
        .read_audit(about(&n[2]))
        .await
        .expect("read")
        .into_inner()
        .records;
    let changed: Vec<&str> = changed
        .iter()
        .map(|e| e.action.as_str())
        .filter(|a| *a != "read-audit")
        .collect();
    assert_eq!(changed, vec!["add", "remove", "check"]);
    let by_org = admin
        .read_audit(ReadAuditRequest {
            organisation: "RX2".into(),
            ..ReadAuditRequest::default()
        })
        .await
        .expect("read")
        .into_inner()
        .records;
    assert!(by_org.is_empty());
    let by_extract = admin
        .read_audit(ReadAuditRequest {
            extract_id: "study-42".into(),
            ..ReadAuditRequest::default()
        })
        .await
        .expect("read")
        .into_inner()
        .records;
    assert_eq!(by_extract.len(), 1);
    server.stop().await;

    // The stored audit bytes hold digests, never the numbers: read the raw records.
    let store = open_embedded(&test_config(&data_dir))
        .await
        .expect("reopen");
    let raw = store
        .read_audit(&optout::core::AuditQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("raw audit");
    let json = serde_json::to_string(&raw).expect("json");
    for number in &n {
        assert!(
            !json.contains(number.as_str()),
            "plain NHS number in the audit log"
        );
    }
    assert!(json.contains("digests"));
}

#[tokio::test]
async fn when_the_audit_cannot_be_written_admin_changes_are_refused_and_checks_withheld() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, keys) = secured(dir.path());
    let inner: Arc<dyn ConsentStore> = Arc::new(open_embedded(&config).await.expect("store"));
    let faulty = FaultyStore::new(inner);
    let server = TestServer::start_on(faulty.store(), config).await;
    let ch = server.channel().await;
    let n = valid_numbers(4_500_000_000, 3);
    let mut checker = check_client(ch.clone(), Some(&keys.checker));
    let mut admin = admin_client(ch, Some(&keys.admin));

    faulty.audit_down.store(true, Ordering::SeqCst);
    let err = admin
        .add_opt_outs(change_request(
            vec![n[0].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect_err("no audit, no change");
    assert_eq!(err.code(), Code::Unavailable);

    // Checks go on being answered, released where provable, until the bound (500 ms) passes...
    let first = checker
        .check(check_request(n.clone(), Purpose::Research))
        .await
        .expect("check")
        .into_inner();
    assert!(
        first
            .decisions
            .iter()
            .all(|d| outcome(d).0 == Outcome::Release)
    );
    // ...then everything is withheld rather than released unrecorded.
    poll!("checks withheld after the bound", Duration::from_secs(5), {
        let r = checker
            .check(check_request(n.clone(), Purpose::Research))
            .await
            .expect("check")
            .into_inner();
        if r.decisions
            .iter()
            .all(|d| outcome(d) == (Outcome::Withhold, Reason::StoreUnavailable))
        {
            break;
        }
    });
    // Back: checks are released again, and the records queued meanwhile are written.
    faulty.audit_down.store(false, Ordering::SeqCst);
    poll!("recovered", Duration::from_secs(5), {
        let r = checker
            .check(check_request(n.clone(), Purpose::Research))
            .await
            .expect("check")
            .into_inner();
        if r.decisions.iter().all(|d| outcome(d).0 == Outcome::Release) {
            break;
        }
    });
    let records = poll!("queued records written", Duration::from_secs(5), {
        let records = admin
            .read_audit(ReadAuditRequest::default())
            .await
            .expect("read")
            .into_inner()
            .records;
        let records: Vec<_> = records
            .into_iter()
            .filter(|r| r.action != "read-audit")
            .collect();
        if records.len() >= 3 {
            break records;
        }
    });
    assert!(
        records.iter().all(|r| r.action == "check"),
        "the refused add left no record"
    );
    let s = admin
        .get_status(GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.national_data_opt_outs, 0);
    server.stop().await;
}

/// A check under a legal basis: RELEASE with the basis named where it lifts the opt-out, the
/// type 1 opt-out standing where it does not, only the bases the key's entry lists, a reference
/// required, and both in the audit.
#[tokio::test]
async fn exempt_legal_bases_by_key_release_with_the_basis_named_and_are_audited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut config, keys) = secured(dir.path());
    // A key of RX3 that may claim consent, a CAG approval setting the opt-out aside and a legal
    // requirement, appended to the keys file.
    let (exempt_key, entry) = new_key("RX3", &[Role::Checker]);
    let path = config.keys_file.clone().expect("keys file");
    let mut text = std::fs::read_to_string(&path).expect("read");
    text.push_str(&format!(
        "\n{entry}exempt_bases = [\"consent\", \"cag-opt-out-set-aside\", \"legal-requirement\"]\n"
    ));
    std::fs::write(&path, text).expect("write");
    config.keys_reload = Duration::from_secs(60);
    let server = TestServer::start_with(config).await;
    let ch = server.channel().await;
    let n = valid_numbers(4_600_000_000, 3);
    let mut admin = admin_client(ch.clone(), Some(&keys.admin));
    // n[0]: national opt-out; n[1]: type 1 opt-out; n[2]: none.
    admin
        .add_opt_outs(change_request(
            vec![n[0].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add");
    let v = admin
        .add_opt_outs(change_request(vec![n[1].clone()], OptOutType::Type1))
        .await
        .expect("add")
        .into_inner()
        .version;

    let ask = |key: String, basis: LegalBasis, reference: &str| {
        let (ch, n, v, reference) = (ch.clone(), n.clone(), v.clone(), reference.to_string());
        async move {
            let mut req = check_request(n, Purpose::Research);
            req.origin = DataOrigin::GpPractice as i32;
            req.at_least_version = v;
            req.legal_basis = basis as i32;
            req.basis_reference = reference;
            check_client(ch, Some(&key)).check(req).await.map(|r| {
                r.into_inner()
                    .decisions
                    .iter()
                    .map(outcome)
                    .collect::<Vec<_>>()
            })
        }
    };
    let release = |r: Reason| (Outcome::Release, r);
    // Consent lifts both types: every number released, the reason naming the basis.
    assert_eq!(
        ask(exempt_key.clone(), LegalBasis::Consent, "IRAS 123456")
            .await
            .expect("consent"),
        vec![release(Reason::ExemptConsent); 3]
    );
    // A CAG approval that sets the opt-out aside lifts the national opt-out; the GP practice's
    // type 1 objection stands.
    assert_eq!(
        ask(
            exempt_key.clone(),
            LegalBasis::CagOptOutSetAside,
            "CAG 10-02(d)/2026"
        )
        .await
        .expect("s251"),
        vec![
            release(Reason::ExemptCagOptOutSetAside),
            (Outcome::Withhold, Reason::Type1OptOut),
            release(Reason::ExemptCagOptOutSetAside)
        ]
    );
    // A legal requirement lifts the national opt-out, and type 1 stands (s259 collections are
    // what type 1 objections exist to stop).
    assert_eq!(
        ask(
            exempt_key.clone(),
            LegalBasis::LegalRequirement,
            "HSCA 2012 s259 direction"
        )
        .await
        .expect("legal requirement"),
        vec![
            release(Reason::ExemptLegalRequirement),
            (Outcome::Withhold, Reason::Type1OptOut),
            release(Reason::ExemptLegalRequirement)
        ]
    );
    // A CAG basis needs the approval's reference.
    let e = ask(exempt_key.clone(), LegalBasis::CagOptOutSetAside, "IRAS 1")
        .await
        .expect_err("not a CAG reference");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("not a CAG approval reference"),
        "{e:?}"
    );
    // No basis: as before this field existed.
    assert_eq!(
        ask(exempt_key.clone(), LegalBasis::None, "")
            .await
            .expect("none"),
        vec![
            (Outcome::Withhold, Reason::NationalDataOptOut),
            (Outcome::Withhold, Reason::Type1OptOut),
            release(Reason::NoOptOut)
        ]
    );
    // A basis the key's entry does not list, or any basis from a key with none listed.
    let e = ask(exempt_key.clone(), LegalBasis::PublicInterest, "ref")
        .await
        .expect_err("not listed");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("public-interest"), "{e:?}");
    let e = ask(keys.checker.clone(), LegalBasis::Consent, "ref")
        .await
        .expect_err("not listed");
    assert_eq!(e.code(), Code::PermissionDenied);
    // An exempt basis without its reference.
    let e = ask(exempt_key.clone(), LegalBasis::Consent, " ")
        .await
        .expect_err("no reference");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("basis_reference is required"), "{e:?}");

    // The audit names the basis and its reference.
    let mut reader = admin_client(ch.clone(), Some(&keys.admin));
    let records = eventually_records(&mut reader, "RX3").await;
    let s251 = records
        .iter()
        .find(|r| r.legal_basis == "cag-opt-out-set-aside")
        .expect("the section 251 check is recorded");
    assert_eq!(s251.basis_reference, "CAG 10-02(d)/2026");
    assert_eq!(s251.applied, 2);
    assert!(
        records
            .iter()
            .any(|r| r.legal_basis == "consent" && r.applied == 3)
    );
    server.stop().await;
}

/// RX3's check records, once the four answered checks are written.
async fn eventually_records(
    reader: &mut OptOutAdminClient<Authed>,
    organisation: &str,
) -> Vec<optout::api::proto::AuditEntry> {
    poll!("the checks recorded", Duration::from_secs(10), {
        let found: Vec<_> = reader
            .read_audit(ReadAuditRequest {
                organisation: organisation.into(),
                limit: 100,
                ..ReadAuditRequest::default()
            })
            .await
            .expect("read")
            .into_inner()
            .records
            .into_iter()
            .filter(|r| r.action == "check")
            .collect();
        if found.len() >= 4 {
            return found;
        }
    })
}

/// Issue 27, item 9: three TCP connections opened and left silent took every place of
/// `--max-connections 3` for as long as the idle timeout (ten minutes). A connection that has
/// sent no request within `--first-request-timeout-secs` is closed; and one peer address holds at
/// most `--max-connections-per-peer` places.
#[tokio::test]
async fn silent_connections_lose_their_places_and_one_peer_cannot_take_them_all() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.max_connections = 3;
    config.max_connections_per_peer = Some(3);
    config.first_request_timeout = Duration::from_secs(1);
    let server = TestServer::start_with(config).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let silent: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(server.addr).expect("connect"))
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let req = || check_request(valid_numbers(4_000_000_000, 1), Purpose::Research);
    let started = std::time::Instant::now();
    poll!("a check gets a place again", Duration::from_secs(5), {
        if let Ok(ch) = Channel::from_shared(server.url.clone())
            .expect("url")
            .connect()
            .await
            && check_client(ch, None).check(req()).await.is_ok()
        {
            break;
        }
    });
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the silent connections held the places at first"
    );
    drop(silent);
    server.stop().await;

    // One peer address (127.0.0.2) may hold two of ten places: its third is closed at once,
    // while another address (127.0.0.1) is still served.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.max_connections = 10;
    config.max_connections_per_peer = Some(2);
    let server = TestServer::start_with(config).await;
    let from_peer = || {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("addr"))
            .expect("bind 127.0.0.2");
        socket
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            from_peer()
                .connect(server.addr)
                .await
                .expect("connect")
                .into_std()
                .expect("std"),
        );
    }
    let mut third = held.pop().expect("third");
    third.set_nonblocking(false).expect("blocking");
    third
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    // Off the runtime: the server runs on it (in this process).
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 16];
        third.read(&mut buf)
    })
    .await
    .expect("join");
    assert!(
        matches!(read, Ok(0))
            || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the peer's third connection is closed at once: {read:?}"
    );
    check_client(server.channel().await, None)
        .check(req())
        .await
        .expect("another address is served");
    drop(held);
    server.stop().await;
}

/// A purpose is granted per key: a checker key whose entry lists no purposes may ask for research
/// and planning, and direct care (which releases every valid number) is PERMISSION_DENIED and
/// counted; a key granted direct care gets it.
#[tokio::test]
async fn direct_care_is_refused_to_a_key_not_granted_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut config, keys) = secured(dir.path());
    config.keys_reload = Duration::from_secs(60);
    let server = TestServer::start_with(config).await;
    let ch = server.channel().await;
    let n = valid_numbers(4_700_000_000, 2);
    let v = admin_client(ch.clone(), Some(&keys.admin))
        .add_opt_outs(change_request(
            vec![n[0].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add")
        .into_inner()
        .version;
    let ask = |key: String, purpose: Purpose| {
        let (ch, n, v) = (ch.clone(), n.clone(), v.clone());
        async move {
            let mut req = check_request(n, purpose);
            req.at_least_version = v;
            check_client(ch, Some(&key)).check(req).await.map(|r| {
                r.into_inner()
                    .decisions
                    .iter()
                    .map(outcome)
                    .collect::<Vec<_>>()
            })
        }
    };
    let e = ask(keys.checker.clone(), Purpose::DirectCare)
        .await
        .expect_err("a checker key without direct care granted asked for direct care");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("direct-care"), "{e:?}");
    assert_eq!(
        ask(keys.checker.clone(), Purpose::Research)
            .await
            .expect("research is granted by default"),
        vec![
            (Outcome::Withhold, Reason::NationalDataOptOut),
            (Outcome::Release, Reason::NoOptOut)
        ]
    );
    // An admin key is no different: direct care only by name.
    let e = ask(keys.admin.clone(), Purpose::DirectCare)
        .await
        .expect_err("an admin key without direct care");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    server.stop().await;

    // A key granted direct care (and nothing else), added to the file while the server runs.
    let (care_key, entry) = new_key("RX4", &[Role::Checker]);
    let path = dir.path().join("keys.toml");
    let mut text = std::fs::read_to_string(&path).expect("read");
    text.push_str(&format!("\n{entry}purposes = [\"direct-care\"]\n"));
    std::fs::write(&path, text).expect("write");
    let mut config = test_config(&dir.path().join("data"));
    config.keys_file = Some(path);
    let server = TestServer::start_with(config).await;
    let ch = server.channel().await;
    let ask = |key: String, purpose: Purpose| {
        let ch = ch.clone();
        let n = n.clone();
        async move {
            check_client(ch, Some(&key))
                .check(check_request(n, purpose))
                .await
                .map(|r| {
                    r.into_inner()
                        .decisions
                        .iter()
                        .map(outcome)
                        .collect::<Vec<_>>()
                })
        }
    };
    assert_eq!(
        ask(care_key.clone(), Purpose::DirectCare)
            .await
            .expect("granted"),
        vec![(Outcome::Release, Reason::PurposeExempt); 2]
    );
    let e = ask(care_key, Purpose::Research)
        .await
        .expect_err("not granted research");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    server.stop().await;
}
