//! Forwarding to the gRPC services: one lazily connected tonic channel per upstream and a
//! codec that encodes and decodes `DynamicMessage`s by their descriptors, so any method of
//! the descriptor set can be called without generated client code.

use std::time::Duration;

use axum::http::uri::PathAndQuery;
use prost::Message as _;
use prost_reflect::{DynamicMessage, MessageDescriptor};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use crate::error::RouteError;
use crate::routes::Route;

/// The largest response message accepted from an upstream. Lists are the largest
/// responses; 16 MiB is far above a page of 1000 sandboxes.
pub const MAX_RESPONSE_MESSAGE_BYTES: usize = 16 << 20;

/// How long connecting to an upstream may take before the call fails `UNAVAILABLE`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A gRPC service endpoint the gateway forwards to.
#[derive(Debug, Clone)]
pub struct Upstream {
    name: String,
    endpoint: String,
    channel: Channel,
}

impl Upstream {
    /// An upstream named `name` (for logs and errors: `template-builder`) at `endpoint`
    /// (`http://host:port`). Connects on first use and reconnects as needed, so the gateway
    /// starts and serves its other routes while an upstream is down.
    pub fn new(name: &str, endpoint: &str) -> Result<Self, RouteError> {
        let bad = |message: String| RouteError::Endpoint {
            name: name.to_owned(),
            endpoint: endpoint.to_owned(),
            message,
        };
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(Duration::from_secs(30)))
            // Finds a dead connection to a restarted upstream without waiting for TCP.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(Self {
            name: name.to_owned(),
            endpoint: endpoint.to_owned(),
            channel,
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn client(&self) -> tonic::client::Grpc<Channel> {
        tonic::client::Grpc::new(self.channel.clone())
            .max_decoding_message_size(MAX_RESPONSE_MESSAGE_BYTES)
    }

    /// Calls a unary method. `timeout` goes upstream as the gRPC deadline; the caller
    /// bounds the wait itself as well.
    pub async fn unary(
        &self,
        route: &Route,
        message: DynamicMessage,
        metadata: MetadataMap,
        timeout: Duration,
    ) -> Result<DynamicMessage, Status> {
        let mut client = self.client();
        client
            .ready()
            .await
            .map_err(|e| self.not_ready(route, &e))?;
        let request = request(message, metadata, timeout);
        client
            .unary(
                request,
                path(route)?,
                DynamicCodec::new(route.method.output()),
            )
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.sanitize(route, s))
    }

    /// Calls a server-streaming method; returns once the upstream answered with its
    /// headers (an error it answers at once, such as `NOT_FOUND`, is returned here).
    pub async fn server_streaming(
        &self,
        route: &Route,
        message: DynamicMessage,
        metadata: MetadataMap,
        timeout: Duration,
    ) -> Result<Streaming<DynamicMessage>, Status> {
        let mut client = self.client();
        client
            .ready()
            .await
            .map_err(|e| self.not_ready(route, &e))?;
        let request = request(message, metadata, timeout);
        client
            .server_streaming(
                request,
                path(route)?,
                DynamicCodec::new(route.method.output()),
            )
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.sanitize(route, s))
    }

    fn not_ready(&self, route: &Route, error: &dyn std::fmt::Display) -> Status {
        tracing::warn!(upstream = %self.name, endpoint = %self.endpoint, %error, "upstream not ready");
        self.unreachable(route)
    }

    fn unreachable(&self, route: &Route) -> Status {
        Status::unavailable(format!(
            "{} is unavailable: its service ({}) cannot be reached; retry later",
            route.method.parent_service().full_name(),
            self.name
        ))
    }

    /// Replaces the text of errors the transport made (connection refused, reset, TLS)
    /// with one that names the service but not addresses or OS errors; the detail is
    /// logged. Errors the upstream service itself returned pass through.
    pub fn sanitize(&self, route: &Route, status: Status) -> Status {
        let from_transport = std::error::Error::source(&status).is_some()
            && matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Internal
            );
        if from_transport {
            tracing::warn!(upstream = %self.name, endpoint = %self.endpoint, error = %status, "upstream call failed in transport");
            return self.unreachable(route);
        }
        status
    }
}

fn path(route: &Route) -> Result<PathAndQuery, Status> {
    PathAndQuery::try_from(route.grpc_path())
        .map_err(|e| Status::internal(format!("bad gRPC path {}: {e}", route.grpc_path())))
}

fn request(
    message: DynamicMessage,
    metadata: MetadataMap,
    timeout: Duration,
) -> tonic::Request<DynamicMessage> {
    let mut request = tonic::Request::new(message);
    *request.metadata_mut() = metadata;
    request.set_timeout(timeout);
    request
}

/// Encodes any `DynamicMessage`; decodes into the message type it was made for.
#[derive(Debug, Clone)]
pub struct DynamicCodec {
    output: MessageDescriptor,
}

impl DynamicCodec {
    /// A codec decoding `output` messages.
    pub fn new(output: MessageDescriptor) -> Self {
        Self { output }
    }
}

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        DynamicDecoder(self.output.clone())
    }
}

/// The encoding half of [`DynamicCodec`].
#[derive(Debug, Clone, Copy)]
pub struct DynamicEncoder;

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        // The buffer grows as needed, so encoding can only fail on a broken message.
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding the request: {e}")))
    }
}

/// The decoding half of [`DynamicCodec`].
#[derive(Debug, Clone)]
pub struct DynamicDecoder(MessageDescriptor);

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        DynamicMessage::decode(self.0.clone(), src)
            .map(Some)
            .map_err(|e| {
                Status::internal(format!(
                    "the upstream's {} does not decode: {e}",
                    self.0.full_name()
                ))
            })
    }
}
