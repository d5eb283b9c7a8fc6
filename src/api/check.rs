//! The OptOutCheck service.

use std::{pin::Pin, sync::Arc, time::Instant};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{
    Limits, deadline, decision_to_proto,
    gate::{GateState, caller_of},
    legal_basis_from_proto, origin,
    proto::{CheckRequest, CheckResponse, opt_out_check_server::OptOutCheck},
    purpose, version_field,
};
use crate::{
    auth::Caller,
    core::NhsNumber,
    engine::check::{CheckInput, Checker, Requester},
};

/// Answers Check and CheckStream.
#[derive(Clone)]
pub struct CheckService {
    checker: Checker,
    limits: Limits,
    /// Rate budgets (charged per NHS number) and the keys in force.
    gates: Arc<GateState>,
}

impl CheckService {
    /// A service over a check engine (which records every answer).
    pub fn new(checker: Checker, limits: Limits, gates: Arc<GateState>) -> Self {
        CheckService {
            checker,
            limits,
            gates,
        }
    }

    /// Answers one message and records it in the metrics.
    async fn answer(
        &self,
        rpc: &'static str,
        caller: &Caller,
        req: CheckRequest,
        deadline: Instant,
    ) -> Result<CheckResponse, Status> {
        let started = Instant::now();
        let result = self.answer_inner(caller, req, deadline).await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        metrics::counter!("optout_check_requests_total", "rpc" => rpc, "code" => crate::telemetry::code_label(code))
            .increment(1);
        metrics::histogram!("optout_check_duration_seconds", "rpc" => rpc)
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn answer_inner(
        &self,
        caller: &Caller,
        req: CheckRequest,
        deadline: Instant,
    ) -> Result<CheckResponse, Status> {
        if req.nhs_numbers.is_empty() {
            return Err(Status::invalid_argument(
                "nhs_numbers is empty: nothing to check",
            ));
        }
        let extract_id = super::label_field("extract_id", &req.extract_id, super::LABEL_MAX)?;
        let purpose = purpose(req.purpose)?;
        let basis = legal_basis_from_proto(req.legal_basis)?;
        let basis_reference =
            super::label_field("basis_reference", &req.basis_reference, super::LABEL_MAX)?;
        if let Some(problem) = basis.reference_problem(basis_reference) {
            return Err(Status::invalid_argument(problem));
        }
        // What the caller claims must be granted to its key: the purpose (direct care releases
        // every valid number) and the legal basis. Refusals are counted by what was claimed.
        if !caller.may_purpose(purpose) {
            let granted: Vec<&str> = caller.purposes().iter().map(|p| p.name()).collect();
            return Err(refused(
                "purpose",
                format!(
                    "API key {} may not check for the purpose {} (it may for: {}): list it under \
                 purposes for this key in the keys file",
                    caller.key_id,
                    purpose.name(),
                    granted.join(", ")
                ),
            ));
        }
        if !caller.may_claim(basis) {
            return Err(refused(
                "legal_basis",
                format!(
                    "API key {} may not claim the legal basis {}: list it under exempt_bases for \
                 this key in the keys file",
                    caller.key_id,
                    basis.name()
                ),
            ));
        }
        if !caller.is_anonymous()
            && let Some(owner) = self.checker.owned_by_another(&caller.organisation)
        {
            return Err(refused(
                "organisation",
                format!(
                    "this store holds the national check results of organisation {owner}, which \
                 its licence lets {owner} apply to its own patients only; organisation {} needs \
                 its own store (or prefix) fed by its own national checks",
                    caller.organisation
                ),
            ));
        }
        // A key removed from the keys file stops being honoured within the reload interval, on
        // streams opened before too.
        if !self.gates.still_valid(caller) {
            return Err(Status::unauthenticated(format!(
                "API key {} is no longer in force (revoked or changed)",
                caller.key_id
            )));
        }
        self.gates.charge(caller, req.nhs_numbers.len())?;
        if req.nhs_numbers.len() > self.limits.max_batch {
            return Err(Status::invalid_argument(format!(
                "nhs_numbers has {} numbers; a message carries at most {} (the server's batch \
                 limit): split the batch, or send the extract through CheckStream",
                req.nhs_numbers.len(),
                self.limits.max_batch
            )));
        }
        let parsed: Vec<Option<NhsNumber>> = req
            .nhs_numbers
            .iter()
            .map(|s| NhsNumber::parse_bytes(s).ok())
            .collect();
        let input = CheckInput {
            numbers: &parsed,
            purpose,
            origin: origin(req.origin)?,
            basis,
            at_least_version: version_field("at_least_version", &req.at_least_version)?,
            deadline,
        };
        let who = Requester {
            caller,
            extract_id,
            basis_reference,
        };
        let out = self.checker.check(&who, input).await;
        Ok(CheckResponse {
            decisions: out.decisions.into_iter().map(decision_to_proto).collect(),
            version: out.version.to_string(),
        })
    }
}

/// A claim the caller's key does not cover (a purpose, a legal basis, another organisation's
/// store): PERMISSION_DENIED, counted by what was claimed.
fn refused(claim: &'static str, message: String) -> Status {
    metrics::counter!("optout_check_claims_refused_total", "claim" => claim).increment(1);
    Status::permission_denied(message)
}

/// The stream, ended with DEADLINE_EXCEEDED once `limit` has passed. The server's request timeout
/// covers a call until its response starts; a response stream would outlive it, so a client that
/// keeps a stream open without end is cut off here.
fn cut_off_after<S>(stream: S, limit: std::time::Duration) -> ResponseStream
where
    S: Stream<Item = Result<CheckResponse, Status>> + Send + 'static,
{
    let state = (Box::pin(stream), Box::pin(tokio::time::sleep(limit)), false);
    Box::pin(futures::stream::unfold(
        state,
        move |(mut stream, mut cut, ended)| async move {
            if ended {
                return None;
            }
            tokio::select! {
                item = stream.next() => item.map(|i| (i, (stream, cut, false))),
                _ = &mut cut => {
                    let status = Status::deadline_exceeded(format!(
                        "the stream ran longer than the server's request timeout of {} s; \
                         send the rest in a new stream",
                        limit.as_secs_f64()
                    ));
                    Some((Err(status), (stream, cut, true)))
                }
            }
        },
    ))
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<CheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl OptOutCheck for CheckService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let deadline = deadline(request.metadata(), self.limits.default_deadline);
        let caller = caller_of(&request);
        let response = self
            .answer("check", &caller, request.into_inner(), deadline)
            .await?;
        Ok(Response::new(response))
    }

    type CheckStreamStream = ResponseStream;

    /// Each message is checked like a Check call with the default deadline counted from when its
    /// turn comes. A few messages are in flight at once; responses keep the request order. The first
    /// bad message ends the stream with its error (the responses before it stand).
    async fn check_stream(
        &self,
        request: Request<Streaming<CheckRequest>>,
    ) -> Result<Response<Self::CheckStreamStream>, Status> {
        let service = self.clone();
        let default_deadline = self.limits.default_deadline;
        let concurrency = self.limits.stream_concurrency.max(1);
        let caller = caller_of(&request);
        let inbound = request.into_inner();
        let responses = inbound
            .map(move |message| {
                let service = service.clone();
                let caller = caller.clone();
                async move {
                    let message = message?;
                    let deadline = Instant::now() + default_deadline;
                    service
                        .answer("check_stream", &caller, message, deadline)
                        .await
                }
            })
            .buffered(concurrency)
            // Stop after the first error: it ends the gRPC stream with that status.
            .scan(false, |failed, item| {
                if *failed {
                    return futures::future::ready(None);
                }
                *failed = item.is_err();
                futures::future::ready(Some(item))
            });
        Ok(Response::new(Box::pin(cut_off_after(
            responses,
            self.limits.request_timeout,
        ))))
    }
}
