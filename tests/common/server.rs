//! The real server on 127.0.0.1 port 0, called through the generated clients.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use optout::{
    api::proto::{
        self, ChangeOptOutsRequest, CheckRequest, opt_out_admin_client::OptOutAdminClient,
        opt_out_check_client::OptOutCheckClient,
    },
    core::NhsNumber,
    server::{ServerConfig, open_embedded, serve},
    store::ConsentStore,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A running server owned by a test.
pub struct TestServer {
    pub addr: SocketAddr,
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), optout::server::ServerError>>>,
}

/// A small configuration suited to tests. Lists have no maximum age here (a store fed by single
/// adds releases what it does not hold, as most tests of other subjects expect); the default
/// limits, and a never-imported list withheld, are tested in tests/it/population.rs.
pub fn test_config(data_dir: &Path) -> ServerConfig {
    let mut c = ServerConfig::new(data_dir.to_path_buf());
    c.filter.capacity = 10_000;
    c.max_list_age = optout::core::coverage::MaxAge::NONE;
    c
}

impl TestServer {
    /// Starts the server on the embedded store in `data_dir` and waits until it is SERVING.
    pub async fn start(data_dir: &Path) -> TestServer {
        Self::start_with(test_config(data_dir)).await
    }

    /// Starts with a given configuration on the embedded store.
    pub async fn start_with(config: ServerConfig) -> TestServer {
        // After a stop in the same process, a store call that was cut off mid-way may still be
        // finishing on tokio's blocking pool (which cannot be cancelled) and hold the database
        // for a moment; a process restart, the real case, has no such overlap.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let store = loop {
            match open_embedded(&config).await {
                Ok(store) => break store,
                Err(e)
                    if e.to_string().contains("already open")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("embedded store opens: {e}"),
            }
        };
        Self::start_on(Arc::new(store), config).await
    }

    /// Starts over any store and waits until it is SERVING.
    pub async fn start_on(store: Arc<dyn ConsentStore>, config: ServerConfig) -> TestServer {
        let server = Self::start_unready(store, config).await;
        server.wait_serving().await;
        server
    }

    /// Starts over any store without waiting for SERVING.
    pub async fn start_unready(store: Arc<dyn ConsentStore>, config: ServerConfig) -> TestServer {
        // OPTOUT_TEST_LOG=debug shows the servers' logs when a test needs looking into.
        if let Ok(level) = std::env::var("OPTOUT_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(level))
                .with_test_writer()
                .try_init();
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve(listener, store, config, async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            url: format!("http://{addr}"),
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn check_client(&self) -> OptOutCheckClient<Channel> {
        OptOutCheckClient::new(self.channel().await)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    /// The decisions of one check, as (outcome, reason) pairs.
    pub async fn decide(&self, req: CheckRequest) -> Vec<(proto::Outcome, proto::Reason)> {
        self.check_client()
            .await
            .check(req)
            .await
            .expect("check")
            .into_inner()
            .decisions
            .iter()
            .map(outcome)
            .collect()
    }

    /// The replica's status (admin GetStatus).
    pub async fn status(&self) -> proto::GetStatusResponse {
        self.admin_client()
            .await
            .get_status(proto::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner()
    }

    pub async fn admin_client(&self) -> OptOutAdminClient<Channel> {
        OptOutAdminClient::new(self.channel().await)
    }

    /// Health status of the whole server (""), or -1 if it cannot be asked.
    pub async fn health(&self) -> i32 {
        self.health_of("").await
    }

    /// Health status of one health "service" (`optout.v1.OptOutCheck`: readiness; `liveness`),
    /// or -1 if it cannot be asked.
    pub async fn health_of(&self, service: &str) -> i32 {
        let Ok(ch) = Channel::from_shared(self.url.clone())
            .expect("url")
            .connect()
            .await
        else {
            return -1;
        };
        HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map(|r| r.into_inner().status)
            .unwrap_or(-1)
    }

    pub async fn wait_serving(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(ch) = Channel::from_shared(self.url.clone())
                .expect("url")
                .connect()
                .await
            {
                let mut h = HealthClient::new(ch);
                if let Ok(r) = h
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    && r.into_inner().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server did not become SERVING within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server and waits until it has released its store.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task").expect("server ran cleanly");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// `count` valid NHS numbers from `from` upwards, as ten-digit strings.
pub fn valid_numbers(from: u64, count: usize) -> Vec<String> {
    (from..)
        .filter_map(|v| NhsNumber::from_u64(v).ok())
        .take(count)
        .map(|n| n.to_string())
        .collect()
}

pub fn check_request(numbers: Vec<String>, purpose: proto::Purpose) -> CheckRequest {
    CheckRequest {
        nhs_numbers: numbers.into_iter().collect(),
        purpose: purpose as i32,
        origin: proto::DataOrigin::Unspecified as i32,
        at_least_version: String::new(),
        extract_id: "test-extract".into(),
        ..CheckRequest::default()
    }
}

/// The practice of the tests' type 1 opt-outs.
pub const PRACTICE: &str = "A83007";

/// An add or remove of `numbers`; type 1 ones are [`PRACTICE`]'s.
pub fn change_request(numbers: Vec<String>, t: proto::OptOutType) -> ChangeOptOutsRequest {
    ChangeOptOutsRequest {
        nhs_numbers: numbers,
        r#type: t as i32,
        source: "test".into(),
        practice: if t == proto::OptOutType::Type1 {
            PRACTICE.into()
        } else {
            String::new()
        },
    }
}

pub fn outcome(d: &proto::Decision) -> (proto::Outcome, proto::Reason) {
    (
        proto::Outcome::try_from(d.outcome).expect("known outcome"),
        proto::Reason::try_from(d.reason).expect("known reason"),
    )
}

/// `optout serve` as its own process (the binary the tests were built with), on a free loopback
/// port, so that a test can kill it with SIGKILL as a crash would. Killed when dropped.
pub struct ServeProcess {
    pub child: std::process::Child,
    pub url: String,
}

impl ServeProcess {
    /// Starts `optout serve` with the store's `flags` and waits until it is SERVING.
    pub async fn start(flags: &[String], scratch: &Path) -> ServeProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_optout"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(scratch.join(format!("serve-{port}")))
            .args(flags)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("optout serve");
        let server = ServeProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(ch) = Channel::from_shared(server.url.clone())
                .expect("url")
                .connect()
                .await
                && let Ok(r) = HealthClient::new(ch)
                    .check(HealthCheckRequest::default())
                    .await
                && r.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return server;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "optout serve did not become SERVING"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    /// SIGKILL, and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
