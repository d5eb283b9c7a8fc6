//! Acknowledged means replicated: a change is acknowledged only once the replicas asked for have
//! confirmed it (`WAIT`), so a failover cannot lose it.

use redis::{FromRedisValue, ScriptInvocation, Value};

use super::{RedisStore, conn::Conn, scripts::store_error};
use crate::store::{Cause, StoreError};

impl RedisStore {
    /// Runs a script that changes opt-outs; when replicas must confirm it, the layout waits for
    /// them (see [`super::layout::Layout::run_durable`]). A change that too few replicas confirmed
    /// in time is applied on the master but is not acknowledged: a failover now could lose it, so
    /// the caller gets an error and retries (changes are idempotent).
    pub(super) async fn invoke_durable<T: FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
        conn: &mut Conn,
    ) -> Result<T, StoreError> {
        let value: Value = if self.inner.replicas_ack == 0 {
            inv.invoke_async(conn).await.map_err(store_error)?
        } else {
            self.inner.layout.run_durable(self, inv, conn).await?
        };
        T::from_redis_value(value)
            .map_err(|e| StoreError::Unavailable(format!("redis: {e}").into()))
    }

    pub(super) fn ack_timeout_ms(&self) -> u64 {
        u64::try_from(self.inner.replicas_ack_timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// `acked` replicas answered `WAIT`: an error unless that is enough to acknowledge.
    pub(super) fn enough_acks(&self, acked: i64) -> Result<(), StoreError> {
        let want = self.inner.replicas_ack;
        if acked >= i64::from(want) {
            return Ok(());
        }
        Err(StoreError::Unconfirmed(
            format!(
                "the change was applied on the Redis master(s) but only {acked} of {want} replicas \
             confirmed it within {} ms, so a failover now could lose it; it is not acknowledged: \
             retry (changes are idempotent)",
                self.ack_timeout_ms()
            )
            .into(),
        ))
    }

    /// In a cluster: waits until every master's replicas confirmed this client's writes to it.
    /// `WAIT` without a key goes to every master and answers the smallest count.
    pub(super) async fn confirm_everywhere(&self) -> Result<(), StoreError> {
        let want = self.inner.replicas_ack;
        if want == 0 {
            return Ok(());
        }
        let acked: i64 = redis::cmd("WAIT")
            .arg(want)
            .arg(self.ack_timeout_ms())
            .query_async(&mut self.write_conn())
            .await
            .map_err(|e| {
                // WAIT goes to every master; one that cannot answer (down, failing over) fails
                // the whole of it (the crate reports "expected array of integers"). The change
                // is applied and not confirmed: the caller must retry.
                StoreError::Unconfirmed(Cause::with_source(
                    format!(
                        "the change was applied but not every master's replicas could confirm it \
                         ({e}); a failover could lose it, retry"
                    ),
                    e,
                ))
            })?;
        self.enough_acks(acked)
    }
}
