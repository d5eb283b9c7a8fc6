//! `optout-nemesis`: seeded runs of random operations and faults against real Redis and real
//! `optout serve` replicas, each history checked. Exits 1 if any run broke a rule.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;
use optout_nemesis::{RunConfig, Topology, markdown_table, procs::Programs, run, summary};

/// Runs the nemesis: each run is one seed on one topology; runs go on (seeds counting up from
/// --seed, topologies in turn) until --runs are done or --minutes are up.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Topologies to run on, in turn.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Topology::ALL.to_vec())]
    topology: Vec<Topology>,
    /// The first seed (the next runs take the seeds after it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs to do (0: as many as --minutes allow).
    #[arg(long, default_value_t = 0)]
    runs: u64,
    /// Stop starting runs after this many minutes.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Seconds of operations and faults in each run.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// The optout binary under test (default: `optout` next to this program).
    #[arg(long)]
    optout_bin: Option<PathBuf>,
    /// Write the runs' table to this Markdown file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Keep every run's files (history.json, the processes' logs) under this directory.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Check a kept history.json again (no run), and say what the checker finds.
    #[arg(long, conflicts_with_all = ["runs", "keep", "report"])]
    check_history: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.check_history {
        return recheck(path);
    }
    let optout = args.optout_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("optout")))
            .unwrap_or_else(|| PathBuf::from("optout"))
    });
    if !optout.exists() {
        eprintln!(
            "error: the optout binary is not at {} (build it first: cargo build --release \
             --workspace; or pass --optout-bin)",
            optout.display()
        );
        return std::process::ExitCode::from(2);
    }
    let programs = Programs::new(optout);
    let began = Instant::now();
    let budget = Duration::from_secs_f64(args.minutes.max(0.0) * 60.0);
    let mut reports = Vec::new();
    let mut seed = args.seed;
    let mut i = 0u64;
    let mut unmade = 0u64;
    while (args.runs == 0 || i < args.runs) && (args.runs > 0 || began.elapsed() < budget) {
        let topology = args.topology[(i as usize) % args.topology.len()];
        let mut config = RunConfig::new(
            topology,
            seed,
            Duration::from_secs(args.seconds),
            programs.clone(),
        );
        config.dir = args
            .keep
            .as_ref()
            .map(|k| k.join(format!("{topology:?}-{seed}").to_lowercase()));
        match run(config).await {
            Ok(r) => {
                println!("{}", summary(&r));
                reports.push(r);
            }
            Err(e) => {
                // Not a verdict: the run could not be made (a topology that would not come up).
                eprintln!(
                    "error: {} seed {seed}: the run could not be made: {e}",
                    topology.name()
                );
                unmade += 1;
            }
        }
        i += 1;
        seed += 1;
    }
    let table = markdown_table(&reports);
    println!("\n{table}");
    let document = format!(
        "# Nemesis runs\n\n\
         Written by `{}` ({} runs, {:.0} minutes, {} s of operations and faults each, on this \
         machine's debug or release build as given). Each row is one seed on one topology: the \
         operations the clients drove through three `optout serve` replicas and how they ended \
         (changes acknowledged, unknown: an error or timeout that may hide an applied change, and \
         refused: a definite no), the checks answered, the faults injected, the releases of a \
         number whose opt-out bound the answer that the checker had to explain, and the \
         violations of the checker's rules (docs/src/guarantees.md, \"Shown by search: the nemesis\").\n\n{table}",
        std::env::args().collect::<Vec<_>>().join(" "),
        reports.len(),
        began.elapsed().as_secs_f64() / 60.0,
        args.seconds,
    );
    if let Some(path) = &args.report
        && let Err(e) = std::fs::write(path, &document)
    {
        eprintln!("error: cannot write {}: {e}", path.display());
        return std::process::ExitCode::from(2);
    }
    if reports.iter().any(|r| !r.verdict.violations.is_empty()) {
        std::process::ExitCode::from(1)
    } else if unmade > 0 {
        eprintln!("error: {unmade} runs could not be made");
        std::process::ExitCode::from(2)
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// Checks a kept history again.
fn recheck(path: &std::path::Path) -> std::process::ExitCode {
    let history: optout_nemesis::history::History = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return std::process::ExitCode::from(2);
        }
    };
    let verdict = optout_nemesis::checker::check(&history);
    println!(
        "{} seed {}: {} changes, {} checks, {} faults; {} releases and {} withholds of a binding \
         opt-out checked, {} violations",
        history.topology,
        history.seed,
        history.changes.len(),
        history.checks.len(),
        history.faults.len(),
        verdict.releases_checked,
        verdict.opt_outs_withheld,
        verdict.violations.len()
    );
    for v in &verdict.violations {
        println!("VIOLATION {}: {}\n{}", v.rule, v.message, v.context);
    }
    if verdict.violations.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}
