//! `optout serve`: the flags, the server configuration built from them, and the start-up steps.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::Args;

use super::redis_args::RedisArgs;
use super::{CliError, announce, client::read_file};
use crate::{
    api::{Limits, gate::RateLimit},
    core::AuditKey,
    engine::{check_files::CheckFilesConfig, filter::FilterConfig},
    server::{ServerConfig, StoreConfig, TlsFiles, defaults},
    store::redis::RedisStore,
};

/// A duration in whole ms, for flags given in ms.
pub(super) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Args, Debug)]
pub(super) struct ServeArgs {
    /// Development mode, to try the service (a container's quick start): every interface
    /// (0.0.0.0:50051 unless --listen says otherwise), no keys, no TLS, and a temporary store
    /// deleted at exit, with a banner saying so. Refused with a Redis store, a keys file, a data
    /// directory, or inside Kubernetes: never for patient data.
    #[arg(
        long,
        conflicts_with_all = ["redis_url", "redis_sentinel", "redis_cluster", "keys_file", "data_dir"]
    )]
    dev: bool,
    /// Address to listen on. Beyond loopback the service also needs --keys-file, --tls-cert with
    /// --tls-key, and --audit-key-file.
    #[arg(
        long,
        env = "OPTOUT_LISTEN",
        default_value = defaults::LISTEN,
        default_value_if("dev", "true", "0.0.0.0:50051")
    )]
    listen: SocketAddr,
    /// Directory of the embedded store. Created, with a new empty dataset, if it holds no database.
    #[arg(long, env = "OPTOUT_DATA_DIR", default_value = defaults::DATA_DIR)]
    data_dir: PathBuf,
    /// Opt-outs the filter is sized for; it is rebuilt larger in the background when outgrown.
    #[arg(long, env = "OPTOUT_FILTER_CAPACITY", default_value_t = FilterConfig::DEFAULT.capacity)]
    filter_capacity: u64,
    /// The filter's false-positive target (a false positive costs one store lookup).
    #[arg(long, env = "OPTOUT_FILTER_FP_RATE", default_value_t = FilterConfig::DEFAULT.fp_rate)]
    filter_fp_rate: f64,
    /// Past this many ms without proof that the filter is caught up, every number goes to the store.
    #[arg(long, env = "OPTOUT_FRESHNESS_BOUND_MS", default_value_t = ms(FilterConfig::DEFAULT.freshness_bound), value_parser = super::words::millis)]
    freshness_bound_ms: u64,
    /// Most NHS numbers in one Check message.
    #[arg(long, env = "OPTOUT_MAX_BATCH", default_value_t = Limits::DEFAULT.max_batch)]
    max_batch: usize,
    /// Most NHS numbers in one AddOptOuts or RemoveOptOuts request.
    #[arg(long, env = "OPTOUT_MAX_ADMIN_BATCH", default_value_t = Limits::DEFAULT.max_admin_batch)]
    max_admin_batch: usize,
    /// Deadline of a request that sets none, in ms (a shorter client deadline wins).
    #[arg(long, env = "OPTOUT_DEFAULT_DEADLINE_MS", default_value_t = ms(Limits::DEFAULT.default_deadline), value_parser = super::words::millis)]
    default_deadline_ms: u64,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "OPTOUT_MAX_MESSAGE_BYTES", default_value_t = Limits::DEFAULT.max_message_bytes)]
    max_message_bytes: usize,
    /// The embedded store's page cache, in MiB: what the database may keep in this process's
    /// memory (redb's own default is 1 GiB). Lookups beyond it are served from the OS page cache.
    #[arg(long, env = "OPTOUT_EMBEDDED_CACHE_MIB", default_value_t = (crate::store::embedded::DEFAULT_CACHE_BYTES / (1024 * 1024)) as u64)]
    embedded_cache_mib: u64,
    /// Change-log entries kept; a replica further behind rebuilds its filter from a scan.
    #[arg(long, env = "OPTOUT_CHANGE_LOG_LEN", default_value_t = defaults::CHANGE_LOG_LEN)]
    change_log_len: u64,
    /// How often a replica on Redis publishes a filter snapshot for new replicas, in seconds.
    #[arg(long, env = "OPTOUT_SNAPSHOT_INTERVAL_SECS", default_value_t = FilterConfig::DEFAULT.snapshot_interval.as_secs(), value_parser = super::words::secs)]
    snapshot_interval_secs: u64,
    /// API keys (TOML; see `optout keys new`). Reloaded when it changes. Without it the service
    /// runs open, which is allowed on loopback only.
    #[arg(long, env = "OPTOUT_KEYS_FILE")]
    keys_file: Option<PathBuf>,
    /// TLS certificate chain (PEM) for the gRPC port.
    #[arg(long, env = "OPTOUT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "OPTOUT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) of client certificates: turns on mutual TLS; each client certificate must name the
    /// organisation of the key it presents (subject O, else CN).
    #[arg(long, env = "OPTOUT_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// File holding the audit key (at least 32 bytes of secret), shared by every replica.
    #[arg(long, env = "OPTOUT_AUDIT_KEY_FILE")]
    audit_key_file: Option<PathBuf>,
    /// How long check records may fail to be written before every check is withheld, in ms.
    #[arg(long, env = "OPTOUT_AUDIT_BOUND_MS", default_value_t = ms(defaults::AUDIT_BOUND), value_parser = super::words::millis)]
    audit_bound_ms: u64,
    /// MiB of check records that may wait to be written (about 8 bytes per released number);
    /// past it every check is withheld until the queue drains.
    #[arg(long, env = "OPTOUT_AUDIT_QUEUE_MIB", default_value_t = defaults::AUDIT_QUEUE_MIB)]
    audit_queue_mib: u64,
    /// Where check records go: sealed JSON-lines segment files in this directory, on this
    /// replica's disk (give each replica its own). `optout audit verify` checks them. Default:
    /// `check-log` in --data-dir.
    #[arg(long, env = "OPTOUT_CHECK_LOG_DIR")]
    check_log_dir: Option<PathBuf>,
    /// Record checks in the consent store instead (the Redis stream `audit`, trimmed past
    /// --redis-audit-len; the embedded store's `audit` table): for replicas without a disk. Redis
    /// then grows with check traffic, about 13 bytes per checked number.
    #[arg(
        long,
        env = "OPTOUT_CHECK_LOG_IN_STORE",
        conflicts_with = "check_log_dir"
    )]
    check_log_in_store: bool,
    /// A check-log segment is closed and a new one started at this size, in MiB.
    #[arg(long, env = "OPTOUT_CHECK_LOG_SEGMENT_MIB", default_value_t = defaults::CHECK_LOG_SEGMENT_MIB)]
    check_log_segment_mib: u64,
    /// Closed check-log segments kept, oldest deleted first (0: keep all).
    #[arg(long, env = "OPTOUT_CHECK_LOG_MAX_BACKUPS", default_value_t = defaults::CHECK_LOG_MAX_BACKUPS)]
    check_log_max_backups: usize,
    /// Closed check-log segments older than this many days are deleted (0: keep).
    #[arg(long, env = "OPTOUT_CHECK_LOG_MAX_AGE_DAYS", default_value_t = defaults::CHECK_LOG_MAX_AGE_DAYS, value_parser = super::words::days)]
    check_log_max_age_days: u64,
    /// How often, while checks are written, where the check log stands is recorded in the
    /// store's changes trail (also at each rotation and at shutdown), in seconds: `optout audit
    /// verify` given the store then shows lines cut from the log's end or segments deleted, up to
    /// the last such anchor. One small record per interval per busy replica.
    #[arg(long, env = "OPTOUT_CHECK_LOG_ANCHOR_INTERVAL_SECS", default_value_t = defaults::CHECK_LOG_ANCHOR_INTERVAL.as_secs(), value_parser = super::words::secs)]
    check_log_anchor_interval_secs: u64,
    /// Records of admin changes and reads older than this many days are deleted (0: keep all).
    #[arg(
        long,
        env = "OPTOUT_AUDIT_CHANGES_MAX_AGE_DAYS",
        default_value_t = defaults::AUDIT_CHANGES_MAX_AGE_DAYS,
        value_parser = super::words::days,
    )]
    audit_changes_max_age_days: u64,
    /// Past this many days since the national list's date (the date of the national check in
    /// population mode, else of the last REPLACE import), every number the national data opt-out
    /// applies to is withheld (REASON_LIST_TOO_OLD) until a fresh list is imported; before the
    /// list is first imported whole, too (REASON_LIST_NEVER_IMPORTED). Fractions allowed (0.5:
    /// twelve hours). "none": no limit, and a list never imported whole releases what it does not
    /// hold (refused for a store in population mode).
    #[arg(long, env = "OPTOUT_NATIONAL_MAX_AGE_DAYS", default_value = "30", value_parser = max_age_days)]
    national_max_age_days: MaxAgeArg,
    /// The same for the type 1 list.
    #[arg(long = "type-1-max-age-days", alias = "type1-max-age-days", env = "OPTOUT_TYPE_1_MAX_AGE_DAYS", default_value = "30", value_parser = max_age_days)]
    type_1_max_age_days: MaxAgeArg,
    /// How often the changes trail is sealed (a hash chain and a MAC over the records written
    /// since the last seal), in ms. Needs --audit-key-file.
    #[arg(long, env = "OPTOUT_AUDIT_SEAL_INTERVAL_MS", default_value_t = ms(defaults::AUDIT_SEAL_INTERVAL), value_parser = super::words::millis)]
    audit_seal_interval_ms: u64,
    /// NHS numbers checked per second per organisation (0: no limit). Every number of a Check
    /// and of each CheckStream message counts; each admin call counts as one.
    #[arg(long, env = "OPTOUT_RATE_LIMIT", default_value_t = defaults::RATE_LIMIT)]
    rate_limit: u32,
    /// NHS numbers an organisation may send at once above its rate; also the largest message
    /// it can send at all (keep it at least --max-batch).
    #[arg(long, env = "OPTOUT_RATE_BURST", default_value_t = defaults::RATE_BURST)]
    rate_burst: u32,
    /// Settings file (TOML; keys are the long flag names, e.g. `filter-capacity = 5000000`).
    /// Flags and environment variables win over it.
    #[arg(long, env = "OPTOUT_CONFIG")]
    config: Option<PathBuf>,
    /// Plaintext port serving only grpc.health.v1, for Kubernetes probes (which cannot use TLS).
    /// Also answers the service `liveness`: SERVING while the process runs.
    #[arg(long, env = "OPTOUT_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    /// Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "OPTOUT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// On SIGTERM or SIGINT: seconds in-flight requests and streams may take to finish before they
    /// are cut off. Keep it below the orchestrator's own grace period.
    #[arg(long, env = "OPTOUT_SHUTDOWN_GRACE_SECS", default_value_t = defaults::SHUTDOWN_GRACE.as_secs(), value_parser = super::words::secs)]
    shutdown_grace_secs: u64,
    /// Concurrent streams (requests) per client connection.
    #[arg(long, env = "OPTOUT_MAX_CONCURRENT_STREAMS", default_value_t = defaults::MAX_CONCURRENT_STREAMS)]
    max_concurrent_streams: u32,
    /// Client connections this replica holds at once; past it new ones are closed at once.
    #[arg(long, env = "OPTOUT_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    max_connections: usize,
    /// Client connections held at once from one peer address; past it new ones from that address
    /// are closed at once. Default: a quarter of --max-connections. Behind a proxy or a service
    /// mesh's sidecar every client is one peer: raise it to --max-connections there.
    #[arg(long, env = "OPTOUT_MAX_CONNECTIONS_PER_PEER")]
    max_connections_per_peer: Option<usize>,
    /// A new client connection that has sent no request within this many seconds is closed.
    #[arg(long, env = "OPTOUT_FIRST_REQUEST_TIMEOUT_SECS", default_value_t = defaults::FIRST_REQUEST_TIMEOUT.as_secs(), value_parser = super::words::secs)]
    first_request_timeout_secs: u64,
    /// Longest a request may take, a whole CheckStream or import included, in seconds.
    #[arg(long, env = "OPTOUT_REQUEST_TIMEOUT_SECS", default_value_t = Limits::DEFAULT.request_timeout.as_secs(), value_parser = super::words::secs)]
    request_timeout_secs: u64,
    /// A client connection older than this is asked to reconnect (its requests get the shutdown
    /// grace to finish), in seconds. Also spreads long-lived clients over new replicas.
    #[arg(long, env = "OPTOUT_MAX_CONNECTION_AGE_SECS", default_value_t = defaults::MAX_CONNECTION_AGE.as_secs(), value_parser = super::words::secs)]
    max_connection_age_secs: u64,
    /// A client connection with no traffic (keepalive pings aside) for this long is closed, in
    /// seconds. Never shorter than the request timeout plus a second, so a request the server is
    /// still working on is not cut off as idle.
    #[arg(long, env = "OPTOUT_IDLE_TIMEOUT_SECS", default_value_t = defaults::IDLE_TIMEOUT.as_secs(), value_parser = super::words::secs)]
    idle_timeout_secs: u64,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://otel-collector:4317): a span
    /// per request, the child of the caller's W3C traceparent. Off when not given.
    #[arg(long, env = "OPTOUT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The share of requests that start a trace when the caller sent no traceparent, 0 to 1. A
    /// caller's traceparent decides for its own requests (sampled or not).
    #[arg(
        long,
        env = "OPTOUT_OTLP_SAMPLE_RATIO",
        default_value_t = 0.01,
        requires = "otlp_endpoint"
    )]
    otlp_sample_ratio: f64,
    /// PEM CA certificate an https:// --otlp-endpoint must chain to (the public web roots when
    /// not given).
    #[arg(long, env = "OPTOUT_OTLP_CA_CERT", requires = "otlp_endpoint")]
    otlp_ca_cert: Option<PathBuf>,
    #[command(flatten)]
    redis: RedisArgs,
}

impl ServeArgs {
    /// Where traces go, if anywhere.
    pub(super) fn otlp(&self) -> Result<Option<crate::traces::OtlpConfig>, String> {
        let Some(endpoint) = &self.otlp_endpoint else {
            return Ok(None);
        };
        let ca_pem = match &self.otlp_ca_cert {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| format!("--otlp-ca-cert {}: {e}", path.display()))?,
            ),
            None => None,
        };
        Ok(Some(crate::traces::OtlpConfig {
            endpoint: endpoint.clone(),
            sample_ratio: self.otlp_sample_ratio,
            ca_pem,
        }))
    }

    /// Secure by default: beyond loopback, callers must authenticate, traffic must be encrypted,
    /// and audit digests must be stable across replicas.
    fn check_exposure(&self) -> Result<(), CliError> {
        if self.dev {
            return Ok(());
        }
        if self.listen.ip().is_loopback() {
            if self.keys_file.is_none() {
                announce(
                    true,
                    "WARNING: no --keys-file: running WITHOUT authentication; any local process \
                     can call every RPC (development only)",
                );
            }
            return Ok(());
        }
        let mut missing = Vec::new();
        if self.keys_file.is_none() {
            missing.push("--keys-file");
        }
        if self.tls_cert.is_none() {
            missing.push("--tls-cert/--tls-key");
        }
        if self.audit_key_file.is_none() {
            missing.push("--audit-key-file");
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(CliError::Usage(format!(
            "--listen {}: listening beyond loopback needs {}; without them the service listens \
             only on loopback addresses (127.0.0.1, ::1)",
            self.listen,
            missing.join(", ")
        )))
    }

    fn tls(&self) -> Result<Option<TlsFiles>, CliError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        Ok(Some(TlsFiles {
            cert_pem: read_file("--tls-cert", cert)?,
            key_pem: read_file("--tls-key", key)?,
            client_ca_pem: match &self.tls_client_ca {
                Some(ca) => Some(read_file("--tls-client-ca", ca)?),
                None => None,
            },
        }))
    }

    /// The audit key: --audit-key-file's; on the embedded store without one, the data
    /// directory's own (made on first start, kept with the data, so the check log it keys can be
    /// verified after a restart); on Redis without one, none (the server uses a key for this
    /// process only, and says so loudly).
    fn audit_key(&self) -> Result<Option<AuditKey>, CliError> {
        let path = match &self.audit_key_file {
            Some(path) => path.clone(),
            None if self.redis.config()?.is_none() => data_dir_audit_key(&self.data_dir)?,
            None => {
                announce(
                    true,
                    "no --audit-key-file: audit digests and the check log are keyed with a key for \
                     this process only, and cannot be verified after a restart or matched across \
                     replicas. Make one (`optout keys audit-key > audit.key`) and give it to every \
                     replica",
                );
                return Ok(None);
            }
        };
        let path = &path;
        let raw = read_file("--audit-key-file", path)?;
        AuditKey::from_file(&raw)
            .map(Some)
            .map_err(|e| CliError::Usage(format!("--audit-key-file {}: {e}", path.display())))
    }

    fn check_ranges(&self) -> Result<(), CliError> {
        if !(self.filter_fp_rate > 0.0 && self.filter_fp_rate < 1.0) {
            return Err(CliError::Usage(format!(
                "--filter-fp-rate {}: must be strictly between 0 and 1",
                self.filter_fp_rate
            )));
        }
        for (name, v) in [
            ("--max-batch", self.max_batch),
            ("--max-admin-batch", self.max_admin_batch),
            ("--max-message-bytes", self.max_message_bytes),
        ] {
            if v == 0 {
                return Err(CliError::Usage(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }

    fn store(&self) -> Result<StoreConfig, CliError> {
        Ok(match self.redis.config()? {
            Some(r) => {
                // A malformed URL is a setting error: say so before listening. An unreachable
                // Redis is not: the replica starts NOT_SERVING and keeps trying, so replicas may
                // start before Redis.
                RedisStore::connect(&r).map_err(|e| CliError::Usage(e.to_string()))?;
                StoreConfig::Redis(r)
            }
            None => StoreConfig::Embedded {
                data_dir: self.data_dir.clone(),
                change_log_len: self.change_log_len.max(1),
                cache_bytes: usize::try_from(self.embedded_cache_mib.max(1))
                    .unwrap_or(usize::MAX / (1024 * 1024))
                    .saturating_mul(1024 * 1024),
            },
        })
    }
}

impl TryFrom<&ServeArgs> for ServerConfig {
    type Error = CliError;

    /// The server's configuration from the flags (whose defaults are the server's own).
    fn try_from(args: &ServeArgs) -> Result<Self, CliError> {
        args.check_ranges()?;
        let audit_key = args.audit_key()?;
        let side = |flag: &str, addr: Option<SocketAddr>| -> Result<_, CliError> {
            addr.map(|a| {
                std::net::TcpListener::bind(a)
                    .map(Arc::new)
                    .map_err(|e| CliError::Usage(format!("{flag} {a}: {e}")))
            })
            .transpose()
        };
        Ok(ServerConfig {
            store: args.store()?,
            filter: FilterConfig {
                capacity: args.filter_capacity,
                fp_rate: args.filter_fp_rate,
                freshness_bound: Duration::from_millis(args.freshness_bound_ms),
                snapshot_interval: Duration::from_secs(args.snapshot_interval_secs.max(1)),
                ..FilterConfig::DEFAULT
            },
            limits: Limits {
                max_batch: args.max_batch,
                max_admin_batch: args.max_admin_batch,
                default_deadline: Duration::from_millis(args.default_deadline_ms.max(1)),
                max_message_bytes: args.max_message_bytes,
                request_timeout: Duration::from_secs(args.request_timeout_secs.max(1)),
                ..Limits::DEFAULT
            },
            keys_file: args.keys_file.clone(),
            tls: args.tls()?,
            audit_key,
            audit_bound: Duration::from_millis(args.audit_bound_ms.max(1)),
            audit_queue_bytes: args.audit_queue_mib.max(4).saturating_mul(1024 * 1024),
            max_list_age: crate::core::coverage::MaxAge {
                national: args.national_max_age_days.0,
                type1: args.type_1_max_age_days.0,
            },
            changes_max_age: (args.audit_changes_max_age_days > 0)
                .then(|| Duration::from_secs(args.audit_changes_max_age_days * 86_400)),
            seal_interval: Duration::from_millis(args.audit_seal_interval_ms.max(1)),
            check_files: (!args.check_log_in_store).then(|| CheckFilesConfig {
                dir: args
                    .check_log_dir
                    .clone()
                    .unwrap_or_else(|| args.data_dir.join("check-log")),
                max_segment_bytes: args
                    .check_log_segment_mib
                    .max(1)
                    .saturating_mul(1024 * 1024),
                max_backups: args.check_log_max_backups,
                max_age: (args.check_log_max_age_days > 0)
                    .then(|| Duration::from_secs(args.check_log_max_age_days * 86_400)),
                anchor_interval: Duration::from_secs(args.check_log_anchor_interval_secs.max(1)),
            }),
            rate_limit: RateLimit {
                per_second: args.rate_limit,
                burst: args.rate_burst,
            },
            max_concurrent_streams: args.max_concurrent_streams.max(1),
            max_connections: args.max_connections.max(1),
            max_connections_per_peer: args.max_connections_per_peer.map(|n| n.max(1)),
            first_request_timeout: Duration::from_secs(args.first_request_timeout_secs.max(1)),
            max_connection_age: Duration::from_secs(args.max_connection_age_secs.max(1)),
            idle_timeout: Duration::from_secs(args.idle_timeout_secs.max(1)),
            health_listener: side("--health-listen", args.health_listen)?,
            metrics_listener: side("--metrics-listen", args.metrics_listen)?,
            shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
            ..ServerConfig::new(PathBuf::new())
        })
    }
}

/// Checks the exposure, builds the configuration, binds, says where, and serves until SIGTERM.
pub(super) async fn serve(mut args: ServeArgs) -> Result<(), CliError> {
    // First, before anything is printed: a SIGTERM sent as soon as a line appears (the --dev
    // banner, say, which comes before the store opens) is a graceful stop that deletes the
    // temporary store, never the signal's default action.
    let shutdown = shutdown_signal();
    // A renamed variable must not be dropped without a word: its list would fall back to the
    // default age.
    if std::env::var_os("OPTOUT_TYPE1_MAX_AGE_DAYS").is_some() {
        return Err(CliError::Usage(
            "OPTOUT_TYPE1_MAX_AGE_DAYS is now spelt OPTOUT_TYPE_1_MAX_AGE_DAYS (type 1 is \
             `type-1` everywhere); rename it"
                .into(),
        ));
    }
    // Development mode's store, deleted when serve returns.
    let _dev_store = if args.dev {
        Some(dev_mode(&mut args)?)
    } else {
        None
    };
    args.check_exposure()?;
    let config = ServerConfig::try_from(&args)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::Usage(format!("--listen {}: {e}", args.listen)))?;
    let bound = listener
        .local_addr()
        .map_err(|e| CliError::Usage(format!("--listen {}: {e}", args.listen)))?;
    // The store before the announcement: a data directory in use fails here, not after
    // "listening on".
    let store = crate::server::open_store(&config).await?;
    announce(
        false,
        &format!("listening on {bound} {}", describe(&config)),
    );
    crate::server::serve(listener, store, config, shutdown).await?;
    Ok(())
}

/// The transport, the store and the side listeners, for the start-up line.
fn describe(config: &ServerConfig) -> String {
    let transport = match &config.tls {
        Some(t) if t.client_ca_pem.is_some() => "gRPC over mutual TLS",
        Some(_) => "gRPC over TLS",
        None => "gRPC, plaintext",
    };
    let store = match &config.store {
        StoreConfig::Redis(r) => format!("Redis store at {} (prefix {:?})", r.describe(), r.prefix),
        StoreConfig::Embedded { data_dir, .. } => {
            format!("embedded store in {}", data_dir.display())
        }
    };
    let checks = match &config.check_files {
        Some(f) => format!("check records in {}", f.dir.display()),
        None => "check records in the store".to_string(),
    };
    let mut text = format!("({transport}), {store}, {checks}");
    let addr =
        |l: &Option<Arc<std::net::TcpListener>>| l.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(a) = addr(&config.health_listener) {
        text.push_str(&format!(", health on {a}"));
    }
    if let Some(a) = addr(&config.metrics_listener) {
        text.push_str(&format!(", metrics on http://{a}/metrics"));
    }
    text
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM (what Kubernetes sends). The handlers are installed
/// here, when called, not when the future is first polled: a SIGTERM that arrives while the server
/// is still starting is a graceful shutdown too, never the default action (an abrupt exit).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &'static str| {
            signal(kind)
                .inspect_err(|e| tracing::warn!(error = %e, "cannot listen for {name}"))
                .ok()
        };
        let mut term = listen(SignalKind::terminate(), "SIGTERM");
        let mut int = listen(SignalKind::interrupt(), "SIGINT");
        async move {
            tokio::select! {
                _ = received(&mut term) => {},
                _ = received(&mut int) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Completes when `signal` is received; never, if it could not be listened for.
#[cfg(unix)]
async fn received(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// A maximum list age: a duration, or `None` for no limit.
#[derive(Clone, Copy, Debug)]
struct MaxAgeArg(Option<Duration>);

/// A maximum list age in days (fractions allowed), or "none".
fn max_age_days(s: &str) -> Result<MaxAgeArg, String> {
    if s == "none" {
        return Ok(MaxAgeArg(None));
    }
    let days: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of days (or \"none\" for no limit)"))?;
    Duration::try_from_secs_f64(days * 86_400.0)
        .ok()
        .filter(|d| !d.is_zero())
        .map(|d| MaxAgeArg(Some(d)))
        .ok_or_else(|| format!("{s}: give a number of days above zero (or \"none\" for no limit)"))
}

/// The embedded store's audit key, `DATA_DIR/audit-key`: read if it is there, else made (32
/// random bytes, base64, readable by the owner only) and announced.
fn data_dir_audit_key(data_dir: &std::path::Path) -> Result<PathBuf, CliError> {
    let path = data_dir.join("audit-key");
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| CliError::Usage(format!("--data-dir {}: {e}", data_dir.display())))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&path).and_then(|mut f| {
        use std::io::Write;
        f.write_all(AuditKey::generate().as_bytes())?;
        f.sync_all()
    });
    written.map_err(|e| {
        CliError::Usage(format!(
            "{}: cannot write the audit key: {e}",
            path.display()
        ))
    })?;
    announce(
        true,
        &format!(
            "made an audit key for this data directory in {}: back it up with the data (the check \
             log cannot be verified without it); --audit-key-file gives one of your own",
            path.display()
        ),
    );
    Ok(path)
}

/// `serve --dev`: refused inside Kubernetes (a production sign the flags cannot show), else a
/// temporary data directory and the banner.
fn dev_mode(args: &mut ServeArgs) -> Result<tempfile::TempDir, CliError> {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return Err(CliError::Usage(
            "--dev is refused inside Kubernetes: it runs without authentication, TLS or a \
             lasting store. Deploy with the Helm chart (helm/optout-service)"
                .into(),
        ));
    }
    let dir = tempfile::Builder::new()
        .prefix("optout-dev-")
        .tempdir()
        .map_err(|e| CliError::Usage(format!("--dev: cannot make a temporary store: {e}")))?;
    args.data_dir = dir.path().to_path_buf();
    announce(
        true,
        &format!(
            "DEVELOPMENT MODE (--dev): serving on {} WITHOUT authentication or TLS, on a \
             temporary store deleted at exit ({}). Never for patient data",
            args.listen,
            dir.path().display()
        ),
    );
    Ok(dir)
}
