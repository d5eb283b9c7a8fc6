//! The store's continuity, as this replica can prove it: every version the replica has seen the
//! store reach (a change it acknowledged, an entry of the change feed, the version a lookup or a
//! scan read) must still be in the store's history. A Redis restored from an older copy, or a
//! failover to a replica that lacked changes, loses some; and since versions are stream ids
//! taken from the clock, the next write puts the store's version *ahead* of what the replica saw
//! again, so comparing versions does not notice. Continuity does: the entry of the newest version
//! seen must still be there.
//!
//! Every log entry's id is also kept in a small hash (`ids`, trimmed with the log), so the proof
//! is one `HGET` in the same atomic step as each read (a lookup's transaction, the feed's
//! pipeline) or write (the change scripts): no entry's payload crosses the wire. An entry logged
//! before the hash existed is looked up in the log itself; one trimmed from the log proves
//! nothing either way (the replica then rebuilds from a scan anyway).
//!
//! Once the proof fails, the store stays broken for this replica until an admin acknowledges the
//! regression ([`crate::store::ConsentStore::forget_history`]): reads fail with
//! [`StoreError::Regressed`] (checks withhold, the follower fails closed); writes still go
//! through, so the operator can restore the lost changes before acknowledging.

use parking_lot::Mutex;
use redis::Value;

use super::{
    RedisStore,
    reply::{array, text_of, version_of},
    scripts::store_error,
};
use crate::{core::Version, store::StoreError};

/// What this replica saw of the store's history.
#[derive(Debug, Default)]
pub(super) struct Continuity {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The newest version seen.
    seen: Version,
    /// Why the store was found not to hold it, until acknowledged.
    broken: Option<String>,
}

impl Continuity {
    /// The newest version seen: what the next read or write must find still held.
    pub(super) fn seen(&self) -> Version {
        self.state.lock().seen
    }

    /// Records that the store reached `v`.
    pub(super) fn saw(&self, v: Version) {
        let mut s = self.state.lock();
        s.seen = s.seen.max(v);
    }

    /// Forgets what was seen (an admin acknowledged that the store lost some of it).
    pub(super) fn forget(&self) {
        *self.state.lock() = State::default();
    }

    /// The error reads fail with while the store is known to have lost history.
    pub(super) fn broken(&self) -> Result<(), StoreError> {
        match &self.state.lock().broken {
            Some(why) => Err(StoreError::Regressed(why.clone().into())),
            None => Ok(()),
        }
    }

    fn lose(&self, seen: Version, store: Version) -> StoreError {
        let why = format!(
            "this replica saw the store reach version {seen}, and the store no longer holds that \
             change (it is at {store}): changes were lost (a Redis restored from an older copy or \
             restarted from an older AOF or snapshot, or a failover to a replica that had not \
             received them)"
        );
        self.state.lock().broken = Some(why.clone());
        StoreError::Regressed(why.into())
    }
}

impl RedisStore {
    /// The newest version seen, for a write script to report on (`None`: nothing seen yet).
    pub(super) fn seen(&self) -> Option<Version> {
        let seen = self.inner.continuity.seen();
        (seen != Version::ZERO).then_some(seen)
    }

    /// The version whose entry the next read must find (`None`: nothing seen yet, nothing to
    /// prove), or the error if the store is already known to have lost history.
    pub(super) fn must_hold(&self) -> Result<Option<Version>, StoreError> {
        self.inner.continuity.broken()?;
        Ok(self.seen())
    }

    /// After a read that asked whether the store holds `seen` (`held`, from `HEXISTS` on the ids)
    /// and found the store at `version`: proves continuity, or finds it broken. The ids hash
    /// misses entries logged before it existed, so a miss is confirmed in the log itself.
    pub(super) async fn prove_held(
        &self,
        seen: Option<Version>,
        held: bool,
        version: Version,
    ) -> Result<(), StoreError> {
        if let Some(seen) = seen
            && !held
            && !self.in_log(seen).await?
        {
            if self.inner.layout.may_be_demoted() && !self.still_master().await? {
                // Behind Sentinel, a connection may still reach a demoted master (a replica now,
                // perhaps lagging): what it lacks says nothing of the store. Ask again.
                self.reset_sentinel_conns();
                return Err(StoreError::Unavailable(
                    "the Redis node Sentinel named is no longer the master; asking again".into(),
                ));
            }
            return Err(self.inner.continuity.lose(seen, version));
        }
        self.inner.continuity.broken()?;
        self.inner.continuity.saw(version);
        Ok(())
    }

    /// After a write script that reported whether the store still held what this replica had
    /// seen: the write happened either way (so an operator can restore lost changes through any
    /// replica), but a store that lost history is remembered as broken.
    pub(super) fn wrote(&self, seen: Option<Version>, held: bool, version: Version) {
        match seen {
            Some(seen) if !held => {
                let e = self.inner.continuity.lose(seen, version);
                tracing::error!(error = %e, "a change was applied to a store that lost changes");
            }
            _ => self.inner.continuity.saw(version),
        }
    }

    /// Whether the node this store's connections reach says it is a master (`ROLE`).
    async fn still_master(&self) -> Result<bool, StoreError> {
        let role: Value = redis::cmd("ROLE")
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        Ok(array(role)?.first().and_then(text_of).as_deref() == Some("master"))
    }

    /// Whether the change log holds the entry `v`, or was trimmed past it (no proof either way).
    async fn in_log(&self, v: Version) -> Result<bool, StoreError> {
        let id = v.to_string();
        let (entry, floor): (Value, Value) = redis::pipe()
            .cmd("XRANGE")
            .arg(self.key("log"))
            .arg(&id)
            .arg(&id)
            .arg("COUNT")
            .arg(1)
            .get(self.key("log_floor"))
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        Ok(!array(entry)?.is_empty() || v <= version_of(&floor)?)
    }
}
