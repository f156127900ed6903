//! The HTTP side: the axum router with API-key checks, body limits, deadlines, request ids,
//! tracing and request metrics, dispatching each request to its route and its upstream.
//!
//! Each request runs in an `http` span (a child of the caller's `traceparent`, if any);
//! its trace context is what the upstream call carries, so the upstream's span is its
//! child.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, ReflectMessage as _, ServiceDescriptor, Value as PValue,
};
use tokio::time::Instant;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::Code;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};

use crate::auth::ApiKeys;
use crate::error::RouteError;
use crate::openapi::{self, OPENAPI_PATH};
use crate::routes::{Route, RouteMatch, RouteTable};
use crate::status::ApiError;
use crate::stream::{self, EXEC_EVENT, NDJSON};
use crate::transcode;
use crate::upstream::Upstream;

/// The liveness path; open even when API keys are configured.
pub const HEALTH_PATH: &str = "/healthz";

/// How long past a command's own `timeout_ms` the gateway waits for its exit before giving
/// up (the node agent kills the command at its deadline; this covers the reporting).
pub const EXEC_GRACE: Duration = Duration::from_secs(30);

/// The longest a streamed call without a `timeout_ms` may run: the longest a sandbox lives
/// (`timeout_sec` is at most 86400).
pub const MAX_STREAM_DURATION: Duration = Duration::from_secs(86_400);

/// Request headers passed on to the upstream as gRPC metadata: the caller's credentials
/// (the upstream may check API keys itself) and the request and trace ids.
const FORWARDED_HEADERS: &[&str] = &["authorization", "x-request-id", "traceparent", "tracestate"];

/// How the gateway treats requests.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// The keys clients must present; none leaves the API open.
    pub api_keys: ApiKeys,
    /// The largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// The deadline of a unary call (and of an aggregated exec without `timeout_ms`),
    /// reading the body included; past it the answer is 504.
    pub request_timeout: Duration,
    /// The most output an aggregated exec keeps per stream (stdout, stderr).
    pub exec_output_limit: usize,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            api_keys: ApiKeys::default(),
            max_body_bytes: 16 << 20,
            request_timeout: Duration::from_secs(60),
            exec_output_limit: 1 << 20,
        }
    }
}

/// The REST gateway: routes, upstreams, options and the OpenAPI document.
#[derive(Debug)]
pub struct Gateway {
    routes: RouteTable,
    upstreams: Vec<Upstream>,
    options: GatewayOptions,
    openapi: Bytes,
}

impl Gateway {
    /// A gateway for the services in `pool` that `upstream_for` maps to an index into
    /// `upstreams` (others are not exposed).
    pub fn new(
        pool: &DescriptorPool,
        upstreams: Vec<Upstream>,
        upstream_for: impl Fn(&ServiceDescriptor) -> Option<usize>,
        options: GatewayOptions,
    ) -> Result<Self, RouteError> {
        let routes = RouteTable::build(pool, &upstream_for)?;
        if let Some(route) = routes
            .routes()
            .iter()
            .find(|r| r.upstream >= upstreams.len())
        {
            return Err(RouteError::NoUpstream {
                service: route.method.parent_service().full_name().to_owned(),
            });
        }
        let document = openapi::document(pool, &routes, env!("CARGO_PKG_VERSION"));
        let openapi = Bytes::from(document.to_string());
        Ok(Self {
            routes,
            upstreams,
            options,
            openapi,
        })
    }

    /// The routes served.
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// The OpenAPI document, as served.
    pub fn openapi(&self) -> &Bytes {
        &self.openapi
    }

    /// The axum router serving the gateway.
    pub fn router(self) -> Router {
        let gateway = Arc::new(self);
        let api = Router::new()
            .fallback(dispatch)
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&gateway),
                authenticate,
            ));
        Router::new()
            .route(HEALTH_PATH, get(health))
            .route(OPENAPI_PATH, get(openapi_document))
            .merge(api)
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&gateway),
                crate::metrics::record,
            ))
            .with_state(gateway)
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(make_span)
                    .on_response(DefaultOnResponse::new().level(tracing::Level::INFO))
                    // 5xx answers are mostly an upstream being down, already logged where
                    // it was seen; an error per failed request would drown the logs.
                    .on_failure(DefaultOnFailure::new().level(tracing::Level::WARN)),
            )
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
    }
}

/// The span of one request, a child of the caller's trace if it sent `traceparent`.
fn make_span(request: &Request) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // `otel.name` becomes "METHOD /route/{template}" once the route is known.
    let span = tracing::info_span!(
        "http",
        otel.name = %request.method(),
        otel.kind = "server",
        method = %request.method(),
        path = %request.uri().path(),
        request_id,
        rpc = tracing::field::Empty,
        http.route = tracing::field::Empty,
        sandbox_id = tracing::field::Empty,
        template = tracing::field::Empty,
    );
    if request.headers().contains_key("traceparent") {
        nanobox_telemetry::set_parent_from(&span, &trace_metadata(request.headers()));
    }
    span
}

/// Names the request's span after its route, and gives it the sandbox or template the
/// path names.
fn record_route(route: &Route, bindings: &[(String, String)]) {
    let span = tracing::Span::current();
    span.record("rpc", route.rpc_name())
        .record("http.route", route.template.as_str());
    nanobox_telemetry::rename_span(
        &span,
        format!("{} {}", route.http_method, route.template.as_str()),
    );
    let service = route.method.parent_service().name();
    for (field, value) in bindings {
        match (service, field.as_str()) {
            ("Sandboxes", "id") => {
                span.record("sandbox_id", value.as_str());
            }
            ("Templates", "name") => {
                span.record("template", value.as_str());
            }
            _ => {}
        }
    }
}

fn trace_metadata(headers: &HeaderMap) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    for name in ["traceparent", "tracestate"] {
        if let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()) {
            if let Ok(value) = MetadataValue::try_from(value) {
                metadata.insert(name, value);
            }
        }
    }
    metadata
}

async fn health() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({"status": "SERVING"}))
}

async fn openapi_document(State(gateway): State<Arc<Gateway>>) -> Response {
    let mut response = gateway.openapi.clone().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Lets a request through only with a valid API key (or when none are configured).
async fn authenticate(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    match gateway.options.api_keys.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => {
            tracing::info!(error = %e, "request refused");
            e.into_response()
        }
    }
}

async fn dispatch(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    match gateway.routes.find(&parts.method, parts.uri.path()) {
        RouteMatch::NotFound => ApiError::new(
            Code::NotFound,
            format!("no route for {} {}", parts.method, parts.uri.path()),
        )
        .into_response(),
        RouteMatch::MethodNotAllowed(allowed) => {
            let allowed: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
            let mut response = ApiError::new(
                Code::Unimplemented,
                format!(
                    "{} is not allowed on {}; allowed: {}",
                    parts.method,
                    parts.uri.path(),
                    allowed.join(", ")
                ),
            )
            .with_http(StatusCode::METHOD_NOT_ALLOWED)
            .into_response();
            if let Ok(value) = HeaderValue::from_str(&allowed.join(", ")) {
                response.headers_mut().insert(header::ALLOW, value);
            }
            response
        }
        RouteMatch::Found(route, bindings) => {
            record_route(route, &bindings);
            match gateway.call(route, &bindings, &parts, body).await {
                Ok(response) => response,
                Err(e) => {
                    tracing::info!(rpc = %route.rpc_name(), error = %e, "call failed");
                    e.into_response()
                }
            }
        }
    }
}

impl Gateway {
    async fn call(
        &self,
        route: &Route,
        bindings: &[(String, String)],
        parts: &axum::http::request::Parts,
        body: Body,
    ) -> Result<Response, ApiError> {
        let started = Instant::now();
        let timeout = self.options.request_timeout;
        let deadline = started + timeout;
        let body = tokio::time::timeout_at(deadline, self.read_body(&parts.headers, body))
            .await
            .map_err(|_| deadline_error(timeout))??;
        let message = transcode::build_request(route, bindings, parts.uri.query(), &body)?;
        let metadata = forwarded_metadata(&parts.headers);
        let upstream = self
            .upstreams
            .get(route.upstream)
            .ok_or_else(|| ApiError::new(Code::Internal, "route without an upstream"))?;

        if route.method.is_server_streaming() {
            return self
                .call_streaming(route, upstream, message, metadata, parts, started)
                .await;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let response = tokio::time::timeout_at(
            deadline,
            upstream.unary(route, message, metadata, remaining),
        )
        .await
        .map_err(|_| deadline_error(timeout))?
        .map_err(|status| past_deadline(status, deadline, timeout))?;
        Ok(json_response(
            StatusCode::OK,
            &transcode::response_json(route, &response)?,
        ))
    }

    async fn call_streaming(
        &self,
        route: &Route,
        upstream: &Upstream,
        message: DynamicMessage,
        metadata: MetadataMap,
        parts: &axum::http::request::Parts,
        started: Instant,
    ) -> Result<Response, ApiError> {
        let streamed = wants_stream(parts)?;
        let aggregate = !streamed && route.method.output().full_name() == EXEC_EVENT;
        // A command's own timeout bounds its call (plus time to report the exit); without
        // one, an aggregated answer gets the request timeout and a stream the longest a
        // sandbox lives.
        let command_timeout = command_timeout(&message);
        let timeout = match command_timeout {
            Some(t) if aggregate => (t + EXEC_GRACE).max(self.options.request_timeout),
            Some(t) => t + EXEC_GRACE,
            None if aggregate => self.options.request_timeout,
            None => MAX_STREAM_DURATION,
        };
        let deadline = started + timeout;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let events = tokio::time::timeout_at(
            deadline,
            upstream.server_streaming(route, message, metadata, remaining),
        )
        .await
        .map_err(|_| deadline_error(timeout))?
        .map_err(|status| past_deadline(status, deadline, timeout))?;
        if aggregate {
            let answer =
                stream::aggregate_exec(events, self.options.exec_output_limit, deadline, timeout)
                    .await?;
            return Ok(json_response(StatusCode::OK, &answer));
        }
        let body = Body::from_stream(stream::ndjson(events, deadline));
        let mut response = Response::new(body);
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        // Proxies such as nginx would otherwise buffer the lines.
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        Ok(response)
    }

    /// Reads the body, refusing more than `max_body_bytes` with 413 (at once when
    /// `Content-Length` says so, else as soon as the limit is passed).
    async fn read_body(&self, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
        let limit = self.options.max_body_bytes;
        let too_large = || {
            ApiError::new(
                Code::ResourceExhausted,
                format!("the request body is larger than the limit of {limit} bytes"),
            )
            .with_http(StatusCode::PAYLOAD_TOO_LARGE)
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let mut data = Vec::with_capacity(declared.map_or(0, |n| n as usize));
        let mut frames = body.into_data_stream();
        while let Some(chunk) = frames.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::invalid(format!("reading the request body: {e}")))?;
            if data.len() + chunk.len() > limit {
                return Err(too_large());
            }
            data.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(data))
    }
}

fn deadline_error(timeout: Duration) -> ApiError {
    ApiError::new(
        Code::DeadlineExceeded,
        format!(
            "the request did not complete within {} s",
            timeout.as_secs()
        ),
    )
}

/// An upstream error, or the gateway's deadline error if the deadline has passed: tonic
/// enforces the deadline it sends upstream too and reports it as `CANCELLED`, racing the
/// gateway's own timer.
fn past_deadline(status: tonic::Status, deadline: Instant, timeout: Duration) -> ApiError {
    if Instant::now() >= deadline {
        deadline_error(timeout)
    } else {
        ApiError::from(status)
    }
}

/// Whether the caller asked for the streamed form: `?stream=true` or an `Accept` naming
/// `application/x-ndjson`.
fn wants_stream(parts: &axum::http::request::Parts) -> Result<bool, ApiError> {
    if let Some(query) = parts.uri.query() {
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            if key == "stream" {
                return match value.as_ref() {
                    "" | "true" | "1" => Ok(true),
                    "false" | "0" => Ok(false),
                    other => Err(ApiError::invalid(format!(
                        "invalid `stream`: `{other}` is not true or false"
                    ))),
                };
            }
        }
    }
    Ok(parts
        .headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(NDJSON)))
}

/// The request's `timeout_ms`, if it has one and it is set.
fn command_timeout(message: &DynamicMessage) -> Option<Duration> {
    let field = message.descriptor().get_field_by_name("timeout_ms")?;
    match message.get_field(&field).as_ref() {
        PValue::U32(ms) if *ms > 0 => Some(Duration::from_millis(u64::from(*ms))),
        PValue::U64(ms) if *ms > 0 => Some(Duration::from_millis(*ms)),
        _ => None,
    }
}

/// The metadata sent upstream: [`FORWARDED_HEADERS`], and the current span's trace
/// context when spans are exported (it replaces the caller's, whose child it is).
fn forwarded_metadata(headers: &HeaderMap) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    for name in FORWARDED_HEADERS {
        if let Some(value) = headers.get(*name).and_then(|v| v.to_str().ok()) {
            if let (Ok(key), Ok(value)) = (
                MetadataKey::from_bytes(name.as_bytes()),
                MetadataValue::try_from(value),
            ) {
                metadata.insert(key, value);
            }
        }
    }
    let mut ours = MetadataMap::new();
    nanobox_telemetry::inject_context(&mut ours);
    for name in ["traceparent", "tracestate"] {
        if let Some(value) = ours.get(name) {
            metadata.insert(name, value.clone());
        }
    }
    metadata
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut body = value.to_string().into_bytes();
    body.push(b'\n');
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
