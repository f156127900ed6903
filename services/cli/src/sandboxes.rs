//! `nanobox sandbox create|ls|get|rm|keepalive|pause|resume`: sandboxes through the REST
//! API. `create` prints the new sandbox's id alone on stdout, so that scripts can take it
//! (`ID=$(nanobox sandbox create node22)`); the details go to stderr.

use serde_json::{json, Map, Value};

use crate::client::{segment, ApiArgs, CliError, Client};
use crate::output::{print_json, state_name, table};
use crate::templates::number;

#[derive(Debug, clap::Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox from a READY template; returns once it runs.
    Create {
        /// The template name.
        template: String,
        /// vCPUs (default 1).
        #[arg(long)]
        vcpu: Option<u32>,
        /// Memory in MiB (default 512).
        #[arg(long)]
        memory_mb: Option<u32>,
        /// Root disk in MiB (default: the template's).
        #[arg(long)]
        disk_mb: Option<u32>,
        /// Network mode: isolated, internal or internet.
        #[arg(long, value_parser = ["isolated", "internal", "internet"])]
        network: Option<String>,
        /// Lifetime in seconds (default: the server's).
        #[arg(long)]
        timeout: Option<u32>,
        /// An environment variable, NAME=value (repeatable).
        #[arg(long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// A label, key=value (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// List sandboxes.
    Ls {
        /// Only sandboxes of this template.
        #[arg(long)]
        template: Option<String>,
        /// Only sandboxes in this state (RUNNING, PAUSED, ...).
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one sandbox.
    Get { id: String },
    /// Destroy a sandbox.
    Rm { id: String },
    /// Extend a sandbox's lifetime.
    Keepalive {
        id: String,
        /// The new lifetime from now, in seconds (default: the server's).
        #[arg(long)]
        timeout: Option<u32>,
    },
    /// Pause a sandbox into a snapshot (frees its CPU and memory).
    Pause { id: String },
    /// Resume a paused sandbox.
    Resume {
        id: String,
        /// Its lifetime from the resume, in seconds.
        #[arg(long)]
        timeout: Option<u32>,
    },
}

pub async fn run(command: SandboxCommand, api: &ApiArgs) -> Result<(), CliError> {
    let client = Client::from_args(api)?;
    let path = |id: &str, action: &str| format!("/api/v1/sandboxes/{}{action}", segment(id));
    match command {
        SandboxCommand::Create {
            template,
            vcpu,
            memory_mb,
            disk_mb,
            network,
            timeout,
            env,
            labels,
        } => {
            let mut body = json!({ "template": template });
            let mut resources = Map::new();
            for (key, value) in [
                ("vcpu", vcpu),
                ("memory_mb", memory_mb),
                ("disk_mb", disk_mb),
            ] {
                if let Some(v) = value {
                    resources.insert(key.into(), json!(v));
                }
            }
            if !resources.is_empty() {
                body["resources"] = Value::Object(resources);
            }
            if let Some(mode) = network {
                body["network"] =
                    json!({ "mode": format!("NETWORK_MODE_{}", mode.to_ascii_uppercase()) });
            }
            if let Some(t) = timeout {
                body["timeout_sec"] = json!(t);
            }
            if !env.is_empty() {
                body["env"] = pairs("--env", &env)?;
            }
            if !labels.is_empty() {
                body["metadata"] = pairs("--label", &labels)?;
            }
            let sandbox = client.post("/api/v1/sandboxes", &body).await?;
            if api.json {
                return print_json(&sandbox);
            }
            println!("{}", sandbox["id"].as_str().unwrap_or(""));
            eprintln!(
                "sandbox {} {} on {} (boot {} ms{})",
                sandbox["id"].as_str().unwrap_or(""),
                state_name(&sandbox["state"], "SANDBOX_STATE_"),
                sandbox["node_id"].as_str().unwrap_or("?"),
                number(&sandbox["boot_time_ms"]),
                match sandbox["ip"].as_str() {
                    Some(ip) if !ip.is_empty() => format!(", ip {ip}"),
                    _ => String::new(),
                }
            );
            Ok(())
        }
        SandboxCommand::Ls { template, state } => {
            let mut query = Vec::new();
            if let Some(t) = template {
                query.push(format!("template={}", segment(&t)));
            }
            if let Some(s) = state {
                let s = s.to_ascii_uppercase();
                let s = if s.starts_with("SANDBOX_STATE_") {
                    s
                } else {
                    format!("SANDBOX_STATE_{s}")
                };
                query.push(format!("state={s}"));
            }
            // Every page: the list is newest first, a page at a time.
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let mut q = query.clone();
                q.push("page_size=1000".into());
                if !token.is_empty() {
                    q.push(format!("page_token={}", segment(&token)));
                }
                let page = client
                    .get(&format!("/api/v1/sandboxes?{}", q.join("&")))
                    .await?;
                all.extend(page["sandboxes"].as_array().cloned().unwrap_or_default());
                token = page["next_page_token"].as_str().unwrap_or("").to_owned();
                if token.is_empty() {
                    break;
                }
            }
            if api.json {
                return print_json(&json!({ "sandboxes": all }));
            }
            let rows = all
                .iter()
                .map(|s| {
                    vec![
                        s["id"].as_str().unwrap_or("").to_owned(),
                        s["template"].as_str().unwrap_or("").to_owned(),
                        state_name(&s["state"], "SANDBOX_STATE_"),
                        s["node_id"].as_str().unwrap_or("").to_owned(),
                        s["ip"]
                            .as_str()
                            .filter(|ip| !ip.is_empty())
                            .unwrap_or("-")
                            .to_owned(),
                        s["created_at"].as_str().unwrap_or("").to_owned(),
                    ]
                })
                .collect();
            table(&["ID", "TEMPLATE", "STATE", "NODE", "IP", "CREATED"], rows);
            Ok(())
        }
        SandboxCommand::Get { id } => {
            let sandbox = client.get(&path(&id, "")).await?;
            if api.json {
                return print_json(&sandbox);
            }
            for (label, value) in [
                ("id", sandbox["id"].as_str().unwrap_or("").to_owned()),
                (
                    "template",
                    sandbox["template"].as_str().unwrap_or("").to_owned(),
                ),
                ("state", state_name(&sandbox["state"], "SANDBOX_STATE_")),
                ("node", sandbox["node_id"].as_str().unwrap_or("").to_owned()),
                ("ip", sandbox["ip"].as_str().unwrap_or("").to_owned()),
                ("vcpu", number(&sandbox["resources"]["vcpu"]).to_string()),
                (
                    "memory_mb",
                    number(&sandbox["resources"]["memory_mb"]).to_string(),
                ),
                (
                    "created",
                    sandbox["created_at"].as_str().unwrap_or("").to_owned(),
                ),
                (
                    "expires",
                    sandbox["expires_at"].as_str().unwrap_or("-").to_owned(),
                ),
                (
                    "message",
                    sandbox["message"].as_str().unwrap_or("").to_owned(),
                ),
            ] {
                if !value.is_empty() {
                    println!("{label:<10} {value}");
                }
            }
            Ok(())
        }
        SandboxCommand::Rm { id } => {
            let answer = client.delete(&path(&id, "")).await?;
            eprintln!(
                "sandbox {id} {}",
                state_name(&answer["sandbox"]["state"], "SANDBOX_STATE_")
            );
            Ok(())
        }
        SandboxCommand::Keepalive { id, timeout } => {
            let answer = client
                .post(
                    &path(&id, "/keepalive"),
                    &json!({ "timeout_sec": timeout.unwrap_or(0) }),
                )
                .await?;
            if api.json {
                return print_json(&answer);
            }
            eprintln!(
                "sandbox {id} expires at {}",
                answer["expires_at"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        SandboxCommand::Pause { id } => {
            let answer = client.post(&path(&id, "/pause"), &json!({})).await?;
            if api.json {
                return print_json(&answer);
            }
            eprintln!(
                "sandbox {id} {} (snapshot in {} ms)",
                state_name(&answer["sandbox"]["state"], "SANDBOX_STATE_"),
                number(&answer["snapshot_time_ms"])
            );
            Ok(())
        }
        SandboxCommand::Resume { id, timeout } => {
            let sandbox = client
                .post(
                    &path(&id, "/resume"),
                    &json!({ "timeout_sec": timeout.unwrap_or(0) }),
                )
                .await?;
            if api.json {
                return print_json(&sandbox);
            }
            eprintln!(
                "sandbox {id} {} on {}",
                state_name(&sandbox["state"], "SANDBOX_STATE_"),
                sandbox["node_id"].as_str().unwrap_or("?")
            );
            Ok(())
        }
    }
}

/// `NAME=value` arguments as a JSON object.
fn pairs(flag: &str, items: &[String]) -> Result<Value, CliError> {
    let mut map = Map::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| CliError::new(format!("{flag} {item:?}: expected NAME=VALUE")))?;
        map.insert(k.to_owned(), json!(v));
    }
    Ok(Value::Object(map))
}
