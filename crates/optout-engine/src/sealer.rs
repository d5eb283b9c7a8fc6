//! Sealing and verifying the changes trail (the scheme: `optout_core::seals`).
//!
//! Every replica with an audit key runs [`run`]: each interval it seals the records written since
//! the last seal. Replicas race harmlessly: a seal is appended only if the last one is still the
//! one it follows, so the loser reads the new last seal and seals what is left, if anything.
//! [`verify`] walks the seals and the records of any store, page by page.

use std::time::Duration;

use crate::{
    core::{
        AuditKey,
        seals::{
            ChangesError, ChangesReport, ChangesSeal, SEAL_MAX_RECORDS, Verifier, id_order,
            record_hash,
        },
        trail::{self, ChainHead},
    },
    store::{AuditTrail, StoreError, Stored, StoredEntry},
};

/// Entries read from the store at once while verifying.
const PAGE: usize = 64;

fn corrupt_seal(id: &str, why: &str) -> StoreError {
    StoreError::Corrupt(format!("the last seal of the changes trail ({id}) {why}").into())
}

/// Where the seals stand: the last seal's chain head and the id of the last record it covers.
fn sealed_head(last: Option<&StoredEntry>) -> Result<(ChainHead, Option<String>), StoreError> {
    let Some(e) = last else {
        return Ok((ChainHead::START, None));
    };
    let line = std::str::from_utf8(&e.bytes).map_err(|_| corrupt_seal(&e.id, "is not text"))?;
    let hash = trail::line_hash(line).ok_or_else(|| corrupt_seal(&e.id, "is not a sealed line"))?;
    let (seq, seal) = trail::open_line::<ChangesSeal>(line)
        .ok_or_else(|| corrupt_seal(&e.id, "does not list records"))?;
    Ok((ChainHead { seq, hash }, seal.upto().map(str::to_string)))
}

/// Records read at once while sealing: an import's parts are about 110 KB each, so a page stays
/// a few MB.
const SEAL_PAGE: usize = 16;

/// The next seal's records after `upto`: ids and hashes of up to [`SEAL_MAX_RECORDS`], read a
/// small page at a time. A record whose MAC does not verify under `key` (or that lacks one where
/// the store writes them) is left out, and its id added to `refused`: no seal ever vouches for a
/// record no replica wrote (issue 27 item 7).
async fn next_records(
    store: &dyn AuditTrail,
    key: &AuditKey,
    upto: Option<String>,
    refused: &mut Vec<String>,
) -> Result<Vec<(String, String)>, StoreError> {
    let mut records = Pages::new(Stored::Records, upto, SEAL_PAGE);
    let mut out = Vec::new();
    while out.len() < SEAL_MAX_RECORDS {
        let Some(r) = records.next(store).await? else {
            break;
        };
        if !r.mac.sealable(key) {
            if !refused.contains(&r.id) {
                refused.push(r.id);
            }
            continue;
        }
        let hash = record_hash(&r.bytes);
        out.push((r.id, hash));
    }
    Ok(out)
}

/// What one sealing pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sealed {
    /// Records sealed.
    pub records: u64,
    /// Records left out: no valid MAC (written around the service, or by a replica without the
    /// audit key). `optout audit verify-changes` names them.
    pub refused: Vec<String>,
}

/// Seals every record written since the last seal; returns how many this call sealed.
pub async fn seal_pending(store: &dyn AuditTrail, key: &AuditKey) -> Result<u64, StoreError> {
    Ok(seal_pass(store, key).await?.records)
}

/// Seals every record written since the last seal that carries a valid MAC.
pub async fn seal_pass(store: &dyn AuditTrail, key: &AuditKey) -> Result<Sealed, StoreError> {
    let mut sealed = 0u64;
    let mut refused = Vec::new();
    loop {
        let (head, upto) = sealed_head(store.last_seal().await?.as_ref())?;
        let records = next_records(store, key, upto, &mut refused).await?;
        if records.is_empty() {
            return Ok(Sealed {
                records: sealed,
                refused,
            });
        }
        let seal = ChangesSeal { records };
        let (line, next) = trail::seal(head, &seal, key)
            .map_err(|e| StoreError::Corrupt(format!("a seal cannot be written: {e}").into()))?;
        if store.append_seal(head.seq, &line).await? {
            sealed += seal.records.len() as u64;
            let link = trail::hex(&next.hash[..8]);
            // The log line is an anchor outside the store: a trail cut back past it shows.
            tracing::info!(
                seal = next.seq,
                records = seal.records.len(),
                upto = seal.upto().unwrap_or_default(),
                link = %link,
                "changes trail sealed"
            );
        }
        // Lost the race: another replica sealed; read its seal and go on from there.
    }
}

/// Seals the changes trail every `interval` until the task is dropped.
pub async fn run(store: std::sync::Arc<dyn AuditTrail>, key: AuditKey, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Refused records already reported: each is logged once, not every interval.
    let mut reported = std::collections::HashSet::new();
    loop {
        tick.tick().await;
        match seal_pass(store.as_ref(), &key).await {
            Ok(s) => {
                for id in s.refused {
                    if reported.len() > 10_000 {
                        reported.clear();
                    }
                    if reported.insert(id.clone()) {
                        tracing::error!(
                            record = %id,
                            "a record of the changes trail carries no valid MAC under the audit \
                             key: not sealed (written around the service, or by a replica \
                             without this audit key); `optout audit verify-changes` names it"
                        );
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot seal the changes trail; retrying"),
        }
    }
}

/// Verifies the changes trail of `store` under `key`: `Ok(Err(..))` names what is wrong with it.
pub async fn verify(
    store: &dyn AuditTrail,
    key: &AuditKey,
) -> Result<Result<ChangesReport, ChangesError>, StoreError> {
    let mut v = Verifier::new(key);
    let mut seals = Pages::new(Stored::Seals, None, PAGE);
    let mut records = Pages::new(Stored::Records, None, PAGE);
    while let Some(r) = records.next(store).await? {
        let order = id_order(&r.id).unwrap_or((u64::MAX, u64::MAX));
        while v.wants_seal(order) {
            match seals.next(store).await? {
                Some(s) => {
                    if let Err(e) = v.seal(&String::from_utf8_lossy(&s.bytes)) {
                        return Ok(Err(e));
                    }
                }
                None => v.seals_done(),
            }
        }
        if let Err(e) = v.record(&r.id, &r.bytes, &r.mac) {
            return Ok(Err(e));
        }
    }
    while let Some(s) = seals.next(store).await? {
        if let Err(e) = v.seal(&String::from_utf8_lossy(&s.bytes)) {
            return Ok(Err(e));
        }
    }
    Ok(v.finish())
}

/// One part of the changes trail read a page at a time, after an id.
struct Pages {
    part: Stored,
    size: usize,
    page: std::vec::IntoIter<StoredEntry>,
    after: Option<String>,
    done: bool,
}

impl Pages {
    fn new(part: Stored, after: Option<String>, size: usize) -> Self {
        Pages {
            part,
            size,
            page: Vec::new().into_iter(),
            after,
            done: false,
        }
    }

    async fn next(&mut self, store: &dyn AuditTrail) -> Result<Option<StoredEntry>, StoreError> {
        if let Some(e) = self.page.next() {
            return Ok(Some(e));
        }
        if self.done {
            return Ok(None);
        }
        let page = store
            .stored(self.part, self.after.as_deref(), self.size)
            .await?;
        self.done = page.len() < self.size;
        self.after = page.last().map(|e| e.id.clone()).or(self.after.take());
        self.page = page.into_iter();
        Ok(self.page.next())
    }
}
