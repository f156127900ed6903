//! Bearer credentials on gRPC calls, as `authorization: Bearer <secret>` metadata:
//!
//! - the service token of internal calls (`[auth].service_token`): node agents present it
//!   on `NodeRegistry` calls, the scheduler on `NodeAgent` calls ([`ServerAuth`],
//!   [`ClientAuth`]). Without a configured token both interceptors let everything through
//!   (a single machine on loopback).
//! - the API keys of the public APIs (`[api].api_keys`): clients present one on
//!   `nanobox.v1.Sandboxes`, `Cluster` and `Templates` calls ([`ApiKeys`]). The REST
//!   gateway forwards the caller's `Authorization` header, so REST and gRPC accept the same
//!   keys. Without configured keys the API is open.
//!
//! Both checks hash the presented secret and every accepted one with SHA-256 and compare
//! the digests with a constant-time equality, against every accepted secret (no early exit
//! on a match), so neither a secret's content, its length nor which key matched leaks
//! through timing.

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

/// The secret of an `authorization` value `Bearer <secret>`: the scheme is matched without
/// regard to case and surrounding blanks are dropped, as HTTP does (the REST gateway
/// accepts the same forms and forwards the header unchanged, so both sides must agree).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(SCHEME.len())?;
    scheme
        .eq_ignore_ascii_case(SCHEME.as_bytes())
        .then(|| rest.trim_ascii())
}

/// Accepted bearer secrets (as digests; the secrets themselves are not kept), and what they
/// are called in error messages.
#[derive(Clone)]
struct Bearers {
    digests: Vec<[u8; 32]>,
    what: &'static str,
}

impl Bearers {
    fn new<K: AsRef<str>>(secrets: impl IntoIterator<Item = K>, what: &'static str) -> Self {
        Self {
            digests: secrets
                .into_iter()
                .map(|k| digest(k.as_ref().as_bytes()))
                .collect(),
            what,
        }
    }

    fn is_open(&self) -> bool {
        self.digests.is_empty()
    }

    /// `Ok` when no secret is configured or `request` carries one of them; otherwise
    /// `UNAUTHENTICATED` saying what is wrong (missing, malformed, or not accepted).
    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.is_open() {
            return Ok(());
        }
        let what = self.what;
        let header = request.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated(format!(
                "missing {what}: send `authorization: Bearer <{what}>` metadata"
            ))
        })?;
        let presented = bearer(header.as_bytes()).ok_or_else(|| {
            Status::unauthenticated(format!(
                "the authorization metadata is not `Bearer <{what}>`"
            ))
        })?;
        let presented = digest(presented);
        // Every accepted digest is compared, so the time does not depend on which matched.
        let matched = self
            .digests
            .iter()
            .fold(false, |acc, d| acc | constant_time_eq(&presented, d));
        if matched {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!("wrong {what}")))
        }
    }
}

/// Checks the service token on incoming calls.
#[derive(Clone)]
pub struct ServerAuth {
    bearers: Bearers,
}

impl std::fmt::Debug for ServerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerAuth")
            .field("enabled", &!self.bearers.is_open())
            .finish()
    }
}

impl ServerAuth {
    /// Requires `token` when it is `Some`; accepts every call otherwise.
    pub fn new(token: Option<&str>) -> Self {
        Self {
            bearers: Bearers::new(token, "service token"),
        }
    }

    /// Whether `request` carries the token (always true when none is configured).
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.bearers.check(request)
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request)?;
        Ok(request)
    }
}

/// Checks the API keys of the public APIs on incoming calls: a server interceptor for
/// `nanobox.v1` services (health and reflection are added without it and stay open).
#[derive(Clone)]
pub struct ApiKeys {
    bearers: Bearers,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.bearers.digests.len())
    }
}

impl ApiKeys {
    /// Accepts calls that carry any of `keys`; every call when there are none.
    pub fn new<K: AsRef<str>>(keys: impl IntoIterator<Item = K>) -> Self {
        Self {
            bearers: Bearers::new(keys, "API key"),
        }
    }

    /// Whether no key is configured, so every call is accepted.
    pub fn is_open(&self) -> bool {
        self.bearers.is_open()
    }

    /// How many keys are accepted.
    pub fn len(&self) -> usize {
        self.bearers.digests.len()
    }

    /// Whether no key is configured (the same as [`ApiKeys::is_open`]).
    pub fn is_empty(&self) -> bool {
        self.is_open()
    }

    /// Whether `request` carries an accepted key (always true when the API is open).
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.bearers.check(request)
    }
}

impl Interceptor for ApiKeys {
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

    fn with_authorization(value: &str) -> Request<()> {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
        request
    }

    #[test]
    fn api_keys_accept_any_configured_key_and_nothing_else() {
        const A: &str = "first-api-key-0123456789";
        const B: &str = "second-api-key-0123456789";
        let mut keys = ApiKeys::new([A, B]);
        assert_eq!(keys.len(), 2);
        assert!(!keys.is_open());
        for good in [
            format!("Bearer {A}"),
            format!("Bearer {B}"),
            format!("bearer {B}"),
            format!("  BEARER   {A} "),
        ] {
            assert!(keys.call(with_authorization(&good)).is_ok(), "{good}");
        }
        let err = keys.call(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("missing API key"), "{err:?}");
        for (bad, why) in [
            (format!("Bearer {A}x"), "wrong API key"),
            ("Bearer ".to_owned(), "not `Bearer <API key>`"),
            (format!("Basic {A}"), "not `Bearer <API key>`"),
            (A.to_owned(), "not `Bearer <API key>`"),
        ] {
            let err = keys.call(with_authorization(&bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
            assert!(err.message().contains(why), "{bad}: {err:?}");
        }
    }

    #[test]
    fn without_api_keys_the_api_is_open() {
        let mut keys = ApiKeys::new(Vec::<String>::new());
        assert!(keys.is_open() && keys.is_empty());
        assert!(keys.call(Request::new(())).is_ok());
        assert!(keys.call(with_authorization("Bearer anything")).is_ok());
    }
}
