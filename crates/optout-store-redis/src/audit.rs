//! The audit trails in Redis: `changes` (every admin change, written by the change's own script,
//! and every admin read; never trimmed by count) and `audit` (check records, appended in batches,
//! trimmed past `--redis-audit-len`). Reads merge both.

use redis::Value;

use super::{
    RedisStore,
    reply::{array, audit_json, text_of},
    scripts::{changed, store_error},
};
use crate::{
    core::{AuditQuery, AuditRecord, Version},
    store::{RecordMac, StoreError, Stored, StoredEntry},
};

/// The stream of seals over the changes trail.
pub(super) const SEALS: &str = "changes_seals";

impl RedisStore {
    /// Appends check records to the checks trail, trimmed past `--redis-audit-len`.
    pub(super) async fn append_records(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        self.append_to("audit", Some(self.inner.audit_len), records)
            .await
    }

    /// Records an admin's read (a patient looked up, the audit read) in the changes trail, which
    /// check traffic never trims.
    pub(super) async fn append_access(&self, record: &AuditRecord) -> Result<(), StoreError> {
        self.append_to("changes", None, std::slice::from_ref(record))
            .await
    }

    /// Appends records to one trail in MULTI/EXEC: whole or not at all, and only while the marker
    /// holds; trimmed to about `maxlen` when given.
    async fn append_to(
        &self,
        stream: &str,
        maxlen: Option<u64>,
        records: &[AuditRecord],
    ) -> Result<(), StoreError> {
        let bound = self.bound()?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.hget(self.key("marker"), "dataset_id");
        for r in records {
            let xadd = pipe.cmd("XADD").arg(self.key(stream));
            if let Some(len) = maxlen {
                xadd.arg("MAXLEN").arg("~").arg(len);
            }
            xadd.arg("*");
            // The changes trail's records carry their MAC; check records are sealed on their own.
            if stream == "changes" {
                self.push_record(xadd, r)?;
            } else {
                xadd.arg("r").arg(audit_json(r)?);
            }
            xadd.arg("v").arg(&r.version).ignore();
        }
        let (marker,): (Option<String>,) = pipe
            .query_async(&mut self.write_conn())
            .await
            .map_err(store_error)?;
        if marker.as_deref() != Some(bound.dataset.as_str()) {
            return Err(changed());
        }
        Ok(())
    }

    /// Records of both trails (changes and checks), oldest first, merged by their stream ids.
    pub(super) async fn read_records(
        &self,
        query: &AuditQuery,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.bound()?;
        let changes = self.read_stream("changes", query).await?;
        let checks = self.read_stream("audit", query).await?;
        let mut all: Vec<(Version, AuditRecord)> = changes.into_iter().chain(checks).collect();
        all.sort_by_key(|(id, _)| *id);
        all.truncate(query.limit.max(1));
        Ok(all.into_iter().map(|(_, r)| r).collect())
    }

    /// The first `query.limit` matching records of one stream, with their stream ids.
    async fn read_stream(
        &self,
        stream: &str,
        query: &AuditQuery,
    ) -> Result<Vec<(Version, AuditRecord)>, StoreError> {
        let mut out = Vec::new();
        let mut start = format!("{}-0", query.from_ms.max(0));
        let end = if query.to_ms <= 0 {
            "+".to_string()
        } else {
            format!("{}-{}", query.to_ms, u64::MAX)
        };
        loop {
            let page: Value = redis::cmd("XRANGE")
                .arg(self.key(stream))
                .arg(&start)
                .arg(&end)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.write_conn())
                .await
                .map_err(store_error)?;
            let entries = array(page)?;
            let n = entries.len();
            let mut last = None;
            for entry in entries {
                let mut e = array(entry)?.into_iter();
                let id = e.next().as_ref().and_then(text_of).unwrap_or_default();
                let fields = array(e.next().unwrap_or(Value::Nil))?;
                let mut record: Option<AuditRecord> = None;
                let mut version = String::new();
                let mut applied: Option<u64> = None;
                for pair in fields.chunks(2) {
                    match (
                        pair.first().and_then(text_of).as_deref(),
                        pair.get(1).and_then(text_of),
                    ) {
                        (Some("r"), Some(json)) => {
                            record = Some(serde_json::from_str(&json).map_err(|e| {
                                StoreError::Corrupt(format!("audit record {id}: {e}").into())
                            })?)
                        }
                        (Some("v"), Some(v)) => version = v,
                        (Some("n"), Some(n)) => applied = n.parse().ok(),
                        _ => {}
                    }
                }
                if let Some(mut r) = record {
                    if r.version.is_empty() {
                        r.version = version;
                    }
                    // A change's record is written before the store knows what it changed.
                    if r.applied == 0 && r.action != "check" {
                        r.applied = applied.unwrap_or(0);
                    }
                    if query.matches(&r) {
                        let at = Version::parse(&id)
                            .map_err(|e| StoreError::Corrupt(e.to_string().into()))?;
                        out.push((at, r));
                        if out.len() >= query.limit.max(1) {
                            return Ok(out);
                        }
                    }
                }
                last = Some(id);
            }
            match last {
                Some(id) if n == 1000 => start = format!("({id}"),
                _ => return Ok(out),
            }
        }
    }

    /// Entries of the changes trail or of its seals after `after`, as stored: a record as its
    /// fields (each name and value length-prefixed, in stream order), a seal as its line.
    pub(super) async fn stored_entries(
        &self,
        part: Stored,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.bound()?;
        let stream = match part {
            Stored::Records => "changes",
            Stored::Seals => SEALS,
        };
        let page: Value = redis::cmd("XRANGE")
            .arg(self.key(stream))
            .arg(after.map_or_else(|| "-".to_string(), |a| format!("({a}")))
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut self.write_conn())
            .await
            .map_err(store_error)?;
        array(page)?
            .into_iter()
            .map(|e| stored_entry(part, e))
            .collect()
    }

    /// The last seal, if any.
    pub(super) async fn newest_seal(&self) -> Result<Option<StoredEntry>, StoreError> {
        self.bound()?;
        let page: Value = redis::cmd("XREVRANGE")
            .arg(self.key(SEALS))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.write_conn())
            .await
            .map_err(store_error)?;
        array(page)?
            .into_iter()
            .next()
            .map(|e| stored_entry(Stored::Seals, e))
            .transpose()
    }

    /// Appends a seal if the last one is still `after_seq` (`seal.lua`).
    pub(super) async fn add_seal(&self, after_seq: u64, line: &str) -> Result<bool, StoreError> {
        let bound = self.bound()?;
        let mut inv = self.inner.scripts.seal.prepare_invoke();
        inv.key(self.key("marker"))
            .arg(&self.inner.prefix)
            .arg(&bound.dataset)
            .arg(after_seq)
            .arg(line);
        let added: i64 = self.invoke_durable(&inv, &mut self.write_conn()).await?;
        Ok(added == 1)
    }
}

/// One stream entry as stored.
fn stored_entry(part: Stored, entry: Value) -> Result<StoredEntry, StoreError> {
    let mut e = array(entry)?.into_iter();
    let id = e
        .next()
        .as_ref()
        .and_then(text_of)
        .ok_or_else(|| StoreError::Corrupt("a changes trail entry without an id".into()))?;
    let fields = array(e.next().unwrap_or(Value::Nil))?;
    let mut bytes = Vec::new();
    let (mut content, mut mac) = (None, None);
    for pair in fields.chunks(2) {
        let (Some(Value::BulkString(name)), Some(Value::BulkString(value))) =
            (pair.first(), pair.get(1))
        else {
            return Err(StoreError::Corrupt(
                format!("changes trail entry {id}: a field is not a string").into(),
            ));
        };
        match part {
            Stored::Records => {
                match name.as_slice() {
                    b"r" => content = Some(value.clone()),
                    b"m" => mac = Some(String::from_utf8_lossy(value).into_owned()),
                    _ => {}
                }
                for b in [name, value] {
                    bytes.extend_from_slice(
                        &u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes(),
                    );
                    bytes.extend_from_slice(b);
                }
            }
            Stored::Seals if name.as_slice() == b"l" => bytes.clone_from(value),
            Stored::Seals => {}
        }
    }
    let mac = match (part, content, mac) {
        (Stored::Seals, ..) => RecordMac::NotUsed,
        (Stored::Records, Some(content), Some(mac)) => RecordMac::Carried { content, mac },
        (Stored::Records, ..) => RecordMac::Absent,
    };
    Ok(StoredEntry { id, bytes, mac })
}
