//! Unit tests of the embedded store beyond the contract suite.

use super::*;

fn numbers(count: usize) -> Vec<NhsNumber> {
    (4_000_000_000u64..)
        .filter_map(|v| NhsNumber::from_u64(v).ok())
        .take(count)
        .collect()
}

fn open(dir: &Path, log: u64) -> EmbeddedStore {
    EmbeddedStore::open(&EmbeddedConfig {
        data_dir: dir.to_path_buf(),
        change_log_len: log,
    })
    .expect("opens")
    .0
}

#[tokio::test]
async fn writes_advance_the_version_and_feed_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 100);
    let ns = numbers(3);
    let a = store
        .change(
            ChangeKind::Add,
            OptOutType::Type1,
            &ns,
            "t1",
            &AuditRecord::default(),
        )
        .await
        .expect("add");
    assert_eq!(a.applied, 3);
    let again = store
        .change(
            ChangeKind::Add,
            OptOutType::Type1,
            &ns[..1],
            "t1",
            &AuditRecord::default(),
        )
        .await
        .expect("add again");
    assert_eq!(again.applied, 0);
    assert!(again.version > a.version);
    let Feed::Changes(c) = store
        .changes_after(Version::ZERO, 10, Duration::ZERO)
        .await
        .expect("feed")
    else {
        panic!("not trimmed")
    };
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].added, ns);
    assert!(c[1].added.is_empty());
    let st = store.status().await.expect("status");
    assert_eq!((st.type1, st.national, st.patients), (3, 0, 3));
}

#[tokio::test]
async fn a_trimmed_log_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 2);
    for n in numbers(5) {
        store
            .change(
                ChangeKind::Add,
                OptOutType::NationalDataOptOut,
                &[n],
                "s",
                &AuditRecord::default(),
            )
            .await
            .expect("add");
    }
    assert_eq!(
        store
            .changes_after(Version::ZERO, 10, Duration::ZERO)
            .await
            .expect("feed"),
        Feed::Trimmed
    );
    let latest = store.status().await.expect("status").version;
    assert_eq!(
        store
            .changes_after(latest, 10, Duration::ZERO)
            .await
            .expect("feed"),
        Feed::Changes(vec![])
    );
}

#[tokio::test]
async fn a_database_without_marker_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A redb file that is not one of ours (or lost its meta table).
    Database::create(EmbeddedStore::db_path(dir.path())).expect("create");
    let err = EmbeddedStore::open(&EmbeddedConfig {
        data_dir: dir.path().to_path_buf(),
        change_log_len: 10,
    })
    .err()
    .expect("refused");
    assert!(matches!(err, StoreError::NotInitialised(_)), "{err}");
}

#[tokio::test]
async fn records_keep_type_time_and_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 10);
    let n = numbers(1)[0];
    store
        .change(
            ChangeKind::Add,
            OptOutType::Type1,
            &[n],
            "practice-A.csv",
            &AuditRecord::default(),
        )
        .await
        .expect("add");
    store
        .change(
            ChangeKind::Add,
            OptOutType::NationalDataOptOut,
            &[n],
            "ticket-9",
            &AuditRecord::default(),
        )
        .await
        .expect("add");
    let (records, _) = store.get(n).await.expect("get");
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].kind, OptOutType::NationalDataOptOut);
    assert_eq!(records[0].source, "ticket-9");
    assert_eq!(records[1].source, "practice-A.csv");
    assert!(records[1].recorded_at_ms > 1_700_000_000_000);
    store
        .change(
            ChangeKind::Remove,
            OptOutType::NationalDataOptOut,
            &[n],
            "t",
            &AuditRecord::default(),
        )
        .await
        .expect("remove");
    let lookup = store.lookup(&[n]).await.expect("lookup");
    assert!(lookup.held[0].contains(OptOutType::Type1));
    assert!(!lookup.held[0].contains(OptOutType::NationalDataOptOut));
}
