//! What the lists cover and how old they are: the `coverage` hash (mode, version, each type's
//! date, the population's size) and the `population` string (the checked population, roaring-
//! serialised), both under the meta prefix (one hash slot in a cluster) and changed together by
//! the import swap script.

use std::collections::HashMap;

use super::{RedisStore, scripts::store_error};
use crate::{
    core::coverage::{Coverage, CoverageMeta, CoverageMode},
    store::StoreError,
};

impl RedisStore {
    /// The coverage, the hash and the population read in one MULTI (one consistent state).
    pub(super) async fn read_coverage(&self) -> Result<Coverage, StoreError> {
        self.bound()?;
        type Read = (
            HashMap<String, String>,
            Option<Vec<u8>>,
            std::collections::BTreeMap<String, u64>,
        );
        let (fields, population, practices): Read = redis::pipe()
            .atomic()
            .hgetall(self.key("coverage"))
            .get(self.key("population"))
            .hgetall(self.key("t1_practices"))
            .query_async(&mut self.write_conn())
            .await
            .map_err(store_error)?;
        let corrupt = |what: &str| StoreError::Corrupt(format!("coverage: {what}").into());
        let ms = |field: &str| -> Result<Option<u64>, StoreError> {
            fields
                .get(field)
                .map(|v| v.parse::<u64>().map_err(|_| corrupt(field)))
                .transpose()
        };
        let meta = CoverageMeta {
            mode: self.mode_of(&fields)?,
            version: fields.get("version").cloned().unwrap_or_default(),
            national_as_of_ms: ms("as_of:1")?,
            type1_as_of_ms: ms("as_of:2")?,
            population_len: ms("population_len")?.unwrap_or(0),
            owner: fields.get("owner").cloned(),
            type1_practices: practices,
        };
        Coverage::from_stored(&meta, population.as_deref())
            .map_err(|e| StoreError::Corrupt(e.into()))
    }

    /// The national coverage mode, fixed when the store was initialised (list for a store made
    /// before modes existed).
    pub(super) async fn read_coverage_mode(&self) -> Result<CoverageMode, StoreError> {
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.key("coverage"))
            .query_async(&mut self.write_conn())
            .await
            .map_err(store_error)?;
        self.mode_of(&fields)
    }

    /// The national list's date (`None`: never imported whole).
    pub(super) async fn read_national_as_of(&self) -> Result<Option<u64>, StoreError> {
        let at: Option<String> = redis::cmd("HGET")
            .arg(self.key("coverage"))
            .arg("as_of:1")
            .query_async(&mut self.write_conn())
            .await
            .map_err(store_error)?;
        at.map(|v| {
            v.parse::<u64>()
                .map_err(|_| StoreError::Corrupt("coverage: as_of:1".into()))
        })
        .transpose()
    }

    fn mode_of(&self, fields: &HashMap<String, String>) -> Result<CoverageMode, StoreError> {
        match fields.get("mode") {
            None => Ok(CoverageMode::List),
            Some(m) => CoverageMode::parse(m)
                .ok_or_else(|| StoreError::Corrupt(format!("coverage: unknown mode {m:?}").into())),
        }
    }
}
