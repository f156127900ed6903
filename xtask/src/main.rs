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
    /// Set up, warm an OCI image into a template, boot it, run a command in it.
    Demo,
    /// Set up and run every test (extra arguments go to cargo nextest).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a benchmark: boot, warmup, node, api.
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
                "warmup" => bench::warmup(&guest)?,
                "node" => bench::node(&guest)?,
                "api" => bench::api(&guest)?,
                other => {
                    anyhow::bail!(
                        "unknown benchmark {other:?} (available: boot, warmup, node, api)"
                    )
                }
            }
        }
    }
    Ok(())
}

/// The main job on one machine: an OCI image is warmed into a template (layers applied,
/// init injected, ext4 built), a microVM boots from it, and a command runs inside.
fn demo(guest: &setup::Guest) -> anyhow::Result<()> {
    setup::step("building the nanobox command");
    setup::cargo(&["build", "--quiet", "--release", "-p", "nanobox-cli"])?;
    let nanobox = std::path::Path::new("target/release/nanobox");

    let work = setup::cache_dir().join("demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    setup::step("making a small OCI image (busybox, two layers) with umoci");
    let reference = demo_image(&work)?;

    let rootfs = work.join("demo.ext4");
    setup::step("warming it into a template: nanobox template build");
    println!(
        "$ nanobox template build {reference} -o {}",
        rootfs.display()
    );
    let status = std::process::Command::new(nanobox)
        .args(["template", "build", &reference, "-o"])
        .arg(&rootfs)
        .arg("--init")
        .arg(&guest.init)
        .status()
        .context("running nanobox template build")?;
    anyhow::ensure!(status.success(), "template build failed: {status}");

    setup::step("booting a microVM from it and running a command");
    let script = "echo \"$GREETING from $(hostname), a NanoBox microVM\"; \
                  echo \"kernel $(uname -r), $(nproc) vCPU, $(free -m | awk '/Mem:/{print $2}') MiB\"; \
                  cat /etc/motd";
    println!(
        "$ nanobox vm run --rootfs {} --timings -- sh -c '...'",
        rootfs.display()
    );
    let status = std::process::Command::new(nanobox)
        .args(["vm", "run", "--no-stdin", "--timings", "--rootfs"])
        .arg(&rootfs)
        .arg("--kernel")
        .arg(&guest.kernel)
        .args(["--", "sh", "-c", script])
        .status()
        .context("running nanobox vm run")?;
    anyhow::ensure!(status.success(), "the demo command failed: {status}");
    println!(
        "\n(agent_ready_ms: process start to guest agent ready; exec_done_ms: to the command's result)"
    );
    Ok(())
}

fn run_tool(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Builds `<work>/layout` with umoci: busybox in one layer, a message in a second, and
/// an environment in the config. Returns the `oci-layout:` reference.
fn demo_image(work: &std::path::Path) -> anyhow::Result<String> {
    let layout = work.join("layout");
    let image = format!("{}:demo", layout.display());
    let umoci = || std::process::Command::new("umoci");
    run_tool(umoci().args(["init", "--layout"]).arg(&layout))?;
    run_tool(umoci().args(["new", "--image", &image]))?;
    for (n, layer) in ["busybox", "message"].iter().enumerate() {
        let bundle = work.join(format!("bundle{n}"));
        run_tool(umoci().args(["unpack", "--image", &image]).arg(&bundle))?;
        let root = bundle.join("rootfs");
        if *layer == "busybox" {
            std::fs::create_dir_all(root.join("bin"))?;
            std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
            let out = std::process::Command::new("/bin/busybox")
                .arg("--list")
                .output()?;
            for applet in String::from_utf8_lossy(&out.stdout).lines() {
                if applet != "busybox" && applet != "init" {
                    std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
                }
            }
        } else {
            std::fs::create_dir_all(root.join("etc"))?;
            std::fs::write(
                root.join("etc/motd"),
                "This rootfs was an OCI image a moment ago.\n",
            )?;
        }
        run_tool(umoci().args(["repack", "--image", &image]).arg(&bundle))?;
    }
    run_tool(umoci().args([
        "config",
        "--image",
        &image,
        "--config.env",
        "GREETING=Hello",
    ]))?;
    Ok(format!("oci-layout:{image}"))
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
