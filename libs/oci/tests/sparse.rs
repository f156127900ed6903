//! Large sparse and zero-filled files are legal and stay holes (issue 10, class 1).
//!
//! Layers are written by GNU tar itself in each sparse format it has: old GNU (type `S`,
//! with extension blocks past four segments) and PAX 0.0, 0.1 and 1.0, plain and gzip'd;
//! and as a plain entry whose zeros are stored in full (what `docker build` makes of a
//! pre-allocated file). Each is applied and built into ext4, and the image is read with
//! `debugfs`: the file's size, the blocks it allocates (`stat`), which logical blocks
//! are mapped (`bmap`, a hole maps to 0), and the bytes of every data block read from
//! the image at the physical block debugfs names.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fsck, gnu_tar, Sandbox};
use nanobox_oci::{build_ext4, ApplyOptions, Compression, Ext4Options, LayerApplier};

const BLOCK: u64 = 4096;
const GIB: u64 = 1 << 30;

/// A file of `size` bytes with data only in `regions` (offset, bytes).
struct SparseFile {
    size: u64,
    regions: Vec<(u64, Vec<u8>)>,
}

/// 4 GiB with 30 data regions (more than the four an old GNU header holds) and three
/// bytes at the very end (an unaligned tail).
fn four_gib() -> SparseFile {
    let mut regions: Vec<(u64, Vec<u8>)> = (0..30u64)
        .map(|k| {
            let data: Vec<u8> = (0..8192u32)
                .map(|i| (i as u8) ^ (k as u8).wrapping_mul(37) | 1)
                .collect();
            (k * (128 << 20) + BLOCK * k, data)
        })
        .collect();
    regions.push((4 * GIB - 3, b"END".to_vec()));
    SparseFile {
        size: 4 * GIB,
        regions,
    }
}

fn write_source(dir: &Path, name: &str, file: &SparseFile) {
    let mut f = fs::File::create(dir.join(name)).unwrap();
    f.set_len(file.size).unwrap();
    for (offset, data) in &file.regions {
        f.seek(SeekFrom::Start(*offset)).unwrap();
        f.write_all(data).unwrap();
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// Applies one layer in a tmpfs staging tree and builds the image; returns the image and
/// the staging file's (apparent size, allocated bytes).
fn convert(
    sb: &Sandbox,
    layer: Vec<u8>,
    compression: Compression,
    name: &str,
) -> (PathBuf, u64, u64) {
    let staging = tempfile::tempdir_in("/dev/shm").unwrap();
    let root = staging.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    let mut applier = LayerApplier::new(&root, ApplyOptions::default()).unwrap();
    applier
        .apply(std::io::Cursor::new(layer), compression)
        .unwrap();
    let meta = fs::metadata(root.join(name)).unwrap();
    let image = sb
        .scratch
        .join(format!("{}.ext4", sb.scratch.read_dir().unwrap().count()));
    build_ext4(&root, &image, &Ext4Options::default()).unwrap();
    fsck(&image);
    (image, meta.len(), meta.blocks() * 512)
}

/// Runs debugfs commands from a script; returns stdout.
fn debugfs_script(image: &Path, commands: &[String]) -> String {
    let script = tempfile::NamedTempFile::new().unwrap();
    fs::write(script.path(), commands.join("\n") + "\n").unwrap();
    let out = Command::new("debugfs")
        .arg("-f")
        .arg(script.path())
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The file's size and allocated bytes, as the ext4 inode records them.
fn ext4_stat(image: &Path, path: &str) -> (u64, u64) {
    let out = debugfs_script(image, &[format!("stat {path}")]);
    let field = |key: &str| -> u64 {
        let at = out.find(key).unwrap_or_else(|| panic!("{key} in {out}")) + key.len();
        out[at..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("Size: "), field("Blockcount: ") * 512)
}

/// The physical block of each logical block (0: a hole).
fn bmap(image: &Path, path: &str, blocks: &[u64]) -> Vec<u64> {
    let commands: Vec<String> = blocks.iter().map(|b| format!("bmap {path} {b}")).collect();
    let out = debugfs_script(image, &commands);
    let mapped: Vec<u64> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(mapped.len(), blocks.len(), "{out}");
    mapped
}

/// Checks the image's copy of `file`: size, allocation, holes, and every data byte.
fn check_ext4(image: &Path, path: &str, file: &SparseFile) {
    let (size, allocated) = ext4_stat(image, path);
    assert_eq!(size, file.size);
    let data_blocks: u64 = file
        .regions
        .iter()
        .map(|(o, d)| (o + d.len() as u64).div_ceil(BLOCK) - o / BLOCK)
        .sum();
    // Data blocks plus at most a few extent-tree blocks: kilobytes, not gigabytes.
    assert!(
        allocated <= (data_blocks + 4) * BLOCK,
        "{allocated} bytes allocated for {data_blocks} data blocks"
    );
    let img = fs::File::open(image).unwrap();
    for (offset, data) in &file.regions {
        let first = offset / BLOCK;
        let last = (offset + data.len() as u64 - 1) / BLOCK;
        let logical: Vec<u64> = (first..=last).collect();
        let physical = bmap(image, path, &logical);
        let mut bytes = Vec::new();
        for p in &physical {
            assert_ne!(*p, 0, "a data block of {path} at {offset} is a hole");
            let mut block = vec![0u8; BLOCK as usize];
            img.read_exact_at(&mut block, p * BLOCK).unwrap();
            bytes.extend_from_slice(&block);
        }
        let start = (offset - first * BLOCK) as usize;
        assert_eq!(
            &bytes[start..start + data.len()],
            &data[..],
            "data at {offset}"
        );
    }
    // Between the first two regions: holes.
    let gap = bmap(image, path, &[3, 1000, 30_000]);
    assert_eq!(gap, [0, 0, 0]);
}

#[test]
fn gnu_and_pax_sparse_files_stay_sparse_in_the_image() {
    let sb = Sandbox::new();
    let src = tempfile::tempdir_in("/dev/shm").unwrap();
    let file = four_gib();
    write_source(src.path(), "lastlog", &file);
    let variants: [(&str, &[&str], bool); 5] = [
        ("old GNU", &["--sparse", "--format=gnu"], false),
        (
            "PAX 0.0",
            &["--sparse", "--format=posix", "--sparse-version=0.0"],
            false,
        ),
        (
            "PAX 0.1",
            &["--sparse", "--format=posix", "--sparse-version=0.1"],
            false,
        ),
        (
            "PAX 1.0",
            &["--sparse", "--format=posix", "--sparse-version=1.0"],
            false,
        ),
        (
            "PAX 1.0, gzip",
            &["--sparse", "--format=posix", "--sparse-version=1.0"],
            true,
        ),
    ];
    for (what, args, compress) in variants {
        let tar = gnu_tar(src.path(), args, "lastlog");
        assert!(
            tar.len() < 1 << 20,
            "{what}: GNU tar wrote {} bytes",
            tar.len()
        );
        let (layer, compression) = if compress {
            (gzip(&tar), Compression::Gzip)
        } else {
            (tar, Compression::None)
        };
        let (image, apparent, allocated) = convert(&sb, layer, compression, "lastlog");
        assert_eq!(apparent, 4 * GIB, "{what}");
        assert!(allocated < 1 << 20, "{what}: staging allocated {allocated}");
        check_ext4(&image, "/lastlog", &file);
        fs::remove_file(&image).unwrap();
    }
}

#[test]
fn zeros_stored_in_full_become_holes_and_pass_the_budgets() {
    // 128 MiB, zeros but for three blocks, stored in full (no sparse format): the gzip
    // layer is about 1000 times smaller than its tar, which the old ratio limit refused.
    let sb = Sandbox::new();
    let src = tempfile::tempdir_in("/dev/shm").unwrap();
    let file = SparseFile {
        size: 128 << 20,
        regions: vec![
            (0, b"head".to_vec()),
            (77 * BLOCK + 100, vec![0xab; 5000]),
            ((128 << 20) - 4, b"tail".to_vec()),
        ],
    };
    write_source(src.path(), "prealloc", &file);
    let tar = gnu_tar(src.path(), &["--format=gnu"], "prealloc");
    assert!(tar.len() as u64 > file.size, "stored in full");
    let layer = gzip(&tar);
    assert!(
        tar.len() / layer.len() > 500,
        "compresses {}x",
        tar.len() / layer.len()
    );
    let (image, apparent, allocated) = convert(&sb, layer, Compression::Gzip, "prealloc");
    assert_eq!(apparent, file.size);
    assert!(allocated <= 5 * BLOCK, "staging allocated {allocated}");
    check_ext4(&image, "/prealloc", &file);
}
