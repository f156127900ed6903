//! Project automation, run as `cargo xtask <command>`.
//!
//! - `setup`: install what NanoBox needs on this machine (Debian packages), build the guest
//!   kernel, the static guest init and the test rootfs (all cached by their inputs).
//! - `demo`: set up, then boot a guest and run a command in it.
//! - `test`: set up, then run the whole test suite against real guests.
//! - `bench <name>`: run a benchmark, print a table, write `target/bench/<name>.json`.

mod bench;
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
    /// Set up, boot a guest and run a command in it.
    Demo,
    /// Set up and run every test (extra arguments go to cargo nextest).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a benchmark: boot.
    Bench { name: String },
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
        Command::Bench { name } => {
            let guest = setup::prepare()?;
            match name.as_str() {
                "boot" => bench::boot(&guest)?,
                other => anyhow::bail!("unknown benchmark {other:?} (available: boot)"),
            }
        }
    }
    Ok(())
}

fn demo(guest: &setup::Guest) -> anyhow::Result<()> {
    setup::step("building the nanobox command");
    setup::cargo(&["build", "--quiet", "--release", "-p", "nanobox-cli"])?;
    let script = "echo \"Hello from $(hostname), a NanoBox microVM\"; \
                  echo \"kernel: $(uname -sr)   cpus: $(nproc)   memory: $(free -m | awk '/Mem:/{print $2}') MiB\"; \
                  echo \"rootfs: $(cat /etc/nanobox/image.json | head -c 60)...\"";
    setup::step("booting a guest and running a command in it");
    println!(
        "$ nanobox vm run --rootfs {} --timings -- sh -c '...'",
        guest.rootfs.display()
    );
    let status = std::process::Command::new("target/release/nanobox")
        .args(["vm", "run", "--no-stdin", "--timings", "--rootfs"])
        .arg(&guest.rootfs)
        .arg("--kernel")
        .arg(&guest.kernel)
        .args(["--", "sh", "-c", script])
        .status()
        .context("running target/release/nanobox")?;
    anyhow::ensure!(status.success(), "the demo command failed: {status}");
    println!(
        "\nThe line above with agent_ready_ms is the boot time (process start to agent ready)."
    );
    Ok(())
}

fn test(guest: &setup::Guest, extra: &[String]) -> anyhow::Result<()> {
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
