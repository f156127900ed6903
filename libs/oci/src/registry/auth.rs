//! Registry credentials and the authentication challenge.
//!
//! Credentials come from the caller or from a Docker `config.json` (`auths` entries with
//! `auth` = base64 `user:password`, or `username` and `password`). A registry answers an
//! unauthenticated request with `401` and a `WWW-Authenticate` challenge: `Basic` means
//! send the credentials with every request; `Bearer realm=...,service=...,scope=...` means
//! fetch a token from the realm (with the credentials, if any) and send that instead.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Deserialize;

use super::RegistryError;

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Builds credentials from a user name and password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
        }
    }

    /// The value of an `Authorization: Basic ...` header.
    pub(crate) fn basic_header(&self) -> String {
        let pair = format!("{}:{}", self.username, self.password);
        format!("Basic {}", STANDARD.encode(pair))
    }
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Credentials per registry, as a Docker `config.json` lists them.
#[derive(Debug, Clone, Default)]
pub struct DockerConfig {
    auths: HashMap<String, Credentials>,
}

impl DockerConfig {
    /// Reads a Docker `config.json`. Entries without usable credentials (credential
    /// helpers, empty entries) are skipped; a malformed `auth` value is an error.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let data = std::fs::read(path).map_err(|e| RegistryError::Credentials {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::parse(&data).map_err(|reason| RegistryError::Credentials {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses the content of a Docker `config.json`.
    pub fn parse(data: &[u8]) -> Result<Self, String> {
        let file: ConfigFile = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        let mut auths = HashMap::new();
        for (key, entry) in file.auths {
            let credentials = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = STANDARD
                        .decode(auth.trim())
                        .map_err(|e| format!("auths[{key:?}].auth is not base64: {e}"))?;
                    let decoded = String::from_utf8(decoded)
                        .map_err(|_| format!("auths[{key:?}].auth is not UTF-8"))?;
                    let Some((user, password)) = decoded.split_once(':') else {
                        return Err(format!("auths[{key:?}].auth is not user:password"));
                    };
                    Credentials::new(user, password)
                }
                (_, Some(user), Some(password)) => Credentials::new(user, password),
                _ => continue,
            };
            auths.insert(normalize_key(&key), credentials);
        }
        Ok(Self { auths })
    }

    /// The credentials for `registry` (as a reference names it: `docker.io`,
    /// `127.0.0.1:5000`).
    pub fn get(&self, registry: &str) -> Option<&Credentials> {
        self.auths.get(&normalize_key(registry))
    }
}

/// `https://index.docker.io/v1/` and `docker.io` name the same registry; keys may carry a
/// scheme and a path.
fn normalize_key(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            super::reference::DOCKER_HUB.to_owned()
        }
        other => other.to_owned(),
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses a header value; `None` for schemes this client does not speak.
    pub(crate) fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Self::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(params);
        Some(Self::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        })
    }
}

/// `key="value", key=value` pairs; quoted values may contain commas.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, next)) = chars.next() {
                            value.push(next);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        out.insert(key, value);
        rest = after.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

/// A token endpoint's answer (`token` and `access_token` are synonyms).
#[derive(Debug, Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_are_parsed_with_quotes_and_commas() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/node:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/node:pull,push".into()),
            })
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            Challenge::parse("bearer realm=http://127.0.0.1/t, service=x"),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1/t".into(),
                service: Some("x".into()),
                scope: None,
            })
        );
        assert_eq!(Challenge::parse("Negotiate abc"), None);
        assert_eq!(Challenge::parse("Bearer service=x"), None);
    }

    #[test]
    fn docker_config_reads_auth_and_username_password() {
        let auth = STANDARD.encode("alice:s3cr:et");
        let json = format!(
            r#"{{"auths":{{
                "https://index.docker.io/v1/":{{"auth":"{auth}"}},
                "127.0.0.1:5000":{{"username":"bob","password":"pw"}},
                "helper.example":{{}}
            }},"credsStore":"desktop"}}"#
        );
        let config = DockerConfig::parse(json.as_bytes()).unwrap();
        assert_eq!(
            config.get("docker.io"),
            Some(&Credentials::new("alice", "s3cr:et"))
        );
        assert_eq!(
            config.get("127.0.0.1:5000"),
            Some(&Credentials::new("bob", "pw"))
        );
        assert_eq!(config.get("helper.example"), None);
        let bad = DockerConfig::parse(br#"{"auths":{"x":{"auth":"!!"}}}"#).unwrap_err();
        assert!(bad.contains("not base64"), "{bad}");
        assert!(!format!("{:?}", Credentials::new("u", "hunter2")).contains("hunter2"));
    }
}
