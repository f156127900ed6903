//! W3C trace context (`traceparent`, `tracestate`) in tonic metadata and HTTP headers
//! (what the gRPC layers in [`crate::grpc`] see).
//!
//! The W3C propagator is used directly rather than the global one, so propagation works the
//! same whether or not the process installed a global propagator.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Writes the trace context of the current `tracing` span into outgoing request metadata.
/// Writes nothing when there is no span or span export is off.
pub fn inject_context(metadata: &mut MetadataMap) {
    inject(&tracing::Span::current().context(), metadata);
}

/// Writes the trace context of `cx` into `metadata`.
pub fn inject(cx: &Context, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
}

/// Reads the trace context of an incoming request. Returns an empty context when the
/// metadata carries none (or a malformed one).
pub fn extract_context(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// Makes `span` a child of the trace in the incoming request's metadata, if there is one.
pub fn set_parent_from(span: &tracing::Span, metadata: &MetadataMap) {
    set_parent(span, extract_context(metadata));
}

/// Makes `span` a child of the trace in the incoming request's headers, if there is one.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    set_parent(
        span,
        TraceContextPropagator::new().extract(&HeaderExtractor(headers)),
    );
}

/// Writes the trace context of the current `tracing` span into outgoing request headers.
/// Writes nothing when there is no span or span export is off.
pub fn inject_headers(headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(
        &tracing::Span::current().context(),
        &mut HeaderInjector(headers),
    );
}

fn set_parent(span: &tracing::Span, cx: Context) {
    use opentelemetry::trace::TraceContextExt as _;
    if cx.span().span_context().is_valid() {
        // Fails only when the span is disabled or not recorded by OpenTelemetry.
        let _ = span.set_parent(cx);
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // As for metadata: only valid names and values are sent.
        if let (Ok(key), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Propagator keys and values are ASCII; anything else is dropped rather than sent.
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(|key| match key {
                KeyRef::Ascii(key) => key.as_str(),
                KeyRef::Binary(key) => key.as_str(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        TracerProvider as _,
    };
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    fn remote_context() -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes([0x4b; 16]),
            SpanId::from_bytes([0x0c; 8]),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }

    #[test]
    fn context_round_trips_through_metadata() {
        let cx = remote_context();
        let mut metadata = MetadataMap::new();
        inject(&cx, &mut metadata);
        assert_eq!(
            metadata.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-0c0c0c0c0c0c0c0c-01")
        );

        let extracted = extract_context(&metadata);
        let span = extracted.span();
        let got = span.span_context();
        assert!(got.is_valid());
        assert!(got.is_remote());
        assert_eq!(got.trace_id(), cx.span().span_context().trace_id());
        assert_eq!(got.span_id(), cx.span().span_context().span_id());
        assert!(got.is_sampled());
    }

    #[test]
    fn missing_or_malformed_context_is_empty() {
        assert!(!extract_context(&MetadataMap::new())
            .span()
            .span_context()
            .is_valid());

        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", MetadataValue::from_static("garbage"));
        assert!(!extract_context(&metadata).span().span_context().is_valid());

        let mut metadata = MetadataMap::new();
        inject(&Context::new(), &mut metadata);
        assert!(metadata.is_empty());
    }

    #[test]
    fn current_span_is_injected_and_parent_is_set() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            // A server span whose parent comes from incoming metadata...
            let mut incoming = MetadataMap::new();
            inject(&remote_context(), &mut incoming);
            let span = tracing::info_span!("handle");
            set_parent_from(&span, &incoming);
            let _entered = span.enter();

            // ...propagates the same trace to the next hop.
            let mut outgoing = MetadataMap::new();
            inject_context(&mut outgoing);
            let next = extract_context(&outgoing);
            let next_span = next.span();
            assert_eq!(
                next_span.span_context().trace_id(),
                TraceId::from_bytes([0x4b; 16])
            );
            assert_ne!(
                next_span.span_context().span_id(),
                SpanId::from_bytes([0x0c; 8])
            );
        });
    }
}
