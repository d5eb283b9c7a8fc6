//! Filter snapshots shared through Redis: a new replica loads the newest instead of scanning.

use redis::AsyncCommands;

use super::{RedisStore, scripts::store_error};
use crate::{core::Version, store::StoreError};

/// Bytes of a snapshot sent a command. The replica holds the snapshot once and at most this much
/// more in flight: sent as one argument, a snapshot was copied into the script's arguments, the
/// command and its encoding (at 5 M opt-outs a 10 MB snapshot raised the replica's RSS by 37 MiB,
/// past its 64 MiB bound).
const CHUNK: usize = 1 << 20;

/// How long a staged snapshot outlives a replica that stopped sending it.
const STAGING_TTL_MS: u64 = 120_000;

impl RedisStore {
    pub(super) async fn newest_snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let bound = self.bound()?;
        let bytes: Option<Vec<u8>> = self
            .conn()
            .get(self.key("snapshot"))
            .await
            .map_err(store_error)?;
        Ok(bytes.and_then(|mut b| {
            let id = bound.dataset.as_bytes();
            // The dataset id is dropped in place, not copied out of a second allocation.
            (b.len() > id.len() && &b[..id.len()] == id).then(|| {
                b.drain(..id.len());
                b
            })
        }))
    }

    /// Stages the snapshot (the dataset id, then the bytes) a chunk at a time under a key of its
    /// own, then `snapshot.lua` moves it into place if it is whole and the newest the store may
    /// hold, or drops it.
    pub(super) async fn put_snapshot(
        &self,
        version: Version,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let bound = self.bound()?;
        let staging = self.key(&format!("snapshot_staging:{}", uuid::Uuid::new_v4()));
        let mut conn = self.write_conn();
        let () = redis::cmd("SET")
            .arg(&staging)
            .arg(bound.dataset.as_bytes())
            .arg("PX")
            .arg(STAGING_TTL_MS)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        for chunk in bytes.chunks(CHUNK) {
            let _: i64 = redis::cmd("APPEND")
                .arg(&staging)
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
        }
        let placed: i64 = self
            .inner
            .scripts
            .snapshot
            .prepare_invoke()
            .key(self.key("marker"))
            .key(&staging)
            .arg(&self.inner.prefix)
            .arg(&bound.dataset)
            .arg(version.ms)
            .arg(version.seq)
            .arg(bound.dataset.len() + bytes.len())
            .invoke_async(&mut conn)
            .await
            .map_err(store_error)?;
        if placed < 0 {
            return Err(StoreError::Unavailable(
                "the staged filter snapshot was not whole when it was to be placed (it expired \
                 while being sent); not published"
                    .into(),
            ));
        }
        Ok(())
    }
}
