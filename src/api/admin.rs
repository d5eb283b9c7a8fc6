//! The OptOutAdmin service.

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status, Streaming};

use super::{
    Limits, Rejections, all_valid, deadline,
    gate::caller_of,
    opt_out_type, opt_out_type_to_proto,
    proto::{
        AcknowledgeStoreRegressionRequest, AcknowledgeStoreRegressionResponse, AuditEntry,
        ChangeOptOutsRequest, ChangeOptOutsResponse, FilterStatus, GetOptOutRequest,
        GetOptOutResponse, GetStatusRequest, GetStatusResponse, ImportOptOutsRequest,
        ImportOptOutsResponse, OptOutRecord, ReadAuditRequest, ReadAuditResponse,
        opt_out_admin_server::OptOutAdmin,
    },
    source_field, store_status,
};
use crate::{
    auth::Caller,
    core::{AuditKey, AuditQuery, AuditRecord, NhsNumber, OptOutType},
    store::{ChangeKind, ConsentStore, ImportMode},
    sync::SyncedFilter,
};

/// How many valid numbers an import stages per store call.
const STAGE_CHUNK: usize = 50_000;
/// How long an admin write waits for this replica's filter to show it before answering (the write
/// is durable either way; the wait gives the caller read-your-writes on this replica).
const APPLY_WAIT: Duration = Duration::from_secs(1);

/// Answers the admin RPCs.
#[derive(Clone)]
pub struct AdminService {
    store: Arc<dyn ConsentStore>,
    filter: Arc<SyncedFilter>,
    limits: Limits,
    audit_key: AuditKey,
}

fn audit_record(
    caller: &Caller,
    action: &str,
    t: OptOutType,
    source: &str,
    count: usize,
) -> AuditRecord {
    AuditRecord {
        at_ms: i64::try_from(crate::store::now_ms()).unwrap_or(i64::MAX),
        organisation: caller.organisation.clone(),
        key_id: caller.key_id.clone(),
        action: action.into(),
        opt_out_type: Some(t.name().into()),
        source: Some(source.into()),
        count: count as u64,
        ..AuditRecord::default()
    }
}

impl AdminService {
    /// A service over a store and this replica's filter; changes are audited under `audit_key`.
    pub fn new(
        store: Arc<dyn ConsentStore>,
        filter: Arc<SyncedFilter>,
        limits: Limits,
        audit_key: AuditKey,
    ) -> Self {
        AdminService {
            store,
            filter,
            limits,
            audit_key,
        }
    }

    async fn change(
        &self,
        kind: ChangeKind,
        request: Request<ChangeOptOutsRequest>,
    ) -> Result<Response<ChangeOptOutsResponse>, Status> {
        let deadline = deadline(request.metadata(), self.limits.default_deadline);
        let caller = caller_of(&request);
        let req = request.into_inner();
        let t = opt_out_type(req.r#type)?;
        let source = source_field(&req.source)?;
        if req.nhs_numbers.is_empty() {
            return Err(Status::invalid_argument(
                "nhs_numbers is empty: nothing to change",
            ));
        }
        if req.nhs_numbers.len() > self.limits.max_admin_batch {
            return Err(Status::invalid_argument(format!(
                "nhs_numbers has {} numbers; an admin change carries at most {}: use \
                 ImportOptOuts for bulk loads",
                req.nhs_numbers.len(),
                self.limits.max_admin_batch
            )));
        }
        let numbers = all_valid("nhs_numbers", &req.nhs_numbers)?;
        let action = match kind {
            ChangeKind::Add => "add",
            ChangeKind::Remove => "remove",
        };
        let audit = AuditRecord {
            digests: self.audit_key.digests(numbers.iter().copied()),
            ..audit_record(&caller, action, t, source, numbers.len())
        };
        // No deadline on the write itself: once sent to the store it either commits or fails,
        // and cutting it off would leave the caller unsure which. The audit record is written in
        // the same transaction: no record, no change.
        let outcome = self
            .store
            .change(kind, t, &numbers, source, &audit)
            .await
            .map_err(store_status)?;
        tracing::info!(
            action = ?kind,
            opt_out = t.name(),
            source,
            count = numbers.len(),
            applied = outcome.applied,
            version = %outcome.version,
            "opt-outs changed"
        );
        let wait = APPLY_WAIT.min(deadline.saturating_duration_since(std::time::Instant::now()));
        self.filter.wait_for_version(outcome.version, wait).await;
        Ok(Response::new(ChangeOptOutsResponse {
            version: outcome.version.to_string(),
            applied: outcome.applied,
        }))
    }
}

/// The settings an import stream fixes with its first message.
struct ImportHeader {
    mode: ImportMode,
    t: OptOutType,
    source: String,
}

fn import_header(first: &ImportOptOutsRequest) -> Result<ImportHeader, Status> {
    let mode = import_header_mode(first.mode).ok_or_else(|| {
        if first.mode == super::proto::ImportMode::Unspecified as i32 {
            Status::invalid_argument(
                "mode is required on the first message: IMPORT_MODE_MERGE or IMPORT_MODE_REPLACE",
            )
        } else {
            Status::invalid_argument(format!("mode {} is not a known ImportMode", first.mode))
        }
    })?;
    Ok(ImportHeader {
        mode,
        t: opt_out_type(first.r#type)?,
        source: source_field(&first.source)?.to_string(),
    })
}

fn same_header(h: &ImportHeader, m: &ImportOptOutsRequest, index: u64) -> Result<(), Status> {
    let differs = (m.mode != 0 && import_header_mode(m.mode) != Some(h.mode))
        || (m.r#type != 0 && opt_out_type(m.r#type).ok() != Some(h.t))
        || (!m.source.is_empty() && m.source.trim() != h.source);
    if differs {
        return Err(Status::invalid_argument(format!(
            "message {index} of the import changes mode, type or source; they are fixed by the \
             first message. Nothing was imported"
        )));
    }
    Ok(())
}

fn import_header_mode(m: i32) -> Option<ImportMode> {
    use super::proto::ImportMode as P;
    match P::try_from(m) {
        Ok(P::Merge) => Some(ImportMode::Merge),
        Ok(P::Replace) => Some(ImportMode::Replace),
        _ => None,
    }
}

#[tonic::async_trait]
impl OptOutAdmin for AdminService {
    async fn add_opt_outs(
        &self,
        request: Request<ChangeOptOutsRequest>,
    ) -> Result<Response<ChangeOptOutsResponse>, Status> {
        self.change(ChangeKind::Add, request).await
    }

    async fn remove_opt_outs(
        &self,
        request: Request<ChangeOptOutsRequest>,
    ) -> Result<Response<ChangeOptOutsResponse>, Status> {
        self.change(ChangeKind::Remove, request).await
    }

    /// Stages every valid number; applies them in one store transaction only when the last message
    /// says `commit`. Any error, a stream that breaks off, or one that ends without `commit` drops
    /// the staged numbers and changes nothing.
    async fn import_opt_outs(
        &self,
        request: Request<Streaming<ImportOptOutsRequest>>,
    ) -> Result<Response<ImportOptOutsResponse>, Status> {
        let caller = caller_of(&request);
        let mut inbound = request.into_inner();
        let Some(first) = inbound.message().await? else {
            return Err(Status::invalid_argument("the import stream is empty"));
        };
        let header = import_header(&first)?;
        let mut session = self
            .store
            .begin_import(header.mode, header.t, &header.source)
            .await
            .map_err(store_status)?;
        let mut received = 0u64;
        let mut rejected = Rejections::new();
        let mut pending: Vec<NhsNumber> = Vec::with_capacity(STAGE_CHUNK);
        let mut message = Some(first);
        let mut index = 0u64;
        let mut committed = false;
        while let Some(m) = message.take() {
            if committed {
                return Err(Status::invalid_argument(format!(
                    "message {index} came after the message marked commit; nothing was imported"
                )));
            }
            same_header(&header, &m, index)?;
            for s in &m.nhs_numbers {
                match NhsNumber::parse(s) {
                    Ok(n) => pending.push(n),
                    Err(e) => rejected.push(received, e),
                }
                received += 1;
            }
            if pending.len() >= STAGE_CHUNK {
                session.stage(&pending).await.map_err(store_status)?;
                pending.clear();
            }
            committed = m.commit;
            index += 1;
            message = inbound.message().await?;
        }
        if !committed {
            return Err(Status::aborted(
                "the import stream ended without a message marked commit; nothing was imported",
            ));
        }
        if !pending.is_empty() {
            session.stage(&pending).await.map_err(store_status)?;
        }
        let action = match header.mode {
            ImportMode::Merge => "import-merge",
            ImportMode::Replace => "import-replace",
        };
        let audit = audit_record(
            &caller,
            action,
            header.t,
            &header.source,
            usize::try_from(received).unwrap_or(usize::MAX),
        );
        let outcome = session
            .commit(audit, &self.audit_key)
            .await
            .map_err(store_status)?;
        tracing::info!(
            mode = ?header.mode,
            opt_out = header.t.name(),
            source = header.source,
            received,
            added = outcome.added,
            removed = outcome.removed,
            rejected = rejected.count(),
            version = %outcome.version,
            "opt-outs imported"
        );
        self.filter
            .wait_for_version(outcome.version, APPLY_WAIT)
            .await;
        Ok(Response::new(ImportOptOutsResponse {
            received,
            added: outcome.added,
            removed: outcome.removed,
            rejected: rejected.count(),
            rejected_positions: rejected.positions().collect(),
            version: outcome.version.to_string(),
        }))
    }

    async fn get_opt_out(
        &self,
        request: Request<GetOptOutRequest>,
    ) -> Result<Response<GetOptOutResponse>, Status> {
        let req = request.into_inner();
        let n = NhsNumber::parse(&req.nhs_number)
            .map_err(|e| Status::invalid_argument(format!("nhs_number: {e}")))?;
        let (records, version) = self.store.get(n).await.map_err(store_status)?;
        Ok(Response::new(GetOptOutResponse {
            opt_outs: records
                .into_iter()
                .map(|r| OptOutRecord {
                    r#type: opt_out_type_to_proto(r.kind) as i32,
                    recorded_at_unix_ms: r.recorded_at_ms,
                    source: r.source,
                })
                .collect(),
            version: version.to_string(),
        }))
    }

    async fn read_audit(
        &self,
        request: Request<ReadAuditRequest>,
    ) -> Result<Response<ReadAuditResponse>, Status> {
        let req = request.into_inner();
        let digest = if req.nhs_number.is_empty() {
            None
        } else {
            let n = NhsNumber::parse(&req.nhs_number)
                .map_err(|e| Status::invalid_argument(format!("nhs_number: {e}")))?;
            Some(self.audit_key.digest(n))
        };
        let limit = match req.limit {
            0 => 10_000,
            n => usize::try_from(n).unwrap_or(10_000).min(10_000),
        };
        let query = AuditQuery {
            from_ms: req.from_unix_ms,
            to_ms: req.to_unix_ms,
            organisation: Some(req.organisation).filter(|o| !o.is_empty()),
            extract_id: Some(req.extract_id).filter(|e| !e.is_empty()),
            digest,
            limit,
        };
        let records = self.store.read_audit(&query).await.map_err(store_status)?;
        Ok(Response::new(ReadAuditResponse {
            records: records
                .into_iter()
                .map(|r| AuditEntry {
                    digests: r.digest_count() as u64,
                    at_unix_ms: r.at_ms,
                    organisation: r.organisation,
                    key_id: r.key_id,
                    action: r.action,
                    opt_out_type: r.opt_out_type.unwrap_or_default(),
                    source: r.source.unwrap_or_default(),
                    extract_id: r.extract_id.unwrap_or_default(),
                    purpose: r.purpose.unwrap_or_default(),
                    origin: r.origin.unwrap_or_default(),
                    count: r.count,
                    applied: r.applied,
                    withheld: r.withheld.into_iter().collect(),
                    version: r.version,
                })
                .collect(),
        }))
    }

    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let store = self.store.status().await.map_err(store_status)?;
        let f = self.filter.status();
        Ok(Response::new(GetStatusResponse {
            national_data_opt_outs: store.national,
            type_1_opt_outs: store.type1,
            patients: store.patients,
            version: store.version.to_string(),
            store_kind: self.store.kind().to_string(),
            dataset_id: store.dataset_id,
            filter: Some(FilterStatus {
                items: f.stats.items,
                capacity: f.stats.capacity,
                bits: f.stats.bits,
                hash_functions: f.stats.hash_functions,
                target_false_positive_rate: f.stats.target_fp_rate,
                estimated_false_positive_rate: f.stats.estimated_fp_rate,
                generation: f.stats.generation,
                version: f.version.to_string(),
                freshness_age_ms: f.age.map_or(u64::MAX, |a| {
                    u64::try_from(a.as_millis()).unwrap_or(u64::MAX)
                }),
                fresh: f.fresh,
                freshness_bound_ms: u64::try_from(f.freshness_bound.as_millis())
                    .unwrap_or(u64::MAX),
                loaded_from: f.loaded_from.to_string(),
            }),
            store_regressed: f.regressed.unwrap_or_default(),
        }))
    }

    async fn acknowledge_store_regression(
        &self,
        request: Request<AcknowledgeStoreRegressionRequest>,
    ) -> Result<Response<AcknowledgeStoreRegressionResponse>, Status> {
        let caller = caller_of(&request);
        let reason = super::label_field("reason", &request.get_ref().reason, 512)?.to_string();
        if reason.is_empty() {
            return Err(Status::invalid_argument(
                "reason is required: say what was restored and the incident reference",
            ));
        }
        let record = AuditRecord {
            at_ms: i64::try_from(crate::store::now_ms()).unwrap_or(i64::MAX),
            organisation: caller.organisation.clone(),
            key_id: caller.key_id.clone(),
            action: "acknowledge-regression".into(),
            source: Some(reason),
            version: self.filter.version().to_string(),
            ..AuditRecord::default()
        };
        let id = self
            .store
            .acknowledge_regression(&record)
            .await
            .map_err(store_status)?;
        tracing::warn!(
            organisation = %caller.organisation,
            key = %caller.key_id,
            "store regression acknowledged by an admin; replicas rebuild from the store"
        );
        Ok(Response::new(AcknowledgeStoreRegressionResponse {
            acknowledgement_id: id,
            version: self.filter.version().to_string(),
        }))
    }
}
