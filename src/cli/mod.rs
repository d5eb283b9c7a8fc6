//! The command line: one binary, `optout`, with `serve`, `check`, `filter` and `admin`.
//!
//! Every setting is a flag with an `OPTOUT_…` environment variable; `serve` also reads an optional
//! TOML file (`--config`). A flag wins over the environment, which wins over the file, which wins
//! over the default.

mod admin;
mod admin_read;
mod audit;
mod check;
mod client;
pub mod config;
pub mod filter;
mod health;
mod init_store;
mod keys;
mod national_check;
mod redis_args;
mod serve;
mod words;

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

pub(crate) use client::{AuthChannel, ClientArgs};

use crate::cli::client::proto;

/// The version and the git commit the binary was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("OPTOUT_GIT_COMMIT"),
    ")"
);

/// Online NHS opt-out enforcement: RELEASE or WITHHOLD for each NHS number of an extract.
#[derive(Parser, Debug)]
#[command(name = "optout", version = VERSION, about)]
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
    /// Run the gRPC service: on the embedded store, or on Redis with --redis-url,
    /// --redis-sentinel or --redis-cluster.
    Serve(Box<serve::ServeArgs>),
    /// Check NHS numbers given as arguments, or one per line on stdin.
    Check(check::CheckArgs),
    /// Filter a CSV extract: write only the rows whose patient may be released.
    Filter(filter::FilterArgs),
    /// Maintain the opt-out lists.
    Admin(admin::AdminArgs),
    /// Initialise an empty store, Redis (--redis-url, --redis-sentinel, --redis-cluster) or embedded
    /// (--data-dir): write its dataset marker and coverage mode (once, like a schema migration).
    InitStore(init_store::InitStoreArgs),
    /// Manage API keys.
    Keys(keys::KeysArgs),
    /// Verify the audit trail files.
    Audit(audit::AuditArgs),
    /// Ask a server whether it is SERVING (exit 0), not (1), or cannot be asked (2): for a
    /// container's HEALTHCHECK.
    Health(health::HealthArgs),
    /// Print a completion script for a shell, e.g.
    /// `optout completion bash > /etc/bash_completion.d/optout`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// How an extract is laid out.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum FormatArg {
    /// CSV with a header; the NHS numbers in the column named by --column.
    #[default]
    Csv,
    /// The national file check's format: one NHS number a line followed by a comma, no header.
    Dat,
    /// Apache Parquet (`filter` only): row groups streamed, the column named by --column holding
    /// NHS numbers as strings or integers, every other column and the schema kept.
    Parquet,
}

/// The field separator of a CSV extract.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum DelimiterArg {
    /// `,`
    #[default]
    Comma,
    /// `;`
    Semicolon,
    /// a tab
    Tab,
    /// `|`
    Pipe,
}

impl DelimiterArg {
    pub(crate) fn byte(self) -> u8 {
        match self {
            DelimiterArg::Comma => b',',
            DelimiterArg::Semicolon => b';',
            DelimiterArg::Tab => b'\t',
            DelimiterArg::Pipe => b'|',
        }
    }
}

/// The legal basis a check claims, on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum BasisArg {
    /// None: the opt-outs apply.
    #[default]
    None,
    /// The patient's explicit consent.
    Consent,
    /// A statute or a court order.
    LegalRequirement,
    /// An overriding public interest.
    PublicInterest,
    /// Anonymised in line with the ICO code.
    Anonymised,
    /// A section 251 approval whose CAG decision expressly sets the national opt-out aside.
    CagOptOutSetAside,
    /// Communicable disease and risks to public health (COPI regulation 3).
    PublicHealth,
    /// Non-contracted activity invoice validation.
    InvoiceValidation,
    /// Official statistics by the ONS.
    OfficialStatistics,
    /// A direction that expressly sets type 1 objections aside.
    #[value(name = "direction-type-1-set-aside")]
    DirectionType1SetAside,
}

/// `--legal-basis` and `--basis-reference`, shared by `check` and `filter`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct BasisArgs {
    /// The legal basis the extract relies on; an exempt one lifts opt-outs (the national one
    /// always, type 1 only for consent and a direction that sets type 1 aside) if your API key
    /// may claim it.
    #[arg(long, value_enum, default_value_t = BasisArg::None)]
    legal_basis: BasisArg,
    /// The basis's reference: the CAG approval, the statute or order, the study (audited).
    #[arg(long, default_value = "")]
    basis_reference: String,
}

impl BasisArgs {
    /// The two request fields.
    pub(crate) fn fields(&self) -> (i32, String) {
        let b = match self.legal_basis {
            BasisArg::None => proto::LegalBasis::None,
            BasisArg::Consent => proto::LegalBasis::Consent,
            BasisArg::LegalRequirement => proto::LegalBasis::LegalRequirement,
            BasisArg::PublicInterest => proto::LegalBasis::PublicInterest,
            BasisArg::Anonymised => proto::LegalBasis::Anonymised,
            BasisArg::CagOptOutSetAside => proto::LegalBasis::CagOptOutSetAside,
            BasisArg::PublicHealth => proto::LegalBasis::PublicHealth,
            BasisArg::InvoiceValidation => proto::LegalBasis::InvoiceValidation,
            BasisArg::OfficialStatistics => proto::LegalBasis::OfficialStatistics,
            BasisArg::DirectionType1SetAside => proto::LegalBasis::DirectionType1SetAside,
        };
        (b as i32, self.basis_reference.clone())
    }
}

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

/// The opt-out type, as typed on the command line: [`OptOutType::name`]'s words (a unit test
/// holds them equal); `type1`, the spelling before, is still taken.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TypeArg {
    /// The national data opt-out.
    National,
    /// The GP type 1 opt-out.
    #[value(name = "type-1", alias = "type1")]
    Type1,
}

impl From<TypeArg> for crate::core::OptOutType {
    fn from(t: TypeArg) -> Self {
        match t {
            TypeArg::National => crate::core::OptOutType::NationalDataOptOut,
            TypeArg::Type1 => crate::core::OptOutType::Type1,
        }
    }
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

impl CliError {
    /// 2 for a usage error (what was typed cannot be run as typed), 1 for an operation that
    /// failed; the README's "Exit codes" says the same.
    pub(crate) fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

/// A client command whose output is piped into `head` ends quietly when the reader goes, as Unix
/// tools do, instead of panicking on the failed write (Rust ignores SIGPIPE by default). Not for
/// `serve`: a client closing its connection must not end the server.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: restores one signal's default disposition before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        // A transport failure says only "transport error" or "h2 protocol error": add its causes
        // and what to try.
        let mut causes = Vec::new();
        let mut source = std::error::Error::source(&s);
        while let Some(e) = source {
            let text = e.to_string();
            if causes.last() != Some(&text) {
                causes.push(text);
            }
            source = e.source();
        }
        let mut text = format!("{:?}: {}", s.code(), s.message());
        if !causes.is_empty() {
            text.push_str(&format!(" ({})", causes.join(": ")));
        }
        let lower = text.to_lowercase();
        if lower.contains("h2 protocol error") || lower.contains("frame with invalid size") {
            text.push_str(
                "; the server may use TLS: use an https:// address (with --ca-cert for a \
                 private CA)",
            );
        } else if s.code() == tonic::Code::Unauthenticated {
            text.push_str("; give an API key with --api-key or OPTOUT_API_KEY");
        }
        CliError::Rpc(text)
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
    if !matches!(cli.command, Command::Serve(_)) {
        default_sigpipe();
    }
    // rustls (for rediss://) needs one process-wide crypto provider; ring builds from crates.io
    // with a C compiler only. Installing fails only if one is already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::engine::tune_allocator();
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
    let otlp = match &cli.command {
        Command::Serve(args) => args.otlp(),
        _ => Ok(None),
    };
    // The trace exporter is a task on the runtime: made inside it.
    let traces = match otlp.and_then(|otlp| {
        let _inside = runtime.enter();
        let traces = init_tracing(cli.log_format, otlp.as_ref())?;
        if let Some(otlp) = &otlp {
            announce(
                false,
                &format!(
                    "traces: a span per request over OTLP to {}; requests without a sampled \
                     traceparent traced at {} (unreachable collectors drop spans silently)",
                    otlp.endpoint, otlp.sample_ratio
                ),
            );
        }
        Ok(traces)
    }) {
        Ok(traces) => traces,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    };
    if let Some(traces) = traces {
        runtime.block_on(traces.shutdown(std::time::Duration::from_secs(5)));
    }
    code
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
        // Not eprintln!, which panics when stderr is gone (a closed pipe, a log collector that
        // died): a server must not end over a line nobody can read.
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "optout: {text}");
    }
}

/// Logs on stderr (and, when `otlp` names a collector, traces to it), filtered by `OPTOUT_LOG`.
fn init_tracing(
    format: LogFormat,
    otlp: Option<&crate::traces::OtlpConfig>,
) -> Result<Option<crate::traces::Traces>, String> {
    use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};
    JSON_LOGS.store(
        format == LogFormat::Json,
        std::sync::atomic::Ordering::Relaxed,
    );
    let filter = tracing_subscriber::EnvFilter::try_from_env("OPTOUT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        // Colour codes only on a terminal: in files and log collectors they are noise.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).boxed(),
        // One JSON object per line, with the request span (its id) on every event inside it.
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let (spans, traces) = match otlp {
        Some(config) => {
            let (layer, traces) = crate::traces::layer(config)?;
            (Some(layer), Some(traces))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .with(filter)
        .init();
    Ok(traces)
}

async fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Serve(args) => serve::serve(*args).await.map(|()| ExitCode::SUCCESS),
        Command::Check(args) => check::run(args).await,
        Command::Filter(args) => filter::run(args).await,
        Command::Admin(args) => admin::run(args).await,
        Command::InitStore(args) => init_store::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Keys(args) => args.run().map(|()| ExitCode::SUCCESS),
        Command::Audit(args) => audit::run(args).await,
        Command::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "optout", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Health(args) => match health::run(args).await {
            Ok(code) => Ok(code),
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(2))
            }
        },
    }
}

/// A progress bar on stderr when it is a terminal, hidden otherwise.
/// A progress bar over the bytes of an input of known size (a percentage and an ETA), or a
/// counter of bytes when the size is unknown (stdin); hidden when stderr is not a terminal.
pub(crate) fn progress_bytes(total: Option<u64>, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(t) => (
            indicatif::ProgressBar::new(t),
            "{bar:30} {percent:>3}% {bytes}/{total_bytes} {msg} ({bytes_per_sec}, eta {eta})",
        ),
        None => (
            indicatif::ProgressBar::new_spinner(),
            "{spinner} {elapsed_precise} {bytes} {msg} ({bytes_per_sec})",
        ),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Turns a bar into the "applying" phase: everything is sent, the server is working.
pub(crate) fn applying(bar: &indicatif::ProgressBar, what: &str) {
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
}

/// A reader that moves a progress bar by the bytes it reads.
pub(crate) struct Counted<R> {
    pub(crate) inner: R,
    pub(crate) bar: indicatif::ProgressBar,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

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
