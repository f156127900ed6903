//! The ext4 builder, checked with e2fsprogs' own tools (`e2fsck -fn`, `debugfs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{debugfs, fsck, Layer, Sandbox};
use nanobox_core::ImageConfig;
use nanobox_oci::{build_ext4, build_rootfs, inject, rootfs, Ext4Options, OciError};
use tar::EntryType;

fn config() -> ImageConfig {
    ImageConfig {
        env: vec![
            "PATH=/usr/local/bin:/usr/bin:/bin".into(),
            "LANG=C.UTF-8".into(),
        ],
        working_dir: "/app".into(),
        user: "1000:1000".into(),
        entrypoint: vec!["/usr/bin/node".into()],
        cmd: vec!["server.js".into()],
    }
}

/// A fake init: its bytes only have to arrive intact.
fn init_binary(sb: &Sandbox) -> std::path::PathBuf {
    let path = sb.scratch.join("nanobox-init");
    fs::write(&path, b"\x7fELF fake init").unwrap();
    path
}

fn tight() -> Ext4Options {
    Ext4Options {
        headroom_percent: 0,
        headroom_bytes: 0,
        min_size_bytes: 0,
        ..Ext4Options::default()
    }
}

#[test]
fn image_holds_the_tree_the_init_and_the_config() {
    let sb = Sandbox::new();
    let mut cap = vec![0u8; 20];
    cap[0..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes());
    let layer = Layer::new()
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file_owned("usr/bin/su", b"su", 0o4755, 0, 0)
        .hardlink("usr/bin/su2", "usr/bin/su")
        .pax(&[("SCHILY.xattr.security.capability", &cap)])
        .file("usr/bin/ping", b"ping", 0o755)
        .symlink("bin", "usr/bin")
        .dir("dev", 0o755)
        .device("dev/null", EntryType::Char, 1, 3)
        .fifo("dev/fifo", 0o600)
        .dir_owned("home", 0o750, 1000, 1000)
        .tar();
    sb.apply(vec![layer]).unwrap();
    inject(&sb.root, &init_binary(&sb), &config()).unwrap();
    let out = sb.scratch.join("rootfs.ext4");
    let image = build_ext4(&sb.root, &out, &Ext4Options::default()).unwrap();
    assert_eq!(fs::metadata(&out).unwrap().len(), image.size_bytes);
    fsck(&out);

    let json = debugfs(&out, "cat /etc/nanobox/image.json");
    let parsed: ImageConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed, config());
    assert_eq!(debugfs(&out, "cat /sbin/nanobox-init"), "\x7fELF fake init");
    let init = debugfs(&out, "stat /sbin/nanobox-init");
    assert!(
        init.contains("Mode:  0755") && init.contains("User:     0"),
        "{init}"
    );
    let su = debugfs(&out, "stat /usr/bin/su");
    assert!(
        su.contains("Mode:  04755") && su.contains("Links: 2"),
        "{su}"
    );
    let bin = debugfs(&out, "stat /bin");
    assert!(
        bin.contains("Type: symlink") && bin.contains("usr/bin"),
        "{bin}"
    );
    let null = debugfs(&out, "stat /dev/null");
    assert!(null.contains("character special"), "{null}");
    let home = debugfs(&out, "stat /home");
    assert!(
        home.contains("User:  1000") && home.contains("Mode:  0750"),
        "{home}"
    );
    let ea = debugfs(&out, "ea_list /usr/bin/ping");
    assert!(ea.contains("security.capability"), "{ea}");
}

#[test]
fn size_is_content_plus_headroom_with_a_minimum() {
    let sb = Sandbox::new();
    let layer = Layer::new().file("blob", &vec![1; 8 << 20], 0o644).tar();
    sb.apply(vec![layer]).unwrap();
    let out = sb.scratch.join("a.ext4");
    let opts = Ext4Options {
        headroom_bytes: 32 << 20,
        min_size_bytes: 0,
        ..Ext4Options::default()
    };
    let image = build_ext4(&sb.root, &out, &opts).unwrap();
    assert!(image.usage.bytes >= 8 << 20);
    assert!(image.size_bytes >= (8 << 20) + (32 << 20), "{image:?}");
    // The promised headroom is free in the finished file system.
    let header = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&out)
        .output()
        .unwrap();
    let header = String::from_utf8_lossy(&header.stdout).into_owned();
    let free: u64 = header
        .lines()
        .find_map(|l| l.strip_prefix("Free blocks:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(free * 4096 >= 32 << 20, "free {free} blocks");
    fsck(&out);

    let min = Ext4Options {
        min_size_bytes: 300 << 20,
        ..opts
    };
    let image = build_ext4(&sb.root, &out, &min).unwrap();
    assert_eq!(image.size_bytes, 300 << 20);
    fsck(&out);
}

#[test]
fn tight_estimate_fits_many_small_files() {
    let sb = Sandbox::new();
    let mut layer = Layer::new();
    for d in 0..30 {
        layer = layer.dir(&format!("d{d}"), 0o755);
        for f in 0..100 {
            let name = format!("d{d}/file-with-a-longish-name-{f:04}");
            layer = layer.file(&name, b"x", 0o644);
        }
    }
    sb.apply(vec![layer.tar()]).unwrap();
    let out = sb.scratch.join("small-files.ext4");
    let image = build_ext4(&sb.root, &out, &tight()).unwrap();
    assert!(image.usage.inodes >= 3031, "{image:?}");
    fsck(&out);
}

#[test]
fn tight_estimate_fits_large_files_hardlinks_and_xattrs() {
    let sb = Sandbox::new();
    let big_xattr = vec![b'v'; 3000];
    let layer = Layer::new()
        .file("big", &vec![3; 40 << 20], 0o644)
        .hardlink("big2", "big")
        .pax(&[("SCHILY.xattr.user.big", &big_xattr)])
        .file("x", b"x", 0o644)
        .symlink("long-link", &"t".repeat(300))
        .tar();
    sb.apply(vec![layer]).unwrap();
    let out = sb.scratch.join("big.ext4");
    let image = build_ext4(&sb.root, &out, &tight()).unwrap();
    // The hardlinked 40 MiB counts once.
    assert!(image.usage.bytes < 41 << 20, "{image:?}");
    fsck(&out);
    let ea = debugfs(&out, "ea_get /x user.big");
    assert!(ea.contains("vvvv"), "{ea}");
}

#[test]
fn inject_never_writes_through_a_symlink_to_the_host() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .symlink("sbin", &sb.outside_abs())
        .symlink("etc", "../../../outside")
        .tar();
    sb.apply(vec![layer]).unwrap();
    inject(&sb.root, &init_binary(&sb), &config()).unwrap();
    sb.assert_outside_untouched();
    let inside = sb.root.join(sb.outside_abs().trim_start_matches('/'));
    assert!(inside.join("nanobox-init").is_file());
    assert!(sb.at("outside/nanobox/image.json").is_file());
}

#[test]
fn inject_follows_merged_usr_inside_the_root() {
    let sb = Sandbox::new();
    let layer = Layer::new()
        .dir("usr", 0o755)
        .dir("usr/sbin", 0o755)
        .symlink("sbin", "usr/sbin")
        .file("usr/sbin/nanobox-init", b"old", 0o755)
        .tar();
    sb.apply(vec![layer]).unwrap();
    inject(&sb.root, &init_binary(&sb), &config()).unwrap();
    assert_eq!(
        fs::read(sb.at("usr/sbin/nanobox-init")).unwrap(),
        b"\x7fELF fake init"
    );
    let json = fs::read(sb.at(rootfs::IMAGE_CONFIG_PATH.trim_start_matches('/'))).unwrap();
    assert_eq!(
        serde_json::from_slice::<ImageConfig>(&json).unwrap(),
        config()
    );
}

#[test]
fn output_is_replaced_atomically_and_failures_leave_no_temp_files() {
    let sb = Sandbox::new();
    sb.apply(vec![Layer::new().file("f", b"f", 0o644).tar()])
        .unwrap();
    let dir = sb.scratch.join("out");
    fs::create_dir(&dir).unwrap();
    let out = dir.join("t.ext4");
    fs::write(&out, b"previous").unwrap();

    let broken = Ext4Options {
        mkfs: "/nonexistent/mkfs.ext4".into(),
        ..Ext4Options::default()
    };
    let err = build_ext4(&sb.root, &out, &broken).unwrap_err();
    assert!(matches!(err, OciError::Io { .. }), "{err:?}");
    let failing = Ext4Options {
        mkfs: "false".into(),
        ..Ext4Options::default()
    };
    let err = build_ext4(&sb.root, &out, &failing).unwrap_err();
    assert!(matches!(err, OciError::Tool { .. }), "{err:?}");
    assert_eq!(fs::read(&out).unwrap(), b"previous");
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);

    build_ext4(&sb.root, &out, &Ext4Options::default()).unwrap();
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    fsck(&out);
}

#[tokio::test]
async fn build_rootfs_runs_off_the_executor() {
    let sb = Sandbox::new();
    sb.apply(vec![Layer::new().dir("etc", 0o755).tar()])
        .unwrap();
    let out = sb.scratch.join("async.ext4");
    let image = build_rootfs(
        sb.root.clone(),
        init_binary(&sb),
        config(),
        out.clone(),
        Ext4Options::default(),
    )
    .await
    .unwrap();
    assert_eq!(image.path, out);
    fsck(&out);
    assert!(debugfs(&out, "cat /etc/nanobox/image.json").contains("server.js"));
}

/// A real directory tree of the host (thousands of files of every size, symlinks,
/// hardlinks) fits the tight estimate, and the estimate is not wasteful.
#[test]
fn tight_estimate_fits_a_real_tree() {
    let sb = Sandbox::new();
    let source = ["/usr/lib/python3", "/usr/share/doc", "/etc"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .unwrap();
    let copy = Command::new("cp")
        .arg("-a")
        .arg(source)
        .arg(sb.root.join("tree"))
        .status()
        .unwrap();
    assert!(copy.success());
    let out = sb.scratch.join("real.ext4");
    let image = build_ext4(&sb.root, &out, &tight()).unwrap();
    fsck(&out);
    let header = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&out)
        .output()
        .unwrap();
    let header = String::from_utf8_lossy(&header.stdout).into_owned();
    let field = |name: &str| -> u64 {
        header
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let free = field("Free blocks:") * 4096;
    let free_inodes = field("Free inodes:");
    println!(
        "{}: content {} MiB in {} inodes; image {} MiB, {} MiB and {} inodes free",
        source.display(),
        image.usage.bytes >> 20,
        image.usage.inodes,
        image.size_bytes >> 20,
        free >> 20,
        free_inodes
    );
    // Not wasteful: less than a quarter of the image is left over without headroom.
    assert!(
        free < image.size_bytes / 4,
        "{free} of {}",
        image.size_bytes
    );
}

/// What `debugfs stat` says about one inode.
#[derive(Debug, Default)]
struct Ext4Node {
    inode: u64,
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    links: u64,
    size: u64,
    mtime: i64,
    device: Option<(u64, u64)>,
    fast_link: Option<String>,
    xattrs: Vec<String>,
}

fn parse_stat(text: &str) -> Ext4Node {
    let mut node = Ext4Node::default();
    let word_after = |line: &str, key: &str| -> Option<String> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next().map(str::to_owned)
    };
    let mut in_xattrs = false;
    for line in text.lines() {
        if line.starts_with("Inode:") {
            node.inode = word_after(line, "Inode:").unwrap().parse().unwrap();
            let kind = &line[line.find("Type:").unwrap() + 5..line.find("Mode:").unwrap()];
            node.kind = kind.trim().to_owned();
            node.mode =
                u32::from_str_radix(&word_after(line, "Mode:").unwrap(), 8).unwrap() & 0o7777;
        } else if line.starts_with("User:") {
            node.uid = word_after(line, "User:").unwrap().parse().unwrap();
            node.gid = word_after(line, "Group:").unwrap().parse().unwrap();
            node.size = word_after(line, "Size:").unwrap().parse().unwrap();
        } else if line.starts_with("Links:") {
            node.links = word_after(line, "Links:").unwrap().parse().unwrap();
        } else if line.starts_with(" mtime:") {
            let hex = word_after(line, "mtime: 0x").unwrap();
            node.mtime = i64::from_str_radix(hex.split(':').next().unwrap(), 16).unwrap();
        } else if let Some(rest) = line.strip_prefix("Device major/minor number: ") {
            let (major, minor) = rest
                .split_whitespace()
                .next()
                .unwrap()
                .split_once(':')
                .unwrap();
            node.device = Some((major.parse().unwrap(), minor.parse().unwrap()));
        } else if let Some(rest) = line.strip_prefix("Fast link dest: ") {
            node.fast_link = Some(rest.trim_matches('"').to_owned());
        } else if line.starts_with("Extended attributes:") {
            in_xattrs = true;
        } else if in_xattrs && line.starts_with("  ") {
            node.xattrs
                .push(line.split_whitespace().next().unwrap().to_owned());
        } else {
            in_xattrs = false;
        }
    }
    node
}

/// Every file of the staging tree is in the image as it was: type, mode, owner, size,
/// hardlinks, device numbers, symlink targets, xattrs, file contents and file mtimes.
#[test]
fn image_contents_equal_the_staging_tree() {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;

    let sb = Sandbox::new();
    sb.apply(common::test_image().into_iter().map(|l| l.diff).collect())
        .unwrap();
    inject(&sb.root, &init_binary(&sb), &config()).unwrap();
    let out = sb.scratch.join("tree.ext4");
    build_ext4(&sb.root, &out, &Ext4Options::default()).unwrap();
    fsck(&out);

    let tree = common::snapshot(&sb.root, &[]);
    let dumps = sb.scratch.join("dumps");
    fs::create_dir(&dumps).unwrap();
    let mut script = String::new();
    for (i, (path, node)) in tree.iter().enumerate() {
        script.push_str(&format!("stat \"/{path}\"\n"));
        if node.kind == "file" {
            script.push_str(&format!("dump \"/{path}\" {}/{i}\n", dumps.display()));
        }
    }
    let script_path = sb.scratch.join("debugfs.cmds");
    fs::write(&script_path, script).unwrap();
    let output = debugfs_script(&out, &script_path);
    let sections: Vec<&str> = output.split("debugfs: stat ").skip(1).collect();
    assert_eq!(sections.len(), tree.len());

    let mut inode_of_host_ino: HashMap<u64, u64> = HashMap::new();
    for (i, ((path, node), section)) in tree.iter().zip(&sections).enumerate() {
        let ext = parse_stat(section);
        let kind = match node.kind {
            "dir" => "directory",
            "file" => "regular",
            "symlink" => "symlink",
            "fifo" => "FIFO",
            "char" => "character special",
            "block" => "block special",
            other => other,
        };
        assert_eq!(ext.kind, kind, "{path}");
        assert_eq!(
            (ext.mode, ext.uid, ext.gid),
            (node.mode, node.uid, node.gid),
            "{path}"
        );
        let host = fs::symlink_metadata(sb.root.join(path)).unwrap();
        if node.kind != "dir" {
            assert_eq!(ext.links, node.nlink, "{path}");
            assert_eq!(Some(ext.mtime), node.mtime, "{path}");
            // Hardlinks stay one inode.
            let first = *inode_of_host_ino.entry(host.ino()).or_insert(ext.inode);
            assert_eq!(first, ext.inode, "{path} is a hardlink in the tree");
        }
        let mut names: Vec<_> = node.xattrs.keys().cloned().collect();
        names.sort();
        let mut ext_names = ext.xattrs.clone();
        ext_names.sort();
        assert_eq!(ext_names, names, "{path}");
        match node.kind {
            "file" => {
                assert_eq!(ext.size, node.content.len() as u64, "{path}");
                assert_eq!(
                    fs::read(dumps.join(i.to_string())).unwrap(),
                    node.content,
                    "{path}"
                );
            }
            "symlink" => {
                let target = node.link.as_ref().unwrap().to_str().unwrap().to_owned();
                assert_eq!(ext.size, target.len() as u64, "{path}");
                if target.len() < 60 {
                    assert_eq!(ext.fast_link.as_deref(), Some(target.as_str()), "{path}");
                }
            }
            "char" | "block" => {
                let (major, minor) = ext.device.unwrap();
                assert_eq!(nix::sys::stat::makedev(major, minor), node.rdev, "{path}");
            }
            _ => {}
        }
    }
}

fn debugfs_script(image: &Path, script: &Path) -> String {
    let out = Command::new("debugfs")
        .arg("-f")
        .arg(script)
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}
