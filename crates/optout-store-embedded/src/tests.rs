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
        cache_bytes: DEFAULT_CACHE_BYTES,
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
            Some(&crate::core::Practice::parse("A83007", false).expect("practice")),
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
            Some(&crate::core::Practice::parse("A83007", false).expect("practice")),
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
                None,
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
        cache_bytes: DEFAULT_CACHE_BYTES,
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
            Some(&crate::core::Practice::parse("A83007", false).expect("practice")),
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
            None,
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
            None,
            &[n],
            "t",
            &AuditRecord::default(),
        )
        .await
        .expect("remove");
    let lookup = store.lookup(&[n], OptOutSet::ALL).await.expect("lookup");
    assert!(lookup.held[0].contains(OptOutType::Type1));
    assert!(!lookup.held[0].contains(OptOutType::NationalDataOptOut));
}

/// A record of the changes trail edited in the database file, with the service stopped, is named
/// by the seals; and a clock stepping back never puts a new record before a sealed one.
#[tokio::test]
async fn the_changes_trail_file_is_sealed_and_an_edit_in_it_is_named() {
    use crate::core::seals::{ChangesError, id_order};
    use optout_engine::sealer;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = AuditKey::new(&[7u8; 32]).expect("key");
    let store = open(dir.path(), 100);
    let at = |ms: i64, org: &str| AuditRecord {
        at_ms: ms,
        organisation: org.into(),
        action: "get".into(),
        ..AuditRecord::default()
    };
    store
        .record_access(&at(5_000, "RX1"))
        .await
        .expect("record");
    store
        .record_access(&at(6_000, "RX2"))
        .await
        .expect("record");
    assert_eq!(sealer::seal_pending(&store, &key).await.expect("seal"), 2);
    // The clock steps back: the record still goes after the sealed ones, and gets sealed.
    store
        .record_access(&at(1_000, "RX3"))
        .await
        .expect("record");
    assert_eq!(sealer::seal_pending(&store, &key).await.expect("seal"), 1);
    let records = store
        .stored(Stored::Records, None, 10)
        .await
        .expect("records");
    let ids: Vec<_> = records
        .iter()
        .map(|r| id_order(&r.id).expect("id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(sealer::verify(&store, &key).await.expect("read").is_ok());
    drop(store);

    // Edit the second record in the file, as someone with the disk could.
    {
        let db = Database::open(dir.path().join(DB_FILE)).expect("db");
        let txn = db.begin_write().expect("txn");
        {
            let mut table = txn.open_table(CHANGE_AUDIT).expect("table");
            let k = id_order(&records[1].id).expect("id");
            let edited = String::from_utf8(records[1].bytes.clone())
                .expect("json")
                .replace("RX2", "RX9");
            table.insert(k, edited.as_bytes()).expect("edit");
        }
        txn.commit().expect("commit");
    }
    let store = open(dir.path(), 100);
    match sealer::verify(&store, &key).await.expect("read") {
        Err(ChangesError::Altered { id, .. }) => assert_eq!(id, records[1].id),
        other => panic!("the edit must be named, got {other:?}"),
    }
}

/// A store made before practices were has no practices table: its type 1 records are the unknown
/// practice's, a practice's removal leaves them, and removing the unknown practice clears them.
#[tokio::test]
async fn type_1_records_from_before_practices_belong_to_the_unknown_practice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 10);
    let n = numbers(1)[0];
    let a = crate::core::Practice::parse("A83007", false).expect("practice");
    let audit = AuditRecord::default();
    store
        .change(
            ChangeKind::Add,
            OptOutType::Type1,
            Some(&a),
            &[n],
            "s",
            &audit,
        )
        .await
        .expect("add");
    // As an older version left it: no practices table at all.
    {
        let txn = store.inner.db.begin_write().expect("txn");
        assert!(txn.delete_table(PRACTICES).expect("delete"));
        txn.commit().expect("commit");
    }
    let (records, _) = store.get(n).await.expect("get");
    assert_eq!(records[0].practices, vec![crate::core::Practice::unknown()]);
    let o = store
        .change(
            ChangeKind::Remove,
            OptOutType::Type1,
            Some(&a),
            &[n],
            "s",
            &audit,
        )
        .await
        .expect("remove A");
    assert_eq!(
        o.applied, 0,
        "A does not hold it: the unknown practice does"
    );
    let o = store
        .change(
            ChangeKind::Remove,
            OptOutType::Type1,
            Some(&crate::core::Practice::unknown()),
            &[n],
            "s",
            &audit,
        )
        .await
        .expect("remove unknown");
    assert_eq!(o.applied, 1);
    let lookup = store.lookup(&[n], OptOutSet::ALL).await.expect("lookup");
    assert!(lookup.held[0].is_empty());
}
