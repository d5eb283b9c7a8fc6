//! Redis Sentinel and Redis Cluster made of real redis-server processes.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use optout::{
    server::ServerConfig,
    store::redis::{SentinelConfig, Topology, key_slot, shard_tags},
};

use super::{RedisServer, redis_config, valid_numbers};

/// The master's name in the sentinels' configuration.
pub const MASTER: &str = "optout-test";

/// One master, one replica and three sentinels (quorum 2).
pub struct SentinelSet {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
}

impl SentinelSet {
    pub async fn start() -> SentinelSet {
        // No 5 s pause before the replica's first sync.
        let master = RedisServer::start_with(vec!["--repl-diskless-sync-delay".into(), "0".into()]);
        let replica = RedisServer::start_replica_of(master.port);
        let sentinels = (0..3)
            .map(|_| RedisServer::start_sentinel(master.port, MASTER))
            .collect();
        let set = SentinelSet {
            master,
            replica,
            sentinels,
        };
        // The replica must be in sync before a change can be confirmed by it, and a failover
        // needs every sentinel to know the replica and a majority of its peers.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut conn = set.master.connection().await;
        loop {
            let (_, confirmed): ((), i64) = redis::pipe()
                .set("test:probe", 1)
                .cmd("WAIT")
                .arg(1)
                .arg(200)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if confirmed == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replica did not come in sync within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for s in &set.sentinels {
            loop {
                let info = sentinel_master(s).await;
                let known = |k: &str| info.get(k).and_then(|v| v.parse::<u32>().ok());
                if known("num-slaves") >= Some(1) && known("num-other-sentinels") >= Some(2) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "sentinels did not discover the replica and each other within 30 s: {info:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        set
    }

    pub fn addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }

    /// The master's port as the first sentinel that answers names it.
    pub async fn master_port(&self) -> Option<u16> {
        for s in &self.sentinels {
            let Ok(client) = redis::Client::open(s.url()) else {
                continue;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                continue;
            };
            let addr: Result<Option<(String, u16)>, _> = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER)
                .query_async(&mut conn)
                .await;
            if let Ok(Some((_, port))) = addr {
                return Some(port);
            }
        }
        None
    }

    /// The service's configuration: the sentinels, one replica must confirm each change.
    pub fn config(&self, scratch: &std::path::Path) -> ServerConfig {
        let mut config = redis_config(&self.master, "optout:", scratch);
        let r = config.redis_mut().expect("redis");
        r.topology = Topology::Sentinel(SentinelConfig {
            addrs: self.addrs(),
            master_name: MASTER.into(),
        });
        r.replicas_ack = 1;
        r.replicas_ack_timeout = Duration::from_millis(500);
        r.response_timeout = Duration::from_millis(500);
        config
    }
}

pub async fn sentinel_master(sentinel: &RedisServer) -> HashMap<String, String> {
    let mut conn = sentinel.connection().await;
    redis::cmd("SENTINEL")
        .arg("MASTER")
        .arg(MASTER)
        .query_async(&mut conn)
        .await
        .unwrap_or_default()
}

/// Three masters and three replicas in a Redis Cluster made by `redis-cli --cluster create`.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

pub fn redis_cli() -> String {
    std::env::var("OPTOUT_TEST_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into())
}

impl Cluster {
    pub async fn start() -> Cluster {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                RedisServer::start_cluster_node(
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        "--repl-diskless-sync-delay",
                        "0",
                    ]
                    .map(String::from)
                    .to_vec(),
                )
            })
            .collect();
        let created = std::process::Command::new(redis_cli())
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e}. Run the tests with `bash scripts/test.sh`, which installs \
                     it with redis-server (Debian/Ubuntu: apt-get install redis-tools)",
                    redis_cli()
                )
            });
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        let cluster = Cluster { nodes };
        // Every node agrees the cluster is up, and every master's replica confirms a write.
        let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("cluster client");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = true;
            for n in &cluster.nodes {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut n.connection().await)
                    .await
                    .unwrap_or_default();
                ok &= info.contains("cluster_state:ok");
            }
            if ok && let Ok(mut conn) = client.get_async_connection().await {
                for tag in shard_tags(16) {
                    let _: Result<(), _> = redis::cmd("SET")
                        .arg(format!("probe{{{tag}}}"))
                        .arg(1)
                        .query_async(&mut conn)
                        .await;
                }
                let acked: i64 = redis::cmd("WAIT")
                    .arg(1)
                    .arg(200)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(0);
                if acked >= 1 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not come up with replicas in sync within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// `CLUSTER NODES` as one live node sees it: (port, is master, master's id or own id, slots).
    pub async fn roles(&self) -> Vec<(u16, bool, String, Vec<(u16, u16)>)> {
        for n in &self.nodes {
            let Ok(client) = redis::Client::open(n.url()) else {
                continue;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                continue;
            };
            let Ok(text) = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async::<String>(&mut conn)
                .await
            else {
                continue;
            };
            return text
                .lines()
                .filter_map(|line| {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    let port = f.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                    let master = f.get(2)?.contains("master") && !f.get(2)?.contains("fail");
                    let owner = if master { f[0] } else { f.get(3)? }.to_string();
                    let slots = f
                        .iter()
                        .skip(8)
                        .filter_map(|r| {
                            let (a, b) = r.split_once('-').unwrap_or((r, r));
                            Some((a.parse().ok()?, b.parse().ok()?))
                        })
                        .collect();
                    Some((port, master, owner, slots))
                })
                .collect();
        }
        Vec::new()
    }

    /// The port of the live master serving `slot`, and of its replica.
    pub async fn master_of(&self, slot: u16) -> Option<(u16, Option<u16>)> {
        let roles = self.roles().await;
        let (port, _, id, _) = roles
            .iter()
            .find(|(_, m, _, slots)| *m && slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))?;
        let replica = roles
            .iter()
            .find(|(p, m, owner, _)| !*m && owner == id && p != port)
            .map(|r| r.0);
        Some((*port, replica))
    }

    pub fn node(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of the cluster")
    }

    /// The flags that put `optout serve` on this cluster, as the in-process configuration does.
    pub fn serve_flags(&self) -> Vec<String> {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .take(3)
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        [
            "--redis-cluster",
            &nodes.join(","),
            "--redis-replicas-ack",
            "1",
            "--redis-replicas-ack-ms",
            "500",
        ]
        .map(String::from)
        .to_vec()
    }

    pub fn config(&self, scratch: &std::path::Path) -> ServerConfig {
        let mut config = redis_config(&self.nodes[0], "optout:", scratch);
        let r = config.redis_mut().expect("redis");
        r.topology = Topology::Cluster(
            self.nodes
                .iter()
                .take(3)
                .map(|n| format!("127.0.0.1:{}", n.port))
                .collect(),
        );
        r.replicas_ack = 1;
        r.replicas_ack_timeout = Duration::from_millis(500);
        r.response_timeout = Duration::from_millis(500);
        config
    }
}

/// A cluster with the store initialised on it, its scratch directory and the service's
/// configuration: what most cluster tests start from.
pub async fn initialised_cluster() -> (Cluster, tempfile::TempDir, ServerConfig) {
    let cluster = Cluster::start().await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let config = cluster.config(scratch.path());
    super::init_redis(&config).await;
    (cluster, scratch, config)
}

impl Cluster {
    /// A number whose shard lives on a master other than the metadata slot's, and that master.
    pub async fn number_off_the_metadata_master(&self, from: u64) -> (String, u16) {
        let (meta, _) = self
            .master_of(key_slot(b"{optout:}marker"))
            .await
            .expect("the metadata slot has a master");
        let tags = shard_tags(64);
        for n in valid_numbers(from, 1000) {
            let v: u64 = n.parse().expect("digits");
            let tag = &tags[(v % 64) as usize];
            let slot = key_slot(format!("optout:{{{tag}}}marker").as_bytes());
            let (master, _) = self.master_of(slot).await.expect("a master");
            if master != meta {
                return (n, master);
            }
        }
        panic!("no number of 1000 lands off the metadata master");
    }

    /// Pauses writes (scripts included) on one master for `ms`; reads go on.
    pub async fn pause_writes(&self, port: u16, ms: u64) {
        let node = self.nodes.iter().find(|n| n.port == port).expect("a node");
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("WRITE")
            .query_async(&mut node.connection().await)
            .await
            .expect("CLIENT PAUSE");
    }

    /// The change log's version (`{optout:}version`), read straight from the cluster.
    pub async fn version(&self) -> Option<String> {
        let client = redis::cluster::ClusterClient::new(self.urls()).expect("cluster client");
        let mut conn = client.get_async_connection().await.expect("connect");
        redis::cmd("GET")
            .arg("{optout:}version")
            .query_async(&mut conn)
            .await
            .unwrap_or(None)
    }

    /// Waits until the change log's version is no longer `from` (a change's first step landed).
    pub async fn wait_version_moves(&self, from: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.version().await.is_some_and(|v| v != from) {
                return;
            }
            assert!(Instant::now() < deadline, "the change was never logged");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
