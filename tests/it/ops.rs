//! Running it like production, through the real binary: the health port, Prometheus metrics, JSON
//! logs with request ids, the config file's order of precedence, and graceful shutdown.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::common::{change_request, check_request, valid_numbers};
use optout::api::proto::{
    OptOutType, Purpose, opt_out_admin_client::OptOutAdminClient,
    opt_out_check_client::OptOutCheckClient,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_optout");

/// A running `optout serve` and everything it wrote to stderr so far.
struct Served {
    child: Child,
    grpc: String,
    health: String,
    metrics: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Served {
    /// Starts serve on free loopback ports (gRPC, health, metrics) with extra args and env, and
    /// waits until it is SERVING.
    async fn start(data: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Served {
        let served = Self::spawn(data, extra, env).await;
        eventually!(
            "SERVING",
            Duration::from_secs(20),
            served.health_of("optout.v1.OptOutCheck").await == Some(ServingStatus::Serving)
        );
        served
    }

    /// Starts serve and returns once it has said where it listens (not waiting for SERVING).
    async fn spawn(data: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Served {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--health-listen",
            "127.0.0.1:0",
        ])
        .args(["--metrics-listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(extra)
        .env("OPTOUT_LOG", "info")
        .env_remove("OPTOUT_MAX_BATCH")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("serve starts");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("listening on") {
                        let _ = tx.send(line.clone());
                    }
                    lines.lock().expect("lock").push(line);
                }
            });
        }
        let banner = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
            .await
            .expect("join")
            .expect("a `listening on` line within 20 s");
        let after = |what: &str| -> String {
            let at = banner.find(what).expect(what) + what.len();
            banner[at..]
                .split(|c: char| c.is_whitespace() || c == ',' || c == '"' || c == '/')
                .find(|s| !s.is_empty())
                .expect("address")
                .to_string()
        };
        let grpc = format!("http://{}", after("listening on "));
        let health = format!("http://{}", after("health on "));
        let metrics = format!("http://{}/metrics", after("metrics on http://"));
        Served {
            child,
            grpc,
            health,
            metrics,
            stderr: lines,
        }
    }

    async fn channel(url: &str) -> Channel {
        Channel::from_shared(url.to_string())
            .expect("url")
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .expect("connects")
    }

    /// The status the health port gives `service`, or `None` if it cannot be asked.
    async fn health_of(&self, service: &str) -> Option<ServingStatus> {
        let channel = Channel::from_shared(self.health.clone())
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
            .ok()?;
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()?;
        ServingStatus::try_from(r.into_inner().status).ok()
    }

    /// GET /metrics with a plain HTTP/1.1 request (what Prometheus does).
    async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self
            .metrics
            .trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_string();
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connects");
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("request");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
            .await
            .expect("answered within 5 s")
            .expect("read");
        let text = String::from_utf8_lossy(&raw).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok);
    }

    async fn wait(mut self, within: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader thread take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let lines = self.stderr.lock().expect("lock").clone();
                return (status, lines);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the process did not exit within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one sample line of a Prometheus text page, e.g. `name{a="b"}`.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn health_port_metrics_and_json_logs_with_request_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Lists without a maximum age: this store is fed by single adds, and the releases are what
    // the metrics below count (tests/it/population.rs holds the default ages).
    let served = Served::start(
        &dir.path().join("data"),
        &[
            "--log-format",
            "json",
            "--national-max-age-days",
            "none",
            "--type-1-max-age-days",
            "none",
        ],
        &[],
    )
    .await;
    assert_eq!(
        served.health_of("liveness").await,
        Some(ServingStatus::Serving)
    );

    let numbers = valid_numbers(4_100_000_000, 4);
    let channel = Served::channel(&served.grpc).await;
    let mut add = tonic::Request::new(change_request(
        vec![numbers[0].clone()],
        OptOutType::NationalDataOptOut,
    ));
    add.metadata_mut()
        .insert("x-request-id", "ops-test-7".parse().expect("ascii"));
    let added = OptOutAdminClient::new(channel.clone())
        .add_opt_outs(add)
        .await
        .expect("add")
        .into_inner();
    let mut check = check_request(numbers.clone(), Purpose::Research);
    check.at_least_version = added.version;
    OptOutCheckClient::new(channel.clone())
        .check(check)
        .await
        .expect("check");
    // One refused request: a batch with nothing in it.
    let refused = OptOutCheckClient::new(channel)
        .check(check_request(vec![], Purpose::Research))
        .await;
    assert!(refused.is_err());

    // The check's audit record is written within about 100 ms; the store metrics count it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let page = loop {
        let page = served.scrape().await;
        if sample(&page, r#"optout_store_audit_writes_total{result="ok"}"#).is_some() {
            break page;
        }
        assert!(Instant::now() < deadline, "no audit write counted: {page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        sample(&page, r#"optout_store_feed_reads_total{result="ok"}"#).is_some_and(|n| n >= 1.0)
    );
    // The opted-out number was a "maybe": one batched store lookup, not one per number.
    assert_eq!(
        sample(&page, r#"optout_store_lookups_total{result="ok"}"#),
        Some(1.0)
    );
    assert!(sample(&page, "optout_store_lookup_numbers_total").is_some_and(|n| n >= 1.0));
    assert_eq!(
        sample(
            &page,
            r#"optout_check_numbers_total{outcome="withhold",reason="national-data-opt-out"}"#
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            r#"optout_check_numbers_total{outcome="release",reason="no-opt-out"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &page,
            r#"optout_check_requests_total{rpc="check",code="ok"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &page,
            r#"optout_check_requests_total{rpc="check",code="invalid_argument"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&page, r#"optout_check_duration_seconds_count{rpc="check"}"#),
        Some(2.0)
    );
    assert_eq!(sample(&page, "optout_filter_items"), Some(1.0));
    assert_eq!(sample(&page, "optout_filter_loaded"), Some(1.0));
    assert_eq!(sample(&page, "optout_filter_fresh"), Some(1.0));
    assert!(sample(&page, "optout_filter_bits").is_some_and(|b| b > 0.0));
    assert!(sample(&page, "optout_filter_freshness_age_seconds").is_some_and(|a| a < 5.0));
    assert!(sample(&page, "optout_audit_backlog").is_some());
    // Registered at zero before any event, so alerts and dashboards see them from the start.
    assert_eq!(
        sample(
            &page,
            r#"optout_check_numbers_total{outcome="withhold",reason="list-too-old"}"#
        ),
        Some(0.0),
        "{page}"
    );
    assert_eq!(sample(&page, "optout_rate_limited_total"), Some(0.0));
    // The admin call above is counted; the build and the process are described.
    assert_eq!(
        sample(
            &page,
            r#"optout_admin_requests_total{rpc="add_opt_outs",code="ok"}"#
        ),
        Some(1.0),
        "{page}"
    );
    assert!(page.contains(r#"optout_build_info{version=""#), "{page}");
    assert!(
        sample(&page, "process_resident_memory_bytes").is_some_and(|b| b > 0.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, r#"optout_list_expired{type="national"}"#),
        Some(0.0)
    );
    for n in &numbers {
        assert!(!page.contains(n.as_str()), "an NHS number in the metrics");
    }

    served.sigterm();
    let (status, lines) = served.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}");
    // By default the check's record is in a sealed segment in the data directory, not the store.
    let segments =
        optout::engine::check_files::segments(&dir.path().join("data").join("check-log"))
            .expect("a check log in the data directory");
    let text: String = segments
        .iter()
        .map(|s| std::fs::read_to_string(s).expect("read"))
        .collect();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("\"action\":\"check\""), "{text}");
    // JSON mode: every line on stderr is one JSON object, so a collector never meets a stray line.
    let mut request_events = 0;
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
        if v.pointer("/span/id").and_then(|i| i.as_str()) == Some("ops-test-7") {
            request_events += 1;
        }
        for n in &numbers {
            assert!(
                !line.contains(n.as_str()),
                "an NHS number in the logs: {line}"
            );
        }
    }
    assert!(
        request_events >= 1,
        "the add's log event carries its request id: {lines:#?}"
    );
}

/// The limit the server applies to one Check, read from its refusal of an oversized batch.
async fn max_batch_of(served: &Served) -> String {
    let channel = Served::channel(&served.grpc).await;
    let err = OptOutCheckClient::new(channel)
        .check(check_request(
            valid_numbers(4_200_000_000, 20),
            Purpose::Research,
        ))
        .await
        .expect_err("20 numbers are over every limit in this test");
    let msg = err.message();
    let at = msg.find("at most ").expect("names the limit") + "at most ".len();
    msg[at..]
        .split_whitespace()
        .next()
        .expect("number")
        .to_string()
}

#[tokio::test]
async fn config_file_is_beneath_environment_which_is_beneath_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("optout.toml");
    std::fs::write(&file, "max-batch = 5\nfreshness-bound-ms = 3000\n").expect("write");
    let f = file.to_str().expect("utf-8");

    let served = Served::start(&dir.path().join("a"), &["--config", f], &[]).await;
    assert_eq!(
        max_batch_of(&served).await,
        "5",
        "the file beats the default"
    );
    drop(served);

    let served = Served::start(
        &dir.path().join("b"),
        &["--config", f],
        &[("OPTOUT_MAX_BATCH", "7")],
    )
    .await;
    assert_eq!(
        max_batch_of(&served).await,
        "7",
        "the environment beats the file"
    );
    drop(served);

    let served = Served::start(
        &dir.path().join("c"),
        &["--config", f, "--max-batch", "9"],
        &[("OPTOUT_MAX_BATCH", "7")],
    )
    .await;
    assert_eq!(max_batch_of(&served).await, "9", "a flag beats both");
    drop(served);

    // Mistakes name the file and the setting, and nothing starts.
    for (body, must_name) in [
        (
            "max_batch = 5\n",
            vec!["max_batch", "max-batch", "optout.toml"],
        ),
        (
            "max-batch = \"lots\"\n",
            vec!["setting `max-batch`: invalid value \"lots\"", "optout.toml"],
        ),
        (
            "filter-capacity = [1, 2]\n",
            vec!["filter-capacity", "optout.toml"],
        ),
        ("max-batch = \n", vec!["optout.toml"]),
        // The spelling before `type-1` is still a setting (its value is checked, not refused
        // as unknown).
        (
            "type1-max-age-days = \"lots\"\n",
            vec!["setting `type1-max-age-days`: invalid value", "optout.toml"],
        ),
    ] {
        std::fs::write(&file, body).expect("write");
        let out = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--config",
                f,
                "--data-dir",
            ])
            .arg(dir.path().join("never"))
            .env_remove("OPTOUT_MAX_BATCH")
            .stdin(Stdio::null())
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{body}: {err}");
        for name in must_name {
            assert!(err.contains(name), "{body}: the error names {name}: {err}");
        }
        assert!(!dir.path().join("never").exists(), "nothing started");
    }
    // The environment variable renamed with it is refused by its old name, not ignored.
    std::fs::write(&file, "").expect("write");
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            f,
            "--data-dir",
        ])
        .arg(dir.path().join("never"))
        .env("OPTOUT_TYPE1_MAX_AGE_DAYS", "60")
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("OPTOUT_TYPE_1_MAX_AGE_DAYS"), "{err}");
    assert!(!dir.path().join("never").exists(), "nothing started");
}

#[tokio::test]
async fn sigterm_lets_a_long_check_stream_finish_and_refuses_new_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = Served::start(
        &dir.path().join("data"),
        &["--shutdown-grace-secs", "30"],
        &[],
    )
    .await;
    let channel = Served::channel(&served.grpc).await;
    const MESSAGES: usize = 120;
    const PER: usize = 500;
    let numbers = valid_numbers(4_300_000_000, PER);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let sender = tokio::spawn(async move {
        for _ in 0..MESSAGES {
            if tx
                .send(check_request(numbers.clone(), Purpose::Research))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    let mut responses = OptOutCheckClient::new(channel)
        .check_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    let mut answered = 0;
    let mut decisions = 0;
    while answered < 10 {
        let r = responses.next().await.expect("a response").expect("ok");
        answered += 1;
        decisions += r.decisions.len();
    }

    let port: u16 = served
        .grpc
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    // The check below can see a listener: this one, before SIGTERM.
    assert!(
        listening(Some(served.child.id()), port),
        "/proc shows no listener on the gRPC port before SIGTERM"
    );
    served.sigterm();
    // Health goes NOT_SERVING while the stream is still going.
    let deadline = Instant::now() + Duration::from_secs(5);
    while served.health_of("optout.v1.OptOutCheck").await != Some(ServingStatus::NotServing) {
        assert!(
            Instant::now() < deadline,
            "health still SERVING 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The listener takes no new connections: the process holds no listening socket on the
    // port. A connection attempt must fail too, unless another test's server has bound the
    // freed port meanwhile (the tests share the loopback ports; once seen in CI).
    assert!(
        !listening(Some(served.child.id()), port),
        "the gRPC listener is still open while draining"
    );
    if !listening(None, port) {
        let fresh = Channel::from_shared(served.grpc.clone())
            .expect("url")
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await;
        assert!(
            fresh.is_err(),
            "a new connection was accepted while draining"
        );
    }

    // Every message of the stream is still answered, in full, and the stream ends cleanly.
    while let Some(r) = responses.next().await {
        let r = r.expect("no message is cut off");
        assert_eq!(r.decisions.len(), PER);
        answered += 1;
        decisions += r.decisions.len();
    }
    sender.await.expect("sender");
    assert_eq!(answered, MESSAGES);
    assert_eq!(decisions, MESSAGES * PER);
    let (status, _) = served.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "exit {status:?}");
}

#[tokio::test]
async fn a_stream_that_outlives_the_grace_period_is_cut_and_the_process_still_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = Served::start(
        &dir.path().join("data"),
        &["--shutdown-grace-secs", "1"],
        &[],
    )
    .await;
    let channel = Served::channel(&served.grpc).await;
    // A stream whose client never finishes sending.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(check_request(
        valid_numbers(4_400_000_000, 10),
        Purpose::Research,
    ))
    .await
    .expect("send");
    let mut responses = OptOutCheckClient::new(channel)
        .check_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    responses.next().await.expect("a response").expect("ok");
    let t0 = Instant::now();
    served.sigterm();
    let (status, _) = served.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "exit {status:?}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "exited before the grace period: {took:?}"
    );
    drop(tx);
}

#[tokio::test]
async fn a_sigterm_while_the_server_is_still_starting_is_a_graceful_shutdown() {
    // Kubernetes may stop a pod at any moment, also before it serves: SIGTERM right after the
    // `listening on` line (while the store opens and the filter loads) must end the process
    // cleanly, with exit code 0, never by the signal's default action.
    for _ in 0..5 {
        let dir = tempfile::tempdir().expect("tempdir");
        let served = Served::spawn(&dir.path().join("data"), &[], &[]).await;
        served.sigterm();
        let (status, lines) = served.wait(Duration::from_secs(10)).await;
        assert!(
            status.success(),
            "exit {status:?}; stderr: {}",
            lines.join("\n")
        );
    }
}

/// The `x-request-id` a response carries.
fn request_id_of(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get("x-request-id")
        .expect("an x-request-id on the response")
        .to_str()
        .expect("ascii")
        .to_string()
}

#[tokio::test]
async fn every_response_carries_its_request_id_the_callers_when_sane() {
    let dir = tempfile::tempdir().expect("tempdir");
    let served = Served::start(&dir.path().join("data"), &[], &[]).await;
    let mut client = OptOutCheckClient::new(Served::channel(&served.grpc).await);
    let numbers = valid_numbers(4_500_000_000, 2);
    let with_id = |id: Option<&str>, numbers: Vec<String>| {
        let mut r = tonic::Request::new(check_request(numbers, Purpose::Research));
        if let Some(id) = id {
            r.metadata_mut()
                .insert("x-request-id", id.parse().expect("ascii"));
        }
        r
    };
    // The caller's own id comes back as it was sent.
    let ok = client
        .check(with_id(Some("extract-42.batch_7"), numbers.clone()))
        .await
        .expect("check");
    assert_eq!(request_id_of(ok.metadata()), "extract-42.batch_7");
    // Without one, the server makes one (a UUID), different for each request.
    let a = request_id_of(
        client
            .check(with_id(None, numbers.clone()))
            .await
            .expect("check")
            .metadata(),
    );
    let b = request_id_of(
        client
            .check(with_id(None, numbers.clone()))
            .await
            .expect("check")
            .metadata(),
    );
    assert_eq!(a.len(), 36, "{a}");
    assert_ne!(a, b);
    // One that is too long or holds other characters is not echoed: a fresh one instead.
    for unusable in ["x".repeat(65), "a b".to_string(), "id;drop".to_string()] {
        let got = request_id_of(
            client
                .check(with_id(Some(&unusable), numbers.clone()))
                .await
                .expect("check")
                .metadata(),
        );
        assert_ne!(got, unusable);
        assert_eq!(got.len(), 36, "{got}");
    }
    // A refused request carries it too (on the error's metadata).
    let refused = client
        .check(with_id(Some("refused-1"), vec![]))
        .await
        .expect_err("an empty batch is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(request_id_of(refused.metadata()), "refused-1");
}

/// An OTLP/gRPC trace collector on a loopback port: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut spans = self.spans.lock().expect("lock");
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

impl Collector {
    /// Serves on 127.0.0.1 port 0; returns its endpoint.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn spans_of(&self, trace_id: &[u8]) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        let spans = self.spans.lock().expect("lock");
        spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// A span attribute's value as text.
fn attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[tokio::test]
async fn traces_go_over_otlp_as_children_of_the_callers_traceparent() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Ratio 0: only callers' sampled traces are exported, none started here.
    let served = Served::start(
        &dir.path().join("data"),
        &["--otlp-endpoint", &endpoint, "--otlp-sample-ratio", "0"],
        &[],
    )
    .await;
    let mut client = OptOutCheckClient::new(Served::channel(&served.grpc).await);
    let numbers = valid_numbers(4_600_000_000, 3);
    let traced = |traceparent: Option<&str>, numbers: Vec<String>| {
        let mut r = tonic::Request::new(check_request(numbers, Purpose::Research));
        if let Some(t) = traceparent {
            r.metadata_mut()
                .insert("traceparent", t.parse().expect("ascii"));
        }
        r.metadata_mut()
            .insert("x-request-id", "traced-1".parse().expect("ascii"));
        r
    };
    let sampled = "4bf92f3577b34da6a3ce929d0e0e4736";
    let unsampled = "5bf92f3577b34da6a3ce929d0e0e4736";
    let failing = "6bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    for traceparent in [
        Some(format!("00-{sampled}-{parent}-01")),
        Some(format!("00-{unsampled}-{parent}-00")),
        None,
    ] {
        client
            .check(traced(traceparent.as_deref(), numbers.clone()))
            .await
            .expect("check");
    }
    client
        .check(traced(Some(&format!("00-{failing}-{parent}-01")), vec![]))
        .await
        .expect_err("an empty batch is refused");

    poll!(
        "the sampled spans at the collector",
        Duration::from_secs(15),
        {
            if !collector.spans_of(&hex(sampled)).is_empty()
                && !collector.spans_of(&hex(failing)).is_empty()
            {
                break;
            }
        }
    );
    let spans = collector.spans_of(&hex(sampled));
    let request = spans
        .iter()
        .find(|s| s.parent_span_id == hex(parent))
        .unwrap_or_else(|| panic!("no span is a child of the caller's: {spans:?}"));
    assert_eq!(request.name, "optout.v1.OptOutCheck/Check");
    assert_eq!(
        request.kind,
        opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server as i32
    );
    assert_eq!(attribute(request, "id").as_deref(), Some("traced-1"));
    assert_eq!(attribute(request, "rpc.system").as_deref(), Some("grpc"));
    let refused = &collector.spans_of(&hex(failing))[0];
    assert_eq!(
        refused.status.as_ref().map(|s| s.code),
        Some(opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32)
    );
    assert_eq!(
        attribute(refused, "rpc.grpc.status_code").as_deref(),
        Some("3")
    );

    // Give a stray export a moment, then: nothing of the unsampled trace, nothing started here,
    // and no NHS number in anything exported.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(collector.spans_of(&hex(unsampled)).is_empty());
    let all = collector.spans.lock().expect("lock").clone();
    let known = [hex(sampled), hex(failing)];
    assert!(
        all.iter().all(|s| known.contains(&s.trace_id)),
        "a trace started without a sampled traceparent at ratio 0: {all:?}"
    );
    let text = format!("{all:?}");
    for n in &numbers {
        assert!(!text.contains(n.as_str()), "an NHS number in a span");
    }
    served.sigterm();
    let (status, lines) = served.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "exit {status:?}");
    // The operator is told where traces go.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("traces: a span per request over OTLP to http://127.0.0.1:")),
        "{lines:?}"
    );
}

/// The chart's alerts and dashboard select check counts by reason and lists by type: each value
/// they name must be one the service exports, or the alert never fires (the labels were renamed
/// once, from `store_unavailable` to `store-unavailable`).
#[test]
fn the_charts_queries_name_only_reasons_and_types_the_service_exports() {
    let reasons: Vec<&str> = optout::core::REASON_LABELS
        .iter()
        .map(|(_, r)| *r)
        .collect();
    let types: Vec<&str> = [
        optout::core::OptOutType::NationalDataOptOut,
        optout::core::OptOutType::Type1,
    ]
    .iter()
    .map(|t| t.name())
    .collect();
    let mut named = 0;
    for file in [
        "helm/optout-service/templates/prometheusrule.yaml",
        "helm/optout-service/dashboards/optout.json",
    ] {
        let text = std::fs::read_to_string(file).expect("chart file");
        // A matcher as written in either file: reason=~\"a|b\" (escaped in both).
        for (label, known) in [("reason", &reasons), ("type", &types)] {
            for part in text.split(&format!("{label}=")).skip(1) {
                let part = part.trim_start_matches(['~', '!']);
                let part = part.trim_start_matches('\\').trim_start_matches('"');
                let Some(end) = part.find(['\\', '"']) else {
                    continue;
                };
                for value in part[..end].split('|') {
                    assert!(
                        known.contains(&value),
                        "{file}: {label}=\"{value}\" is not a label the service exports: {known:?}"
                    );
                    named += 1;
                }
            }
        }
    }
    assert!(named >= 4, "the chart selects by reason: {named}");
}

/// Whether a socket listens on loopback TCP `port` (`/proc/net/tcp{,6}`), held by process `pid`
/// (its `/proc/<pid>/fd` links name the socket's inode) or by anyone.
fn listening(pid: Option<u32>, port: u16) -> bool {
    let inodes: Option<Vec<String>> = pid.map(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|dir| {
                dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter_map(|l| {
                        let l = l.to_string_lossy().into_owned();
                        Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default()
    });
    let port = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                // local_address, state (0A: LISTEN), inode.
                f.len() > 9
                    && f[1].ends_with(&port)
                    && f[3] == "0A"
                    && inodes.as_ref().is_none_or(|i| i.iter().any(|x| x == f[9]))
            })
    })
}
