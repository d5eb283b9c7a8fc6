//! Changes, lookups, the feed, scans, snapshots and generations.

use super::*;

/// The dataset marker: bound once, stable, reported by status.
pub(super) async fn marker(b: &dyn Backend) {
    let f = b.fresh("marker").await;
    let id = f.store.open_dataset().await.expect("bind");
    assert!(!id.is_empty());
    assert_eq!(f.store.open_dataset().await.expect("again"), id);
    assert_eq!(f.store.status().await.expect("status").dataset_id, id);
    let other = b.fresh("marker-other").await;
    assert_ne!(other.store.open_dataset().await.expect("bind"), id);
}

/// Lookups, gets and counts reflect every change, and versions only grow.
pub(super) async fn lookups_and_changes(b: &dyn Backend) {
    let f = b.fresh("changes").await;
    let s = f.store.as_ref();
    let n = numbers(4_000_000_000, 3);
    let (v1, a1) = change(s, ChangeKind::Add, NATIONAL, &n[..2]).await;
    assert_eq!(a1, 2);
    let (v2, a2) = change(s, ChangeKind::Add, NATIONAL, &n[..2]).await;
    assert_eq!(a2, 0, "adding again changes nothing");
    let (v3, _) = change(s, ChangeKind::Add, TYPE1, &n[1..2]).await;
    assert!(v1 < v2 && v2 < v3, "{v1} {v2} {v3}");
    let found = s.lookup(&n, OptOutSet::ALL).await.expect("lookup");
    assert_eq!(
        found.held,
        vec![set(&[NATIONAL]), set(&[NATIONAL, TYPE1]), OptOutSet::EMPTY]
    );
    assert!(found.version >= v3);
    // A lookup of one type reads and reports that type alone.
    for only in [NATIONAL, TYPE1] {
        let found = s.lookup(&n, set(&[only])).await.expect("lookup");
        let want: Vec<OptOutSet> = [set(&[NATIONAL]), set(&[NATIONAL, TYPE1]), OptOutSet::EMPTY]
            .into_iter()
            .map(|h| h.intersection(set(&[only])))
            .collect();
        assert_eq!(found.held, want, "{only:?} alone");
        assert!(found.version >= v3);
    }
    let (records, _) = s.get(n[1]).await.expect("get");
    let mut kinds: Vec<_> = records.iter().map(|r| r.kind).collect();
    kinds.sort_by_key(|k| k.name());
    assert_eq!(kinds.len(), 2);
    assert!(records.iter().all(|r| r.source == "contract"));
    let st = s.status().await.expect("status");
    assert_eq!((st.national, st.type1, st.patients), (2, 1, 2));
    let (v4, removed) = change(s, ChangeKind::Remove, NATIONAL, &n[..1]).await;
    assert_eq!(removed, 1);
    assert!(v4 > v3);
    let found = s.lookup(&n[..1], OptOutSet::ALL).await.expect("lookup");
    assert_eq!(found.held, vec![OptOutSet::EMPTY]);
    let st = s.status().await.expect("status");
    assert_eq!((st.national, st.type1, st.patients), (1, 1, 1));
    assert!(s.get(n[2]).await.expect("get").0.is_empty());
}

/// Removing an opt-out that is not there (never added, or removed already) changes nothing and
/// says so, like adding one twice: a retried removal must not fail for ever (issue 27: on Redis
/// the script passed Lua's `-0` to HINCRBY, which refused it).
pub(super) async fn removing_what_is_not_there(b: &dyn Backend) {
    let f = b.fresh("remove-absent").await;
    let s = f.store.as_ref();
    let n = numbers(4_005_000_000, 2);
    let (v1, applied) = change(s, ChangeKind::Remove, NATIONAL, &n).await;
    assert_eq!(applied, 0, "nothing to remove");
    let (v2, added) = change(s, ChangeKind::Add, NATIONAL, &n[..1]).await;
    assert_eq!(added, 1);
    let (v3, removed) = change(s, ChangeKind::Remove, NATIONAL, &n[..1]).await;
    assert_eq!(removed, 1);
    let (v4, again) = change(s, ChangeKind::Remove, NATIONAL, &n[..1]).await;
    assert_eq!(again, 0, "removed already");
    assert!(v1 < v2 && v2 < v3 && v3 < v4, "{v1} {v2} {v3} {v4}");
    let st = s.status().await.expect("status");
    assert_eq!((st.national, st.type1, st.patients), (0, 0, 0));
}

/// The change feed: every change in order with the numbers it added; empty, not an error, when
/// there is nothing new.
pub(super) async fn change_feed(b: &dyn Backend) {
    let f = b.fresh("feed").await;
    let s = f.store.as_ref();
    let n = numbers(4_010_000_000, 4);
    let (v1, _) = change(s, ChangeKind::Add, NATIONAL, &n[..2]).await;
    let (v2, _) = change(s, ChangeKind::Remove, NATIONAL, &n[..1]).await;
    let (v3, _) = change(s, ChangeKind::Add, TYPE1, &n[2..]).await;
    let Feed::Changes(all) = s
        .changes_after(Version::ZERO, 100, Duration::ZERO)
        .await
        .expect("feed")
    else {
        panic!("the whole log is there");
    };
    let versions: Vec<_> = all.iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![v1, v2, v3]);
    assert_eq!(all[0].added, n[..2].to_vec());
    assert!(all[1].added.is_empty());
    assert_eq!(all[2].added, n[2..].to_vec());
    let Feed::Changes(later) = s
        .changes_after(v1, 100, Duration::ZERO)
        .await
        .expect("feed")
    else {
        panic!("after v1");
    };
    assert_eq!(later.len(), 2);
    let Feed::Changes(none) = s
        .changes_after(v3, 100, Duration::from_millis(50))
        .await
        .expect("feed")
    else {
        panic!("at the tip");
    };
    assert!(none.is_empty());
}

/// A scan holds every opted-out number, at a version the feed can be replayed from.
pub(super) async fn scan(b: &dyn Backend) {
    let f = b.fresh("scan").await;
    let s = f.store.as_ref();
    let n = numbers(4_040_000_000, 50);
    change(s, ChangeKind::Add, NATIONAL, &n[..30]).await;
    let (v, _) = change(s, ChangeKind::Add, TYPE1, &n[20..]).await;
    let scanned = s.scan().await.expect("scan");
    let mut got = scanned.numbers.clone();
    got.sort();
    got.dedup();
    assert_eq!(got, n);
    assert!(scanned.version >= v);
}

/// Snapshots, where the store shares them: the newest wins, and none newer than the store.
pub(super) async fn snapshots(b: &dyn Backend) {
    let f = b.fresh("snapshots").await;
    let s = f.store.as_ref();
    if !s.shares_snapshots() {
        assert!(s.load_snapshot().await.expect("load").is_none());
        return;
    }
    assert!(s.load_snapshot().await.expect("load").is_none());
    let (v, _) = change(s, ChangeKind::Add, NATIONAL, &numbers(4_050_000_000, 1)).await;
    s.publish_snapshot(v, b"first").await.expect("publish");
    assert_eq!(
        s.load_snapshot().await.expect("load").as_deref(),
        Some(&b"first"[..])
    );
    let older = Version {
        ms: v.ms - 1,
        seq: 0,
    };
    s.publish_snapshot(older, b"older").await.expect("publish");
    assert_eq!(
        s.load_snapshot().await.expect("load").as_deref(),
        Some(&b"first"[..]),
        "an older snapshot never replaces a newer one"
    );
    let beyond = Version {
        ms: v.ms + 60_000,
        seq: 0,
    };
    s.publish_snapshot(beyond, b"beyond")
        .await
        .expect("publish");
    assert_eq!(
        s.load_snapshot().await.expect("load").as_deref(),
        Some(&b"first"[..]),
        "a snapshot newer than the store is refused"
    );
    // A snapshot of several megabytes (at 5 M opt-outs one is 10 MB) is sent in chunks and must
    // come back byte for byte.
    let (v2, _) = change(s, ChangeKind::Add, NATIONAL, &numbers(4_050_000_100, 1)).await;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    s.publish_snapshot(v2, &big).await.expect("publish");
    let back = s.load_snapshot().await.expect("load").expect("a snapshot");
    assert!(
        back == big,
        "a {} byte snapshot came back as {} bytes, or other bytes",
        big.len(),
        back.len()
    );
    // Nothing staged is left behind, whether the snapshot was placed or refused, and the one in
    // place does not expire.
    s.publish_snapshot(older, b"older").await.expect("publish");
    if let Some((staged, expires)) = b.snapshot_leftovers(&f).await {
        assert!(
            staged.is_empty(),
            "staged snapshots left behind: {staged:?}"
        );
        assert!(!expires, "the published snapshot expires");
    }
}

/// A lookup follows the current generation of a list, however it changed since the last lookup
/// (a store that caches it must notice), and a generation that is not a count fails closed: read
/// as generation 0 (empty) it would answer "not held" for everyone on the list.
pub(super) async fn generations(b: &dyn Backend) {
    let f = b.fresh("generations").await;
    let s = f.store.as_ref();
    let n = numbers(4_090_000_000, 2);
    change(s, ChangeKind::Add, NATIONAL, &n).await;
    let held = |l: Result<optout::store::Lookup, StoreError>| l.expect("lookup").held;
    let nat = set(&[NATIONAL]);
    assert_eq!(held(s.lookup(&n, OptOutSet::ALL).await), vec![nat; 2]);
    // From outside: the list moves to a generation nobody wrote (an empty one), and back.
    if !b.set_generation(&f, "7").await {
        return;
    }
    assert_eq!(
        held(s.lookup(&n, OptOutSet::ALL).await),
        vec![OptOutSet::EMPTY; 2],
        "the lookup read the generation now current"
    );
    assert!(b.set_generation(&f, "0").await);
    assert_eq!(held(s.lookup(&n, OptOutSet::ALL).await), vec![nat; 2]);
    assert!(b.set_generation(&f, "not-a-generation").await);
    let looked = s.lookup(&n, OptOutSet::ALL).await;
    assert!(matches!(looked, Err(StoreError::Corrupt(_))), "{looked:?}");
    // Nor is the store trusted for the other list meanwhile.
    let looked = s.lookup(&n, set(&[TYPE1])).await;
    assert!(matches!(looked, Err(StoreError::Corrupt(_))), "{looked:?}");
}
