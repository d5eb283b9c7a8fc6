//! The audit stream: check records appended in batches, records read back by time.

use redis::Value;

use super::{
    RedisStore,
    reply::{array, audit_json, text_of},
    scripts::{changed, store_error},
};
use crate::{
    core::{AuditQuery, AuditRecord},
    store::StoreError,
};

impl RedisStore {
    pub(super) async fn append_records(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let bound = self.bound()?;
        let mut pipe = redis::pipe();
        // MULTI/EXEC: the batch is written whole or not at all, and only while the marker holds.
        pipe.atomic();
        pipe.hget(self.key("marker"), "dataset_id");
        for r in records {
            pipe.cmd("XADD")
                .arg(self.key("audit"))
                .arg("MAXLEN")
                .arg("~")
                .arg(self.inner.audit_len)
                .arg("*")
                .arg("r")
                .arg(audit_json(r)?)
                .arg("v")
                .arg(&r.version)
                .ignore();
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

    pub(super) async fn read_records(
        &self,
        query: &AuditQuery,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.bound()?;
        let mut out = Vec::new();
        let mut start = format!("{}-0", query.from_ms.max(0));
        let end = if query.to_ms <= 0 {
            "+".to_string()
        } else {
            format!("{}-{}", query.to_ms, u64::MAX)
        };
        loop {
            let page: Value = redis::cmd("XRANGE")
                .arg(self.key("audit"))
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
                        out.push(r);
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
}
