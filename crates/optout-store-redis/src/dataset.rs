//! The dataset marker: initialising a store, binding a replica to the dataset it holds, its
//! counts, and admins' acknowledgements that it went back in time.

use std::{collections::HashMap, sync::Arc};

use crate::core::coverage::CoverageMode;

use redis::{AsyncCommands, Value};

use super::{
    Bound, RedisStore,
    reply::version_of,
    safety::check_eviction_policy,
    scripts::{changed, not_initialised, store_error},
};
use crate::{
    core::AuditRecord,
    store::{StoreError, StoreStatus, now_ms, random_hex},
};

impl RedisStore {
    /// Initialises an empty store: writes the dataset marker. Refuses a store that has one.
    pub async fn init(&self, buckets: u64) -> Result<String, StoreError> {
        self.init_with(buckets, CoverageMode::List).await
    }

    /// [`RedisStore::init`] in a national coverage mode (list: a complete national list will be
    /// imported; population: the results of national checks of a population will).
    pub async fn init_with(&self, buckets: u64, mode: CoverageMode) -> Result<String, StoreError> {
        self.init_owned(buckets, mode, None).await
    }

    /// [`RedisStore::init_with`] naming the organisation a population-mode store belongs to.
    pub async fn init_owned(
        &self,
        buckets: u64,
        mode: CoverageMode,
        owner: Option<&str>,
    ) -> Result<String, StoreError> {
        self.eviction_policy_ok().await?;
        self.persistence_ok().await?;
        let id = random_hex::<16>();
        let layout = &self.inner.layout;
        let tags = layout.new_shards();
        layout.prepare_init(self, &tags, &id).await?;
        let mut inv = self.inner.scripts.init.prepare_invoke();
        inv.key(self.key("marker"))
            .arg(&self.inner.prefix)
            .arg(&id)
            .arg(buckets.max(1))
            .arg(now_ms())
            .arg(tags.join(","))
            .arg(mode.name())
            .arg(owner.unwrap_or_default());
        let created: i64 = self.invoke_durable(&inv, &mut self.write_conn()).await?;
        if created == 0 {
            return Err(self.already_initialised());
        }
        layout.finish_init(self, &tags, &id).await?;
        Ok(id)
    }

    /// `init` on a store that holds a dataset.
    pub(super) fn already_initialised(&self) -> StoreError {
        StoreError::ImportRefused(
            format!(
                "the Redis store under prefix {:?} is already initialised; nothing was changed",
                self.inner.data_prefix
            )
            .into(),
        )
    }

    /// Binds to the dataset the store holds, once it is safe to answer from.
    pub(super) async fn bind(&self) -> Result<String, StoreError> {
        type Marker = (Option<String>, Option<u64>, Option<String>, String);
        let (id, buckets, shards, memory): Marker = redis::pipe()
            .hget(self.key("marker"), "dataset_id")
            .hget(self.key("marker"), "buckets")
            .hget(self.key("marker"), "shards")
            .cmd("INFO")
            .arg("memory")
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        let mut safe = check_eviction_policy(&memory);
        if safe.is_ok() {
            safe = self.persistence_ok().await;
        }
        if let Err(e) = safe {
            *self.inner.bound.write() = None;
            return Err(e);
        }
        let (Some(dataset), Some(buckets)) = (id, buckets) else {
            *self.inner.bound.write() = None;
            return Err(not_initialised());
        };
        let shards: Vec<String> = shards
            .filter(|s| !s.is_empty())
            .map(|s| s.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        if let Err(e) = self.inner.layout.check_binding(self, &shards).await {
            *self.inner.bound.write() = None;
            return Err(e);
        }
        *self.inner.bound.write() = Some(Bound {
            dataset: dataset.clone(),
            buckets: buckets.max(1),
            shards: Arc::new(shards),
        });
        Ok(dataset)
    }

    /// Counts, version and marker.
    pub(super) async fn counts(&self) -> Result<StoreStatus, StoreError> {
        let bound = self.bound()?;
        let (marker, version, counts): (Option<String>, Value, HashMap<String, i64>) =
            redis::pipe()
                .hget(self.key("marker"), "dataset_id")
                .get(self.key("version"))
                .hgetall(self.key("counts"))
                .query_async(&mut self.conn())
                .await
                .map_err(store_error)?;
        if marker.as_deref() != Some(bound.dataset.as_str()) {
            return Err(changed());
        }
        let count = |k: &str| u64::try_from(counts.get(k).copied().unwrap_or(0)).unwrap_or(0);
        Ok(StoreStatus {
            national: count("1"),
            type1: count("2"),
            patients: count("patients"),
            version: version_of(&version)?,
            dataset_id: bound.dataset,
        })
    }

    /// The newest acknowledgement that the store went back in time.
    pub(super) async fn ack_id(&self) -> Result<Option<String>, StoreError> {
        self.conn()
            .get(self.key("regression_ack"))
            .await
            .map_err(store_error)
    }

    /// Records an acknowledgement that the store went back in time, with its audit record.
    pub(super) async fn record_ack(&self, audit: &AuditRecord) -> Result<String, StoreError> {
        let bound = self.bound()?;
        let id = random_hex::<16>();
        let mut inv = self.inner.scripts.acknowledge.prepare_invoke();
        inv.key(self.key("marker"))
            .arg(&self.inner.prefix)
            .arg(&bound.dataset)
            .arg(&id);
        let (json, mac) = self.signed_record(audit)?;
        inv.arg(json).arg(mac);
        self.invoke_durable(&inv, &mut self.write_conn()).await
    }
}
