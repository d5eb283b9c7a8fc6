//! What `run` needs, and every default in one place: the `optout serve` flags take their defaults
//! from [`defaults`], [`Limits::DEFAULT`] and [`FilterConfig::DEFAULT`], so a default is written
//! once.

use std::{path::PathBuf, sync::Arc, time::Duration};

use crate::{
    api::{Limits, gate::RateLimit},
    core::AuditKey,
    engine::{check_files::CheckFilesConfig, filter::FilterConfig},
    store::redis::RedisConfig,
};

/// The defaults of the server's settings.
pub mod defaults {
    use std::time::Duration;

    /// Address the gRPC port listens on.
    pub const LISTEN: &str = "127.0.0.1:50051";
    /// The embedded store's directory.
    pub const DATA_DIR: &str = "./optout-data";
    /// Change-log entries the embedded store keeps.
    pub const CHANGE_LOG_LEN: u64 = 10_000;
    /// Concurrent HTTP/2 streams per client connection.
    pub const MAX_CONCURRENT_STREAMS: u32 = 256;
    /// Client connections held at once.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// Age at which a connection is asked to reconnect.
    pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(1800);
    /// A connection idle this long is closed.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
    /// How long a new connection may take to send its first request.
    pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
    /// How often the keys file is checked for changes.
    pub const KEYS_RELOAD: Duration = Duration::from_secs(2);
    /// How long check records may fail to be written before checks withhold everything.
    pub const AUDIT_BOUND: Duration = Duration::from_secs(5);
    /// MiB of check records that may wait to be written.
    pub const AUDIT_QUEUE_MIB: u64 = 64;
    /// NHS numbers checked per second per organisation.
    pub const RATE_LIMIT: u32 = 5_000_000;
    /// NHS numbers an organisation may send at once above its rate.
    pub const RATE_BURST: u32 = 10_000_000;
    /// A check-log segment is closed at this size (MiB).
    pub const CHECK_LOG_SEGMENT_MIB: u64 = 100;
    /// Closed check-log segments kept (0: all).
    pub const CHECK_LOG_MAX_BACKUPS: usize = 0;
    /// Days closed check-log segments are kept (0: no limit).
    pub const CHECK_LOG_MAX_AGE_DAYS: u64 = 0;
    /// How often, while checks are written, a check log's position is anchored in the store.
    pub const CHECK_LOG_ANCHOR_INTERVAL: Duration = Duration::from_secs(60);
    /// How often the records of the changes trail written since the last seal are sealed.
    pub const AUDIT_SEAL_INTERVAL: Duration = Duration::from_secs(1);
    /// Days the changes trail keeps its records (0: all).
    pub const AUDIT_CHANGES_MAX_AGE_DAYS: u64 = 0;
    /// Grace for in-flight requests after the shutdown signal.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
}

pub use crate::store::StoreConfig;

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The consent store.
    pub store: StoreConfig,
    /// Filter sizing and freshness.
    pub filter: FilterConfig,
    /// Request limits.
    pub limits: Limits,
    /// Concurrent HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
    /// Client connections held at once; past it, new connections are closed at once.
    pub max_connections: usize,
    /// Client connections held at once from one peer address; `None`: a quarter of
    /// `max_connections`. (Behind a proxy or a mesh sidecar every client is one peer: raise it.)
    pub max_connections_per_peer: Option<usize>,
    /// A new connection that has sent no request by then is closed, so connections opened and
    /// left silent cannot hold the replica's places.
    pub first_request_timeout: Duration,
    /// A connection older than this is asked to close (GOAWAY) and given the shutdown grace to
    /// finish its requests: no client holds a replica forever, and load spreads over new pods.
    pub max_connection_age: Duration,
    /// A connection with no traffic for this long (keepalive pings aside) is closed. Never
    /// shorter than the request timeout plus a second, so a request that is silent while the
    /// server works on it (an import being applied) is never cut off as idle.
    pub idle_timeout: Duration,
    /// API keys; `None` runs open (the CLI allows that on loopback only).
    pub keys_file: Option<PathBuf>,
    /// How often the keys file is checked for changes.
    pub keys_reload: Duration,
    /// TLS for the gRPC port.
    pub tls: Option<TlsFiles>,
    /// The key of audit digests; `None` makes a random one for this process (development only:
    /// digests then do not match across restarts).
    pub audit_key: Option<AuditKey>,
    /// How long check records may fail to be written before checks withhold everything.
    pub audit_bound: Duration,
    /// Bytes of check records that may wait to be written; past it checks withhold everything.
    pub audit_queue_bytes: u64,
    /// Check records to segment files on this replica's disk; `None`: to the consent store.
    pub check_files: Option<CheckFilesConfig>,
    /// Records of the changes trail older than this are deleted (checked hourly); `None` keeps
    /// them all.
    pub changes_max_age: Option<Duration>,
    /// How often the changes trail is sealed (with a configured audit key only: seals under a
    /// random key would prove nothing).
    pub seal_interval: Duration,
    /// How old each type's opt-out list may be before the numbers it applies to are withheld
    /// (REASON_LIST_TOO_OLD); `None` per type: no limit.
    pub max_list_age: crate::core::coverage::MaxAge,
    /// Per-organisation request rate.
    pub rate_limit: RateLimit,
    /// A plaintext port serving only `grpc.health.v1` (Kubernetes' gRPC probes cannot use TLS).
    /// Besides the services' own statuses it answers `liveness`: SERVING while the process runs,
    /// so a replica that cannot reach Redis is taken out of traffic but not restarted.
    pub health_listener: Option<Arc<std::net::TcpListener>>,
    /// The Prometheus scrape endpoint (`GET /metrics`, plain HTTP).
    pub metrics_listener: Option<Arc<std::net::TcpListener>>,
    /// After the shutdown signal: how long in-flight requests and streams may take to finish
    /// before they are cut off.
    pub shutdown_grace: Duration,
}

/// PEM material for TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Server certificate chain.
    pub cert_pem: Vec<u8>,
    /// Server private key.
    pub key_pem: Vec<u8>,
    /// CA that signs client certificates: set for mutual TLS, where a client certificate is
    /// required and must name the key's organisation (subject O, else CN).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl ServerConfig {
    /// Defaults, on the embedded store in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        ServerConfig {
            store: StoreConfig::Embedded {
                data_dir,
                change_log_len: defaults::CHANGE_LOG_LEN,
                cache_bytes: crate::store::embedded::DEFAULT_CACHE_BYTES,
            },
            filter: FilterConfig::DEFAULT,
            limits: Limits::DEFAULT,
            max_concurrent_streams: defaults::MAX_CONCURRENT_STREAMS,
            max_connections: defaults::MAX_CONNECTIONS,
            max_connections_per_peer: None,
            first_request_timeout: defaults::FIRST_REQUEST_TIMEOUT,
            max_connection_age: defaults::MAX_CONNECTION_AGE,
            idle_timeout: defaults::IDLE_TIMEOUT,
            keys_file: None,
            keys_reload: defaults::KEYS_RELOAD,
            tls: None,
            audit_key: None,
            audit_bound: defaults::AUDIT_BOUND,
            audit_queue_bytes: defaults::AUDIT_QUEUE_MIB * 1024 * 1024,
            check_files: None,
            changes_max_age: None,
            max_list_age: crate::core::coverage::MaxAge::DEFAULT,
            seal_interval: defaults::AUDIT_SEAL_INTERVAL,
            rate_limit: RateLimit {
                per_second: defaults::RATE_LIMIT,
                burst: defaults::RATE_BURST,
            },
            health_listener: None,
            metrics_listener: None,
            shutdown_grace: defaults::SHUTDOWN_GRACE,
        }
    }

    /// Defaults, on the Redis store.
    pub fn with_redis(redis: RedisConfig) -> Self {
        ServerConfig {
            store: StoreConfig::Redis(redis),
            ..ServerConfig::new(PathBuf::new())
        }
    }

    /// The embedded store's directory, when the server uses it.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        match &self.store {
            StoreConfig::Embedded { data_dir, .. } => Some(data_dir),
            StoreConfig::Redis(_) => None,
        }
    }

    /// The Redis store's settings, when the server uses Redis.
    pub fn redis(&self) -> Option<&RedisConfig> {
        match &self.store {
            StoreConfig::Redis(r) => Some(r),
            StoreConfig::Embedded { .. } => None,
        }
    }

    /// The Redis store's settings, to change them (tests, tools).
    pub fn redis_mut(&mut self) -> Option<&mut RedisConfig> {
        match &mut self.store {
            StoreConfig::Redis(r) => Some(r),
            StoreConfig::Embedded { .. } => None,
        }
    }
}
