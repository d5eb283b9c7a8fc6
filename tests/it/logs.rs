//! No NHS number in the logs, at any level: a whole session through the real binary with
//! logging at TRACE, then every number used is searched for in what the server and the command
//! line wrote to stderr.

use std::{
    io::Read,
    process::{Command, Stdio},
    time::Duration,
};

use crate::common::valid_numbers;

const BIN: &str = env!("CARGO_BIN_EXE_optout");

fn run(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(BIN);
    c.args(args).env("OPTOUT_LOG", "trace").stdin(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("optout runs")
}

/// Kills the server if the test fails before stopping it.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn no_nhs_number_reaches_the_logs_at_any_level() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.toml");
    let audit_key = dir.path().join("audit.key");
    std::fs::write(
        &audit_key,
        // base64 of 32 test bytes: the key file format.
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n",
    )
    .expect("write");
    let made = run(
        &[
            "keys",
            "new",
            "--keys-file",
            keys.to_str().expect("utf8"),
            "--organisation",
            "RX1",
            "--role",
            "admin",
        ],
        &[],
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let key = String::from_utf8_lossy(&made.stdout).trim().to_string();

    let mut server = Guard(
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--keys-file", keys.to_str().expect("utf8")])
            .args(["--audit-key-file", audit_key.to_str().expect("utf8")])
            .env("OPTOUT_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("serve"),
    );
    let mut stderr = server.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        let mut announced = false;
        loop {
            let n = stderr.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if !announced {
                // Only complete lines: a read may end in the middle of one.
                let complete = all
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(&all[..0], |i| &all[..i]);
                let text = String::from_utf8_lossy(complete);
                if let Some(line) = text.lines().find(|l| l.starts_with("optout: listening on")) {
                    let addr = line
                        .split_whitespace()
                        .nth(3)
                        .unwrap_or_default()
                        .to_string();
                    let _ = tx.send(addr);
                    announced = true;
                }
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("server address");
    let url = format!("http://{addr}");
    let env = [
        ("OPTOUT_SERVER", url.as_str()),
        ("OPTOUT_API_KEY", key.as_str()),
    ];

    let n = valid_numbers(4_800_000_000, 6);
    let spaced = |s: &str| format!("{} {} {}", &s[..3], &s[3..6], &s[6..]);
    let mut cli_stderr = String::new();
    let mut step = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&args, &env);
        cli_stderr.push_str(&String::from_utf8_lossy(&out.stderr));
        out
    };
    // Wait for the server to answer.
    let mut last = String::new();
    let mut up = false;
    for _ in 0..100 {
        let out = step(vec!["admin".into(), "status".into()]);
        if out.status.success() {
            up = true;
            break;
        }
        last = String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(up, "server at {url} answered: {last}");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert!(
        step(s(&[
            "admin",
            "add",
            "--type",
            "national",
            "--source",
            "t",
            &n[0],
            &spaced(&n[1])
        ]))
        .status
        .success()
    );
    // A rejected change: the error names positions, not numbers.
    assert!(
        !step(s(&[
            "admin",
            "add",
            "--type",
            "type-1",
            "--practice",
            "A83007",
            "--source",
            "t",
            &n[2],
            "987 654 4321"
        ]))
        .status
        .success()
    );
    assert!(
        step(s(&[
            "admin", "remove", "--type", "national", "--source", "t", &n[1]
        ]))
        .status
        .success()
    );
    let list = dir.path().join("list.txt");
    std::fs::write(&list, format!("{}\n{}\n123 456 7890\n", n[3], n[4])).expect("write");
    assert!(
        step(s(&[
            "admin",
            "import",
            "--type",
            "type-1",
            "--practice",
            "A83007",
            "--mode",
            "merge",
            list.to_str().expect("utf8")
        ]))
        .status
        .success()
    );
    assert!(
        step(s(&[
            "check",
            "--purpose",
            "research",
            &n[0],
            &n[3],
            &n[5],
            "943 476 5918"
        ]))
        .status
        .success()
    );
    let csv = dir.path().join("extract.csv");
    std::fs::write(&csv, format!("nhs_number,x\n{},a\n{},b\n", n[0], n[5])).expect("write");
    let out_csv = dir.path().join("out.csv");
    assert!(
        step(s(&[
            "filter",
            "--purpose",
            "planning",
            "--input",
            csv.to_str().expect("utf8"),
            "--out",
            out_csv.to_str().expect("utf8")
        ]))
        .status
        .success()
    );
    assert!(step(s(&["admin", "get", &n[0]])).status.success());
    assert!(
        step(s(&["admin", "audit", "--nhs-number", &n[0]]))
            .status
            .success()
    );
    assert!(!step(s(&["admin", "get", "987 654 4321"])).status.success());

    let pid = server.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let _ = server.0.wait();
    let server_log = reader.join().expect("reader");
    assert!(
        server_log.contains("TRACE") || server_log.contains("DEBUG"),
        "logging at trace"
    );
    let mut numbers: Vec<String> = n.clone();
    numbers.extend(["9876544321", "1234567890", "9434765918"].map(String::from));
    for number in &numbers {
        for form in [
            number.clone(),
            spaced(number),
            spaced(number).replace(' ', "-"),
        ] {
            assert!(
                !server_log.contains(&form),
                "server log holds an NHS number ({form})"
            );
            assert!(
                !cli_stderr.contains(&form),
                "command-line stderr holds an NHS number ({form})"
            );
        }
    }
    assert!(!server_log.contains(&key), "server log holds an API key");
}
