//! The transport floor: the same OptOutCheck API doing no work (RELEASE for every number). The same
//! workload against it measures what gRPC itself costs on the machine.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use optout_proto::{
    CheckRequest, CheckResponse, Decision, Outcome, Reason,
    opt_out_check_server::{OptOutCheck, OptOutCheckServer},
};
use tonic::{Request, Response, Status, Streaming};

/// Answers RELEASE for every number, in order.
#[derive(Clone, Copy, Default)]
pub struct Echo;

fn answer(req: &CheckRequest) -> CheckResponse {
    CheckResponse {
        decisions: vec![
            Decision {
                outcome: Outcome::Release as i32,
                reason: Reason::NoOptOut as i32,
            };
            req.nhs_numbers.len()
        ],
        version: "0-0".into(),
    }
}

#[tonic::async_trait]
impl OptOutCheck for Echo {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(answer(request.get_ref())))
    }

    type CheckStreamStream = Pin<Box<dyn Stream<Item = Result<CheckResponse, Status>> + Send>>;

    async fn check_stream(
        &self,
        request: Request<Streaming<CheckRequest>>,
    ) -> Result<Response<Self::CheckStreamStream>, Status> {
        let out = request.into_inner().map(|m| m.map(|r| answer(&r)));
        Ok(Response::new(Box::pin(out)))
    }
}

/// Serves the echo API on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(
            OptOutCheckServer::new(Echo)
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
