//! Load test harness for the optout service. It talks to the service only through its gRPC API:
//! `seed` plants opt-outs with ImportOptOuts, `run` drives Check / CheckStream / single-number
//! checks (closed or open loop) and measures, `--baseline redis` runs the same workload straight
//! against Redis, and `echo-server` serves the same API doing no work, to measure the floor of gRPC
//! itself on the machine.

pub mod echo;
pub mod population;
pub mod report;
pub mod threshold;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use optout_proto::{
    CheckRequest, DataOrigin, GetStatusRequest, ImportMode, ImportOptOutsRequest, OptOutType,
    Outcome, Purpose, opt_out_admin_client::OptOutAdminClient,
    opt_out_check_client::OptOutCheckClient,
};
use population::Population;
use rand::SeedableRng;
use serde::Serialize;
use tonic::{
    Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is wrong.
    #[error("{0}")]
    Usage(String),
    /// The service or Redis failed.
    #[error("{0}")]
    Remote(String),
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        Error::Remote(format!("{:?}: {}", s.code(), s.message()))
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Self {
        Error::Remote(format!("connect: {e}"))
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Remote(format!("redis: {e}"))
    }
}

/// Adds `authorization: Bearer <key>` when a key is set.
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(k) = &self.0 {
            let v = format!("Bearer {k}")
                .parse()
                .map_err(|_| Status::invalid_argument("API key is not ASCII"))?;
            r.metadata_mut().insert("authorization", v);
        }
        Ok(r)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// How the harness trusts an https:// service, and whom it presents itself as (mutual TLS).
#[derive(Clone, Debug, Default)]
pub struct Tls {
    /// The CA (PEM) that signed the service's certificate; none: the public roots.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and its key (PEM), for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// The process's TLS settings, set once from the command line before anything connects.
static TLS: std::sync::OnceLock<Tls> = std::sync::OnceLock::new();

/// Sets how every https:// connection of this process is made (once; later calls change nothing).
pub fn set_tls(tls: Tls) {
    let _ = TLS.set(tls);
}

async fn connect(url: &str) -> Result<Channel, Error> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| Error::Usage(format!("--server {url}: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    if url.starts_with("https://") {
        let settings = TLS.get().cloned().unwrap_or_default();
        let mut tls = tonic::transport::ClientTlsConfig::new();
        tls = match &settings.ca_pem {
            Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            None => tls.with_enabled_roots(),
        };
        if let Some((cert, key)) = &settings.identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Error::Usage(format!("TLS settings: {e}")))?;
    }
    Ok(endpoint.connect().await?)
}

/// The live line of a run on a terminal: elapsed, requests, their rate, errors (k6's and ghz's).
struct Live {
    bar: indicatif::ProgressBar,
    /// When the line was last drawn (only the run's own loop draws it).
    last: Instant,
}

impl Live {
    fn new(wanted: bool, target: &Target) -> Live {
        use std::io::IsTerminal;
        let bar = if wanted && std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_prefix(match target {
                Target::Grpc { url, .. } => url.clone(),
                Target::Redis { .. } => "redis".into(),
            });
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {prefix} {msg}") {
                bar.set_style(style);
            }
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        Live {
            bar,
            last: Instant::now(),
        }
    }

    /// At most four times a second.
    fn show(&mut self, elapsed: Duration, sent: u64, failed: u64) {
        if self.bar.is_hidden() || self.last.elapsed() < Duration::from_millis(250) {
            return;
        }
        self.last = Instant::now();
        let secs = elapsed.as_secs_f64().max(0.001);
        self.bar.set_message(format!(
            "{secs:5.1} s  {sent} requests  {:.0} req/s  errors {failed}",
            sent as f64 / secs
        ));
        self.bar.tick();
    }
}

/// A length of time with its unit, as people write it (`500ms`, `250us`, `10s`, `2m`): for
/// `--duration`, `--warmup` and thresholds.
pub fn length_of_time(s: &str) -> Result<Duration, String> {
    let span: jiff::Span = s.trim().parse().map_err(|e| {
        format!("{s:?} is not a length of time with its unit ({e}); write 500ms, 250us, 10s or 2m")
    })?;
    let d = span
        .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|e| format!("{s:?}: {e}"))?;
    Duration::try_from(d).map_err(|_| format!("{s:?} is negative"))
}

/// What a seed did.
#[derive(Clone, Debug)]
pub struct Seeded {
    /// Numbers sent.
    pub received: u64,
    /// Opt-outs added and removed by the REPLACE.
    pub added: u64,
    /// Opt-outs of the national list before that were not in the population: removed.
    pub removed: u64,
    /// The service's import, without the baseline set.
    pub took: Duration,
}

/// Plants `population`'s opt-outs through ImportOptOuts (REPLACE of national opt-outs), and, if
/// given, the same numbers into a plain Redis set for the baseline. A REPLACE removes every
/// national opt-out not in the synthetic population, so a store that holds any is refused unless
/// `force` (a store made for load tests, or one holding only an earlier seed).
pub async fn seed(
    server: &str,
    api_key: Option<String>,
    population: &Population,
    baseline: Option<(&str, &str)>,
    national_check: bool,
    force: bool,
    progress: &indicatif::ProgressBar,
) -> Result<Seeded, Error> {
    let started = Instant::now();
    let mut admin = OptOutAdminClient::with_interceptor(connect(server).await?, Bearer(api_key))
        .max_encoding_message_size(64 * 1024 * 1024);
    let held = admin
        .get_status(GetStatusRequest {})
        .await?
        .into_inner()
        .national_data_opt_outs;
    if held > 0 && !force {
        return Err(Error::Usage(format!(
            "{server} holds {held} national data opt-outs. `seed` REPLACEs the national list with \
             synthetic numbers and would remove every one of them. Seed a store made for load \
             tests (a fresh `optout init-store`, or an empty data directory), or pass --force if \
             this store holds only an earlier seed. Nothing was changed"
        )));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<ImportOptOutsRequest>(8);
    let pop = population.clone();
    let bar = progress.clone();
    let producer = tokio::spawn(async move {
        if national_check {
            national_round_trip(&pop, &tx, &bar).await;
            return;
        }
        let mut chunk = Vec::with_capacity(10_000);
        let mut first = true;
        for n in pop.planted() {
            chunk.push(n.to_string());
            if chunk.len() == 10_000 {
                let numbers = std::mem::replace(&mut chunk, Vec::with_capacity(10_000));
                bar.inc(numbers.len() as u64);
                if tx.send(message(numbers, first, false)).await.is_err() {
                    return;
                }
                first = false;
            }
        }
        bar.inc(chunk.len() as u64);
        let _ = tx.send(message(chunk, first, true)).await;
    });
    let r = admin
        .import_opt_outs(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let _ = producer.await;
    // The service's import only: the baseline set below is the harness's own work.
    let took = started.elapsed();
    if let Some((url, key)) = baseline {
        let mut conn = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        let _: () = redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
        let numbers: Vec<u64> = population.planted().map(|n| n.as_u64()).collect();
        for chunk in numbers.chunks(10_000) {
            let _: () = redis::cmd("SADD")
                .arg(key)
                .arg(chunk)
                .query_async(&mut conn)
                .await?;
        }
    }
    Ok(Seeded {
        received: r.received,
        added: r.added,
        removed: r.removed,
        took,
    })
}

/// A national check round trip of the checked population (planted and pool), in chunks: each
/// chunk's numbers as population, its planted ones as the opt-outs.
async fn national_round_trip(
    pop: &Population,
    tx: &tokio::sync::mpsc::Sender<ImportOptOutsRequest>,
    bar: &indicatif::ProgressBar,
) {
    let checked_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut first = true;
    let mut population = Vec::with_capacity(10_000);
    let mut opt_outs = Vec::new();
    let mut send = async |population: Vec<String>, opt_outs: Vec<String>, commit: bool| {
        bar.inc(opt_outs.len() as u64);
        let mut m = message(opt_outs, first, commit);
        m.population = population;
        if first {
            m.national_checked_at_unix_ms = checked_at;
        }
        first = false;
        tx.send(m).await.is_ok()
    };
    for n in pop.checked() {
        if pop.is_planted(n) {
            opt_outs.push(n.to_string());
        }
        population.push(n.to_string());
        if population.len() == 10_000
            && !send(
                std::mem::replace(&mut population, Vec::with_capacity(10_000)),
                std::mem::take(&mut opt_outs),
                false,
            )
            .await
        {
            return;
        }
    }
    send(population, opt_outs, true).await;
}

fn message(numbers: Vec<String>, first: bool, commit: bool) -> ImportOptOutsRequest {
    ImportOptOutsRequest {
        mode: if first { ImportMode::Replace as i32 } else { 0 },
        r#type: if first {
            OptOutType::NationalDataOptOut as i32
        } else {
            0
        },
        source: if first {
            "optout-loadtest seed".into()
        } else {
            String::new()
        },
        nhs_numbers: numbers,
        commit,
        ..Default::default()
    }
}

/// What to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Check with `batch` numbers per request.
    Batch,
    /// One number per Check.
    Single,
    /// CheckStream messages of `batch` numbers, a few in flight per stream.
    Stream,
}

/// Where to send it.
#[derive(Clone, Debug)]
pub enum Target {
    /// The service (or the echo server) over gRPC.
    Grpc {
        /// URL.
        url: String,
        /// API key.
        api_key: Option<String>,
    },
    /// A plain Redis set: SMISMEMBER per batch, SISMEMBER per single number.
    Redis {
        /// URL.
        url: String,
        /// The set's key.
        key: String,
    },
}

/// The workload.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Request shape.
    pub mode: Mode,
    /// Numbers per request (Batch, Stream).
    pub batch: usize,
    /// Requests in flight (closed loop) or workers (open loop).
    pub concurrency: usize,
    /// Connections the workers share.
    pub connections: usize,
    /// How long to measure.
    pub duration: Duration,
    /// Stop after this many requests instead (0: no limit).
    pub count: u64,
    /// Open loop at this many requests per second (0: closed loop).
    pub rate: f64,
    /// Share of planted (opted-out) numbers in the traffic.
    pub opted_share: f64,
    /// Run this long first without measuring.
    pub warmup: Duration,
    /// A live line on stderr (rate, errors, elapsed) while it runs, when stderr is a terminal.
    pub progress: bool,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

/// The outcome of one run.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Report {
    /// "service", "redis" or "echo", as labelled by the caller.
    pub target: String,
    /// The workload's mode.
    pub mode: String,
    /// Numbers per request.
    pub batch: usize,
    /// Concurrency.
    pub concurrency: usize,
    /// Connections.
    pub connections: usize,
    /// Open-loop rate (0: closed loop).
    pub rate: f64,
    /// Measured seconds.
    pub seconds: f64,
    /// Requests answered.
    pub requests: u64,
    /// Numbers answered.
    pub numbers: u64,
    /// Requests per second.
    pub requests_per_second: f64,
    /// Numbers per second.
    pub numbers_per_second: f64,
    /// Latency of requests (open loop: from the intended send time).
    pub latency_us: Latency,
    /// Failed requests by gRPC code (or "redis").
    pub errors: BTreeMap<String, u64>,
    /// Planted (opted-out) numbers in the traffic that were answered.
    pub planted_seen: u64,
    /// Planted numbers answered RELEASE: must be 0.
    pub leaks: u64,
    /// Planted numbers answered RELEASE during the warm-up, which is otherwise not measured:
    /// must be 0 too (a leak is never dropped for being early).
    #[serde(default)]
    pub warmup_leaks: u64,
    /// Numbers answered in each second of the measured window, in order.
    pub numbers_each_second: Vec<u64>,
    /// The latency histogram: (upper bound in microseconds, requests), doubling from 100 us.
    pub latency_histogram_us: Vec<(u64, u64)>,
    /// Latency over time: (p50, p99) in microseconds of each second of the measured window.
    pub latency_each_second_us: Vec<(u64, u64)>,
    /// The run's metadata: the command as typed, when it started (RFC 3339), and the server's
    /// version and commit as it reported them (empty when it could not be asked).
    pub command: String,
    /// When the run started.
    pub started_at: String,
    /// The server's build.
    pub server_version: String,
}

struct Shared {
    population: Population,
    workload: Workload,
    /// Requests drawn and encoded once, before the run, and sent in turn: the client then spends
    /// its CPU on sending and receiving, not on drawing and formatting numbers, so the floor the
    /// echo server measures is the transport's, not the harness's.
    pool: Vec<Pooled>,
    stop: AtomicBool,
    measuring: AtomicBool,
    sent: AtomicU64,
    /// Requests that failed, for the live line.
    failed: AtomicU64,
    started: Instant,
}

#[derive(Default)]
struct Tally {
    requests: u64,
    numbers: u64,
    planted_seen: u64,
    leaks: u64,
    warmup_leaks: u64,
    errors: BTreeMap<String, u64>,
    /// Numbers answered in each second since measuring began.
    per_second: Vec<u64>,
    /// The latencies of each second (two significant figures: a few KB a second).
    latency_per_second: Vec<Option<Histogram<u64>>>,
}

enum Conn {
    Grpc(OptOutCheckClient<Authed>),
    Redis(redis::aio::MultiplexedConnection, String),
}

/// Runs a workload against a target and reports.
pub async fn run(
    target: &Target,
    population: &Population,
    workload: &Workload,
) -> Result<Report, Error> {
    if workload.concurrency == 0 || workload.connections == 0 || workload.batch == 0 {
        return Err(Error::Usage(
            "--concurrency, --connections and --batch must be at least 1".into(),
        ));
    }
    let mut conns = Vec::new();
    for _ in 0..workload.connections {
        conns.push(match target {
            Target::Grpc { url, api_key } => Conn::Grpc(
                OptOutCheckClient::with_interceptor(connect(url).await?, Bearer(api_key.clone()))
                    .max_decoding_message_size(64 * 1024 * 1024)
                    .max_encoding_message_size(64 * 1024 * 1024),
            ),
            Target::Redis { url, key } => Conn::Redis(
                redis::Client::open(url.as_str())?
                    .get_multiplexed_async_connection()
                    .await?,
                key.clone(),
            ),
        });
    }
    let pool = if workload.mode == Mode::Stream {
        Vec::new()
    } else {
        make_pool(population, workload)
    };
    let shared = Arc::new(Shared {
        population: population.clone(),
        workload: workload.clone(),
        pool,
        stop: AtomicBool::new(false),
        measuring: AtomicBool::new(workload.warmup.is_zero()),
        sent: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        started: Instant::now() + workload.warmup,
    });
    let empty = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| Error::Usage(format!("histogram: {e}")))?;
    let mut workers = Vec::new();
    for w in 0..workload.concurrency {
        let conn = match &conns[w % conns.len()] {
            Conn::Grpc(c) => Conn::Grpc(c.clone()),
            Conn::Redis(c, k) => Conn::Redis(c.clone(), k.clone()),
        };
        workers.push(tokio::spawn(worker(shared.clone(), conn, empty.clone())));
    }
    if !workload.warmup.is_zero() {
        tokio::time::sleep(workload.warmup).await;
        shared.measuring.store(true, Ordering::SeqCst);
    }
    let measure_start = Instant::now();
    let mut live = Live::new(workload.progress, target);
    // Stop at the duration, or when the request count is reached.
    loop {
        let sent = shared.sent.load(Ordering::Relaxed);
        let done_count = workload.count > 0 && sent >= workload.count;
        if done_count || measure_start.elapsed() >= workload.duration {
            break;
        }
        live.show(
            measure_start.elapsed(),
            sent,
            shared.failed.load(Ordering::Relaxed),
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    live.bar.finish_and_clear();
    shared.stop.store(true, Ordering::SeqCst);
    let mut hist = empty;
    let mut tally = Tally::default();
    for w in workers {
        let (h, t) = w.await.map_err(|e| Error::Remote(format!("worker: {e}")))?;
        hist.add(&h)
            .map_err(|e| Error::Usage(format!("histogram: {e}")))?;
        tally.requests += t.requests;
        tally.numbers += t.numbers;
        tally.planted_seen += t.planted_seen;
        tally.leaks += t.leaks;
        tally.warmup_leaks += t.warmup_leaks;
        for (k, v) in t.errors {
            *tally.errors.entry(k).or_default() += v;
        }
        if tally.per_second.len() < t.per_second.len() {
            tally.per_second.resize(t.per_second.len(), 0);
        }
        for (i, n) in t.per_second.iter().enumerate() {
            tally.per_second[i] += n;
        }
        if tally.latency_per_second.len() < t.latency_per_second.len() {
            tally
                .latency_per_second
                .resize_with(t.latency_per_second.len(), || None);
        }
        for (i, h) in t.latency_per_second.into_iter().enumerate() {
            match (&mut tally.latency_per_second[i], h) {
                (Some(all), Some(h)) => {
                    let _ = all.add(&h);
                }
                (slot @ None, h) => *slot = h,
                (Some(_), None) => {}
            }
        }
    }
    let seconds = measure_start.elapsed().as_secs_f64();
    // Whole seconds only: a last partial second would read as a drop in throughput.
    tally.per_second.truncate(seconds.floor() as usize);
    tally.latency_per_second.truncate(seconds.floor() as usize);
    let latency_each_second_us = tally
        .latency_per_second
        .iter()
        .map(|h| {
            h.as_ref().map_or((0, 0), |h| {
                (h.value_at_quantile(0.5), h.value_at_quantile(0.99))
            })
        })
        .collect();
    let latency_histogram_us = hist
        .iter_log(100, 2.0)
        .map(|v| (v.value_iterated_to(), v.count_since_last_iteration()))
        .collect();
    Ok(Report {
        target: String::new(),
        mode: format!("{:?}", workload.mode).to_lowercase(),
        batch: if workload.mode == Mode::Single {
            1
        } else {
            workload.batch
        },
        concurrency: workload.concurrency,
        connections: workload.connections,
        rate: workload.rate,
        seconds,
        requests: tally.requests,
        numbers: tally.numbers,
        requests_per_second: tally.requests as f64 / seconds,
        numbers_per_second: tally.numbers as f64 / seconds,
        latency_us: Latency {
            p50: hist.value_at_quantile(0.5),
            p90: hist.value_at_quantile(0.9),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
        },
        errors: tally.errors,
        planted_seen: tally.planted_seen,
        leaks: tally.leaks,
        warmup_leaks: tally.warmup_leaks,
        numbers_each_second: tally.per_second,
        latency_histogram_us,
        latency_each_second_us,
        ..Report::default()
    })
}

/// One request of the pool: its numbers, the positions of the planted (opted-out) ones, and the
/// request itself.
struct Pooled {
    numbers: Vec<optout_core::NhsNumber>,
    planted: Vec<usize>,
    req: CheckRequest,
}

/// Requests in the pool: a million distinct numbers at 1,000 a request (so the server's filter
/// and store see realistic spread, not a handful of numbers in cache), capped at 4,096 requests.
fn pool_size(per_request: usize) -> usize {
    (1_000_000 / per_request.max(1)).clamp(64, 4096)
}

fn make_pool(population: &Population, workload: &Workload) -> Vec<Pooled> {
    let per_request = if workload.mode == Mode::Single {
        1
    } else {
        workload.batch
    };
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x0F_F1CE);
    (0..pool_size(per_request))
        .map(|_| {
            let (numbers, req) =
                draw_request(population, &mut rng, per_request, workload.opted_share);
            let planted = numbers
                .iter()
                .enumerate()
                .filter(|(_, n)| population.is_planted(**n))
                .map(|(i, _)| i)
                .collect();
            Pooled {
                numbers,
                planted,
                req,
            }
        })
        .collect()
}

/// A Check request of `count` numbers drawn as the harness draws them, framed for gRPC (a zero
/// byte, the length, the message): a body for an independent client such as h2load.
pub fn framed_check(population: &Population, count: usize, opted_share: f64) -> Vec<u8> {
    use prost::Message;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x0F_F1CE);
    let (_, req) = draw_request(population, &mut rng, count, opted_share);
    let body = req.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// `count` numbers of the traffic and the Check request carrying them.
fn draw_request(
    population: &Population,
    rng: &mut impl rand::Rng,
    count: usize,
    share: f64,
) -> (Vec<optout_core::NhsNumber>, CheckRequest) {
    let numbers: Vec<_> = (0..count).map(|_| population.draw(rng, share)).collect();
    // All the numbers' digits in one buffer (the request's NumberList): the client shares the
    // machine with the server, so it should not spend an allocation per number either.
    let mut list = optout_proto::NumberList::new();
    let mut digits = [0u8; 10];
    for n in &numbers {
        let mut v = n.as_u64();
        for d in digits.iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
        list.push(digits);
    }
    let req = CheckRequest {
        nhs_numbers: list,
        purpose: Purpose::Research as i32,
        origin: DataOrigin::Other as i32,
        at_least_version: String::new(),
        extract_id: "optout-loadtest".into(),
        ..CheckRequest::default()
    };
    (numbers, req)
}

async fn worker(
    shared: Arc<Shared>,
    mut conn: Conn,
    mut hist: Histogram<u64>,
) -> (Histogram<u64>, Tally) {
    let mut tally = Tally::default();
    let rate = shared.workload.rate;
    if shared.workload.mode == Mode::Stream {
        if let Conn::Grpc(client) = &mut conn {
            stream_worker(&shared, client, &mut hist, &mut tally).await;
        }
        return (hist, tally);
    }
    while !shared.stop.load(Ordering::Relaxed) {
        // Open loop: each request has an intended send time; latency counts from it, so a stalled
        // server shows up as latency instead of silently sending less (no coordinated omission).
        let k = shared.sent.fetch_add(1, Ordering::Relaxed);
        let intended = if rate > 0.0 {
            let at = shared.started + Duration::from_secs_f64(k as f64 / rate);
            tokio::time::sleep_until(at.into()).await;
            at
        } else {
            Instant::now()
        };
        let pooled = &shared.pool[usize::try_from(k).unwrap_or(0) % shared.pool.len()];
        // Released or not, for each planted number (the only answers a leak can be in).
        let answers: Result<(usize, Vec<bool>), String> = match &mut conn {
            Conn::Grpc(client) => match client.check(pooled.req.clone()).await {
                Ok(r) => {
                    let decisions = r.into_inner().decisions;
                    Ok((
                        decisions.len(),
                        pooled
                            .planted
                            .iter()
                            .map(|i| {
                                decisions
                                    .get(*i)
                                    .is_some_and(|d| d.outcome == Outcome::Release as i32)
                            })
                            .collect(),
                    ))
                }
                Err(s) => Err(format!("{:?}", s.code())),
            },
            Conn::Redis(c, key) => redis_check(c, key, &pooled.numbers)
                .await
                .map(|all| (all.len(), pooled.planted.iter().map(|i| all[*i]).collect())),
        };
        let elapsed = intended.elapsed();
        if !shared.measuring.load(Ordering::Relaxed) {
            if let Ok((_, planted_released)) = &answers {
                tally.warmup_leaks += planted_released.iter().filter(|r| **r).count() as u64;
            }
            continue;
        }
        match answers {
            Ok((answered, planted_released)) => {
                let micros = u64::try_from(elapsed.as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1);
                record(
                    &shared,
                    (pooled.numbers.len(), answered),
                    &planted_released,
                    micros,
                    &mut tally,
                );
                let _ = hist.record(micros);
            }
            Err(code) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                *tally.errors.entry(code).or_default() += 1;
            }
        }
    }
    (hist, tally)
}

/// Counts one answered request of `sent` numbers, `answered` decisions, and whether each planted
/// number in it was released (a leak).
fn record(
    shared: &Shared,
    (sent, answered): (usize, usize),
    planted_released: &[bool],
    micros: u64,
    tally: &mut Tally,
) {
    tally.requests += 1;
    tally.numbers += sent as u64;
    let second = shared.started.elapsed().as_secs() as usize;
    if tally.per_second.len() <= second {
        tally.per_second.resize(second + 1, 0);
    }
    tally.per_second[second] += sent as u64;
    if tally.latency_per_second.len() <= second {
        tally.latency_per_second.resize_with(second + 1, || None);
    }
    let slot = &mut tally.latency_per_second[second];
    if slot.is_none() {
        *slot = Histogram::new_with_bounds(1, 60_000_000, 2).ok();
    }
    if let Some(h) = slot {
        let _ = h.record(micros);
    }
    tally.planted_seen += planted_released.len() as u64;
    tally.leaks += planted_released.iter().filter(|r| **r).count() as u64;
    if answered != sent {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        *tally.errors.entry("short-answer".into()).or_default() += 1;
    }
}

async fn redis_check(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    numbers: &[optout_core::NhsNumber],
) -> Result<Vec<bool>, String> {
    if numbers.len() == 1 {
        let member: i64 = redis::cmd("SISMEMBER")
            .arg(key)
            .arg(numbers[0].as_u64())
            .query_async(conn)
            .await
            .map_err(|_| "redis".to_string())?;
        return Ok(vec![member == 0]);
    }
    let members: Vec<i64> = redis::cmd("SMISMEMBER")
        .arg(key)
        .arg(numbers.iter().map(|n| n.as_u64()).collect::<Vec<_>>())
        .query_async(conn)
        .await
        .map_err(|_| "redis".to_string())?;
    Ok(members.into_iter().map(|m| m == 0).collect())
}

/// One CheckStream per worker, with up to 8 messages in flight; latency per message from its send.
async fn stream_worker(
    shared: &Shared,
    client: &mut OptOutCheckClient<Authed>,
    hist: &mut Histogram<u64>,
    tally: &mut Tally,
) {
    const WINDOW: usize = 8;
    let (tx, rx) = tokio::sync::mpsc::channel::<CheckRequest>(WINDOW);
    let (sent_tx, mut sent_rx) =
        tokio::sync::mpsc::channel::<(Instant, Vec<optout_core::NhsNumber>)>(WINDOW * 2);
    let permits = Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let mut responses = match client
        .check_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            *tally.errors.entry(format!("{:?}", s.code())).or_default() += 1;
            return;
        }
    };
    let producer = {
        let permits = permits.clone();
        let population = shared.population.clone();
        let workload = shared.workload.clone();
        async move {
            let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                permit.forget();
                let (numbers, req) =
                    draw_request(&population, &mut rng, workload.batch, workload.opted_share);
                if sent_tx.send((Instant::now(), numbers)).await.is_err()
                    || tx.send(req).await.is_err()
                {
                    break;
                }
            }
        }
    };
    let producer = tokio::spawn(producer);
    while !shared.stop.load(Ordering::Relaxed) {
        if shared.workload.count > 0 && shared.sent.load(Ordering::Relaxed) >= shared.workload.count
        {
            break;
        }
        match responses.message().await {
            Ok(Some(r)) => {
                permits.add_permits(1);
                shared.sent.fetch_add(1, Ordering::Relaxed);
                let Some((at, numbers)) = sent_rx.recv().await else {
                    break;
                };
                if shared.measuring.load(Ordering::Relaxed) {
                    let planted_released: Vec<bool> = numbers
                        .iter()
                        .zip(&r.decisions)
                        .filter(|(n, _)| shared.population.is_planted(**n))
                        .map(|(_, d)| d.outcome == Outcome::Release as i32)
                        .collect();
                    let micros = u64::try_from(at.elapsed().as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1);
                    record(
                        shared,
                        (numbers.len(), r.decisions.len()),
                        &planted_released,
                        micros,
                        tally,
                    );
                    let _ = hist.record(micros);
                }
            }
            Ok(None) => break,
            Err(s) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                *tally.errors.entry(format!("{:?}", s.code())).or_default() += 1;
                break;
            }
        }
    }
    permits.close();
    producer.abort();
}

/// Prints a report for people.
/// The failed requests by status code, most first: `Unauthenticated 46487, DeadlineExceeded 3`.
pub fn error_breakdown(r: &Report) -> String {
    let mut by: Vec<(&String, &u64)> = r.errors.iter().collect();
    by.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    by.iter()
        .map(|(code, n)| format!("{code} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a run against `server`, whose status is `status`, would measure nothing useful: it holds
/// no national opt-out (never seeded), so every planted number would come back RELEASE. `None`
/// when it holds some. (A server that cannot be asked, with a checker key or the echo server,
/// has no status to judge.)
pub fn unseeded(
    server: &str,
    status: &optout_proto::GetStatusResponse,
    population: &Population,
) -> Option<String> {
    (status.national_data_opt_outs == 0 && population.count() > 0).then(|| {
        format!(
            "{server} holds no national data opt-outs, so every planted number would come back \
             RELEASE: seed it first (optout-loadtest seed --server {server} --count {})",
            population.count()
        )
    })
}

/// The service's status (its counts and its build), when it can be asked: an admin key, not the
/// echo server.
pub async fn server_status(
    server: &str,
    api_key: Option<String>,
) -> Option<optout_proto::GetStatusResponse> {
    let channel = connect(server).await.ok()?;
    let mut admin = OptOutAdminClient::with_interceptor(channel, Bearer(api_key));
    Some(
        admin
            .get_status(GetStatusRequest {})
            .await
            .ok()?
            .into_inner(),
    )
}

/// One line of a run: rates, latency percentiles, errors by status code, leaks.
pub fn summary(r: &Report) -> String {
    let errors: u64 = r.errors.values().sum();
    format!(
        "{:<8} {:<6} batch {:>5} conc {:>3} conn {:>2}{}: {:>10.0} numbers/s {:>9.0} req/s  \
         p50 {:>6} us p90 {:>6} us p99 {:>6} us p99.9 {:>6} us max {:>7} us  errors {}{} leaks {} \
         (planted seen {}){}",
        r.target,
        r.mode,
        r.batch,
        r.concurrency,
        r.connections,
        if r.rate > 0.0 {
            format!(" rate {:.0}/s", r.rate)
        } else {
            String::new()
        },
        r.numbers_per_second,
        r.requests_per_second,
        r.latency_us.p50,
        r.latency_us.p90,
        r.latency_us.p99,
        r.latency_us.p999,
        r.latency_us.max,
        errors,
        if errors > 0 {
            format!(" ({})", error_breakdown(r))
        } else {
            String::new()
        },
        r.leaks,
        r.planted_seen,
        if r.warmup_leaks > 0 {
            format!(" warm-up leaks {}", r.warmup_leaks)
        } else {
            String::new()
        }
    )
}
