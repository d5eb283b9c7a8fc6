//! The consent store as the server and the CLI see it: the contract (the `optout-store` crate,
//! re-exported), the two backends (`optout-store-redis`, `optout-store-embedded`), and the one
//! place a backend is chosen: the configuration of a store, and `open`.

use std::sync::Arc;

pub use optout_store::*;
pub use optout_store_embedded as embedded;
pub use optout_store_redis as redis;

use crate::core::AuditKey;

/// Which consent store the server answers from.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// The embedded store (redb) in a directory: one replica, no Redis.
    Embedded {
        /// The data directory; created, with a new empty dataset, if it holds no database.
        data_dir: std::path::PathBuf,
        /// Change-log entries kept.
        change_log_len: u64,
        /// The database's page cache, in bytes.
        cache_bytes: usize,
    },
    /// The shared Redis store: one Redis, Sentinel's master, or a Cluster.
    Redis(redis::RedisConfig),
}

/// Whether [`open`] may make a new, empty embedded store where none is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    /// The server: a data directory without a database gets a new, empty dataset (said in the
    /// log).
    IfMissing,
    /// Tools that read a store (`audit verify`): a directory without one is an error.
    Never,
}

/// A store [`open`] chose and opened, and what it did.
pub struct OpenedStore {
    /// The store.
    pub store: Arc<dyn ConsentStore>,
    /// Whether a new, empty embedded dataset was initialised.
    pub created: bool,
    /// How to name it in messages.
    pub shown: String,
}

/// The one place a backend is chosen, for the server and the CLI: the embedded store opened (and
/// locked) now, so a data directory in use fails at once; Redis connected lazily. Records the
/// Redis store writes to the changes trail carry a MAC under `record_key`.
pub async fn open(
    config: &StoreConfig,
    record_key: Option<Arc<AuditKey>>,
    create: Create,
) -> Result<OpenedStore, StoreError> {
    match config {
        StoreConfig::Redis(redis) => {
            let redis = redis::RedisConfig {
                record_key,
                ..redis.clone()
            };
            Ok(OpenedStore {
                store: Arc::new(redis::RedisStore::connect(&redis)?),
                created: false,
                shown: format!(
                    "Redis store at {} (prefix {:?})",
                    redis.describe(),
                    redis.prefix
                ),
            })
        }
        StoreConfig::Embedded {
            data_dir,
            change_log_len,
            cache_bytes,
        } => {
            if create == Create::Never && !embedded::EmbeddedStore::exists_in(data_dir) {
                return Err(StoreError::NotInitialised(
                    format!("{}: no embedded store there", data_dir.display()).into(),
                ));
            }
            let (store, opened) = embedded::EmbeddedStore::open_async(embedded::EmbeddedConfig {
                data_dir: data_dir.clone(),
                change_log_len: *change_log_len,
                cache_bytes: *cache_bytes,
            })
            .await?;
            Ok(OpenedStore {
                store: Arc::new(store),
                created: opened == embedded::Opened::Initialised,
                shown: format!("embedded store in {}", data_dir.display()),
            })
        }
    }
}
