//! "Ready" as a client would see it: every gRPC service answers `grpc.health.v1` with
//! SERVING, the gateway answers `GET /healthz` with 200, and the scheduler lists the node
//! as READY. Each probe is bounded; the caller retries until its deadline.

use std::time::Duration;

use nanobox_proto::v1::cluster_client::ClusterClient;
use nanobox_proto::v1::{ListNodesRequest, NodeState};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most bytes read of a `/healthz` answer.
const MAX_ANSWER: u64 = 4096;

/// Why a probe did not pass yet.
pub(crate) type NotYet = String;

async fn channel(addr: &str) -> Result<tonic::transport::Channel, NotYet> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(PROBE_TIMEOUT)
        .timeout(PROBE_TIMEOUT)
        .connect()
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))
}

/// The server's overall health (`service: ""`) is SERVING.
pub(crate) async fn grpc_serving(addr: &str) -> Result<(), NotYet> {
    let mut client = HealthClient::new(channel(addr).await?);
    let answer = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| format!("health check: {}", s.message()))?;
    match answer.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("health is {}", other.as_str_name())),
    }
}

/// `GET http://<addr>/healthz` answers 200.
pub(crate) async fn http_ok(addr: &str) -> Result<(), NotYet> {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        stream
            .take(MAX_ANSWER)
            .read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        let status_line = answer.split(|b| *b == b'\n').next().unwrap_or_default();
        let status_line = String::from_utf8_lossy(status_line);
        if status_line.split_whitespace().nth(1) == Some("200") {
            Ok(())
        } else {
            Err(format!("GET /healthz: {}", status_line.trim()))
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .unwrap_or_else(|_| Err("GET /healthz timed out".into()))
}

/// The scheduler at `addr` lists `node_id` as READY.
pub(crate) async fn node_ready(addr: &str, api_key: &str, node_id: &str) -> Result<(), NotYet> {
    let mut client = ClusterClient::new(channel(addr).await?);
    let mut request = tonic::Request::new(ListNodesRequest {});
    let bearer = format!("Bearer {api_key}")
        .parse()
        .map_err(|_| "the API key is not a valid header value".to_owned())?;
    request.metadata_mut().insert("authorization", bearer);
    let nodes = client
        .list_nodes(request)
        .await
        .map_err(|s| format!("listing nodes: {}", s.message()))?
        .into_inner()
        .nodes;
    match nodes.iter().find(|n| n.id == node_id) {
        Some(node) if node.state() == NodeState::Ready => Ok(()),
        Some(node) => Err(format!("node {node_id} is {}", node.state().as_str_name())),
        None => Err(format!("node {node_id} has not registered")),
    }
}
