//! Decompression, entry-count, sparse and depth bombs are stopped by the budgets with
//! bounded memory (issue 10, class 1).
//!
//! Each bomb is applied in a child process (this test binary run again for its ignored
//! `child` test), so its peak resident memory can be measured on its own: the child
//! reports the kernel's `VmHWM` for itself after the applier gave up, and the parent
//! checks which budget stopped it, that the error names it, and that the peak stayed
//! under 256 MiB. The parent kills a child that outlives a generous deadline (a hang
//! guard, not a speed check; the time each took is printed).
//!
//! The budgets are those of a template of 128 MiB ([`Limits::for_image_bytes`]), with the
//! stream budget at 256 MiB so that decompressing to it takes a moment in a debug build.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Layer;
use nanobox_oci::{ApplyOptions, LayerApplier, Limits};

const MIB: u64 = 1 << 20;
const PEAK_RSS_MAX_KIB: u64 = 256 * 1024;
const HANG_GUARD: Duration = Duration::from_secs(120);

fn limits() -> Limits {
    Limits {
        max_stream_bytes: 256 * MIB,
        ..Limits::for_image_bytes(128 * MIB)
    }
}

/// The child: applies the layer at `$NANOBOX_BOMB` and prints the outcome and its peak
/// memory. Run only by the tests below, in their own process.
#[test]
#[ignore = "the bomb tests run it in a child process to measure its memory"]
fn child() {
    let layer = PathBuf::from(std::env::var_os("NANOBOX_BOMB").expect("NANOBOX_BOMB"));
    let staging = tempfile::tempdir_in("/dev/shm").unwrap();
    let opts = ApplyOptions {
        limits: limits(),
        ..ApplyOptions::default()
    };
    let mut applier = LayerApplier::new(staging.path(), opts).unwrap();
    let outcome = applier.apply_file(&layer, None);
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap();
    match outcome {
        Ok(stats) => println!("BOMB-OUTCOME ok {stats:?}"),
        Err(err) => println!("BOMB-OUTCOME error {err}"),
    }
    println!("BOMB-HWM-KIB {hwm}");
}

/// Runs the child on `layer`; returns its outcome line and peak RSS in KiB.
fn run_child(layer: &Path) -> (String, u64, Duration) {
    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NANOBOX_BOMB", layer)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > HANG_GUARD {
            let _ = child.kill();
            panic!("the child applying {} hung", layer.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome = stdout
        .lines()
        // libtest's "test child ... " may precede it on the line.
        .find_map(|l| l.split_once("BOMB-OUTCOME ").map(|(_, rest)| rest))
        .unwrap()
        .to_owned();
    let hwm = stdout
        .lines()
        .find_map(|l| l.split_once("BOMB-HWM-KIB ").map(|(_, rest)| rest))
        .unwrap()
        .parse()
        .unwrap();
    (outcome, hwm, elapsed)
}

fn assert_refused(name: &str, layer: &Path, budget: &str, entry: &str) {
    let (outcome, hwm, elapsed) = run_child(layer);
    eprintln!("{name}: {outcome}; peak RSS {hwm} KiB; {elapsed:?}");
    assert!(
        outcome.starts_with("error") && outcome.contains(budget) && outcome.contains(entry),
        "{name}: {outcome}"
    );
    assert!(hwm < PEAK_RSS_MAX_KIB, "{name}: peak RSS {hwm} KiB");
}

/// A tar header for a regular file of `size` bytes (its data to follow).
fn file_header(name: &str, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_path(name).unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// A layer of one file of `size` zero bytes, stored in full, made of concatenated
/// compressed members of `chunk` zeros (gzip and zstd decoders both read on across
/// members), so that writing the bomb costs little.
fn zero_bomb(path: &Path, size: u64, zstd: bool) {
    const CHUNK: u64 = 64 * MIB;
    let compress = |data: &[u8]| -> Vec<u8> {
        if zstd {
            zstd::encode_all(data, 3).unwrap()
        } else {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            gz.write_all(data).unwrap();
            gz.finish().unwrap()
        }
    };
    let mut out = fs::File::create(path).unwrap();
    out.write_all(&compress(&file_header("zeros", size)))
        .unwrap();
    let member = compress(&vec![0u8; CHUNK as usize]);
    for _ in 0..size / CHUNK {
        out.write_all(&member).unwrap();
    }
    out.write_all(&compress(&[0u8; 1024])).unwrap();
}

#[test]
fn a_gzip_bomb_stops_at_the_stream_budget() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("bomb.tar.gz");
    // 16 GiB of zeros in 16 MiB of gzip.
    zero_bomb(&bomb, 16 << 30, false);
    assert!(fs::metadata(&bomb).unwrap().len() < 32 * MIB);
    assert_refused("gzip bomb", &bomb, "decompressed layers", "zeros");
}

#[test]
fn a_zstd_bomb_stops_at_the_stream_budget() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("bomb.tar.zst");
    // 64 GiB of zeros in well under a megabyte of zstd.
    zero_bomb(&bomb, 64 << 30, true);
    assert!(fs::metadata(&bomb).unwrap().len() < 4 * MIB);
    assert_refused("zstd bomb", &bomb, "decompressed layers", "zeros");
}

#[test]
fn an_entry_count_bomb_stops_at_the_entry_budget() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = dir.path().join("entries.tar.gz");
    let out = fs::File::create(&bomb).unwrap();
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    for i in 0..200_000u32 {
        gz.write_all(&file_header(&format!("d{}/f{i}", i / 1000), 0))
            .unwrap();
    }
    gz.write_all(&[0u8; 1024]).unwrap();
    gz.finish().unwrap();
    let max = limits().max_entries;
    assert_refused("entry-count bomb", &bomb, "entry count", &format!("f{max}"));
}

#[test]
fn a_huge_sparse_file_in_a_tiny_layer_stops_at_the_file_size_budget() {
    let dir = tempfile::tempdir().unwrap();
    // One byte of data at the end of a 1 PiB file (PAX sparse 0.1), in a 3 KiB layer.
    let pib: u64 = 1 << 50;
    let map = format!("{},1", pib - 1);
    let size = pib.to_string();
    let layer = Layer::new()
        .pax(&[
            ("GNU.sparse.map", map.as_bytes()),
            ("GNU.sparse.size", size.as_bytes()),
            ("GNU.sparse.name", b"var/log/huge"),
        ])
        .file("GNUSparseFile.0/huge", b"x", 0o644)
        .tar();
    assert!(layer.len() < 4096);
    let bomb = dir.path().join("sparse.tar");
    fs::write(&bomb, layer).unwrap();
    assert_refused("sparse bomb", &bomb, "file size", "var/log/huge");
}

#[test]
fn deep_paths_stop_at_the_depth_budget_even_through_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let depth = limits().max_path_depth;
    // One entry deeper than the budget.
    let deep = "a/".repeat(depth + 10) + "leaf";
    let bomb = dir.path().join("deep.tar");
    fs::write(&bomb, Layer::new().file(&deep, b"x", 0o644).tar()).unwrap();
    assert_refused("deep path", &bomb, "path depth", "leaf");
    // Each entry within the budget, but a symlink puts the second one deeper.
    let half = "b/".repeat(depth / 2 + 10);
    let layer = Layer::new()
        .file(&(half.clone() + "file"), b"x", 0o644)
        .symlink("l", &half)
        .file(&("l/".to_owned() + &half + "leaf"), b"x", 0o644)
        .tar();
    let bomb = dir.path().join("deep-symlink.tar");
    fs::write(&bomb, layer).unwrap();
    assert_refused("deep path through a symlink", &bomb, "path depth", "leaf");
}
