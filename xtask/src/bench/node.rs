//! `cargo xtask bench node`: the node agent through its gRPC API, with real guests.
//!
//! Fields of `target/bench/node.json` (a contract): `pool_create_ms_p50`,
//! `pool_create_ms_p99` (50 creates served by the warm pool, concurrency 1),
//! `cold_create_ratio` (cold create to the first exec's result over a bare QEMU boot of the
//! same kernel and rootfs to the init's READY, alternating in one run), `cow_ms` (median
//! clone time of a 1 GiB template per method: reflink on an XFS file system with reflinks,
//! qcow2 and the sparse copy on the workspace's file system), `idle_pss_mib` (median PSS of
//! a VMM with 10 idle 128 MiB sandboxes), `destroy_ms_p50`, and for those 10 sandboxes
//! `pause_ms_p50` (pause into a node-local snapshot), `resume_ms_p50` (resume to the first
//! exec's result; compare with `cold_create_ms_median`) and `snapshot_mib` (median size).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use serde_json::json;

use super::{median, percentile, round3, write_result};
use crate::setup::{self, Guest};

const TEMPLATE_BYTES: u64 = 1 << 30;
const TEMPLATE_DATA_MIB: u64 = 600;

fn checked(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A 1 GiB file with 600 MiB of random data at the start and a hole after, like a
/// template with free space.
fn make_template(path: &Path) -> anyhow::Result<()> {
    checked(
        Command::new("dd")
            .arg("if=/dev/urandom")
            .arg(format!("of={}", path.display()))
            .arg("bs=1M")
            .arg(format!("count={TEMPLATE_DATA_MIB}"))
            .arg("status=none"),
    )?;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.set_len(TEMPLATE_BYTES)?;
    Ok(())
}

/// Unmounts and detaches the XFS scratch file system on drop.
struct XfsMount {
    dir: PathBuf,
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

fn cow_bench(template: &Path, dir: &Path) -> anyhow::Result<serde_json::Value> {
    std::fs::create_dir_all(dir)?;
    let out = checked(
        Command::new("target/release/examples/cow_bench")
            .arg(template)
            .arg(dir)
            .arg("5"),
    )?;
    serde_json::from_str(&out).context("reading cow_bench's output")
}

fn cow(work: &Path) -> anyhow::Result<(serde_json::Value, serde_json::Value)> {
    setup::step("copy-on-write clones of a 1 GiB template (ext4 here, and XFS with reflinks)");
    let plain_dir = work.join("ext4");
    std::fs::create_dir_all(&plain_dir)?;
    let plain_template = plain_dir.join("template.img");
    make_template(&plain_template)?;
    let plain = cow_bench(&plain_template, &plain_dir.join("clones"))?;

    let image = work.join("xfs.img");
    std::fs::File::create(&image)?.set_len(3 << 30)?;
    checked(
        Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&image),
    )?;
    let mount = XfsMount {
        dir: work.join("xfs"),
    };
    std::fs::create_dir_all(&mount.dir)?;
    checked(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount.dir),
    )?;
    let xfs_template = mount.dir.join("template.img");
    make_template(&xfs_template)?;
    let xfs = cow_bench(&xfs_template, &mount.dir.join("clones"))?;
    drop(mount);

    let pick = |method: &str| -> serde_json::Value {
        // The best file system for each method: reflink needs XFS; the sparse copy and
        // qcow2 are what a node on ext4 gets.
        let source = if method == "reflink" { &xfs } else { &plain };
        source[method]["median_ms"].clone()
    };
    let summary = json!({
        "reflink": pick("reflink"),
        "qcow2": pick("qcow2"),
        "sparse_copy": pick("sparse_copy"),
    });
    Ok((summary, json!({ "ext4": plain, "xfs": xfs })))
}

pub fn node(guest: &Guest) -> anyhow::Result<()> {
    setup::step("building the node agent and the benchmark programs (release)");
    setup::cargo(&[
        "build",
        "--quiet",
        "--release",
        "-p",
        "nanobox-node-agent",
        "--bin",
        "nanobox-node-agent",
        "--example",
        "node_bench",
        "-p",
        "nanobox-vmm",
        "--example",
        "boot_bench",
        "-p",
        "nanobox-node-storage",
        "--example",
        "cow_bench",
    ])?;
    let work = std::env::current_dir()?
        .join("target/bench")
        .join(format!("node-work.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = run(guest, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run(guest: &Guest, work: &Path) -> anyhow::Result<()> {
    let (cow_ms, cow_detail) = cow(work)?;

    setup::step("50 pool creates, 5 cold creates against 5 bare boots, 10 idle sandboxes");
    let out = Command::new("target/release/examples/node_bench")
        .arg("target/release/nanobox-node-agent")
        .arg("target/release/examples/boot_bench")
        .arg(&guest.kernel)
        .arg(&guest.rootfs)
        .arg(work.join("node"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running node_bench")?;
    anyhow::ensure!(out.status.success(), "node_bench failed");
    let raw: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading node_bench's output")?;
    let samples = |key: &str| -> Vec<f64> {
        raw[key]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default()
    };
    let pool = samples("pool_create_ms");
    let destroy = samples("destroy_ms");
    let cold = samples("cold_create_ms");
    let bare = samples("bare_boot_ms");
    let pss = samples("idle_pss_mib");
    let pause = samples("pause_ms");
    let resume = samples("resume_ms");
    let snapshot_mib = samples("snapshot_mib");
    anyhow::ensure!(
        !pool.is_empty()
            && !cold.is_empty()
            && !bare.is_empty()
            && !pss.is_empty()
            && !resume.is_empty(),
        "node_bench returned no samples: {raw}"
    );
    let ratio = median(&cold) / median(&bare);
    let result = json!({
        "pool_create_ms_p50": round3(percentile(&pool, 50.0)),
        "pool_create_ms_p99": round3(percentile(&pool, 99.0)),
        "cold_create_ratio": round3(ratio),
        "cow_ms": cow_ms,
        "idle_pss_mib": round3(median(&pss)),
        "destroy_ms_p50": round3(percentile(&destroy, 50.0)),
        "pause_ms_p50": round3(percentile(&pause, 50.0)),
        "resume_ms_p50": round3(percentile(&resume, 50.0)),
        "snapshot_mib": round3(median(&snapshot_mib)),
        "cold_create_ms_median": round3(median(&cold)),
        "bare_boot_ms_median": round3(median(&bare)),
        "samples": raw,
        "cow_detail": cow_detail,
        "host": super::host_info(),
    });

    println!();
    println!("node benchmark (medians unless named)");
    println!("{:<28} {:>12}", "metric", "value");
    let row = |name: &str, v: f64| println!("{name:<28} {v:>12.3}");
    row("pool_create_ms_p50", percentile(&pool, 50.0));
    row("pool_create_ms_p99", percentile(&pool, 99.0));
    row("cold_create_ms", median(&cold));
    row("bare_boot_ms", median(&bare));
    println!(
        "{:<28} {:>12.3}   (goal <= 1.05)",
        "cold_create_ratio", ratio
    );
    for method in ["reflink", "qcow2", "sparse_copy"] {
        match result["cow_ms"][method].as_f64() {
            Some(v) => row(&format!("cow_ms.{method}"), v),
            None => println!("{:<28} {:>12}", format!("cow_ms.{method}"), "-"),
        }
    }
    println!(
        "{:<28} {:>12.3}   (goal <= 64)",
        "idle_pss_mib",
        median(&pss)
    );
    row("destroy_ms_p50", percentile(&destroy, 50.0));
    row("pause_ms_p50", percentile(&pause, 50.0));
    row("resume_ms_p50", percentile(&resume, 50.0));
    row("snapshot_mib", median(&snapshot_mib));
    write_result("node", &result)
}
