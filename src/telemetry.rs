//! Prometheus metrics, served as text on their own port (`serve --metrics-listen`).
//!
//! Recorded through the `metrics` facade, exported by `metrics-exporter-prometheus` (default
//! features off: no HTTP server or push gateway of its own; the scrape endpoint below is a few lines
//! of hyper on a listener we bind, so tests can use port 0). Without `--metrics-listen` no recorder
//! is installed and every macro is a no-op.
//!
//! Labels take only values from small fixed sets (outcome, reason, rpc, gRPC code, result). No NHS
//! number, organisation, key id or extract id is ever a label: they are unbounded, and the
//! organisations calling are not for every scraper to see.
//!
//! Gauges that describe state (filter size, freshness, audit backlog) are read when scraped.

use std::{sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::core::REASON_LABELS;

/// Buckets of every latency histogram, in seconds: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Installs the process-wide recorder once; later calls get the same handle.
pub fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .build_recorder();
    let handle = recorder.handle();
    // Fails only if another recorder is installed already (a second server in one process).
    let _ = metrics::set_global_recorder(recorder);
    let _ = HANDLE.set(handle.clone());
    describe();
    register_at_zero();
    Ok(HANDLE.get().cloned().unwrap_or(handle))
}

/// The admin RPCs, for their metrics.
const ADMIN_RPCS: [&str; 7] = [
    "add_opt_outs",
    "remove_opt_outs",
    "import_opt_outs",
    "get_opt_out",
    "read_audit",
    "get_status",
    "acknowledge_store_regression",
];

/// Every counter an alert or a dashboard reads, at zero before its first event (a counter that
/// appears only when something happens cannot be told apart from one nobody exports), and the
/// build's version.
fn register_at_zero() {
    for (outcome, reason) in REASON_LABELS {
        metrics::counter!("optout_check_numbers_total", "outcome" => outcome, "reason" => reason)
            .increment(0);
    }
    for rpc in ["check", "check_stream"] {
        metrics::counter!("optout_check_requests_total", "rpc" => rpc, "code" => "ok").increment(0);
    }
    for claim in ["purpose", "legal_basis", "organisation"] {
        metrics::counter!("optout_check_claims_refused_total", "claim" => claim).increment(0);
    }
    for rpc in ADMIN_RPCS {
        metrics::counter!("optout_admin_requests_total", "rpc" => rpc, "code" => "ok").increment(0);
    }
    for result in ["ok", "error", "timeout"] {
        metrics::counter!("optout_store_lookups_total", "result" => result).increment(0);
    }
    metrics::counter!("optout_rate_limited_total").increment(0);
    for why in ["idle", "no_request"] {
        metrics::counter!("optout_connections_idle_closed_total", "why" => why).increment(0);
    }
    for limit in ["total", "peer"] {
        metrics::counter!("optout_connections_refused_total", "limit" => limit).increment(0);
    }
    metrics::counter!("optout_check_version_not_reached_total").increment(0);
    metrics::counter!("optout_store_behind_filter_total").increment(0);
    metrics::gauge!(
        "optout_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => env!("OPTOUT_GIT_COMMIT")
    )
    .set(1.0);
}

/// Counts one admin RPC by its gRPC code and records how long it took.
pub fn observe_admin(
    rpc: &'static str,
    started: std::time::Instant,
    error: Option<&tonic::Status>,
) {
    let code = error.map_or(tonic::Code::Ok, tonic::Status::code);
    metrics::counter!("optout_admin_requests_total", "rpc" => rpc, "code" => code_label(code))
        .increment(1);
    metrics::histogram!("optout_admin_duration_seconds", "rpc" => rpc)
        .record(started.elapsed().as_secs_f64());
}

/// The process's CPU, memory, file descriptors and threads (`process_*`, as Prometheus' client
/// libraries name them), read just before a scrape.
pub fn collect_process() {
    static COLLECTOR: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    COLLECTOR
        .get_or_init(|| {
            let c = metrics_process::Collector::default();
            c.describe();
            c
        })
        .collect();
}

fn describe() {
    describe_requests();
    describe_store();
    describe_filter();
    describe_audit();
    describe_connections();
}

/// Checks and admin calls: requests, decisions, durations, the build.
fn describe_requests() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "optout_check_requests_total",
        "Check and CheckStream messages answered or refused, by rpc and gRPC code"
    );
    describe_counter!(
        "optout_check_claims_refused_total",
        "Checks refused because the key may not claim what they claimed: a purpose, a legal \
         basis, or another organisation's population store"
    );
    describe_counter!(
        "optout_admin_requests_total",
        "Admin calls (changes, imports, look-ups, status, audit reads), by rpc and gRPC code"
    );
    describe_histogram!(
        "optout_admin_duration_seconds",
        Unit::Seconds,
        "Admin call latency, by rpc (an import: from its first message to its answer)"
    );
    describe_gauge!(
        "optout_build_info",
        "1, labelled with the version of the optout binary and the git commit it was built from"
    );
    describe_counter!(
        "optout_check_numbers_total",
        "NHS numbers answered, by outcome and reason"
    );
    describe_histogram!(
        "optout_check_duration_seconds",
        Unit::Seconds,
        "Time to answer one Check (or one CheckStream message), by rpc"
    );
    describe_counter!(
        "optout_check_version_not_reached_total",
        "Checks whose at_least_version was beyond anything the store holds"
    );
}

/// The consent store as the check path and the follower use it.
fn describe_store() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "optout_store_lookups_total",
        "Batched store lookups of the check path, by result (ok, error, timeout)"
    );
    describe_histogram!(
        "optout_store_lookup_duration_seconds",
        Unit::Seconds,
        "Time of one batched store lookup (one round trip to Redis)"
    );
    describe_counter!(
        "optout_store_lookup_numbers_total",
        "NHS numbers sent to the store (the filter's maybes)"
    );
    describe_counter!(
        "optout_store_feed_reads_total",
        "Reads of the store's change feed by the filter follower, by result"
    );
    describe_gauge!(
        "optout_store_regressed",
        "1 while this replica fails closed because the store went back in time"
    );
    describe_counter!(
        "optout_store_regressions_total",
        "Times this replica saw the store go back in time and failed closed"
    );
    describe_counter!(
        "optout_store_behind_filter_total",
        "Store answers older than the filter's version, withheld"
    );
}

/// The filter and the lists it answers from: size, freshness, age.
fn describe_filter() {
    use metrics::{Unit, describe_gauge};
    describe_gauge!("optout_filter_items", "Opt-outs in the filter generation");
    describe_gauge!(
        "optout_filter_capacity",
        "Items the generation is sized for"
    );
    describe_gauge!("optout_filter_bits", "Bits of the filter generation");
    describe_gauge!("optout_filter_generation", "Filter generation number");
    describe_gauge!(
        "optout_filter_estimated_fp_rate",
        "Expected false-positive rate at the current number of items"
    );
    describe_gauge!(
        "optout_filter_loaded",
        "1 when a filter generation is loaded for the store's dataset"
    );
    describe_gauge!(
        "optout_list_age_seconds",
        Unit::Seconds,
        "Age of each type's opt-out list (since the national check, or the last REPLACE import); +Inf if never imported whole"
    );
    describe_gauge!(
        "optout_list_expires_in_seconds",
        Unit::Seconds,
        "Time until each type's list passes its maximum age (negative: expired, its numbers withheld); +Inf without a maximum age"
    );
    describe_gauge!(
        "optout_list_expired",
        "1 while a type's list is past its maximum age and the numbers it applies to are withheld"
    );
    describe_gauge!(
        "optout_population_patients",
        "Population mode: patients in the last national check (a number outside it is withheld)"
    );
    describe_gauge!(
        "optout_filter_fresh",
        "1 when the filter is proven caught up within the freshness bound"
    );
    describe_gauge!(
        "optout_filter_freshness_age_seconds",
        Unit::Seconds,
        "Since the filter was last proven caught up with the store"
    );
    describe_gauge!(
        "optout_filter_version_lag_seconds",
        Unit::Seconds,
        "How far the store's version was ahead of the filter's at the last store lookup"
    );
}

/// The check log and the changes trail: backlog, writes, refusals.
fn describe_audit() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "optout_store_audit_writes_total",
        "Batched writes of check audit records to the store, by result (ok, error)"
    );
    describe_histogram!(
        "optout_store_audit_write_duration_seconds",
        Unit::Seconds,
        "Time of one batched audit write (one round trip to Redis)"
    );
    describe_gauge!(
        "optout_audit_backlog",
        "Check audit records queued and not yet written"
    );
    describe_gauge!(
        "optout_audit_backlog_bytes",
        "Bytes of check audit records queued and not yet written (bounded by --audit-queue-mib)"
    );
    describe_counter!(
        "optout_audit_queue_full_total",
        "Checks withheld because the audit queue was full (records or bytes)"
    );
}

/// Connections, rate limits and authentication in front of the services.
fn describe_connections() {
    use metrics::describe_counter;
    describe_counter!(
        "optout_connections_idle_closed_total",
        "Client connections closed: why=idle after --idle-timeout-secs without traffic, \
         why=no_request when no request came within --first-request-timeout-secs"
    );
    describe_counter!(
        "optout_connections_refused_total",
        "Client connections closed at accept: limit=total (--max-connections reached) or \
         limit=peer (--max-connections-per-peer reached for the peer's address)"
    );
    describe_counter!(
        "optout_rate_limited_total",
        "Requests or stream messages refused with RESOURCE_EXHAUSTED by the per-organisation \
         rate limit (NHS numbers per second)"
    );
    describe_counter!(
        "optout_auth_refused_total",
        "Requests refused by authentication or role, by gRPC code"
    );
}

/// The gRPC code as a label value.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// How often the recorder's histogram samples are folded into their buckets.
const UPKEEP: Duration = Duration::from_secs(5);

/// Runs the recorder's upkeep every `UPKEEP` (5 s) until `stop` turns true. The recorder keeps each
/// histogram sample (8 bytes: every check's and every store lookup's duration) until upkeep or a
/// scrape folds it into the buckets; a replica nobody scraped held them all, about 10 MiB a
/// minute under load (issue 32). The crate's own HTTP exporter runs the same upkeep; this
/// service renders its own endpoint, so it runs it here.
pub async fn upkeep(handle: PrometheusHandle, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(UPKEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Serves the scrape endpoint on `listener` until `stop` turns true. `refresh` sets the state
/// gauges just before each scrape is rendered.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    refresh: Arc<dyn Fn() + Send + Sync>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics listening");
    }
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = if req.uri().path() == "/metrics" {
                    refresh();
                    Ok(handle.render())
                } else {
                    Err(())
                };
                async move {
                    match body {
                        Ok(text) => Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(text))),
                        Err(()) => Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"metrics are at /metrics\n"))),
                    }
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            // A scrape that stalls is dropped after a minute rather than held forever.
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}
