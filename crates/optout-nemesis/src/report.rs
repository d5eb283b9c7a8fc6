//! Reports of runs: a line per run for the terminal, and a Markdown table in BENCHMARKS.md's
//! manner for NEMESIS.md.

use std::fmt::Write as _;

use crate::run::RunReport;

/// A run in a few lines: what it drove and what the checker said, with every violation whole.
pub fn summary(r: &RunReport) -> String {
    let mut out = format!(
        "{} seed {}: {} operations ({}), {} faults ({}), {} releases and {} withholds of a \
         binding opt-out checked, {} violations, {:.1} s",
        r.topology.name(),
        r.seed,
        r.op_count(),
        list(&r.ops),
        r.fault_count(),
        list(&r.faults),
        r.verdict.releases_checked,
        r.verdict.opt_outs_withheld,
        r.verdict.violations.len(),
        r.took.as_secs_f64(),
    );
    for n in &r.verdict.notes {
        let _ = write!(out, "\n  note: {n}");
    }
    for v in &r.verdict.violations {
        let _ = write!(
            out,
            "\n  VIOLATION {}: {}\n{}",
            v.rule, v.message, v.context
        );
    }
    if let Some(dir) = &r.kept {
        let _ = write!(
            out,
            "\n  history and logs kept in {} (replay the schedule with --seed {})",
            dir.display(),
            r.seed
        );
    }
    out
}

fn list(m: &std::collections::BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A Markdown table of runs: one row each, then the totals.
pub fn markdown_table(runs: &[RunReport]) -> String {
    let mut out = String::from(
        "| topology | seed | operations | changes acknowledged | unknown | refused | checks answered | faults | releases checked | violations | seconds |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let sum = |r: &RunReport, f: &dyn Fn(&str) -> bool| -> u64 {
        r.ops.iter().filter(|(k, _)| f(k)).map(|(_, v)| v).sum()
    };
    for r in runs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {:.0} |",
            r.topology.name(),
            r.seed,
            r.op_count(),
            sum(r, &|k| !k.contains("check") && k.ends_with(" ok")),
            sum(r, &|k| !k.contains("check") && k.ends_with(" unknown")),
            sum(r, &|k| !k.contains("check") && k.ends_with(" refused")),
            sum(r, &|k| k.contains("check") && k.ends_with(" ok")),
            r.fault_count(),
            list(&r.faults),
            r.verdict.releases_checked,
            r.verdict.violations.len(),
            r.took.as_secs_f64()
        );
    }
    let _ = writeln!(
        out,
        "| **all** | {} runs | {} | | | | | {} | {} | {} | |",
        runs.len(),
        runs.iter().map(RunReport::op_count).sum::<u64>(),
        runs.iter().map(RunReport::fault_count).sum::<u64>(),
        runs.iter().map(|r| r.verdict.releases_checked).sum::<u64>(),
        runs.iter()
            .map(|r| r.verdict.violations.len())
            .sum::<usize>(),
    );
    out
}
