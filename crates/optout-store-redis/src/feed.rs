//! The change log as a feed: what a replica's filter reads to follow every change in order.

use std::time::Duration;

use redis::Value;

use super::{
    RedisStore,
    conn::FEED_BLOCK,
    reply::{array, int_of, numbers_csv, text_of, version_of},
    scripts::{changed, store_error},
};
use crate::{
    core::Version,
    store::{ChangeEntry, Feed, StoreError},
};

impl RedisStore {
    pub(super) async fn read_feed(
        &self,
        after: Version,
        max: usize,
        wait: Duration,
    ) -> Result<Feed, StoreError> {
        let bound = self.bound()?;
        let seen = self.must_hold()?;
        let block = u64::try_from(wait.min(FEED_BLOCK).as_millis()).unwrap_or(250);
        let mut read = redis::cmd("XREAD");
        read.arg("COUNT").arg(max.max(1));
        if block > 0 {
            read.arg("BLOCK").arg(block);
        }
        read.arg("STREAMS")
            .arg(self.key("log"))
            .arg(after.to_string());
        // The marker and the floor are read after the log, in the same round trip: if both still
        // hold once the entries are in hand, nothing between `after` and them was trimmed, and
        // they belong to the dataset this replica loaded.
        let mut pipe = redis::pipe();
        pipe.add_command(read)
            .hget(self.key("marker"), "dataset_id")
            .get(self.key("log_floor"))
            .get(self.key("version"))
            .hget(self.key("ids"), seen.unwrap_or(Version::ZERO).to_string());
        let sentinel = self.inner.layout.may_be_demoted();
        if sentinel {
            // Behind Sentinel, a connection may still reach a demoted master (now a replica that
            // lags): what it says of the version is not the store's, so ask who it is.
            pipe.cmd("ROLE");
        }
        let reply: Vec<Value> = pipe
            .query_async(&mut self.inner.feed.clone())
            .await
            .map_err(store_error)?;
        let mut reply = reply.into_iter();
        let mut next = || reply.next().unwrap_or(Value::Nil);
        let (entries, marker, floor, latest, held) = (next(), next(), next(), next(), next());
        if sentinel && array(next())?.first().and_then(text_of).as_deref() != Some("master") {
            self.reset_sentinel_conns();
            return Err(StoreError::Unavailable(
                "the Redis node Sentinel named is no longer the master; asking again".into(),
            ));
        }
        if text_of(&marker).as_deref() != Some(bound.dataset.as_str()) {
            return Err(changed());
        }
        let latest = version_of(&latest)?;
        // Continuity first: the store still holds what this replica saw (the version alone is no
        // proof: a restored store that took a write since is ahead again).
        self.prove_held(seen, !matches!(held, Value::Nil), latest)
            .await?;
        if after > latest {
            // The store is behind what this replica already read: Redis restarted from an older
            // snapshot, lost its last writes, or failed over to a replica that had not received
            // them. Never rebuilt from silently: the follower fails closed.
            return Ok(Feed::Behind { store: latest });
        }
        if after < version_of(&floor)? {
            return Ok(Feed::Trimmed);
        }
        Ok(Feed::Changes(entries_of(entries)?))
    }
}

/// The entries of an XREAD reply: `[[stream, [[id, [field, value, ...]], ...]]]` (RESP2), or nil
/// when nothing came within the block.
fn entries_of(entries: Value) -> Result<Vec<ChangeEntry>, StoreError> {
    let mut out = Vec::new();
    // XREAD reply: [[stream, [[id, [field, value, ...]], ...]]] (RESP2), or nil on timeout.
    for stream in array(entries)? {
        let mut parts = array(stream)?.into_iter();
        let _name = parts.next();
        for entry in array(parts.next().unwrap_or(Value::Nil))? {
            let mut e = array(entry)?.into_iter();
            let version = version_of(&e.next().unwrap_or(Value::Nil))?;
            let fields = array(e.next().unwrap_or(Value::Nil))?;
            let mut added = String::new();
            let mut removed = 0u64;
            let mut unlisted = false;
            for pair in fields.chunks(2) {
                match (pair.first().and_then(text_of).as_deref(), pair.get(1)) {
                    (Some("a"), Some(v)) => added = text_of(v).unwrap_or_default(),
                    (Some("r"), Some(v)) => {
                        removed = int_of(v).and_then(|i| u64::try_from(i).ok()).unwrap_or(0)
                    }
                    // An import too big to list its numbers (`swap.lua`).
                    (Some("u"), _) => unlisted = true,
                    _ => {}
                }
            }
            out.push(ChangeEntry {
                version,
                added: if unlisted {
                    Vec::new()
                } else {
                    numbers_csv(&added)?
                },
                removed,
                unlisted,
            });
        }
    }
    Ok(out)
}
