//! The check log on disk: sealed JSON-lines segments written by the real server, read back by
//! `ReadAudit`, and checked by `optout audit verify`, which names the first record that was
//! altered, removed or reordered.

#[macro_use]
mod common;

use std::{path::Path, process::Command, time::Duration};

use common::{TestServer, change_request, check_request, test_config, valid_numbers};
use optout::{
    api::proto::{OptOutType, Purpose, ReadAuditRequest},
    core::{AuditKey, AuditQuery},
    engine::check_files::{CheckFilesConfig, segments},
    store::ConsentStore,
};

const BIN: &str = env!("CARGO_BIN_EXE_optout");

/// `optout audit verify`: (exit code, stdout).
fn verify(key: &Path, dir: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify", "--audit-key-file"])
        .arg(key)
        .arg(dir)
        .output()
        .expect("optout runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test]
async fn checks_go_to_sealed_segments_that_verify_and_any_edit_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("audit.key");
    std::fs::write(&key_file, AuditKey::generate()).expect("write key");
    let log_dir = dir.path().join("check-log");
    let mut config = test_config(&dir.path().join("data"));
    config.audit_key =
        Some(AuditKey::from_file(&std::fs::read(&key_file).expect("read")).expect("key"));
    config.check_files = Some(CheckFilesConfig {
        dir: log_dir.clone(),
        max_segment_bytes: 1 << 20,
        max_backups: 0,
        max_age: None,
    });
    let store_dir = dir.path().join("data");
    let server = TestServer::start_with(config).await;
    let mut admin = server.admin_client().await;
    let mut checker = server.check_client().await;
    let n = valid_numbers(4_900_000_000, 4);
    admin
        .add_opt_outs(change_request(
            vec![n[0].clone()],
            OptOutType::NationalDataOptOut,
        ))
        .await
        .expect("add");
    for i in 0..5 {
        let mut req = check_request(n.clone(), Purpose::Research);
        req.extract_id = format!("extract-{i}");
        checker.check(req).await.expect("check");
    }
    // The check records are on disk (written in batches), and ReadAudit finds them there.
    let records = poll!("five check records read back", Duration::from_secs(5), {
        let r = admin
            .read_audit(ReadAuditRequest {
                nhs_number: n[1].clone(),
                ..Default::default()
            })
            .await
            .expect("read")
            .into_inner()
            .records;
        let checks: Vec<_> = r.into_iter().filter(|r| r.action == "check").collect();
        if checks.len() == 5 {
            break checks;
        }
    });
    assert_eq!(records[0].extract_id, "extract-0");
    assert_eq!(records[0].applied, 3, "n1..n3 released, n0 withheld");
    server.stop().await;

    // Nothing of the checks went to the consent store: its checks trail is empty.
    let store = optout::server::open_embedded(&test_config(&store_dir))
        .await
        .expect("store");
    store.open_dataset().await.expect("bind");
    let in_store = store
        .read_audit(&AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .expect("read");
    assert!(in_store.iter().all(|r| r.action != "check"), "{in_store:?}");
    assert!(in_store.iter().any(|r| r.action == "add"));
    drop(store);

    // Intact: verifies. No NHS number in the files.
    let (code, said) = verify(&key_file, &log_dir);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("verified: 5 records"), "{said}");
    let segment = segments(&log_dir).expect("segments").remove(0);
    let original = std::fs::read_to_string(&segment).expect("read");
    for number in &n {
        assert!(
            !original.contains(number.as_str()),
            "plain NHS number on disk"
        );
    }
    let lines: Vec<&str> = original.lines().collect();
    let write = |lines: &[&str]| {
        std::fs::write(&segment, lines.join("\n") + "\n").expect("write");
    };

    // One byte edited in the third record.
    let edited = lines[2].replacen("extract-2", "extract-9", 1);
    write(&[lines[0], lines[1], &edited, lines[3], lines[4]]);
    let (code, said) = verify(&key_file, &log_dir);
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains("line 3") && said.contains("altered"),
        "{said}"
    );

    // One record deleted.
    write(&[lines[0], lines[1], lines[3], lines[4]]);
    let (code, said) = verify(&key_file, &log_dir);
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains("line 3") && said.contains("removed or moved"),
        "{said}"
    );

    // Two records swapped.
    write(&[lines[0], lines[1], lines[3], lines[2], lines[4]]);
    let (code, said) = verify(&key_file, &log_dir);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("line 3"), "{said}");

    // Put back: verifies again.
    write(&lines);
    assert_eq!(verify(&key_file, &log_dir).0, 0);
}
