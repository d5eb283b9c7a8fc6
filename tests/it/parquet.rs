//! `optout filter --format parquet` against files an independent writer made (pyarrow, in the
//! tests' Python environment), read back by the same: the releasable rows in order, every other
//! column, the schema and its metadata, and the compression kept; the same strict rules, atomic
//! output and summary as a CSV.

use std::process::Command;

use crate::common::{
    TestServer, args, assert_stderr_has, change_request, optout, text, valid_numbers,
};
use optout::api::proto::OptOutType;

/// The tests' Python (pyarrow beside the NHS number oracle; scripts/test.sh installs both).
fn python() -> String {
    if let Ok(p) = std::env::var("OPTOUT_NHS_ORACLE_PYTHON") {
        return p;
    }
    let local = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/tools/nhs-oracle/bin/python"
    );
    assert!(
        std::path::Path::new(local).exists(),
        "the tests' Python environment is not installed: run `bash scripts/test.sh` (it installs \
         pyarrow into target/tools/nhs-oracle), or set OPTOUT_NHS_ORACLE_PYTHON to a python that \
         can `import pyarrow`"
    );
    local.to_string()
}

/// Runs a Python script with JSON arguments; its stdout.
fn py(script: &str, argv: &[&str]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(argv)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes a Parquet file of `rows` (a JSON list of objects) with pyarrow: the NHS number column as
/// `number_type` (string or int64), two rows a row group, zstd, and schema metadata.
const WRITE: &str = r#"
import json, sys, datetime
import pyarrow as pa, pyarrow.parquet as pq
path, rows, number_type = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
schema = pa.schema([
    ("id", pa.int64()),
    ("nhs_number", pa.string() if number_type == "string" else pa.int64()),
    ("name", pa.string()),
    ("admitted", pa.date32()),
    ("score", pa.float64()),
], metadata={b"extract": b"test-extract-7"})
cols = {f.name: [r[f.name] for r in rows] for f in schema}
cols["admitted"] = [datetime.date.fromisoformat(d) for d in cols["admitted"]]
table = pa.table(cols, schema=schema)
pq.write_table(table, path, row_group_size=2, compression="zstd")
"#;

/// Reads a Parquet file with pyarrow: its schema (as text, metadata included), its compression
/// and its rows as JSON.
const READ: &str = r#"
import json, sys
import pyarrow.parquet as pq
f = pq.ParquetFile(sys.argv[1])
table = f.read()
rows = table.to_pylist()
for r in rows:
    r["admitted"] = r["admitted"].isoformat()
print(json.dumps({
    "schema": table.schema.to_string(show_schema_metadata=True),
    "metadata": {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()},
    "compression": f.metadata.row_group(0).column(0).compression if f.metadata.num_row_groups else None,
    "rows": rows,
}))
"#;

fn row(id: i64, number: serde_json::Value, name: &str, score: Option<f64>) -> serde_json::Value {
    let admitted = format!("2026-11-0{id}");
    serde_json::json!({"id": id, "nhs_number": number, "name": name, "admitted": admitted, "score": score})
}

#[tokio::test]
async fn a_parquet_extract_keeps_its_releasable_rows_columns_schema_and_compression() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("data")).await;
    let n = valid_numbers(4_400_000_000, 3);
    server
        .admin_client()
        .await
        .add_opt_outs(change_request(
            vec![n[1].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("opt out");
    let s = |v: &str| serde_json::Value::from(v);
    let rows = vec![
        row(1, s(&n[0]), "Ada", Some(1.5)),
        row(2, s(&n[1]), "Bea", None),
        row(3, s("123"), "Cy", Some(3.0)),
        row(4, serde_json::Value::Null, "Di", Some(4.0)),
        row(5, s(&n[2]), "Ed", Some(5.0)),
    ];
    let input = dir.path().join("extract.parquet");
    let output = dir.path().join("released.parquet");
    py(
        WRITE,
        &[
            input.to_str().expect("utf-8"),
            &serde_json::Value::from(rows.clone()).to_string(),
            "string",
        ],
    );

    let filter = |input: &std::path::Path, output: &std::path::Path, extra: &[&str]| {
        let mut a = args(&[
            "filter",
            "--server",
            &server.url,
            "--purpose",
            "research",
            "--format",
            "parquet",
            "--column",
            "nhs_number",
            "--batch",
            "2",
            "-i",
        ]);
        a.push(input.to_str().expect("utf-8").into());
        a.push("--out".into());
        a.push(output.to_str().expect("utf-8").into());
        a.extend(args(extra));
        optout(a)
    };
    let out = filter(&input, &output, &[]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_stderr_has(
        &out,
        "checked 5 rows: released 2, withheld 3 (national data opt-out: 1, invalid NHS number: 2)",
    );
    assert_stderr_has(&out, "invalid NHS numbers withheld: rows 3, 4");

    let read = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&py(READ, &[p.to_str().expect("utf-8")])).expect("json")
    };
    let (before, after) = (read(&input), read(&output));
    assert_eq!(
        after["schema"], before["schema"],
        "the schema, its metadata too"
    );
    assert_eq!(after["metadata"]["extract"], "test-extract-7");
    assert_eq!(after["compression"], "ZSTD");
    assert_eq!(
        after["rows"],
        serde_json::Value::from(vec![rows[0].clone(), rows[4].clone()]),
        "the releasable rows, in order, every column as it was"
    );

    // The NHS number column as integers: the same answer.
    let ints: Vec<serde_json::Value> = rows
        .iter()
        .filter(|r| r["nhs_number"].as_str().is_none_or(|v| v.len() == 10))
        .map(|r| {
            let mut r = r.clone();
            r["nhs_number"] = r["nhs_number"]
                .as_str()
                .map_or(serde_json::Value::Null, |v| {
                    v.parse::<i64>().expect("digits").into()
                });
            r
        })
        .collect();
    let input_int = dir.path().join("ints.parquet");
    let output_int = dir.path().join("ints-released.parquet");
    py(
        WRITE,
        &[
            input_int.to_str().expect("utf-8"),
            &serde_json::Value::from(ints.clone()).to_string(),
            "int64",
        ],
    );
    let out = filter(&input_int, &output_int, &[]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = read(&output_int);
    assert_eq!(
        after["rows"],
        serde_json::Value::from(vec![ints[0].clone(), ints[3].clone()])
    );

    // --strict: one invalid number refuses the whole file, and no output is left behind.
    let strict_out = dir.path().join("strict.parquet");
    let out = filter(&input, &strict_out, &["--strict"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(
        &out,
        "invalid NHS Numbers (--strict): rows 3, 4; no output written",
    );
    assert!(!strict_out.exists(), "no partial output");

    // What cannot be read as asked: named, exit 2, nothing written.
    let missing = dir.path().join("none.parquet");
    let mut a = args(&[
        "filter",
        "--server",
        &server.url,
        "--purpose",
        "research",
        "--format",
        "parquet",
        "--column",
        "nhs",
        "-i",
    ]);
    a.push(input.to_str().expect("utf-8").into());
    a.push("--out".into());
    a.push(missing.to_str().expect("utf-8").into());
    let out = optout(a).await;
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_has(
        &out,
        "no column \"nhs\" (its columns: id, nhs_number, name, admitted, score)",
    );
    let out = optout(args(&[
        "filter",
        "--server",
        &server.url,
        "--purpose",
        "research",
        "--format",
        "parquet",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_has(&out, "cannot be read from stdin");
    let not_parquet = dir.path().join("extract.csv");
    std::fs::write(&not_parquet, "nhs_number\n9434765919\n").expect("write");
    let out = filter(&not_parquet, &missing, &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "not a readable Parquet file");
    assert!(!missing.exists());
}
