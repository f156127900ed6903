//! `cargo xtask bench warmup`: an OCI image to a finished ext4, NanoBox against the
//! plainest tools that do the same job.
//!
//! The image is the Debian + Node.js test layout (`nanobox_testkit::images`), already on
//! local disk, so the network is out of the picture. The baseline is `umoci unpack`
//! followed by `mkfs.ext4 -d` into an image of the geometry NanoBox picks (same size, same
//! inode count, same mkfs flags NanoBox's builder started with); NanoBox is one call of
//! `nanobox_oci::convert` in a release build (`convert_bench`), with its default staging
//! (in memory when the image fits). Rounds alternate which side goes first, so the page
//! cache and machine noise favour neither. A third contender, NanoBox with the staging
//! tree forced onto the disk beside the output, shows what the in-memory staging buys.
//! Last, a large image (the same plus a layer of generated files, over 2 GB unpacked:
//! `nanobox_testkit::images::debian_large_layout`) is converted by the baseline and by
//! NanoBox with its staging tree on disk, alternating, as an image too big for memory
//! would be.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context as _;
use serde_json::json;

use super::{host_info, median, min_max, round3, write_result};
use crate::setup::{self, Guest};

/// Conversions per side (the brief asks for at least 5).
const WARMUP_ROUNDS: usize = 7;
/// Conversions per side of the large image (each writes gigabytes).
const LARGE_ROUNDS: usize = 3;
/// The test image's tag in its layout.
const TAG: &str = "v1";
const CONVERT_BENCH: &str = "target/release/examples/convert_bench";

/// One NanoBox conversion, as `convert_bench` reports it.
#[derive(Debug, Clone, Copy)]
struct Converted {
    /// Wall time from spawning `convert_bench` to its exit.
    seconds: f64,
    /// Inside that: until the last layer was applied.
    apply_seconds: f64,
    size_bytes: u64,
    inodes: u64,
}

/// One baseline run.
#[derive(Debug, Clone, Copy)]
struct Baseline {
    seconds: f64,
    unpack_seconds: f64,
}

/// Where `convert_bench` is told to stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StagingPlace {
    /// `convert`'s own choice.
    Default,
    /// Beside the output, on disk.
    Disk,
}

fn converted(
    layout: &Path,
    init: &Path,
    out: &Path,
    staging: StagingPlace,
) -> anyhow::Result<Converted> {
    let started = Instant::now();
    let mut cmd = Command::new(CONVERT_BENCH);
    if staging == StagingPlace::Disk {
        cmd.env("CONVERT_BENCH_STAGING", "disk");
    }
    let output = cmd
        .arg("convert")
        .arg(layout)
        .arg(TAG)
        .arg(init)
        .arg(out)
        .output()
        .context("running convert_bench")?;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        output.status.success(),
        "convert_bench convert failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("convert_bench printed no JSON")?;
    let number = |key: &str| report[key].as_f64().with_context(|| format!("no {key}"));
    Ok(Converted {
        seconds,
        apply_seconds: number("apply_seconds")?,
        size_bytes: report["size_bytes"].as_u64().context("no size_bytes")?,
        inodes: report["inodes"].as_u64().context("no inodes")?,
    })
}

fn rootless() -> bool {
    // umoci as root keeps owners and device nodes; anyone else needs --rootless.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u != "0"))
        })
        .unwrap_or(true)
}

fn checked(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `umoci unpack` then `mkfs.ext4 -d` into a fresh file of `size` bytes with `inodes`
/// inodes. The bundle is removed afterwards, outside the timing.
fn baseline(
    layout: &Path,
    work: &Path,
    size: u64,
    inodes: u64,
    out: &Path,
) -> anyhow::Result<Baseline> {
    let bundle = work.join("umoci-bundle");
    let started = Instant::now();
    let mut unpack = Command::new("umoci");
    unpack.arg("unpack");
    if rootless() {
        unpack.arg("--rootless");
    }
    checked(
        unpack
            .arg("--image")
            .arg(format!("{}:{TAG}", layout.display()))
            .arg(&bundle),
    )?;
    let unpack_seconds = started.elapsed().as_secs_f64();
    let image =
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    image.set_len(size)?;
    drop(image);
    // The flags NanoBox's ext4 builder used before any optimisation (rootfs::build_ext4):
    // the same geometry, so only the way there differs.
    checked(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-t", "ext4", "-T", "default", "-m", "0"])
            .args(["-b", "4096", "-I", "256", "-L", "nanobox"])
            .arg("-N")
            .arg(inodes.to_string())
            .args(["-E", "root_owner=0:0,assume_storage_prezeroed=1"])
            .arg("-d")
            .arg(bundle.join("rootfs"))
            .arg(out),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&bundle).with_context(|| format!("removing {}", bundle.display()))?;
    Ok(Baseline {
        seconds,
        unpack_seconds,
    })
}

/// The large image's rounds.
struct LargeRun {
    umoci: Vec<Baseline>,
    nanobox: Vec<Converted>,
    used_bytes: u64,
    size: u64,
    inodes: u64,
}

/// The large image: the baseline against NanoBox with its staging tree on disk, rounds
/// alternating, every image checked with `e2fsck`.
fn large_image(guest: &Guest, layout: &Path, work: &Path) -> anyhow::Result<LargeRun> {
    let nanobox_out = work.join("large-nanobox.ext4");
    let umoci_out = work.join("large-umoci.ext4");
    setup::step("the large image: one conversion first (geometry, page cache)");
    let first = converted(layout, &guest.init, &nanobox_out, StagingPlace::Disk)?;
    fsck(&nanobox_out)?;
    let (size, inodes) = (first.size_bytes, first.inodes);
    let used = used_bytes(&nanobox_out)?;
    let _ = std::fs::remove_file(&nanobox_out);
    setup::step(&format!(
        "{LARGE_ROUNDS} large conversions each, alternating ({} MiB images)",
        size >> 20
    ));
    let mut run = LargeRun {
        umoci: Vec::new(),
        nanobox: Vec::new(),
        used_bytes: used,
        size,
        inodes,
    };
    for round in 0..LARGE_ROUNDS {
        let nanobox = |run: &mut LargeRun| -> anyhow::Result<()> {
            run.nanobox.push(converted(
                layout,
                &guest.init,
                &nanobox_out,
                StagingPlace::Disk,
            )?);
            fsck(&nanobox_out)?;
            let _ = std::fs::remove_file(&nanobox_out);
            Ok(())
        };
        let umoci = |run: &mut LargeRun| -> anyhow::Result<()> {
            run.umoci
                .push(baseline(layout, work, size, inodes, &umoci_out)?);
            fsck(&umoci_out)?;
            let _ = std::fs::remove_file(&umoci_out);
            Ok(())
        };
        if round % 2 == 0 {
            umoci(&mut run)?;
            nanobox(&mut run)?;
        } else {
            nanobox(&mut run)?;
            umoci(&mut run)?;
        }
        eprint!(".");
    }
    eprintln!();
    Ok(run)
}

/// Bytes in use in an ext4 image (blocks in use times the block size), from `dumpe2fs -h`.
fn used_bytes(image: &Path) -> anyhow::Result<u64> {
    let out = Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .output()
        .context("running dumpe2fs")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("dumpe2fs -h printed no {key}"))
    };
    let used = field("Block count:")?.saturating_sub(field("Free blocks:")?);
    Ok(used * field("Block size:")?)
}

/// A full warmup through the template-builder's gRPC API from a local registry until the
/// template is READY, with empty caches (a fresh builder, database and object store per
/// round), one sample per round. Runs the release-built `warmup_bench` example.
fn warmup_from_registry(init: &Path, rounds: usize) -> anyhow::Result<Option<Vec<f64>>> {
    setup::step("building the template-builder and its benchmark client (release)");
    setup::cargo(&[
        "build",
        "--quiet",
        "--release",
        "-p",
        "nanobox-template-builder",
        "--bin",
        "nanobox-template-builder",
        "--example",
        "warmup_bench",
    ])?;
    setup::step(&format!(
        "{rounds} warmups through the template-builder from the local registry"
    ));
    let out = Command::new("target/release/examples/warmup_bench")
        .arg("target/release/nanobox-template-builder")
        .arg(init)
        .arg(rounds.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running warmup_bench")?;
    anyhow::ensure!(out.status.success(), "warmup_bench failed");
    let samples: Vec<f64> =
        serde_json::from_slice(&out.stdout).context("reading warmup_bench's samples")?;
    Ok(Some(samples))
}

fn fsck(image: &Path) -> anyhow::Result<()> {
    checked(Command::new("e2fsck").arg("-fn").arg(image))
        .with_context(|| format!("{} is not a clean ext4", image.display()))
}

pub fn warmup(guest: &Guest) -> anyhow::Result<()> {
    setup::step("building the release conversion benchmark (convert_bench)");
    setup::cargo(&[
        "build",
        "--quiet",
        "--release",
        "-p",
        "nanobox-oci",
        "--example",
        "convert_bench",
    ])?;

    setup::step("the Debian + Node.js test image (cached)");
    let out = Command::new(CONVERT_BENCH)
        .arg("layout")
        .output()
        .context("running convert_bench layout")?;
    anyhow::ensure!(
        out.status.success(),
        "convert_bench layout: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let layout = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());

    setup::step("the large test image, over 2 GB unpacked (cached; minutes the first time)");
    let out = Command::new(CONVERT_BENCH)
        .arg("large-layout")
        .output()
        .context("running convert_bench large-layout")?;
    anyhow::ensure!(
        out.status.success(),
        "convert_bench large-layout: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let large = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());

    // Both sides write to the same file system (the workspace's target directory).
    let work = Path::new("target/bench").join(format!("warmup-work.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = run(guest, &layout, &large, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run(guest: &Guest, layout: &Path, large: &Path, work: &Path) -> anyhow::Result<()> {
    let nanobox_out = work.join("nanobox.ext4");
    let umoci_out = work.join("umoci.ext4");

    setup::step("warming up (page cache, one conversion each)");
    let first = converted(layout, &guest.init, &nanobox_out, StagingPlace::Default)?;
    fsck(&nanobox_out)?;
    let (size, inodes) = (first.size_bytes, first.inodes);
    baseline(layout, work, size, inodes, &umoci_out)?;
    fsck(&umoci_out)?;

    setup::step(&format!(
        "{WARMUP_ROUNDS} conversions each, alternating ({} MiB images)",
        size >> 20
    ));
    let mut nanobox = Vec::new();
    let mut on_disk = Vec::new();
    let mut umoci = Vec::new();
    let disk_out = work.join("nanobox-disk.ext4");
    for round in 0..WARMUP_ROUNDS {
        // Neither side keeps its previous output: both write a fresh image.
        let _ = std::fs::remove_file(&nanobox_out);
        let _ = std::fs::remove_file(&umoci_out);
        if round % 2 == 0 {
            umoci.push(baseline(layout, work, size, inodes, &umoci_out)?);
            nanobox.push(converted(
                layout,
                &guest.init,
                &nanobox_out,
                StagingPlace::Default,
            )?);
        } else {
            nanobox.push(converted(
                layout,
                &guest.init,
                &nanobox_out,
                StagingPlace::Default,
            )?);
            umoci.push(baseline(layout, work, size, inodes, &umoci_out)?);
        }
        eprint!(".");
    }
    eprintln!();
    // Apart from the rounds above: deleting a staging tree on disk slows the next run
    // that creates files on that file system, and that must not be charged to umoci.
    setup::step(&format!(
        "{WARMUP_ROUNDS} more NanoBox conversions with the staging tree on disk"
    ));
    for _ in 0..WARMUP_ROUNDS {
        let _ = std::fs::remove_file(&disk_out);
        on_disk.push(converted(
            layout,
            &guest.init,
            &disk_out,
            StagingPlace::Disk,
        )?);
        eprint!(".");
    }
    eprintln!();
    // The last NanoBox image must still be a clean file system.
    fsck(&nanobox_out)?;

    let _ = std::fs::remove_file(&disk_out);
    let _ = std::fs::remove_file(&umoci_out);
    let large_run = large_image(guest, large, work)?;

    let registry = warmup_from_registry(&guest.init, WARMUP_ROUNDS)?;

    let umoci_s: Vec<f64> = umoci.iter().map(|b| b.seconds).collect();
    let unpack_s: Vec<f64> = umoci.iter().map(|b| b.unpack_seconds).collect();
    let mkfs_s: Vec<f64> = umoci.iter().map(|b| b.seconds - b.unpack_seconds).collect();
    let nanobox_s: Vec<f64> = nanobox.iter().map(|c| c.seconds).collect();
    let apply_s: Vec<f64> = nanobox.iter().map(|c| c.apply_seconds).collect();
    let build_s: Vec<f64> = nanobox
        .iter()
        .map(|c| c.seconds - c.apply_seconds)
        .collect();
    let disk_s: Vec<f64> = on_disk.iter().map(|c| c.seconds).collect();
    let umoci_median = median(&umoci_s);
    let nanobox_median = median(&nanobox_s);
    let ratio = nanobox_median / umoci_median;
    let disk_ratio = median(&disk_s) / umoci_median;
    let large_umoci_s: Vec<f64> = large_run.umoci.iter().map(|b| b.seconds).collect();
    let large_nanobox_s: Vec<f64> = large_run.nanobox.iter().map(|c| c.seconds).collect();
    let large_ratio = median(&large_nanobox_s) / median(&large_umoci_s);
    let rounded = |v: &[f64]| v.iter().map(|x| round3(*x)).collect::<Vec<_>>();
    let result = json!({
        "umoci_mkfs_s_median": round3(umoci_median),
        "nanobox_convert_s_median": round3(nanobox_median),
        "convert_ratio": round3(ratio),
        "warmup_from_registry_s_median": registry.as_deref().map(|s| round3(median(s))),
        "umoci_unpack_s_median": round3(median(&unpack_s)),
        "umoci_mkfs_only_s_median": round3(median(&mkfs_s)),
        "nanobox_apply_s_median": round3(median(&apply_s)),
        "nanobox_build_s_median": round3(median(&build_s)),
        "nanobox_disk_staging_s_median": round3(median(&disk_s)),
        "disk_convert_ratio": round3(disk_ratio),
        "large_umoci_mkfs_s_median": round3(median(&large_umoci_s)),
        "large_nanobox_disk_staging_s_median": round3(median(&large_nanobox_s)),
        "large_convert_ratio": round3(large_ratio),
        "large_image": {
            "layout": large.display().to_string(),
            "tag": TAG,
            "ext4_used_bytes": large_run.used_bytes,
            "ext4_size_bytes": large_run.size,
            "ext4_inodes": large_run.inodes,
            "rounds": LARGE_ROUNDS,
        },
        "image": {
            "layout": layout.display().to_string(),
            "tag": TAG,
            "ext4_size_bytes": size,
            "ext4_inodes": inodes,
        },
        "rounds": WARMUP_ROUNDS,
        "samples": {
            "umoci_mkfs_s": rounded(&umoci_s),
            "umoci_unpack_s": rounded(&unpack_s),
            "nanobox_convert_s": rounded(&nanobox_s),
            "nanobox_apply_s": rounded(&apply_s),
            "nanobox_disk_staging_s": rounded(&disk_s),
            "large_umoci_mkfs_s": rounded(&large_umoci_s),
            "large_nanobox_disk_staging_s": rounded(&large_nanobox_s),
            "warmup_from_registry_s": registry.as_deref().map(rounded),
        },
        "host": host_info(),
    });

    println!();
    println!(
        "warmup benchmark ({WARMUP_ROUNDS} rounds, alternating; medians; {} MiB ext4)",
        size >> 20
    );
    println!(
        "{:<34} {:>12} {:>10} {:>10}",
        "metric", "value", "min", "max"
    );
    let row = |name: &str, s: &[f64]| {
        let (min, max) = min_max(s);
        println!("{name:<34} {:>12.3} {min:>10.3} {max:>10.3}", median(s));
    };
    row("umoci_mkfs_s_median", &umoci_s);
    row("  umoci unpack", &unpack_s);
    row("  mkfs.ext4 -d", &mkfs_s);
    row("nanobox_convert_s_median", &nanobox_s);
    row("  layers applied", &apply_s);
    row("  init, config, ext4 built", &build_s);
    println!("{:<34} {:>12.3}   (goal <= 0.5)", "convert_ratio", ratio);
    row("nanobox_disk_staging_s_median", &disk_s);
    println!(
        "{:<34} {:>12.3}   (goal <= 0.3)",
        "disk_convert_ratio", disk_ratio
    );
    println!(
        "large image: {:.2} GB in use in the ext4, {} MiB ext4, {LARGE_ROUNDS} rounds",
        large_run.used_bytes as f64 / 1e9,
        large_run.size >> 20
    );
    row("large_umoci_mkfs_s_median", &large_umoci_s);
    row("large_nanobox_disk_staging_s_median", &large_nanobox_s);
    println!(
        "{:<34} {:>12.3}   (goal <= 0.3)",
        "large_convert_ratio", large_ratio
    );
    match &registry {
        Some(samples) => row("warmup_from_registry_s_median", samples),
        None => println!(
            "{:<34} {:>12}   (needs the template-builder service)",
            "warmup_from_registry_s_median", "-"
        ),
    }

    write_result("warmup", &result)
}
