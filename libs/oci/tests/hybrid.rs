//! Hybrid staging (the tree in memory, large files' data on disk, bind-mounted for mkfs)
//! makes the same ext4 image as staging wholly in memory and wholly on disk.
//!
//! The image holds what a spill could get wrong: large files with owners, a setuid mode,
//! xattrs (a file capability among them) and hardlinks in two directories, a large file
//! that is mostly holes, one with a line break in its name, a large file replaced by a
//! small one in a later layer and one deleted by a whiteout. The three images are read
//! with `debugfs` and compared entry by entry: type and mode, owner, size, content hash,
//! link count, xattrs, and which names share an inode.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{
    capability, debugfs_raw, fsck, sha256_hex, write_oci_layout, Layer, LayerBlob, Sandbox,
};
use nanobox_oci::{convert, ConvertEvent, ConvertOptions, OciLayout, Platform, Staged, Staging};

const MIB: usize = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn image_layers() -> Vec<LayerBlob> {
    let mut holes = vec![0u8; 2 * MIB];
    holes[2 * MIB - 1] = b'x';
    let l1 = Layer::new()
        .dir("big", 0o755)
        .dir("other", 0o700)
        .pax(&[
            ("SCHILY.xattr.user.note", b"kept"),
            ("SCHILY.xattr.security.capability", &capability()),
        ])
        .file_owned("big/tool", &pattern(MIB, 1), 0o4755, 1000, 1000)
        .hardlink("big/tool-link", "big/tool")
        .hardlink("other/tool-link", "big/tool")
        .file("big/holes", &holes, 0o644)
        .raw(
            tar::EntryType::Regular,
            b"big/line\nbreak",
            b"",
            &pattern(300 << 10, 2),
        )
        .file("big/replaced", &pattern(MIB, 3), 0o644)
        .file("big/deleted", &pattern(MIB, 4), 0o644)
        .file("etc/small", b"small file", 0o600);
    let l2 = Layer::new()
        .file("big/replaced", b"now small", 0o640)
        .whiteout("big/.wh.deleted");
    vec![LayerBlob::gzip(l1), LayerBlob::zstd(l2)]
}

/// Converts the layout with `staging`; returns the image and where it was staged.
async fn convert_with(
    sb: &Sandbox,
    layout: &Path,
    staging: Staging,
    tag: &str,
) -> (std::path::PathBuf, Staged) {
    let oci = OciLayout::open(layout).unwrap();
    let image = oci.resolve(Some("v1"), &Platform::linux_amd64()).unwrap();
    let init = sb.scratch.join("nanobox-init");
    fs::write(&init, b"\x7fELF fake init").unwrap();
    let work = sb.scratch.join(tag);
    fs::create_dir_all(&work).unwrap();
    let out = work.join("rootfs.ext4");
    let staged: Arc<Mutex<Option<Staged>>> = Arc::default();
    let sink = staged.clone();
    let on_event = Arc::new(move |e| {
        if let ConvertEvent::Building { staging } = e {
            *sink.lock().unwrap() = Some(staging);
        }
    });
    let options = ConvertOptions {
        staging,
        ..ConvertOptions::default()
    };
    convert(oci, image, init, out.clone(), options, on_event)
        .await
        .unwrap();
    fsck(&out);
    // Nothing of the staging (tree or spill files) is left beside the output.
    let left: Vec<_> = fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "rootfs.ext4")
        .collect();
    assert!(left.is_empty(), "{tag}: left {left:?}");
    let staged = staged.lock().unwrap().expect("a Building event");
    (out, staged)
}

/// Path -> description, and the hardlink groups.
type Described = (BTreeMap<Vec<u8>, String>, Vec<Vec<Vec<u8>>>);

fn describe(image: &Path) -> Described {
    let mut entries = BTreeMap::new();
    let mut by_inode: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut dirs = vec![(2u64, Vec::new())];
    while let Some((ino, path)) = dirs.pop() {
        let listing = debugfs_raw(image, format!("ls -p <{ino}>").as_bytes());
        // "/ino/mode/uid/gid/name/size/\n" per entry; a name holds anything but '/'.
        let fields: Vec<&[u8]> = listing.split(|b| *b == b'/').collect();
        let mut i = 1;
        while i + 6 <= fields.len() {
            // Directories have an empty size field.
            let num = |f: &[u8]| -> u64 {
                let text = std::str::from_utf8(f).unwrap().trim();
                if text.is_empty() {
                    0
                } else {
                    text.parse().unwrap()
                }
            };
            let (child, mode, uid, gid, name, size) = (
                num(fields[i]),
                // The mode is octal.
                u64::from_str_radix(std::str::from_utf8(fields[i + 1]).unwrap(), 8).unwrap(),
                num(fields[i + 2]),
                num(fields[i + 3]),
                fields[i + 4].to_vec(),
                num(fields[i + 5]),
            );
            i += 7;
            if name == b"." || name == b".." || name == b"lost+found" {
                continue;
            }
            let mut full = path.clone();
            full.push(b'/');
            full.extend_from_slice(&name);
            let stat =
                String::from_utf8_lossy(&debugfs_raw(image, format!("stat <{child}>").as_bytes()))
                    .into_owned();
            let links = stat
                .split("Links: ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("?")
                .to_owned();
            let xattrs = String::from_utf8_lossy(&debugfs_raw(
                image,
                format!("ea_list <{child}>").as_bytes(),
            ))
            .into_owned();
            let kind = mode >> 12;
            let content = match kind {
                0o10 => sha256_hex(&debugfs_raw(image, format!("cat <{child}>").as_bytes())),
                0o12 => stat
                    .lines()
                    .find(|l| l.contains("link dest"))
                    .unwrap_or("")
                    .to_owned(),
                _ => String::new(),
            };
            if kind == 0o04 {
                dirs.push((child, full.clone()));
            }
            by_inode.entry(child).or_default().push(full.clone());
            entries.insert(
                full,
                format!("mode {mode:o} uid {uid} gid {gid} size {size} links {links} {content} xattrs {xattrs}"),
            );
        }
    }
    let mut groups: Vec<Vec<Vec<u8>>> = by_inode
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    (entries, groups)
}

#[tokio::test]
async fn hybrid_staging_makes_the_image_memory_and_disk_staging_make() {
    let sb = Sandbox::new();
    let layout = sb.scratch.join("layout");
    write_oci_layout(&layout, "v1", &image_layers());

    let (memory, staged) =
        convert_with(&sb, &layout, Staging::In("/dev/shm".into()), "memory").await;
    assert_eq!(staged, Staged::Memory);
    let (hybrid, staged) = convert_with(&sb, &layout, Staging::BesideOutput, "hybrid").await;
    // This machine (root, no seccomp profile) may make mount namespaces: the five large
    // files went to the disk, the two that later layers replaced or deleted included.
    assert_eq!(staged, Staged::Hybrid { spilled_files: 5 });
    let disk_dir = sb.scratch.join("disk-staging");
    fs::create_dir_all(&disk_dir).unwrap();
    let (disk, staged) = convert_with(&sb, &layout, Staging::In(disk_dir), "disk").await;
    assert_eq!(staged, Staged::Disk);

    let (reference, groups) = describe(&memory);
    // The reference itself is what the layers say.
    let tool = &reference[&b"/big/tool".to_vec()];
    assert!(
        tool.starts_with("mode 104755 uid 1000 gid 1000 size 1048576 links 3"),
        "{tool}"
    );
    assert!(
        tool.contains("user.note") && tool.contains("security.capability"),
        "{tool}"
    );
    assert_eq!(
        groups,
        [vec![
            b"/big/tool".to_vec(),
            b"/big/tool-link".to_vec(),
            b"/other/tool-link".to_vec()
        ]]
    );
    assert!(reference.contains_key(b"/big/line\nbreak".as_slice()));
    assert!(!reference.contains_key(b"/big/deleted".as_slice()));
    assert!(reference[&b"/big/replaced".to_vec()].contains("size 9 "));
    for (name, image) in [("hybrid", &hybrid), ("disk", &disk)] {
        let (entries, other_groups) = describe(image);
        assert_eq!(groups, other_groups, "{name}: hardlink groups");
        for (path, want) in &reference {
            assert_eq!(
                entries.get(path),
                Some(want),
                "{name}: {}",
                String::from_utf8_lossy(path)
            );
        }
        assert_eq!(entries.len(), reference.len(), "{name}: entry count");
    }
    // Holes stay holes through the spill: 2 MiB apparent, one data block.
    let stat = String::from_utf8_lossy(&debugfs_raw(&hybrid, b"stat /big/holes")).into_owned();
    let blocks: u64 = stat
        .split("Blockcount: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(blocks * 512 <= 8192, "{blocks} sectors");
}
