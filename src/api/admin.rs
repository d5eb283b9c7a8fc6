//! The OptOutAdmin service: proto to engine types, engine errors to statuses.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::{
    Limits, Rejections, all_valid, deadline,
    gate::{GateState, caller_of},
    opt_out_type, opt_out_type_to_proto,
    proto::{
        AcknowledgeStoreRegressionRequest, AcknowledgeStoreRegressionResponse, AuditEntry,
        ChangeOptOutsRequest, ChangeOptOutsResponse, FilterStatus, GetOptOutRequest,
        GetOptOutResponse, GetStatusRequest, GetStatusResponse, ImportOptOutsRequest,
        ImportOptOutsResponse, OptOutRecord, ReadAuditRequest, ReadAuditResponse,
        opt_out_admin_server::OptOutAdmin,
    },
    source_field,
};
use crate::{
    core::{NhsNumber, OptOutType, Practice},
    engine::admin::{Admin, AdminError, AuditSearch, ChangeKind, ErrorKind, ImportMode},
};

/// Answers the admin RPCs.
#[derive(Clone)]
pub struct AdminService {
    admin: Admin,
    limits: Limits,
    /// Whether a caller's key is still in force, asked again on every message of an import.
    gates: Arc<GateState>,
}

/// The one mapping from the engine's errors to gRPC statuses. ABORTED for a conflict, not
/// UNAVAILABLE: gRPC's code for it, and a definite answer (nothing changed), where UNAVAILABLE
/// may hide a change that was applied (one its replicas did not confirm in time).
fn admin_status(e: AdminError) -> Status {
    let m = e.message();
    match e.kind() {
        ErrorKind::Invalid => Status::invalid_argument(m),
        ErrorKind::Refused => Status::failed_precondition(m),
        ErrorKind::Busy => Status::aborted(m),
        ErrorKind::Unavailable => Status::unavailable(m),
        ErrorKind::Corrupt => Status::data_loss(m),
    }
}

impl AdminService {
    /// ImportOptOuts: the stream received, staged and committed (see `import_opt_outs`).
    async fn import(
        &self,
        request: Request<Streaming<ImportOptOutsRequest>>,
    ) -> Result<Response<ImportOptOutsResponse>, Status> {
        let caller = caller_of(&request);
        let mut inbound = request.into_inner();
        let Some(first) = inbound.message().await? else {
            return Err(Status::invalid_argument("the import stream is empty"));
        };
        let header = import_header(&first)?;
        let older = super::label_field(
            "older_check_reason",
            &first.older_check_reason,
            super::LABEL_MAX,
        )?
        .trim()
        .to_string();
        let mut import = self
            .admin
            .start_import(
                &caller,
                header.mode,
                (header.t, header.practice.as_ref()),
                &header.source,
            )
            .await
            .map_err(admin_status)?;
        if first.national_checked_at_unix_ms != 0 {
            import
                .open_national_check(
                    first.national_checked_at_unix_ms,
                    (!older.is_empty()).then_some(older),
                )
                .map_err(admin_status)?;
        }
        let mut rejected = Rejections::new();
        let mut message = Some(first);
        let mut index = 0u64;
        let mut committed = false;
        // A key revoked while its import is open stops it, as it stops an open CheckStream:
        // asked again on every message and before the commit (a REPLACE could otherwise
        // commit after its key was revoked).
        let in_force = |caller: &crate::auth::Caller| {
            if self.gates.still_valid(caller) {
                Ok(())
            } else {
                Err(Status::unauthenticated(format!(
                    "API key {} is no longer in force (revoked or changed); nothing was \
                     imported",
                    caller.key_id
                )))
            }
        };
        while let Some(m) = message.take() {
            in_force(&caller)?;
            if committed {
                return Err(Status::invalid_argument(format!(
                    "message {index} came after the message marked commit; nothing was imported"
                )));
            }
            same_header(&header, &m, index)?;
            import.add_population(&m.population).map_err(admin_status)?;
            import
                .receive(&m.nhs_numbers, &mut |position, e| {
                    rejected.push(position, e)
                })
                .await
                .map_err(admin_status)?;
            committed = m.commit;
            index += 1;
            message = inbound.message().await?;
        }
        if !committed {
            return Err(Status::aborted(
                "the import stream ended without a message marked commit; nothing was imported",
            ));
        }
        in_force(&caller)?;
        let received = import.received();
        let outcome = import
            .commit(rejected.count())
            .await
            .map_err(admin_status)?;
        Ok(Response::new(ImportOptOutsResponse {
            received,
            added: outcome.added,
            removed: outcome.removed,
            rejected: rejected.count(),
            rejected_positions: rejected.positions().collect(),
            version: outcome.version.to_string(),
        }))
    }

    /// A service over the admin engine.
    pub fn new(admin: Admin, limits: Limits, gates: Arc<GateState>) -> Self {
        AdminService {
            admin,
            limits,
            gates,
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
        let practice = practice_field(&req.practice, kind == ChangeKind::Remove)?;
        let source = source_field(&req.source)?;
        if req.nhs_numbers.len() > self.limits.max_admin_batch {
            return Err(Status::invalid_argument(format!(
                "nhs_numbers has {} numbers; an admin change carries at most {}: use \
                 `optout admin import` (ImportOptOuts) for bulk loads",
                req.nhs_numbers.len(),
                self.limits.max_admin_batch
            )));
        }
        let numbers = all_valid("nhs_numbers", &req.nhs_numbers)?;
        let outcome = self
            .admin
            .change(
                &caller,
                kind,
                (t, practice.as_ref()),
                &numbers,
                source,
                deadline,
            )
            .await
            .map_err(admin_status)?;
        Ok(Response::new(ChangeOptOutsResponse {
            version: outcome.version.to_string(),
            applied: outcome.applied,
        }))
    }
}

/// A request's practice (empty: none), as an ODS code; `unknown` only where allowed (removals).
fn practice_field(code: &str, unknown_allowed: bool) -> Result<Option<Practice>, Status> {
    if code.trim().is_empty() {
        return Ok(None);
    }
    Practice::parse(code, unknown_allowed)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("practice: {e}")))
}

/// The settings an import stream fixes with its first message.
struct ImportHeader {
    mode: ImportMode,
    t: OptOutType,
    practice: Option<Practice>,
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
        practice: practice_field(&first.practice, false)?,
        source: source_field(&first.source)?.to_string(),
    })
}

fn ms_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn same_header(h: &ImportHeader, m: &ImportOptOutsRequest, index: u64) -> Result<(), Status> {
    let differs = (m.mode != 0 && import_header_mode(m.mode) != Some(h.mode))
        || (m.r#type != 0 && opt_out_type(m.r#type).ok() != Some(h.t))
        || (!m.source.is_empty() && m.source.trim() != h.source)
        || (!m.practice.trim().is_empty()
            && h.practice.as_ref().map(Practice::stored)
                != Some(m.practice.trim().to_ascii_uppercase().as_str()));
    if differs {
        return Err(Status::invalid_argument(format!(
            "message {index} of the import changes mode, type, practice or source; they are \
             fixed by the first message. Nothing was imported"
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

/// Runs one admin RPC and counts it by its gRPC code, with its latency
/// (`optout_admin_requests_total`, `optout_admin_duration_seconds`).
async fn observed<T>(
    rpc: &'static str,
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let started = std::time::Instant::now();
    let result = call.await;
    crate::telemetry::observe_admin(rpc, started, result.as_ref().err());
    result
}

#[tonic::async_trait]
impl OptOutAdmin for AdminService {
    async fn add_opt_outs(
        &self,
        request: Request<ChangeOptOutsRequest>,
    ) -> Result<Response<ChangeOptOutsResponse>, Status> {
        observed("add_opt_outs", self.change(ChangeKind::Add, request)).await
    }

    async fn remove_opt_outs(
        &self,
        request: Request<ChangeOptOutsRequest>,
    ) -> Result<Response<ChangeOptOutsResponse>, Status> {
        observed("remove_opt_outs", self.change(ChangeKind::Remove, request)).await
    }

    /// Stages every valid number; applies them in one store transaction only when the last message
    /// says `commit`. Any error, a stream that breaks off, or one that ends without `commit` drops
    /// the staged numbers and changes nothing.
    async fn import_opt_outs(
        &self,
        request: Request<Streaming<ImportOptOutsRequest>>,
    ) -> Result<Response<ImportOptOutsResponse>, Status> {
        // The import runs in a task of its own: a client that goes while its commit is applied
        // (Ctrl-C after the last message) does not cut the commit short, and every applied import
        // is logged ("opt-outs imported") and answered to no one rather than applied unlogged.
        let this = self.clone();
        observed("import_opt_outs", async move {
            // In the request's span, so its logs keep the request id.
            let import = async move { this.import(request).await };
            tokio::spawn(tracing::Instrument::in_current_span(import))
                .await
                .map_err(|e| Status::internal(format!("the import task failed: {e}")))?
        })
        .await
    }

    async fn get_opt_out(
        &self,
        request: Request<GetOptOutRequest>,
    ) -> Result<Response<GetOptOutResponse>, Status> {
        observed("get_opt_out", async move {
            let caller = caller_of(&request);
            let req = request.into_inner();
            let n = NhsNumber::parse(&req.nhs_number)
                .map_err(|e| Status::invalid_argument(format!("nhs_number: {e}")))?;
            let (records, version) = self.admin.get(&caller, n).await.map_err(admin_status)?;
            Ok(Response::new(GetOptOutResponse {
                opt_outs: records
                    .into_iter()
                    .map(|r| OptOutRecord {
                        r#type: opt_out_type_to_proto(r.kind) as i32,
                        recorded_at_unix_ms: r.recorded_at_ms,
                        source: r.source,
                        practices: r.practices.iter().map(|p| p.name().to_string()).collect(),
                    })
                    .collect(),
                version: version.to_string(),
            }))
        })
        .await
    }

    async fn read_audit(
        &self,
        request: Request<ReadAuditRequest>,
    ) -> Result<Response<ReadAuditResponse>, Status> {
        observed("read_audit", async move {
            let caller = caller_of(&request);
            let req = request.into_inner();
            let number = if req.nhs_number.is_empty() {
                None
            } else {
                Some(
                    NhsNumber::parse(&req.nhs_number)
                        .map_err(|e| Status::invalid_argument(format!("nhs_number: {e}")))?,
                )
            };
            let limit = match req.limit {
                0 => 10_000,
                n => usize::try_from(n).unwrap_or(10_000).min(10_000),
            };
            let search = AuditSearch {
                from_ms: req.from_unix_ms,
                to_ms: req.to_unix_ms,
                organisation: Some(req.organisation).filter(|o| !o.is_empty()),
                extract_id: Some(req.extract_id).filter(|e| !e.is_empty()),
                number,
                limit,
            };
            let records = self
                .admin
                .read_audit(&caller, search)
                .await
                .map_err(admin_status)?;
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
                        part_of: r.part_of.unwrap_or_default(),
                        legal_basis: r.legal_basis.unwrap_or_default(),
                        basis_reference: r.basis_reference.unwrap_or_default(),
                        population: r.population.unwrap_or(0),
                        checked_at_unix_ms: ms_i64(r.checked_at_ms.unwrap_or(0)),
                        override_reason: r.override_reason.unwrap_or_default(),
                        practice: r.practice.unwrap_or_default(),
                    })
                    .collect(),
            }))
        })
        .await
    }

    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        observed("get_status", async move {
            let status = self.admin.status().await.map_err(admin_status)?;
            let (store, f) = (status.store, status.filter);
            Ok(Response::new(GetStatusResponse {
                national_data_opt_outs: store.national,
                type_1_opt_outs: store.type1,
                patients: store.patients,
                version: store.version.to_string(),
                store_kind: status.store_kind.to_string(),
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
                lists: f
                    .lists_now()
                    .iter()
                    .map(|l| super::proto::ListCoverage {
                        r#type: opt_out_type_to_proto(l.t) as i32,
                        mode: l.mode.to_string(),
                        population: l.population,
                        as_of_unix_ms: ms_i64(l.as_of_ms.unwrap_or(0)),
                        max_age_ms: ms_i64(
                            l.max_age
                                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                        ),
                        expires_at_unix_ms: ms_i64(l.expires_at_ms.unwrap_or(0)),
                        expired: l.expired,
                        owner: l.owner.clone().unwrap_or_default(),
                        practices: l
                            .practices
                            .iter()
                            .map(|(p, at)| super::proto::PracticeList {
                                practice: p.clone(),
                                as_of_unix_ms: ms_i64(*at),
                            })
                            .collect(),
                    })
                    .collect(),
                store_regressed: f.regressed.unwrap_or_default(),
                server_version: concat!(
                    env!("CARGO_PKG_VERSION"),
                    " (",
                    env!("OPTOUT_GIT_COMMIT"),
                    ")"
                )
                .to_string(),
            }))
        })
        .await
    }

    async fn acknowledge_store_regression(
        &self,
        request: Request<AcknowledgeStoreRegressionRequest>,
    ) -> Result<Response<AcknowledgeStoreRegressionResponse>, Status> {
        observed("acknowledge_store_regression", async move {
            let caller = caller_of(&request);
            let reason = super::label_field("reason", &request.get_ref().reason, 512)?;
            let (id, version) = self
                .admin
                .acknowledge_regression(&caller, reason)
                .await
                .map_err(admin_status)?;
            Ok(Response::new(AcknowledgeStoreRegressionResponse {
                acknowledgement_id: id,
                version: version.to_string(),
            }))
        })
        .await
    }
}
