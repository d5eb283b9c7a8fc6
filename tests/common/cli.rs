//! The `optout` binary, run as a user would: arguments in, exit status and output back.

use std::process::{Command, Output, Stdio};

/// The binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_optout");

/// Runs `optout ARGS` (logs at warn, stdin empty) off the async runtime.
pub async fn optout(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .env("OPTOUT_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("optout runs")
    })
    .await
    .expect("join")
}

/// Owned arguments from string slices.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Fails the test, showing stderr, unless the command's stderr contains `needle`.
#[track_caller]
pub fn assert_stderr_has(out: &std::process::Output, needle: &str) {
    let stderr = text(&out.stderr);
    assert!(stderr.contains(needle), "{stderr}");
}
