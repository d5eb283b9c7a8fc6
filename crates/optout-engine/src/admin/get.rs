//! One patient's opt-outs, looked up by an admin; the look-up is recorded first.

use super::{Admin, AdminError};
use crate::{
    core::{NhsNumber, Version, keys::Caller},
    store::OptOutRecord,
};

impl Admin {
    /// The opt-outs recorded for one number. The look-up is recorded first (who looked up which
    /// patient, by digest): if it cannot be recorded, nothing is shown.
    pub async fn get(
        &self,
        caller: &Caller,
        n: NhsNumber,
    ) -> Result<(Vec<OptOutRecord>, Version), AdminError> {
        self.record_access(caller, "get", Some(n)).await?;
        Ok(self.store.get(n).await?)
    }
}
