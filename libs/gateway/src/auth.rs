//! API keys: `Authorization: Bearer <key>` checked against the operator's keys before a
//! request reaches a route (and so before anything is sent upstream).
//!
//! Keys are compared in constant time: both the presented key and every configured key are
//! hashed with SHA-256 first, so the comparison is always over 32 bytes whatever the
//! lengths, and every configured key is compared (no early exit on a match), so neither the
//! time nor the path taken tells an attacker how close a guess was or which key matched.

use axum::http::{header, HeaderMap};
use sha2::{Digest as _, Sha256};
use subtle::{Choice, ConstantTimeEq as _};
use tonic::Code;

use crate::status::ApiError;

/// The configured API keys (as SHA-256 digests; the keys themselves are not kept).
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

impl ApiKeys {
    /// The keys clients may present. None at all leaves the API open.
    pub fn new<K: AsRef<str>>(keys: impl IntoIterator<Item = K>) -> Self {
        Self {
            digests: keys
                .into_iter()
                .map(|k| Sha256::digest(k.as_ref().as_bytes()).into())
                .collect(),
        }
    }

    /// Whether no key is configured (every request is let in).
    pub fn is_open(&self) -> bool {
        self.digests.is_empty()
    }

    /// How many keys are configured.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether no key is configured (the same as [`ApiKeys::is_open`]).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Checks a request's `Authorization` header: `UNAUTHENTICATED` unless the API is open
    /// or the header is `Bearer <a configured key>`.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.is_open() {
            return Ok(());
        }
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::new(
                Code::Unauthenticated,
                "missing API key: send `Authorization: Bearer <key>`",
            ));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, key) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            })
            .ok_or_else(|| {
                ApiError::new(
                    Code::Unauthenticated,
                    "the Authorization header must be `Bearer <key>`",
                )
            })?;
        if self.matches(presented) {
            Ok(())
        } else {
            Err(ApiError::new(Code::Unauthenticated, "invalid API key"))
        }
    }

    fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = Choice::from(0);
        for key in &self.digests {
            found |= key.ct_eq(&digest);
        }
        found.into()
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(value: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = value {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_keys() {
        let keys = ApiKeys::new(["0123456789abcdefA", "0123456789abcdefB"]);
        assert!(!keys.is_open());
        assert!(keys
            .check(&headers(Some("Bearer 0123456789abcdefA")))
            .is_ok());
        assert!(keys
            .check(&headers(Some("bearer  0123456789abcdefB ")))
            .is_ok());
        for (value, why) in [
            (None, "missing API key"),
            (Some("Bearer 0123456789abcdefC"), "invalid API key"),
            (Some("Bearer 0123456789abcdef"), "invalid API key"),
            (Some("Bearer "), "must be `Bearer <key>`"),
            (Some("Basic 0123456789abcdefA"), "must be `Bearer <key>`"),
            (Some("0123456789abcdefA"), "must be `Bearer <key>`"),
        ] {
            let e = keys.check(&headers(value)).unwrap_err();
            assert_eq!(e.code, Code::Unauthenticated);
            assert_eq!(e.http.as_u16(), 401);
            assert!(e.message.contains(why), "{value:?}: {}", e.message);
        }
        let open = ApiKeys::new(Vec::<String>::new());
        assert!(open.is_open());
        assert!(open.check(&headers(None)).is_ok());
        assert!(!format!("{keys:?}").contains("0123"));
    }
}
