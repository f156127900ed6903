//! Telemetry for the NanoBox binaries: tracing setup, Prometheus metrics, and trace
//! context propagation between services.
//!
//! [`init`] installs the global `tracing` subscriber: an env filter (`RUST_LOG`, default
//! `info`), human or JSON logs on stderr, and, when an OTLP endpoint is configured, export of
//! spans to an OpenTelemetry collector over gRPC. Only binaries call it; libraries just emit
//! `tracing` events and spans.
//!
//! [`metrics::serve`] installs the Prometheus recorder and serves `/metrics` on a listener
//! of its own; libraries record through the `metrics` facade.
//!
//! [`grpc::GrpcServerLayer`] is the tower layer of every gRPC server (a span per call,
//! child of the caller's trace; call counts and latencies), [`grpc::InjectContextLayer`]
//! the one of clients calling other NanoBox services. [`inject_context`] and
//! [`extract_context`] carry the W3C trace context (`traceparent`, `tracestate`) in gRPC
//! metadata by hand, so one trace follows a request from the gateway through the scheduler
//! to the node agent.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::expect_used, clippy::unwrap_used))]

pub mod grpc;
pub mod metrics;
mod propagation;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

pub use propagation::{
    extract_context, inject, inject_context, inject_headers, set_parent_from,
    set_parent_from_headers,
};

/// Environment variables naming the OTLP endpoint, most specific first (the OpenTelemetry
/// standard names).
const OTLP_ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Telemetry settings, typically the `[telemetry]` section of `nanobox.toml`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Log format on stderr.
    pub log_format: LogFormat,
    /// The filter used when `RUST_LOG` is not set, in `EnvFilter` syntax.
    pub default_filter: String,
    /// The OTLP gRPC endpoint (`http://collector:4317`). When unset, the standard
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` and `OTEL_EXPORTER_OTLP_ENDPOINT` variables are
    /// used; when none is set, spans are not exported.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            default_filter: "info".to_owned(),
            otlp_endpoint: None,
        }
    }
}

impl TelemetryConfig {
    /// The OTLP endpoint to export to, from the config or else the environment.
    pub fn resolved_otlp_endpoint(&self) -> Option<String> {
        self.resolve_endpoint(|name| std::env::var(name).ok())
    }

    fn resolve_endpoint(&self, env: impl Fn(&str) -> Option<String>) -> Option<String> {
        self.otlp_endpoint
            .clone()
            .into_iter()
            .chain(OTLP_ENDPOINT_VARS.iter().filter_map(|name| env(name)))
            .map(|endpoint| endpoint.trim().to_owned())
            .find(|endpoint| !endpoint.is_empty())
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `RUST_LOG` or the default filter is not a valid filter.
    #[error("invalid log filter")]
    Filter(#[source] tracing_subscriber::filter::ParseError),
    /// The OTLP exporter could not be built (bad endpoint, for example).
    #[error("cannot build the OTLP span exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber is already installed.
    #[error("a tracing subscriber is already installed")]
    AlreadyInitialized(#[source] tracing_subscriber::util::TryInitError),
    /// The metrics listener could not be bound.
    #[error("cannot listen for metrics on {addr}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The Prometheus recorder could not be built or installed (one is already).
    #[error("cannot install the metrics recorder")]
    MetricsRecorder(#[source] metrics_exporter_prometheus::BuildError),
}

/// Keeps telemetry running; dropping it flushes and shuts down span export. Hold it in
/// `main` until the service has stopped.
#[derive(Debug)]
#[must_use = "dropping the guard stops span export"]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Guard {
    /// Spans are exported over OTLP.
    pub fn exports_spans(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(err) = provider.shutdown() {
                tracing::warn!(error = %err, "span export did not shut down cleanly");
            }
        }
    }
}

/// Installs the global subscriber for the service `service_name` (the OpenTelemetry
/// `service.name`). With OTLP export configured it must be called inside a Tokio runtime,
/// which the gRPC exporter uses.
pub fn init(service_name: &str, config: &TelemetryConfig) -> Result<Guard, TelemetryError> {
    let filter = match EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(_) => EnvFilter::try_new(&config.default_filter).map_err(TelemetryError::Filter)?,
    };

    let provider = config
        .resolved_otlp_endpoint()
        .map(|endpoint| tracer_provider(service_name, &endpoint))
        .transpose()?;
    let otel_layer = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer(service_name.to_owned()))
    });

    let fmt_layer = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };

    tracing_subscriber::registry()
        .with(filter)
        .with(otel_layer)
        .with(fmt_layer)
        .try_init()
        .map_err(TelemetryError::AlreadyInitialized)?;

    if let Some(provider) = &provider {
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    Ok(Guard { provider })
}

fn tracer_provider(
    service_name: &str,
    endpoint: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(TelemetryError::Exporter)?;
    let resource = Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Gives `span` the OpenTelemetry name `name`, also once it has started (entered): a
/// recorded `otel.name` field only names a span that has not started yet. For spans
/// whose name is known only part-way, such as an HTTP request's once its route is found.
pub fn rename_span(span: &tracing::Span, name: String) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    span.record("otel.name", name.as_str());
    span.context().span().update_name(name);
}

/// Resolves when the process is asked to stop (SIGTERM or SIGINT): the shutdown future
/// every NanoBox service hands to its server, so all of them stop the same way and log it.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_prefers_config_then_traces_variable() {
        let env = |name: &str| match name {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => Some("http://traces:4317".to_owned()),
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://all:4317".to_owned()),
            _ => None,
        };
        let mut config = TelemetryConfig::default();
        assert_eq!(
            config.resolve_endpoint(env).as_deref(),
            Some("http://traces:4317")
        );
        assert_eq!(
            config
                .resolve_endpoint(
                    |n| (n == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://all:4317".to_owned())
                )
                .as_deref(),
            Some("http://all:4317")
        );
        assert_eq!(config.resolve_endpoint(|_| Some("  ".to_owned())), None);
        assert_eq!(config.resolve_endpoint(|_| None), None);

        config.otlp_endpoint = Some("http://config:4317".into());
        assert_eq!(
            config.resolve_endpoint(env).as_deref(),
            Some("http://config:4317")
        );
    }

    // The only test that installs the global subscriber, so it owns the process-wide state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn init_installs_once_and_exports_when_configured() {
        let config = TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:4317".into()),
            ..TelemetryConfig::default()
        };
        let guard = init("nanobox-test", &config).expect("first init");
        assert!(guard.exports_spans());
        tracing::info_span!("span", sandbox_id = "sb-test").in_scope(|| {
            tracing::info!("exported to nowhere; shutdown must still return");
        });
        assert!(matches!(
            init("nanobox-test", &TelemetryConfig::default()),
            Err(TelemetryError::AlreadyInitialized(_))
        ));
        drop(guard);
    }

    #[test]
    fn a_started_span_can_be_renamed() {
        use opentelemetry::trace::TracerProvider as _;
        let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("http", otel.name = "GET");
            let _entered = span.enter();
            rename_span(&span, "GET /api/v1/sandboxes/{id}".to_owned());
        });
        let spans = exporter.get_finished_spans().unwrap();
        assert_eq!(spans.len(), 1, "{spans:#?}");
        assert_eq!(spans[0].name, "GET /api/v1/sandboxes/{id}");
    }

    #[test]
    fn bad_default_filter_is_reported() {
        // RUST_LOG takes precedence, so only check the filter parser directly.
        assert!(EnvFilter::try_new("info,[=").is_err());
        assert!(EnvFilter::try_new(TelemetryConfig::default().default_filter).is_ok());
    }
}
