//! Test helpers: layer tarballs built in the test (including headers no honest builder
//! writes), and a tree snapshot for comparing staging directories.

#![allow(
    dead_code,
    missing_debug_implementations,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nanobox_oci::{ApplyOptions, Compression, LayerApplier, OciError};
use tar::EntryType;

pub const MTIME: u64 = 1_700_000_000;

/// The data of a PAX extended header: `<len> <key>=<value>\n` per record, where `len`
/// counts the whole record, itself included.
pub fn pax_records<'a>(records: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let mut data = Vec::new();
    for (key, value) in records {
        let rest = key.len() + value.len() + 3;
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        data.extend_from_slice(format!("{len} {key}=").as_bytes());
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    data
}

/// Builds one layer tarball.
pub struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(MTIME);
    h.set_size(0);
    h
}

impl Layer {
    pub fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.dir_owned(path, mode, 0, 0)
    }

    pub fn dir_owned(mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = header(tar::EntryType::Directory, mode, uid, gid);
        self.builder.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn file(self, path: &str, data: &[u8], mode: u32) -> Self {
        self.file_owned(path, data, mode, 0, 0)
    }

    pub fn file_owned(mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = header(tar::EntryType::Regular, mode, uid, gid);
        h.set_size(data.len() as u64);
        self.builder.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
        self.builder.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(tar::EntryType::Link, 0o644, 0, 0);
        self.builder.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn fifo(mut self, path: &str, mode: u32) -> Self {
        let mut h = header(tar::EntryType::Fifo, mode, 0, 0);
        self.builder.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn device(mut self, path: &str, kind: tar::EntryType, major: u32, minor: u32) -> Self {
        let mut h = header(kind, 0o666, 0, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.builder.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn whiteout(self, path: &str) -> Self {
        self.file(path, b"", 0o644)
    }

    /// PAX records that apply to the next entry.
    pub fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        let data = pax_records(records.iter().map(|(k, v)| (*k, *v)));
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_path("PaxHeaders/x").unwrap();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.builder.append(&h, &data[..]).unwrap();
        self
    }

    /// An entry with raw name and link name bytes, as a hostile builder writes them.
    pub fn raw(mut self, kind: tar::EntryType, name: &[u8], link: &[u8], data: &[u8]) -> Self {
        let mut h = header(kind, 0o644, 0, 0);
        h.set_size(data.len() as u64);
        {
            let old = h.as_old_mut();
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name);
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    pub fn tar(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }

    pub fn gzip(self) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&self.tar()).unwrap();
        enc.finish().unwrap()
    }

    pub fn zstd(self) -> Vec<u8> {
        zstd::encode_all(&self.tar()[..], 3).unwrap()
    }
}

/// A staging root and a directory beside it that must stay untouched.
pub struct Sandbox {
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub outside: PathBuf,
    /// Scratch space beside the root that the untouched-check ignores (test inputs).
    pub scratch: PathBuf,
    before: BTreeMap<String, Node>,
}

impl Sandbox {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        let scratch = tmp.path().join("scratch");
        fs::create_dir(&scratch).unwrap();
        fs::write(outside.join("secret"), b"host secret").unwrap();
        fs::create_dir(outside.join("sub")).unwrap();
        fs::write(outside.join("sub/keep"), b"keep").unwrap();
        let before = snapshot(tmp.path(), &["root", "scratch"]);
        Self {
            tmp,
            root,
            outside,
            scratch,
            before,
        }
    }

    /// The outside directory as an absolute path string.
    pub fn outside_abs(&self) -> String {
        self.outside.to_str().unwrap().to_owned()
    }

    /// Applies layers (plain tar) with the default options.
    pub fn apply(&self, layers: Vec<Vec<u8>>) -> Result<(), OciError> {
        self.apply_with(layers, ApplyOptions::default())
    }

    pub fn apply_with(&self, layers: Vec<Vec<u8>>, opts: ApplyOptions) -> Result<(), OciError> {
        let mut applier = LayerApplier::new(&self.root, opts)?;
        for layer in layers {
            applier.apply(std::io::Cursor::new(layer), Compression::Auto)?;
        }
        Ok(())
    }

    /// Asserts nothing beside the staging root changed (contents, modes, owners, links).
    pub fn assert_outside_untouched(&self) {
        let after = snapshot(self.tmp.path(), &["root", "scratch"]);
        assert_eq!(
            self.before, after,
            "the host outside the staging root changed"
        );
    }

    pub fn at(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

/// One file system object, as compared between trees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub content: Vec<u8>,
    pub link: Option<PathBuf>,
    pub rdev: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub nlink: u64,
    pub mtime: Option<i64>,
}

/// Everything under `dir` (not following symlinks), keyed by relative path; `skip`
/// lists top-level names to leave out. Directory mtimes are left out (they change with
/// every entry created in them and are not part of what users see).
pub fn snapshot(dir: &Path, skip: &[&str]) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    walk(dir, dir, skip, &mut out);
    out
}

fn walk(base: &Path, dir: &Path, skip: &[&str], out: &mut BTreeMap<String, Node>) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for path in names {
        let rel = path
            .strip_prefix(base)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        if dir == base && skip.contains(&rel.as_str()) {
            continue;
        }
        let node = node(&path);
        let is_dir = node.kind == "dir";
        out.insert(rel, node);
        if is_dir {
            walk(base, &path, skip, out);
        }
    }
}

pub fn node(path: &Path) -> Node {
    let meta = fs::symlink_metadata(path).unwrap();
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else {
        "other"
    };
    let mut xattrs = BTreeMap::new();
    let mut buf = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(path, &mut buf).unwrap_or(0);
    for name in buf[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let name = std::ffi::OsStr::from_bytes(name);
        let mut value = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(path, name, &mut value).unwrap();
        xattrs.insert(name.to_str().unwrap().to_owned(), value[..len].to_vec());
    }
    Node {
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        content: if ft.is_file() {
            fs::read(path).unwrap()
        } else {
            Vec::new()
        },
        link: ft.is_symlink().then(|| fs::read_link(path).unwrap()),
        rdev: meta.rdev(),
        xattrs,
        nlink: if ft.is_dir() { 0 } else { meta.nlink() },
        mtime: (!ft.is_dir()).then_some(meta.mtime()),
    }
}

/// Asserts that `err` names `entry`.
pub fn assert_names(err: &OciError, entry: &str) {
    assert_eq!(err.entry(), Some(entry), "{err} ({err:?})");
    assert!(
        err.to_string().contains(entry),
        "message {err} does not name {entry}"
    );
}

/// The hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One layer of a test image: its blob, its media type, its uncompressed tar.
#[derive(Debug)]
pub struct LayerBlob {
    pub blob: Vec<u8>,
    pub media_type: &'static str,
    pub diff: Vec<u8>,
}

impl LayerBlob {
    pub fn gzip(layer: Layer) -> Self {
        let diff = layer.tar();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&diff).unwrap();
        Self {
            blob: enc.finish().unwrap(),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            diff,
        }
    }

    pub fn plain(layer: Layer) -> Self {
        let diff = layer.tar();
        Self {
            blob: diff.clone(),
            media_type: "application/vnd.oci.image.layer.v1.tar",
            diff,
        }
    }

    pub fn zstd(layer: Layer) -> Self {
        let diff = layer.tar();
        Self {
            blob: zstd::encode_all(&diff[..], 3).unwrap(),
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
            diff,
        }
    }
}

fn put_blob(dir: &Path, data: &[u8]) -> String {
    let hex = sha256_hex(data);
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(blobs.join(&hex), data).unwrap();
    format!("sha256:{hex}")
}

/// Writes an OCI image layout at `dir` holding one image tagged `tag`; returns the
/// manifest digest.
pub fn write_oci_layout(dir: &Path, tag: &str, layers: &[LayerBlob]) -> String {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(&l.diff)))
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
            "Entrypoint": ["/usr/bin/tool"],
            "Cmd": ["--serve"],
            "WorkingDir": "/home/user",
            "User": "1000:1000"
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = put_blob(dir, &config);
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "mediaType": l.media_type,
                "digest": put_blob(dir, &l.blob),
                "size": l.blob.len(),
            })
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layer_descs,
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = put_blob(dir, &manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    manifest_digest
}

/// A file capability (VFS v2, cap_net_raw permitted and effective).
pub fn capability() -> Vec<u8> {
    let mut cap = vec![0u8; 20];
    cap[0..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
    cap
}

/// Three layers of a test image that exercise every rule.
pub fn test_image() -> Vec<LayerBlob> {
    let cap = capability();
    let base = Layer::new()
        .dir("etc", 0o755)
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644)
        .file("etc/old.conf", b"old", 0o644)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .dir("usr/lib", 0o755)
        .file("usr/bin/tool", b"#!/bin/sh\necho tool\n", 0o755)
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .file_owned("usr/bin/su", b"su", 0o4755, 0, 0)
        .file_owned("usr/bin/wall", b"wall", 0o2755, 0, 5)
        .pax(&[("SCHILY.xattr.security.capability", &cap)])
        .file("usr/bin/ping", b"ping", 0o755)
        .symlink("usr/bin/dangling", "nowhere")
        .file("usr/lib/libx.so", b"libx", 0o644)
        .symlink("bin", "usr/bin")
        .symlink("lib", "/usr/lib")
        .dir("var", 0o755)
        .dir("var/cache", 0o755)
        .file("var/cache/big", &vec![7; 100_000], 0o644)
        .dir("opt", 0o755)
        .file("opt/lower", b"lower", 0o644)
        .dir("opt/sub", 0o755)
        .file("opt/sub/lower", b"lower", 0o644)
        .dir("dev", 0o755)
        .device("dev/null", EntryType::Char, 1, 3)
        .device("dev/loop0", EntryType::Block, 7, 0)
        .fifo("dev/initctl", 0o600)
        .dir_owned("tmp", 0o1777, 0, 0)
        .dir("home", 0o755)
        .dir_owned("home/user", 0o750, 1000, 1000)
        .pax(&[("SCHILY.xattr.user.note", b"hello")])
        .file_owned("home/user/.profile", b"export A=1\n", 0o600, 1000, 1000)
        .file("replace-me-dir", b"file", 0o644)
        .dir("replace-me-file", 0o755)
        .file("replace-me-file/inner", b"inner", 0o644);
    let middle = Layer::new()
        .whiteout("etc/.wh.old.conf")
        .whiteout("var/.wh.cache")
        .dir("opt", 0o700)
        .whiteout("opt/.wh..wh..opq")
        .file("opt/upper", b"upper", 0o644)
        .hardlink("usr/bin/tool3", "usr/bin/tool")
        .file(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
            0o644,
        )
        .symlink("usr/lib/libx.so", "libx.so.1")
        .file("usr/lib/libx.so.1", b"libx1", 0o644)
        .dir("replace-me-dir", 0o711)
        .file("replace-me-dir/new", b"new", 0o644)
        .file("replace-me-file", b"now a file", 0o600);
    let top = Layer::new()
        // Through the `lib -> /usr/lib` symlink of the base layer.
        .file("lib/libz.so", b"libz", 0o644)
        .dir_owned("home/user", 0o700, 1000, 1000)
        .whiteout("usr/bin/.wh.tool2")
        .fifo("tmp/fifo", 0o644);
    vec![
        LayerBlob::gzip(base),
        LayerBlob::plain(middle),
        LayerBlob::gzip(top),
    ]
}

/// `e2fsck -fn` finds nothing wrong with the ext4 `image`.
pub fn fsck(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `debugfs -R <request>` prints about the ext4 `image` (names need not be UTF-8:
/// the output is read lossily).
pub fn debugfs(image: &Path, request: &str) -> String {
    String::from_utf8_lossy(&debugfs_raw(image, request.as_bytes())).into_owned()
}

/// [`debugfs`], bytes in and out as they are (debugfs prints names raw).
pub fn debugfs_raw(image: &Path, request: &[u8]) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(std::ffi::OsStr::from_bytes(request))
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs {}",
        String::from_utf8_lossy(request)
    );
    out.stdout
}

/// `tar <args> --owner=0 --group=0 -cf - <member>` run by GNU tar in `dir`, in the C
/// locale (names are bytes); returns the archive.
pub fn gnu_tar(dir: &Path, args: &[&str], member: &str) -> Vec<u8> {
    let out = Command::new("tar")
        .current_dir(dir)
        .env("LANG", "C")
        .env("LC_ALL", "C")
        .args(args)
        .args(["--owner=0", "--group=0", "-cf", "-", member])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `umoci unpack --image <layout>:<tag> <bundle>`, which must succeed.
pub fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) {
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The hardlink groups under `dir` (not following symlinks): the sorted relative paths
/// of every non-directory inode with more than one name, each group sorted.
pub fn hardlink_groups(dir: &Path) -> std::collections::BTreeSet<Vec<String>> {
    let mut by_inode: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    for (rel, node) in snapshot(dir, &[]) {
        if node.kind != "dir" && node.nlink > 1 {
            let meta = fs::symlink_metadata(dir.join(&rel)).unwrap();
            by_inode
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(rel);
        }
    }
    by_inode
        .into_values()
        .filter(|group| group.len() > 1)
        .map(|mut group| {
            group.sort();
            group
        })
        .collect()
}
