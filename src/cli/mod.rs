//! The command line: one binary, `optout`, with `serve`, `check`, `filter` and `admin`.
//!
//! Every setting is a flag with an `OPTOUT_…` environment variable; `serve` also reads an optional
//! TOML file (`--config`). A flag wins over the environment, which wins over the file, which wins
//! over the default.

mod admin;
mod check;
pub mod config;
pub mod filter;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use tonic::transport::{Channel, Endpoint};

use crate::{
    api::{Limits, proto},
    server::{ServerConfig, run},
    sync::FilterConfig,
};

/// Online NHS opt-out enforcement: RELEASE or WITHHOLD for each NHS number of an extract.
#[derive(Parser, Debug)]
#[command(name = "optout", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: text (for people) or json (one object per line, for collectors).
    #[arg(
        long,
        global = true,
        env = "OPTOUT_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gRPC service on the embedded store.
    Serve(Box<ServeArgs>),
    /// Check NHS numbers given as arguments, or one per line on stdin.
    Check(check::CheckArgs),
    /// Filter a CSV extract: write only the rows whose patient may be released.
    Filter(filter::FilterArgs),
    /// Maintain the opt-out lists.
    Admin(admin::AdminArgs),
    /// Initialise an empty Redis store: write its dataset marker (once, like a schema migration).
    InitStore(InitStoreArgs),
    /// Manage API keys.
    Keys(KeysArgs),
}

#[derive(Args, Debug)]
struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Make a key: prints it once, appends only its hash to the keys file.
    New {
        /// The keys file (created if missing).
        #[arg(long, env = "OPTOUT_KEYS_FILE")]
        keys_file: PathBuf,
        /// The organisation the key belongs to (ODS code).
        #[arg(long)]
        organisation: String,
        /// Roles: checker (OptOutCheck), admin (OptOutAdmin and checks).
        #[arg(long = "role", value_enum, required = true)]
        roles: Vec<RoleArg>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum RoleArg {
    Checker,
    Admin,
}

#[derive(Args, Debug)]
struct InitStoreArgs {
    #[command(flatten)]
    redis: RedisArgs,
    /// Hash buckets per opt-out type. Keep opt-outs per bucket under 128 so Redis stores each
    /// bucket compactly: the default suits up to about 8 million opt-outs of one type.
    #[arg(long, default_value_t = 65_536)]
    buckets: u64,
    /// With --redis-cluster: shards of the opt-out data, each on its own slot range. More shards
    /// spread over more masters; a check touches up to this many slots.
    #[arg(long, default_value_t = 64)]
    shards: usize,
}

/// Where the Redis store is.
#[derive(Args, Debug, Clone)]
struct RedisArgs {
    /// The shared Redis store (redis://, or rediss:// for TLS). Without it (and without
    /// --redis-sentinel), serve uses the embedded store. Behind Sentinel its host is not used: it
    /// only carries the password, database and TLS mode of the Redis nodes.
    #[arg(long, env = "OPTOUT_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
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
    #[arg(long, env = "OPTOUT_REDIS_SENTINEL_MASTER", default_value = "mymaster")]
    redis_sentinel_master: String,
    /// Replicas that must confirm each opt-out change (Redis WAIT) before it is acknowledged, so a
    /// failover cannot lose it (in a cluster: by every master's replicas). Default: 1 behind
    /// Sentinel or in a cluster, 0 for a single Redis.
    #[arg(long, env = "OPTOUT_REDIS_REPLICAS_ACK")]
    redis_replicas_ack: Option<u32>,
    /// Trust that this Redis keeps every acknowledged write through a crash although the service
    /// cannot read its persistence settings (a managed Redis that hides CONFIG). Without it, a
    /// single Redis (no replica acknowledgement) must run `appendonly yes` with `appendfsync
    /// always`, or serve and init-store refuse it. See README "Guarantees".
    #[arg(long, env = "OPTOUT_REDIS_ASSUME_DURABLE")]
    redis_assume_durable: bool,
    /// How long a change waits for those confirmations, in ms, before it fails unacknowledged.
    #[arg(long, env = "OPTOUT_REDIS_REPLICAS_ACK_MS", default_value_t = 2000)]
    redis_replicas_ack_ms: u64,
    /// Prefix of every key the service uses in Redis.
    #[arg(long, env = "OPTOUT_REDIS_PREFIX", default_value = "optout:")]
    redis_prefix: String,
    /// Change-log entries kept in Redis; a replica further behind rebuilds its filter.
    #[arg(long, env = "OPTOUT_REDIS_LOG_LEN", default_value_t = 100_000)]
    redis_log_len: u64,
    /// Timeout of one Redis call, in ms.
    #[arg(long, env = "OPTOUT_REDIS_TIMEOUT_MS", default_value_t = 1000)]
    redis_timeout_ms: u64,
    /// Audit records kept in Redis (approximately; the oldest are trimmed). Size this for the
    /// retention your information governance requires.
    #[arg(long, env = "OPTOUT_REDIS_AUDIT_LEN", default_value_t = 10_000_000)]
    redis_audit_len: u64,
}

impl RedisArgs {
    fn config(&self) -> Option<crate::store::redis::RedisConfig> {
        let sentinel =
            (!self.redis_sentinel.is_empty()).then(|| crate::store::redis::SentinelConfig {
                addrs: self.redis_sentinel.clone(),
                master_name: self.redis_sentinel_master.clone(),
            });
        let cluster = (!self.redis_cluster.is_empty()).then(|| self.redis_cluster.clone());
        let url = match (&self.redis_url, sentinel.is_some() || cluster.is_some()) {
            (Some(url), _) => url.clone(),
            (None, true) => "redis://named-by-sentinel-or-cluster".to_string(),
            (None, false) => return None,
        };
        let default_acks = u32::from(sentinel.is_some() || cluster.is_some());
        Some(crate::store::redis::RedisConfig {
            url,
            replicas_ack: self.redis_replicas_ack.unwrap_or(default_acks),
            assume_durable: self.redis_assume_durable,
            replicas_ack_timeout: Duration::from_millis(self.redis_replicas_ack_ms.max(1)),
            sentinel,
            cluster,
            shards: 64,
            prefix: self.redis_prefix.clone(),
            log_len: self.redis_log_len.max(1),
            response_timeout: Duration::from_millis(self.redis_timeout_ms.max(1)),
            connect_timeout: Duration::from_millis(self.redis_timeout_ms.max(1)),
            audit_len: self.redis_audit_len.max(1),
        })
    }
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on. Only loopback addresses until authentication and TLS arrive.
    #[arg(long, env = "OPTOUT_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Directory of the embedded store. Created, with a new empty dataset, if it holds no database.
    #[arg(long, env = "OPTOUT_DATA_DIR", default_value = "./optout-data")]
    data_dir: PathBuf,
    /// Opt-outs the filter is sized for; it is rebuilt larger in the background when outgrown.
    #[arg(long, env = "OPTOUT_FILTER_CAPACITY", default_value_t = 1_000_000)]
    filter_capacity: u64,
    /// The filter's false-positive target (a false positive costs one store lookup).
    #[arg(long, env = "OPTOUT_FILTER_FP_RATE", default_value_t = 0.001)]
    filter_fp_rate: f64,
    /// Past this many ms without proof that the filter is caught up, every number goes to the store.
    #[arg(long, env = "OPTOUT_FRESHNESS_BOUND_MS", default_value_t = 2000)]
    freshness_bound_ms: u64,
    /// Most NHS numbers in one Check message.
    #[arg(long, env = "OPTOUT_MAX_BATCH", default_value_t = 10_000)]
    max_batch: usize,
    /// Most NHS numbers in one AddOptOuts or RemoveOptOuts request.
    #[arg(long, env = "OPTOUT_MAX_ADMIN_BATCH", default_value_t = 10_000)]
    max_admin_batch: usize,
    /// Deadline of a request that sets none, in ms (a shorter client deadline wins).
    #[arg(long, env = "OPTOUT_DEFAULT_DEADLINE_MS", default_value_t = 2000)]
    default_deadline_ms: u64,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "OPTOUT_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_message_bytes: usize,
    /// Change-log entries kept; a replica further behind rebuilds its filter from a scan.
    #[arg(long, env = "OPTOUT_CHANGE_LOG_LEN", default_value_t = 10_000)]
    change_log_len: u64,
    /// How often a replica on Redis publishes a filter snapshot for new replicas, in seconds.
    #[arg(long, env = "OPTOUT_SNAPSHOT_INTERVAL_SECS", default_value_t = 60)]
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
    #[arg(long, env = "OPTOUT_AUDIT_BOUND_MS", default_value_t = 5000)]
    audit_bound_ms: u64,
    /// MiB of check records that may wait to be written (about 8 bytes per released number);
    /// past it every check is withheld until the queue drains.
    #[arg(long, env = "OPTOUT_AUDIT_QUEUE_MIB", default_value_t = 64)]
    audit_queue_mib: u64,
    /// NHS numbers checked per second per organisation (0: no limit). Every number of a Check
    /// and of each CheckStream message counts; each admin call counts as one.
    #[arg(long, env = "OPTOUT_RATE_LIMIT", default_value_t = 5_000_000)]
    rate_limit: u32,
    /// NHS numbers an organisation may send at once above its rate; also the largest message
    /// it can send at all (keep it at least --max-batch).
    #[arg(long, env = "OPTOUT_RATE_BURST", default_value_t = 10_000_000)]
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
    #[arg(long, env = "OPTOUT_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    shutdown_grace_secs: u64,
    /// Concurrent streams (requests) per client connection.
    #[arg(long, env = "OPTOUT_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    max_concurrent_streams: u32,
    /// Client connections this replica holds at once; past it new ones are closed at once.
    #[arg(long, env = "OPTOUT_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Longest a request may take, a whole CheckStream or import included, in seconds.
    #[arg(long, env = "OPTOUT_REQUEST_TIMEOUT_SECS", default_value_t = 300)]
    request_timeout_secs: u64,
    /// A client connection older than this is asked to reconnect (its requests get the shutdown
    /// grace to finish), in seconds. Also spreads long-lived clients over new replicas.
    #[arg(long, env = "OPTOUT_MAX_CONNECTION_AGE_SECS", default_value_t = 1800)]
    max_connection_age_secs: u64,
    /// A client connection with no traffic (keepalive pings aside) for this long is closed, in
    /// seconds. Never shorter than the request timeout plus a second, so a request the server is
    /// still working on is not cut off as idle.
    #[arg(long, env = "OPTOUT_IDLE_TIMEOUT_SECS", default_value_t = 600)]
    idle_timeout_secs: u64,
    #[command(flatten)]
    redis: RedisArgs,
}

/// Where a client command finds the service.
#[derive(Args, Debug, Clone)]
pub(crate) struct ClientArgs {
    /// The service's address.
    #[arg(long, env = "OPTOUT_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Deadline of each unary call, in ms.
    #[arg(long, env = "OPTOUT_TIMEOUT_MS", default_value_t = 10_000)]
    timeout_ms: u64,
    /// API key, sent as `authorization: Bearer <key>`. Prefer the environment variable: a key on
    /// the command line is visible to other users of the machine.
    #[arg(long, env = "OPTOUT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate, for https:// servers.
    #[arg(long, env = "OPTOUT_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "OPTOUT_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "OPTOUT_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
}

/// Adds the API key to every call.
#[derive(Clone)]
pub(crate) struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// A channel that authenticates each call.
pub(crate) type AuthChannel = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

fn read_file(flag: &str, path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Usage(format!("{flag} {}: {e}", path.display())))
}

impl ClientArgs {
    pub(crate) async fn channel(&self) -> Result<Channel, CliError> {
        let mut endpoint = Endpoint::from_shared(self.server.clone())
            .map_err(|e| CliError::Usage(format!("--server {:?}: {e}", self.server)))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if self.server.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = &self.ca_cert {
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read_file(
                    "--ca-cert",
                    ca,
                )?));
            } else {
                tls = tls.with_enabled_roots();
            }
            if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read_file("--client-cert", cert)?,
                    read_file("--client-key", key)?,
                ));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| CliError::Usage(format!("TLS settings: {e}")))?;
        }
        endpoint
            .connect()
            .await
            .map_err(|e| CliError::Connect(format!("{}: {e}", self.server)))
    }

    /// The channel with the API key attached.
    pub(crate) async fn authed(&self) -> Result<(Channel, Bearer), CliError> {
        let bearer = match &self.api_key {
            Some(k) => Some(
                format!("Bearer {}", k.trim())
                    .parse()
                    .map_err(|_| CliError::Usage("--api-key is not a valid key".into()))?,
            ),
            None => None,
        };
        Ok((self.channel().await?, Bearer(bearer)))
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// The purpose, as typed on the command line.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub(crate) enum PurposeArg {
    DirectCare,
    Research,
    Planning,
}

impl From<PurposeArg> for proto::Purpose {
    fn from(p: PurposeArg) -> Self {
        match p {
            PurposeArg::DirectCare => proto::Purpose::DirectCare,
            PurposeArg::Research => proto::Purpose::Research,
            PurposeArg::Planning => proto::Purpose::Planning,
        }
    }
}

/// The data origin, as typed on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, Default)]
pub(crate) enum OriginArg {
    /// Both opt-out types apply.
    #[default]
    Unspecified,
    GpPractice,
    Other,
}

impl From<OriginArg> for proto::DataOrigin {
    fn from(o: OriginArg) -> Self {
        match o {
            OriginArg::Unspecified => proto::DataOrigin::Unspecified,
            OriginArg::GpPractice => proto::DataOrigin::GpPractice,
            OriginArg::Other => proto::DataOrigin::Other,
        }
    }
}

/// The opt-out type, as typed on the command line.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub(crate) enum TypeArg {
    /// The national data opt-out.
    National,
    /// The GP type 1 opt-out.
    Type1,
}

impl From<TypeArg> for proto::OptOutType {
    fn from(t: TypeArg) -> Self {
        match t {
            TypeArg::National => proto::OptOutType::NationalDataOptOut,
            TypeArg::Type1 => proto::OptOutType::Type1,
        }
    }
}

/// What a command can fail with; each says what went wrong and where.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to {0}")]
    Connect(String),
    #[error("{0}")]
    Rpc(String),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Output(String),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Rpc(format!("{:?}: {}", s.code(), s.message()))
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = match config::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(config::ConfigError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // rustls (for rediss://) needs one process-wide crypto provider; ring builds from crates.io
    // with a C compiler only. Installing fails only if one is already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whether logs are JSON lines (then nothing else may be written to stderr).
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A line for the operator at start: plain on stderr, or a JSON log event when logs are JSON, so a
/// log collector never meets a line it cannot parse.
fn announce(warning: bool, text: &str) {
    if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        if warning {
            tracing::warn!(target: "optout", "{text}");
        } else {
            tracing::info!(target: "optout", "{text}");
        }
    } else {
        eprintln!("optout: {text}");
    }
}

fn init_tracing(format: LogFormat) {
    JSON_LOGS.store(
        format == LogFormat::Json,
        std::sync::atomic::Ordering::Relaxed,
    );
    let filter = tracing_subscriber::EnvFilter::try_from_env("OPTOUT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colour codes only on a terminal: in files and log collectors they are noise.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // One JSON object per line, with the request span (its id) on every event inside it.
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Serve(args) => serve(*args).await.map(|()| ExitCode::SUCCESS),
        Command::Check(args) => check::run(args).await,
        Command::Filter(args) => filter::run(args).await,
        Command::Admin(args) => admin::run(args).await,
        Command::InitStore(args) => init_store(args).await.map(|()| ExitCode::SUCCESS),
        Command::Keys(KeysArgs {
            command:
                KeysCommand::New {
                    keys_file,
                    organisation,
                    roles,
                },
        }) => new_key(&keys_file, &organisation, &roles).map(|()| ExitCode::SUCCESS),
    }
}

fn new_key(path: &std::path::Path, organisation: &str, roles: &[RoleArg]) -> Result<(), CliError> {
    use std::io::Write;
    let roles: Vec<crate::auth::Role> = roles
        .iter()
        .map(|r| match r {
            RoleArg::Checker => crate::auth::Role::Checker,
            RoleArg::Admin => crate::auth::Role::Admin,
        })
        .collect();
    let (key, entry) = crate::auth::new_key(organisation, &roles);
    // Check the entry the way the server will, before touching the file.
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    crate::auth::parse_keys_file(&format!("{existing}\n{entry}"))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| CliError::Output(format!("{}: {e}", path.display())))?;
    writeln!(file, "\n{entry}")
        .map_err(|e| CliError::Output(format!("{}: {e}", path.display())))?;
    eprintln!(
        "added a key for {organisation} to {}; it is shown once, store it now:",
        path.display()
    );
    println!("{key}");
    Ok(())
}

async fn init_store(args: InitStoreArgs) -> Result<(), CliError> {
    let Some(mut config) = args.redis.config() else {
        return Err(CliError::Usage(
            "--redis-url or --redis-sentinel (or OPTOUT_REDIS_URL, OPTOUT_REDIS_SENTINEL) is \
             required: the embedded store initialises itself on first start"
                .into(),
        ));
    };
    if args.buckets == 0 {
        return Err(CliError::Usage("--buckets must be at least 1".into()));
    }
    if !(1..=16384).contains(&args.shards) {
        return Err(CliError::Usage("--shards must be 1 to 16384".into()));
    }
    config.shards = args.shards;
    let shown = config.describe();
    let store = crate::store::redis::RedisStore::connect(&config)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let id = store
        .init(args.buckets)
        .await
        .map_err(|e| CliError::Rpc(format!("{shown}: {e}")))?;
    println!(
        "initialised the opt-out store at {shown} (prefix {:?}): dataset {id}, {} buckets",
        config.prefix, args.buckets
    );
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<(), CliError> {
    // Secure by default: beyond loopback, callers must authenticate, traffic must be encrypted,
    // and audit digests must be stable across replicas.
    if !args.listen.ip().is_loopback() {
        let mut missing = Vec::new();
        if args.keys_file.is_none() {
            missing.push("--keys-file");
        }
        if args.tls_cert.is_none() {
            missing.push("--tls-cert/--tls-key");
        }
        if args.audit_key_file.is_none() {
            missing.push("--audit-key-file");
        }
        if !missing.is_empty() {
            return Err(CliError::Usage(format!(
                "--listen {}: listening beyond loopback needs {}; without them the service \
                 listens only on loopback addresses (127.0.0.1, ::1)",
                args.listen,
                missing.join(", ")
            )));
        }
    } else if args.keys_file.is_none() {
        announce(
            true,
            "WARNING: no --keys-file: running WITHOUT authentication; any local process can call \
             every RPC (development only)",
        );
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::server::TlsFiles {
            cert_pem: read_file("--tls-cert", cert)?,
            key_pem: read_file("--tls-key", key)?,
            client_ca_pem: match &args.tls_client_ca {
                Some(ca) => Some(read_file("--tls-client-ca", ca)?),
                None => None,
            },
        }),
        _ => None,
    };
    let audit_key = match &args.audit_key_file {
        Some(path) => {
            let raw = read_file("--audit-key-file", path)?;
            let trimmed = String::from_utf8_lossy(&raw).trim().as_bytes().to_vec();
            Some(crate::core::AuditKey::new(&trimmed).map_err(|e| {
                CliError::Usage(format!("--audit-key-file {}: {e}", path.display()))
            })?)
        }
        None => None,
    };
    if !(args.filter_fp_rate > 0.0 && args.filter_fp_rate < 1.0) {
        return Err(CliError::Usage(format!(
            "--filter-fp-rate {}: must be strictly between 0 and 1",
            args.filter_fp_rate
        )));
    }
    for (name, v) in [
        ("--max-batch", args.max_batch),
        ("--max-admin-batch", args.max_admin_batch),
        ("--max-message-bytes", args.max_message_bytes),
    ] {
        if v == 0 {
            return Err(CliError::Usage(format!("{name} must be at least 1")));
        }
    }
    let config = ServerConfig {
        data_dir: args.data_dir,
        change_log_len: args.change_log_len.max(1),
        filter: FilterConfig {
            capacity: args.filter_capacity,
            fp_rate: args.filter_fp_rate,
            freshness_bound: Duration::from_millis(args.freshness_bound_ms),
            snapshot_interval: Duration::from_secs(args.snapshot_interval_secs.max(1)),
            ..FilterConfig::default()
        },
        redis: args.redis.config(),
        keys_file: args.keys_file.clone(),
        tls,
        audit_key,
        audit_bound: Duration::from_millis(args.audit_bound_ms.max(1)),
        audit_queue_bytes: args.audit_queue_mib.max(4).saturating_mul(1024 * 1024),
        rate_limit: crate::api::gate::RateLimit {
            per_second: args.rate_limit,
            burst: args.rate_burst,
        },
        max_concurrent_streams: args.max_concurrent_streams.max(1),
        max_connections: args.max_connections.max(1),
        max_connection_age: Duration::from_secs(args.max_connection_age_secs.max(1)),
        idle_timeout: Duration::from_secs(args.idle_timeout_secs.max(1)),
        limits: Limits {
            max_batch: args.max_batch,
            max_admin_batch: args.max_admin_batch,
            default_deadline: Duration::from_millis(args.default_deadline_ms.max(1)),
            max_message_bytes: args.max_message_bytes,
            request_timeout: Duration::from_secs(args.request_timeout_secs.max(1)),
            ..Limits::default()
        },
        ..ServerConfig::new(PathBuf::new())
    };
    // A malformed URL is a setting error: say so before listening. An unreachable Redis is not:
    // the replica starts NOT_SERVING and keeps trying, so replicas may start before Redis.
    if let Some(r) = &config.redis {
        crate::store::redis::RedisStore::connect(r).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    let side = |flag: &str, addr: Option<SocketAddr>| -> Result<_, CliError> {
        addr.map(|a| {
            std::net::TcpListener::bind(a)
                .map(std::sync::Arc::new)
                .map_err(|e| CliError::Usage(format!("{flag} {a}: {e}")))
        })
        .transpose()
    };
    let mut config = config;
    config.health_listener = side("--health-listen", args.health_listen)?;
    config.metrics_listener = side("--metrics-listen", args.metrics_listen)?;
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace_secs);
    let mut extra = String::new();
    if let Some(a) = config
        .health_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
    {
        extra.push_str(&format!(", health on {a}"));
    }
    if let Some(a) = config
        .metrics_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
    {
        extra.push_str(&format!(", metrics on http://{a}/metrics"));
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::Usage(format!("--listen {}: {e}", args.listen)))?;
    let bound = listener
        .local_addr()
        .map_err(|e| CliError::Usage(format!("--listen {}: {e}", args.listen)))?;
    let store = match &config.redis {
        Some(r) => format!("Redis store at {} (prefix {:?})", r.describe(), r.prefix),
        None => format!("embedded store in {}", config.data_dir.display()),
    };
    let transport = match &config.tls {
        Some(t) if t.client_ca_pem.is_some() => "gRPC over mutual TLS",
        Some(_) => "gRPC over TLS",
        None => "gRPC, plaintext",
    };
    announce(
        false,
        &format!("listening on {bound} ({transport}), {store}{extra}"),
    );
    run(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// A progress bar on stderr when it is a terminal, hidden otherwise.
pub(crate) fn progress(what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {elapsed_precise} {human_pos} {msg} ({per_sec})",
    ) {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Human names of reasons, for summaries.
pub(crate) fn reason_name(r: i32) -> &'static str {
    match proto::Reason::try_from(r) {
        Ok(proto::Reason::NoOptOut) => "no opt-out",
        Ok(proto::Reason::NationalDataOptOut) => "national data opt-out",
        Ok(proto::Reason::Type1OptOut) => "type 1 opt-out",
        Ok(proto::Reason::InvalidNhsNumber) => "invalid NHS number",
        Ok(proto::Reason::StoreUnavailable) => "store unavailable",
        Ok(proto::Reason::StoreRegressed) => "store went back in time",
        Ok(proto::Reason::VersionNotReached) => "version not reached",
        Ok(proto::Reason::PurposeExempt) => "purpose exempt",
        _ => "unknown reason",
    }
}
