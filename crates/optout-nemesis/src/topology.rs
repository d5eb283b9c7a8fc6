//! The Redis side of a run: one Redis, a Sentinel set or a Cluster of real redis-server
//! processes, made ready for the service, and the faults the nemesis injects into them.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use redis::AsyncCommands;

use crate::{
    NemesisError,
    procs::{Programs, RedisNode, free_cluster_port, free_port, run_optout},
};

/// The master's name in the sentinels' configuration.
pub const MASTER: &str = "optout-nemesis";

/// Which topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Topology {
    /// One Redis (append-only file fsynced before every reply).
    Single,
    /// A master, a replica and three sentinels.
    Sentinel,
    /// Three masters and three replicas.
    Cluster,
}

impl Topology {
    /// Every topology.
    pub const ALL: [Topology; 3] = [Topology::Single, Topology::Sentinel, Topology::Cluster];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Topology::Single => "one Redis",
            Topology::Sentinel => "Sentinel",
            Topology::Cluster => "Cluster",
        }
    }
}

/// The running Redis processes of a run.
pub struct Store {
    /// The topology.
    pub topology: Topology,
    /// Data nodes (one; master and replica; six cluster nodes).
    pub nodes: Vec<RedisNode>,
    /// Sentinels (Sentinel only).
    pub sentinels: Vec<RedisNode>,
    dir: PathBuf,
}

impl Store {
    /// Starts the topology's processes in `dir` and waits until they are ready.
    pub async fn start(
        topology: Topology,
        programs: &Programs,
        dir: PathBuf,
    ) -> Result<Store, NemesisError> {
        let mut store = Store {
            topology,
            nodes: Vec::new(),
            sentinels: Vec::new(),
            dir: dir.clone(),
        };
        match topology {
            Topology::Single => {
                store.nodes.push(RedisNode::start(
                    programs,
                    free_port()?,
                    dir.join("redis-0"),
                    &[],
                )?);
            }
            Topology::Sentinel => {
                let master = RedisNode::start(programs, free_port()?, dir.join("redis-0"), &[])?;
                let port = master.port.to_string();
                let replica = RedisNode::start(
                    programs,
                    free_port()?,
                    dir.join("redis-1"),
                    &["--replicaof", "127.0.0.1", &port],
                )?;
                store.nodes = vec![master, replica];
                for i in 0..3 {
                    store.sentinels.push(RedisNode::sentinel(
                        programs,
                        dir.join(format!("sentinel-{i}")),
                        store.nodes[0].port,
                        MASTER,
                    )?);
                }
                store.wait_sentinels_ready().await?;
            }
            Topology::Cluster => {
                for i in 0..6 {
                    store.nodes.push(RedisNode::start(
                        programs,
                        free_cluster_port()?,
                        dir.join(format!("redis-{i}")),
                        &[
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            "nodes.conf",
                            "--cluster-node-timeout",
                            "1000",
                        ],
                    )?);
                }
                let created = Command::new(&programs.redis_cli)
                    .args(["--cluster", "create"])
                    .args(store.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
                    .args(["--cluster-replicas", "1", "--cluster-yes"])
                    .output()
                    .map_err(|e| {
                        NemesisError::Setup(format!("cannot run {}: {e}", programs.redis_cli))
                    })?;
                if !created.status.success() {
                    return Err(NemesisError::Setup(format!(
                        "redis-cli --cluster create failed: {}",
                        String::from_utf8_lossy(&created.stdout)
                    )));
                }
                store.wait_cluster_ready().await?;
            }
        }
        Ok(store)
    }

    /// The flags that put `optout` on this store.
    pub fn flags(&self) -> Vec<String> {
        match self.topology {
            Topology::Single => vec!["--redis-url".into(), self.nodes[0].url()],
            Topology::Sentinel => vec![
                "--redis-sentinel".into(),
                self.sentinels
                    .iter()
                    .map(|s| format!("127.0.0.1:{}", s.port))
                    .collect::<Vec<_>>()
                    .join(","),
                "--redis-sentinel-master".into(),
                MASTER.into(),
                "--redis-replicas-ack-ms".into(),
                "500".into(),
            ],
            Topology::Cluster => vec![
                "--redis-cluster".into(),
                self.nodes
                    .iter()
                    .take(3)
                    .map(|n| format!("127.0.0.1:{}", n.port))
                    .collect::<Vec<_>>()
                    .join(","),
                "--redis-replicas-ack-ms".into(),
                "500".into(),
            ],
        }
    }

    /// `optout init-store` on it. A first attempt that its replicas did not confirm in time (a
    /// replica still catching up after the topology came up) was applied all the same: the
    /// retries pass `--exists-ok`.
    pub async fn init(&self, programs: &Programs) -> Result<(), NemesisError> {
        let mut args = vec!["init-store".to_string()];
        args.extend(self.flags());
        if self.topology == Topology::Cluster {
            args.extend(["--shards".into(), "16".into()]);
        }
        let mut last = None;
        for attempt in 0..5 {
            if attempt == 1 {
                args.push("--exists-ok".into());
            }
            match run_optout(programs, &args) {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(last.unwrap_or_else(|| NemesisError::Setup("init-store".into())))
    }

    async fn wait_sentinels_ready(&self) -> Result<(), NemesisError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut conn = self.nodes[0].connection().await?;
        loop {
            let (_, confirmed): ((), i64) = redis::pipe()
                .set("nemesis:probe", 1)
                .cmd("WAIT")
                .arg(1)
                .arg(200)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if confirmed == 1 {
                break;
            }
            if Instant::now() > deadline {
                return Err(NemesisError::Setup(
                    "the Sentinel replica did not sync".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for s in &self.sentinels {
            loop {
                let info: std::collections::HashMap<String, String> = redis::cmd("SENTINEL")
                    .arg("MASTER")
                    .arg(MASTER)
                    .query_async(&mut s.connection().await?)
                    .await
                    .unwrap_or_default();
                let known = |k: &str| info.get(k).and_then(|v| v.parse::<u32>().ok());
                if known("num-slaves") >= Some(1) && known("num-other-sentinels") >= Some(2) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(NemesisError::Setup(
                        "the sentinels did not find the replica and each other".into(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    async fn wait_cluster_ready(&self) -> Result<(), NemesisError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.cluster_settled().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(NemesisError::Setup(
                    "the cluster did not come up with its replicas in sync".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every node says the cluster is ok, there are three masters each with a replica in sync.
    async fn cluster_settled(&self) -> bool {
        for n in self.nodes.iter().filter(|n| n.running()) {
            let Ok(mut conn) = n.connection().await else {
                return false;
            };
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !info.contains("cluster_state:ok") {
                return false;
            }
        }
        let roles = self.cluster_roles().await;
        let masters: Vec<_> = roles.iter().filter(|r| r.master).collect();
        if masters.len() != 3
            || !masters.iter().all(|m| {
                roles
                    .iter()
                    .any(|r| !r.master && r.master_id == m.id && r.link_up)
            })
        {
            return false;
        }
        // Each master's replica has caught up with it (WAIT needs no write of its own).
        for m in masters {
            let Some(node) = self.nodes.iter().find(|n| n.port == m.port) else {
                return false;
            };
            let Ok(mut conn) = node.connection().await else {
                return false;
            };
            let acked: i64 = redis::cmd("WAIT")
                .arg(1)
                .arg(500)
                .query_async(&mut conn)
                .await
                .unwrap_or(0);
            if acked < 1 {
                return false;
            }
        }
        true
    }

    /// `CLUSTER NODES` as the first node that answers sees it.
    pub async fn cluster_roles(&self) -> Vec<ClusterNode> {
        for n in self.nodes.iter().filter(|n| n.running()) {
            let Ok(mut conn) = n.connection().await else {
                continue;
            };
            let Ok(text) = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async::<String>(&mut conn)
                .await
            else {
                continue;
            };
            return text.lines().filter_map(ClusterNode::parse).collect();
        }
        Vec::new()
    }

    /// The live master ports: the one node; the master Sentinel names; the cluster's masters.
    pub async fn masters(&self) -> Vec<u16> {
        match self.topology {
            Topology::Single => vec![self.nodes[0].port],
            Topology::Sentinel => self.sentinel_master().await.into_iter().collect(),
            Topology::Cluster => self
                .cluster_roles()
                .await
                .into_iter()
                .filter(|r| r.master && !r.failed)
                .map(|r| r.port)
                .collect(),
        }
    }

    /// The master's port as the first sentinel that answers names it.
    pub async fn sentinel_master(&self) -> Option<u16> {
        for s in &self.sentinels {
            let Ok(mut conn) = s.connection().await else {
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

    /// The replica of the master on `port` (Sentinel: the other data node; Cluster: from
    /// `CLUSTER NODES`).
    pub async fn replica_of(&self, port: u16) -> Option<u16> {
        match self.topology {
            Topology::Single => None,
            Topology::Sentinel => self.nodes.iter().map(|n| n.port).find(|p| *p != port),
            Topology::Cluster => {
                let roles = self.cluster_roles().await;
                let id = roles.iter().find(|r| r.port == port)?.id.clone();
                roles
                    .iter()
                    .find(|r| !r.master && r.master_id == id)
                    .map(|r| r.port)
            }
        }
    }

    /// The node on `port`.
    pub fn node(&mut self, port: u16) -> Option<&mut RedisNode> {
        self.nodes.iter_mut().find(|n| n.port == port)
    }

    /// `CLIENT PAUSE ms ALL` on the node on `port`: it answers nothing (writes nor reads) for `ms`.
    pub async fn pause(&self, port: u16, ms: u64) -> Result<(), NemesisError> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.port == port)
            .ok_or_else(|| NemesisError::Fault(format!("no node on port {port}")))?;
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("ALL")
            .query_async(&mut node.connection().await?)
            .await?;
        Ok(())
    }

    /// `SENTINEL FAILOVER`: the sentinels promote the replica (waiting for it to catch up).
    pub async fn sentinel_failover(&self) -> Result<(), NemesisError> {
        for s in &self.sentinels {
            if let Ok(mut conn) = s.connection().await {
                let r: Result<(), _> = redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg(MASTER)
                    .query_async(&mut conn)
                    .await;
                if r.is_ok() {
                    return Ok(());
                }
            }
        }
        Err(NemesisError::Fault("no sentinel accepted FAILOVER".into()))
    }

    /// After the faults: every process runs and the topology has settled (a master with a
    /// replica in sync; a cluster with three masters, each with a replica, all ok).
    pub async fn heal(&mut self) -> Result<(), NemesisError> {
        for n in self.nodes.iter_mut().chain(self.sentinels.iter_mut()) {
            n.resume();
            if !n.running() {
                n.restart()?;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let settled = match self.topology {
                Topology::Single => true,
                Topology::Sentinel => self.sentinel_settled().await,
                Topology::Cluster => self.cluster_settled().await,
            };
            if settled {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(NemesisError::Fault(format!(
                    "the {} did not settle within 40 s of the faults healing",
                    self.topology.name()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn sentinel_settled(&self) -> bool {
        let Some(port) = self.sentinel_master().await else {
            return false;
        };
        let Some(master) = self.nodes.iter().find(|n| n.port == port) else {
            return false;
        };
        let Ok(mut conn) = master.connection().await else {
            return false;
        };
        let role: Vec<redis::Value> = redis::cmd("ROLE")
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        let is_master = matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master");
        let (_, confirmed): ((), i64) = redis::pipe()
            .set("nemesis:probe", 1)
            .cmd("WAIT")
            .arg(1)
            .arg(200)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        is_master && confirmed >= 1
    }

    /// The directory for a copy of a node's data.
    pub fn copy_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Reads a key straight from the node on `port` (for diagnostics).
    pub async fn get(&self, port: u16, key: &str) -> Option<String> {
        let node = self.nodes.iter().find(|n| n.port == port)?;
        node.connection().await.ok()?.get(key).await.ok()
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Clone, Debug)]
pub struct ClusterNode {
    /// The node id.
    pub id: String,
    /// Its port.
    pub port: u16,
    /// Whether it is a master.
    pub master: bool,
    /// Whether it is flagged failing.
    pub failed: bool,
    /// Its master's id (a replica), `-` for a master.
    pub master_id: String,
    /// Whether its link is connected.
    pub link_up: bool,
}

impl ClusterNode {
    fn parse(line: &str) -> Option<ClusterNode> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port = f.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
        let flags = f.get(2)?;
        Some(ClusterNode {
            id: f.first()?.to_string(),
            port,
            master: flags.contains("master"),
            failed: flags.contains("fail"),
            master_id: f.get(3)?.to_string(),
            link_up: f.get(7).is_some_and(|s| *s == "connected") && !flags.contains("fail"),
        })
    }
}
