//! One tower layer for every NanoBox gRPC server ([`GrpcServerLayer`]) and one for the
//! clients that call other NanoBox services ([`InjectContextLayer`]).
//!
//! The server layer gives each request a span whose parent is the caller's W3C trace
//! context (`traceparent` in the request metadata), so a trace started at the gateway
//! continues through the scheduler to the node agent, and it counts and times every call
//! by service, method and gRPC status code ([`GRPC_REQUESTS`], [`GRPC_DURATION`]). The
//! span and the timer last until the response body ends, so a streamed call (exec) is
//! measured to its last message, and the status code is read from the trailers where
//! gRPC puts it.
//!
//! The client layer writes the current span's trace context into each outgoing request,
//! so the callee's span (made by its server layer) becomes a child of the caller's.
//!
//! Health checks and reflection are counted but get no span: probes every few seconds
//! would otherwise fill the trace store with one-span traces.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};
use tracing::field::Empty;

use crate::propagation::{inject_headers, set_parent_from_headers};

/// Counter of finished gRPC calls served, by `service`, `method` and `code`.
pub const GRPC_REQUESTS: &str = "nanobox_grpc_server_requests_total";
/// Histogram of gRPC call durations in seconds (to the end of the response stream), by
/// `service`, `method` and `code`.
pub const GRPC_DURATION: &str = "nanobox_grpc_server_request_duration_seconds";

/// Describes the gRPC series (their HELP lines); [`crate::metrics::install`] calls it.
pub(crate) fn describe() {
    ::metrics::describe_counter!(
        GRPC_REQUESTS,
        "gRPC calls served, by service, method and status code"
    );
    ::metrics::describe_histogram!(
        GRPC_DURATION,
        ::metrics::Unit::Seconds,
        "gRPC call durations, to the end of the response stream, by service, method and status code"
    );
}

/// Services that get metrics but no span (probes and tools).
const UNTRACED_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The gRPC status code names, by number (as in the gRPC spec and the gateway's JSON
/// errors).
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of the gRPC status code `value` (a `grpc-status` header's text).
fn code_name(value: &[u8]) -> &'static str {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.trim().parse::<usize>().ok())
        .and_then(|code| CODE_NAMES.get(code).copied())
        .unwrap_or("UNKNOWN")
}

/// `/package.Service/Method` split into service and method; `("unknown", path)` for any
/// other path.
fn service_and_method(path: &str) -> (String, String) {
    match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((service, method)) if !service.is_empty() && !method.is_empty() => {
            (service.to_owned(), method.to_owned())
        }
        _ => ("unknown".to_owned(), path.to_owned()),
    }
}

/// The layer every NanoBox gRPC server adds (`Server::builder().layer(GrpcServerLayer)`):
/// a span per call, a child of the caller's trace, and call metrics.
///
/// The span is named `grpc` (OpenTelemetry name `package.Service/Method`, kind server)
/// and has empty `sandbox_id`, `template` and `node_id` fields that the handlers fill in
/// with `tracing::Span::current().record(..)` where they know them.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcServerLayer;

impl<S> Layer<S> for GrpcServerLayer {
    type Service = GrpcServer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServer { inner }
    }
}

/// The service [`GrpcServerLayer`] makes.
#[derive(Debug, Clone)]
pub struct GrpcServer<S> {
    inner: S,
}

impl<S, B, ResBody> Service<http::Request<B>> for GrpcServer<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = ObservedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = service_and_method(request.uri().path());
        let span = if UNTRACED_SERVICES.contains(&service.as_str()) {
            tracing::Span::none()
        } else {
            let span = tracing::info_span!(
                "grpc",
                otel.name = %format_args!("{service}/{method}"),
                otel.kind = "server",
                otel.status_code = Empty,
                rpc.system = "grpc",
                rpc.service = %service,
                rpc.method = %method,
                rpc.grpc.status_code = Empty,
                sandbox_id = Empty,
                template = Empty,
                node_id = Empty,
            );
            set_parent_from_headers(&span, request.headers());
            span
        };
        let future = span.in_scope(|| self.inner.call(request));
        ObservedFuture {
            inner: future,
            call: Some(Call {
                service,
                method,
                started: Instant::now(),
                span,
                code: None,
            }),
        }
    }
}

/// One call being served: what its metrics and span need when it ends.
#[derive(Debug)]
struct Call {
    service: String,
    method: String,
    started: Instant,
    span: tracing::Span,
    /// The status code, once seen (in the response headers or trailers).
    code: Option<&'static str>,
}

impl Call {
    /// Records the call's metrics and closes its span.
    fn finish(self, code: &'static str) {
        let labels = [
            ("service", self.service),
            ("method", self.method),
            ("code", code.to_owned()),
        ];
        ::metrics::counter!(GRPC_REQUESTS, &labels).increment(1);
        ::metrics::histogram!(GRPC_DURATION, &labels).record(self.started.elapsed().as_secs_f64());
        self.span.record("rpc.grpc.status_code", code);
        if code != "OK" {
            self.span.record("otel.status_code", "ERROR");
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`GrpcServer`]: runs the call in its span.
    pub struct ObservedFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F: std::fmt::Debug> std::fmt::Debug for ObservedFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedFuture")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<F, ResBody, E> Future for ObservedFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<ObservedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.call.as_ref() {
            Some(call) => {
                let _entered = call.span.enter();
                ready!(this.inner.poll(cx))
            }
            None => ready!(this.inner.poll(cx)),
        };
        let mut call = this.call.take();
        match result {
            Ok(response) => {
                // A call that fails at once answers with the status in its headers
                // ("trailers-only"); others put it in the trailers.
                if let (Some(call), Some(status)) =
                    (call.as_mut(), response.headers().get("grpc-status"))
                {
                    call.code = Some(code_name(status.as_bytes()));
                }
                Poll::Ready(Ok(response.map(|inner| ObservedBody { inner, call })))
            }
            Err(e) => {
                if let Some(call) = call {
                    call.finish("UNKNOWN");
                }
                Poll::Ready(Err(e))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends its call's span and records its metrics when it ends
    /// (or is dropped: the client went away).
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for ObservedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                // Ended before its status was sent: the client cancelled the call.
                let code = call.code.unwrap_or("CANCELLED");
                call.finish(code);
            }
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for ObservedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedBody")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        // Work done while streaming (a handler's stream producing messages) belongs to
        // the call's span too.
        let frame = match this.call.as_ref() {
            Some(call) => {
                let _entered = call.span.enter();
                ready!(this.inner.poll_frame(cx))
            }
            None => ready!(this.inner.poll_frame(cx)),
        };
        match &frame {
            Some(Ok(frame)) => {
                if let (Some(call), Some(status)) = (
                    this.call.as_mut(),
                    frame.trailers_ref().and_then(|t| t.get("grpc-status")),
                ) {
                    call.code = Some(code_name(status.as_bytes()));
                }
            }
            Some(Err(_)) => {
                if let Some(call) = this.call.take() {
                    call.finish("UNKNOWN");
                }
            }
            None => {
                if let Some(call) = this.call.take() {
                    let code = call.code.unwrap_or("UNKNOWN");
                    call.finish(code);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The layer for clients of NanoBox services: writes the current span's trace context
/// (`traceparent`, `tracestate`) into every outgoing request. Add it under the channel
/// (`InjectContextLayer.layer(channel)`), before any interceptor.
#[derive(Debug, Clone, Copy, Default)]
pub struct InjectContextLayer;

impl<S> Layer<S> for InjectContextLayer {
    type Service = InjectContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InjectContext { inner }
    }
}

/// The service [`InjectContextLayer`] makes.
#[derive(Debug, Clone)]
pub struct InjectContext<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for InjectContext<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // Called by the client's future, so the current span is the caller's.
        inject_headers(request.headers_mut());
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full, StreamBody};
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        TracerProvider as _,
    };
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tower::ServiceExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn codes_and_paths() {
        assert_eq!(code_name(b"0"), "OK");
        assert_eq!(code_name(b"5"), "NOT_FOUND");
        assert_eq!(code_name(b"16"), "UNAUTHENTICATED");
        assert_eq!(code_name(b"17"), "UNKNOWN");
        assert_eq!(code_name(b"x"), "UNKNOWN");
        assert_eq!(
            service_and_method("/nanobox.v1.Sandboxes/Create"),
            ("nanobox.v1.Sandboxes".to_owned(), "Create".to_owned())
        );
        assert_eq!(
            service_and_method("/nope"),
            ("unknown".to_owned(), "/nope".to_owned())
        );
    }

    fn traceparent() -> String {
        let cx = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes([0x4b; 16]),
            SpanId::from_bytes([0x0c; 8]),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ));
        let mut metadata = tonic::metadata::MetadataMap::new();
        crate::inject(&cx, &mut metadata);
        metadata
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }

    type Frames = Vec<Result<Frame<Bytes>, Infallible>>;
    type FrameStream = futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;

    /// A server answering every call with `frames`, noting the trace context the handler
    /// ran in and the headers a client layer under it would send on.
    fn server(
        frames: fn() -> Frames,
        seen: Arc<Mutex<Vec<String>>>,
    ) -> impl Service<
        http::Request<Full<Bytes>>,
        Response = http::Response<StreamBody<FrameStream>>,
        Error = Infallible,
    > + Clone {
        tower::service_fn(move |_request: http::Request<Full<Bytes>>| {
            let frames = frames();
            let seen = seen.clone();
            async move {
                // What a call to the next service from this handler would carry.
                let mut next = http::HeaderMap::new();
                inject_headers(&mut next);
                if let Some(value) = next.get("traceparent").and_then(|v| v.to_str().ok()) {
                    seen.lock().unwrap().push(value.to_owned());
                }
                Ok::<_, Infallible>(http::Response::new(StreamBody::new(futures::stream::iter(
                    frames,
                ))))
            }
        })
    }

    /// Runs `f` with a subscriber that exports spans to memory and a local metrics
    /// recorder; returns the finished spans and the rendered metrics.
    fn observed(f: impl AsyncFnOnce()) -> (Vec<opentelemetry_sdk::trace::SpanData>, String) {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        tracing::subscriber::with_default(subscriber, || {
            ::metrics::with_local_recorder(&recorder, || runtime.block_on(f()));
        });
        provider.force_flush().unwrap();
        (exporter.get_finished_spans().unwrap(), handle.render())
    }

    #[test]
    fn a_streamed_call_is_one_span_under_the_callers_trace() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let frames = || {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            vec![
                Ok(Frame::data(Bytes::from_static(b"one"))),
                Ok(Frame::data(Bytes::from_static(b"two"))),
                Ok(Frame::trailers(trailers)),
            ]
        };
        let svc = GrpcServerLayer.layer(server(frames, seen.clone()));
        let (spans, metrics) = observed(async || {
            let request = http::Request::builder()
                .uri("/nanobox.v1.Sandboxes/Exec")
                .header("traceparent", traceparent())
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = svc.oneshot(request).await.unwrap();
            let body = response.into_body().collect().await.unwrap();
            assert_eq!(body.to_bytes(), Bytes::from_static(b"onetwo"));
        });

        let [span] = spans.as_slice() else {
            panic!("one span expected: {spans:#?}");
        };
        assert_eq!(span.name, "nanobox.v1.Sandboxes/Exec");
        assert_eq!(span.span_kind, opentelemetry::trace::SpanKind::Server);
        assert_eq!(
            span.span_context.trace_id(),
            TraceId::from_bytes([0x4b; 16])
        );
        assert_eq!(span.parent_span_id, SpanId::from_bytes([0x0c; 8]));
        // The handler ran in the span: a call it made would continue the trace.
        let next = seen.lock().unwrap().clone();
        assert_eq!(next.len(), 1, "{next:?}");
        assert!(
            next[0].contains(&format!(
                "{}-{}",
                span.span_context.trace_id(),
                span.span_context.span_id()
            )),
            "{next:?} vs {span:?}"
        );
        assert!(
            metrics.contains(
                "nanobox_grpc_server_requests_total{service=\"nanobox.v1.Sandboxes\",method=\"Exec\",code=\"OK\"} 1"
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains("nanobox_grpc_server_request_duration_seconds_count{service=\"nanobox.v1.Sandboxes\",method=\"Exec\",code=\"OK\"} 1"),
            "{metrics}"
        );
    }

    #[test]
    fn trailers_only_errors_and_cancelled_calls_are_counted_by_code() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let svc = GrpcServerLayer.layer(tower::service_fn(|_: http::Request<Full<Bytes>>| async {
            let mut response = http::Response::new(Full::new(Bytes::new()));
            response
                .headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("5"));
            Ok::<_, Infallible>(response)
        }));
        let streaming = GrpcServerLayer.layer(server(
            || vec![Ok(Frame::data(Bytes::from_static(b"partial")))],
            seen,
        ));
        let (spans, metrics) = observed(async || {
            let request = |path: &str| {
                http::Request::builder()
                    .uri(path)
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            };
            let response = svc
                .oneshot(request("/nanobox.v1.Sandboxes/Get"))
                .await
                .unwrap();
            response.into_body().collect().await.unwrap();
            // A client that reads one message and goes away.
            let response = streaming
                .oneshot(request("/nanobox.v1.Sandboxes/Exec"))
                .await
                .unwrap();
            let mut body = response.into_body();
            body.frame().await.unwrap().unwrap();
            drop(body);
        });
        assert!(
            metrics.contains(
                "nanobox_grpc_server_requests_total{service=\"nanobox.v1.Sandboxes\",method=\"Get\",code=\"NOT_FOUND\"} 1"
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains(
                "nanobox_grpc_server_requests_total{service=\"nanobox.v1.Sandboxes\",method=\"Exec\",code=\"CANCELLED\"} 1"
            ),
            "{metrics}"
        );
        assert_eq!(spans.len(), 2, "{spans:#?}");
        assert!(spans
            .iter()
            .all(|s| s.status != opentelemetry::trace::Status::Ok));
        // No caller's context: each call starts its own trace.
        assert!(spans.iter().all(|s| s.parent_span_id == SpanId::INVALID));
    }

    #[test]
    fn health_checks_get_metrics_but_no_span() {
        let svc = GrpcServerLayer.layer(tower::service_fn(|_: http::Request<Full<Bytes>>| async {
            let mut response = http::Response::new(Full::new(Bytes::new()));
            response
                .headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("0"));
            Ok::<_, Infallible>(response)
        }));
        let (spans, metrics) = observed(async || {
            let request = http::Request::builder()
                .uri("/grpc.health.v1.Health/Check")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response = svc.oneshot(request).await.unwrap();
            response.into_body().collect().await.unwrap();
        });
        assert!(spans.is_empty(), "{spans:#?}");
        assert!(
            metrics.contains("service=\"grpc.health.v1.Health\",method=\"Check\",code=\"OK\"} 1"),
            "{metrics}"
        );
    }

    #[test]
    fn the_client_layer_sends_the_current_context() {
        let sent = Arc::new(Mutex::new(None));
        let record = sent.clone();
        let svc = InjectContextLayer.layer(tower::service_fn(move |r: http::Request<()>| {
            *record.lock().unwrap() = r.headers().get("traceparent").cloned();
            async { Ok::<_, Infallible>(()) }
        }));
        let (spans, _) = observed(async || {
            let span = tracing::info_span!("caller");
            let _entered = span.enter();
            svc.oneshot(http::Request::new(())).await.unwrap();
        });
        let sent = sent
            .lock()
            .unwrap()
            .clone()
            .expect("a traceparent was sent");
        let [caller] = spans.as_slice() else {
            panic!("{spans:#?}");
        };
        assert!(sent
            .to_str()
            .unwrap()
            .contains(&caller.span_context.span_id().to_string()));
    }
}
