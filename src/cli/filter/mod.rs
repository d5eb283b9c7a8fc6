//! `optout filter`: the online form of the NHS's batch "Check for National Data Opt-outs" service.
//!
//! Reads an extract (CSV, the national check's `.dat` format, or Parquet: `parquet.rs`), streams
//! its NHS numbers through
//! CheckStream, and writes only the rows whose patient may be released, in input order (a CSV's
//! header kept; a `.dat` line as it was, line ending included). Withheld rows are counted by
//! reason on stderr, with the lines of invalid numbers; `--strict` refuses the whole file for one
//! invalid number, as the national service does. A malformed row stops everything with its line
//! number and a non-zero exit. When the output is a file, it is written to a temporary file beside
//! it and renamed only once the whole extract was checked, so a failed run never leaves a partial
//! extract that looks whole.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Write},
    path::PathBuf,
    process::ExitCode,
};

mod parquet;

use clap::Args;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    BasisArgs, CliError, ClientArgs, DelimiterArg, FormatArg, OriginArg, PurposeArg, progress,
    reason_name,
    words::{self, OutputArg},
};
use crate::{
    cli::client::proto::{self, CheckRequest, opt_out_check_client::OptOutCheckClient},
    core::extract::{self, for_each_chunk, for_each_dat_chunk, line_of, open_csv},
};

#[derive(Args, Debug)]
pub(crate) struct FilterArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The extract's layout: csv, dat (the national file check's: a number and a comma a line), or
    /// parquet (a file, not stdin; the NHS number column as strings or integers).
    #[arg(long, value_enum, default_value_t = FormatArg::Csv)]
    format: FormatArg,
    /// The column holding NHS numbers: its header (csv), or its name (parquet).
    #[arg(long, default_value = "nhs_number")]
    column: String,
    /// The CSV's field separator.
    #[arg(long, value_enum, default_value_t = DelimiterArg::Comma)]
    delimiter: DelimiterArg,
    /// Refuse the whole file if any NHS number in it is invalid, as the national service does
    /// (no output is written); without it, invalid numbers are withheld and their lines listed.
    #[arg(long)]
    strict: bool,
    /// Why the data is extracted.
    #[arg(long, value_enum)]
    purpose: PurposeArg,
    /// Who holds the data (unspecified applies both opt-out types).
    #[arg(long, value_enum, default_value = "unspecified")]
    origin: OriginArg,
    /// Your reference for the extract.
    #[arg(long, default_value = "")]
    extract_id: String,
    #[command(flatten)]
    basis: BasisArgs,
    /// The CSV to read; stdin if absent or "-".
    #[arg(long, short)]
    input: Option<PathBuf>,
    /// Where to write the releasable rows; stdout if absent or "-".
    #[arg(long)]
    out: Option<PathBuf>,
    /// The closing summary: text (a line on stderr), or json (one object: on stdout when the rows
    /// go to --out, else on stderr).
    #[arg(long, short = 'o', value_enum, default_value_t = OutputArg::Text)]
    output: OutputArg,
    /// Rows per CheckStream message.
    #[arg(long, default_value_t = 5000)]
    batch: usize,
}

type Rows = Vec<csv::ByteRecord>;

pub(crate) async fn run(args: FilterArgs) -> Result<ExitCode, CliError> {
    if args.batch == 0 {
        return Err(CliError::Usage("--batch must be at least 1".into()));
    }
    if args.format == FormatArg::Parquet {
        return parquet::run(args).await;
    }
    // Every message about the input names it once.
    let name = match args.input.as_deref() {
        Some(p) if p.as_os_str() != "-" => p.display().to_string(),
        _ => "stdin".to_string(),
    };
    let input_error = |e: String| CliError::Input(format!("{name}: {e}"));
    let (source, header) = open_source(&args).map_err(|e| match e {
        CliError::Input(e) => input_error(e),
        other => other,
    })?;
    let mut output = Output::open(args.out.as_ref(), args.format, args.delimiter.byte())?;
    if let Some(header) = &header {
        output.write(header)?;
    }

    let (req_tx, req_rx) = mpsc::channel::<CheckRequest>(4);
    let (rows_tx, mut rows_rx) = mpsc::channel::<Result<Rows, String>>(64);
    let template = check_template(&args);
    let batch = args.batch;
    let reader_task =
        tokio::task::spawn_blocking(move || read_rows(source, batch, template, &req_tx, &rows_tx));

    let (channel, bearer) = args.client.authed().await?;
    let mut client = OptOutCheckClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let bar = progress("rows checked");
    let mut responses = client
        .check_stream(ReceiverStream::new(req_rx))
        .await?
        .into_inner();
    let mut answered = Answered::default();
    while let Some(response) = responses.message().await? {
        let rows = match rows_rx.recv().await {
            Some(Ok(rows)) => rows,
            Some(Err(e)) => return Err(input_error(e)),
            None => {
                return Err(CliError::Rpc(
                    "the service sent more responses than requests".into(),
                ));
            }
        };
        answered.take(&rows, &response.decisions, &mut output)?;
        bar.inc(rows.len() as u64);
    }
    bar.finish_and_clear();
    // The stream ended: either every chunk was answered, or the reader stopped on an error.
    if let Some(Err(e)) = rows_rx.recv().await {
        return Err(input_error(e));
    }
    match reader_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(input_error(e)),
        Err(e) => return Err(CliError::Input(format!("reader task failed: {e}"))),
    }
    if args.strict && !answered.invalid_lines.is_empty() {
        // The temporary output is dropped unrenamed: nothing is written.
        return Err(CliError::Input(format!(
            "The file contains one or more invalid NHS Numbers (--strict): {}; no output written",
            lines_text(&answered.invalid_lines)
        )));
    }
    output.finish()?;

    report(
        &args,
        answered.released,
        &answered.withheld,
        ("line", "lines"),
        &answered.invalid_lines,
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The closing summary, as text on stderr or as one JSON object (on stdout when the rows went to
/// a file, else on stderr); `invalid` names where the invalid numbers were (lines or rows).
fn report(
    args: &FilterArgs,
    released: u64,
    withheld: &BTreeMap<i32, u64>,
    (one, many): (&str, &str),
    invalid: &[u64],
) -> Result<(), CliError> {
    if args.output == OutputArg::Json {
        let by_reason: serde_json::Map<String, serde_json::Value> = withheld
            .iter()
            .map(|(r, n)| (words::reason(*r), serde_json::Value::from(*n)))
            .collect();
        let total: u64 = withheld.values().sum();
        let doc = serde_json::json!({
            "checked": released + total,
            "released": released,
            "withheld": total,
            "withheld_by_reason": by_reason,
            format!("invalid_{many}"): invalid,
        });
        let rows_on_stdout = args.out.as_ref().is_none_or(|p| p.as_os_str() == "-");
        if rows_on_stdout {
            eprintln!("{doc}");
        } else {
            words::print_json(&doc)?;
        }
        return Ok(());
    }
    eprintln!("{}", summary(released, withheld));
    if !invalid.is_empty() {
        eprintln!(
            "invalid NHS numbers withheld: {}",
            positions_text((one, many), invalid)
        );
    }
    Ok(())
}

/// Every CheckStream message of the extract but its numbers: the purpose, origin, reference and
/// legal basis the flags claim.
fn check_template(args: &FilterArgs) -> CheckRequest {
    let (legal_basis, basis_reference) = args.basis.fields();
    CheckRequest {
        nhs_numbers: proto::NumberList::new(),
        purpose: proto::Purpose::from(args.purpose) as i32,
        origin: proto::DataOrigin::from(args.origin) as i32,
        at_least_version: String::new(),
        extract_id: args.extract_id.clone(),
        legal_basis,
        basis_reference,
    }
}

/// The extract's rows, and a CSV's header (written back first).
fn open_source(args: &FilterArgs) -> Result<(Source, Option<csv::ByteRecord>), CliError> {
    let input = open_input(args.input.as_deref())?;
    Ok(match args.format {
        FormatArg::Csv => {
            let (reader, header, column) =
                open_csv(input, &args.column, args.delimiter.byte()).map_err(CliError::Input)?;
            (Source::Csv(reader, column), Some(header))
        }
        FormatArg::Dat => (Source::Dat(std::io::BufReader::new(input)), None),
        FormatArg::Parquet => {
            return Err(CliError::Usage(
                "a Parquet extract is read by parquet::run".into(),
            ));
        }
    })
}

/// What came back so far: rows released, withheld by reason, and the lines of invalid numbers.
#[derive(Default)]
struct Answered {
    released: u64,
    withheld: BTreeMap<i32, u64>,
    invalid_lines: Vec<u64>,
}

impl Answered {
    /// Writes the released rows of one answered chunk and counts the rest.
    fn take(
        &mut self,
        rows: &Rows,
        decisions: &[proto::Decision],
        output: &mut Output,
    ) -> Result<(), CliError> {
        if rows.len() != decisions.len() {
            return Err(CliError::Rpc(format!(
                "the service answered {} decisions for {} rows",
                decisions.len(),
                rows.len()
            )));
        }
        for (row, d) in rows.iter().zip(decisions) {
            if d.outcome == proto::Outcome::Release as i32 {
                output.write(row)?;
                self.released += 1;
            } else {
                *self.withheld.entry(d.reason).or_default() += 1;
                if d.reason == proto::Reason::InvalidNhsNumber as i32 {
                    self.invalid_lines.push(line_of(row));
                }
            }
        }
        Ok(())
    }
}

/// "line 3", "lines 3, 17 and 40 more": the first twenty.
fn lines_text(lines: &[u64]) -> String {
    positions_text(("line", "lines"), lines)
}

/// `lines_text` for any kind of position ("row 3", "rows 3, 17 and 40 more").
fn positions_text((one, many): (&str, &str), lines: &[u64]) -> String {
    let shown: Vec<String> = lines.iter().take(20).map(u64::to_string).collect();
    let more = lines.len().saturating_sub(20);
    format!(
        "{} {}{}",
        if lines.len() == 1 { one } else { many },
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}

/// Where the rows come from.
enum Source {
    Csv(csv::Reader<extract::Strict<Box<dyn Read + Send>>>, usize),
    Dat(std::io::BufReader<Box<dyn Read + Send>>),
}

/// The file, or stdin when absent or "-".
fn open_input(path: Option<&std::path::Path>) -> Result<Box<dyn Read + Send>, CliError> {
    Ok(match path {
        None => Box::new(std::io::stdin()),
        Some(p) if p.as_os_str() == "-" => Box::new(std::io::stdin()),
        Some(p) => {
            // The caller names the file.
            Box::new(File::open(p).map_err(|e| CliError::Input(e.to_string()))?)
        }
    })
}

/// The closing line: rows checked, released, and withheld by reason.
fn summary(released: u64, withheld: &BTreeMap<i32, u64>) -> String {
    let total_withheld: u64 = withheld.values().sum();
    let detail: Vec<String> = withheld
        .iter()
        .map(|(r, n)| format!("{}: {n}", reason_name(*r)))
        .collect();
    format!(
        "checked {} rows: released {released}, withheld {total_withheld}{}",
        released + total_withheld,
        if detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", detail.join(", "))
        }
    )
}

/// Reads the CSV in chunks; each chunk goes to the row queue, then its numbers to the request
/// stream. On a malformed row it queues the error (with the line number) and stops, which ends the
/// request stream.
fn read_rows(
    source: Source,
    batch: usize,
    template: CheckRequest,
    req_tx: &mpsc::Sender<CheckRequest>,
    rows_tx: &mpsc::Sender<Result<Rows, String>>,
) -> Result<(), String> {
    let send = |rows: Rows, numbers: Vec<String>| {
        rows_tx
            .blocking_send(Ok(rows))
            .map_err(|_| "the response side stopped".to_string())?;
        req_tx
            .blocking_send(CheckRequest {
                nhs_numbers: numbers.into_iter().collect(),
                ..template.clone()
            })
            .map_err(|_| "the request stream closed".to_string())
    };
    let result = match source {
        Source::Csv(reader, column) => for_each_chunk(reader, column, batch, send),
        Source::Dat(input) => for_each_dat_chunk(input, batch, send),
    };
    if let Err(message) = &result {
        let _ = rows_tx.blocking_send(Err(message.clone()));
    }
    result
}

/// Stdout, or a temporary file renamed into place by `finish`; CSV rows, or `.dat` lines.
struct Output {
    writer: Writer,
    rename: Option<(tempfile::TempPath, PathBuf)>,
}

enum Writer {
    Csv(Box<csv::Writer<Box<dyn Write>>>),
    /// Each row is (number as written, line ending): written back as `number,` and its ending.
    Dat(Box<dyn Write>),
}

impl Output {
    fn open(path: Option<&PathBuf>, format: FormatArg, delimiter: u8) -> Result<Self, CliError> {
        let (sink, rename) = Self::sink(path)?;
        let writer = match format {
            FormatArg::Csv => Writer::Csv(Box::new(
                csv::WriterBuilder::new()
                    .delimiter(delimiter)
                    .from_writer(sink),
            )),
            FormatArg::Dat | FormatArg::Parquet => Writer::Dat(sink),
        };
        Ok(Output { writer, rename })
    }

    /// Stdout, or a temporary file beside `path` to be renamed into place once the whole
    /// extract was checked (shared by the Parquet writer).
    #[allow(clippy::type_complexity)]
    fn sink(
        path: Option<&PathBuf>,
    ) -> Result<(Box<dyn Write + Send>, Option<(tempfile::TempPath, PathBuf)>), CliError> {
        match path {
            Some(p) if p.as_os_str() != "-" => {
                let dir = p
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("."), PathBuf::from);
                let tmp = tempfile::NamedTempFile::new_in(&dir)
                    .map_err(|e| CliError::Output(format!("{}: {e}", dir.display())))?;
                let (file, path_tmp) = tmp.into_parts();
                Ok((
                    Box::new(std::io::BufWriter::new(file)),
                    Some((path_tmp, p.clone())),
                ))
            }
            _ => Ok((Box::new(std::io::BufWriter::new(std::io::stdout())), None)),
        }
    }

    fn write(&mut self, row: &csv::ByteRecord) -> Result<(), CliError> {
        let written = match &mut self.writer {
            Writer::Csv(w) => w.write_byte_record(row).map_err(|e| e.to_string()),
            Writer::Dat(w) => {
                let (number, eol) = (
                    row.get(0).unwrap_or_default(),
                    row.get(1).unwrap_or_default(),
                );
                w.write_all(number)
                    .and_then(|()| w.write_all(b","))
                    .and_then(|()| w.write_all(eol))
                    .map_err(|e| e.to_string())
            }
        };
        written.map_err(CliError::Output)
    }

    fn finish(mut self) -> Result<(), CliError> {
        let flushed = match &mut self.writer {
            Writer::Csv(w) => w.flush(),
            Writer::Dat(w) => w.flush(),
        };
        flushed.map_err(|e| CliError::Output(e.to_string()))?;
        drop(self.writer);
        if let Some((tmp, dest)) = self.rename.take() {
            tmp.persist(&dest)
                .map_err(|e| CliError::Output(format!("{}: {e}", dest.display())))?;
        }
        Ok(())
    }
}
