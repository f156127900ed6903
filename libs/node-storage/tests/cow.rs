#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Copy-on-write clones with real files and real tools: reflink on a loop-mounted XFS,
//! qcow2 overlays checked with `qemu-img compare`, sparse copies checked by allocation.

mod support;

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use nanobox_node_storage::{
    clone_rootfs, clone_rootfs_with, measure_cow, CloneOptions, CowError, CowMethod, CowPreference,
};
use nanobox_vmm::DiskFormat;
use support::{allocated_blocks, make_ext4, noise, run, XfsMount};

const TEMPLATE_MIB: u64 = 32;

/// A 32 MiB ext4 template holding ~3 MiB of files, mostly holes like a real template.
fn template_in(dir: &Path) -> PathBuf {
    let template = dir.join("template.ext4");
    make_ext4(
        &template,
        TEMPLATE_MIB,
        "tmpl",
        &[("a.bin", noise(2 << 20, 1)), ("b.bin", noise(1 << 20, 2))],
    );
    template
}

fn sha(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Writes into a raw clone and checks the template did not change.
fn write_leaves_template_alone(template: &Path, clone: &Path) {
    let before = sha(template);
    let file = std::fs::OpenOptions::new().write(true).open(clone).unwrap();
    file.write_all_at(&[0xab; 8192], 1 << 20).unwrap();
    file.sync_all().unwrap();
    drop(file);
    assert_eq!(sha(template), before, "the template changed");
    assert_ne!(sha(clone), before, "the write did not reach the clone");
}

/// `qemu-img compare` exit status: 0 identical, 1 different.
fn qemu_img_compare(template: &Path, overlay: &Path) -> i32 {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(template)
        .arg(overlay)
        .output()
        .unwrap();
    out.status.code().unwrap()
}

#[test]
fn sparse_copy_is_identical_independent_and_keeps_holes() {
    let dir = tempfile::tempdir().unwrap();
    let template = template_in(dir.path());
    let dest = dir.path().join("clone.raw");
    let clone = clone_rootfs(&template, &dest, CowPreference::Only(CowMethod::SparseCopy)).unwrap();
    assert_eq!(clone.method, CowMethod::SparseCopy);
    assert_eq!(clone.format, DiskFormat::Raw);
    assert_eq!(clone.disk_bytes, TEMPLATE_MIB << 20);
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(&template).unwrap()
    );
    // Holes stay holes: the copy allocates no more than the template does.
    let (t, c) = (allocated_blocks(&template), allocated_blocks(&dest));
    assert!(c <= t + 64, "clone has {c} blocks, template {t}");
    assert!(
        c * 512 < (TEMPLATE_MIB << 20) / 2,
        "clone is not sparse: {c} blocks"
    );
    write_leaves_template_alone(&template, &dest);

    // A file that is mostly hole: two 1 MiB data islands in 64 MiB.
    let holey = dir.path().join("holey.img");
    let f = std::fs::File::create(&holey).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(&noise(1 << 20, 3), 0).unwrap();
    f.write_all_at(&noise(1 << 20, 4), 32 << 20).unwrap();
    drop(f);
    let holey_clone = dir.path().join("holey.clone");
    clone_rootfs(
        &holey,
        &holey_clone,
        CowPreference::Only(CowMethod::SparseCopy),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(&holey_clone).unwrap(),
        std::fs::read(&holey).unwrap()
    );
    let blocks = allocated_blocks(&holey_clone);
    assert!(
        blocks * 512 <= (2 << 20) + (64 << 10),
        "{blocks} blocks for 2 MiB of data"
    );
}

#[test]
fn qcow2_overlay_reads_as_the_template_and_writes_stay_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let template = template_in(dir.path());
    // The cache keeps templates read-only; the overlay must work over one.
    std::fs::set_permissions(
        &template,
        std::os::unix::fs::PermissionsExt::from_mode(0o444),
    )
    .unwrap();
    let dest = dir.path().join("clone.qcow2");
    let clone = clone_rootfs(&template, &dest, CowPreference::Only(CowMethod::Qcow2)).unwrap();
    assert_eq!(clone.method, CowMethod::Qcow2);
    assert_eq!(clone.format, DiskFormat::Qcow2);
    assert_eq!(
        qemu_img_compare(&template, &dest),
        0,
        "overlay differs from template"
    );
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&dest));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], TEMPLATE_MIB << 20);
    assert_eq!(
        info["full-backing-filename"],
        template.canonicalize().unwrap().to_str().unwrap()
    );
    assert_eq!(info["backing-filename-format"], "raw");
    // The overlay holds metadata only.
    assert!(allocated_blocks(&dest) * 512 < 1 << 20);

    let before = sha(&template);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xab 1M 64k"])
        .arg(&dest));
    assert_eq!(sha(&template), before, "the template changed");
    assert_eq!(
        qemu_img_compare(&template, &dest),
        1,
        "the write did not reach the overlay"
    );
}

#[test]
fn reflink_on_xfs_shares_extents_and_auto_prefers_it() {
    let xfs = XfsMount::new(300);
    let scratch = tempfile::tempdir().unwrap();
    let built = template_in(scratch.path());
    let template = xfs.mountpoint.join("template.ext4");
    // Copied sparsely so the XFS file has the same holes as the built image.
    clone_rootfs(
        &built,
        &template,
        CowPreference::Only(CowMethod::SparseCopy),
    )
    .unwrap();

    let dest = xfs.mountpoint.join("clone.raw");
    let clone = clone_rootfs(&template, &dest, CowPreference::Only(CowMethod::Reflink)).unwrap();
    assert_eq!(clone.method, CowMethod::Reflink);
    assert_eq!(clone.format, DiskFormat::Raw);
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(&template).unwrap()
    );
    // Shared, not copied: every data extent of the clone is flagged shared.
    let extents = run(Command::new("filefrag").arg("-v").arg(&dest));
    let data: Vec<&str> = extents.lines().filter(|l| l.contains("..")).collect();
    assert!(!data.is_empty(), "{extents}");
    assert!(data.iter().all(|l| l.contains("shared")), "{extents}");
    write_leaves_template_alone(&template, &dest);

    let auto = clone_rootfs(
        &template,
        &xfs.mountpoint.join("auto.raw"),
        CowPreference::Auto { qcow2: true },
    )
    .unwrap();
    assert_eq!(auto.method, CowMethod::Reflink);

    // Growing a reflinked clone: a bigger file and a bigger, clean ext4.
    let grown = xfs.mountpoint.join("grown.raw");
    let options = CloneOptions {
        prefer: CowPreference::Only(CowMethod::Reflink),
        grow_bytes: 16 << 20,
        ..CloneOptions::default()
    };
    let clone = clone_rootfs_with(&template, &grown, &options).unwrap();
    assert_eq!(clone.disk_bytes, (TEMPLATE_MIB + 16) << 20);
    assert_eq!(std::fs::metadata(&grown).unwrap().len(), clone.disk_bytes);
    assert_fs_size(&grown, (TEMPLATE_MIB + 16) << 20);

    // Every method is measurable here.
    let timings = measure_cow(&template, &xfs.mountpoint, 3).unwrap();
    assert_eq!(timings.len(), 3);
    for t in &timings {
        assert!(t.unsupported.is_none(), "{t:?}");
        assert_eq!(t.samples.len(), 3);
        assert!(t.median.is_some());
    }
    assert!(
        std::fs::read_dir(&xfs.mountpoint)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with(".measure")),
        "measure_cow left clones behind"
    );
}

/// Checks the ext4 in `image` spans `bytes` and passes a forced check.
fn assert_fs_size(image: &Path, bytes: u64) {
    let header = run(Command::new("dumpe2fs").arg("-h").arg(image));
    let field = |name: &str| -> u64 {
        header
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in dumpe2fs output"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(field("Block count:") * field("Block size:"), bytes);
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(image));
}

#[test]
fn auto_falls_back_where_reflink_is_impossible() {
    // The temp directory is on the host's ext4 here: no reflinks.
    let dir = tempfile::tempdir().unwrap();
    let template = template_in(dir.path());

    let dest = dir.path().join("reflink.raw");
    let err = clone_rootfs(&template, &dest, CowPreference::Only(CowMethod::Reflink));
    match err {
        Err(CowError::Unsupported { method, .. }) => assert_eq!(method, CowMethod::Reflink),
        // A host whose temp directory is on XFS or btrfs: nothing to fall back from.
        Ok(_) => return,
        Err(e) => panic!("{e}"),
    }
    assert!(!dest.exists(), "a failed reflink leaves no file");

    let qcow = clone_rootfs(
        &template,
        &dir.path().join("auto1"),
        CowPreference::Auto { qcow2: true },
    )
    .unwrap();
    assert_eq!(qcow.method, CowMethod::Qcow2);
    let copy = clone_rootfs(
        &template,
        &dir.path().join("auto2"),
        CowPreference::Auto { qcow2: false },
    )
    .unwrap();
    assert_eq!(copy.method, CowMethod::SparseCopy);

    // With headroom asked for, auto skips qcow2 (it cannot grow) and grows a copy.
    let grown = clone_rootfs_with(
        &template,
        &dir.path().join("auto3"),
        &CloneOptions {
            prefer: CowPreference::Auto { qcow2: true },
            grow_bytes: 8 << 20,
            ..CloneOptions::default()
        },
    )
    .unwrap();
    assert_eq!(grown.method, CowMethod::SparseCopy);
    assert_fs_size(&grown.path, (TEMPLATE_MIB + 8) << 20);

    // A tool failure carries its stderr: resize2fs on something that is not ext4.
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, noise(1 << 20, 9)).unwrap();
    let err = clone_rootfs_with(
        &junk,
        &dir.path().join("junk.clone"),
        &CloneOptions {
            prefer: CowPreference::Only(CowMethod::SparseCopy),
            grow_bytes: 1 << 20,
            ..CloneOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, CowError::Tool { tool: "resize2fs", stderr, .. } if !stderr.is_empty()),
        "{err}"
    );
    assert!(!dir.path().join("junk.clone").exists());

    let timings = measure_cow(&template, dir.path(), 2).unwrap();
    let reflink = timings
        .iter()
        .find(|t| t.method == CowMethod::Reflink)
        .unwrap();
    assert!(reflink.unsupported.is_some() && reflink.median.is_none());
    assert!(timings
        .iter()
        .filter(|t| t.method != CowMethod::Reflink)
        .all(|t| t.median.is_some()));
}
