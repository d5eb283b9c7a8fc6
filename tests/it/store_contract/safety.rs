//! A store that was reset, rolled back or lost history fails closed.

use super::*;

/// A store reset from outside fails closed: never "no opt-out".
pub(super) async fn reset_fails_closed(b: &dyn Backend) {
    let f = b.fresh("reset").await;
    let n = numbers(4_070_000_000, 1);
    change(f.store.as_ref(), ChangeKind::Add, NATIONAL, &n).await;
    if !b.wipe(&f).await {
        return;
    }
    let looked = f.store.lookup(&n, OptOutSet::ALL).await;
    assert!(
        matches!(looked, Err(StoreError::NotInitialised(_))),
        "{looked:?}"
    );
    let feed = f
        .store
        .changes_after(Version::ZERO, 10, Duration::ZERO)
        .await;
    assert!(
        matches!(feed, Err(StoreError::NotInitialised(_))),
        "{feed:?}"
    );
    let bound = f.store.open_dataset().await;
    assert!(
        matches!(bound, Err(StoreError::NotInitialised(_))),
        "{bound:?}"
    );
}

/// A store that went back in time says so to a reader that saw more.
pub(super) async fn rollback_is_reported(b: &dyn Backend) {
    let f = b.fresh("rollback").await;
    let (v, _) = change(
        f.store.as_ref(),
        ChangeKind::Add,
        NATIONAL,
        &numbers(4_080_000_000, 1),
    )
    .await;
    if !b.roll_back(&f).await {
        return;
    }
    let feed = f
        .store
        .changes_after(v, 10, Duration::ZERO)
        .await
        .expect("feed");
    assert!(matches!(feed, Feed::Behind { .. }), "{feed:?}");
}

/// Invariant 9: the store proves its continuity, not just its version. A change this store saw
/// (here: acknowledged) that is lost from outside, after which another write puts the version
/// ahead again, fails every read with `Regressed` (writes still go through, so lost changes can
/// be restored), until the history is forgotten (an admin acknowledged the regression).
pub(super) async fn lost_history_is_reported(b: &dyn Backend) {
    let f = b.fresh("lost-history").await;
    let s = f.store.as_ref();
    let n = numbers(4_085_000_000, 3);
    let (v1, _) = change(s, ChangeKind::Add, NATIONAL, &n[..1]).await;
    let (v2, _) = change(s, ChangeKind::Add, NATIONAL, &n[1..2]).await;
    if !b.lose_change(&f, v2, v1).await {
        return;
    }
    let (v3, _) = change(s, ChangeKind::Add, TYPE1, &n[2..]).await;
    assert!(v3 > v2, "the store's version is ahead again: {v3} > {v2}");
    let lookup = s.lookup(&n, OptOutSet::ALL).await;
    assert!(
        matches!(lookup, Err(StoreError::Regressed(_))),
        "a lookup on a store that lost a change: {lookup:?}"
    );
    let feed = s.changes_after(v1, 10, Duration::ZERO).await;
    assert!(
        matches!(feed, Err(StoreError::Regressed(_))),
        "the feed of a store that lost a change: {feed:?}"
    );
    assert!(matches!(s.scan().await, Err(StoreError::Regressed(_))));
    s.forget_history();
    let found = s
        .lookup(&n, OptOutSet::ALL)
        .await
        .expect("lookup after acknowledgement");
    // (This loss took the log entry only: the record is still there.)
    assert_eq!(
        found.held,
        vec![set(&[NATIONAL]), set(&[NATIONAL]), set(&[TYPE1])]
    );
    assert!(matches!(
        s.changes_after(v1, 10, Duration::ZERO).await,
        Ok(Feed::Changes(_))
    ));
}
