//! Traces over OTLP: off unless `serve --otlp-endpoint` names a collector. Each gRPC request's
//! span (see `server::transport`) becomes an OpenTelemetry span, a child of the caller's W3C
//! `traceparent` when it sent one, exported in batches over OTLP/gRPC. A span carries the method,
//! the request id and the gRPC status; never an NHS number (no span field holds one).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use opentelemetry::{KeyValue, propagation::TextMapPropagator, trace::TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    runtime,
    trace::{
        BatchConfigBuilder, Sampler, SdkTracer, SdkTracerProvider,
        span_processor_with_async_runtime,
    },
};
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};

/// Where and how much to trace.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// The share of requests without a sampled `traceparent` that start a trace (0 to 1). A
    /// caller's own sampling decision, in its `traceparent`, is followed either way.
    pub sample_ratio: f64,
    /// PEM CA certificate(s) an `https://` collector's certificate must chain to; the public
    /// web roots when absent.
    pub ca_pem: Option<Vec<u8>>,
}

/// Whether requests' spans are exported (so the `traceparent` is worth reading).
static ON: AtomicBool = AtomicBool::new(false);

/// The running exporter; shut down (flushing what is queued) when the process ends.
pub struct Traces {
    provider: SdkTracerProvider,
}

/// The `tracing` layer that turns spans into OpenTelemetry spans and exports them, and the handle
/// that flushes them at exit. Must be called inside the tokio runtime (the batch exporter is a
/// task on it).
pub fn layer<S>(config: &OtlpConfig) -> Result<(OpenTelemetryLayer<S, SdkTracer>, Traces), String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    if !(0.0..=1.0).contains(&config.sample_ratio) {
        return Err(format!(
            "--otlp-sample-ratio must be between 0 and 1, not {}",
            config.sample_ratio
        ));
    }
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&config.endpoint)
        .with_timeout(Duration::from_secs(10));
    if config.endpoint.starts_with("https://") {
        let tls = tonic::transport::ClientTlsConfig::new();
        exporter = exporter.with_tls_config(match &config.ca_pem {
            Some(pem) => tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            None => tls.with_webpki_roots(),
        });
    } else if config.ca_pem.is_some() {
        return Err("--otlp-ca-cert needs an https:// --otlp-endpoint".into());
    }
    let exporter = exporter
        .build()
        .map_err(|e| format!("--otlp-endpoint {}: {e}", config.endpoint))?;
    // A full queue drops spans rather than holding requests back: tracing must never slow answers.
    let batches = BatchConfigBuilder::default()
        .with_max_queue_size(8192)
        .with_scheduled_delay(Duration::from_secs(1))
        .build();
    let processor =
        span_processor_with_async_runtime::BatchSpanProcessor::builder(exporter, runtime::Tokio)
            .with_batch_config(batches)
            .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name("optout")
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        )
        .build();
    let tracer = provider.tracer("optout");
    ON.store(true, Ordering::Relaxed);
    Ok((
        tracing_opentelemetry::layer().with_tracer(tracer),
        Traces { provider },
    ))
}

/// Whether requests' spans are exported.
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Makes `span` a child of the caller's trace when the request carries a W3C `traceparent` (and
/// `tracestate`). Nothing when traces are off.
pub fn adopt_caller_trace(span: &tracing::Span, headers: &tonic::codegen::http::HeaderMap) {
    if !ON.load(Ordering::Relaxed) || !headers.contains_key("traceparent") {
        return;
    }
    let parent =
        TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    // Fails only when the span is disabled (filtered out): nothing to attach to then.
    let _ = span.set_parent(parent);
}

impl Traces {
    /// Exports what is queued and stops; gives up after `within`.
    pub async fn shutdown(self, within: Duration) {
        let provider = self.provider;
        // The flush blocks until the exporter task (on this runtime) has sent the last batch.
        let flush = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(within, flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "traces: the last batch was not exported"),
            Ok(Err(e)) => tracing::warn!(error = %e, "traces: the flush failed"),
            Err(_) => tracing::warn!(
                secs = within.as_secs_f64(),
                "traces: the last batch was not exported in time"
            ),
        }
    }
}
