//! Project automation, run as `cargo xtask <command>`.
//!
//! - `setup`: install what NanoBox needs on this machine (Debian packages), build the guest
//!   kernel, the static guest init and the test rootfs (all cached by their inputs).
//! - `demo`: set up, then the seed's Quick Start: `nanobox up`, warmup, create and exec
//!   over REST.
//! - `test`: set up, then run the whole test suite against real guests.
//! - `bench <name>`: run a benchmark, print a table, write `target/bench/<name>.json`.

mod bench;
mod deploy;
mod quickstart;
mod setup;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install packages and build the guest kernel, init and test rootfs.
    Setup,
    /// Set up, start `nanobox up`, run the seed's Quick Start over REST, stop.
    Demo,
    /// Set up and run every test (extra arguments go to cargo nextest).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a benchmark: boot, warmup, node, api, up.
    Bench { name: String },
    /// Set up, then check docker/, helm/ and the Tiltfile with hadolint, trivy, the Helm
    /// SDK, kubernetes-validate and a Starlark evaluation, and build two images with buildah.
    CheckDeploy,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = setup::workspace_root()?;
    std::env::set_current_dir(&root).context("entering the workspace root")?;
    match cli.command {
        Command::Setup => {
            let guest = setup::prepare()?;
            guest.print_env();
        }
        Command::Demo => {
            let guest = setup::prepare()?;
            demo(&guest)?;
        }
        Command::Test { args } => {
            let guest = setup::prepare()?;
            test(&guest, &args)?;
        }
        Command::CheckDeploy => {
            setup::prepare()?;
            deploy::check()?;
        }
        Command::Bench { name } => {
            let guest = setup::prepare()?;
            match name.as_str() {
                "boot" => bench::boot(&guest)?,
                "warmup" => bench::warmup(&guest)?,
                "node" => bench::node(&guest)?,
                "api" => bench::api(&guest)?,
                "up" => bench::up(&guest)?,
                other => {
                    anyhow::bail!(
                        "unknown benchmark {other:?} (available: boot, warmup, node, api, up)"
                    )
                }
            }
        }
    }
    Ok(())
}

/// The main job on one machine, the seed's Quick Start: `nanobox up`, then warmup,
/// create and exec over REST with curl, against an image a local registry serves; then
/// the stack stops.
fn demo(guest: &setup::Guest) -> anyhow::Result<()> {
    quickstart::build_release()?;
    let (registry, image) = quickstart::serve_image()?;
    setup::step("nanobox up (the whole stack on this machine)");
    let mut up = quickstart::Up::start(guest, &quickstart::data_dir("demo"), &registry.host)?;
    setup::step("the Quick Start over REST");
    quickstart::run(&up, &image, true)?;
    setup::step("stopping the stack (SIGTERM)");
    up.stop()?;
    println!(
        "\nNext: `target/release/nanobox up` keeps a stack running; README.md shows the same steps by hand."
    );
    Ok(())
}

fn test(guest: &setup::Guest, extra: &[String]) -> anyhow::Result<()> {
    setup::step("deployment artefacts (cargo xtask check-deploy)");
    deploy::check()?;
    setup::ensure_nextest()?;
    setup::ensure_vsock_device()?;
    setup::step("running the test suite (real guests under QEMU)");
    let mut cmd = std::process::Command::new("cargo");
    cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"])
        .args(extra)
        .env("NANOBOX_TEST_KERNEL", &guest.kernel)
        .env("NANOBOX_TEST_ROOTFS", &guest.rootfs)
        .env("NANOBOX_INIT", &guest.init);
    let status = cmd.status().context("running cargo nextest")?;
    anyhow::ensure!(status.success(), "tests failed");
    Ok(())
}
