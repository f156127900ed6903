//! Requests to a registry: authentication (answering a `WWW-Authenticate` challenge
//! once per request), retries with backoff for transient failures, size-capped bodies,
//! and distribution error bodies turned into [`RegistryError`]s a user can act on.

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use serde::Deserialize;

use super::auth::{Challenge, TokenResponse};
use super::{is_loopback, RegistryClient, RegistryError, Repo, Target, MAX_ERROR_BODY};

impl RegistryClient {
    pub(super) async fn with_retries<T, F, Fut>(&self, mut attempt: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut delay = self.options.retry_backoff;
        let mut tries = 0;
        loop {
            match attempt().await {
                Err(e) if e.is_retryable() && tries < self.options.retries => {
                    tries += 1;
                    tracing::warn!(error = %e, attempt = tries, "transient registry failure; retrying");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                }
                other => return other,
            }
        }
    }

    /// One GET, answering an authentication challenge once.
    pub(super) async fn get(
        &self,
        repo: &Repo<'_>,
        url: &str,
        accept: Option<&str>,
        target: Target<'_>,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut challenged = false;
        loop {
            let mut request = self.http.get(url);
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            if let Some(value) = self.auth_header(&repo.key()) {
                request = request.header(AUTHORIZATION, value);
            }
            let response = request
                .send()
                .await
                .map_err(|source| RegistryError::Unreachable {
                    registry: repo.registry().to_owned(),
                    source,
                })?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            if status == StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                self.authenticate(repo, &response).await?;
                continue;
            }
            return Err(self.status_error(repo, response, target).await);
        }
    }

    pub(super) fn auth_header(&self, key: &str) -> Option<String> {
        self.auth.lock().ok().and_then(|m| m.get(key).cloned())
    }

    pub(super) fn set_auth_header(&self, key: String, value: String) {
        if let Ok(mut map) = self.auth.lock() {
            map.insert(key, value);
        }
    }

    pub(super) fn refused(&self, registry: &str) -> RegistryError {
        let reason = match self.credentials(registry) {
            Some(c) => format!("refused credentials for user {:?}", c.username),
            None => "requires credentials and none are configured for it".to_owned(),
        };
        RegistryError::Unauthorized {
            registry: registry.to_owned(),
            reason,
        }
    }

    pub(super) async fn authenticate(
        &self,
        repo: &Repo<'_>,
        response: &reqwest::Response,
    ) -> Result<(), RegistryError> {
        let registry = repo.registry();
        let challenge = response
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(Challenge::parse);
        let credentials = self.credentials(registry);
        match challenge {
            Some(Challenge::Basic) => {
                let Some(credentials) = credentials else {
                    return Err(self.refused(registry));
                };
                self.set_auth_header(repo.key(), credentials.basic_header());
                Ok(())
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let mut url =
                    reqwest::Url::parse(&realm).map_err(|e| RegistryError::Unauthorized {
                        registry: registry.to_owned(),
                        reason: format!("sent an unusable token realm {realm:?}: {e}"),
                    })?;
                let realm_plain_ok = url.host_str().is_some_and(|h| {
                    is_loopback(h) && self.options.plain_http.iter().any(|r| r == registry)
                });
                if url.scheme() != "https" && !(url.scheme() == "http" && realm_plain_ok) {
                    return Err(RegistryError::Unauthorized {
                        registry: registry.to_owned(),
                        reason: format!("sent a token realm {realm:?} that is not HTTPS"),
                    });
                }
                let scope = scope
                    .unwrap_or_else(|| format!("repository:{}:pull", repo.reference.repository()));
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(service) = &service {
                        query.append_pair("service", service);
                    }
                    query.append_pair("scope", &scope);
                }
                let token = self
                    .with_retries(|| async {
                        let mut request = self.http.get(url.clone());
                        if let Some(c) = credentials {
                            request = request.header(AUTHORIZATION, c.basic_header());
                        }
                        let response =
                            request
                                .send()
                                .await
                                .map_err(|source| RegistryError::Unreachable {
                                    registry: registry.to_owned(),
                                    source,
                                })?;
                        let status = response.status();
                        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                            return Err(self.refused(registry));
                        }
                        if !status.is_success() {
                            return Err(RegistryError::Status {
                                registry: registry.to_owned(),
                                what: "a token".to_owned(),
                                status: status.as_u16(),
                                message: error_message(response).await,
                            });
                        }
                        let body = read_capped(response, 1 << 20, registry, "token", "").await?;
                        let token: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
                            RegistryError::Unauthorized {
                                registry: registry.to_owned(),
                                reason: format!("sent an unreadable token: {e}"),
                            }
                        })?;
                        token.token.or(token.access_token).ok_or_else(|| {
                            RegistryError::Unauthorized {
                                registry: registry.to_owned(),
                                reason: "sent no token".to_owned(),
                            }
                        })
                    })
                    .await?;
                self.set_auth_header(repo.key(), format!("Bearer {token}"));
                Ok(())
            }
            None => Err(RegistryError::Unauthorized {
                registry: registry.to_owned(),
                reason: "asks for an authentication scheme this client does not support".to_owned(),
            }),
        }
    }

    pub(super) async fn status_error(
        &self,
        repo: &Repo<'_>,
        response: reqwest::Response,
        target: Target<'_>,
    ) -> RegistryError {
        let status = response.status();
        let registry = repo.registry().to_owned();
        let name = repo.reference.name();
        let body = read_limited(response).await;
        #[derive(Deserialize, Default)]
        struct Errors {
            #[serde(default)]
            errors: Vec<ErrorItem>,
        }
        #[derive(Deserialize)]
        struct ErrorItem {
            #[serde(default)]
            code: String,
            #[serde(default)]
            message: String,
        }
        let errors: Errors = serde_json::from_slice(&body).unwrap_or_default();
        let has = |code: &str| errors.errors.iter().any(|e| e.code == code);
        let message = errors
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        let message = if message.is_empty() {
            String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_owned()
        } else {
            message
        };
        match (status, target) {
            (StatusCode::UNAUTHORIZED, _) => self.refused(&registry),
            (StatusCode::FORBIDDEN, _) => RegistryError::Denied {
                registry,
                name,
                message,
            },
            (StatusCode::NOT_FOUND, Target::Manifest(_) | Target::Tags) if has("NAME_UNKNOWN") => {
                RegistryError::NameUnknown { name }
            }
            (StatusCode::NOT_FOUND, Target::Manifest(reference)) => {
                RegistryError::ManifestUnknown {
                    kind: if reference.starts_with("sha256:") {
                        "digest"
                    } else {
                        "tag"
                    },
                    reference: reference.to_owned(),
                    name,
                }
            }
            (StatusCode::NOT_FOUND, Target::Blob(digest)) => RegistryError::BlobUnknown {
                digest: digest.to_owned(),
                name,
            },
            (_, target) => RegistryError::Status {
                registry,
                what: match target {
                    Target::Tags => format!("the tag list of {name}"),
                    Target::Manifest(r) => format!("manifest {r} of {name}"),
                    Target::Blob(d) => format!("blob {d} of {name}"),
                },
                status: status.as_u16(),
                message,
            },
        }
    }
}

pub(super) fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .map(str::to_owned)
}

pub(super) async fn read_limited(mut response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_ERROR_BODY {
            body.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    body
}

pub(super) async fn error_message(response: reqwest::Response) -> String {
    let body = read_limited(response).await;
    String::from_utf8_lossy(&body[..body.len().min(200)])
        .trim()
        .to_owned()
}

pub(super) async fn read_capped(
    mut response: reqwest::Response,
    limit: u64,
    registry: &str,
    what: &'static str,
    digest: &str,
) -> Result<Vec<u8>, RegistryError> {
    let too_large = |size| RegistryError::TooLarge {
        what,
        digest: digest.to_owned(),
        size,
        limit,
    };
    if let Some(length) = response.content_length() {
        if length > limit {
            return Err(too_large(length));
        }
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|source| RegistryError::Transfer {
            registry: registry.to_owned(),
            what: format!("{what} {digest}"),
            source,
        })?
    {
        body.extend_from_slice(&chunk);
        if body.len() as u64 > limit {
            return Err(too_large(body.len() as u64));
        }
    }
    Ok(body)
}
