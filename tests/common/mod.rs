//! Test harness: the real server on 127.0.0.1 port 0, called through the generated clients.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use optout::{
    api::proto::{
        self, ChangeOptOutsRequest, CheckRequest, opt_out_admin_client::OptOutAdminClient,
        opt_out_check_client::OptOutCheckClient,
    },
    core::{AuditQuery, AuditRecord, NhsNumber, OptOutType, Version},
    server::{ServerConfig, open_embedded, serve},
    store::{
        ChangeKind, ConsentStore, Feed, ImportMode, ImportSession, Lookup, OptOutRecord, Scan,
        StoreError, StoreStatus, WriteOutcome,
    },
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

/// A small configuration suited to tests.
pub fn test_config(data_dir: &Path) -> ServerConfig {
    let mut c = ServerConfig::new(data_dir.to_path_buf());
    c.filter.capacity = 10_000;
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

    pub async fn admin_client(&self) -> OptOutAdminClient<Channel> {
        OptOutAdminClient::new(self.channel().await)
    }

    /// Health status of the whole server (""), or -1 if it cannot be asked.
    pub async fn health(&self) -> i32 {
        let Ok(ch) = Channel::from_shared(self.url.clone())
            .expect("url")
            .connect()
            .await
        else {
            return -1;
        };
        let mut h = HealthClient::new(ch);
        h.check(HealthCheckRequest {
            service: String::new(),
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
        nhs_numbers: numbers.into_iter().map(Into::into).collect(),
        purpose: purpose as i32,
        origin: proto::DataOrigin::Unspecified as i32,
        at_least_version: String::new(),
        extract_id: "test-extract".into(),
    }
}

pub fn change_request(numbers: Vec<String>, t: proto::OptOutType) -> ChangeOptOutsRequest {
    ChangeOptOutsRequest {
        nhs_numbers: numbers,
        r#type: t as i32,
        source: "test".into(),
    }
}

pub fn outcome(d: &proto::Decision) -> (proto::Outcome, proto::Reason) {
    (
        proto::Outcome::try_from(d.outcome).expect("known outcome"),
        proto::Reason::try_from(d.reason).expect("known reason"),
    )
}

/// The real embedded store with switches that make parts of it fail or stall, to pin what the
/// service does when its store cannot answer.
pub struct FaultyStore {
    pub inner: Arc<dyn ConsentStore>,
    pub feed_down: AtomicBool,
    pub lookup_down: AtomicBool,
    pub lookup_delay_ms: AtomicU64,
    /// Audit writes fail (and so do admin changes, which write their audit record with them).
    pub audit_down: AtomicBool,
    /// Audit writes of more records than this at once fail (0: no limit), as a store that
    /// refuses a write too large for it would.
    pub audit_max_records: AtomicU64,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ConsentStore>) -> Arc<Self> {
        Arc::new(FaultyStore {
            inner,
            feed_down: AtomicBool::new(false),
            lookup_down: AtomicBool::new(false),
            lookup_delay_ms: AtomicU64::new(0),
            audit_down: AtomicBool::new(false),
            audit_max_records: AtomicU64::new(0),
        })
    }
}

fn down() -> StoreError {
    StoreError::Unavailable("switched off by the test".into())
}

#[async_trait]
impl ConsentStore for FaultyStore {
    fn kind(&self) -> &'static str {
        "faulty-embedded"
    }

    async fn lookup(&self, numbers: &[NhsNumber]) -> Result<Lookup, StoreError> {
        let delay = self.lookup_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.lookup_down.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.lookup(numbers).await
    }

    async fn change(
        &self,
        kind: ChangeKind,
        opt_out: OptOutType,
        numbers: &[NhsNumber],
        source: &str,
        audit: &AuditRecord,
    ) -> Result<WriteOutcome, StoreError> {
        if self.audit_down.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner
            .change(kind, opt_out, numbers, source, audit)
            .await
    }

    async fn begin_import(
        &self,
        mode: ImportMode,
        opt_out: OptOutType,
        source: &str,
    ) -> Result<Box<dyn ImportSession>, StoreError> {
        self.inner.begin_import(mode, opt_out, source).await
    }

    async fn get(&self, number: NhsNumber) -> Result<(Vec<OptOutRecord>, Version), StoreError> {
        self.inner.get(number).await
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        self.inner.status().await
    }

    async fn changes_after(
        &self,
        after: Version,
        max: usize,
        wait: Duration,
    ) -> Result<Feed, StoreError> {
        if self.feed_down.load(Ordering::SeqCst) {
            tokio::time::sleep(wait.min(Duration::from_millis(50))).await;
            return Err(down());
        }
        self.inner.changes_after(after, max, wait).await
    }

    async fn scan(&self) -> Result<Scan, StoreError> {
        if self.feed_down.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.scan().await
    }

    async fn open_dataset(&self) -> Result<String, StoreError> {
        if self.feed_down.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.open_dataset().await
    }

    async fn load_snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        if self.feed_down.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.load_snapshot().await
    }

    async fn publish_snapshot(&self, version: Version, bytes: &[u8]) -> Result<(), StoreError> {
        self.inner.publish_snapshot(version, bytes).await
    }

    fn shares_snapshots(&self) -> bool {
        self.inner.shares_snapshots()
    }

    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let max = self.audit_max_records.load(Ordering::SeqCst);
        if self.audit_down.load(Ordering::SeqCst) || (max > 0 && records.len() as u64 > max) {
            return Err(down());
        }
        self.inner.append_audit(records).await
    }

    async fn read_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.read_audit(query).await
    }

    async fn check_safe(&self) -> Result<(), StoreError> {
        self.inner.check_safe().await
    }

    async fn regression_ack(&self) -> Result<Option<String>, StoreError> {
        self.inner.regression_ack().await
    }

    async fn acknowledge_regression(&self, audit: &AuditRecord) -> Result<String, StoreError> {
        self.inner.acknowledge_regression(audit).await
    }
}

/// A real redis-server owned by a test: its own free loopback port and temporary directory,
/// append-only persistence (fsync on every write, so a kill loses nothing acknowledged), stopped
/// by PID when dropped.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    /// Arguments after the common ones (replication, cluster mode).
    extra: Vec<String>,
    /// A sentinel: this configuration file (which Sentinel rewrites) comes first.
    sentinel_conf: Option<std::path::PathBuf>,
}

fn redis_server_binary() -> String {
    std::env::var("OPTOUT_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(Vec::new())
    }

    /// A Redis node with extra command-line arguments.
    pub fn start_with(extra: Vec<String>) -> RedisServer {
        Self::start_on_port(free_port(), extra)
    }

    /// A Redis Cluster node: its port and its cluster bus port (port + 10000) are both free.
    pub fn start_cluster_node(extra: Vec<String>) -> RedisServer {
        let port = loop {
            let p = free_port();
            if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
                break p;
            }
        };
        Self::start_on_port(port, extra)
    }

    fn start_on_port(port: u16, extra: Vec<String>) -> RedisServer {
        let mut server = RedisServer {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            extra,
            sentinel_conf: None,
        };
        server.spawn();
        server
    }

    /// A replica of the node on `master_port`.
    pub fn start_replica_of(master_port: u16) -> RedisServer {
        Self::start_with(vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            master_port.to_string(),
        ])
    }

    /// A sentinel watching the master on `master_port` as `name`, with quorum 2 and timings short
    /// enough for a test: down after 1 s of silence.
    pub fn start_sentinel(master_port: u16, name: &str) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 4000\n\
                 sentinel parallel-syncs {name} 1\n"
            ),
        )
        .expect("write sentinel.conf");
        let mut server = RedisServer {
            port: free_port(),
            dir,
            child: None,
            extra: Vec::new(),
            sentinel_conf: Some(conf),
        };
        server.spawn();
        server
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let mut command = std::process::Command::new(redis_server_binary());
        if let Some(conf) = &self.sentinel_conf {
            command.arg(conf).arg("--sentinel");
        }
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--protected-mode", "yes", "--logfile", "redis.log"]);
        if self.sentinel_conf.is_none() {
            command.args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ]);
        }
        let child = command
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}. Run the tests with `bash scripts/test.sh`, which \
                     installs redis-server (Debian/Ubuntu: apt-get install redis-server)",
                    redis_server_binary()
                )
            });
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let mut buf = [0u8; 64];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf)
                        .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
                {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and data directory: the data comes back.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts again on the same port with its data gone (a restart without persistence; a cluster
    /// node keeps its cluster configuration, so it comes back owning its slots, empty).
    pub fn restart_empty(&mut self) {
        self.kill();
        for entry in std::fs::read_dir(self.dir.path())
            .expect("read dir")
            .flatten()
        {
            let p = entry.path();
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(&p);
            } else if p
                .file_name()
                .is_some_and(|n| n != "redis.log" && n != "nodes.conf")
            {
                let _ = std::fs::remove_file(&p);
            }
        }
        self.spawn();
    }

    /// Writes an RDB snapshot now (`SAVE`): what a restart of a Redis without AOF comes back to.
    pub async fn save(&self) {
        let _: () = redis::cmd("SAVE")
            .query_async(&mut self.connection().await)
            .await
            .expect("SAVE");
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A server configuration on a Redis store under `prefix`.
pub fn redis_config(redis: &RedisServer, prefix: &str, scratch: &Path) -> ServerConfig {
    let mut c = test_config(scratch);
    let mut r = optout::store::redis::RedisConfig::new(redis.url());
    r.prefix = prefix.to_string();
    r.response_timeout = Duration::from_millis(2000);
    r.connect_timeout = Duration::from_millis(300);
    c.store = optout::server::StoreConfig::Redis(r);
    c.filter.snapshot_interval = Duration::from_millis(200);
    c
}

/// Writes the dataset marker, as `optout init-store` does.
pub async fn init_redis(config: &ServerConfig) -> String {
    let store =
        optout::store::redis::RedisStore::connect(config.redis().expect("redis")).expect("connect");
    store.init(64).await.expect("init")
}

impl TestServer {
    /// Starts the server as the binary does: on Redis when configured.
    pub async fn start_redis(config: ServerConfig) -> TestServer {
        let store: Arc<dyn ConsentStore> = Arc::new(
            optout::store::redis::RedisStore::connect(config.redis().expect("redis"))
                .expect("connect"),
        );
        Self::start_on(store, config).await
    }
}

pub fn import(numbers: &[String], commit: bool) -> proto::ImportOptOutsRequest {
    proto::ImportOptOutsRequest {
        mode: proto::ImportMode::Replace as i32,
        r#type: proto::OptOutType::NationalDataOptOut as i32,
        source: "replace".into(),
        nhs_numbers: numbers.to_vec(),
        commit,
    }
}

/// Two replicas on the initialised store of `config`: a REPLACE import of 3,000 opt-outs by one,
/// while the other checks numbers of the old and the new list; no check ever sees half of each.
pub async fn replace_import_never_shows_half_a_list(config: ServerConfig) {
    let writer = TestServer::start_redis(config.clone()).await;
    let reader = Arc::new(TestServer::start_redis(config.clone()).await);
    let old = valid_numbers(4_400_000_000, 3000);
    let new = valid_numbers(4_500_000_000, 3000);
    let mut admin = writer.admin_client().await;
    admin
        .import_opt_outs(tokio_stream::iter(vec![import(&old, true)]))
        .await
        .expect("first list");
    let mut both: Vec<String> = old.iter().step_by(10).cloned().collect();
    let probe_new: Vec<String> = new.iter().step_by(10).cloned().collect();
    let split = both.len();
    both.extend(probe_new);

    let stop = Arc::new(AtomicBool::new(false));
    let states = {
        let (reader, stop, both) = (reader.clone(), stop.clone(), both.clone());
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut client = reader.check_client().await;
            while !stop.load(Ordering::SeqCst) {
                let r = client
                    .check(check_request(both.clone(), proto::Purpose::Research))
                    .await
                    .expect("check")
                    .into_inner();
                let w: Vec<bool> = r
                    .decisions
                    .iter()
                    .map(|d| outcome(d).0 == proto::Outcome::Withhold)
                    .collect();
                let old_state = w[..split].iter().all(|x| *x) && w[split..].iter().all(|x| !*x);
                let new_state = w[..split].iter().all(|x| !*x) && w[split..].iter().all(|x| *x);
                assert!(
                    old_state || new_state,
                    "a check saw half a list: {} of {} old withheld, {} of {} new withheld",
                    w[..split].iter().filter(|x| **x).count(),
                    split,
                    w[split..].iter().filter(|x| **x).count(),
                    w.len() - split
                );
                seen.insert(new_state);
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let chunks: Vec<proto::ImportOptOutsRequest> = new
        .chunks(500)
        .enumerate()
        .map(|(i, c)| import(c, i == new.len() / 500 - 1))
        .collect();
    let r = admin
        .import_opt_outs(tokio_stream::iter(chunks))
        .await
        .expect("replace")
        .into_inner();
    assert_eq!((r.added, r.removed), (3000, 3000));
    let done = std::time::Instant::now();
    while done.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let seen = states.await.expect("never half a list");
    assert!(seen.contains(&true), "checks saw the new list");
    let s = reader
        .admin_client()
        .await
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.national_data_opt_outs, 3000);
    writer.stop().await;
    Arc::try_unwrap(reader)
        .ok()
        .expect("sole owner")
        .stop()
        .await;
}
