//! The service token of internal calls (`[auth].service_token`): node agents present it on
//! `NodeRegistry` calls, the scheduler on `NodeAgent` calls, as `authorization: Bearer
//! <token>` metadata. Without a configured token both interceptors let everything through
//! (a single machine on loopback).
//!
//! The check compares SHA-256 digests of the presented and the expected token with a
//! constant-time equality, so neither the token's content nor its length leaks through
//! timing.

use sha2::{Digest as _, Sha256};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

const SCHEME: &str = "Bearer ";

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Equality of two digests that takes the same time whatever their content.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early-exit compare.
    std::hint::black_box(diff) == 0
}

/// Checks the service token on incoming calls.
#[derive(Clone)]
pub struct ServerAuth {
    expected: Option<[u8; 32]>,
}

impl std::fmt::Debug for ServerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerAuth")
            .field("enabled", &self.expected.is_some())
            .finish()
    }
}

impl ServerAuth {
    /// Requires `token` when it is `Some`; accepts every call otherwise.
    pub fn new(token: Option<&str>) -> Self {
        Self {
            expected: token.map(|t| digest(t.as_bytes())),
        }
    }

    /// Whether `request` carries the token (always true when none is configured).
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(expected) = &self.expected else {
            return Ok(());
        };
        let header = request.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated("missing service token (authorization metadata)")
        })?;
        let presented = header
            .as_bytes()
            .strip_prefix(SCHEME.as_bytes())
            .ok_or_else(|| {
                Status::unauthenticated("the authorization metadata is not `Bearer <token>`")
            })?;
        if constant_time_eq(&digest(presented), expected) {
            Ok(())
        } else {
            Err(Status::unauthenticated("wrong service token"))
        }
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request)?;
        Ok(request)
    }
}

/// Attaches the service token to outgoing calls.
#[derive(Clone)]
pub struct ClientAuth {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("enabled", &self.header.is_some())
            .finish()
    }
}

/// A token that cannot be sent as gRPC metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidToken;

impl std::fmt::Display for InvalidToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the service token must be printable ASCII to be sent as gRPC metadata")
    }
}

impl std::error::Error for InvalidToken {}

impl ClientAuth {
    /// Sends `token` when it is `Some`; nothing otherwise.
    pub fn new(token: Option<&str>) -> Result<Self, InvalidToken> {
        let header = token
            .map(|t| {
                format!("{SCHEME}{t}")
                    .parse::<MetadataValue<tonic::metadata::Ascii>>()
                    .map_err(|_| InvalidToken)
            })
            .transpose()?;
        Ok(Self { header })
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "a-long-random-service-token";

    fn sent(client: &mut ClientAuth) -> Request<()> {
        client.call(Request::new(())).unwrap()
    }

    #[test]
    fn the_right_token_passes_and_others_are_unauthenticated() {
        let mut server = ServerAuth::new(Some(TOKEN));
        let mut good = ClientAuth::new(Some(TOKEN)).unwrap();
        assert!(server.call(sent(&mut good)).is_ok());

        for (client, why) in [
            (ClientAuth::new(None).unwrap(), "missing"),
            (
                ClientAuth::new(Some("a-long-random-service-tokeN")).unwrap(),
                "wrong",
            ),
            (ClientAuth::new(Some("short")).unwrap(), "wrong"),
        ] {
            let err = server.call(sent(&mut client.clone())).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
            assert!(err.message().contains(why), "{err:?}");
        }
        let mut basic = Request::new(());
        basic
            .metadata_mut()
            .insert("authorization", format!("Basic {TOKEN}").parse().unwrap());
        let err = server.call(basic).unwrap_err();
        assert!(err.message().contains("Bearer"), "{err:?}");
    }

    #[test]
    fn without_a_token_everything_passes_and_nothing_is_sent() {
        let mut server = ServerAuth::new(None);
        assert!(server.call(Request::new(())).is_ok());
        let request = sent(&mut ClientAuth::new(None).unwrap());
        assert!(request.metadata().get("authorization").is_none());
        assert!(ClientAuth::new(Some("bad\ntoken")).is_err());
    }
}
