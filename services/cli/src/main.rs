//! `nanobox`: the NanoBox command.
//!
//! - `nanobox up` runs the whole stack on this machine ([`up`]);
//! - `nanobox template warmup|ls|status|rm`, `nanobox sandbox create|ls|get|rm|keepalive|
//!   pause|resume` and `nanobox exec` use the REST API of a running NanoBox ([`client`],
//!   [`templates`], [`sandboxes`], [`exec`]);
//! - `nanobox template build` and `nanobox vm run` work offline, without the services:
//!   the shortest path from "does this image boot?" to an answer.

mod client;
mod exec;
mod output;
mod paths;
mod sandboxes;
mod template_build;
mod templates;
mod up;
mod vm_run;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "nanobox",
    version,
    about = "NanoBox: OCI images as microVM sandboxes"
)]
struct Cli {
    #[command(flatten)]
    api: client::ApiArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole stack on this machine, in the foreground, until Ctrl-C.
    Up(up::UpArgs),
    /// Templates: warm images up through the API, or build one locally.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Sandboxes through the API.
    #[command(subcommand)]
    Sandbox(sandboxes::SandboxCommand),
    /// Run a command in a sandbox, streaming its output; exits with its exit code.
    Exec(exec::ExecArgs),
    /// Work with single VMs directly, without the services (debugging).
    #[command(subcommand)]
    Vm(VmCommand),
}

#[derive(Debug, Subcommand)]
enum TemplateCommand {
    /// Turn an OCI image into a bootable ext4 rootfs with the guest init injected
    /// (locally, without the services).
    Build(template_build::BuildArgs),
    #[command(flatten)]
    Api(templates::TemplateApiCommand),
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Boot a guest, run a command in it, stream its output, exit with its status.
    Run(vm_run::RunArgs),
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nanobox: cannot start the async runtime: {e}");
            std::process::exit(vm_run::EXIT_NANOBOX_ERROR);
        }
    };
    let code = runtime.block_on(async {
        let telemetry = nanobox_telemetry::TelemetryConfig {
            // Failures are reported as one line by each command; logs are for RUST_LOG.
            default_filter: "error".into(),
            ..Default::default()
        };
        let _guard = match nanobox_telemetry::init("nanobox-cli", &telemetry) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("nanobox: telemetry disabled: {e}");
                None
            }
        };
        let api = cli.api;
        let one_line = |result: Result<(), client::CliError>| match result {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("nanobox: {e}");
                1
            }
        };
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Vm(VmCommand::Run(args)) => vm_run::run(args).await,
            Command::Template(TemplateCommand::Build(args)) => template_build::run(args).await,
            Command::Template(TemplateCommand::Api(command)) => {
                one_line(templates::run(command, &api).await)
            }
            Command::Sandbox(command) => one_line(sandboxes::run(command, &api).await),
            Command::Exec(args) => exec::run(args, &api).await,
        }
    });
    // Do not wait for the runtime to wind down: stdout is flushed and the VM is gone.
    runtime.shutdown_background();
    std::process::exit(code);
}
