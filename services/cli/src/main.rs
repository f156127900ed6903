//! `nanobox`: run NanoBox pieces on one machine, without the services.
//!
//! `nanobox vm run` boots a guest from an ext4 rootfs, runs one command in it with its
//! output streamed back, and exits with the command's status. It stays useful after the
//! full stack exists: it is the shortest path from "does this image boot?" to an answer.

mod paths;
mod template_build;
mod vm_run;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "nanobox",
    version,
    about = "NanoBox: OCI images as microVM sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with single VMs directly (debugging).
    #[command(subcommand)]
    Vm(VmCommand),
    /// Work with templates locally, without the services.
    #[command(subcommand)]
    Template(TemplateCommand),
}

#[derive(Debug, Subcommand)]
enum TemplateCommand {
    /// Turn an OCI image into a bootable ext4 rootfs with the guest init injected.
    Build(template_build::BuildArgs),
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
        match cli.command {
            Command::Vm(VmCommand::Run(args)) => vm_run::run(args).await,
            Command::Template(TemplateCommand::Build(args)) => template_build::run(args).await,
        }
    });
    // Do not wait for the runtime to wind down: stdout is flushed and the VM is gone.
    runtime.shutdown_background();
    std::process::exit(code);
}
