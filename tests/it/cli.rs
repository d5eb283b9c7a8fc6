//! The `optout` binary against the real server: filter, check, admin and serve.

use crate::common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    time::Duration,
};

use crate::common::{
    BIN, TestServer, args, assert_stderr_has, change_request, optout, text, valid_numbers,
};
use optout::api::proto::OptOutType;

#[tokio::test]
async fn filter_writes_only_releasable_rows_and_counts_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("data")).await;
    let n = valid_numbers(4_000_000_000, 4);
    server
        .admin_client()
        .await
        .add_opt_outs(change_request(vec![n[1].clone()], OptOutType::Type1))
        .await
        .expect("plant");
    let spaced = format!("{} {} {}", &n[3][..3], &n[3][3..6], &n[3][6..]);
    let csv = format!(
        "id,nhs_number,diagnosis\n1,{},asthma\n2,{},\"diabetes, type 2\"\n3,987 654 4321,none\n4,{},gout\n5,{spaced},flu\n",
        n[0], n[1], n[2]
    );
    let input = dir.path().join("extract.csv");
    let output = dir.path().join("released.csv");
    std::fs::write(&input, csv).expect("write input");
    let out = optout(args(&[
        "filter",
        "--server",
        &server.url,
        "--column",
        "nhs_number",
        "--purpose",
        "research",
        "--origin",
        "gp-practice",
        "--input",
        input.to_str().expect("utf8"),
        "--out",
        output.to_str().expect("utf8"),
        "--batch",
        "2",
    ]))
    .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let written = std::fs::read_to_string(&output).expect("output written");
    assert_eq!(
        written,
        format!(
            "id,nhs_number,diagnosis\n1,{},asthma\n4,{},gout\n5,{spaced},flu\n",
            n[0], n[2]
        )
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("checked 5 rows: released 3, withheld 2"),
        "{stderr}"
    );
    assert!(stderr.contains("type 1 opt-out: 1"), "{stderr}");
    assert!(stderr.contains("invalid NHS number: 1"), "{stderr}");
    server.stop().await;
}

#[tokio::test]
async fn filter_stops_at_a_malformed_row_and_leaves_no_partial_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("data")).await;
    let n = valid_numbers(4_000_000_000, 3);
    let csv = format!("id,nhs_number\n1,{}\n2,{}\n3,{},extra\n", n[0], n[1], n[2]);
    let input = dir.path().join("bad.csv");
    let output = dir.path().join("out.csv");
    std::fs::write(&input, csv).expect("write");
    let out = optout(args(&[
        "filter",
        "--server",
        &server.url,
        "--purpose",
        "planning",
        "--input",
        input.to_str().expect("utf8"),
        "--out",
        output.to_str().expect("utf8"),
        "--batch",
        "1",
    ]))
    .await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("malformed CSV at line 4"), "{stderr}");
    assert!(
        stderr.contains("3 fields where the header has 2"),
        "{stderr}"
    );
    assert!(!output.exists(), "no partial extract left behind");

    let out = optout(args(&[
        "filter",
        "--server",
        &server.url,
        "--purpose",
        "planning",
        "--column",
        "nhs",
        "--input",
        input.to_str().expect("utf8"),
    ]))
    .await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("column \"nhs\" is not in the CSV header; the columns are: id, nhs_number"),
        "{stderr}"
    );
    server.stop().await;
}

/// `optout admin import --type national --mode merge` of a file, with extra arguments.
async fn merge_national(server: &TestServer, file: &std::path::Path, extra: &[&str]) -> Output {
    let mut a = args(&[
        "admin",
        "--server",
        &server.url,
        "import",
        "--type",
        "national",
        "--mode",
        "merge",
    ]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a.push(file.to_str().expect("utf8").to_string());
    optout(a).await
}

/// `optout filter` on a file, with extra arguments: (success, stdout, stderr).
async fn filter_file(
    server: &TestServer,
    input: &std::path::Path,
    extra: &[&str],
) -> (bool, String) {
    let mut a = args(&[
        "filter",
        "--server",
        &server.url,
        "--purpose",
        "research",
        "--input",
        input.to_str().expect("utf8"),
    ]);
    a.extend(extra.iter().map(|s| s.to_string()));
    let out = optout(a).await;
    (out.status.success(), text(&out.stderr))
}

#[tokio::test]
async fn a_truncated_csv_is_refused_with_its_line_and_real_exports_are_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("data")).await;
    let n = valid_numbers(4_000_000_000, 3);
    let output = dir.path().join("out.csv");
    let out = output.to_str().expect("utf8");

    // Cut off inside a quoted field: before, the rest of the file was one field, exit 0.
    let cut = dir.path().join("cut.csv");
    std::fs::write(
        &cut,
        format!(
            "name,nhs_number\nA,{}\n\"B, cut off,{}\nC,{}\n",
            n[0], n[1], n[2]
        ),
    )
    .expect("write");
    let (ok, err) = filter_file(&server, &cut, &["--out", out]).await;
    assert!(!ok);
    assert!(
        err.contains("line 3") && err.contains("never closed"),
        "{err}"
    );
    assert!(!output.exists(), "no output from a refused file");

    // A NUL byte, and a number cell that is not UTF-8: refused with the line.
    let nul = dir.path().join("nul.csv");
    std::fs::write(&nul, format!("name,nhs_number\nA\0,{}\n", n[0])).expect("write");
    let (ok, err) = filter_file(&server, &nul, &["--out", out]).await;
    assert!(!ok && err.contains("line 2: a NUL byte"), "{err}");
    let latin = dir.path().join("latin.csv");
    std::fs::write(&latin, b"name,nhs_number\nA,94\xff34765919\n").expect("write");
    let (ok, err) = filter_file(&server, &latin, &["--out", out]).await;
    assert!(
        !ok && err.contains("line 2: the NHS-number column is not UTF-8"),
        "{err}"
    );
    assert!(!output.exists());

    // A byte-order mark, CRLF, semicolons and spaces round the numbers, as spreadsheets write.
    let excel = dir.path().join("excel.csv");
    std::fs::write(
        &excel,
        format!("\u{feff}name;nhs_number\r\nA; {} \r\nB;123\r\n", n[0]),
    )
    .expect("write");
    let (ok, err) = filter_file(&server, &excel, &["--delimiter", "semicolon", "--out", out]).await;
    assert!(ok, "{err}");
    assert!(
        err.contains("invalid NHS numbers withheld: line 3"),
        "{err}"
    );
    let written = std::fs::read_to_string(&output).expect("output");
    assert!(written.starts_with("name;nhs_number"), "{written}");
    assert!(
        written.contains(&n[0]) && !written.contains("123"),
        "{written}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_national_dat_format_round_trips_with_its_line_endings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("data")).await;
    let n = valid_numbers(4_000_000_000, 4);
    // n[1] opts out, imported from a .dat file.
    let opted = dir.path().join("opted.dat");
    std::fs::write(&opted, format!("{},\r\n", n[1])).expect("write");
    let out = merge_national(&server, &opted, &["--format", "dat"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    for eol in ["\n", "\r\n"] {
        let input = dir.path().join("sent.dat");
        let output = dir.path().join("cleared.dat");
        let _ = std::fs::remove_file(&output);
        std::fs::write(
            &input,
            format!(
                "{},{eol}{},{eol}987 654 4321,{eol}{},{eol}{},{eol}",
                n[0], n[1], n[2], n[3]
            ),
        )
        .expect("write");
        let o = output.to_str().expect("utf8");
        let (ok, err) = filter_file(&server, &input, &["--format", "dat", "--out", o]).await;
        assert!(ok, "{err}");
        assert!(
            err.contains("invalid NHS numbers withheld: line 3"),
            "{err}"
        );
        // The numbers that may be used, as sent: format, order and line ending.
        assert_eq!(
            std::fs::read_to_string(&output).expect("output"),
            format!("{},{eol}{},{eol}{},{eol}", n[0], n[2], n[3])
        );
        // --strict refuses the file the national way, and writes nothing.
        std::fs::remove_file(&output).expect("rm");
        let (ok, err) = filter_file(
            &server,
            &input,
            &["--format", "dat", "--strict", "--out", o],
        )
        .await;
        assert!(!ok);
        assert!(
            err.contains("The file contains one or more invalid NHS Numbers")
                && err.contains("line 3"),
            "{err}"
        );
        assert!(!output.exists());
    }
    // A line without its comma is not the format: refused with its line.
    let bad = dir.path().join("bad.dat");
    std::fs::write(&bad, format!("{},\n{}\n", n[0], n[2])).expect("write");
    let (ok, err) = filter_file(&server, &bad, &["--format", "dat"]).await;
    assert!(!ok && err.contains("line 2: no comma at the end"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn admin_import_then_check_get_and_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("data")).await;
    let n = valid_numbers(4_000_000_000, 3);
    let file = dir.path().join("national.txt");
    std::fs::write(&file, format!("{}\n\n987 654 4321\n{}\n", n[0], n[1])).expect("write");
    let out = merge_national(&server, &file, &[]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("received 3, duplicates 0, added 2, removed 0, rejected 1"),
        "{stdout}"
    );
    // The invalid number is named by its line in the file (line 3; line 2 is blank).
    assert_stderr_has(&out, "skipped (--strict refuses such a file); at line 3");

    let out = optout(args(&[
        "check",
        "--server",
        &server.url,
        "--purpose",
        "research",
        &n[0],
        &n[1],
        &n[2],
        "12",
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "{}\twithhold\tnational-data-opt-out\n{}\twithhold\tnational-data-opt-out\n{}\trelease\tno-opt-out\n12\twithhold\tinvalid-nhs-number\n",
            n[0], n[1], n[2]
        )
    );

    let out = optout(args(&["admin", "--server", &server.url, "get", &n[0]])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("national\trecorded 20"),
        "{}",
        text(&out.stdout)
    );
    assert!(text(&out.stdout).contains("source national.txt"));
    assert!(
        text(&out.stdout).contains("scheme: NHS number (England, Wales, Isle of Man)"),
        "{}",
        text(&out.stdout)
    );
    // A number refused by the CHI date rule: the operator is told why, and which range it is in.
    let out = optout(args(&[
        "admin",
        "--server",
        &server.url,
        "get",
        "3104971234",
    ]))
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("not a date (DDMMYY)") && err.contains("CHI number (Scotland)"),
        "{err}"
    );

    let out = optout(args(&[
        "admin",
        "--server",
        &server.url,
        "remove",
        "--type",
        "national",
        "--source",
        "ticket-1",
        &n[0],
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("applied 1 at version "));

    let out = optout(args(&["admin", "--server", &server.url, "status"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("national data opt-outs:   1"), "{stdout}");
    assert!(stdout.contains("fresh"), "{stdout}");
    server.stop().await;
}

#[tokio::test]
async fn serve_refuses_non_loopback_addresses() {
    let out = optout(args(&["serve", "--listen", "0.0.0.0:0"])).await;
    assert!(!out.status.success());
    assert_stderr_has(&out, "only on loopback");
}

#[tokio::test]
async fn the_audit_key_file_is_base64_of_32_bytes_and_anything_else_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let made = optout(args(&["keys", "audit-key"])).await;
    assert!(made.status.success(), "{}", text(&made.stderr));
    let key = dir.path().join("audit.key");
    // A --listen address in use stops serve after the key is read, before it opens the store.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("addr").to_string();
    let serve_with = |contents: Vec<u8>| {
        let key = key.clone();
        let data = dir.path().join("data");
        let listen = listen.clone();
        async move {
            std::fs::write(&key, contents).expect("write");
            let mut a = args(&["serve", "--listen", &listen, "--audit-key-file"]);
            a.push(key.display().to_string());
            a.push("--data-dir".into());
            a.push(data.display().to_string());
            text(&optout(a).await.stderr)
        }
    };
    // A generated key passes the key check (serve then stops at the address in use).
    let err = serve_with(made.stdout.clone()).await;
    assert!(err.contains(&format!("--listen {listen}")), "{err}");
    // Binary secret: refused, never read through a lossy conversion.
    let mut binary = vec![0xC3u8, 0x28, 0xFF];
    binary.extend([0x41u8; 61]);
    let err = serve_with(binary).await;
    assert!(
        err.contains("--audit-key-file") && err.contains("not base64"),
        "{err}"
    );
    // 31 bytes of secret: refused although its text is long.
    let err = serve_with(b"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ==\n".to_vec()).await;
    assert!(err.contains("at least 32 bytes of secret, got 31"), "{err}");
}

/// Starts `optout serve` on a free loopback port; returns the child and its URL once it answers.
async fn spawn_serve(data: &std::path::Path) -> (std::process::Child, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("OPTOUT_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let stderr = child.stderr.take().expect("stderr");
    let addr = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        let line = lines
            .find_map(|l| l.ok().filter(|l| l.contains("listening on")))
            .expect("listening line");
        // Keep draining so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        line.split_whitespace().nth(3).expect("address").to_string()
    })
    .await
    .expect("join");
    let url = format!("http://{addr}");
    for _ in 0..100 {
        let out = optout(args(&["admin", "--server", &url, "status"])).await;
        if out.status.success() && text(&out.stdout).contains("fresh") {
            return (child, url);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("serve did not answer within 10 s");
}

#[tokio::test]
async fn serve_answers_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, url) = spawn_serve(&dir.path().join("data")).await;
    let out = optout(args(&[
        "check",
        "--server",
        &url,
        "--purpose",
        "research",
        "9434765919",
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A new store with the default list ages releases nobody: no list was imported whole.
    assert!(
        text(&out.stdout).contains("withhold\tlist-never-imported"),
        "{}",
        text(&out.stdout)
    );
    let pid = child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().expect("wait"))
        .await
        .expect("join");
    assert!(exit.success(), "exit status {exit:?}");
}

#[tokio::test]
async fn an_acknowledged_opt_out_survives_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (mut child, url) = spawn_serve(&data).await;
    let out = optout(args(&[
        "admin",
        "--server",
        &url,
        "add",
        "--type",
        "national",
        "--source",
        "crash-test",
        "9434765919",
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // SIGKILL: no shutdown code runs.
    child.kill().expect("kill -9");
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;

    let (mut child, url) = spawn_serve(&data).await;
    let out = optout(args(&[
        "check",
        "--server",
        &url,
        "--purpose",
        "research",
        "9434765919",
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "9434765919\twithhold\tnational-data-opt-out\n"
    );
    child.kill().expect("kill");
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
}

#[tokio::test]
async fn init_store_and_a_malformed_redis_url_say_what_is_wrong() {
    let out = optout(args(&[
        "serve",
        "--redis-url",
        "redis://user:hunter2@[::1:6379/0",
    ]))
    .await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--redis-url"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");

    let out = optout(args(&["init-store"])).await;
    assert!(!out.status.success());
    assert_stderr_has(&out, "--redis-url");

    let redis = common::RedisServer::start();
    let url = redis.url();
    let out = optout(args(&[
        "init-store",
        "--redis-url",
        &url,
        "--redis-prefix",
        "t1:",
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("initialised the opt-out store"),
        "{}",
        text(&out.stdout)
    );
    let out = optout(args(&[
        "init-store",
        "--redis-url",
        &url,
        "--redis-prefix",
        "t1:",
    ]))
    .await;
    assert!(!out.status.success(), "a second init is refused");
    assert_stderr_has(&out, "already initialised");
}

#[tokio::test]
async fn health_exits_zero_when_serving_and_says_why_it_cannot_connect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("data")).await;
    let out = optout(args(&["health", "--server", &server.url])).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "server: SERVING");
    let out = optout(args(&[
        "health",
        "--server",
        &server.url,
        "--service",
        "lists",
    ]))
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "no maximum age set: every list is in force"
    );
    let out = optout(args(&[
        "health",
        "--server",
        &server.url,
        "--service",
        "nope",
    ]))
    .await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown service is NOT_FOUND"
    );
    let url = server.url.clone();
    server.stop().await;
    // Nothing listens there now: exit 2, with the cause and what to try.
    let out = optout(args(&["health", "--server", &url, "--timeout", "2s"])).await;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("is the server running"),
        "{err}"
    );
}

#[tokio::test]
async fn a_second_serve_on_the_same_data_dir_fails_before_it_says_it_listens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (mut first, _url) = spawn_serve(&data).await;
    let data_arg = data.to_str().expect("utf8").to_string();
    let out = optout(args(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_arg,
    ]))
    .await;
    let _ = first.kill();
    let _ = first.wait();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("already open in another process"), "{err}");
    assert!(!err.contains("listening on"), "{err}");
}

/// One vocabulary: the flags' kebab-case names and RFC 3339 times on every output, JSON with the
/// same names, and bad input named by its 1-based place.
#[tokio::test]
async fn every_command_speaks_the_flags_names_and_rfc3339_times() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Check records in the store, where `admin audit` reads them.
    let mut config = common::test_config(&dir.path().join("data"));
    config.check_files = None;
    let server = TestServer::start_with(config).await;
    let n = valid_numbers(4_000_000_000, 2);
    // A bad argument is named by its position among the arguments, and nothing is sent.
    let out = optout(args(&[
        "admin",
        "--server",
        &server.url,
        "add",
        "--type",
        "type-1",
        "--practice",
        "A83007",
        "--source",
        "ticket-1",
        &n[0],
        "12",
    ]))
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("argument 2: not 10 digits") && err.contains("nothing was sent"),
        "{err}"
    );
    let out = optout(args(&[
        "admin",
        "--server",
        &server.url,
        "add",
        "--type",
        "type-1",
        "--practice",
        "A83007",
        "--source",
        "ticket-1",
        &n[0],
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = optout(args(&[
        "check",
        "--server",
        &server.url,
        "--purpose",
        "research",
        "--origin",
        "gp-practice",
        "--output",
        "json",
        &n[0],
        &n[1],
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["decisions"][0]["outcome"], "withhold");
    assert_eq!(v["decisions"][0]["reason"], "type-1-opt-out");
    assert_eq!(v["decisions"][1]["reason"], "no-opt-out");
    assert_eq!(v["decisions"][1]["nhs_number"], n[1].as_str());

    let out = optout(args(&[
        "admin",
        "--server",
        &server.url,
        "get",
        "--output",
        "json",
        &n[0],
    ]))
    .await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["opt_outs"][0]["type"], "type-1");
    let at = v["opt_outs"][0]["recorded_at"].as_str().expect("time");
    assert!(at.parse::<jiff::Timestamp>().is_ok(), "RFC 3339: {at}");

    let out = optout(args(&[
        "admin",
        "--server",
        &server.url,
        "status",
        "--output",
        "json",
    ]))
    .await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["type_1_opt_outs"], 1);
    assert_eq!(v["lists"][0]["type"], "national");
    assert_eq!(v["lists"][0]["mode"], "list");
    assert_eq!(v["filter"]["fresh"], true);

    let since = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1)).to_string();
    // Check records are written in the background, within a moment.
    let v: serde_json::Value = poll!("the check's record", Duration::from_secs(10), {
        let out = optout(args(&[
            "admin",
            "--server",
            &server.url,
            "audit",
            "--from",
            &since,
            "--output",
            "json",
        ]))
        .await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        if v.as_array()
            .is_some_and(|r| r.iter().any(|r| r["action"] == "check"))
        {
            break v;
        }
    });
    let records = v.as_array().expect("array");
    let check = records
        .iter()
        .find(|r| r["action"] == "check")
        .expect("the check is audited");
    assert_eq!(check["purpose"], "research");
    assert_eq!(check["origin"], "gp-practice");
    assert_eq!(check["released"], 1);
    assert_eq!(check["withheld"]["type-1-opt-out"], 1);
    assert!(
        check["at"]
            .as_str()
            .expect("time")
            .parse::<jiff::Timestamp>()
            .is_ok()
    );
    let add = records
        .iter()
        .find(|r| r["action"] == "add")
        .expect("the add");
    assert_eq!(add["type"], "type-1");
    // Text output: the same names.
    let out = optout(args(&[
        "admin",
        "--server",
        &server.url,
        "audit",
        "--from",
        &since,
    ]))
    .await;
    let shown = text(&out.stdout);
    assert!(
        shown.contains("research gp-practice") && shown.contains("withheld type-1-opt-out=1"),
        "{shown}"
    );
    assert!(!shown.contains("since the Unix epoch"), "{shown}");
    let out = optout(args(&[
        "admin",
        "--server",
        &server.url,
        "audit",
        "--from",
        "yesterday",
    ]))
    .await;
    assert_stderr_has(&out, "RFC 3339");
    server.stop().await;
}

/// `keys list` shows what a keys file grants (never a secret); `keys revoke` removes one entry,
/// keeps the rest, and a running server stops honouring the key at its next reload.
#[tokio::test]
async fn keys_are_listed_and_a_revoked_key_stops_working_on_a_running_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, "# who may call this replica\n").expect("write");
    let keys_arg = keys.to_str().expect("utf8").to_string();
    let new = |org: &'static str, role: &'static str| {
        optout(args(&[
            "keys",
            "new",
            "--keys-file",
            &keys_arg,
            "--organisation",
            org,
            "--role",
            role,
        ]))
    };
    let a = new("A83007", "checker").await;
    let b = new("RW1", "admin").await;
    assert!(a.status.success() && b.status.success());
    let key_a = text(&a.stdout).trim().to_string();
    let key_b = text(&b.stdout).trim().to_string();
    let id_a = key_a.split('_').nth(1).expect("id").to_string();

    let out = optout(args(&[
        "keys",
        "list",
        "--keys-file",
        &keys_arg,
        "--output",
        "json",
    ]))
    .await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(2));
    assert_eq!(v[0]["id"], id_a.as_str());
    assert_eq!(v[0]["organisation"], "A83007");
    assert_eq!(v[1]["roles"][0], "admin");
    assert_eq!(
        v[0]["purposes"],
        serde_json::json!(["research", "planning"])
    );
    assert!(!text(&out.stdout).contains(&key_a), "no secret is listed");
    // Direct care is granted by name only, and listed.
    let care = optout(args(&[
        "keys",
        "new",
        "--keys-file",
        &keys_arg,
        "--organisation",
        "Y01",
        "--role",
        "checker",
        "--purpose",
        "direct-care",
    ]))
    .await;
    assert!(care.status.success(), "{}", text(&care.stderr));
    let key_care = text(&care.stdout).trim().to_string();
    let id_care = key_care.split('_').nth(1).expect("id").to_string();
    let out = optout(args(&["keys", "list", "--keys-file", &keys_arg])).await;
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with(&id_care) && l.contains("purposes direct-care\t")),
        "{}",
        text(&out.stdout)
    );
    let out = optout(args(&[
        "keys",
        "revoke",
        "--keys-file",
        &keys_arg,
        "--id",
        &id_care,
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    let mut config = common::test_config(&dir.path().join("data"));
    config.keys_file = Some(keys.clone());
    let server = TestServer::start_with(config).await;
    let check = |key: String| {
        optout(vec![
            "check".into(),
            "--server".into(),
            server.url.clone(),
            "--api-key".into(),
            key,
            "--purpose".into(),
            "research".into(),
            "9434765919".into(),
        ])
    };
    assert!(check(key_a.clone()).await.status.success());

    let out = optout(args(&[
        "keys",
        "revoke",
        "--keys-file",
        &keys_arg,
        "--id",
        &id_a,
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let left = std::fs::read_to_string(&keys).expect("read");
    assert!(
        left.starts_with("# who may call this replica"),
        "comments kept: {left}"
    );
    assert!(!left.contains(&id_a) && left.contains("RW1"), "{left}");
    poll!("the revoked key is refused", Duration::from_secs(10), {
        let out = check(key_a.clone()).await;
        if !out.status.success() {
            assert!(
                text(&out.stderr).contains("Unauthenticated"),
                "{}",
                text(&out.stderr)
            );
            break;
        }
    });
    assert!(
        check(key_b).await.status.success(),
        "the other key still works"
    );
    let out = optout(args(&[
        "keys",
        "revoke",
        "--keys-file",
        &keys_arg,
        "--id",
        &id_a,
    ]))
    .await;
    assert_stderr_has(&out, "no key with id");
    server.stop().await;
}

/// `init-store --exists-ok` (the chart's hook runs it on every install): an initialised store in
/// the same mode is left alone; one in another mode is an error naming both.
#[tokio::test]
async fn init_store_exists_ok_leaves_a_store_in_the_same_mode_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf8").to_string();
    let init = |extra: &[&str]| {
        let mut a = args(&["init-store", "--data-dir", &data_arg]);
        a.extend(extra.iter().map(|s| s.to_string()));
        optout(a)
    };
    let population = |extra: &[&str]| {
        let mut a = args(&[
            "init-store",
            "--data-dir",
            &data_arg,
            "--national-coverage",
            "population",
            "--organisation",
            "RX1",
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        optout(a)
    };
    let first = population(&["--exists-ok"]).await;
    assert!(first.status.success(), "{}", text(&first.stderr));
    let again = population(&["--exists-ok"]).await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stdout).contains("nothing was changed"));
    // The same store for another organisation: refused, nothing changed.
    let mut a = args(&["init-store", "--data-dir", &data_arg]);
    a.extend(args(&[
        "--national-coverage",
        "population",
        "--organisation",
        "RX2",
        "--verify-only",
    ]));
    let owner = optout(a).await;
    assert!(!owner.status.success());
    assert!(
        text(&owner.stderr).contains("belongs to organisation RX1"),
        "{}",
        text(&owner.stderr)
    );
    let other = init(&["--national-coverage", "list", "--exists-ok"]).await;
    assert!(!other.status.success());
    assert!(
        text(&other.stderr).contains("population mode, not list"),
        "{}",
        text(&other.stderr)
    );
    let without = population(&[]).await;
    assert!(!without.status.success(), "without --exists-ok: refused");
}

/// `--redis-password` / OPTOUT_REDIS_PASSWORD (a password kept apart from the URL, as Bitnami's
/// Redis chart keeps it): put into the URL, percent-encoded, never shown; a URL with a password
/// of its own and a separate one is refused.
#[tokio::test]
async fn a_redis_password_kept_apart_from_the_url_is_used_and_never_shown() {
    let password = "p@ss:w/rd%";
    let redis = common::RedisServer::start_with(args(&["--requirepass", password]));
    let url = redis.url();
    let init = |url: String, password: Option<&'static str>| {
        tokio::task::spawn_blocking(move || {
            let mut c = Command::new(BIN);
            c.args(["init-store", "--redis-url", &url])
                .env("OPTOUT_LOG", "warn")
                .stdin(Stdio::null());
            if let Some(p) = password {
                c.env("OPTOUT_REDIS_PASSWORD", p);
            }
            c.output().expect("runs")
        })
    };
    let without = init(url.clone(), None).await.expect("join");
    assert!(!without.status.success(), "NOAUTH without the password");
    let with = init(url.clone(), Some(password)).await.expect("join");
    assert!(with.status.success(), "{}", text(&with.stderr));
    let shown = format!("{}{}", text(&with.stdout), text(&with.stderr));
    assert!(shown.contains("initialised the opt-out store"), "{shown}");
    assert!(
        !shown.contains("p@ss") && !shown.contains("p%40ss"),
        "{shown}"
    );
    let both = init(url.replace("redis://", "redis://:other@"), Some(password))
        .await
        .expect("join");
    assert!(!both.status.success());
    assert!(
        text(&both.stderr).contains("carries a password already"),
        "{}",
        text(&both.stderr)
    );
}

/// Issue 27, item 3: the chart's upgrade hook runs `init-store --verify-only`. On an initialised
/// store it changes nothing; on a store that lost its data (FLUSHALL: checks are withheld, as they
/// should be) it fails loudly and writes nothing, where `--exists-ok` (what the hook ran before)
/// made a new, empty dataset that every replica then released everyone from.
#[tokio::test]
async fn init_store_verify_only_fails_loudly_on_a_store_that_lost_its_data() {
    let redis = common::RedisServer::start();
    let url = redis.url();
    let init = |extra: &[&str]| {
        let mut a = args(&["init-store", "--redis-url", &url]);
        a.extend(extra.iter().map(|s| s.to_string()));
        optout(a)
    };
    let before = init(&["--verify-only"]).await;
    assert!(
        !before.status.success(),
        "a store never initialised is not verified"
    );
    let first = init(&[]).await;
    assert!(first.status.success(), "{}", text(&first.stderr));
    let ok = init(&["--verify-only"]).await;
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("nothing was changed"));

    let mut conn = redis.connection().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("FLUSHALL");
    let lost = init(&["--verify-only"]).await;
    assert_eq!(lost.status.code(), Some(1), "{}", text(&lost.stderr));
    assert_stderr_has(&lost, "holds no dataset marker");
    assert_stderr_has(&lost, "Restore it");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert!(keys.is_empty(), "--verify-only wrote {keys:?}");
    let both = init(&["--verify-only", "--exists-ok"]).await;
    assert_eq!(both.status.code(), Some(2), "the two flags conflict");
}

/// Issue 28 item 3: type 1 opt-outs belong to practices. One practice's REPLACE (the README's own
/// `admin import --type type1 --mode replace practice-A83007-type1.txt`) used to make the whole
/// type 1 set equal to that file, deleting every other practice's objections: the release path
/// reproduced with the binary of 15638fb (B81001's objection to 9434765919 was removed by
/// A83007's file and the number released for GP-held data). Now the file replaces A83007's
/// objections only, `admin get`, the audit and `admin status` name the practices, and a type 1
/// change without its practice is a usage error.
#[tokio::test]
async fn a_practice_replaces_its_own_type_1_opt_outs_and_no_other_practice_s() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("data")).await;
    let run = |a: &[&str]| {
        let mut all = args(&["admin", "--server", &server.url]);
        all.extend(args(a));
        optout(all)
    };
    let out = run(&[
        "add",
        "--type",
        "type-1",
        "--practice",
        "B81001",
        "--source",
        "gp-feed",
        "9434765919",
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let file = dir.path().join("practice-A83007-type1.txt");
    std::fs::write(&file, "4010232137\n").expect("write");
    let file_arg = file.to_str().expect("utf8");
    let out = run(&["import", "--type", "type1", "--mode", "replace", file_arg]).await; // `type1`: the spelling before `type-1`, still taken.
    assert!(
        !out.status.success(),
        "a type 1 import without its practice"
    );
    assert_stderr_has(&out, "--practice is required");
    let out = run(&[
        "import",
        "--type",
        "type-1",
        "--practice",
        "A83007",
        "--mode",
        "replace",
        file_arg,
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("added 1, removed 0"),
        "{}",
        text(&out.stdout)
    );
    let out = optout(args(&[
        "check",
        "--server",
        &server.url,
        "--purpose",
        "research",
        "--origin",
        "gp-practice",
        "9434765919",
        "4010232137",
    ]))
    .await;
    assert_eq!(
        text(&out.stdout),
        "9434765919\twithhold\ttype-1-opt-out\n4010232137\twithhold\ttype-1-opt-out\n",
        "B81001's objection stands after A83007's file"
    );
    // A second practice for the same patient; get names both.
    let out = run(&[
        "add",
        "--type",
        "type-1",
        "--practice",
        "a83007",
        "--source",
        "gp-feed",
        "9434765919",
    ])
    .await;
    assert!(
        text(&out.stdout).contains("applied 1"),
        "{}",
        text(&out.stdout)
    );
    let out = run(&["get", "9434765919"]).await;
    assert!(
        text(&out.stdout).contains("practices B81001,A83007"),
        "{}",
        text(&out.stdout)
    );
    let out = run(&["audit", "--output", "json"]).await;
    let records: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        records
            .as_array()
            .expect("records")
            .iter()
            .any(|r| r["action"] == "import-replace" && r["practice"] == "A83007"),
        "{records}"
    );
    let out = run(&["status"]).await;
    assert!(
        text(&out.stdout).contains("1 practice (oldest list A83007 of"),
        "{}",
        text(&out.stdout)
    );
    server.stop().await;
}
