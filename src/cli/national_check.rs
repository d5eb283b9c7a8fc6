//! `optout admin import --type national --from-national-check SENT RETURNED`: the result of a
//! national "Check for National Data Opt-outs" round trip, imported into a store in population
//! mode.
//!
//! The national service takes a `.dat` file of NHS numbers (the population) and returns the
//! numbers without a national data opt-out. So the opt-outs are SENT minus RETURNED, known only
//! for the patients sent. Both files are read strictly; what cannot be one round trip is refused
//! before anything is sent:
//!
//! - RETURNED is the service's one-line error reply ("The file contains one or more invalid NHS
//!   Numbers"): the check did not happen;
//! - RETURNED holds a number SENT does not: the files are not one round trip;
//! - RETURNED is empty while SENT is not: every patient opted out, or (far likelier) the reply is
//!   truncated or from another request. Refused: check the reply with the national service.
//! - a number in either file is invalid: the national service refuses such a file whole.
//!
//! Then SENT is streamed (the population) with the opt-outs among each chunk, and the service
//! applies them atomically as a REPLACE for that population, with the check's date.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::ExitCode,
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{AuthChannel, CliError};
use crate::{
    cli::client::proto::{self, ImportOptOutsRequest, opt_out_admin_client::OptOutAdminClient},
    core::{NhsNumber, coverage::Population, extract::for_each_dat_chunk},
};

/// Population numbers per message (with their opt-outs).
const CHUNK: usize = 10_000;

/// What the national service writes instead of a reply when the file it was sent is refused.
const ERROR_REPLY: &str = "the file contains one or more invalid nhs numbers";

pub(super) async fn import(
    client: &mut OptOutAdminClient<AuthChannel>,
    sent: &Path,
    returned: &Path,
    checked_at: &str,
    allow_older: Option<String>,
    source: Option<String>,
    output: super::words::OutputArg,
) -> Result<ExitCode, CliError> {
    let checked_at_ms = checked_at_ms(checked_at)?;
    let reply = read_returned(returned)?;
    let population = read_sent(sent, &reply)?;
    check_reply_within(returned, &population)?;
    let source = source.unwrap_or_else(|| {
        format!(
            "national check {} / {}",
            file_name(sent),
            file_name(returned)
        )
    });
    let opt_outs = population.len().saturating_sub(reply.len());
    let header = ImportOptOutsRequest {
        mode: proto::ImportMode::Replace as i32,
        r#type: proto::OptOutType::NationalDataOptOut as i32,
        source,
        national_checked_at_unix_ms: i64::try_from(checked_at_ms).unwrap_or(i64::MAX),
        older_check_reason: allow_older.unwrap_or_default(),
        ..ImportOptOutsRequest::default()
    };
    let (tx, rx) = mpsc::channel::<ImportOptOutsRequest>(4);
    let size = std::fs::metadata(sent).ok().map(|m| m.len());
    let bar = super::progress_bytes(size, "of the population read and sent");
    let bar_reader = bar.clone();
    let sent_path = sent.to_path_buf();
    let reader =
        tokio::task::spawn_blocking(move || stream(&sent_path, &reply, header, &tx, &bar_reader));
    let outcome = client.import_opt_outs(ReceiverStream::new(rx)).await;
    bar.finish_and_clear();
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(CliError::Input(format!("{e}; nothing was imported"))),
        Err(e) => return Err(CliError::Input(format!("reader task failed: {e}"))),
    }
    let r = outcome?.into_inner();
    if output == super::words::OutputArg::Json {
        super::words::print_json(&serde_json::json!({
            "population": population.len(),
            "opt_outs": opt_outs,
            "checked_at": super::words::time(i64::try_from(checked_at_ms).unwrap_or(i64::MAX)),
            "added": r.added,
            "removed": r.removed,
            "version": r.version,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "national check of {} patients ({} with a national data opt-out), checked at {}: \
         added {}, removed {} at version {}",
        population.len(),
        opt_outs,
        super::words::time(i64::try_from(checked_at_ms).unwrap_or(i64::MAX)),
        r.added,
        r.removed,
        r.version
    );
    Ok(ExitCode::SUCCESS)
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    )
}

/// The check's date, as given: an RFC 3339 time, or a date (its start in UTC, no later than any
/// check made that day). Never a file's modification time: RETURNED is written after the check,
/// and copies get new times, so the list would look younger than it is and expire late.
fn checked_at_ms(given: &str) -> Result<u64, CliError> {
    let at = super::words::instant(given).ok_or_else(|| {
        CliError::Usage(format!(
            "--checked-at {given:?} is not a time: give an RFC 3339 time such as \
             2026-11-27T09:00:00Z, or a date such as 2026-11-27"
        ))
    })?;
    if at > jiff::Timestamp::now() + jiff::SignedDuration::from_mins(1) {
        return Err(CliError::Usage(format!(
            "--checked-at {given:?} is in the future: give when the national check was made"
        )));
    }
    u64::try_from(at.as_millisecond()).map_err(|_| {
        CliError::Usage(format!(
            "--checked-at {given:?} is before 1970: give when the national check was made"
        ))
    })
}

fn open(path: &Path) -> Result<BufReader<File>, CliError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))
}

/// Every valid number of a .dat file with its line, in order; the first invalid number or
/// malformed line is an error naming the file and the line.
fn for_each_number(
    path: &Path,
    input: impl BufRead,
    what: &str,
    mut each: impl FnMut(u64, NhsNumber) -> Result<(), String>,
) -> Result<(), CliError> {
    for_each_dat_chunk(input, CHUNK, |rows, numbers| {
        for (row, text) in rows.iter().zip(&numbers) {
            let line = row.position().map_or(0, |p| p.line());
            let n = NhsNumber::parse(text)
                .map_err(|e| format!("line {line}: not a valid NHS number ({e}); {what}"))?;
            each(line, n)?;
        }
        Ok(())
    })
    .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))
}

/// RETURNED: the numbers without an opt-out, refused if it is the service's error reply.
fn read_returned(path: &Path) -> Result<Population, CliError> {
    let mut head = Vec::new();
    open(path)?
        .take(4096)
        .read_to_end(&mut head)
        .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
    if String::from_utf8_lossy(&head)
        .to_lowercase()
        .contains(ERROR_REPLY)
    {
        return Err(CliError::Input(format!(
            "{}: this is the national service's error reply (\"The file contains one or more \
             invalid NHS Numbers\"), not a result: the check did not happen. Correct the file \
             sent and check again; nothing was imported",
            path.display()
        )));
    }
    let mut reply = Population::new();
    for_each_number(
        path,
        open(path)?,
        "a reply of the national service holds only numbers it was sent",
        |_, n| {
            reply.insert(n);
            Ok(())
        },
    )?;
    Ok(reply)
}

/// SENT: the population; every number of RETURNED must be in it, and RETURNED must not be empty
/// while SENT is not.
fn read_sent(path: &Path, reply: &Population) -> Result<Population, CliError> {
    let mut population = Population::new();
    for_each_number(
        path,
        open(path)?,
        "the national service refuses a file with an invalid number, so this one was never \
         checked",
        |_, n| {
            population.insert(n);
            Ok(())
        },
    )?;
    if population.is_empty() {
        return Err(CliError::Input(format!(
            "{}: no NHS numbers: nothing was checked; nothing was imported",
            path.display()
        )));
    }
    if reply.is_empty() {
        return Err(CliError::Input(
            "the reply is empty while the file sent is not: either every patient has opted out \
             or (far likelier) the reply is incomplete or belongs to another request. Check it \
             with the national service; nothing was imported"
                .into(),
        ));
    }
    Ok(population)
}

/// Streams SENT again: each chunk as population, with its numbers that did not come back as the
/// opt-outs; a last empty message commits. Before that, every number of RETURNED is checked to
/// be in SENT (by a pass over RETURNED with its lines, so the error names one).
fn stream(
    sent: &Path,
    reply: &Population,
    header: ImportOptOutsRequest,
    tx: &mpsc::Sender<ImportOptOutsRequest>,
    bar: &indicatif::ProgressBar,
) -> Result<(), String> {
    let mut first = Some(header);
    let mut send = |population: Vec<String>, opt_outs: Vec<String>, commit: bool| {
        let message = ImportOptOutsRequest {
            population,
            nhs_numbers: opt_outs,
            commit,
            ..first.take().unwrap_or_default()
        };
        tx.blocking_send(message)
            .map_err(|_| "the service closed the import stream".to_string())?;
        if commit {
            super::applying(bar, "all sent; the server is applying the national check");
        }
        Ok::<(), String>(())
    };
    let input = File::open(sent)
        .map(|f| {
            BufReader::new(super::Counted {
                inner: f,
                bar: bar.clone(),
            })
        })
        .map_err(|e| format!("{}: {e}", sent.display()))?;
    for_each_dat_chunk(input, CHUNK, |_, numbers| {
        let mut opt_outs = Vec::new();
        for text in &numbers {
            // Read (and checked) once already; a number that no longer parses means the file
            // changed under us.
            let n = NhsNumber::parse(text)
                .map_err(|e| format!("a number changed since the file was read: {e}"))?;
            if !reply.contains(n) {
                opt_outs.push(n.to_string());
            }
        }
        let population = numbers.into_iter().map(|t| t.trim().to_string()).collect();
        send(population, opt_outs, false)
    })
    .map_err(|e| format!("{}: {e}", sent.display()))?;
    send(Vec::new(), Vec::new(), true)
}

/// Every number of RETURNED is in SENT; else the first that is not, by its line.
fn check_reply_within(returned: &Path, population: &Population) -> Result<(), CliError> {
    for_each_number(
        returned,
        open(returned)?,
        "a reply of the national service holds only numbers it was sent",
        |line, n| {
            if population.contains(n) {
                Ok(())
            } else {
                Err(format!(
                    "line {line}: a number that was not in the file sent: these two files are \
                     not one round trip (a reply to another request?); nothing was imported"
                ))
            }
        },
    )
}
