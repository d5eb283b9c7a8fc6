//! One grammar for every command (issue 30 item 1): client flags anywhere after the command,
//! lengths of time and times as people write them, exit code 2 for what cannot be run as typed and
//! 1 for what failed, completion scripts, the build's commit, and a quiet end into a closed pipe.

use std::{
    io::Read,
    process::{Command, Stdio},
};

use crate::common::{BIN, TestServer, args, assert_stderr_has, optout, text, valid_numbers};

#[tokio::test]
async fn client_flags_go_anywhere_and_usage_errors_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(dir.path()).await;
    let n = valid_numbers(4_100_000_000, 1);
    // --server and --timeout after the subcommand, where a user types them.
    let out = optout(args(&[
        "admin",
        "add",
        "--type",
        "national",
        "--source",
        "t-1",
        &n[0],
        "--server",
        &server.url,
        "--timeout",
        "5s",
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = optout(args(&[
        "admin",
        "audit",
        "--since",
        "1h",
        "--server",
        &server.url,
        "--output",
        "json",
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("\"add\""),
        "{}",
        text(&out.stdout)
    );
    // A page shorter than what matches says so, and how to read on.
    let out = optout(args(&[
        "admin",
        "audit",
        "--limit",
        "1",
        "--server",
        &server.url,
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 1);
    assert_stderr_has(&out, "more records match: read on with --from 20");

    // What cannot be run as typed: 2, with what to type instead, and nothing sent.
    let out = optout(args(&["admin", "status", "--server", "localhost:1"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_has(&out, "give the scheme, http://localhost:1");
    let out = optout(args(&[
        "admin",
        "audit",
        "--from",
        "yesterday",
        "--server",
        &server.url,
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_has(&out, "how long ago (24h, 7d)");
    let out = optout(args(&[
        "check",
        "--timeout",
        "10",
        "--server",
        &server.url,
        &n[0],
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_has(&out, "write it as 500ms, 2s");

    // What failed: 1.
    let out = optout(args(&["admin", "status", "--server", "http://127.0.0.1:1"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "is the server running");
}

#[tokio::test]
async fn completion_scripts_and_the_version_with_its_commit() {
    let out = optout(args(&["completion", "bash"])).await;
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("_optout()"));
    let out = optout(args(&["completion", "fish"])).await;
    assert!(text(&out.stdout).contains("complete -c optout"));
    let out = optout(args(&["completion", "tcsh"])).await;
    assert_eq!(out.status.code(), Some(2));

    // --help offers only what is accepted: a key without an exempt basis is given none.
    let out = optout(args(&["keys", "new", "--help"])).await;
    assert!(
        !text(&out.stdout).contains("- none:"),
        "{}",
        text(&out.stdout)
    );
    let out = optout(args(&[
        "keys",
        "new",
        "--keys-file",
        "/nonexistent/k.toml",
        "--organisation",
        "RX1",
        "--role",
        "checker",
        "--exempt-basis",
        "none",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_has(&out, "invalid value 'none' for '--exempt-basis");
    let out = optout(args(&["init-store", "--help"])).await;
    assert!(
        text(&out.stdout).contains("or embedded (--data-dir)"),
        "{}",
        text(&out.stdout)
    );

    let out = optout(args(&["--version"])).await;
    let version = text(&out.stdout);
    let commit = version
        .trim()
        .strip_prefix(concat!("optout ", env!("CARGO_PKG_VERSION"), " ("))
        .and_then(|v| v.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{version}"));
    assert!(!commit.is_empty(), "{version}");
}

/// `optout completion bash | head -1`: the reader goes after one line; the command ends (by
/// SIGPIPE, as Unix tools do) instead of panicking on the write. Its 78 KB do not fit a pipe's
/// 64 KiB, so the write meets the closed pipe every time.
#[test]
fn a_client_command_piped_into_head_ends_quietly() {
    let mut child = Command::new(BIN)
        .args(["completion", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    let mut first = [0u8; 64];
    child
        .stdout
        .take()
        .expect("stdout")
        .read_exact(&mut first)
        .expect("reads");
    let out = child.wait_with_output().expect("ends");
    let stderr = text(&out.stderr);
    assert!(
        out.status.code() != Some(101) && !stderr.contains("panicked"),
        "{:?}: {stderr}",
        out.status
    );
}

/// A file that is not one NHS number a line is named before anything is sent (every row would be
/// rejected: "rejected 63", exit 0, before), and a summary counts the file's duplicates.
#[tokio::test]
async fn an_import_that_is_not_a_list_of_numbers_is_refused_with_what_to_give() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("data")).await;
    let n = valid_numbers(4_300_000_000, 1);
    let cases = [
        (
            "header.txt",
            format!("nhs_number\n{}\n", n[0]),
            "--column nhs_number",
        ),
        (
            "extract.csv",
            format!("id,nhs_number\n1,{}\n", n[0]),
            "looks like a CSV header (id,nhs_number)",
        ),
        ("national.dat", format!("{},\n", n[0]), "give --format dat"),
    ];
    for (file, body, hint) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, body).expect("write");
        let out = optout(args(&[
            "admin",
            "import",
            "--server",
            &server.url,
            "--type",
            "national",
            "--mode",
            "merge",
            "--source",
            "t",
            path.to_str().expect("utf-8"),
        ]))
        .await;
        assert_eq!(out.status.code(), Some(1), "{file}");
        assert_stderr_has(&out, hint);
        assert_stderr_has(&out, "nothing was imported");
    }
    let status = server
        .admin_client()
        .await
        .get_status(optout::api::proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.national_data_opt_outs, 0, "nothing was imported");

    let path = dir.path().join("twice.txt");
    std::fs::write(&path, format!("{0}\n{0}\n123\n", n[0])).expect("write");
    let out = optout(args(&[
        "admin",
        "import",
        "--server",
        &server.url,
        "--type",
        "national",
        "--mode",
        "merge",
        "--source",
        "t",
        path.to_str().expect("utf-8"),
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("received 3, duplicates 1, added 1, removed 0, rejected 1"),
        "{}",
        text(&out.stdout)
    );
    assert_stderr_has(&out, "skipped (--strict refuses such a file); at line 3");

    // A line far too long for a number (50 MB failed with a gRPC decode error): named, before
    // anything is sent.
    let path = dir.path().join("long.txt");
    std::fs::write(&path, format!("{}\n{}\n", n[0], "9".repeat(2_000_000))).expect("write");
    let out = optout(args(&[
        "admin",
        "import",
        "--server",
        &server.url,
        "--type",
        "national",
        "--mode",
        "merge",
        "--source",
        "t",
        path.to_str().expect("utf-8"),
    ]))
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(
        &out,
        "long.txt: line 2: a value of 2000000 bytes cannot be an NHS number",
    );
    assert_stderr_has(&out, "nothing was imported");

    // The file is named once ("extract.csv: extract.csv line 62" before).
    let path = dir.path().join("strict.csv");
    std::fs::write(&path, format!("nhs_number\n{}\n943476591\n", n[0])).expect("write");
    let out = optout(args(&[
        "admin",
        "import",
        "--server",
        &server.url,
        "--type",
        "national",
        "--mode",
        "merge",
        "--source",
        "t",
        "--column",
        "nhs_number",
        "--strict",
        path.to_str().expect("utf-8"),
    ]))
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "strict.csv: line 3: not a valid NHS number");
    assert!(
        text(&out.stderr).matches("strict.csv").count() == 1,
        "{}",
        text(&out.stderr)
    );
}

/// The embedded store keeps its own audit key in its data directory, made once and kept, so a
/// check log written before a restart can be verified after it (a random key per process could
/// never be); Redis without --audit-key-file says loudly that its key lasts one process.
#[tokio::test]
async fn the_embedded_store_keeps_an_audit_key_in_its_data_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // A --listen address in use stops serve after the key, before it opens the store.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("addr").to_string();
    let serve = |extra: &[&str]| {
        let mut a = args(&["serve", "--listen", &listen, "--data-dir"]);
        a.push(data.to_str().expect("utf-8").to_string());
        a.extend(args(extra));
        optout(a)
    };
    let first = serve(&[]).await;
    assert_eq!(first.status.code(), Some(2));
    assert_stderr_has(&first, "made an audit key for this data directory");
    let path = data.join("audit-key");
    let key = std::fs::read_to_string(&path).expect("the key is kept");
    assert_eq!(key.trim().len(), 44, "base64 of 32 bytes: {key}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "readable by its owner only");
    }
    let second = serve(&[]).await;
    assert!(
        !text(&second.stderr).contains("made an audit key"),
        "{}",
        text(&second.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("key"),
        key,
        "the same key"
    );

    let redis = serve(&["--redis-url", "redis://127.0.0.1:1"]).await;
    assert_stderr_has(&redis, "for this process only");
}

/// `serve --dev`: a banner, no keys needed, a temporary store deleted at exit; refused where a
/// production sign is (a Redis store, a keys file, Kubernetes).
#[tokio::test]
async fn serve_dev_runs_on_a_temporary_store_and_is_refused_where_production_shows() {
    // Stopped twice: by a SIGTERM sent the moment the banner appears (before the store is open:
    // CI once saw this killed by the signal's default action, the store left behind), and by
    // one sent once it listens.
    for stop_at in ["DEVELOPMENT MODE (--dev)", "listening on"] {
        dev_server_stopped_at(stop_at).await;
    }

    let out = optout(args(&[
        "serve",
        "--dev",
        "--redis-url",
        "redis://127.0.0.1:1",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_has(&out, "'--dev' cannot be used with '--redis-url");
    let out = tokio::task::spawn_blocking(|| {
        Command::new(BIN)
            .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
            .env("KUBERNETES_SERVICE_HOST", "10.0.0.1")
            .output()
            .expect("runs")
    })
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_has(&out, "--dev is refused inside Kubernetes");
}

/// Starts `serve --dev`, sends SIGTERM as soon as a stderr line holds `stop_at`, and checks the
/// banner, a clean exit and that the temporary store is gone.
async fn dev_server_stopped_at(stop_at: &'static str) {
    use std::io::BufRead;
    // Loopback here (tests listen on loopback only); without --listen it is 0.0.0.0:50051.
    let mut child = Command::new(BIN)
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .env("OPTOUT_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let stderr = child.stderr.take().expect("stderr");
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let mut lines = std::io::BufReader::new(stderr).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            let done = line.contains(stop_at);
            seen.push(line);
            if done {
                break;
            }
        }
        // The pipe closes here: a server whose stderr is gone keeps going and ends cleanly
        // (eprintln! would panic on its next line, exit 101).
        drop(lines);
        seen
    })
    .await
    .expect("join");
    assert!(
        lines.last().is_some_and(|l| l.contains(stop_at)),
        "{stop_at}: {lines:?}"
    );
    let banner = lines
        .iter()
        .find(|l| l.contains("DEVELOPMENT MODE (--dev)"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(banner.contains("WITHOUT authentication or TLS"), "{banner}");
    let store = banner
        .split("deleted at exit (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .map(std::path::PathBuf::from)
        .expect("the store's directory");
    assert!(store.exists(), "{store:?}");
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let exit = tokio::task::spawn_blocking(move || child.wait().expect("wait"))
        .await
        .expect("join");
    assert!(exit.success(), "SIGTERM at {stop_at:?}: {exit:?}");
    assert!(
        !store.exists(),
        "SIGTERM at {stop_at:?}: the temporary store is deleted at exit"
    );
}

/// Ctrl-C during an import, before the file was sent whole: the client says nothing was imported
/// (exit 130), and nothing was. The input is a FIFO held open, so the import is mid-file for as
/// long as the test wants.
#[tokio::test]
async fn ctrl_c_before_the_commit_says_nothing_was_imported() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("data")).await;
    let fifo = dir.path().join("list.txt");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success()
    );
    let child = Command::new(BIN)
        .args([
            "admin",
            "import",
            "--server",
            &server.url,
            "--type",
            "national",
        ])
        .args(["--mode", "merge", "--source", "t"])
        .arg(&fifo)
        .env("OPTOUT_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .expect("import starts");
    let fifo_path = fifo.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo_path)
            .expect("open fifo");
        for n in valid_numbers(4_500_000_000, 10) {
            writeln!(w, "{n}").expect("write");
        }
        w.flush().expect("flush");
        w // kept open: the import waits for the rest
    })
    .await
    .expect("join");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().expect("ends"))
        .await
        .expect("join");
    drop(writer);
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert_stderr_has(
        &out,
        "interrupted before the file was sent whole: nothing was imported",
    );
    let status = server
        .admin_client()
        .await
        .get_status(optout::api::proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.national_data_opt_outs, 0);
}

/// `-o json` on every command that prints: one JSON document a script can read.
#[tokio::test]
async fn every_printing_command_speaks_json_with_dash_o() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(&dir.path().join("data")).await;
    let n = valid_numbers(4_600_000_000, 2);
    let json = |out: &std::process::Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
    };
    let add = optout(args(&[
        "admin",
        "add",
        "-o",
        "json",
        "--server",
        &server.url,
        "--type",
        "national",
        "--source",
        "t",
        &n[0],
    ]))
    .await;
    assert_eq!(json(&add)["applied"], 1);
    let list = dir.path().join("list.txt");
    std::fs::write(&list, format!("{}\n{}\n", n[0], n[1])).expect("write");
    let import = optout(args(&[
        "admin",
        "import",
        "-o",
        "json",
        "--server",
        &server.url,
        "--type",
        "national",
        "--mode",
        "merge",
        "--source",
        "t",
        list.to_str().expect("utf-8"),
    ]))
    .await;
    let v = json(&import);
    assert_eq!(
        (v["received"].as_u64(), v["added"].as_u64()),
        (Some(2), Some(1)),
        "{v}"
    );
    // An import's parts fold into its line; --parts shows them one a line.
    let audit = optout(args(&["admin", "audit", "--server", &server.url])).await;
    let shown = text(&audit.stdout);
    assert!(!shown.contains("import-added"), "{shown}");
    assert!(
        shown.contains("parts: 1 numbers added in 1 records, 0 removed in 0 records"),
        "{shown}"
    );
    let audit = optout(args(&[
        "admin",
        "audit",
        "--parts",
        "--server",
        &server.url,
    ]))
    .await;
    assert!(
        text(&audit.stdout).contains("import-added"),
        "{}",
        text(&audit.stdout)
    );
    // The server names its build (the load tester's report shows it).
    let status = optout(args(&[
        "admin",
        "status",
        "-o",
        "json",
        "--server",
        &server.url,
    ]))
    .await;
    let v = json(&status);
    assert!(
        v["server_version"]
            .as_str()
            .is_some_and(|s| s.starts_with(concat!(env!("CARGO_PKG_VERSION"), " ("))),
        "{v}"
    );
    let health = optout(args(&["health", "-o", "json", "--server", &server.url])).await;
    assert_eq!(json(&health)["status"], "SERVING");
    let keys = dir.path().join("keys.toml");
    let key = optout(args(&[
        "keys",
        "new",
        "-o",
        "json",
        "--keys-file",
        keys.to_str().expect("utf-8"),
        "--organisation",
        "RX1",
        "--role",
        "checker",
    ]))
    .await;
    let v = json(&key);
    assert!(
        v["key"].as_str().is_some_and(|k| k.starts_with("oo_")) && v["organisation"] == "RX1",
        "{v}"
    );

    // filter: the rows to --out, the summary as JSON on stdout.
    let csv = dir.path().join("extract.csv");
    std::fs::write(&csv, format!("nhs_number\n{}\n{}\n123\n", n[0], n[1])).expect("write");
    let released = dir.path().join("released.csv");
    let filter = optout(args(&[
        "filter",
        "-o",
        "json",
        "--server",
        &server.url,
        "--purpose",
        "research",
        "--input",
        csv.to_str().expect("utf-8"),
        "--out",
        released.to_str().expect("utf-8"),
    ]))
    .await;
    let v = json(&filter);
    assert_eq!(
        (v["checked"].as_u64(), v["released"].as_u64()),
        (Some(3), Some(0)),
        "{v}"
    );
    assert_eq!(v["withheld_by_reason"]["national-data-opt-out"], 2, "{v}");
    assert_eq!(v["invalid_lines"], serde_json::json!([4]), "{v}");
}

/// serve's time flags take lengths of time with a unit too (`5m`, `2s`), on the command line and
/// in the config file; one that is not a whole number of the flag's unit is refused by name.
#[tokio::test]
async fn serve_time_flags_take_lengths_of_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("addr").to_string();
    let config = dir.path().join("optout.toml");
    std::fs::write(
        &config,
        "idle-timeout-secs = \"10m\"\naudit-changes-max-age-days = \"2w\"\n",
    )
    .expect("write");
    // Everything parses; serve then stops at the address in use (after reading its settings).
    let out = optout(args(&[
        "serve",
        "--listen",
        &listen,
        "--freshness-bound-ms",
        "2s",
        "--request-timeout-secs",
        "1m",
        "--config",
        config.to_str().expect("utf-8"),
        "--data-dir",
        dir.path().join("data").to_str().expect("utf-8"),
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_has(&out, &format!("--listen {listen}"));
    let out = optout(args(&["serve", "--idle-timeout-secs", "1500ms"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_has(&out, "\"1500ms\" is not a whole number of seconds");
}
