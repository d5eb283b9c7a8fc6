//! The store's counts and this replica's filter, as an admin sees them.

use super::{Admin, AdminError};
use crate::{filter::SyncStatus, store::StoreStatus};

/// What `status` reports: the store's counts and the filter's state.
pub struct Status {
    /// The store's counts, version and dataset.
    pub store: StoreStatus,
    /// Which store ("embedded", "redis").
    pub store_kind: &'static str,
    /// This replica's filter.
    pub filter: SyncStatus,
}

impl Admin {
    /// The store's counts and this replica's filter.
    pub async fn status(&self) -> Result<Status, AdminError> {
        Ok(Status {
            store: self.store.status().await?,
            store_kind: self.store.kind(),
            filter: self.filter.status(),
        })
    }
}
