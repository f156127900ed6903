//! Prometheus metrics for the NanoBox binaries: [`serve`] installs the process's
//! `metrics` recorder (the Prometheus exporter of `metrics-exporter-prometheus`) and
//! serves it as `GET /metrics` on a listener of its own, away from the service's public
//! port.
//!
//! Libraries record through the `metrics` facade (`metrics::counter!(..)` and friends)
//! and never install anything; without a recorder those calls do nothing, so a service
//! whose `metrics_addr` is unset pays next to nothing for them. Every histogram is a
//! duration in seconds and gets the buckets [`DURATION_BUCKETS`].

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::TelemetryError;

/// The path the metrics are served at.
pub const METRICS_PATH: &str = "/metrics";

/// Gauge set to 1 with the service's name and version: says which binary a scrape hit.
pub const BUILD_INFO: &str = "nanobox_build_info";

/// Bucket bounds (seconds) of every histogram: a pool hand-over takes milliseconds, a
/// cold boot under TCG tens of seconds, a warmup minutes.
pub const DURATION_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// How often the exporter's histograms are drained into their buckets between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The Prometheus content type of the text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A running `/metrics` listener. Dropping it stops serving (the recorder stays
/// installed: recording keeps working, nobody can read it).
#[derive(Debug)]
pub struct MetricsEndpoint {
    local_addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    upkeep: tokio::task::JoinHandle<()>,
}

impl MetricsEndpoint {
    /// The address it listens on (the port chosen when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.server.abort();
        self.upkeep.abort();
    }
}

/// Installs the Prometheus recorder for `service` (the binary's name, as in
/// [`crate::init`]) and serves it on `addr`, when `addr` is given (a service's
/// `metrics_addr`); `Ok(None)` and nothing installed otherwise. Logs the bound address.
/// Must be called inside a Tokio runtime, before the libraries record anything.
pub async fn serve(
    addr: Option<SocketAddr>,
    service: &str,
) -> Result<Option<MetricsEndpoint>, TelemetryError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::MetricsListen { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| TelemetryError::MetricsListen { addr, source })?;
    let handle = recorder()?
        .install_recorder()
        .map_err(TelemetryError::MetricsRecorder)?;
    describe(service);
    let upkeep = tokio::spawn({
        let handle = handle.clone();
        async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        }
    });
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(handle)).await {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    });
    tracing::info!(address = %local_addr, path = METRICS_PATH, "serving metrics");
    Ok(Some(MetricsEndpoint {
        local_addr,
        server,
        upkeep,
    }))
}

/// The recorder's settings: plain names (as written by the libraries), histograms with
/// [`DURATION_BUCKETS`].
fn recorder() -> Result<PrometheusBuilder, TelemetryError> {
    PrometheusBuilder::new()
        .set_buckets(&DURATION_BUCKETS)
        .map_err(TelemetryError::MetricsRecorder)
}

/// The HELP lines of the series this crate records, and the build info.
fn describe(service: &str) {
    ::metrics::describe_gauge!(BUILD_INFO, "1, labelled with the service and its version");
    ::metrics::gauge!(
        BUILD_INFO,
        "service" => service.to_owned(),
        "version" => env!("CARGO_PKG_VERSION"),
    )
    .set(1.0);
    crate::grpc::describe();
}

fn router(handle: PrometheusHandle) -> axum::Router {
    axum::Router::new().route(
        METRICS_PATH,
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], handle.render()).into_response() }
        }),
    )
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn the_router_serves_what_is_recorded() {
        let recorder = recorder().unwrap().build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            describe("nanobox-test");
            ::metrics::counter!("nanobox_test_total", "kind" => "a").increment(3);
            ::metrics::histogram!("nanobox_test_duration_seconds").record(0.2);
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(handle)).await });

        let answer = get(addr, METRICS_PATH).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains("content-type: text/plain; version=0.0.4"),
            "{answer}"
        );
        assert!(
            answer.contains("nanobox_test_total{kind=\"a\"} 3"),
            "{answer}"
        );
        // A real histogram with the shared buckets, not a summary.
        assert!(
            answer.contains("nanobox_test_duration_seconds_bucket{le=\"0.25\"} 1"),
            "{answer}"
        );
        assert!(
            answer.contains("nanobox_build_info{service=\"nanobox-test\",version=\""),
            "{answer}"
        );
        assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
    }

    #[tokio::test]
    async fn no_address_serves_nothing() {
        assert!(serve(None, "nanobox-test").await.unwrap().is_none());
    }
}
