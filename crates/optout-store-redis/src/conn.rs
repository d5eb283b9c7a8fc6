//! How the Redis store reaches Redis: one node, the master that Redis Sentinel names, or a Redis
//! Cluster (the redis crate's async cluster client, which follows slot moves and failovers).
//!
//! A single node is reached through the redis crate's `ConnectionManager`, which reconnects to the
//! same address. Behind Sentinel the address itself changes on failover, and the crate has no
//! connection manager over a `SentinelClient`; [`SentinelConn`] is that manager: it asks the
//! sentinels for the master (the crate checks the node's `ROLE` before handing it out), keeps one
//! multiplexed connection to it, and drops it on any error that says the node is gone or is no
//! longer the master (I/O errors, timeouts, `READONLY`, `MASTERDOWN`, `LOADING`), so the next call
//! asks the sentinels again. The failing call itself fails: on the check path that is a WITHHOLD,
//! and callers that write retry.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::{
    Client, Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisConnectionInfo, RedisError,
    RedisFuture, RedisResult, ServerErrorKind, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};

use super::config::{RedisConfig, SentinelConfig, redact_nodes};
use crate::store::StoreError;

/// A connection to wherever the store's Redis currently is. Cheap to clone; clones share the
/// underlying connection.
#[derive(Clone)]
pub enum Conn {
    /// One Redis node at a fixed address.
    Direct(ConnectionManager),
    /// The master named by Redis Sentinel.
    Sentinel(SentinelConn),
    /// A Redis Cluster: each command goes to the master of its key's slot.
    Cluster(ClusterConn),
}

impl Conn {
    /// Behind Sentinel: drops the connection, so the next call asks the sentinels again.
    pub(super) fn reset(&self) {
        if let Conn::Sentinel(s) = self {
            s.reset();
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Direct(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Direct(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
            Conn::Cluster(_) => 0,
        }
    }
}

/// The sentinels shared by every [`SentinelConn`] of one store: asking them is serialised, and a
/// failed answer is not asked again for [`RESOLVE_BACKOFF`], so a dead master under load costs
/// one attempt per back-off, not one per request.
pub struct Sentinels {
    client: tokio::sync::Mutex<SentinelClient>,
    /// When resolving last failed (to back off), and why.
    failed: parking_lot::Mutex<Option<(Instant, String)>>,
    master_name: String,
}

/// How long a failed master resolution is remembered before the sentinels are asked again.
const RESOLVE_BACKOFF: Duration = Duration::from_millis(100);

impl Sentinels {
    /// `addrs` are the sentinels' `host:port` (or full `redis://` URLs); `node` carries the
    /// credentials, database and TLS mode for the Redis nodes themselves.
    pub fn new(
        addrs: &[String],
        master_name: &str,
        node: SentinelNodeConnectionInfo,
    ) -> RedisResult<Arc<Self>> {
        let urls: Vec<String> = addrs
            .iter()
            .map(|a| {
                if a.contains("://") {
                    a.clone()
                } else {
                    format!("redis://{a}")
                }
            })
            .collect();
        let client =
            SentinelClient::build(urls, master_name, Some(node), SentinelServerType::Master)?;
        Ok(Arc::new(Sentinels {
            client: tokio::sync::Mutex::new(client),
            failed: parking_lot::Mutex::new(None),
            master_name: master_name.to_string(),
        }))
    }

    /// A new connection to the current master, verified by role.
    async fn connect(
        &self,
        config: &redis::AsyncConnectionConfig,
        timeout: Duration,
    ) -> RedisResult<MultiplexedConnection> {
        if let Some((at, why)) = self.failed.lock().clone()
            && at.elapsed() < RESOLVE_BACKOFF
        {
            return Err(RedisError::from((
                ErrorKind::Io,
                "no Redis master (asked the sentinels a moment ago)",
                why,
            )));
        }
        let mut client = self.client.lock().await;
        let attempt = async {
            client
                .async_get_client()
                .await?
                .get_multiplexed_async_connection_with_config(config)
                .await
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(RedisError::from((
                ErrorKind::Io,
                "asking the sentinels for the master timed out",
                format!("{} ms", timeout.as_millis()),
            ))),
        };
        match &result {
            Ok(_) => *self.failed.lock() = None,
            Err(e) => {
                *self.failed.lock() = Some((Instant::now(), e.to_string()));
                tracing::warn!(master = %self.master_name, error = %e, "no Redis master from the sentinels");
            }
        }
        result
    }
}

/// One multiplexed connection to the master Sentinel names, re-resolved after a failure.
#[derive(Clone)]
pub struct SentinelConn {
    shared: Arc<SentinelShared>,
}

struct SentinelShared {
    sentinels: Arc<Sentinels>,
    config: redis::AsyncConnectionConfig,
    resolve_timeout: Duration,
    /// The live connection and its serial number (so a failure only drops the connection it
    /// happened on, not a newer one another task already made).
    current: parking_lot::Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Serialises reconnecting, so concurrent callers share one new connection.
    connecting: tokio::sync::Mutex<()>,
    serial: AtomicU64,
    db: i64,
}

impl SentinelConn {
    /// A connection that resolves the master on first use.
    pub fn new(
        sentinels: Arc<Sentinels>,
        config: redis::AsyncConnectionConfig,
        resolve_timeout: Duration,
        db: i64,
    ) -> Self {
        SentinelConn {
            shared: Arc::new(SentinelShared {
                sentinels,
                config,
                resolve_timeout,
                current: parking_lot::Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                serial: AtomicU64::new(0),
                db,
            }),
        }
    }

    async fn get(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(c) = self.shared.current.lock().clone() {
            return Ok(c);
        }
        let _one = self.shared.connecting.lock().await;
        if let Some(c) = self.shared.current.lock().clone() {
            return Ok(c);
        }
        let conn = self
            .shared
            .sentinels
            .connect(&self.shared.config, self.shared.resolve_timeout)
            .await?;
        let serial = self.shared.serial.fetch_add(1, Ordering::Relaxed) + 1;
        *self.shared.current.lock() = Some((serial, conn.clone()));
        Ok((serial, conn))
    }

    /// Drops the connection `serial` if `e` says its node is gone or no longer the master.
    fn judge(&self, serial: u64, e: &RedisError) {
        if must_reresolve(e) {
            let mut current = self.shared.current.lock();
            if current.as_ref().is_some_and(|(s, _)| *s == serial) {
                *current = None;
            }
        }
    }

    /// Drops the current connection, so the next call asks the sentinels again.
    pub fn reset(&self) {
        *self.shared.current.lock() = None;
    }
}

/// A Redis Cluster connection made on first use (so a replica may start before its cluster), then
/// kept: the crate's cluster connection reconnects and refreshes its slot map by itself.
#[derive(Clone)]
pub struct ClusterConn {
    shared: Arc<ClusterShared>,
}

struct ClusterShared {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
}

impl ClusterConn {
    /// A connection to the cluster `client` describes, made on first use.
    pub fn new(client: redis::cluster::ClusterClient) -> Self {
        ClusterConn {
            shared: Arc::new(ClusterShared {
                client,
                conn: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// Sends a pipeline of `count` commands to the master of `slot`, whatever slots its keys are
    /// in (they must all be served by that master, or their commands fail).
    pub async fn pipeline_to_slot(
        &self,
        pipeline: Pipeline,
        count: usize,
        slot: u16,
    ) -> RedisResult<Vec<Value>> {
        use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
        self.get()
            .await?
            .route_pipeline(
                pipeline,
                0,
                count,
                SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master)),
            )
            .await
    }

    async fn get(&self) -> RedisResult<redis::cluster_async::ClusterConnection> {
        self.shared
            .conn
            .get_or_try_init(|| self.shared.client.get_async_connection())
            .await
            .cloned()
    }
}

impl ConnectionLike for ClusterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move { self.get().await?.req_packed_command(cmd).await })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.get()
                .await?
                .req_packed_commands(pipeline, offset, count)
                .await
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// The hash-slot of a key, as Redis Cluster computes it: CRC16 (XMODEM) of the key, or of its
/// `{hash tag}` if it has a non-empty one, modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&c| c == b'{')
        .and_then(|open| {
            key[open + 1..]
                .iter()
                .position(|&c| c == b'}')
                .filter(|&len| len > 0)
                .map(|len| &key[open + 1..open + 1 + len])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % 16384
}

/// Hash tags for `n` shards of the opt-out data, one per slot range of `16384 / n` slots, so that
/// a cluster whose masters own contiguous, equal slot ranges (what `redis-cli --cluster create`
/// and `rebalance` make) holds an equal share of the shards on each master.
pub fn shard_tags(n: usize) -> Vec<String> {
    let n = n.clamp(1, 16384);
    (0..n)
        .map(|s| {
            let lo = s * 16384 / n;
            let hi = (s + 1) * 16384 / n;
            (0u32..)
                .map(|k| format!("{s}.{k}"))
                .find(|tag| (lo..hi).contains(&usize::from(key_slot(tag.as_bytes()))))
                .unwrap_or_default()
        })
        .collect()
}

/// Errors after which the connection may point at the wrong node, or at none.
fn must_reresolve(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Io
                | ErrorKind::Server(
                    ServerErrorKind::ReadOnly
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::BusyLoading
                )
        )
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (serial, mut conn) = self.get().await?;
            let r = conn.req_packed_command(cmd).await;
            if let Err(e) = &r {
                self.judge(serial, e);
            }
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (serial, mut conn) = self.get().await?;
            let r = conn.req_packed_commands(pipeline, offset, count).await;
            if let Err(e) = &r {
                self.judge(serial, e);
            }
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.shared.db
    }
}

/// The Redis nodes' settings behind Sentinel or in a cluster (user, password, database), and
/// their TLS mode (`Some(insecure)` for TLS), from [`RedisConfig::node_url`].
pub(super) fn node_settings(
    config: &RedisConfig,
) -> Result<(RedisConnectionInfo, Option<bool>), StoreError> {
    let Some(url) = &config.node_url else {
        return Ok((RedisConnectionInfo::default(), None));
    };
    let info = url.as_str().into_connection_info().map_err(|e| {
        StoreError::Unavailable(format!("--redis-url {}: {e}", super::redact_url(url)).into())
    })?;
    let tls = match info.addr() {
        redis::ConnectionAddr::TcpTls { insecure, .. } => Some(*insecure),
        _ => None,
    };
    Ok((info.redis_settings().clone(), tls))
}

/// The socket options of every connection to a Redis node: `TCP_NODELAY` on. The redis crate
/// leaves Nagle's algorithm on by default, and a command written while an earlier one's segment is
/// still unacknowledged then waits for the peer's delayed ACK (up to 40 ms on Linux): a lookup's
/// latency, and a deadline's margin, at the mercy of the kernel's timers. Redis sets it on its side.
pub(super) fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// The check, write and feed connections to one Redis node.
pub(super) fn direct_conns(
    config: &RedisConfig,
    url: &str,
    timeouts: [Duration; 3],
) -> Result<[Conn; 3], StoreError> {
    let shown = super::redact_url(url);
    let bad = |e: RedisError| StoreError::Unavailable(format!("--redis-url {shown}: {e}").into());
    let info = url.into_connection_info().map_err(bad)?;
    let client = Client::open(info.set_tcp_settings(tcp_settings())).map_err(bad)?;
    let base = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let mut conns = Vec::with_capacity(3);
    for t in timeouts {
        conns.push(Conn::Direct(
            ConnectionManager::new_lazy_with_config(
                client.clone(),
                base.clone().set_response_timeout(Some(t)),
            )
            .map_err(bad)?,
        ));
    }
    conns
        .try_into()
        .map_err(|_| StoreError::Unavailable("three connections".into()))
}

/// The check, write and feed connections to the master Redis Sentinel names.
pub(super) fn sentinel_conns(
    config: &RedisConfig,
    s: &SentinelConfig,
    timeouts: [Duration; 3],
) -> Result<[Conn; 3], StoreError> {
    let (settings, tls) = node_settings(config)?;
    let db = settings.db();
    let mut node = SentinelNodeConnectionInfo::default()
        .set_redis_connection_info(settings)
        .set_tcp_settings(tcp_settings());
    if let Some(insecure) = tls {
        node = node.set_tls_mode(if insecure {
            redis::TlsMode::Insecure
        } else {
            redis::TlsMode::Secure
        });
    }
    let sentinels = Sentinels::new(&s.addrs, &s.master_name, node).map_err(|e| {
        StoreError::Unavailable(format!("--redis-sentinel {}: {e}", redact_nodes(&s.addrs)).into())
    })?;
    Ok(timeouts.map(|t| {
        Conn::Sentinel(SentinelConn::new(
            sentinels.clone(),
            redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(Some(t)),
            config.connect_timeout * 3,
            db,
        ))
    }))
}

/// The check, write and feed connections to a Redis Cluster.
pub(super) fn cluster_conns(
    config: &RedisConfig,
    nodes: &[String],
    timeouts: [Duration; 3],
) -> Result<[Conn; 3], StoreError> {
    let (settings, tls) = node_settings(config)?;
    let tls = tls.is_some();
    let urls: Vec<String> = nodes
        .iter()
        .map(|n| {
            if n.contains("://") {
                n.clone()
            } else if tls {
                format!("rediss://{n}")
            } else {
                format!("redis://{n}")
            }
        })
        .collect();
    let mut conns = Vec::with_capacity(3);
    for t in timeouts {
        let mut builder = redis::cluster::ClusterClient::builder(urls.clone())
            .connection_timeout(config.connect_timeout)
            .response_timeout(t)
            .retries(2)
            .max_retry_wait(200)
            .tcp_settings(tcp_settings());
        if let Some(user) = settings.username() {
            builder = builder.username(user);
        }
        if let Some(password) = settings.password() {
            builder = builder.password(password);
        }
        let client = builder.build().map_err(|e| {
            StoreError::Unavailable(format!("--redis-cluster {}: {e}", redact_nodes(nodes)).into())
        })?;
        conns.push(Conn::Cluster(ClusterConn::new(client)));
    }
    conns
        .try_into()
        .map_err(|_| StoreError::Unavailable("three connections".into()))
}

/// How long one blocking read of the change log waits for news.
pub(super) const FEED_BLOCK: Duration = Duration::from_millis(250);
/// How long an admin write, import step, scan chunk or snapshot may take.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_errors_force_a_new_master() {
        let readonly = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ReadOnly),
            "READONLY",
            "You can't write against a read only replica.".to_string(),
        ));
        assert!(must_reresolve(&readonly));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(must_reresolve(&io));
        let script = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "OPTOUTDATASET",
            "marker missing".to_string(),
        ));
        assert!(!must_reresolve(&script));
    }

    #[test]
    fn slots_match_redis_and_shards_spread_evenly() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(key_slot(b"{optout:}marker"), 1455);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"a{foo}b"), 12182);
        assert_eq!(key_slot(b"{}foo"), 9500);
        let tags = shard_tags(64);
        assert_eq!(tags.len(), 64);
        for (s, tag) in tags.iter().enumerate() {
            let slot = usize::from(key_slot(format!("x{{{tag}}}y").as_bytes()));
            assert!((s * 256..(s + 1) * 256).contains(&slot), "{tag} -> {slot}");
        }
    }
}
