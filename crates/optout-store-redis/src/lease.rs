//! An import's lock on its type, held as a lease: renewed in the background while the import is
//! applied, lapsing soon after a replica that held it dies.

use super::{RedisStore, scripts::store_error};
use crate::store::{StoreError, random_hex};

/// How long an import's lock lasts unless renewed. Changes of the type wait while it is held, so
/// a replica that dies while it applies an import holds them back this long at most, not for
/// as long as a lock without renewal must last to cover the biggest import (ten minutes before).
const LOCK_LEASE_MS: u64 = 10_000;
/// How often the lease is renewed while the import is applied.
const LOCK_RENEW: std::time::Duration = std::time::Duration::from_millis(2_000);

/// An import's lock on its type, renewed in the background while held. Dropping it (the import
/// swapped in, failed, or its call was cut off) stops the renewal and deletes the lock if it is
/// still ours; a process that dies stops renewing and the lock lapses within the lease.
pub(super) struct LockLease {
    store: RedisStore,
    key: String,
    /// Ours alone: the swap and the unlock check it, so a lapsed lease taken over is never undone.
    pub(super) token: String,
    renew: tokio::task::JoinHandle<()>,
}

impl LockLease {
    /// Takes the lock at `key`, or `None` if another import holds it.
    pub(super) async fn take(
        store: &RedisStore,
        key: String,
    ) -> Result<Option<LockLease>, StoreError> {
        let token = random_hex::<8>();
        let locked: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(LOCK_LEASE_MS)
            .query_async(&mut store.write_conn())
            .await
            .map_err(store_error)?;
        if locked.is_none() {
            return Ok(None);
        }
        let renew = {
            let (store, key, token) = (store.clone(), key.clone(), token.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(LOCK_RENEW).await;
                    // A renewal that fails is retried; if the lease lapses meanwhile, the swap
                    // finds the lock gone (or another's) and refuses: nothing is half-applied.
                    let renewed: Result<i64, _> = store
                        .inner
                        .scripts
                        .renew
                        .prepare_invoke()
                        .key(&key)
                        .arg(&key)
                        .arg(&token)
                        .arg(LOCK_LEASE_MS)
                        .invoke_async(&mut store.write_conn())
                        .await;
                    if matches!(renewed, Ok(0)) {
                        break; // not ours any more
                    }
                }
            })
        };
        Ok(Some(LockLease {
            store: store.clone(),
            key,
            token,
            renew,
        }))
    }
}

impl Drop for LockLease {
    fn drop(&mut self) {
        self.renew.abort();
        // Deletes the lock if still ours (the swap deletes it itself); off the caller's path, and
        // best effort: if it cannot run, the lease lapses.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, key, token) = (self.store.clone(), self.key.clone(), self.token.clone());
        runtime.spawn(async move {
            let _: Result<i64, _> = store
                .inner
                .scripts
                .unlock
                .prepare_invoke()
                .key(&key)
                .arg(&key)
                .arg(&token)
                .invoke_async(&mut store.write_conn())
                .await;
        });
    }
}
