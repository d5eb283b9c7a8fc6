//! Filter snapshots shared through Redis: a new replica loads the newest instead of scanning.

use redis::AsyncCommands;

use super::{RedisStore, scripts::store_error};
use crate::{core::Version, store::StoreError};

impl RedisStore {
    pub(super) async fn newest_snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let bound = self.bound()?;
        let bytes: Option<Vec<u8>> = self
            .conn()
            .get(self.key("snapshot"))
            .await
            .map_err(store_error)?;
        Ok(bytes.and_then(|b| {
            let id = bound.dataset.as_bytes();
            (b.len() > id.len() && &b[..id.len()] == id).then(|| b[id.len()..].to_vec())
        }))
    }

    pub(super) async fn put_snapshot(
        &self,
        version: Version,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let bound = self.bound()?;
        let mut value = Vec::with_capacity(bound.dataset.len() + bytes.len());
        value.extend_from_slice(bound.dataset.as_bytes());
        value.extend_from_slice(bytes);
        let _: i64 = self
            .inner
            .scripts
            .snapshot
            .prepare_invoke()
            .key(self.key("marker"))
            .arg(&self.inner.prefix)
            .arg(&bound.dataset)
            .arg(version.ms)
            .arg(version.seq)
            .arg(value)
            .invoke_async(&mut self.write_conn())
            .await
            .map_err(store_error)?;
        Ok(())
    }
}
