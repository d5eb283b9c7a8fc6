//! Issue 27, item 5: a check-log write that fails part-way (a full disk) must not leave a torn
//! line. Here the disk is "full" by a file-size limit on this test process alone (its own test
//! binary, so no other test shares the limit): a write past it is cut short (EFBIG), as a write
//! to a full disk is (ENOSPC). Once there is room again, the next batch is written and the
//! segment verifies, where the torn bytes once made `optout audit verify` fail for ever and the
//! records after them unreadable.

use std::{process::Command, sync::Arc};

use optout::{
    core::{AuditKey, AuditRecord},
    engine::check_files::{CheckFiles, CheckFilesConfig},
};

fn record(i: u64) -> AuditRecord {
    AuditRecord {
        at_ms: 1_700_000_000_000 + i as i64,
        action: "check".into(),
        organisation: "RX1".into(),
        extract_id: Some(format!("extract-{i}")),
        count: i,
        ..AuditRecord::default()
    }
}

fn set_file_size_limit(bytes: libc::rlim_t) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid pointer.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
        limit.rlim_cur = bytes.min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

#[tokio::test]
async fn a_check_log_write_cut_short_by_a_full_disk_leaves_no_torn_line() {
    // A write past the limit fails (EFBIG) instead of killing the process (SIGXFSZ).
    // SAFETY: ignoring a signal for this test process.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = "bm90LWEtcmVhbC1rZXktanVzdC1mb3ItdGhlLXRlc3QtMzItYnl0ZXM=";
    let key_file = dir.path().join("audit.key");
    std::fs::write(&key_file, secret).expect("key file");
    let key = AuditKey::from_file(secret.as_bytes()).expect("key");
    let log = dir.path().join("check-log");
    let files = CheckFiles::open(
        CheckFilesConfig {
            dir: log.clone(),
            max_segment_bytes: 64 * 1024 * 1024,
            max_backups: 0,
            max_age: None,
            anchor_interval: std::time::Duration::from_secs(60),
        },
        key,
    )
    .expect("open");
    files
        .append(Arc::new((0..10).map(record).collect()))
        .await
        .expect("written while there is room");
    let written = std::fs::read_dir(&log)
        .expect("dir")
        .flatten()
        .map(|e| e.metadata().expect("metadata").len())
        .sum::<u64>();
    // The disk fills up part-way through the next batch.
    set_file_size_limit(written + 700);
    let full = files.append(Arc::new((10..30).map(record).collect())).await;
    assert!(full.is_err(), "a batch past the limit fails");
    // Room again: the next batch is written, after the last whole line.
    set_file_size_limit(libc::RLIM_INFINITY);
    files
        .append(Arc::new((30..35).map(record).collect()))
        .await
        .expect("written once there is room again");
    let out = Command::new(env!("CARGO_BIN_EXE_optout"))
        .args(["audit", "verify", "--audit-key-file"])
        .arg(&key_file)
        .arg(&log)
        .output()
        .expect("optout audit verify runs");
    assert!(
        out.status.success(),
        "the segment verifies: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
