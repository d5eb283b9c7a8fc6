//! The command line: one binary, `optout`, with `serve`, `check`, `filter` and `admin`.
//!
//! Every setting is a flag with an `OPTOUT_…` environment variable; a flag wins over the
//! environment, and both win over the default.

mod admin;
mod check;
mod filter;

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
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gRPC service on the embedded store.
    Serve(ServeArgs),
    /// Check NHS numbers given as arguments, or one per line on stdin.
    Check(check::CheckArgs),
    /// Filter a CSV extract: write only the rows whose patient may be released.
    Filter(filter::FilterArgs),
    /// Maintain the opt-out lists.
    Admin(admin::AdminArgs),
    /// Initialise an empty Redis store: write its dataset marker (once, like a schema migration).
    InitStore(InitStoreArgs),
}

#[derive(Args, Debug)]
struct InitStoreArgs {
    #[command(flatten)]
    redis: RedisArgs,
    /// Hash buckets per opt-out type. Keep opt-outs per bucket under 128 so Redis stores each
    /// bucket compactly: the default suits up to about 8 million opt-outs of one type.
    #[arg(long, default_value_t = 65_536)]
    buckets: u64,
}

/// Where the Redis store is.
#[derive(Args, Debug, Clone)]
struct RedisArgs {
    /// The shared Redis store (redis://, or rediss:// for TLS). Without it, serve uses the
    /// embedded store.
    #[arg(long, env = "OPTOUT_REDIS_URL")]
    redis_url: Option<String>,
    /// Prefix of every key the service uses in Redis.
    #[arg(long, env = "OPTOUT_REDIS_PREFIX", default_value = "optout:")]
    redis_prefix: String,
    /// Change-log entries kept in Redis; a replica further behind rebuilds its filter.
    #[arg(long, env = "OPTOUT_REDIS_LOG_LEN", default_value_t = 100_000)]
    redis_log_len: u64,
    /// Timeout of one Redis call, in ms.
    #[arg(long, env = "OPTOUT_REDIS_TIMEOUT_MS", default_value_t = 1000)]
    redis_timeout_ms: u64,
}

impl RedisArgs {
    fn config(&self) -> Option<crate::store::redis::RedisConfig> {
        self.redis_url
            .as_ref()
            .map(|url| crate::store::redis::RedisConfig {
                url: url.clone(),
                prefix: self.redis_prefix.clone(),
                log_len: self.redis_log_len.max(1),
                response_timeout: Duration::from_millis(self.redis_timeout_ms.max(1)),
                connect_timeout: Duration::from_millis(self.redis_timeout_ms.max(1)),
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
}

impl ClientArgs {
    pub(crate) async fn channel(&self) -> Result<Channel, CliError> {
        Endpoint::from_shared(self.server.clone())
            .map_err(|e| CliError::Usage(format!("--server {:?}: {e}", self.server)))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| CliError::Connect(format!("{}: {e}", self.server)))
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
    let cli = Cli::parse();
    // rustls (for rediss://) needs one process-wide crypto provider; ring builds from crates.io
    // with a C compiler only. Installing fails only if one is already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    init_tracing();
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

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OPTOUT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Serve(args) => serve(args).await.map(|()| ExitCode::SUCCESS),
        Command::Check(args) => check::run(args).await,
        Command::Filter(args) => filter::run(args).await,
        Command::Admin(args) => admin::run(args).await,
        Command::InitStore(args) => init_store(args).await.map(|()| ExitCode::SUCCESS),
    }
}

async fn init_store(args: InitStoreArgs) -> Result<(), CliError> {
    let Some(config) = args.redis.config() else {
        return Err(CliError::Usage(
            "--redis-url (or OPTOUT_REDIS_URL) is required: the embedded store initialises itself \
             on first start"
                .into(),
        ));
    };
    if args.buckets == 0 {
        return Err(CliError::Usage("--buckets must be at least 1".into()));
    }
    let shown = crate::store::redis::redact_url(&config.url);
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
    if !args.listen.ip().is_loopback() {
        return Err(CliError::Usage(format!(
            "--listen {}: this build has no authentication or TLS yet, so it listens only on \
             loopback addresses (127.0.0.1, ::1)",
            args.listen
        )));
    }
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
        limits: Limits {
            max_batch: args.max_batch,
            max_admin_batch: args.max_admin_batch,
            default_deadline: Duration::from_millis(args.default_deadline_ms.max(1)),
            max_message_bytes: args.max_message_bytes,
            ..Limits::default()
        },
        ..ServerConfig::new(PathBuf::new())
    };
    // A malformed URL is a setting error: say so before listening. An unreachable Redis is not:
    // the replica starts NOT_SERVING and keeps trying, so replicas may start before Redis.
    if let Some(r) = &config.redis {
        crate::store::redis::RedisStore::connect(r).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::Usage(format!("--listen {}: {e}", args.listen)))?;
    let bound = listener
        .local_addr()
        .map_err(|e| CliError::Usage(format!("--listen {}: {e}", args.listen)))?;
    let store = match &config.redis {
        Some(r) => format!(
            "Redis store at {} (prefix {:?})",
            crate::store::redis::redact_url(&r.url),
            r.prefix
        ),
        None => format!("embedded store in {}", config.data_dir.display()),
    };
    eprintln!("optout: listening on {bound} (gRPC, plaintext), {store}");
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
        Ok(proto::Reason::PurposeExempt) => "purpose exempt",
        _ => "unknown reason",
    }
}
