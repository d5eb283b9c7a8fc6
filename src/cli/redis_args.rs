//! Where the Redis store is: the flags of `serve`, `init-store` and `audit verify`, and the store
//! configuration they make.

use std::time::Duration;

use clap::Args;

use super::{CliError, serve::ms};
use crate::store::redis::{
    RedisConfig, SentinelConfig, Topology, defaults as redis_defaults, with_password,
};

/// Where the Redis store is.
#[derive(Args, Debug, Clone)]
pub(super) struct RedisArgs {
    /// The shared Redis store (redis://, or rediss:// for TLS). Without it (and without
    /// --redis-sentinel), serve uses the embedded store. Behind Sentinel its host is not used: it
    /// only carries the password, database and TLS mode of the Redis nodes.
    #[arg(long, env = "OPTOUT_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// The Redis password, when it is kept apart from the URL (Bitnami's Redis chart keeps it in
    /// a Secret key `redis-password`): put into the URL (behind Sentinel or in a Cluster, into
    /// the nodes' settings). A URL with a password of its own is then an error.
    #[arg(long, env = "OPTOUT_REDIS_PASSWORD", hide_env_values = true)]
    redis_password: Option<String>,
    /// Redis Sentinel: the sentinels' host:port, comma-separated. The store follows the master
    /// they name through failovers.
    #[arg(
        long,
        env = "OPTOUT_REDIS_SENTINEL",
        value_delimiter = ',',
        hide_env_values = true
    )]
    redis_sentinel: Vec<String>,
    /// Redis Cluster: some of its nodes' host:port, comma-separated (the rest are discovered).
    /// The opt-out data is sharded across the cluster's masters.
    #[arg(
        long,
        env = "OPTOUT_REDIS_CLUSTER",
        value_delimiter = ',',
        conflicts_with = "redis_sentinel",
        hide_env_values = true
    )]
    redis_cluster: Vec<String>,
    /// The master's name in the sentinels' configuration (`sentinel monitor NAME ...`).
    #[arg(long, env = "OPTOUT_REDIS_SENTINEL_MASTER", default_value = redis_defaults::SENTINEL_MASTER)]
    redis_sentinel_master: String,
    /// Replicas that must confirm each opt-out change (Redis WAIT) before it is acknowledged, so a
    /// failover cannot lose it (in a cluster: by every master's replicas). Default: 1 behind
    /// Sentinel or in a cluster, 0 for a single Redis.
    #[arg(long, env = "OPTOUT_REDIS_REPLICAS_ACK")]
    redis_replicas_ack: Option<u32>,
    /// Trust that this Redis keeps every acknowledged write through a crash although the service
    /// cannot read its persistence settings (a managed Redis that hides CONFIG). Without it, a
    /// single Redis (no replica acknowledgement) must run `appendonly yes` with `appendfsync
    /// always`, or serve and init-store refuse it. See docs/src/guarantees.md.
    #[arg(long, env = "OPTOUT_REDIS_ASSUME_DURABLE")]
    redis_assume_durable: bool,
    /// How long a change waits for those confirmations, in ms, before it fails unacknowledged.
    #[arg(long, env = "OPTOUT_REDIS_REPLICAS_ACK_MS", default_value_t = ms(redis_defaults::REPLICAS_ACK_TIMEOUT), value_parser = super::words::millis)]
    redis_replicas_ack_ms: u64,
    /// Prefix of every key the service uses in Redis.
    #[arg(long, env = "OPTOUT_REDIS_PREFIX", default_value = redis_defaults::PREFIX)]
    redis_prefix: String,
    /// Change-log entries kept in Redis; a replica further behind rebuilds its filter.
    #[arg(long, env = "OPTOUT_REDIS_LOG_LEN", default_value_t = redis_defaults::LOG_LEN)]
    redis_log_len: u64,
    /// Timeout of one Redis call, in ms.
    #[arg(long, env = "OPTOUT_REDIS_TIMEOUT_MS", default_value_t = ms(redis_defaults::TIMEOUT), value_parser = super::words::millis)]
    redis_timeout_ms: u64,
    /// Audit records kept in Redis (approximately; the oldest are trimmed). Size this for the
    /// retention your information governance requires.
    #[arg(long, env = "OPTOUT_REDIS_AUDIT_LEN", default_value_t = redis_defaults::AUDIT_LEN)]
    redis_audit_len: u64,
}

impl RedisArgs {
    /// The Redis store's settings, or `None` for the embedded store.
    pub(super) fn config(&self) -> Result<Option<RedisConfig>, CliError> {
        let topology = if !self.redis_cluster.is_empty() {
            Topology::Cluster(self.redis_cluster.clone())
        } else if !self.redis_sentinel.is_empty() {
            Topology::Sentinel(SentinelConfig {
                addrs: self.redis_sentinel.clone(),
                master_name: self.redis_sentinel_master.clone(),
            })
        } else {
            match self.redis_url.clone() {
                Some(url) => Topology::Single(url),
                None => return Ok(None),
            }
        };
        let single = matches!(topology, Topology::Single(_));
        let mut config = RedisConfig::with_topology(topology);
        if !single {
            config.node_url = self.redis_url.clone();
        }
        if let Some(password) = &self.redis_password {
            match &mut config.topology {
                Topology::Single(url) => {
                    *url = with_password(url, password).map_err(CliError::Usage)?;
                }
                _ => {
                    // Behind Sentinel or in a Cluster the node settings' host is not used.
                    let base = config.node_url.as_deref().unwrap_or("redis://redis-nodes/");
                    config.node_url = Some(with_password(base, password).map_err(CliError::Usage)?);
                }
            }
        }
        if let Some(n) = self.redis_replicas_ack {
            config.replicas_ack = n;
        }
        config.assume_durable = self.redis_assume_durable;
        config.replicas_ack_timeout = Duration::from_millis(self.redis_replicas_ack_ms.max(1));
        config.prefix = self.redis_prefix.clone();
        config.log_len = self.redis_log_len.max(1);
        config.response_timeout = Duration::from_millis(self.redis_timeout_ms.max(1));
        config.connect_timeout = config.response_timeout;
        config.audit_len = self.redis_audit_len.max(1);
        Ok(Some(config))
    }
}
