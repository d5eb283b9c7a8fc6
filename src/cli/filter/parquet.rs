//! `optout filter --format parquet`: a Parquet extract, as data platforms in the NHS hold them.
//!
//! The file is read a batch of rows at a time (`--batch`), row group after row group, and written
//! in row groups no larger than the input's, so memory is bounded by a batch and a row group
//! whatever the file's size; each batch's NHS numbers go through CheckStream
//! like a CSV's, and the releasable rows of each batch are written as they are answered, in input
//! order, with every other column and the schema (its metadata too) kept and the input's
//! compression. The NHS number column may hold strings or integers (an integer is the number's
//! digits; one shorter than ten digits gets its leading zeros back, as a CHI number written as an
//! integer would have lost them). A null, or a value that is not a valid NHS number, is withheld
//! as an invalid number, and `--strict` refuses the file for one. The output is written to a
//! temporary file beside it and renamed only once the whole extract was checked.

use std::{collections::BTreeMap, fs::File, path::PathBuf, process::ExitCode, sync::Arc};

use arrow_array::{
    Array, ArrayRef, BooleanArray, RecordBatch,
    cast::AsArray,
    types::{Int32Type, Int64Type, UInt32Type, UInt64Type},
};
use arrow_schema::DataType;
use parquet::{
    arrow::{ArrowWriter, arrow_reader::ParquetRecordBatchReaderBuilder},
    file::properties::WriterProperties,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{CliError, FilterArgs, positions_text, progress};
use crate::cli::client::proto::{self, CheckRequest, opt_out_check_client::OptOutCheckClient};

/// What one batch of rows needs on its way back: the rows, and the position of its first row.
type Batch = (RecordBatch, u64);

pub(super) async fn run(args: FilterArgs) -> Result<ExitCode, CliError> {
    let Opened {
        reader,
        column,
        shown,
        schema,
        properties,
    } = open(&args)?;
    let mut output = Output::open(args.out.as_ref(), schema, properties.build())?;

    let (req_tx, req_rx) = mpsc::channel::<CheckRequest>(4);
    let (rows_tx, mut rows_rx) = mpsc::channel::<Result<Batch, String>>(8);
    let template = super::check_template(&args);
    let reader_task = tokio::task::spawn_blocking(move || {
        read_batches(reader, column, &shown, template, &req_tx, &rows_tx)
    });

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
        let (batch, first) = match rows_rx.recv().await {
            Some(Ok(b)) => b,
            Some(Err(e)) => return Err(CliError::Input(e)),
            None => {
                return Err(CliError::Rpc(
                    "the service sent more responses than requests".into(),
                ));
            }
        };
        let released = answered.take(first, batch.num_rows(), &response.decisions)?;
        let kept = arrow_select::filter::filter_record_batch(&batch, &released)
            .map_err(|e| CliError::Output(e.to_string()))?;
        output.write(&kept)?;
        bar.inc(batch.num_rows() as u64);
    }
    bar.finish_and_clear();
    if let Some(Err(e)) = rows_rx.recv().await {
        return Err(CliError::Input(e));
    }
    match reader_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(CliError::Input(e)),
        Err(e) => return Err(CliError::Input(format!("reader task failed: {e}"))),
    }
    if args.strict && !answered.invalid_rows.is_empty() {
        // The temporary output is dropped unrenamed: nothing is written.
        return Err(CliError::Input(format!(
            "The file contains one or more invalid NHS Numbers (--strict): {}; no output written",
            positions_text(("row", "rows"), &answered.invalid_rows)
        )));
    }
    output.finish()?;
    super::report(
        &args,
        answered.released,
        &answered.withheld,
        ("row", "rows"),
        &answered.invalid_rows,
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The extract opened: its reader, the NHS number column's index, its name for messages, its
/// schema, and the writer's settings that keep its compression, metadata and row groups.
struct Opened {
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    column: usize,
    shown: String,
    schema: arrow_schema::SchemaRef,
    properties: parquet::file::properties::WriterPropertiesBuilder,
}

fn open(args: &FilterArgs) -> Result<Opened, CliError> {
    let path = match args.input.as_deref() {
        Some(p) if p.as_os_str() != "-" => p.to_path_buf(),
        _ => {
            return Err(CliError::Usage(
                "--format parquet reads a file (--input FILE): a Parquet file's footer is at its \
                 end, so it cannot be read from stdin"
                    .into(),
            ));
        }
    };
    let shown = path.display().to_string();
    let file = File::open(&path).map_err(|e| CliError::Input(format!("{shown}: {e}")))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| CliError::Input(format!("{shown}: not a readable Parquet file: {e}")))?
        .with_batch_size(args.batch);
    let schema = builder.schema().clone();
    let (column, field) = schema.column_with_name(&args.column).ok_or_else(|| {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        CliError::Usage(format!(
            "{shown}: no column {:?} (its columns: {}); name the NHS number column with --column",
            args.column,
            names.join(", ")
        ))
    })?;
    if !readable(field.data_type()) {
        return Err(CliError::Usage(format!(
            "{shown}: column {:?} is {}; NHS numbers are read from strings or integers",
            args.column,
            field.data_type()
        )));
    }
    // The input's compression (of its first column chunk), so the output is alike, and its
    // key-value metadata (what the writer put there of its own, such as pandas' or an extract's
    // reference); the Arrow schema's own entry the writer writes again.
    let mut properties = WriterProperties::builder();
    if let Some(kv) = builder.metadata().file_metadata().key_value_metadata() {
        let kept: Vec<_> = kv
            .iter()
            .filter(|e| e.key != "ARROW:schema")
            .cloned()
            .collect();
        properties = properties.set_key_value_metadata(Some(kept));
    }
    if let Some(group) = builder.metadata().row_groups().first() {
        if let Some(chunk) = group.columns().first() {
            properties = properties.set_compression(chunk.compression());
        }
        // Row groups no larger than the input's: the writer holds one in memory before it
        // writes it out, so memory stays bounded by what the input's writer chose.
        let rows = usize::try_from(group.num_rows()).unwrap_or(1).max(1);
        properties = properties.set_max_row_group_row_count(Some(rows));
    }
    let reader = builder
        .build()
        .map_err(|e| CliError::Input(format!("{shown}: {e}")))?;
    Ok(Opened {
        reader,
        column,
        shown,
        schema,
        properties,
    })
}

/// The column types NHS numbers are read from.
fn readable(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Int64
            | DataType::UInt64
            | DataType::Int32
            | DataType::UInt32
    )
}

/// The column's values as the service takes them: a string as written, an integer as its digits
/// (leading zeros back to ten), a null as the empty string (invalid, so withheld).
fn numbers(column: &ArrayRef) -> Result<Vec<String>, String> {
    fn digits(v: u64) -> String {
        format!("{v:010}")
    }
    fn collect<T>(
        n: usize,
        get: impl Fn(usize) -> Option<T>,
        show: impl Fn(T) -> String,
    ) -> Vec<String> {
        (0..n)
            .map(|i| get(i).map(&show).unwrap_or_default())
            .collect()
    }
    let n = column.len();
    let valid = |i: usize| column.is_valid(i);
    Ok(match column.data_type() {
        DataType::Utf8 => {
            let a = column.as_string::<i32>();
            collect(n, |i| valid(i).then(|| a.value(i)), str::to_string)
        }
        DataType::LargeUtf8 => {
            let a = column.as_string::<i64>();
            collect(n, |i| valid(i).then(|| a.value(i)), str::to_string)
        }
        DataType::Utf8View => {
            let a = column.as_string_view();
            collect(n, |i| valid(i).then(|| a.value(i)), str::to_string)
        }
        // A negative integer is no NHS number: written as it is, it is refused as invalid.
        DataType::Int64 => {
            let a = column.as_primitive::<Int64Type>();
            collect(
                n,
                |i| valid(i).then(|| a.value(i)),
                |v| u64::try_from(v).map_or_else(|_| v.to_string(), digits),
            )
        }
        DataType::Int32 => {
            let a = column.as_primitive::<Int32Type>();
            collect(
                n,
                |i| valid(i).then(|| a.value(i)),
                |v| u64::try_from(v).map_or_else(|_| v.to_string(), digits),
            )
        }
        DataType::UInt64 => {
            let a = column.as_primitive::<UInt64Type>();
            collect(n, |i| valid(i).then(|| a.value(i)), digits)
        }
        DataType::UInt32 => {
            let a = column.as_primitive::<UInt32Type>();
            collect(
                n,
                |i| valid(i).then(|| a.value(i)),
                |v| digits(u64::from(v)),
            )
        }
        other => {
            return Err(format!(
                "NHS numbers are read from strings or integers, not {other}"
            ));
        }
    })
}

/// Reads the file a batch at a time; each batch goes to the row queue, then its numbers to the
/// request stream. A read error is queued (naming the file) and ends the request stream.
fn read_batches(
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    column: usize,
    shown: &str,
    template: CheckRequest,
    req_tx: &mpsc::Sender<CheckRequest>,
    rows_tx: &mpsc::Sender<Result<Batch, String>>,
) -> Result<(), String> {
    let mut first = 1u64;
    let result = (|| -> Result<(), String> {
        for batch in reader {
            let batch = batch.map_err(|e| format!("{shown}: row {first} on: {e}"))?;
            let numbers = numbers(batch.column(column)).map_err(|e| format!("{shown}: {e}"))?;
            let rows = batch.num_rows() as u64;
            rows_tx
                .blocking_send(Ok((batch, first)))
                .map_err(|_| "the response side stopped".to_string())?;
            req_tx
                .blocking_send(CheckRequest {
                    nhs_numbers: numbers.into_iter().collect(),
                    ..template.clone()
                })
                .map_err(|_| "the request stream closed".to_string())?;
            first += rows;
        }
        Ok(())
    })();
    if let Err(message) = &result {
        let _ = rows_tx.blocking_send(Err(message.clone()));
    }
    result
}

/// What came back so far: rows released, withheld by reason, and the rows of invalid numbers.
#[derive(Default)]
struct Answered {
    released: u64,
    withheld: BTreeMap<i32, u64>,
    invalid_rows: Vec<u64>,
}

impl Answered {
    /// Counts one answered batch (its first row at `first`, 1-based) and says which rows go out.
    fn take(
        &mut self,
        first: u64,
        rows: usize,
        decisions: &[proto::Decision],
    ) -> Result<BooleanArray, CliError> {
        if rows != decisions.len() {
            return Err(CliError::Rpc(format!(
                "the service answered {} decisions for {rows} rows",
                decisions.len()
            )));
        }
        let mut keep = Vec::with_capacity(rows);
        for (i, d) in decisions.iter().enumerate() {
            let release = d.outcome == proto::Outcome::Release as i32;
            if release {
                self.released += 1;
            } else {
                *self.withheld.entry(d.reason).or_default() += 1;
                if d.reason == proto::Reason::InvalidNhsNumber as i32 {
                    self.invalid_rows.push(first + i as u64);
                }
            }
            keep.push(release);
        }
        Ok(BooleanArray::from(keep))
    }
}

/// The Parquet writer, into a temporary file renamed into place by `finish`, or stdout.
struct Output {
    writer: ArrowWriter<Box<dyn std::io::Write + Send>>,
    rename: Option<(tempfile::TempPath, PathBuf)>,
}

impl Output {
    fn open(
        path: Option<&PathBuf>,
        schema: arrow_schema::SchemaRef,
        properties: WriterProperties,
    ) -> Result<Self, CliError> {
        let (sink, rename) = super::Output::sink(path)?;
        let writer = ArrowWriter::try_new(sink, Arc::clone(&schema), Some(properties))
            .map_err(|e| CliError::Output(e.to_string()))?;
        Ok(Output { writer, rename })
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<(), CliError> {
        self.writer
            .write(batch)
            .map_err(|e| CliError::Output(e.to_string()))
    }

    fn finish(mut self) -> Result<(), CliError> {
        self.writer
            .finish()
            .map_err(|e| CliError::Output(e.to_string()))?;
        drop(self.writer);
        if let Some((tmp, dest)) = self.rename.take() {
            tmp.persist(&dest)
                .map_err(|e| CliError::Output(format!("{}: {e}", dest.display())))?;
        }
        Ok(())
    }
}
