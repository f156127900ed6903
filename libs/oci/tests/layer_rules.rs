//! Each layer rule, applied for real into a staging directory (the suite runs as root,
//! so owners and device nodes are real too).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::{node, Layer, Sandbox, MTIME};
use nanobox_oci::{ApplyOptions, Compression, LayerApplier, OciError};
use tar::EntryType;

#[test]
fn regular_file_content_mode_owner_mtime() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .dir("etc", 0o755)
        .file_owned("etc/hosts", b"127.0.0.1 localhost\n", 0o640, 1000, 1001)
        .tar();
    sb.apply(vec![layer]).unwrap();
    let n = node(&sb.at("etc/hosts"));
    assert_eq!(n.kind, "file");
    assert_eq!(n.content, b"127.0.0.1 localhost\n");
    assert_eq!((n.mode, n.uid, n.gid), (0o640, 1000, 1001));
    assert_eq!(n.mtime, Some(MTIME as i64));
}

#[test]
fn setuid_setgid_sticky_modes_survive_chown() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .dir("bin", 0o755)
        .file_owned("bin/su", b"su", 0o4755, 0, 0)
        .file_owned("bin/wall", b"wall", 0o2755, 0, 5)
        .dir_owned("tmp", 0o1777, 0, 0)
        .dir_owned("shared", 0o2775, 1000, 1000)
        .tar();
    sb.apply(vec![layer]).unwrap();
    assert_eq!(node(&sb.at("bin/su")).mode, 0o4755);
    assert_eq!(node(&sb.at("bin/wall")).mode, 0o2755);
    assert_eq!(node(&sb.at("bin/wall")).gid, 5);
    assert_eq!(node(&sb.at("tmp")).mode, 0o1777);
    let shared = node(&sb.at("shared"));
    assert_eq!((shared.mode, shared.uid, shared.gid), (0o2775, 1000, 1000));
}

#[test]
fn read_only_directories_get_their_mode_after_their_contents() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .dir_owned("ro", 0o500, 1000, 1000)
        .dir("ro/inner", 0o555)
        .file("ro/inner/file", b"x", 0o444)
        .tar();
    sb.apply(vec![layer]).unwrap();
    assert_eq!(node(&sb.at("ro")).mode, 0o500);
    assert_eq!(node(&sb.at("ro")).uid, 1000);
    assert_eq!(node(&sb.at("ro/inner")).mode, 0o555);
    assert_eq!(fs::read(sb.at("ro/inner/file")).unwrap(), b"x");
    // Directory mtimes are applied last, so they hold despite the files created in them.
    assert_eq!(fs::metadata(sb.at("ro")).unwrap().mtime(), MTIME as i64);
}

#[test]
fn symlinks_are_kept_verbatim_and_never_followed() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .symlink("abs", "/etc/passwd")
        .symlink("rel", "../../x/y")
        .symlink("dangling", "nowhere")
        .tar();
    sb.apply(vec![layer]).unwrap();
    assert_eq!(
        node(&sb.at("abs")).link.unwrap().to_str(),
        Some("/etc/passwd")
    );
    assert_eq!(
        node(&sb.at("rel")).link.unwrap().to_str(),
        Some("../../x/y")
    );
    assert_eq!(node(&sb.at("dangling")).kind, "symlink");
    assert_eq!(node(&sb.at("abs")).mtime, Some(MTIME as i64));
}

#[test]
fn hardlinks_in_the_same_layer_share_the_inode() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .file_owned("a", b"shared", 0o755, 7, 7)
        .dir("d", 0o755)
        .hardlink("d/b", "a")
        .hardlink("c", "/a")
        .tar();
    sb.apply(vec![layer]).unwrap();
    let a = fs::metadata(sb.at("a")).unwrap();
    assert_eq!(a.ino(), fs::metadata(sb.at("d/b")).unwrap().ino());
    assert_eq!(a.ino(), fs::metadata(sb.at("c")).unwrap().ino());
    assert_eq!(a.nlink(), 3);
    assert_eq!((a.uid(), a.mode() & 0o7777), (7, 0o755));
}

#[test]
fn hardlinks_to_files_of_an_earlier_layer() {
    let sb = Sandbox::new();
    let lower = Layer::new()
        .dir("usr", 0o755)
        .file("usr/python3.11", b"py", 0o755);
    let upper = Layer::new().hardlink("usr/python3", "usr/python3.11");
    sb.apply(vec![lower.tar(), upper.tar()]).unwrap();
    let a = fs::metadata(sb.at("usr/python3.11")).unwrap();
    let b = fs::metadata(sb.at("usr/python3")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(fs::read(sb.at("usr/python3")).unwrap(), b"py");
}

#[test]
fn whiteout_deletes_a_lower_file_and_a_lower_tree() {
    let sb = Sandbox::new();
    let lower = Layer::new()
        .dir("etc", 0o755)
        .file("etc/old.conf", b"old", 0o644)
        .file("etc/keep.conf", b"keep", 0o644)
        .dir("var", 0o755)
        .dir("var/cache", 0o755)
        .file("var/cache/big", b"big", 0o644);
    let upper = Layer::new()
        .whiteout("etc/.wh.old.conf")
        .whiteout("var/.wh.cache")
        .whiteout("etc/.wh.never-existed");
    sb.apply(vec![lower.tar(), upper.tar()]).unwrap();
    assert!(!sb.at("etc/old.conf").exists());
    assert!(sb.at("etc/keep.conf").exists());
    assert!(!sb.at("var/cache").exists());
    assert!(sb.at("var").is_dir());
    assert!(!sb.at("etc/.wh.old.conf").exists());
}

#[test]
fn opaque_directory_clears_lower_content_only() {
    let sb = Sandbox::new();
    let lower = Layer::new()
        .dir("opt", 0o755)
        .file("opt/lower", b"l", 0o644)
        .dir("opt/sub", 0o755)
        .file("opt/sub/lower", b"l", 0o644);
    // The marker after a new child (allowed order) must keep that child, and a child
    // directory this layer re-declares is emptied of lower content too.
    let upper = Layer::new()
        .dir("opt", 0o700)
        .file("opt/new-before", b"n", 0o644)
        .dir("opt/sub", 0o755)
        .whiteout("opt/.wh..wh..opq")
        .file("opt/new-after", b"n", 0o644);
    sb.apply(vec![lower.tar(), upper.tar()]).unwrap();
    let mut names: Vec<_> = fs::read_dir(sb.at("opt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["new-after", "new-before", "sub"]);
    assert_eq!(fs::read_dir(sb.at("opt/sub")).unwrap().count(), 0);
    assert_eq!(node(&sb.at("opt")).mode, 0o700);
}

#[test]
fn xattrs_including_file_capabilities() {
    // VFS v2 capability: cap_net_bind_service (bit 10) permitted and effective.
    let mut cap = vec![0u8; 20];
    cap[0..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes());
    let sb = Sandbox::new();
    let layer = Layer::new()
        .pax(&[
            ("SCHILY.xattr.security.capability", &cap),
            ("SCHILY.xattr.user.origin", b"layer-1"),
        ])
        .file_owned("ping", b"elf", 0o755, 0, 0)
        .pax(&[("SCHILY.xattr.user.dir", b"yes")])
        .dir("d", 0o755)
        .tar();
    sb.apply(vec![layer]).unwrap();
    let n = node(&sb.at("ping"));
    assert_eq!(n.xattrs.get("security.capability"), Some(&cap));
    assert_eq!(
        n.xattrs.get("user.origin").map(|v| &v[..]),
        Some(&b"layer-1"[..])
    );
    assert_eq!(n.mode, 0o755);
    let d = node(&sb.at("d"));
    assert_eq!(d.xattrs.get("user.dir").map(|v| &v[..]), Some(&b"yes"[..]));
}

#[test]
fn device_nodes_and_fifos() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .dir("dev", 0o755)
        .device("dev/null", EntryType::Char, 1, 3)
        .device("dev/loop0", EntryType::Block, 7, 0)
        .fifo("dev/initctl", 0o600)
        .tar();
    sb.apply(vec![layer]).unwrap();
    let null = node(&sb.at("dev/null"));
    assert_eq!(
        (null.kind, null.rdev, null.mode),
        ("char", nix::sys::stat::makedev(1, 3), 0o666)
    );
    let lp = node(&sb.at("dev/loop0"));
    assert_eq!((lp.kind, lp.rdev), ("block", nix::sys::stat::makedev(7, 0)));
    let fifo = node(&sb.at("dev/initctl"));
    assert_eq!((fifo.kind, fifo.mode), ("fifo", 0o600));
}

#[test]
fn later_layer_replaces_a_directory_with_a_file_and_back() {
    let sb = Sandbox::new();
    let l1 = Layer::new()
        .dir("a", 0o755)
        .file("a/inner", b"x", 0o644)
        .file("b", b"file", 0o644)
        .symlink("c", "a");
    let l2 = Layer::new()
        .file("a", b"now a file", 0o600)
        .dir("b", 0o711)
        .file("b/inner", b"y", 0o644)
        .dir("c", 0o755);
    sb.apply(vec![l1.tar(), l2.tar()]).unwrap();
    assert_eq!(fs::read(sb.at("a")).unwrap(), b"now a file");
    assert_eq!(node(&sb.at("b")).mode, 0o711);
    assert_eq!(fs::read(sb.at("b/inner")).unwrap(), b"y");
    assert_eq!(node(&sb.at("c")).kind, "dir");
}

#[test]
fn directory_over_directory_merges_and_takes_the_new_metadata() {
    let sb = Sandbox::new();
    let l1 = Layer::new()
        .pax(&[("SCHILY.xattr.user.old", b"1")])
        .dir("srv", 0o755)
        .file("srv/lower", b"l", 0o644);
    let l2 = Layer::new()
        .dir_owned("srv", 0o750, 33, 33)
        .file("srv/upper", b"u", 0o644);
    sb.apply(vec![l1.tar(), l2.tar()]).unwrap();
    assert!(sb.at("srv/lower").exists() && sb.at("srv/upper").exists());
    let srv = node(&sb.at("srv"));
    assert_eq!((srv.mode, srv.uid, srv.gid), (0o750, 33, 33));
    assert!(srv.xattrs.is_empty(), "{:?}", srv.xattrs);
}

#[test]
fn missing_parents_are_created_0755() {
    let sb = Sandbox::new();
    sb.apply(vec![Layer::new().file("x/y/z", b"z", 0o644).tar()])
        .unwrap();
    assert_eq!(node(&sb.at("x")).mode, 0o755);
    assert_eq!(node(&sb.at("x/y")).mode, 0o755);
}

#[test]
fn lower_directory_mtime_is_kept_when_an_upper_layer_adds_to_it() {
    let sb = Sandbox::new();
    let l1 = Layer::new().dir("etc", 0o755).file("etc/a", b"a", 0o644);
    let l2 = Layer::new()
        .file("etc/b", b"b", 0o644)
        .whiteout("etc/.wh.a");
    sb.apply(vec![l1.tar(), l2.tar()]).unwrap();
    assert_eq!(fs::metadata(sb.at("etc")).unwrap().mtime(), MTIME as i64);
}

#[test]
fn parent_symlinks_resolve_inside_the_root() {
    let sb = Sandbox::new();
    let l1 = Layer::new()
        .dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .symlink("lib", "usr/lib")
        .symlink("lib64", "/usr/lib");
    let l2 = Layer::new()
        .file("lib/libc.so", b"c", 0o755)
        .file("lib64/ld.so", b"ld", 0o755);
    sb.apply(vec![l1.tar(), l2.tar()]).unwrap();
    assert_eq!(fs::read(sb.at("usr/lib/libc.so")).unwrap(), b"c");
    assert_eq!(fs::read(sb.at("usr/lib/ld.so")).unwrap(), b"ld");
    assert_eq!(node(&sb.at("lib")).kind, "symlink");
}

#[test]
fn pax_owner_and_time_override_the_header() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .pax(&[
            ("uid", b"3000000000"),
            ("gid", b"65534"),
            ("mtime", b"1600000000.25"),
        ])
        .file("big-uid", b"x", 0o644)
        .tar();
    sb.apply(vec![layer]).unwrap();
    let meta = fs::symlink_metadata(sb.at("big-uid")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (3_000_000_000, 65534));
    assert_eq!(
        (meta.mtime(), meta.mtime_nsec()),
        (1_600_000_000, 250_000_000)
    );
}

#[test]
fn long_names_through_gnu_extensions() {
    let sb = Sandbox::new();
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(200));
    let target = format!("/{}", "t".repeat(150));
    sb.apply(vec![Layer::new()
        .file(&long, b"long", 0o644)
        .symlink("l", &target)
        .tar()])
        .unwrap();
    assert_eq!(fs::read(sb.at(&long)).unwrap(), b"long");
    assert_eq!(
        node(&sb.at("l")).link.unwrap().to_str(),
        Some(target.as_str())
    );
}

fn sample() -> Layer {
    Layer::new()
        .dir("etc", 0o755)
        .file("etc/os-release", b"ID=nanobox\n", 0o644)
}

#[test]
fn gzip_zstd_and_plain_layers_sniffed_or_by_media_type() {
    for (blob, media_type) in [
        (sample().tar(), "application/vnd.oci.image.layer.v1.tar"),
        (
            sample().gzip(),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (
            sample().zstd(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        (
            sample().gzip(),
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
        (
            sample().tar(),
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
    ] {
        for by_type in [true, false] {
            let sb = Sandbox::new();
            let file = sb.tmp.path().join("layer.blob");
            fs::write(&file, &blob).unwrap();
            let mut applier = LayerApplier::new(&sb.root, ApplyOptions::default()).unwrap();
            let stats = applier
                .apply_file(&file, by_type.then_some(media_type))
                .unwrap();
            assert_eq!(stats.entries, 2, "{media_type}");
            assert_eq!(fs::read(sb.at("etc/os-release")).unwrap(), b"ID=nanobox\n");
        }
    }
}

#[test]
fn unknown_media_type_is_refused() {
    let sb = Sandbox::new();
    let mut applier = LayerApplier::new(&sb.root, ApplyOptions::default()).unwrap();
    let err = applier
        .apply_file(
            &sb.tmp.path().join("none"),
            Some("application/vnd.example.squashfs"),
        )
        .unwrap_err();
    assert!(matches!(err, OciError::UnsupportedMediaType(_)), "{err}");
}

#[test]
fn corrupt_stream_is_an_error_naming_the_last_entry() {
    let sb = Sandbox::new();
    let mut blob = sample().gzip();
    let len = blob.len();
    blob.truncate(len / 2);
    let mut applier = LayerApplier::new(&sb.root, ApplyOptions::default()).unwrap();
    let err = applier
        .apply(std::io::Cursor::new(blob), Compression::Gzip)
        .unwrap_err();
    assert!(err.is_bad_input(), "{err}");
    assert!(
        matches!(err, OciError::Corrupt { .. } | OciError::Apply { .. }),
        "{err:?}"
    );
}

#[test]
fn totals_count_every_layer() {
    let sb = Sandbox::new();
    let mut applier = LayerApplier::new(&sb.root, ApplyOptions::default()).unwrap();
    applier
        .apply(std::io::Cursor::new(sample().tar()), Compression::None)
        .unwrap();
    let stats = applier
        .apply(
            std::io::Cursor::new(Layer::new().whiteout("etc/.wh.os-release").zstd()),
            Compression::Zstd,
        )
        .unwrap();
    assert_eq!(stats.whiteouts, 1);
    let total = applier.total();
    assert_eq!(
        (total.entries, total.file_bytes, total.whiteouts),
        (3, 11, 1)
    );
    assert!(!sb.at("etc/os-release").exists());
}

#[test]
fn layer_ending_right_after_the_last_data_is_accepted_like_umoci_writes_it() {
    // umoci 0.4.7 `insert` writes such layers: no padding, no end-of-archive blocks.
    let full = Layer::new().file("a", b"0123456789", 0o644).tar();
    let cut = full[..512 + 10].to_vec();
    for (blob, compression) in [
        (cut.clone(), Compression::None),
        (zstd::encode_all(&cut[..], 3).unwrap(), Compression::Zstd),
    ] {
        let sb = Sandbox::new();
        let mut applier = LayerApplier::new(&sb.root, ApplyOptions::default()).unwrap();
        applier
            .apply(std::io::Cursor::new(blob), compression)
            .unwrap();
        assert_eq!(fs::read(sb.at("a")).unwrap(), b"0123456789");
    }
    // Cut inside the data: an error naming the entry.
    let sb = Sandbox::new();
    let mut applier = LayerApplier::new(&sb.root, ApplyOptions::default()).unwrap();
    let err = applier
        .apply(
            std::io::Cursor::new(full[..512 + 5].to_vec()),
            Compression::None,
        )
        .unwrap_err();
    assert_eq!(err.entry(), Some("a"), "{err:?}");
}
