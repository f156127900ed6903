//! `cargo xtask bench boot`: from spawning `nanobox vm run -- true` to its result,
//! against bare QEMU with the same command line reaching the guest's READY marker.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context as _;
use serde_json::json;

use super::{host_info, median, min_max, percentile, round3, write_result};
use crate::setup::{self, Guest};

const BOOT_ROUNDS: usize = 15;
const EXEC_RTT_ITERATIONS: usize = 200;
const STREAM_MIB: usize = 64;

fn bare_boot(guest: &Guest) -> anyhow::Result<f64> {
    let out = Command::new("target/release/examples/boot_bench")
        .arg("bare")
        .arg(&guest.kernel)
        .arg(&guest.rootfs)
        .output()
        .context("running boot_bench bare")?;
    anyhow::ensure!(
        out.status.success(),
        "boot_bench bare: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// From spawning `nanobox vm run -- true` until it reports the command's result.
fn nanobox_first_exec(guest: &Guest) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut child = Command::new("target/release/nanobox")
        .args(["vm", "run", "--no-stdin", "--timings", "--rootfs"])
        .arg(&guest.rootfs)
        .arg("--kernel")
        .arg(&guest.kernel)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nanobox vm run")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut done = None;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        if line.starts_with("{\"agent_ready_ms\"") {
            done = Some(started.elapsed().as_secs_f64() * 1e3);
        } else {
            eprintln!("{line}");
        }
    }
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "nanobox vm run -- true failed: {status}");
    done.context("nanobox vm run printed no timings")
}

pub fn boot(guest: &Guest) -> anyhow::Result<()> {
    setup::step("building release binaries");
    setup::cargo(&["build", "--quiet", "--release", "-p", "nanobox-cli"])?;
    setup::cargo(&[
        "build",
        "--quiet",
        "--release",
        "-p",
        "nanobox-vmm",
        "--example",
        "boot_bench",
    ])?;

    setup::step("warming up (accelerator probe, page cache)");
    nanobox_first_exec(guest)?;
    bare_boot(guest)?;

    setup::step(&format!("{BOOT_ROUNDS} boots each, alternating"));
    let mut bare = Vec::new();
    let mut nanobox = Vec::new();
    for round in 0..BOOT_ROUNDS {
        // Alternate which goes first so drift affects both alike.
        if round % 2 == 0 {
            bare.push(bare_boot(guest)?);
            nanobox.push(nanobox_first_exec(guest)?);
        } else {
            nanobox.push(nanobox_first_exec(guest)?);
            bare.push(bare_boot(guest)?);
        }
        eprint!(".");
    }
    eprintln!();

    setup::step(&format!(
        "exec round trips ({EXEC_RTT_ITERATIONS}x true) and a {STREAM_MIB} MiB stream"
    ));
    let out = Command::new("target/release/examples/boot_bench")
        .arg("agent")
        .arg(&guest.kernel)
        .arg(&guest.rootfs)
        .arg(EXEC_RTT_ITERATIONS.to_string())
        .arg(STREAM_MIB.to_string())
        .output()
        .context("running boot_bench agent")?;
    anyhow::ensure!(
        out.status.success(),
        "boot_bench agent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rtts: Vec<f64> = agent["exec_rtt_ms"]
        .as_array()
        .context("exec_rtt_ms")?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    let stream_s = agent["stream_s"].as_f64().context("stream_s")?;

    let bare_median = median(&bare);
    let nanobox_median = median(&nanobox);
    let result = json!({
        "bare_qemu_ready_ms_median": round3(bare_median),
        "nanobox_first_exec_ms_median": round3(nanobox_median),
        "overhead_ratio": round3(nanobox_median / bare_median),
        "exec_rtt_ms_p50": round3(percentile(&rtts, 50.0)),
        "exec_rtt_ms_p99": round3(percentile(&rtts, 99.0)),
        "stdout_mb_per_s": round3(STREAM_MIB as f64 / stream_s),
        "rounds": BOOT_ROUNDS,
        "samples": {
            "bare_qemu_ready_ms": bare.iter().map(|v| round3(*v)).collect::<Vec<_>>(),
            "nanobox_first_exec_ms": nanobox.iter().map(|v| round3(*v)).collect::<Vec<_>>(),
        },
        "host": host_info(),
    });

    println!();
    println!("boot benchmark ({BOOT_ROUNDS} rounds, alternating; medians)");
    println!(
        "{:<34} {:>12} {:>10} {:>10}",
        "metric", "value", "min", "max"
    );
    let row = |name: &str, v: f64, s: &[f64]| {
        let (min, max) = min_max(s);
        println!("{name:<34} {v:>12.1} {min:>10.1} {max:>10.1}");
    };
    row("bare_qemu_ready_ms_median", bare_median, &bare);
    row("nanobox_first_exec_ms_median", nanobox_median, &nanobox);
    println!(
        "{:<34} {:>12.3}   (goal <= 1.05)",
        "overhead_ratio",
        nanobox_median / bare_median
    );
    row("exec_rtt_ms_p50", percentile(&rtts, 50.0), &rtts);
    println!(
        "{:<34} {:>12.3}",
        "exec_rtt_ms_p99",
        percentile(&rtts, 99.0)
    );
    println!(
        "{:<34} {:>12.1}",
        "stdout_mb_per_s",
        STREAM_MIB as f64 / stream_s
    );

    write_result("boot", &result)
}
