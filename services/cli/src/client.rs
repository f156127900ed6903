//! The REST client of the API commands: where the API is (flags, `NANOBOX_URL` and
//! `NANOBOX_API_KEY`, a config file, or the endpoints of a `nanobox up` on this machine),
//! requests with the API key, and errors as one line that names the HTTP status and the
//! gRPC code the gateway sent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// How long a unary call may take (a create waits for a cold boot).
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest answer read for a unary call.
const MAX_ANSWER: usize = 16 << 20;

/// Where the API is and how to authenticate, as given on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The REST API's base URL. Default: $NANOBOX_URL, else the config file's `url`, else
    /// the `nanobox up` running on this machine.
    #[arg(long, global = true, env = "NANOBOX_URL", hide_env_values = true)]
    pub url: Option<String>,
    /// The API key (sent as `Authorization: Bearer <key>`). Default: $NANOBOX_API_KEY,
    /// else the config file's `api_key`, else the local `nanobox up`'s.
    #[arg(long, global = true, env = "NANOBOX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A TOML file with `url` and `api_key`. Default: $NANOBOX_CLI_CONFIG, else
    /// ~/.config/nanobox/cli.toml if it exists.
    #[arg(long, global = true, env = "NANOBOX_CLI_CONFIG")]
    pub cli_config: Option<PathBuf>,
    /// Print the answer as JSON (read commands).
    #[arg(long, global = true)]
    pub json: bool,
}

/// A failed command, as the one line it prints.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl CliError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    url: Option<String>,
    api_key: Option<String>,
}

/// The REST API of one NanoBox.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    /// The client `args` describe, filling what they leave out from the config file and
    /// then from a local `nanobox up`.
    pub fn from_args(args: &ApiArgs) -> Result<Self, CliError> {
        let file = match &args.cli_config {
            Some(path) => Some(read_file_config(path)?),
            None => default_config_path()
                .filter(|p| p.is_file())
                .map(|p| read_file_config(&p))
                .transpose()?,
        }
        .unwrap_or_default();
        let local = local_stack();
        let url = args
            .url
            .clone()
            .or(file.url)
            .or_else(|| local.as_ref().map(|(url, _)| url.clone()))
            .ok_or_else(|| {
                CliError::new(
                    "no API endpoint: pass --url, set NANOBOX_URL, or start one with `nanobox up`",
                )
            })?;
        let key = args
            .api_key
            .clone()
            .or(file.api_key)
            .or_else(|| local.map(|(_, key)| key));
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| CliError::new(format!("cannot set up HTTP: {e}")))?;
        Ok(Self {
            http,
            base: url.trim_end_matches('/').to_owned(),
            key,
        })
    }

    /// A request to `path` with the API key.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        request
    }

    /// A unary call: sends `body` (JSON) and returns the JSON answer, or the error line.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CliError> {
        let mut request = self.request(method, path).timeout(CALL_TIMEOUT);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        let bytes = read_bounded(response, MAX_ANSWER)
            .await
            .map_err(|e| self.transport_error(&e))?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            CliError::new(format!(
                "the API at {} answered HTTP {} with something that is not JSON: {e}",
                self.base,
                status.as_u16()
            ))
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, CliError> {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// The error line of a request that got no HTTP answer.
    pub fn transport_error(&self, e: &reqwest::Error) -> CliError {
        let mut cause = String::new();
        let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
        while let Some(s) = source {
            cause = s.to_string();
            source = s.source();
        }
        let what = if e.is_timeout() {
            "timed out".to_owned()
        } else if cause.is_empty() {
            e.to_string()
        } else {
            cause
        };
        CliError::new(format!(
            "cannot reach the NanoBox API at {}: {what} (is it running? `nanobox up` starts one)",
            self.base
        ))
    }
}

/// Reads a body, keeping at most `limit` bytes (the rest is not read).
pub async fn read_bounded(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    Ok(body)
}

/// The one line for an error answer: the gateway's `{code, message}` with the HTTP
/// status.
pub fn api_error(status: reqwest::StatusCode, body: &[u8]) -> CliError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let code = parsed
        .as_ref()
        .and_then(|v| v["code"].as_str())
        .unwrap_or("");
    let message = parsed
        .as_ref()
        .and_then(|v| v["message"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text: String = text.trim().chars().take(200).collect();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_owned()
            } else {
                text
            }
        });
    if code.is_empty() {
        CliError::new(format!("{message} (HTTP {})", status.as_u16()))
    } else {
        CliError::new(format!("{message} (HTTP {}, {code})", status.as_u16()))
    }
}

fn default_config_path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|dir| dir.join("nanobox/cli.toml"))
}

fn read_file_config(path: &Path) -> Result<FileConfig, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::new(format!("reading {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| CliError::new(format!("{}: {}", path.display(), e.message())))
}

/// The URL and key of a `nanobox up` on this machine (its endpoints file in the default
/// data directory), if one runs and this user may read it.
fn local_stack() -> Option<(String, String)> {
    let text = std::fs::read_to_string(nanobox_stack::endpoints_file(
        &nanobox_stack::default_data_dir(),
    ))
    .ok()?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    Some((value("NANOBOX_URL")?, value("NANOBOX_API_KEY")?))
}

/// Percent-encodes a path segment (a sandbox id or template name given by the user).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
