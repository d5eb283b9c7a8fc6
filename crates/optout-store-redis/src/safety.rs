//! Whether this Redis can be trusted with opt-outs: it must not evict them when full, must not
//! lose an acknowledged change in a crash, and (behind Sentinel) must still be the master. Checked
//! when the dataset is opened and every few seconds by the filter follower.

use redis::Value;

use super::{
    RedisStore,
    reply::{array, text_of, texts_of},
    scripts::store_error,
};
use crate::store::StoreError;

/// Refuses a Redis that may evict keys without an expiry when it runs out of memory.
///
/// With `allkeys-lru`, `allkeys-lfu` or `allkeys-random`, a full Redis silently deletes opt-out
/// records; a deleted record answers "no opt-out" and the patient's data would be released. The
/// `volatile-*` policies evict only keys with an expiry (none of the opt-out data has one) and
/// `noeviction` refuses writes instead; both fail closed. Read from `INFO memory`, which managed
/// Redis services keep even where they disable `CONFIG`. Checked whenever the dataset is opened
/// (start, and after the store was reset) and every few seconds by the filter follower.
pub(super) fn check_eviction_policy(info_memory: &str) -> Result<(), StoreError> {
    let policy = info_memory
        .lines()
        .find_map(|l| l.trim().strip_prefix("maxmemory_policy:"))
        .map(str::trim);
    match policy {
        Some(p) if p.starts_with("allkeys-") => Err(StoreError::Unsafe(
            format!(
                "Redis maxmemory-policy is {p}: a full Redis would evict opt-out records and their \
             patients' data would be released; set maxmemory-policy to noeviction"
            )
            .into(),
        )),
        Some(_) => Ok(()),
        None => Err(StoreError::Unsafe(
            "Redis INFO memory does not say maxmemory_policy, so evicting opt-out records \
             cannot be ruled out; refusing to serve"
                .into(),
        )),
    }
}

/// The advice every refusal of Redis persistence ends with.
const DURABILITY_ADVICE: &str = "set `appendonly yes` and `appendfsync always` (redis.conf, or \
     CONFIG SET appendonly yes, CONFIG SET appendfsync always, CONFIG REWRITE), or run Redis behind \
     Sentinel or as a Cluster with --redis-replicas-ack 1 or more; on a managed Redis that hides \
     CONFIG but keeps every acknowledged write (see docs/src/guarantees.md), pass \
     --redis-assume-durable";

/// Refuses persistence that could lose an acknowledged change when the Redis process crashes.
///
/// `pairs` is the flattened reply of `CONFIG GET append*` (one list per master in a cluster).
/// Only the append-only file with an fsync before every reply keeps each acknowledged write:
/// RDB snapshots lose everything since the last one, `appendfsync everysec` up to a second, and
/// a replica that loads the older data then reads as "no opt-out" for the lost changes.
fn check_persistence(pairs: &[String]) -> Result<(), StoreError> {
    let values = |name: &str| -> Vec<&str> {
        pairs
            .chunks(2)
            .filter(|p| p.first().map(String::as_str) == Some(name))
            .filter_map(|p| p.get(1).map(String::as_str))
            .collect()
    };
    let (aof, fsync) = (values("appendonly"), values("appendfsync"));
    let durable = !aof.is_empty()
        && !fsync.is_empty()
        && aof.iter().all(|v| v.eq_ignore_ascii_case("yes"))
        && fsync.iter().all(|v| v.eq_ignore_ascii_case("always"));
    if durable {
        return Ok(());
    }
    Err(StoreError::Unsafe(format!(
        "Redis could lose an acknowledged opt-out change in a crash (appendonly {}, appendfsync \
         {}), and a replica would then release that patient: {DURABILITY_ADVICE}",
        if aof.is_empty() {
            "unknown".into()
        } else {
            aof.join("/")
        },
        if fsync.is_empty() {
            "unknown".into()
        } else {
            fsync.join("/")
        },
    ).into()))
}

impl RedisStore {
    /// Whether an acknowledged change survives the crash of the Redis process that took it:
    /// replicas confirm every change (Sentinel, Cluster), or the operator vouches for it, or the
    /// append-only file is fsynced before every reply.
    pub(super) async fn persistence_ok(&self) -> Result<(), StoreError> {
        if self.inner.replicas_ack > 0 || self.inner.assume_durable {
            return Ok(());
        }
        let reply: Value = redis::cmd("CONFIG")
            .arg("GET")
            .arg("append*")
            .query_async(&mut self.conn())
            .await
            .map_err(|e| {
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    // Not an answer about persistence: the store is unreachable for now.
                    return store_error(e);
                }
                StoreError::Unsafe(
                    format!(
                        "cannot read Redis persistence settings (CONFIG GET: {e}), so losing \
                     acknowledged opt-out changes in a crash cannot be ruled out: \
                     {DURABILITY_ADVICE}"
                    )
                    .into(),
                )
            })?;
        check_persistence(&texts_of(reply))
    }

    /// Reads the eviction policy (see [`check_eviction_policy`]).
    pub(super) async fn eviction_policy_ok(&self) -> Result<(), StoreError> {
        // In a cluster INFO goes to every master and the answer holds one text per master.
        let memory: Value = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        let texts = texts_of(memory);
        if texts.is_empty() {
            return check_eviction_policy("");
        }
        texts.iter().try_for_each(|t| check_eviction_policy(t))
    }

    pub(super) async fn safe_now(&self) -> Result<(), StoreError> {
        let safe = match self.eviction_policy_ok().await {
            Ok(()) => self.persistence_ok().await,
            Err(e) => Err(e),
        };
        safe.inspect_err(|e| {
            if matches!(e, StoreError::Unsafe(_)) {
                *self.inner.bound.write() = None;
            }
        })?;
        if self.inner.layout.may_be_demoted() {
            // Sentinel closes clients' connections when it demotes a master, but do not rely on
            // it: a connection to a node that is no longer the master is dropped here, so no read
            // is served from a replica that may lag.
            let role: Value = redis::cmd("ROLE")
                .query_async(&mut self.conn())
                .await
                .map_err(store_error)?;
            let is_master = array(role)?.first().and_then(text_of).as_deref() == Some("master");
            if !is_master {
                self.reset_sentinel_conns();
                return Err(StoreError::Unavailable(
                    "the Redis node Sentinel named is no longer the master; asking again".into(),
                ));
            }
        }
        Ok(())
    }
}
