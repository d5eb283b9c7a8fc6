//! The gRPC port: TLS, HTTP/2 settings, request spans, connection limits, and the drain on
//! shutdown; and the side listeners (health port, metrics).

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tonic::body::Body;
use tonic::codegen::http::{HeaderName, Request};
use tonic::{service::Routes, transport::Server};
use tonic_health::ServingStatus;
use tower_http::{
    classify::GrpcFailureClass,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

use super::{ServerConfig, ServerError, health::HealthState, tasks::Tasks};
use crate::engine::{check_log::CheckLog, filter::SyncedFilter};

/// Serves `routes` on `listener` until `shutdown` completes; then NOT_SERVING, no new
/// connections, and the in-flight requests get the grace period before they are cut off.
pub(super) async fn serve_grpc(
    listener: TcpListener,
    config: &ServerConfig,
    routes: Routes,
    health: &HealthState,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let mut builder = Server::builder();
    if let Some(tls) = &config.tls {
        let mut t = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
        );
        if let Some(ca) = &tls.client_ca_pem {
            t = t.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder.tls_config(t)?;
    }
    let grace = config.shutdown_grace;
    let (draining_tx, mut draining_rx) = watch::channel(false);
    let idle = config
        .idle_timeout
        .max(config.limits.request_timeout + Duration::from_secs(1));
    let limits = crate::connections::ConnectionLimits {
        max: config.max_connections,
        per_peer: config
            .max_connections_per_peer
            .unwrap_or(config.max_connections / 4)
            .max(1),
        idle,
        first_request: config.first_request_timeout,
    };
    let peers = crate::connections::Peers::new();
    let requested = peers.clone();
    let server = builder
        .max_concurrent_streams(config.max_concurrent_streams)
        .timeout(config.limits.request_timeout)
        .max_connection_age(config.max_connection_age)
        .max_connection_age_grace(grace)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        // Outermost first: the request id is settled before the span is made, and copied onto
        // the response (headers, trailers-only errors included) inside it.
        .layer(
            tower::ServiceBuilder::new()
                .map_request(move |req: Request<Body>| {
                    requested.request_on(&req);
                    req
                })
                .map_request(drop_unusable_request_id)
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_grpc()
                        .make_span_with(request_span)
                        .on_request(())
                        .on_response(())
                        .on_body_chunk(())
                        .on_eos(())
                        .on_failure(record_failure),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID)),
        )
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            crate::connections::limited(incoming(listener), limits, peers),
            async {
                shutdown.await;
                health.set_all(ServingStatus::NotServing).await;
                tracing::info!(
                    grace_secs = grace.as_secs_f64(),
                    "shutting down: NOT_SERVING, no new connections, draining in-flight requests"
                );
                let _ = draining_tx.send(true);
            },
        );
    // In-flight requests and streams get the grace period; then they are cut off.
    tokio::select! {
        r = server => Ok(r?),
        _ = async {
            let _ = draining_rx.wait_for(|d| *d).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(
                grace_secs = grace.as_secs_f64(),
                "grace period over: cutting off the requests still in flight"
            );
            Ok(())
        }
    }
}

/// The plaintext health port and the metrics endpoint, when configured; stopped by `tasks`.
pub(super) fn start_side_listeners(
    config: &ServerConfig,
    health: &HealthState,
    filter: &Arc<SyncedFilter>,
    check_log: &Arc<CheckLog>,
    tasks: &mut Tasks,
) -> Result<(), ServerError> {
    if let Some(l) = &config.metrics_listener {
        let listener = tokio_listener(l, "metrics")?;
        let handle = crate::telemetry::install().map_err(ServerError::Listener)?;
        let (filter, log) = (filter.clone(), check_log.clone());
        let refresh = Arc::new(move || {
            crate::telemetry::collect_process();
            super::gauges::set_state_gauges(&filter.status(), log.backlog(), log.backlog_bytes());
        }) as Arc<dyn Fn() + Send + Sync>;
        let stop = tasks.side_stop_signal();
        tasks.side(tokio::spawn(crate::telemetry::upkeep(
            handle.clone(),
            tasks.side_stop_signal(),
        )));
        tasks.side(tokio::spawn(crate::telemetry::serve(
            listener, handle, refresh, stop,
        )));
    }
    if let Some(l) = &config.health_listener {
        let listener = tokio_listener(l, "health")?;
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "health listening (plaintext, grpc.health.v1 only)");
        }
        let mut stop = tasks.side_stop_signal();
        let server = Server::builder()
            .add_service(health.service.clone())
            .serve_with_incoming_shutdown(incoming(listener), async move {
                let _ = stop.wait_for(|s| *s).await;
            });
        tasks.side(tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::warn!(error = %e, "health listener failed");
            }
        }));
    }
    Ok(())
}

/// A tokio listener on a copy of a bound std listener (the config keeps the original).
fn tokio_listener(l: &std::net::TcpListener, what: &str) -> Result<TcpListener, ServerError> {
    l.try_clone()
        .and_then(|l| {
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)
        })
        .map_err(|e| ServerError::Listener(format!("{what} listener: {e}")))
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A caller's `x-request-id` is kept only when sane (at most 64 characters of letters, digits,
/// `-`, `_`, `.`): anything else is dropped, and the request gets a fresh id instead.
fn drop_unusable_request_id(mut req: Request<Body>) -> Request<Body> {
    let usable = req.headers().get(&REQUEST_ID).is_none_or(|v| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= 64
            && b.iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    });
    if !usable {
        req.headers_mut().remove(&REQUEST_ID);
    }
    req
}

/// The request's span: its id and method; the OpenTelemetry name, kind and attributes (used only
/// when traces are on); the caller's trace as parent.
fn request_span(req: &Request<Body>) -> tracing::Span {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let method = req.uri().path();
    if !crate::traces::on() {
        return tracing::info_span!("request", id = %id, method = %method);
    }
    let span = tracing::info_span!(
        "request",
        id = %id,
        method = %method,
        otel.name = %method.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        otel.status_code = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    crate::traces::adopt_caller_trace(&span, req.headers());
    span
}

/// A failed call's gRPC status on its span (no event: the service logs what matters itself).
fn record_failure(failure: GrpcFailureClass, _latency: Duration, span: &tracing::Span) {
    span.record("otel.status_code", "ERROR");
    if let GrpcFailureClass::Status(status) = failure {
        span.record("rpc.grpc.status_code", status.code_raw());
    }
}

/// The listener's connections with TCP_NODELAY set. With its own incoming stream, tonic's
/// `Server::tcp_nodelay` does not apply; without it, Nagle's algorithm and delayed ACKs held every
/// multi-segment response back about 40 ms.
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}
