//! `admin import`: a whole list read from a file (one number a line, a CSV column, the national
//! `.dat`, or a national check round trip), checked as it is read, streamed in messages and
//! committed by the last; what an interruption did; the summary.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::ExitCode,
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    AuthChannel, CliError, FormatArg, ImportArgs, ModeArg, TypeArg,
    words::{self, OutputArg},
};
use crate::{
    cli::client::proto::{self, ImportOptOutsRequest, opt_out_admin_client::OptOutAdminClient},
    core::extract::{for_each_chunk, for_each_dat_chunk, open_csv},
};

/// Numbers per import message.
const IMPORT_CHUNK: usize = 10_000;
/// The longest value an import sends as a number: an NHS number is 10 digits (12 with its
/// spaces); anything this long is the wrong file, and would make a message too large to send.
const MAX_VALUE_BYTES: usize = 1024;

/// Streams the file in messages of `IMPORT_CHUNK` numbers and a final empty message marked
/// commit. A read error stops the stream without the commit, so the service changes nothing.
pub(super) async fn import(
    client: &mut OptOutAdminClient<AuthChannel>,
    args: ImportArgs,
    output: OutputArg,
) -> Result<ExitCode, CliError> {
    if let Some(files) = &args.from_national_check {
        return import_national_check(client, &args, files, output).await;
    }
    let practice = super::practice_arg(args.opt_out_type, args.practice.as_deref(), false)?;
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
    let bar = super::super::progress_bytes(size, "read and sent");
    let bar_reader = bar.clone();
    let input: Box<dyn Read + Send> = Box::new(super::super::Counted {
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
    super::super::national_check::import(
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
            super::super::applying(bar, "all sent; the server is applying the import");
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
