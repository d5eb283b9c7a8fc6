//! The audit trails: records, retention and seals.

use super::*;

/// Audit records: checks appended, admin reads recorded, both read back in one order with the
/// changes' own records, filtered.
pub(super) async fn audit(b: &dyn Backend) {
    let f = b.fresh("audit").await;
    let s = f.store.as_ref();
    change(s, ChangeKind::Add, NATIONAL, &numbers(4_060_000_000, 2)).await;
    s.append_audit(&[record("check", "RX1"), record("check", "RX2")])
        .await
        .expect("append");
    s.append_audit(&[record("check", "RX1")])
        .await
        .expect("append");
    s.record_access(&record("get", "RX9"))
        .await
        .expect("record a read");
    let all = s
        .read_audit(&AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .expect("read");
    // Each trail keeps its own order; the two merge by time, to the millisecond, so records of
    // the two trails written within one millisecond may come in either order.
    let trail = |changes: bool| -> Vec<(&str, &str)> {
        all.iter()
            .filter(|r| (r.action == "check") != changes)
            .map(|r| (r.action.as_str(), r.organisation.as_str()))
            .collect()
    };
    assert_eq!(trail(true), vec![("change", "ADMIN"), ("get", "RX9")]);
    assert_eq!(
        trail(false),
        vec![("check", "RX1"), ("check", "RX2"), ("check", "RX1")]
    );
    assert_eq!(all.len(), 5);
    let changed = all.iter().find(|r| r.action == "change").expect("change");
    assert_eq!(changed.applied, 2, "a change's record says what it changed");
    let rx1 = s
        .read_audit(&AuditQuery {
            organisation: Some("RX1".into()),
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .expect("read");
    assert_eq!(rx1.len(), 2);
}

/// Retention of the changes trail by age: older records go, newer ones and checks stay.
pub(super) async fn changes_retention(b: &dyn Backend) {
    let f = b.fresh("retention").await;
    let s = f.store.as_ref();
    let now = i64::try_from(optout_now_ms()).expect("time");
    let mut fresh = record("get", "RX1");
    fresh.at_ms = now;
    s.record_access(&fresh).await.expect("record");
    s.append_audit(&[record("check", "RX2")])
        .await
        .expect("append");
    let all = || async {
        s.read_audit(&AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        })
        .await
        .expect("read")
    };
    // A cut-off a minute ago keeps the record; one a minute ahead removes it, not the check.
    s.trim_changes(optout_now_ms() - 60_000)
        .await
        .expect("trim");
    assert_eq!(all().await.len(), 2);
    let removed = s
        .trim_changes(optout_now_ms() + 60_000)
        .await
        .expect("trim");
    assert_eq!(removed, 1);
    let left = all().await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].action, "check");
}

/// The changes trail is sealed by whichever writer gets there first, and verifies; a record
/// removed from outside is named.
pub(super) async fn changes_sealing(b: &dyn Backend) {
    let f = b.fresh("sealing").await;
    let s = f.store.as_ref();
    let key = AuditKey::new(&[9u8; 32]).expect("key");
    for org in ["RX1", "RX2", "RX3"] {
        s.record_access(&record("get", org)).await.expect("record");
    }
    change(s, ChangeKind::Add, NATIONAL, &numbers(4_200_000_000, 2)).await;
    // An acknowledgement's record too (its own script).
    s.acknowledge_regression(&record("acknowledge-regression", "RX1"))
        .await
        .expect("acknowledge");
    assert_eq!(sealer::seal_pending(s, &key).await.expect("seal"), 5);
    assert_eq!(sealer::seal_pending(s, &key).await.expect("seal"), 0);
    // A writer that read an older last seal loses the race instead of forking the chain.
    assert!(!s.append_seal(0, "{}").await.expect("append"));
    s.record_access(&record("get", "RX4"))
        .await
        .expect("record");
    let report = sealer::verify(s, &key)
        .await
        .expect("read")
        .expect("intact");
    assert_eq!((report.seals, report.records, report.unsealed), (1, 5, 1));
    assert_eq!(sealer::seal_pending(s, &key).await.expect("seal"), 1);
    let records = s.stored(Stored::Records, None, 100).await.expect("records");
    assert_eq!(records.len(), 6);
    // Paging after an id returns what follows it.
    let after = s
        .stored(Stored::Records, Some(&records[1].id), 2)
        .await
        .expect("page");
    assert_eq!(after, records[2..4].to_vec());
    // Under another key nothing verifies.
    let other = AuditKey::new(&[8u8; 32]).expect("key");
    assert!(sealer::verify(s, &other).await.expect("read").is_err());
    if b.delete_change_record(&f, &records[2].id).await {
        match sealer::verify(s, &key).await.expect("read") {
            Err(ChangesError::Removed { id, .. }) => assert_eq!(id, records[2].id),
            other => panic!("a removed record must be named, got {other:?}"),
        }
    }
    // Retention removes records with their seals: what is left still verifies.
    s.trim_changes(optout_now_ms() + 60_000)
        .await
        .expect("trim");
    let report = sealer::verify(s, &key)
        .await
        .expect("read")
        .expect("after retention");
    assert_eq!(report.records, 0);
}
