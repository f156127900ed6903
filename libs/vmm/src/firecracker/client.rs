//! A client for Firecracker's API: HTTP/1.1 over its Unix socket.
//!
//! One connection per request keeps the client stateless; the API socket is local and a
//! handshake costs microseconds. Replies are size-limited and every call has a deadline:
//! a wedged VMM must not wedge its caller.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::api::{ApiError, InstanceInfo, Method};
use super::plan::PlannedRequest;
use crate::VmmError;

/// Largest reply body read from the API.
const MAX_REPLY: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The same socket with another deadline per call (snapshots take longer than
    /// configuration).
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            socket: self.socket.clone(),
            timeout,
        }
    }

    /// Sends one planned request; any non-2xx reply is [`VmmError::FirecrackerApi`]
    /// carrying Firecracker's `fault_message`.
    pub async fn send(&self, request: &PlannedRequest) -> Result<(), VmmError> {
        let body = serde_json::to_vec(&request.body)
            .map_err(|e| VmmError::Control(format!("encoding {}: {e}", request.definition)))?;
        self.call(request.method, &request.path, Some(body))
            .await
            .map(drop)
    }

    /// `GET /`: the instance's id, state and VMM version.
    pub async fn instance_info(&self) -> Result<InstanceInfo, VmmError> {
        let body = self.call(Method::Get, "/", None).await?;
        serde_json::from_slice(&body).map_err(|e| {
            VmmError::Control(format!("Firecracker sent an invalid instance info: {e}"))
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, VmmError> {
        let what = format!("{} {path}", method.as_str());
        tokio::time::timeout(self.timeout, self.call_inner(method, path, body, &what))
            .await
            .map_err(|_| VmmError::Timeout(self.timeout, "the Firecracker API"))?
    }

    async fn call_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<Bytes, VmmError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| VmmError::io(format!("connecting to {}", self.socket.display()), e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| VmmError::Control(format!("{what}: {e}")))?;
        let driver = tokio::spawn(connection);
        let mut builder = hyper::Request::builder()
            .method(method.as_str())
            .uri(path)
            .header(HOST, "localhost")
            .header(ACCEPT, "application/json");
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| VmmError::Control(format!("{what}: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| VmmError::Control(format!("{what}: {e}")))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_REPLY)
            .collect()
            .await
            .map_err(|e| VmmError::Control(format!("{what}: reading the reply: {e}")))?
            .to_bytes();
        driver.abort();
        if status.is_success() {
            return Ok(bytes);
        }
        let fault = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.fault_message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(200).collect());
        Err(VmmError::FirecrackerApi {
            request: what.to_owned(),
            status: status.as_u16(),
            fault_message: fault,
        })
    }
}
