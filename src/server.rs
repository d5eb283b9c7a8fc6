//! The server as a library function: `run(listener, config, shutdown)`. The binary only parses
//! flags and wires signals; tests start the same `run` on 127.0.0.1 port 0.

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tonic_health::ServingStatus;

use crate::{
    api::{
        AdminService, CheckService, Limits,
        gate::{Gate, GateState, RateLimit},
        proto::{
            FILE_DESCRIPTOR_SET, opt_out_admin_server::OptOutAdminServer,
            opt_out_check_server::OptOutCheckServer,
        },
    },
    audit::AuditWriter,
    auth::{Keyring, Role},
    check::Checker,
    core::AuditKey,
    store::{
        ConsentStore, StoreError,
        embedded::{EmbeddedConfig, EmbeddedStore, Opened},
        redis::{RedisConfig, RedisStore},
    },
    sync::{FilterConfig, SyncedFilter, follow},
};

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The embedded store's data directory.
    pub data_dir: PathBuf,
    /// Change-log entries kept.
    pub change_log_len: u64,
    /// Filter sizing and freshness.
    pub filter: FilterConfig,
    /// Request limits.
    pub limits: Limits,
    /// Concurrent HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
    /// Client connections held at once; past it, new connections are closed at once.
    pub max_connections: usize,
    /// A connection older than this is asked to close (GOAWAY) and given the shutdown grace to
    /// finish its requests: no client holds a replica forever, and load spreads over new pods.
    pub max_connection_age: Duration,
    /// A connection with no traffic for this long (keepalive pings aside) is closed. Never
    /// shorter than the request timeout plus a second, so a request that is silent while the
    /// server works on it (an import being applied) is never cut off as idle.
    pub idle_timeout: Duration,
    /// The shared Redis store; `None` runs on the embedded store in `data_dir`.
    pub redis: Option<RedisConfig>,
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
    /// Defaults for a data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        ServerConfig {
            data_dir,
            change_log_len: 10_000,
            filter: FilterConfig::default(),
            limits: Limits::default(),
            max_concurrent_streams: 256,
            max_connections: 10_000,
            max_connection_age: Duration::from_secs(1800),
            idle_timeout: Duration::from_secs(600),
            redis: None,
            keys_file: None,
            keys_reload: Duration::from_secs(2),
            tls: None,
            audit_key: None,
            audit_bound: Duration::from_secs(5),
            audit_queue_bytes: 64 * 1024 * 1024,
            rate_limit: RateLimit {
                per_second: 5_000_000,
                burst: 10_000_000,
            },
            health_listener: None,
            metrics_listener: None,
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Config(String),
    /// The gRPC transport failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built.
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The keys file could not be loaded.
    #[error(transparent)]
    Keys(#[from] crate::auth::KeysFileError),
    /// The health or metrics listener could not be used.
    #[error("{0}")]
    Listener(String),
}

/// The health "service" that says only that the process is up (for liveness probes).
pub const LIVENESS: &str = "liveness";

const SERVICES: [&str; 3] = ["", "optout.v1.OptOutCheck", "optout.v1.OptOutAdmin"];

/// Opens the embedded store in `config.data_dir` and serves it on `listener` until `shutdown`
/// completes; then drains in-flight requests and returns once the store is closed.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let store: Arc<dyn ConsentStore> = match &config.redis {
        Some(redis) => {
            tracing::info!(store = %redis.describe(), prefix = %redis.prefix, "using the Redis store");
            Arc::new(RedisStore::connect(redis)?)
        }
        None => Arc::new(open_embedded(&config).await?),
    };
    serve(listener, store, config, shutdown).await
}

/// Opens (or, for a data directory without a database, initialises) the embedded store.
pub async fn open_embedded(config: &ServerConfig) -> Result<EmbeddedStore, ServerError> {
    let embedded = EmbeddedConfig {
        data_dir: config.data_dir.clone(),
        change_log_len: config.change_log_len,
    };
    let (store, opened) = tokio::task::spawn_blocking(move || EmbeddedStore::open(&embedded))
        .await
        .map_err(|e| ServerError::Config(format!("store open task failed: {e}")))??;
    match opened {
        Opened::Initialised => tracing::warn!(
            data_dir = %config.data_dir.display(),
            dataset = store.dataset_id(),
            "no database in the data directory: initialised a new, EMPTY opt-out dataset"
        ),
        Opened::Existing => tracing::info!(
            data_dir = %config.data_dir.display(),
            dataset = store.dataset_id(),
            "opened the embedded store"
        ),
    }
    Ok(store)
}

/// Serves any consent store on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn ConsentStore>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let local: Option<SocketAddr> = listener.local_addr().ok();

    let filter =
        SyncedFilter::new(config.filter).map_err(|e| ServerError::Config(e.to_string()))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let follower = tokio::spawn(follow(store.clone(), filter.clone(), stop_rx.clone()));

    // Health: NOT_SERVING until the filter is loaded.
    let (health, health_service) = tonic_health::server::health_reporter();
    for s in SERVICES {
        health
            .set_service_status(s, ServingStatus::NotServing)
            .await;
    }
    health
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    // Health follows the filter both ways: SERVING once loaded, NOT_SERVING again if the store's
    // dataset disappears (the follower unloads the filter).
    let mut loaded = filter.loaded();
    let health_task = {
        let health = health.clone();
        tokio::spawn(async move {
            let mut serving = false;
            loop {
                let now = *loaded.borrow_and_update();
                if now != serving {
                    serving = now;
                    let status = if now {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    for s in SERVICES {
                        health.set_service_status(s, status).await;
                    }
                    tracing::info!(serving = now, "health changed");
                }
                if loaded.changed().await.is_err() {
                    break;
                }
            }
        })
    };

    // v1 for current tools, v1alpha for older grpcurl and grpcui.
    let described = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = described().build_v1()?;
    let reflection_alpha = described().build_v1alpha()?;

    let keyring = match &config.keys_file {
        Some(path) => Some(Keyring::load(path)?),
        None => None,
    };
    let keys_task = keyring.as_ref().map(|k| k.watch(config.keys_reload));
    let audit_key = match config.audit_key.clone() {
        Some(k) => k,
        None => {
            tracing::warn!(
                "no audit key configured: using a random one for this process; audit digests \
                 will not match records written by other replicas or after a restart"
            );
            let mut secret = [0u8; 32];
            rand::fill(&mut secret);
            AuditKey::new(&secret).map_err(|e| ServerError::Config(e.to_string()))?
        }
    };
    let (audit, audit_task) = AuditWriter::start(
        store.clone(),
        audit_key.clone(),
        config.audit_bound,
        config.audit_queue_bytes,
        stop_rx.clone(),
    );
    let gates = GateState::new(
        keyring,
        config.rate_limit,
        config
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_pem.is_some()),
    );

    let limits = config.limits;
    let checker = Checker::new(store.clone(), filter.clone());
    let check = OptOutCheckServer::new(CheckService::new(
        checker,
        limits,
        audit.clone(),
        gates.clone(),
    ))
    .max_decoding_message_size(limits.max_message_bytes)
    .max_encoding_message_size(limits.max_message_bytes);
    let check = tonic::service::interceptor::InterceptedService::new(
        check,
        Gate::new(gates.clone(), Role::Checker),
    );
    let admin = OptOutAdminServer::new(AdminService::new(
        store.clone(),
        filter.clone(),
        limits,
        audit_key,
    ))
    .max_decoding_message_size(limits.max_message_bytes)
    .max_encoding_message_size(limits.max_message_bytes);
    let admin =
        tonic::service::interceptor::InterceptedService::new(admin, Gate::new(gates, Role::Admin));

    if let Some(addr) = local {
        tracing::info!(%addr, store = store.kind(), "listening");
    }

    // Stops the side listeners (health, metrics) once the main server is done.
    let (side_stop_tx, side_stop_rx) = watch::channel(false);
    let metrics_task = match &config.metrics_listener {
        Some(l) => {
            let listener = tokio_listener(l, "metrics")?;
            let handle = crate::metrics::install().map_err(ServerError::Listener)?;
            let refresh = {
                let filter = filter.clone();
                let audit = audit.clone();
                Arc::new(move || {
                    crate::metrics::set_state_gauges(
                        &filter.status(),
                        audit.backlog(),
                        audit.backlog_bytes(),
                    );
                }) as Arc<dyn Fn() + Send + Sync>
            };
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                handle,
                refresh,
                side_stop_rx.clone(),
            )))
        }
        None => None,
    };
    let health_task_server = match &config.health_listener {
        Some(l) => {
            let listener = tokio_listener(l, "health")?;
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "health listening (plaintext, grpc.health.v1 only)");
            }
            let mut stop = side_stop_rx.clone();
            let server = tonic::transport::Server::builder()
                .add_service(health_service.clone())
                .serve_with_incoming_shutdown(incoming(listener), async move {
                    let _ = stop.wait_for(|s| *s).await;
                });
            Some(tokio::spawn(server))
        }
        None => None,
    };

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        let mut t = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
        );
        if let Some(ca) = &tls.client_ca_pem {
            t = t.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder.tls_config(t)?;
    }
    let grace = config.shutdown_grace;
    let (draining_tx, mut draining_rx) = watch::channel(false);
    let server = builder
        .max_concurrent_streams(config.max_concurrent_streams)
        .timeout(config.limits.request_timeout)
        .max_connection_age(config.max_connection_age)
        .max_connection_age_grace(grace)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .trace_fn(request_span)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(check)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            crate::connections::limited(
                incoming(listener),
                config.max_connections,
                config
                    .idle_timeout
                    .max(config.limits.request_timeout + Duration::from_secs(1)),
            ),
            async {
                shutdown.await;
                for s in SERVICES {
                    health
                        .set_service_status(s, ServingStatus::NotServing)
                        .await;
                }
                tracing::info!(
                    grace_secs = grace.as_secs_f64(),
                    "shutting down: NOT_SERVING, no new connections, draining in-flight requests"
                );
                let _ = draining_tx.send(true);
            },
        );
    // In-flight requests and streams get the grace period; then they are cut off.
    let result = tokio::select! {
        r = server => r,
        _ = async {
            let _ = draining_rx.wait_for(|d| *d).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(
                grace_secs = grace.as_secs_f64(),
                "grace period over: cutting off the requests still in flight"
            );
            Ok(())
        }
    };
    let _ = side_stop_tx.send(true);
    if let Some(t) = health_task_server {
        let _ = t.await;
    }
    if let Some(t) = metrics_task {
        let _ = t.await;
    }

    let _ = stop_tx.send(true);
    health_task.abort();
    if let Some(k) = keys_task {
        k.abort();
    }
    // The writer flushes what is queued, then ends.
    match tokio::time::timeout(Duration::from_secs(5), audit_task).await {
        Ok(_) => {}
        Err(_) => tracing::error!("audit records still unwritten at shutdown after 5 s"),
    }
    if let Err(e) = follower.await {
        tracing::warn!(error = %e, "filter follower ended abnormally");
    }
    result?;
    Ok(())
}

/// A tokio listener on a copy of a bound std listener (the config keeps the original).
fn tokio_listener(l: &std::net::TcpListener, what: &str) -> Result<TcpListener, ServerError> {
    l.try_clone()
        .and_then(|l| {
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)
        })
        .map_err(|e| ServerError::Listener(format!("{what} listener: {e}")))
}

/// Every request runs in a span carrying its id: the caller's `x-request-id` when it sent a sane
/// one (so its logs and ours can be joined), else a fresh random one. No NHS number is in a span.
fn request_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let sent = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    let id = match sent {
        Some(v) => v.to_string(),
        None => format!("{:016x}", rand::random::<u64>()),
    };
    tracing::info_span!("request", id = %id, method = %req.uri().path())
}

/// The listener's connections with TCP_NODELAY set. With its own incoming stream, tonic's
/// `Server::tcp_nodelay` does not apply; without it, Nagle's algorithm and delayed ACKs held every
/// multi-segment response back about 40 ms.
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}
