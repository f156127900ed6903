//! `nanobox exec ID -- CMD ARGS...`: runs a command in a sandbox through the REST API's
//! streamed exec (newline-delimited JSON), writing its stdout and stderr as they arrive
//! and exiting with its exit code.

use std::io::{IsTerminal as _, Read as _, Write as _};

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::client::{api_error, read_bounded, segment, ApiArgs, CliError, Client};
use crate::vm_run::{EXIT_NANOBOX_ERROR, EXIT_TIMED_OUT};

/// The longest NDJSON line accepted: an event carries at most 1 MiB of output, base64
/// makes that 1.4 MB, and anything much longer is not the gateway speaking.
const MAX_LINE: usize = 4 << 20;

/// The most stdin sent (the API's body limit is 16 MiB by default).
const MAX_STDIN: u64 = 8 << 20;

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The sandbox id.
    pub id: String,
    /// An extra environment variable, NAME=value (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// The working directory (absolute).
    #[arg(long)]
    pub cwd: Option<String>,
    /// Kill the command after this many milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u32>,
    /// Send this process's stdin (up to 8 MiB) to the command.
    #[arg(short = 'i', long)]
    pub stdin: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// Runs the command; returns the exit code to exit with.
pub async fn run(args: ExecArgs, api: &ApiArgs) -> i32 {
    match exec(args, api).await {
        Ok(code) => code,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("nanobox: {e}");
            EXIT_NANOBOX_ERROR
        }
    }
}

async fn exec(args: ExecArgs, api: &ApiArgs) -> Result<i32, CliError> {
    let client = Client::from_args(api)?;
    let (command, rest) = args
        .command
        .split_first()
        .ok_or_else(|| CliError::new("no command given after --"))?;
    let mut body = json!({ "command": command, "args": rest });
    if !args.env.is_empty() {
        let mut env = Map::new();
        for item in &args.env {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| CliError::new(format!("--env {item:?}: expected NAME=VALUE")))?;
            env.insert(k.to_owned(), json!(v));
        }
        body["env"] = Value::Object(env);
    }
    if let Some(cwd) = &args.cwd {
        body["cwd"] = json!(cwd);
    }
    if let Some(t) = args.timeout_ms {
        body["timeout_ms"] = json!(t);
    }
    if args.stdin {
        if std::io::stdin().is_terminal() {
            return Err(CliError::new(
                "-i/--stdin reads stdin to its end: pipe something in",
            ));
        }
        let mut input = Vec::new();
        std::io::stdin()
            .take(MAX_STDIN + 1)
            .read_to_end(&mut input)
            .map_err(|e| CliError::new(format!("reading stdin: {e}")))?;
        if input.len() as u64 > MAX_STDIN {
            return Err(CliError::new(format!(
                "stdin is larger than {} MiB",
                MAX_STDIN >> 20
            )));
        }
        body["stdin"] = json!(base64::engine::general_purpose::STANDARD.encode(&input));
    }
    let path = format!("/api/v1/sandboxes/{}/exec?stream=true", segment(&args.id));
    let mut response = client
        .request(reqwest::Method::POST, &path)
        .header("content-type", "application/json")
        .header("accept", "application/x-ndjson")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| client.transport_error(&e))?;
    let status = response.status();
    if !status.is_success() {
        let body = read_bounded(response, 64 << 10).await.unwrap_or_default();
        return Err(api_error(status, &body));
    }
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let chunk = response.chunk().await.map_err(|e| {
            CliError::new(format!(
                "the exec stream broke: {}",
                client.transport_error(&e)
            ))
        })?;
        let Some(chunk) = chunk else {
            return Err(CliError::new(
                "the exec stream ended before the command's exit status",
            ));
        };
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some(code) = event(&line)? {
                return Ok(code);
            }
        }
        if pending.len() > MAX_LINE {
            return Err(CliError::new(
                "the exec stream sent a line longer than 4 MiB",
            ));
        }
    }
}

/// Handles one NDJSON line; the exit code once the command ended.
fn event(line: &[u8]) -> Result<Option<i32>, CliError> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        CliError::new(format!(
            "the exec stream sent something that is not JSON: {e}"
        ))
    })?;
    if let Some(error) = value.get("error") {
        return Err(CliError::new(format!(
            "{} ({})",
            error["message"].as_str().unwrap_or("exec failed"),
            error["code"].as_str().unwrap_or("UNKNOWN")
        )));
    }
    let result = &value["result"];
    let decode = |v: &Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .map_err(|e| CliError::new(format!("the exec stream sent bad base64: {e}")))
    };
    if let Some(out) = result.get("stdout") {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(&decode(out)?);
        let _ = stdout.flush();
    } else if let Some(err) = result.get("stderr") {
        let mut stderr = std::io::stderr().lock();
        let _ = stderr.write_all(&decode(err)?);
        let _ = stderr.flush();
    } else if let Some(exit) = result.get("exit") {
        if exit["timed_out"].as_bool() == Some(true) {
            eprintln!("nanobox: the command ran past its --timeout-ms and was killed");
            return Ok(Some(EXIT_TIMED_OUT));
        }
        let code = exit["exit_code"].as_i64().unwrap_or(0);
        return Ok(Some(i32::try_from(code).unwrap_or(EXIT_NANOBOX_ERROR)));
    }
    Ok(None)
}
