//! `optout-loadtest`: seed, run, echo-server. See docs/src/performance.md, "Load testing".

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use optout_loadtest::{Mode, Report, Target, Workload, population::Population, run, seed, summary};

#[derive(Parser)]
#[command(
    name = "optout-loadtest",
    about = "Drive and measure the optout service through its API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The CA (PEM) that signed an https:// service's certificate; without it, the public roots.
    #[arg(long, global = true, env = "OPTOUT_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// A client certificate (PEM) for mutual TLS, with --client-key.
    #[arg(
        long,
        global = true,
        env = "OPTOUT_CLIENT_CERT",
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(
        long,
        global = true,
        env = "OPTOUT_CLIENT_KEY",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
}

impl Cli {
    /// The TLS files, read: a file that cannot be read is named.
    fn tls(&self) -> Result<optout_loadtest::Tls, optout_loadtest::Error> {
        let read = |flag: &str, p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| optout_loadtest::Error::Usage(format!("{flag} {}: {e}", p.display())))
        };
        Ok(optout_loadtest::Tls {
            ca_pem: self
                .ca_cert
                .as_ref()
                .map(|p| read("--ca-cert", p))
                .transpose()?,
            identity: match (&self.client_cert, &self.client_key) {
                (Some(c), Some(k)) => Some((read("--client-cert", c)?, read("--client-key", k)?)),
                _ => None,
            },
        })
    }
}

#[derive(Args, Clone)]
struct PopulationArgs {
    /// Planted opt-outs.
    #[arg(long, default_value_t = 5_000_000)]
    count: u64,
    /// Seed of the population (the same seed regenerates the same planted numbers).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Draw clean numbers only from this many (0: from all ~90 million). With `seed
    /// --national-check`, these and the planted ones are the checked population of a store in
    /// population mode; give the same value to `run`.
    #[arg(long, default_value_t = 0)]
    checked_pool: u64,
}

impl PopulationArgs {
    fn population(&self) -> Population {
        Population::new(self.seed, self.count).with_pool(self.checked_pool)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Plant synthetic opt-outs through ImportOptOuts.
    Seed {
        #[command(flatten)]
        population: PopulationArgs,
        /// The service.
        #[arg(long, env = "OPTOUT_SERVER", default_value = "http://127.0.0.1:50051")]
        server: String,
        /// API key with the admin role.
        #[arg(long, env = "OPTOUT_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Also load the numbers into a plain Redis set for `run --baseline redis`.
        #[arg(long)]
        baseline_redis_url: Option<String>,
        /// The baseline set's key.
        #[arg(long, default_value = "optout-loadtest:baseline")]
        baseline_key: String,
        /// Seed a store in population mode: a national check round trip whose population is the
        /// planted numbers and the --checked-pool clean ones.
        #[arg(long)]
        national_check: bool,
        /// Seed although the store already holds national opt-outs: the REPLACE removes every one
        /// not in the synthetic population. Only for a store that holds an earlier seed.
        #[arg(long)]
        force: bool,
    },
    /// Run a workload and report (and, with --baseline redis, the same workload against Redis).
    Run(Box<RunArgs>),
    /// One HTML page from the JSON reports of several runs (service, Redis and echo side by
    /// side), e.g. those scripts/bench.sh writes.
    Report {
        /// Where to write the page.
        #[arg(long)]
        out: PathBuf,
        /// JSON files written by `run --json`.
        #[arg(required = true)]
        json: Vec<PathBuf>,
    },
    /// Write a gRPC-framed Check request (a zero byte, the length, the message) for an independent
    /// client: `h2load -d FILE` posts it (scripts/h2load.sh).
    Frame {
        #[command(flatten)]
        population: PopulationArgs,
        /// Numbers in the request.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Share of planted (opted-out) numbers.
        #[arg(long, default_value_t = 0.05)]
        opted_share: f64,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Serve the OptOutCheck API doing no work, to measure the transport floor.
    EchoServer {
        /// Loopback address to listen on.
        #[arg(long, default_value = "127.0.0.1:50151")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    population: PopulationArgs,
    /// The service (or echo server).
    #[arg(long, env = "OPTOUT_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// API key with the checker role.
    #[arg(long, env = "OPTOUT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Label of the target in reports.
    #[arg(long, default_value = "service")]
    label: String,
    #[arg(long, value_enum, default_value = "batch")]
    mode: Mode,
    /// Numbers per request (batch, stream).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Requests in flight (closed loop), or workers (open loop).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Connections shared by the workers.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// How long to measure: 10s, 500ms, 2m (a bare number is seconds).
    #[arg(long, default_value = "10s", value_parser = length_of_time)]
    duration: Duration,
    /// Stop after this many requests (messages in stream mode) instead; 0: no limit.
    #[arg(long, default_value_t = 0)]
    count_requests: u64,
    /// Open loop at this many requests per second (0: closed loop).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Share of planted (opted-out) numbers in the traffic.
    #[arg(long, default_value_t = 0.05)]
    opted_share: f64,
    /// Warm-up before measuring, written as --duration.
    #[arg(long, default_value = "2s", value_parser = length_of_time)]
    warmup: Duration,
    /// Also run the same workload straight against Redis ("redis").
    #[arg(long)]
    baseline: Option<String>,
    /// Redis of the baseline set.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    baseline_redis_url: String,
    /// The baseline set's key.
    #[arg(long, default_value = "optout-loadtest:baseline")]
    baseline_key: String,
    /// Write the report(s) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the report(s) as a self-contained HTML page here (charts of throughput over time
    /// and of the latency histogram, and the percentiles, side by side).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Do not fail on released opt-outs (for the echo server, which releases everything).
    #[arg(long)]
    no_leak_check: bool,
    /// Do not fail on failed requests (an overload test that expects some).
    #[arg(long)]
    allow_errors: bool,
    /// A criterion the service's run must meet, else the run fails (repeat for more), as k6
    /// writes them: p50|p90|p99|p99.9|max against a length of time (p99<5ms), rate or req_rate
    /// against a number a second (rate>=100000), error_rate against a share (error_rate<0.01).
    #[arg(long = "threshold", value_parser = optout_loadtest::threshold::Threshold::parse)]
    thresholds: Vec<optout_loadtest::threshold::Threshold>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match real_main().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                optout_loadtest::Error::Usage(_) => ExitCode::from(2),
                optout_loadtest::Error::Remote(_) => ExitCode::FAILURE,
            }
        }
    }
}

async fn real_main() -> Result<ExitCode, optout_loadtest::Error> {
    let cli = Cli::parse();
    optout_loadtest::set_tls(cli.tls()?);
    match cli.command {
        Command::Frame {
            population,
            batch,
            opted_share,
            out,
        } => {
            let pop = population.population();
            let body = optout_loadtest::framed_check(&pop, batch, opted_share);
            std::fs::write(&out, &body)
                .map_err(|e| optout_loadtest::Error::Usage(format!("{}: {e}", out.display())))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Seed {
            population,
            server,
            api_key,
            baseline_redis_url,
            baseline_key,
            national_check,
            force,
        } => {
            if national_check && population.checked_pool == 0 {
                return Err(optout_loadtest::Error::Usage(
                    "--national-check needs --checked-pool: the clean numbers of the population"
                        .into(),
                ));
            }
            let pop = population.population();
            let bar = indicatif::ProgressBar::new(pop.count());
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {human_pos}/{human_len} opt-outs ({per_sec}, eta {eta})",
            ) {
                bar.set_style(style);
            }
            let seeded = seed(
                &server,
                api_key,
                &pop,
                baseline_redis_url
                    .as_deref()
                    .map(|u| (u, baseline_key.as_str())),
                national_check,
                force,
                &bar,
            )
            .await?;
            bar.finish_and_clear();
            println!(
                "seeded {} opt-outs in {:.2} s ({:.0}/s) with seed {}: the national list \
                 REPLACEd, {} added, {} removed",
                seeded.received,
                seeded.took.as_secs_f64(),
                seeded.received as f64 / seeded.took.as_secs_f64(),
                population.seed,
                seeded.added,
                seeded.removed
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { out, json } => {
            let mut reports = Vec::new();
            for path in &json {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    optout_loadtest::Error::Usage(format!("{}: {e}", path.display()))
                })?;
                let mut these: Vec<optout_loadtest::Report> =
                    serde_json::from_str(&text).map_err(|e| {
                        optout_loadtest::Error::Usage(format!("{}: {e}", path.display()))
                    })?;
                reports.append(&mut these);
            }
            write_html(&out, &reports)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::EchoServer { listen } => {
            if !listen.ip().is_loopback() {
                return Err(optout_loadtest::Error::Usage(
                    "the echo server listens on loopback only".into(),
                ));
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| optout_loadtest::Error::Usage(format!("--listen {listen}: {e}")))?;
            eprintln!(
                "echo server listening on {}",
                listener
                    .local_addr()
                    .map_err(|e| optout_loadtest::Error::Usage(e.to_string()))?
            );
            optout_loadtest::echo::serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(|e| optout_loadtest::Error::Remote(e.to_string()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let pop = args.population.population();
            let workload = Workload {
                mode: args.mode,
                batch: args.batch,
                concurrency: args.concurrency,
                connections: args.connections,
                duration: args.duration.max(Duration::from_millis(100)),
                count: args.count_requests,
                rate: args.rate,
                opted_share: args.opted_share,
                warmup: args.warmup,
                progress: true,
            };
            // Asked once: whether the store was seeded, and the server's build for the report.
            let status = optout_loadtest::server_status(&args.server, args.api_key.clone()).await;
            if let Some(why) = status
                .as_ref()
                .and_then(|s| optout_loadtest::unseeded(&args.server, s, &pop))
            {
                return Err(optout_loadtest::Error::Usage(why));
            }
            let mut reports: Vec<Report> = Vec::new();
            let started = jiff::Timestamp::now();
            let mut r = run(
                &Target::Grpc {
                    url: args.server.clone(),
                    api_key: args.api_key.clone(),
                },
                &pop,
                &workload,
            )
            .await?;
            r.target = args.label.clone();
            // The run's metadata, for the report.
            let command: Vec<String> = std::env::args().collect();
            r.command = command.join(" ");
            r.started_at = format!("{started:.0}");
            r.server_version = status.map(|s| s.server_version).unwrap_or_default();
            println!("{}", summary(&r));
            reports.push(r);
            if args.baseline.as_deref() == Some("redis") {
                let mut b = run(
                    &Target::Redis {
                        url: args.baseline_redis_url.clone(),
                        key: args.baseline_key.clone(),
                    },
                    &pop,
                    &workload,
                )
                .await?;
                b.target = "redis".into();
                println!("{}", summary(&b));
                if b.numbers_per_second > 0.0 {
                    println!(
                        "ratio {} / redis: {:.2}x numbers per second",
                        args.label,
                        reports[0].numbers_per_second / b.numbers_per_second
                    );
                }
                reports.push(b);
            } else if let Some(other) = &args.baseline {
                return Err(optout_loadtest::Error::Usage(format!(
                    "--baseline {other}: the only baseline is \"redis\""
                )));
            }
            if let Some(path) = &args.json {
                let json = serde_json::to_string_pretty(&reports)
                    .map_err(|e| optout_loadtest::Error::Usage(e.to_string()))?;
                std::fs::write(path, json).map_err(|e| {
                    optout_loadtest::Error::Usage(format!("{}: {e}", path.display()))
                })?;
            }
            if let Some(path) = &args.report {
                write_html(path, &reports)?;
            }
            let mut failed = false;
            let leaks: u64 = reports.iter().map(|r| r.leaks + r.warmup_leaks).sum();
            if leaks > 0 && !args.no_leak_check {
                let planted: u64 = reports.iter().map(|r| r.planted_seen).sum();
                eprintln!("FAIL: {leaks} opted-out numbers were released");
                if leaks >= planted {
                    eprintln!(
                        "      every planted opt-out came back RELEASE: was the store seeded with \
                         this --seed and --count (optout-loadtest seed --seed {} --count {})?",
                        args.population.seed, args.population.count
                    );
                }
                failed = true;
            }
            for t in &args.thresholds {
                let (value, holds) = t.check(&reports[0]);
                let verdict = if holds { "ok" } else { "FAILED" };
                println!("threshold {t}: {} {verdict}", t.shown(value));
                failed |= !holds;
            }
            for r in &reports {
                let errors: u64 = r.errors.values().sum();
                if errors > 0 && !args.allow_errors {
                    eprintln!(
                        "FAIL: {errors} {} requests failed ({}); --allow-errors to accept them",
                        r.target,
                        optout_loadtest::error_breakdown(r)
                    );
                    failed = true;
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// Writes the HTML page of `reports`.
fn write_html(
    path: &std::path::Path,
    reports: &[optout_loadtest::Report],
) -> Result<(), optout_loadtest::Error> {
    let page = optout_loadtest::report::html("optout load test", reports);
    std::fs::write(path, page)
        .map_err(|e| optout_loadtest::Error::Usage(format!("{}: {e}", path.display())))
}

/// A length of time as people write it (`10s`, `500ms`, `2m`), or a bare number of seconds.
fn length_of_time(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"));
    }
    optout_loadtest::length_of_time(s)
}
