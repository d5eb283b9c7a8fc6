//! Where the Redis store is and how it behaves: the settings `optout` builds from its flags.

use std::{sync::Arc, time::Duration};

use crate::core::AuditKey;

/// The defaults of the Redis store's settings (also those of the `optout` flags).
pub mod defaults {
    use std::time::Duration;

    /// Prefix of every key.
    pub const PREFIX: &str = "optout:";
    /// Change-log entries kept.
    pub const LOG_LEN: u64 = 100_000;
    /// Timeout of one call, and of a connection attempt.
    pub const TIMEOUT: Duration = Duration::from_millis(1000);
    /// Audit records kept.
    pub const AUDIT_LEN: u64 = 10_000_000;
    /// Shards of the opt-out data in a cluster.
    pub const SHARDS: usize = 64;
    /// Hash buckets per opt-out type.
    pub const BUCKETS: u64 = 65_536;
    /// How long a change waits for its replicas' confirmations.
    pub const REPLICAS_ACK_TIMEOUT: Duration = Duration::from_millis(2000);
    /// The master's name in the sentinels' configuration.
    pub const SENTINEL_MASTER: &str = "mymaster";
}

/// Where the Redis store is: chosen once, at connect.
#[derive(Clone, Debug)]
pub enum Topology {
    /// One Redis at this `redis://` or `rediss://` (TLS) URL.
    Single(String),
    /// The master Redis Sentinel names, followed through failovers.
    Sentinel(SentinelConfig),
    /// A Redis Cluster: some of its nodes (`host:port`); the rest are discovered. The opt-out
    /// data is sharded across its masters (see `cluster.rs`).
    Cluster(Vec<String>),
}

/// Settings of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// Where the store is.
    pub topology: Topology,
    /// Behind Sentinel or in a Cluster: the Redis nodes' user, password, database and TLS mode,
    /// as a `redis://` or `rediss://` URL whose host is not used (`None`: no password, database
    /// 0, plaintext). One Redis takes them from its own URL.
    pub node_url: Option<String>,
    /// Shards of the opt-out data in a cluster (fixed when the store is initialised).
    pub shards: usize,
    /// Replicas that must confirm an opt-out change (`WAIT`) before it is acknowledged.
    pub replicas_ack: u32,
    /// How long to wait for those confirmations.
    pub replicas_ack_timeout: Duration,
    /// Skip the persistence check (the operator vouches for a Redis whose CONFIG is hidden).
    pub assume_durable: bool,
    /// Prefix of every key this service uses.
    pub prefix: String,
    /// Change-log entries kept.
    pub log_len: u64,
    /// How long one Redis call may take before it is an error.
    pub response_timeout: Duration,
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// Audit records kept (approximately; the oldest are trimmed past it).
    pub audit_len: u64,
    /// The audit key: each record this replica writes to the changes trail carries a MAC under
    /// it (`optout_core::seals::record_mac`), which the sealer and `audit verify-changes`
    /// require. `None` (no `--audit-key-file`): records carry none, and no replica seals them.
    pub record_key: Option<Arc<AuditKey>>,
}

impl RedisConfig {
    /// Defaults for one Redis at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig::with_topology(Topology::Single(url.into()))
    }

    /// Defaults for a topology: behind Sentinel or in a Cluster, each change waits for one
    /// replica's confirmation.
    pub fn with_topology(topology: Topology) -> Self {
        let replicas_ack = u32::from(!matches!(topology, Topology::Single(_)));
        RedisConfig {
            topology,
            node_url: None,
            prefix: defaults::PREFIX.into(),
            log_len: defaults::LOG_LEN,
            response_timeout: defaults::TIMEOUT,
            connect_timeout: defaults::TIMEOUT,
            audit_len: defaults::AUDIT_LEN,
            shards: defaults::SHARDS,
            replicas_ack,
            replicas_ack_timeout: defaults::REPLICAS_ACK_TIMEOUT,
            assume_durable: false,
            record_key: None,
        }
    }

    /// Where the store is, for messages and logs (no password).
    pub fn describe(&self) -> String {
        match &self.topology {
            Topology::Cluster(nodes) => format!("Redis Cluster at {}", redact_nodes(nodes)),
            Topology::Sentinel(s) => format!(
                "Redis master {:?} via sentinels {}",
                s.master_name,
                redact_nodes(&s.addrs)
            ),
            Topology::Single(url) => redact_url(url),
        }
    }
}

/// Where the sentinels are and which master they watch.
#[derive(Clone, Debug)]
pub struct SentinelConfig {
    /// `host:port` of each sentinel (or a full `redis://` URL, with the sentinel's password).
    pub addrs: Vec<String>,
    /// The master's name in the sentinels' configuration (`sentinel monitor NAME ...`).
    pub master_name: String,
}

/// Node addresses (`host:port` or URLs that may carry a password), fit for messages and logs.
pub fn redact_nodes(nodes: &[String]) -> String {
    nodes
        .iter()
        .map(|n| redact_url(n))
        .collect::<Vec<_>>()
        .join(",")
}

/// The URL with any password replaced, fit for messages and logs.
pub fn redact_url(url: &str) -> String {
    match redis::parse_redis_url(url) {
        Some(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        None => match url.rsplit_once('@') {
            Some((_, host)) => format!("<redacted>@{host}"),
            None => url.to_string(),
        },
    }
}

/// `url` with `password` put in (percent-encoded as a URL's user info must be), for a password
/// kept apart from the URL (`--redis-password`). A URL that carries a password already is an
/// error: which one was meant cannot be told.
pub fn with_password(url: &str, password: &str) -> Result<String, String> {
    let mut u = redis::parse_redis_url(url)
        .ok_or_else(|| format!("{}: not a redis:// or rediss:// URL", redact_url(url)))?;
    if u.password().is_some_and(|p| !p.is_empty()) {
        return Err(format!(
            "{} carries a password already, and --redis-password gives another: give one",
            redact_url(url)
        ));
    }
    // `url` encodes the user-info delimiters but passes `%` through as if it began an escape;
    // a literal `%` must reach Redis as itself.
    u.set_password(Some(&password.replace('%', "%25")))
        .map_err(|()| format!("{}: this URL cannot hold a password", redact_url(url)))?;
    Ok(u.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_kept_apart_goes_into_the_url_encoded() {
        let u = with_password("redis://cache.example:6380/2", "p@ss:w/rd%").expect("fits");
        let parsed = redis::parse_redis_url(&u).expect("parses");
        assert_eq!(parsed.password(), Some("p%40ss%3Aw%2Frd%25"));
        // And what a Redis client reads back is the password given.
        let info = redis::IntoConnectionInfo::into_connection_info(u.as_str()).expect("info");
        assert_eq!(info.redis_settings().password(), Some("p@ss:w/rd%"));
        assert_eq!(parsed.host_str(), Some("cache.example"));
        assert!(!redact_url(&u).contains("p%40ss"));
        let with_user = with_password("rediss://app@cache.example/0", "x").expect("fits");
        assert!(
            with_user.starts_with("rediss://app:x@cache.example"),
            "{with_user}"
        );
        assert!(with_password("redis://:old@cache.example", "new").is_err());
        assert!(with_password("http://cache.example", "x").is_err());
    }

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(
            redact_url("redis://user:secret@cache.example:6380/2"),
            "redis://user:***@cache.example:6380/2"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert!(!redact_url("not a url:secret@host").contains("secret"));
    }
}
