//! `optout admin`: add, remove, import (`import.rs`), get, status, audit.

mod import;

use std::{io::BufRead, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Subcommand, ValueEnum};

use super::{
    AuthChannel, CliError, ClientArgs, DelimiterArg, FormatArg, TypeArg,
    words::{self, OutputArg},
};
use crate::cli::client::proto::{
    self, ChangeOptOutsRequest, opt_out_admin_client::OptOutAdminClient,
};

#[derive(Args, Debug)]
pub(crate) struct AdminArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// What each command prints: text (lines for people) or json (one document, for scripts;
    /// the same names, RFC 3339 times).
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputArg::Text)]
    output: OutputArg,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Record opt-outs (numbers as arguments, or one per line on stdin).
    Add(ChangeArgs),
    /// Remove opt-outs (numbers as arguments, or one per line on stdin).
    Remove(ChangeArgs),
    /// Bulk-load opt-outs of one type from a file (one number a line, or CSV with --column).
    Import(ImportArgs),
    /// Show the opt-outs recorded for one NHS number.
    Get {
        /// The NHS number.
        nhs_number: String,
    },
    /// Show counts, version, each list's coverage and age, filter and freshness.
    Status,
    /// After the store went back in time (replicas withhold everything, NOT_SERVING): record that
    /// the lost changes were restored, and why, so replicas rebuild and serve again. Audited.
    AcknowledgeRegression {
        /// What was restored and the incident reference (goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Read the audit log: who changed or checked what, when. Filters combine.
    Audit {
        /// From this time: RFC 3339 (2026-11-27T09:00:00Z), a date (2026-11-27, from its start,
        /// UTC) or how long ago (24h, 7d); default: the start.
        #[arg(long, visible_alias = "since", conflicts_with = "from_ms", value_parser = words::time_arg)]
        from: Option<i64>,
        /// Until this time, written as for --from; default: now.
        #[arg(long, conflicts_with = "to_ms", value_parser = words::time_arg)]
        to: Option<i64>,
        /// From this time, ms since the Unix epoch (for scripts; --from reads better).
        #[arg(long, default_value_t = 0, hide = true)]
        from_ms: i64,
        /// Until this time, ms since the Unix epoch (0: now).
        #[arg(long, default_value_t = 0, hide = true)]
        to_ms: i64,
        /// Only this organisation.
        #[arg(long)]
        organisation: Option<String>,
        /// Only this extract reference.
        #[arg(long)]
        extract_id: Option<String>,
        /// Only records about this patient ("who released data about this patient?").
        #[arg(long)]
        nhs_number: Option<String>,
        /// At most this many records (up to 10,000); when there are more, it says how to read on.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        /// Show each import's parts (the records of the numbers it added or removed, 10,000 a
        /// record) one a line; without it they fold into their import's line (text only).
        #[arg(long)]
        parts: bool,
    },
}

#[derive(Args, Debug)]
struct ChangeArgs {
    /// The opt-out type.
    #[arg(long = "type", value_enum)]
    opt_out_type: TypeArg,
    /// Type 1 (and required there): the ODS code of the GP practice whose objection this is
    /// (A83007). A patient holds type 1 while any practice does. `--practice unknown` removes the
    /// type 1 opt-outs recorded before practices were.
    #[arg(long)]
    practice: Option<String>,
    /// Where the change came from (a file name, a ticket).
    #[arg(long)]
    source: String,
    /// NHS numbers; none reads one per line from stdin.
    numbers: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ModeArg {
    /// Add the imported numbers.
    Merge,
    /// Make the stored set of the type equal to the imported numbers.
    Replace,
}

#[derive(Args, Debug)]
struct ImportArgs {
    /// The opt-out type.
    #[arg(long = "type", value_enum)]
    opt_out_type: TypeArg,
    /// Type 1 (and required there): the ODS code of the GP practice whose list this is
    /// (A83007). `--mode replace` replaces that practice's objections only.
    #[arg(long, conflicts_with = "from_national_check")]
    practice: Option<String>,
    /// Merge into, or replace, the stored set of that type (a national check is always a
    /// replace).
    #[arg(long, value_enum, required_unless_present = "from_national_check")]
    mode: Option<ModeArg>,
    /// Where the list came from; defaults to the file name.
    #[arg(long)]
    source: Option<String>,
    /// Read a CSV and take this column; without it (and without --format dat), the file holds one
    /// number a line.
    #[arg(long, conflicts_with = "format")]
    column: Option<String>,
    /// The CSV's field separator (with --column).
    #[arg(long, value_enum, default_value_t = DelimiterArg::Comma, requires = "column")]
    delimiter: DelimiterArg,
    /// dat: the national file check's format (one NHS number a line followed by a comma).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Refuse the whole file if any number in it is invalid (nothing is imported), as the
    /// national file check does; without it invalid numbers are skipped and their lines listed.
    #[arg(long)]
    strict: bool,
    /// The file; stdin if absent or "-".
    file: Option<PathBuf>,
    /// Import a national check round trip (a store in population mode): SENT is the .dat file
    /// sent to the national "Check for National Data Opt-outs" service (the population), RETURNED
    /// the .dat file it sent back (the numbers without an opt-out). The opt-outs are SENT minus
    /// RETURNED, applied as a REPLACE for that population, atomically, with the population.
    #[arg(
        long,
        num_args = 2,
        value_names = ["SENT", "RETURNED"],
        conflicts_with_all = ["file", "column", "format"],
        requires = "checked_at"
    )]
    from_national_check: Option<Vec<PathBuf>>,
    /// When the national check was made: no later than when SENT was sent to the national
    /// service (your MESH client's log of the send). The list's age counts from it. RFC 3339
    /// (2026-11-27T09:00:00Z) or a date (2026-11-27: its start, UTC). Required with
    /// --from-national-check: a file's modification time is when the reply was written or
    /// copied, after the check, and would make the list look younger than it is.
    #[arg(long, requires = "from_national_check")]
    checked_at: Option<String>,
    /// Import a national check older than the one in force (which would move the list back in
    /// time), and why: the newer check was wrong, say. Recorded in the audit.
    #[arg(long, value_name = "REASON", requires = "from_national_check")]
    allow_older_check: Option<String>,
}

pub(crate) async fn run(args: AdminArgs) -> Result<ExitCode, CliError> {
    let (channel, bearer) = args.client.authed().await?;
    let mut client = OptOutAdminClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(64 * 1024 * 1024);
    let timeout = args.client.timeout();
    let output = args.output;
    match args.command {
        AdminCommand::Add(c) => change(&mut client, c, timeout, true, output).await,
        AdminCommand::Remove(c) => change(&mut client, c, timeout, false, output).await,
        AdminCommand::Import(i) => import::import(&mut client, i, output).await,
        AdminCommand::AcknowledgeRegression { reason } => {
            acknowledge(&mut client, reason, timeout, output).await
        }
        AdminCommand::Get { nhs_number } => {
            super::admin_read::get(&mut client, nhs_number, timeout, output).await
        }
        AdminCommand::Audit {
            from,
            to,
            from_ms,
            to_ms,
            organisation,
            extract_id,
            nhs_number,
            limit,
            parts,
        } => {
            let from_ms = from.unwrap_or(from_ms);
            let to_ms = to.unwrap_or(to_ms);
            let query = proto::ReadAuditRequest {
                from_unix_ms: from_ms,
                to_unix_ms: to_ms,
                organisation: organisation.unwrap_or_default(),
                extract_id: extract_id.unwrap_or_default(),
                nhs_number: nhs_number.unwrap_or_default(),
                // One more than shown: whether there are more to read.
                limit: limit + 1,
            };
            super::admin_read::audit(&mut client, query, timeout, (output, parts)).await
        }
        AdminCommand::Status => super::admin_read::status(&mut client, timeout, output).await,
    }
}

pub(super) type Admin = OptOutAdminClient<AuthChannel>;

async fn acknowledge(
    client: &mut Admin,
    reason: String,
    timeout: Duration,
    output: OutputArg,
) -> Result<ExitCode, CliError> {
    let mut request = tonic::Request::new(proto::AcknowledgeStoreRegressionRequest { reason });
    request.set_timeout(timeout);
    let r = client
        .acknowledge_store_regression(request)
        .await?
        .into_inner();
    if output == OutputArg::Json {
        words::print_json(&serde_json::json!({
            "acknowledgement": r.acknowledgement_id,
            "version": r.version,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "acknowledged ({}) at version {}; replicas that failed closed rebuild from the \
         store and serve again",
        r.acknowledgement_id, r.version
    );
    Ok(ExitCode::SUCCESS)
}

async fn change(
    client: &mut OptOutAdminClient<AuthChannel>,
    args: ChangeArgs,
    timeout: std::time::Duration,
    add: bool,
    output: OutputArg,
) -> Result<ExitCode, CliError> {
    // Each number with where it came from, so a bad one is named by its 1-based place.
    let numbered: Vec<(String, String)> = if args.numbers.is_empty() {
        read_numbered(std::io::stdin().lock(), "stdin")?
            .into_iter()
            .map(|(line, n)| (format!("stdin line {line}"), n))
            .collect()
    } else {
        args.numbers
            .into_iter()
            .enumerate()
            .map(|(i, n)| (format!("argument {}", i + 1), n))
            .collect()
    };
    let bad: Vec<String> = numbered
        .iter()
        .filter_map(|(at, n)| {
            crate::core::NhsNumber::parse(n)
                .err()
                .map(|e| format!("{at}: {e}"))
        })
        .collect();
    if !bad.is_empty() {
        return Err(CliError::Input(format!(
            "{} invalid NHS number{}, so nothing was sent: {}{}",
            bad.len(),
            if bad.len() == 1 { "" } else { "s" },
            bad.iter().take(10).cloned().collect::<Vec<_>>().join("; "),
            if bad.len() > 10 { "; ..." } else { "" }
        )));
    }
    let numbers: Vec<String> = numbered.into_iter().map(|(_, n)| n).collect();
    if numbers.is_empty() {
        return Err(CliError::Usage("no NHS numbers given".into()));
    }
    let practice = practice_arg(args.opt_out_type, args.practice.as_deref(), !add)?;
    let mut request = tonic::Request::new(ChangeOptOutsRequest {
        nhs_numbers: numbers,
        r#type: proto::OptOutType::from(args.opt_out_type) as i32,
        source: args.source,
        practice,
    });
    request.set_timeout(timeout);
    let r = if add {
        client.add_opt_outs(request).await?
    } else {
        client.remove_opt_outs(request).await?
    }
    .into_inner();
    if output == OutputArg::Json {
        words::print_json(&serde_json::json!({"applied": r.applied, "version": r.version}))?;
    } else {
        println!("applied {} at version {}", r.applied, r.version);
    }
    Ok(ExitCode::SUCCESS)
}

/// `--practice`, checked before anything is sent: required for type 1 (its opt-outs belong to
/// practices), refused for the national type; `unknown` only for removals.
fn practice_arg(t: TypeArg, practice: Option<&str>, removal: bool) -> Result<String, CliError> {
    match (t, practice) {
        (TypeArg::Type1, None) => Err(CliError::Usage(
            "--practice is required with --type type-1: a type 1 opt-out belongs to the GP \
             practice that recorded it (its ODS code, such as A83007)"
                .into(),
        )),
        (TypeArg::National, Some(_)) => Err(CliError::Usage(
            "--practice is for --type type-1 only: a national data opt-out belongs to no practice"
                .into(),
        )),
        (_, None) => Ok(String::new()),
        (_, Some(p)) => crate::core::Practice::parse(p, removal)
            .map(|p| p.name().to_string())
            .map_err(|e| CliError::Usage(format!("--practice: {e}"))),
    }
}

/// The non-blank lines of `input`, trimmed, with their 1-based line numbers.
fn read_numbered(input: impl BufRead, what: &str) -> Result<Vec<(u64, String)>, CliError> {
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| CliError::Input(format!("{what} line {}: {e}", i + 1)))?;
        let t = line.trim();
        if !t.is_empty() {
            out.push((i as u64 + 1, t.to_string()));
        }
    }
    Ok(out)
}

pub(crate) fn read_lines(input: impl BufRead, what: &str) -> Result<Vec<String>, CliError> {
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| CliError::Input(format!("{what} line {}: {e}", i + 1)))?;
        let t = line.trim();
        if !t.is_empty() {
            out.push(t.to_string());
        }
    }
    Ok(out)
}
