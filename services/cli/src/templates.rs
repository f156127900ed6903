//! `nanobox template warmup|ls|status|rm`: templates through the REST API. A warmup
//! follows its task until READY or FAILED with a live progress bar on a terminal (phase,
//! layers, bytes), or one line per change of phase or layer count when stderr is not one.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{segment, ApiArgs, CliError, Client};
use crate::output::{bytes, print_json, state_name, table};

/// How often a warmup's status is polled.
const POLL: Duration = Duration::from_millis(250);

/// How long a warmup may take before the command gives up following it (it goes on).
const WARMUP_LIMIT: Duration = Duration::from_secs(3600);

#[derive(Debug, clap::Subcommand)]
pub enum TemplateApiCommand {
    /// Warm an OCI image up into a template, following it until READY or FAILED.
    Warmup {
        /// The template name, `[a-z0-9][a-z0-9._-]{0,62}`.
        name: String,
        /// The image reference (`node:22-alpine`, `127.0.0.1:5000/app:v1`, ...).
        image: String,
        /// The platform, `os/arch[/variant]`; default the cluster's.
        #[arg(long)]
        platform: Option<String>,
        /// Return once the warmup is submitted instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// List templates.
    Ls,
    /// Show a template's warmup status.
    Status { name: String },
    /// Remove a template.
    Rm {
        name: String,
        /// Remove it even while sandboxes use it.
        #[arg(long)]
        force: bool,
    },
}

pub async fn run(command: TemplateApiCommand, api: &ApiArgs) -> Result<(), CliError> {
    let client = Client::from_args(api)?;
    match command {
        TemplateApiCommand::Warmup {
            name,
            image,
            platform,
            no_wait,
        } => {
            warmup(
                &client,
                api.json,
                &name,
                &image,
                platform.as_deref(),
                no_wait,
            )
            .await
        }
        TemplateApiCommand::Ls => {
            let answer = client.get("/api/v1/templates").await?;
            if api.json {
                return print_json(&answer);
            }
            let rows = answer["templates"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    vec![
                        text(&t["name"]),
                        state_name(&t["state"], "TEMPLATE_STATE_"),
                        text(&t["image"]),
                        size(&t["size_bytes"]),
                        short_digest(&t["digest"]),
                    ]
                })
                .collect();
            table(&["NAME", "STATE", "IMAGE", "SIZE", "DIGEST"], rows);
            Ok(())
        }
        TemplateApiCommand::Status { name } => {
            let answer = client
                .get(&format!("/api/v1/templates/{}/status", segment(&name)))
                .await?;
            if api.json {
                return print_json(&answer);
            }
            // REST answers with the task itself (`response_body: "task"`).
            let task = &answer;
            println!("name:     {}", text(&task["name"]));
            println!("image:    {}", text(&task["image"]));
            println!(
                "state:    {}",
                state_name(&task["state"], "TEMPLATE_STATE_")
            );
            println!("progress: {}", progress_text(task));
            if let Some(digest) = task["digest"].as_str().filter(|d| !d.is_empty()) {
                println!("digest:   {digest}");
            }
            if let Some(message) = task["message"].as_str().filter(|m| !m.is_empty()) {
                println!("message:  {message}");
            }
            Ok(())
        }
        TemplateApiCommand::Rm { name, force } => {
            let path = format!(
                "/api/v1/templates/{}{}",
                segment(&name),
                if force { "?force=true" } else { "" }
            );
            client.delete(&path).await?;
            eprintln!("template {name} removed");
            Ok(())
        }
    }
}

async fn warmup(
    client: &Client,
    json_out: bool,
    name: &str,
    image: &str,
    platform: Option<&str>,
    no_wait: bool,
) -> Result<(), CliError> {
    let mut body = json!({ "name": name, "image": image });
    if let Some(p) = platform {
        body["platform"] = json!(p);
    }
    let submitted = client.post("/api/v1/templates/warmup", &body).await?;
    if no_wait {
        return if json_out {
            print_json(&submitted)
        } else {
            eprintln!("warmup of {name} submitted");
            Ok(())
        };
    }
    let mut progress = Progress::new(name);
    let started = Instant::now();
    let path = format!("/api/v1/templates/{}/status", segment(name));
    // REST answers with the task itself (`response_body: "task"`).
    let task = loop {
        let task = client.get(&path).await?;
        progress.show(&task);
        match task["state"].as_str() {
            Some("TEMPLATE_STATE_READY") | Some("TEMPLATE_STATE_FAILED") => break task,
            _ => {}
        }
        if started.elapsed() > WARMUP_LIMIT {
            progress.finish();
            return Err(CliError::new(format!(
                "warmup of {name} still running after {} s; follow it with `nanobox template status {name}`",
                WARMUP_LIMIT.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    };
    progress.finish();
    if task["state"] == "TEMPLATE_STATE_FAILED" {
        return Err(CliError::new(format!(
            "warmup of {name} failed: {}",
            text(&task["message"])
        )));
    }
    if json_out {
        return print_json(&task);
    }
    let listed = client.get("/api/v1/templates").await?;
    let template = listed["templates"]
        .as_array()
        .and_then(|all| all.iter().find(|t| t["name"] == name))
        .cloned()
        .unwrap_or(Value::Null);
    eprintln!(
        "template {name} READY in {:.1} s: {} ({}), {}",
        started.elapsed().as_secs_f64(),
        text(&template["image"]),
        short_digest(&template["digest"]),
        size(&template["size_bytes"]),
    );
    Ok(())
}

/// The warmup's progress on stderr.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines { last: String },
}

impl Progress {
    fn new(name: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self::Lines {
                last: String::new(),
            };
        }
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{prefix} {spinner} {msg:<24} [{bar:30}] {bytes}/{total_bytes} {elapsed}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(name.to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        Self::Bar(bar)
    }

    fn show(&mut self, task: &Value) {
        let state = state_name(&task["state"], "TEMPLATE_STATE_");
        let p = &task["progress"];
        let layers = format!(
            "{}/{}",
            number(&p["layers_done"]),
            number(&p["layers_total"])
        );
        match self {
            Self::Bar(bar) => {
                bar.set_length(number(&p["bytes_total"]));
                bar.set_position(number(&p["bytes_done"]));
                bar.set_message(format!("{state} layers {layers}"));
            }
            Self::Lines { last } => {
                // Bytes change on every poll: a line per phase or layer, not per byte.
                let key = format!("{state} {layers}");
                if *last != key {
                    eprintln!(
                        "warmup: {state:<10} layers {layers:<7} {}",
                        progress_bytes(p)
                    );
                    *last = key;
                }
            }
        }
    }

    fn finish(&mut self) {
        if let Self::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

fn progress_text(task: &Value) -> String {
    let p = &task["progress"];
    format!(
        "layers {}/{}, {}",
        number(&p["layers_done"]),
        number(&p["layers_total"]),
        progress_bytes(p)
    )
}

fn progress_bytes(p: &Value) -> String {
    format!(
        "{} of {}",
        bytes(number(&p["bytes_done"])),
        bytes(number(&p["bytes_total"]))
    )
}

/// A proto3 JSON integer: a number, or a string for 64-bit fields; absent is 0.
pub fn number(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

fn size(v: &Value) -> String {
    match number(v) {
        0 => "-".into(),
        n => bytes(n),
    }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or("").to_owned()
}

fn short_digest(v: &Value) -> String {
    let d = v.as_str().unwrap_or("");
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    if hex.is_empty() {
        "-".into()
    } else {
        format!("sha256:{}", &hex[..hex.len().min(12)])
    }
}
