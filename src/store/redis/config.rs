//! Where the Redis store is and how it behaves: the settings `optout` builds from its flags.

use std::time::Duration;

/// Settings of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` (TLS) URL. Behind Sentinel its host is not used: it carries the
    /// credentials, database and TLS mode for the Redis nodes the sentinels name.
    pub url: String,
    /// Redis Sentinel: when set, the store follows the master the sentinels name.
    pub sentinel: Option<SentinelConfig>,
    /// Redis Cluster: when set, these are some of its nodes (`host:port`), and the store uses the
    /// cluster layout (see the module documentation).
    pub cluster: Option<Vec<String>>,
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
}

impl RedisConfig {
    /// Defaults for a URL.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "optout:".into(),
            log_len: 100_000,
            response_timeout: Duration::from_millis(1000),
            connect_timeout: Duration::from_millis(1000),
            audit_len: 10_000_000,
            sentinel: None,
            cluster: None,
            shards: 64,
            replicas_ack: 0,
            replicas_ack_timeout: Duration::from_millis(2000),
            assume_durable: false,
        }
    }

    /// Where the store is, for messages and logs (no password).
    pub fn describe(&self) -> String {
        match (&self.sentinel, &self.cluster) {
            (_, Some(nodes)) => format!("Redis Cluster at {}", redact_nodes(nodes)),
            (Some(s), None) => format!(
                "Redis master {:?} via sentinels {}",
                s.master_name,
                redact_nodes(&s.addrs)
            ),
            (None, None) => redact_url(&self.url),
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

#[cfg(test)]
mod tests {
    use super::*;

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
