//! File names are bytes (issue 10, class 2): names and link targets that are not UTF-8
//! (Latin-1, arbitrary bytes, 255-byte names, paths past the 100 bytes of a tar header's
//! name field) arrive byte-exact in the ext4 image, in every tar format that carries
//! them: ustar (prefix field), GNU (`././@LongLink`) and PAX (a `path` record, raw as GNU
//! tar writes it and with `hdrcharset=BINARY` as Python's tarfile does). The image is
//! read with `debugfs`, whose `ls -p` prints names as raw bytes. Only what Linux itself
//! cannot hold is refused: a NUL, and a name over 255 bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{debugfs_raw, fsck, gnu_tar, Layer, Sandbox};
use nanobox_oci::{build_ext4, ApplyOptions, Compression, Ext4Options, LayerApplier, OciError};

/// The names, relative to `d/`, every variant carries.
fn long_dir() -> Vec<u8> {
    let mut p = vec![0xe9; 60];
    p.push(b'/');
    p.extend_from_slice(&[0xe9; 60]);
    p
}

/// `longest`: with a 255-byte name, which ustar cannot carry (its name field has 100
/// bytes, and a name cannot be split into the prefix field).
fn files(longest: bool) -> Vec<Vec<u8>> {
    let mut long = long_dir();
    long.extend_from_slice(b"/f\xe9");
    let mut names = vec![b"caf\xe9".to_vec(), b"\xff\xfe.bin".to_vec(), long];
    if longest {
        names.push(vec![0xe9; 255]);
    }
    names
}

/// A source tree with those names, a symlink whose target is not UTF-8, and a hardlink.
fn source(dir: &Path, longest: bool) {
    let d = dir.join("d");
    fs::create_dir_all(d.join(std::ffi::OsStr::from_bytes(&long_dir()))).unwrap();
    for (i, name) in files(longest).iter().enumerate() {
        fs::write(
            d.join(std::ffi::OsStr::from_bytes(name)),
            format!("file {i}"),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink(
        std::ffi::OsStr::from_bytes(b"caf\xe9"),
        d.join(std::ffi::OsStr::from_bytes(b"lien\xe9")),
    )
    .unwrap();
    fs::hard_link(
        d.join(std::ffi::OsStr::from_bytes(b"caf\xe9")),
        d.join(std::ffi::OsStr::from_bytes(b"dur\xe9")),
    )
    .unwrap();
}

/// Python's tarfile, PAX format: names that are not UTF-8 get `hdrcharset=BINARY`.
fn python_pax(dir: &Path) -> Vec<u8> {
    let out = Command::new("python3")
        .current_dir(dir)
        .args([
            "-c",
            concat!(
                "import sys, tarfile, io\n",
                "buf = io.BytesIO()\n",
                "t = tarfile.open(fileobj=buf, mode='w', format=tarfile.PAX_FORMAT,",
                " encoding='utf-8', errors='surrogateescape')\n",
                "t.add('d')\n",
                "t.close()\n",
                "sys.stdout.buffer.write(buf.getvalue())",
            ),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn convert(sb: &Sandbox, layer: Vec<u8>, tag: &str) -> PathBuf {
    let staging = tempfile::tempdir_in(&sb.scratch).unwrap();
    let root = staging.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    let mut applier = LayerApplier::new(&root, ApplyOptions::default()).unwrap();
    applier
        .apply(std::io::Cursor::new(layer), Compression::None)
        .unwrap_or_else(|e| panic!("{tag}: {e}"));
    let image = sb.scratch.join(format!("{tag}.ext4"));
    build_ext4(&root, &image, &Ext4Options::default()).unwrap();
    fsck(&image);
    image
}

/// Entries of a directory in the image: (name, inode, link count from `stat`).
fn ls(image: &Path, dir: &[u8]) -> BTreeSet<(Vec<u8>, u64)> {
    let mut request = b"ls -p \"".to_vec();
    request.extend_from_slice(dir);
    request.push(b'"');
    let out = debugfs_raw(image, &request);
    out.split(|b| *b == b'\n')
        .filter(|l| l.starts_with(b"/"))
        .filter_map(|line| {
            // "/inode/mode/uid/gid/name/size/": the name may hold anything but '/'.
            let fields: Vec<&[u8]> = line.split(|b| *b == b'/').collect();
            let inode = std::str::from_utf8(fields[1]).ok()?.parse().ok()?;
            let name = fields[5].to_vec();
            (name != b"." && name != b"..").then_some((name, inode))
        })
        .collect()
}

fn quoted(path: &[u8]) -> Vec<u8> {
    let mut q = b"\"".to_vec();
    q.extend_from_slice(path);
    q.push(b'"');
    q
}

fn check(image: &Path, tag: &str, longest: bool) {
    let top = ls(image, b"/d");
    let names: BTreeSet<Vec<u8>> = top.iter().map(|(n, _)| n.clone()).collect();
    let mut expected: BTreeSet<Vec<u8>> = [
        &b"caf\xe9"[..],
        b"\xff\xfe.bin",
        &[0xe9; 60],
        b"lien\xe9",
        b"dur\xe9",
    ]
    .iter()
    .map(|n| n.to_vec())
    .collect();
    if longest {
        expected.insert(vec![0xe9; 255]);
    }
    assert_eq!(names, expected, "{tag}");
    // The hardlink and its target are one inode with two links.
    let inode = |name: &[u8]| top.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(inode(b"caf\xe9"), inode(b"dur\xe9"), "{tag}");
    let mut stat = b"stat ".to_vec();
    stat.extend_from_slice(&quoted(b"/d/caf\xe9"));
    let out = debugfs_raw(image, &stat);
    assert!(
        String::from_utf8_lossy(&out).contains("Links: 2"),
        "{tag}: {}",
        String::from_utf8_lossy(&out)
    );
    // The symlink's target, byte for byte.
    let mut stat = b"stat ".to_vec();
    stat.extend_from_slice(&quoted(b"/d/lien\xe9"));
    let out = debugfs_raw(image, &stat);
    assert!(
        out.windows(19).any(|w| w == b"Fast link dest: \"ca"),
        "{tag}: {}",
        String::from_utf8_lossy(&out)
    );
    assert!(out.windows(6).any(|w| w == b"caf\xe9\"\n"), "{tag}");
    // The long path, and the content of every file.
    let mut deep = b"/d/".to_vec();
    deep.extend_from_slice(&long_dir());
    let inner = ls(image, &deep);
    assert_eq!(
        inner.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        [b"f\xe9".to_vec()],
        "{tag}"
    );
    for (i, name) in files(longest).iter().enumerate() {
        let mut path = b"/d/".to_vec();
        path.extend_from_slice(name);
        let mut cat = b"cat ".to_vec();
        cat.extend_from_slice(&quoted(&path));
        assert_eq!(
            debugfs_raw(image, &cat),
            format!("file {i}").into_bytes(),
            "{tag}: {}",
            String::from_utf8_lossy(&path)
        );
    }
}

#[test]
fn names_that_are_not_utf8_arrive_byte_exact_in_every_tar_format() {
    let sb = Sandbox::new();
    let src = tempfile::tempdir().unwrap();
    source(src.path(), true);
    let short = tempfile::tempdir().unwrap();
    source(short.path(), false);
    let variants = [
        (
            "ustar",
            gnu_tar(short.path(), &["--format=ustar"], "d"),
            false,
        ),
        ("gnu", gnu_tar(src.path(), &["--format=gnu"], "d"), true),
        (
            "pax-gnu-tar",
            gnu_tar(src.path(), &["--format=posix"], "d"),
            true,
        ),
        ("pax-python", python_pax(src.path()), true),
    ];
    for (tag, layer, longest) in variants {
        if tag == "pax-python" {
            assert!(
                layer.windows(17).any(|w| w == b"hdrcharset=BINARY"),
                "Python writes hdrcharset=BINARY for these names"
            );
        }
        let image = convert(&sb, layer, tag);
        check(&image, tag, longest);
    }
}

#[test]
fn only_what_linux_cannot_hold_is_refused() {
    let sb = Sandbox::new();
    let mut too_long = b"d/".to_vec();
    too_long.extend_from_slice(&[0xe9; 256]);
    let layer = Layer::new()
        .pax(&[("path", &too_long)])
        .file("x", b"", 0o644);
    let err = sb.apply(vec![layer.tar()]).unwrap_err();
    assert!(
        matches!(&err, OciError::UnsafePath { reason, .. } if reason.contains("255 bytes")),
        "{err}"
    );
    let layer = Layer::new()
        .pax(&[("path", b"d/a\0b")])
        .file("x", b"", 0o644);
    let err = sb.apply(vec![layer.tar()]).unwrap_err();
    assert!(
        matches!(&err, OciError::UnsafePath { reason, .. } if reason.contains("NUL")),
        "{err}"
    );
    // 255 bytes of anything else is a name.
    let mut longest = b"d/".to_vec();
    longest.extend_from_slice(&[0xfe; 255]);
    let layer = Layer::new()
        .pax(&[("path", &longest)])
        .file("x", b"1", 0o644);
    sb.apply(vec![layer.tar()]).unwrap();
    let name = std::ffi::OsStr::from_bytes(&[0xfe; 255]);
    assert_eq!(fs::read(sb.root.join("d").join(name)).unwrap(), b"1");
}
