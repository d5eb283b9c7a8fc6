//! The OptOutCheck service.

use std::{pin::Pin, time::Instant};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{
    Limits, deadline, decision_to_proto, origin,
    proto::{CheckRequest, CheckResponse, opt_out_check_server::OptOutCheck},
    purpose, version_field,
};
use crate::check::{CheckInput, Checker};

/// Answers Check and CheckStream.
#[derive(Clone)]
pub struct CheckService {
    checker: Checker,
    limits: Limits,
}

impl CheckService {
    /// A service over a check engine.
    pub fn new(checker: Checker, limits: Limits) -> Self {
        CheckService { checker, limits }
    }

    async fn answer(&self, req: CheckRequest, deadline: Instant) -> Result<CheckResponse, Status> {
        if req.nhs_numbers.is_empty() {
            return Err(Status::invalid_argument(
                "nhs_numbers is empty: nothing to check",
            ));
        }
        if req.nhs_numbers.len() > self.limits.max_batch {
            return Err(Status::invalid_argument(format!(
                "nhs_numbers has {} numbers; a message carries at most {} (the server's batch \
                 limit): split the batch, or send the extract through CheckStream",
                req.nhs_numbers.len(),
                self.limits.max_batch
            )));
        }
        let input = CheckInput {
            numbers: &req.nhs_numbers,
            purpose: purpose(req.purpose)?,
            origin: origin(req.origin)?,
            at_least_version: version_field("at_least_version", &req.at_least_version)?,
            deadline,
        };
        let out = self.checker.check(input).await;
        Ok(CheckResponse {
            decisions: out.decisions.into_iter().map(decision_to_proto).collect(),
            version: out.version.to_string(),
        })
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<CheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl OptOutCheck for CheckService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let deadline = deadline(request.metadata(), self.limits.default_deadline);
        let response = self.answer(request.into_inner(), deadline).await?;
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
        let inbound = request.into_inner();
        let responses = inbound
            .map(move |message| {
                let service = service.clone();
                async move {
                    let message = message?;
                    let deadline = Instant::now() + default_deadline;
                    service.answer(message, deadline).await
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
        Ok(Response::new(Box::pin(responses)))
    }
}
