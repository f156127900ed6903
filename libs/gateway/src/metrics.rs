//! The gateway's Prometheus series: every REST request counted and timed by method, route
//! and status, recorded through the `metrics` facade (the gateway binary exports them
//! when `[api] metrics_addr` is set).
//!
//! The route label is the route's path template (`/api/v1/sandboxes/{id}/exec`), never the
//! path itself, so ids do not make a series each; `/healthz` and the OpenAPI document
//! are their own routes, and a path no route matches is `unmatched`.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tokio::time::Instant;

use crate::routes::RouteMatch;
use crate::server::Gateway;

/// Counter: REST requests answered, by `method`, `route` and `status`.
pub const HTTP_REQUESTS: &str = "nanobox_http_requests_total";
/// Histogram: seconds from a REST request's arrival to its answer's head (a streamed
/// exec's body goes on after), by `method`, `route` and `status`.
pub const HTTP_DURATION: &str = "nanobox_http_request_duration_seconds";

/// The route label of requests no route matches.
pub const UNMATCHED: &str = "unmatched";

/// The HELP lines; the gateway binary calls it once the recorder is installed.
pub fn describe() {
    metrics::describe_counter!(
        HTTP_REQUESTS,
        "REST requests answered, by method, route template and status"
    );
    metrics::describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "Time to the head of REST answers, by method, route template and status"
    );
}

/// The middleware: times the request and counts its answer.
pub(crate) async fn record(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = match gateway.routes().find(&method, request.uri().path()) {
        RouteMatch::Found(route, _) => route.template.as_str().to_owned(),
        _ => request
            .extensions()
            .get::<MatchedPath>()
            .map_or_else(|| UNMATCHED.to_owned(), |p| p.as_str().to_owned()),
    };
    let response = next.run(request).await;
    let labels = [
        ("method", method.as_str().to_owned()),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!(HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(HTTP_DURATION, &labels).record(started.elapsed().as_secs_f64());
    response
}
