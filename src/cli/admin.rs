//! `optout admin`: add, remove, import, get, status.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Args, Subcommand, ValueEnum};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    AuthChannel, CliError, ClientArgs, DelimiterArg, FormatArg, TypeArg,
    words::{self, OutputArg},
};
use crate::{
    cli::client::proto::{
        self, ChangeOptOutsRequest, ImportOptOutsRequest, opt_out_admin_client::OptOutAdminClient,
    },
    core::extract::{for_each_chunk, for_each_dat_chunk, open_csv},
};

/// Numbers per import message.
const IMPORT_CHUNK: usize = 10_000;
/// The longest value an import sends as a number: an NHS number is 10 digits (12 with its
/// spaces); anything this long is the wrong file, and would make a message too large to send.
const MAX_VALUE_BYTES: usize = 1024;

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
        AdminCommand::Import(i) => import(&mut client, i, output).await,
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
            "--practice is required with --type type1: a type 1 opt-out belongs to the GP \
             practice that recorded it (its ODS code, such as A83007)"
                .into(),
        )),
        (TypeArg::National, Some(_)) => Err(CliError::Usage(
            "--practice is for --type type1 only: a national data opt-out belongs to no practice"
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

/// Streams the file in messages of `IMPORT_CHUNK` numbers and a final empty message marked
/// commit. A read error stops the stream without the commit, so the service changes nothing.
async fn import(
    client: &mut OptOutAdminClient<AuthChannel>,
    args: ImportArgs,
    output: OutputArg,
) -> Result<ExitCode, CliError> {
    if let Some(files) = &args.from_national_check {
        return import_national_check(client, &args, files, output).await;
    }
    let practice = practice_arg(args.opt_out_type, args.practice.as_deref(), false)?;
    let (input, name, size) = open_import_input(args.file.as_deref())?;
    let source = args.source.clone().unwrap_or_else(|| name.clone());
    let header = ImportOptOutsRequest {
        practice,
        mode: match args.mode {
            Some(ModeArg::Merge) => proto::ImportMode::Merge,
            Some(ModeArg::Replace) | None => proto::ImportMode::Replace,
        } as i32,
        r#type: proto::OptOutType::from(args.opt_out_type) as i32,
        source,
        ..ImportOptOutsRequest::default()
    };
    let (tx, rx) = mpsc::channel::<ImportOptOutsRequest>(4);
    let bar = super::progress_bytes(size, "read and sent");
    let bar_reader = bar.clone();
    let input: Box<dyn Read + Send> = Box::new(super::Counted {
        inner: input,
        bar: bar.clone(),
    });
    let layout = import_layout(&args)?;
    let strict = args.strict;
    // Set once the message marked commit is handed to the stream.
    let commit_sent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = commit_sent.clone();
    let reader = tokio::task::spawn_blocking(move || {
        read_import(
            input,
            &name,
            &layout,
            header,
            &tx,
            &bar_reader,
            strict,
            &sent,
        )
    });
    let outcome = tokio::select! {
        outcome = client.import_opt_outs(ReceiverStream::new(rx)) => outcome,
        _ = tokio::signal::ctrl_c() => interrupted(&bar, &commit_sent),
    };
    bar.finish_and_clear();
    // A read error is the cause of anything the service said about an uncommitted stream.
    let rejects = match reader.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Err(CliError::Input(format!("{e}; nothing was imported")));
        }
        Err(e) => return Err(CliError::Input(format!("reader task failed: {e}"))),
    };
    let r = outcome?.into_inner();
    if output == OutputArg::Json {
        words::print_json(&serde_json::json!({
            "received": r.received,
            "duplicates": rejects.duplicates(),
            "added": r.added,
            "removed": r.removed,
            "rejected": r.rejected,
            "rejected_lines": rejects.first_lines,
            "version": r.version,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    // Duplicates: valid numbers the file held more than once (counted once by the import).
    println!(
        "received {}, duplicates {}, added {}, removed {}, rejected {} at version {}",
        r.received,
        rejects.duplicates(),
        r.added,
        r.removed,
        r.rejected,
        r.version
    );
    if r.rejected > 0 {
        eprintln!(
            "warning: {} invalid NHS numbers were skipped (--strict refuses such a file); {}",
            r.rejected,
            first_at(&rejects.first_lines)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `import --from-national-check SENT RETURNED`: a REPLACE of the national list with the
/// national check's population.
async fn import_national_check(
    client: &mut OptOutAdminClient<AuthChannel>,
    args: &ImportArgs,
    files: &[PathBuf],
    output: OutputArg,
) -> Result<ExitCode, CliError> {
    if args.opt_out_type != TypeArg::National || args.mode == Some(ModeArg::Merge) {
        return Err(CliError::Usage(
            "--from-national-check replaces the national data opt-outs: use --type \
             national (and --mode replace, or no --mode)"
                .into(),
        ));
    }
    let [sent, returned] = files else {
        return Err(CliError::Usage(
            "--from-national-check takes two files: SENT RETURNED".into(),
        ));
    };
    super::national_check::import(
        client,
        sent,
        returned,
        args.checked_at.as_deref().unwrap_or_default(),
        args.allow_older_check.clone(),
        args.source.clone(),
        output,
    )
    .await
}

/// The import's input (the file, or stdin for none or `-`), its name for the audit's source, and
/// its size when known (for the progress bar).
type ImportInput = (Box<dyn Read + Send>, String, Option<u64>);

fn open_import_input(file: Option<&Path>) -> Result<ImportInput, CliError> {
    let Some(p) = file.filter(|p| p.as_os_str() != "-") else {
        return Ok((Box::new(std::io::stdin()), "stdin".into(), None));
    };
    let file = File::open(p).map_err(|e| CliError::Input(format!("{}: {e}", p.display())))?;
    let size = file.metadata().ok().map(|m| m.len());
    let name = p.file_name().map_or_else(
        || p.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    );
    Ok((Box::new(file), name, size))
}

/// How the import file is laid out, from --column and --format.
fn import_layout(args: &ImportArgs) -> Result<Layout, CliError> {
    Ok(match (&args.column, args.format) {
        (_, Some(FormatArg::Parquet)) => {
            return Err(CliError::Usage(
                "--format parquet is for optout filter; import a list of numbers (one a line), a \
                 CSV (--column) or a .dat (--format dat)"
                    .into(),
            ));
        }
        (Some(column), _) => Layout::Csv(column.clone(), args.delimiter.byte()),
        (None, Some(FormatArg::Dat)) => Layout::Dat,
        (None, Some(FormatArg::Csv)) => {
            return Err(CliError::Usage(
                "--format csv needs --column, the header of the NHS-number column".into(),
            ));
        }
        (None, None) => Layout::Lines,
    })
}

/// How an import file is laid out.
enum Layout {
    /// One number a line.
    Lines,
    /// CSV: the column's header, the delimiter.
    Csv(String, u8),
    /// The national check's `.dat`.
    Dat,
}

/// The invalid numbers an import met, by the file's 1-based line (the service skips them; with
/// --strict the import stops at the first, uncommitted).
#[derive(Default)]
struct Rejects {
    count: u64,
    first_lines: Vec<u64>,
    /// The distinct valid numbers of the file (a compressed set: a few MB for millions), for its
    /// count of duplicates.
    distinct: crate::core::coverage::Population,
    valid: u64,
}

impl Rejects {
    /// Valid numbers the file holds more than once.
    fn duplicates(&self) -> u64 {
        self.valid - self.distinct.len()
    }
}

/// Ctrl-C during an import: what happened to it, then exit 130 (the reader may be blocked on its
/// input, which the runtime would wait for).
fn interrupted(bar: &indicatif::ProgressBar, commit_sent: &std::sync::atomic::AtomicBool) -> ! {
    bar.finish_and_clear();
    if commit_sent.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!(
            "interrupted after the whole file was sent and marked commit: the server applies the \
             import (or refuses it) without this client. See the result with `optout admin audit \
             --since 10m` or `optout admin status`"
        );
    } else {
        eprintln!("interrupted before the file was sent whole: nothing was imported");
    }
    std::process::exit(130)
}

/// "at line 3" for one line, or "the first at lines 3, 7, 9".
fn first_at(lines: &[u64]) -> String {
    let shown: Vec<String> = lines.iter().map(u64::to_string).collect();
    match shown.as_slice() {
        [one] => format!("at line {one}"),
        _ => format!("the first at lines {}", shown.join(", ")),
    }
}

/// A first line that cannot be an NHS number and says what the file is instead: a header row, a
/// CSV, or the national check's `.dat`. Read as one number a line, every row would be rejected.
fn not_a_list_of_numbers(name: &str, line: &str) -> Option<String> {
    if crate::core::NhsNumber::parse(line).is_ok() {
        return None;
    }
    let body = line.trim_end_matches(',');
    if line.ends_with(',') && body.chars().all(|c| c.is_ascii_digit() || c == ' ') {
        return Some(format!(
            "{name}: line 1 ({line:?}) is in the national check's .dat layout (a number and a \
             comma): give --format dat"
        ));
    }
    if let Some(d) = [',', ';', '\t', '|']
        .into_iter()
        .find(|d| line.contains(*d))
    {
        let fields: Vec<&str> = line.split(d).map(str::trim).collect();
        return Some(format!(
            "{name}: line 1 looks like a CSV header ({}): name the NHS number column with \
             --column NAME{}",
            fields.join(&d.to_string()),
            if d == ',' { "" } else { " and the --delimiter" }
        ));
    }
    line.chars().any(|c| c.is_ascii_alphabetic()).then(|| {
        format!(
            "{name}: line 1 ({line:?}) looks like a header, not an NHS number: for a CSV give \
             --column {line}; for a list of numbers remove the line"
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn read_import(
    input: Box<dyn Read + Send>,
    name: &str,
    layout: &Layout,
    header: ImportOptOutsRequest,
    tx: &mpsc::Sender<ImportOptOutsRequest>,
    bar: &indicatif::ProgressBar,
    strict: bool,
    commit_sent: &std::sync::atomic::AtomicBool,
) -> Result<Rejects, String> {
    let mut rejects = Rejects::default();
    let mut first = true;
    let mut send = |numbers: Vec<String>, commit: bool| -> Result<(), String> {
        let message = if first {
            ImportOptOutsRequest {
                nhs_numbers: numbers,
                commit,
                ..header.clone()
            }
        } else {
            ImportOptOutsRequest {
                nhs_numbers: numbers,
                commit,
                ..ImportOptOutsRequest::default()
            }
        };
        first = false;
        tx.blocking_send(message)
            .map_err(|_| "the service closed the import stream".to_string())?;
        if commit {
            commit_sent.store(true, std::sync::atomic::Ordering::SeqCst);
            super::applying(bar, "all sent; the server is applying the import");
        }
        Ok(())
    };
    let mut chunk = Vec::with_capacity(IMPORT_CHUNK);
    let mut take = |lines: Vec<u64>, numbers: Vec<String>| -> Result<(), String> {
        for (line, n) in lines.iter().zip(&numbers) {
            // Refused here, naming the line, rather than sent in a message the server would
            // refuse as too large ("decoded message length too large").
            if n.len() > MAX_VALUE_BYTES {
                return Err(format!(
                    "line {line}: a value of {} bytes cannot be an NHS number (is this the file \
                     you meant?)",
                    n.len()
                ));
            }
            match crate::core::NhsNumber::parse(n) {
                Ok(n) => {
                    rejects.valid += 1;
                    rejects.distinct.insert(n);
                    continue;
                }
                Err(e) => {
                    if strict {
                        return Err(format!(
                            "line {line}: not a valid NHS number ({e}); --strict refuses \
                         the file"
                        ));
                    }
                    rejects.count += 1;
                    if rejects.first_lines.len() < 20 {
                        rejects.first_lines.push(*line);
                    }
                }
            }
        }
        chunk.extend(numbers.into_iter().map(|n| n.trim().to_string()));
        if chunk.len() >= IMPORT_CHUNK {
            send(std::mem::take(&mut chunk), false)?;
        }
        Ok(())
    };
    match layout {
        Layout::Lines => {
            let mut first_line = true;
            for (i, line) in BufReader::new(input).lines().enumerate() {
                let line = line.map_err(|e| format!("{name}: line {}: {e}", i + 1))?;
                let t = line.trim();
                if t.is_empty() {
                    continue;
                }
                if std::mem::take(&mut first_line)
                    && let Some(why) = not_a_list_of_numbers(name, t)
                {
                    return Err(why);
                }
                take(vec![i as u64 + 1], vec![t.to_string()])
                    .map_err(|e| format!("{name}: {e}"))?;
            }
        }
        Layout::Csv(column, delimiter) => {
            // The same strict reading as `optout filter`: header lookup, malformed rows by line.
            let (reader, _, index) =
                open_csv(input, column, *delimiter).map_err(|e| format!("{name}: {e}"))?;
            for_each_chunk(reader, index, IMPORT_CHUNK, |rows, numbers| {
                take(lines_of(rows.iter().map(|r| r.position())), numbers)
            })
            .map_err(|e| format!("{name}: {e}"))?;
        }
        Layout::Dat => {
            for_each_dat_chunk(BufReader::new(input), IMPORT_CHUNK, |rows, numbers| {
                take(lines_of(rows.iter().map(|r| r.position())), numbers)
            })
            .map_err(|e| format!("{name}: {e}"))?;
        }
    }
    send(chunk, true)?;
    Ok(rejects)
}

/// The 1-based lines of CSV records.
fn lines_of<'a>(positions: impl Iterator<Item = Option<&'a csv::Position>>) -> Vec<u64> {
    positions
        .map(|p| p.map_or(0, csv::Position::line))
        .collect()
}
