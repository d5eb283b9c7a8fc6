//! Real redis-server processes owned by tests, and the server configured on them.

use std::{path::Path, sync::Arc, time::Duration};

use optout::{server::ServerConfig, store::ConsentStore};

use super::{TestServer, test_config};

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
                    && s.read(&mut buf).is_ok_and(|n| {
                        // A server with --requirepass answers an unauthenticated PING so.
                        buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH")
                    })
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

    /// Copies the append-only files as they are now: a backup taken now.
    pub fn copy_data(&self, to: &Path) {
        let from = self.dir.path().join("appendonlydir");
        std::fs::create_dir_all(to).expect("create the copy's directory");
        for entry in std::fs::read_dir(&from).expect("appendonlydir").flatten() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy an AOF file");
        }
    }

    /// Kills the node (as `SHUTDOWN NOSAVE` would leave it), puts the append-only files copied by
    /// [`RedisServer::copy_data`] back, and starts it again: a restore from an older backup.
    pub fn restore_data(&mut self, from: &Path) {
        self.kill();
        let to = self.dir.path().join("appendonlydir");
        let _ = std::fs::remove_dir_all(&to);
        std::fs::create_dir_all(&to).expect("appendonlydir");
        for entry in std::fs::read_dir(from).expect("the copy").flatten() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("restore an AOF file");
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

/// A Redis with the store initialised on it (prefix `optout:`), its scratch directory and the
/// service's configuration: what most Redis tests start from.
pub async fn initialised_redis() -> (RedisServer, tempfile::TempDir, ServerConfig) {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = redis_config(&redis, "optout:", scratch.path());
    init_redis(&config).await;
    (redis, scratch, config)
}

/// Writes the dataset marker, as `optout init-store` does.
pub async fn init_redis(config: &ServerConfig) -> String {
    let store =
        optout::store::redis::RedisStore::connect(config.redis().expect("redis")).expect("connect");
    store.init(64).await.expect("init")
}

impl TestServer {
    /// Starts the server as the binary does: on Redis when configured, the store opened by
    /// the server's own `open_store` (which hands it the audit key for record MACs).
    pub async fn start_redis(config: ServerConfig) -> TestServer {
        let store: Arc<dyn ConsentStore> = optout::server::open_store(&config)
            .await
            .expect("open the store");
        Self::start_on(store, config).await
    }
}

/// The generation of a national opt-outs data key (`{prefix}d:1:{generation}:{bucket}`, the
/// prefix with a cluster's shard tag or not), `None` for any other key.
pub fn national_generation(key: &str) -> Option<&str> {
    key.split_once("d:1:")?.1.split(':').next()
}

/// `TCP_NODELAY` on each of this process's TCP connections to 127.0.0.1:`port`, read from the
/// descriptors under /proc/self/fd (Linux shows the option nowhere else) with socket2, the socket
/// crate the redis crate itself uses. Tests share the process, so a caller looks only at the
/// ports of its own Redis.
pub fn nodelay_to(port: u16) -> Vec<bool> {
    use redis::io::tcp::socket2::SockRef;
    use std::os::fd::BorrowedFd;
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    fds.flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
        })
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|fd| {
            // SAFETY: the descriptor was open when listed. One closed (or reused) since makes the
            // calls fail with EBADF, or read another socket, which the peer's port sorts out.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let socket = SockRef::from(&fd);
            let peer = socket.peer_addr().ok()?.as_socket()?;
            (peer.port() == port).then(|| socket.tcp_nodelay().ok())?
        })
        .collect()
}

/// Waits until this process has at least `at_least` connections to each port, all with
/// `TCP_NODELAY` on: the store's connections to Redis never wait for a delayed ACK under Nagle.
/// (A connection a test itself opened and dropped may linger for a moment; it is waited out.)
pub async fn assert_nodelay(ports: &[u16], at_least: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen: Vec<(u16, Vec<bool>)> = ports.iter().map(|&p| (p, nodelay_to(p))).collect();
        if seen
            .iter()
            .all(|(_, s)| s.len() >= at_least && s.iter().all(|on| *on))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections to Redis with TCP_NODELAY on (true) or off (false), by port: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
