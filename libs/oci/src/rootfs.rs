//! The bootable ext4 image: a staging tree plus the guest init and the image config,
//! written by `mkfs.ext4 -d` (no loop mounts, no root-only tricks beyond what layer
//! application already needed).
//!
//! The image is sized from the tree itself (data blocks counted the way ext4 allocates
//! them, one inode per distinct file) plus headroom for what the sandbox writes, so a
//! 40 MB image does not become a 10 GB file. It is written under a temporary name and
//! renamed into place, so a reader never sees half an image.
//!
//! `mkfs.ext4 -d` keeps the hard links of regular files, device nodes, fifos and sockets
//! but copies every name of a hardlinked symlink as its own inode; the builder joins those
//! names back into one inode afterwards with `debugfs` (`rm`, `ln`, `sif links_count`),
//! so the image has the tree's link groups exactly.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nanobox_core::ImageConfig;

use crate::error::OciError;
use crate::layer::list_xattrs;
use crate::staging::{apply_err, split_entry, StagingRoot};

/// Where the guest init is installed in every rootfs.
pub const INIT_PATH: &str = "/sbin/nanobox-init";
/// Where the image config (JSON of [`ImageConfig`]) is written in every rootfs.
pub const IMAGE_CONFIG_PATH: &str = "/etc/nanobox/image.json";

const MIB: u64 = 1 << 20;
/// ext4 inode size this builder asks for (room for in-inode xattrs and nanosecond times).
const INODE_SIZE: u64 = 256;
/// Bytes of xattrs that fit in a 256-byte inode next to its fixed fields.
const INLINE_XATTR_SPACE: u64 = 96;
/// Longest symlink target stored in the inode itself ("fast" symlink).
const FAST_SYMLINK_MAX: u64 = 59;
/// Blocks one extent covers; a file needs an extent block past four of them.
const EXTENT_BLOCKS: u64 = 32768;

/// How the ext4 image is sized and made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Options {
    /// Free space added, as a percentage of the content (data and metadata).
    pub headroom_percent: u64,
    /// Free space added on top, in bytes.
    pub headroom_bytes: u64,
    /// The image is never smaller than this.
    pub min_size_bytes: u64,
    /// File system block size (4096 keeps large xattrs and big files cheap).
    pub block_size: u64,
    /// Whether the file system has a journal (sandboxes write to their copy).
    pub journal: bool,
    /// Volume label.
    pub label: String,
    /// The `mkfs.ext4` binary (`debugfs`, needed for hardlinked symlinks, is taken from
    /// the same directory, or from `PATH` when this is a bare name).
    pub mkfs: PathBuf,
}

impl Default for Ext4Options {
    fn default() -> Self {
        Self {
            headroom_percent: 20,
            headroom_bytes: 64 * MIB,
            min_size_bytes: 64 * MIB,
            block_size: 4096,
            journal: true,
            label: "nanobox".to_owned(),
            mkfs: PathBuf::from("mkfs.ext4"),
        }
    }
}

/// What a tree needs in an ext4 file system.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Data and directory blocks, in bytes (file sizes rounded up to blocks, hardlinked
    /// files once, xattr blocks, extent blocks).
    pub bytes: u64,
    /// Distinct inodes (hardlinks counted once).
    pub inodes: u64,
}

/// A finished image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Image {
    /// Where it is.
    pub path: PathBuf,
    /// Its size.
    pub size_bytes: u64,
    /// Its inode count.
    pub inodes: u64,
    /// What the content needed (before headroom).
    pub usage: TreeUsage,
}

/// Installs the guest init at [`INIT_PATH`] (mode 0755, root) and writes `config` as
/// JSON to [`IMAGE_CONFIG_PATH`] (mode 0644), replacing whatever the image had there.
///
/// Paths are resolved with the staging root as `/`: a `sbin -> usr/sbin` symlink from
/// the image is honoured (the guest will see the same), a symlink to a host path is not.
pub fn inject(staging: &Path, init: &Path, config: &ImageConfig) -> Result<(), OciError> {
    let root = StagingRoot::new(staging, true)?;
    let mut init_file =
        fs::File::open(init).map_err(|e| OciError::io("opening the guest init", init, e))?;
    install(&root, INIT_PATH, &mut init_file, 0o755)?;
    let mut json = serde_json::to_vec_pretty(config).map_err(|e| {
        OciError::io(
            "encoding the image config",
            IMAGE_CONFIG_PATH,
            io::Error::other(e),
        )
    })?;
    json.push(b'\n');
    install(&root, IMAGE_CONFIG_PATH, &mut &json[..], 0o644)
}

/// Writes one file into the staging root, owned by root, never through a symlink.
fn install(root: &StagingRoot, dest: &str, data: &mut dyn Read, mode: u32) -> Result<(), OciError> {
    let comps = split_entry(dest.as_bytes()).map_err(|reason| OciError::UnsafePath {
        entry: dest.to_owned(),
        reason,
    })?;
    let Some((base, parents)) = comps.split_last() else {
        return Err(OciError::UnsafePath {
            entry: dest.to_owned(),
            reason: "replaces the root directory",
        });
    };
    let parent = root
        .resolve_dir(parents, true, dest, None)?
        .ok_or_else(|| apply_err(dest, "resolving the parent", io::ErrorKind::NotFound.into()))?;
    let rel = parent.join(base);
    root.clear_slot(&rel, false, dest)?;
    let host = root.abs(&rel);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_CLOEXEC).bits())
        .open(&host)
        .map_err(|e| apply_err(dest, "creating a file", e))?;
    io::copy(data, &mut file).map_err(|e| apply_err(dest, "writing a file", e))?;
    nix::unistd::fchown(&file, Some(0.into()), Some(0.into()))
        .map_err(|e| apply_err(dest, "chown", e.into()))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| apply_err(dest, "chmod", e))?;
    Ok(())
}

/// Measures what `dir` needs in an ext4 file system with `block_size` blocks.
pub fn measure(dir: &Path, block_size: u64) -> Result<TreeUsage, OciError> {
    Ok(survey(dir, block_size)?.usage)
}

/// What a walk of the tree found.
#[derive(Debug, Default)]
struct Survey {
    usage: TreeUsage,
    /// The names (relative to the tree) of each hardlinked symlink, by inode.
    symlink_links: HashMap<(u64, u64), Vec<PathBuf>>,
    /// What mkfs needs beyond `usage` before those names are joined.
    transient: TreeUsage,
}

fn survey(dir: &Path, block_size: u64) -> Result<Survey, OciError> {
    let mut survey = Survey::default();
    let mut seen = HashSet::new();
    measure_dir(dir, dir, block_size, &mut survey, &mut seen)?;
    Ok(survey)
}

fn measure_dir(
    base: &Path,
    dir: &Path,
    bs: u64,
    survey: &mut Survey,
    seen: &mut HashSet<(u64, u64)>,
) -> Result<(), OciError> {
    survey.usage.inodes += 1;
    survey.usage.bytes += xattr_blocks(dir, bs);
    // ".." and "." plus one record per child: 8 bytes of header and the name, 4-aligned.
    let mut dirent_bytes = 24;
    let listing = fs::read_dir(dir).map_err(|e| OciError::io("measuring", dir, e))?;
    for child in listing {
        let child = child.map_err(|e| OciError::io("measuring", dir, e))?;
        let name_len = child.file_name().as_bytes().len() as u64;
        dirent_bytes += (8 + name_len).div_ceil(4) * 4;
        let path = child.path();
        let cm = fs::symlink_metadata(&path).map_err(|e| OciError::io("measuring", &path, e))?;
        let ft = cm.file_type();
        if ft.is_dir() {
            measure_dir(base, &path, bs, survey, seen)?;
            continue;
        }
        if cm.nlink() > 1 && ft.is_symlink() {
            let rel = path.strip_prefix(base).unwrap_or(&path).to_owned();
            survey
                .symlink_links
                .entry((cm.dev(), cm.ino()))
                .or_default()
                .push(rel);
        }
        if cm.nlink() > 1 && !seen.insert((cm.dev(), cm.ino())) {
            if ft.is_symlink() {
                // mkfs makes this name its own inode until the join (see the module doc).
                survey.transient.inodes += 1;
                survey.transient.bytes += symlink_bytes(cm.size(), bs);
            }
            continue;
        }
        let usage = &mut survey.usage;
        usage.inodes += 1;
        usage.bytes += xattr_blocks(&path, bs);
        if ft.is_file() {
            // Holes cost nothing: mkfs copies only data (and skips zero blocks in it), so
            // what the staging file allocates bounds what the image allocates.
            let blocks = cm.size().div_ceil(bs).min((cm.blocks() * 512).div_ceil(bs));
            let extents = if blocks < cm.size().div_ceil(bs) {
                data_regions(&path, blocks)?
            } else {
                blocks.div_ceil(EXTENT_BLOCKS)
            };
            // Four extents live in the inode; more need extent-tree blocks (340 per block).
            let tree = if extents > 4 {
                extents.div_ceil(340)
            } else {
                0
            };
            usage.bytes += (blocks + tree) * bs;
        } else if ft.is_symlink() {
            usage.bytes += symlink_bytes(cm.size(), bs);
        }
    }
    let mut dir_blocks = dirent_bytes.div_ceil(bs).max(1);
    if dir_blocks > 1 {
        // Hashed directories carry index blocks.
        dir_blocks += dir_blocks.div_ceil(500).max(1);
    }
    survey.usage.bytes += dir_blocks * bs;
    Ok(())
}

/// The extents a sparse file needs at least: one per data region, and one per
/// [`EXTENT_BLOCKS`] within a region (counted with `SEEK_DATA`/`SEEK_HOLE`, at most one
/// step per allocated block, so a hostile map cannot make this loop long).
fn data_regions(path: &Path, blocks: u64) -> Result<u64, OciError> {
    use nix::unistd::{lseek, Whence};
    let file = fs::File::open(path).map_err(|e| OciError::io("measuring", path, e))?;
    let mut extents = 0u64;
    let mut at: i64 = 0;
    for _ in 0..=blocks {
        let start = match lseek(&file, at, Whence::SeekData) {
            Ok(start) => start,
            // ENXIO: no data past `at`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(OciError::io("measuring", path, e.into())),
        };
        let end = lseek(&file, start, Whence::SeekHole)
            .map_err(|e| OciError::io("measuring", path, e.into()))?;
        let len = u64::try_from(end - start).unwrap_or(0);
        extents += len.div_ceil(4096).div_ceil(EXTENT_BLOCKS).max(1);
        at = end;
    }
    Ok(extents)
}

/// Data bytes of a symlink with a target of `len` bytes.
fn symlink_bytes(len: u64, bs: u64) -> u64 {
    if len > FAST_SYMLINK_MAX {
        bs
    } else {
        0
    }
}

/// A block for xattrs that do not fit in the inode.
fn xattr_blocks(path: &Path, bs: u64) -> u64 {
    let Ok(names) = list_xattrs(path) else {
        return 0;
    };
    let mut total = 0u64;
    for name in names {
        let mut buf = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(path, name.as_os_str(), &mut buf).unwrap_or(0) as u64;
        total += (16 + name.len() as u64).div_ceil(4) * 4 + len.div_ceil(4) * 4;
    }
    if total > INLINE_XATTR_SPACE {
        total.div_ceil(bs) * bs
    } else {
        0
    }
}

/// The journal size (MiB) for a file system of `bytes`, as mke2fs would pick it.
fn journal_mib(bytes: u64) -> u64 {
    match bytes {
        b if b < 128 * MIB => 4,
        b if b < 1024 * MIB => 16,
        b if b < 2048 * MIB => 32,
        _ => 64,
    }
}

/// Size and inode count for content of `usage`.
pub fn plan(usage: TreeUsage, options: &Ext4Options) -> (u64, u64) {
    let pct = options.headroom_percent;
    let headroom_bytes = usage.bytes * pct / 100 + options.headroom_bytes;
    // Content inodes plus headroom, and one inode per 16 KiB of free space (mke2fs's
    // default ratio) for what the sandbox creates; inodes 1 to 10 are reserved, 11 is
    // lost+found, and a few spare keep a zero-headroom image usable.
    let inodes = usage.inodes + usage.inodes * pct / 100 + headroom_bytes / 16384 + 11 + 32;
    let metadata = inodes * INODE_SIZE;
    let mut size = usage.bytes + metadata + headroom_bytes;
    // Bitmaps, group descriptors, reserved GDT blocks, superblock copies.
    size += size / 50 + 4 * MIB;
    if options.journal {
        size += journal_mib(size) * MIB;
    }
    let size = size.max(options.min_size_bytes).div_ceil(MIB) * MIB;
    (size, inodes)
}

/// Builds an ext4 image of `staging` at `out` (replacing it), sized by [`plan`].
///
/// Blocking (it runs mkfs): call it from a blocking thread, or use [`build_ext4_async`].
pub fn build_ext4(
    staging: &Path,
    out: &Path,
    options: &Ext4Options,
) -> Result<Ext4Image, OciError> {
    let Survey {
        usage,
        symlink_links,
        transient,
    } = survey(staging, options.block_size)?;
    let needed = TreeUsage {
        bytes: usage.bytes + transient.bytes,
        inodes: usage.inodes + transient.inodes,
    };
    let (size, inodes) = plan(needed, options);
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| OciError::io("creating the image file", dir, e))?;
    tmp.as_file()
        .set_len(size)
        .map_err(|e| OciError::io("sizing the image file", tmp.path(), e))?;

    let mut cmd = Command::new(&options.mkfs);
    cmd.args(["-q", "-F", "-t", "ext4", "-T", "default", "-m", "0"])
        .arg("-b")
        .arg(options.block_size.to_string())
        .arg("-I")
        .arg(INODE_SIZE.to_string())
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-L")
        .arg(&options.label)
        // The file was just created sparse: all zeros, nothing to zero again.
        .args(["-E", "root_owner=0:0,assume_storage_prezeroed=1"]);
    if options.journal {
        cmd.arg("-J").arg(format!("size={}", journal_mib(size)));
    } else {
        cmd.args(["-O", "^has_journal"]);
    }
    cmd.arg("-d").arg(staging).arg(tmp.path());
    let output = cmd
        .output()
        .map_err(|e| OciError::io("running mkfs.ext4", &options.mkfs, e))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(OciError::Tool {
            tool: "mkfs.ext4",
            stderr: format!("{} ({})", tail.join("; "), output.status),
        });
    }
    link_symlinks(tmp.path(), &symlink_links, &options.mkfs)?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| OciError::io("syncing the image", tmp.path(), e))?;
    tmp.persist(out)
        .map_err(|e| OciError::io("renaming the image into place", out, e.error))?;
    tracing::debug!(path = %out.display(), size, inodes, content = usage.bytes, "built ext4 image");
    Ok(Ext4Image {
        path: out.to_owned(),
        size_bytes: size,
        inodes,
        usage,
    })
}

/// Joins the names of each hardlinked symlink, which `mkfs.ext4 -d` made separate inodes,
/// into the inode of the first name: the others are removed (freeing their inodes and
/// blocks) and linked again to it, and its link count is set.
fn link_symlinks(
    image: &Path,
    groups: &HashMap<(u64, u64), Vec<PathBuf>>,
    mkfs: &Path,
) -> Result<(), OciError> {
    let mut script = Vec::new();
    let mut groups: Vec<&Vec<PathBuf>> = groups.values().filter(|g| g.len() > 1).collect();
    if groups.is_empty() {
        return Ok(());
    }
    groups.sort();
    for names in groups {
        let Some(quoted) = names
            .iter()
            .map(|n| debugfs_quote(n))
            .collect::<Option<Vec<Vec<u8>>>>()
        else {
            // debugfs reads one command a line: such a name cannot be given to it.
            tracing::warn!(names = ?names, "a hardlinked symlink with a line break in a name stays one inode per name");
            continue;
        };
        let [first, rest @ ..] = &quoted[..] else {
            continue;
        };
        for other in rest {
            for part in [&b"rm "[..], other, b"\nln ", first, b" ", other, b"\n"] {
                script.extend_from_slice(part);
            }
        }
        for part in [&b"sif "[..], first, b" links_count "] {
            script.extend_from_slice(part);
        }
        script.extend_from_slice(format!("{}\n", names.len()).as_bytes());
    }
    if script.is_empty() {
        return Ok(());
    }
    // debugfs comes with mkfs.ext4 (e2fsprogs): look for it beside it.
    let debugfs = match mkfs.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => dir.join("debugfs"),
        None => PathBuf::from("debugfs"),
    };
    let mut cmds = tempfile::NamedTempFile::new()
        .map_err(|e| OciError::io("writing a debugfs script", image, e))?;
    io::Write::write_all(&mut cmds, &script)
        .map_err(|e| OciError::io("writing a debugfs script", cmds.path(), e))?;
    let output = Command::new(&debugfs)
        .arg("-w")
        .arg("-f")
        .arg(cmds.path())
        .arg(image)
        .output()
        .map_err(|e| OciError::io("running debugfs", &debugfs, e))?;
    // debugfs reports a failed command on stderr only (its status stays 0); the banner
    // is its one expected line there.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .take(5)
        .collect();
    if !output.status.success() || !errors.is_empty() {
        return Err(OciError::Tool {
            tool: "debugfs",
            stderr: format!("{} ({})", errors.join("; "), output.status),
        });
    }
    Ok(())
}

/// A path as one debugfs argument: absolute, in double quotes (a quote doubled), or `None`
/// for a name debugfs cannot read (a line break ends its command).
fn debugfs_quote(rel: &Path) -> Option<Vec<u8>> {
    let bytes = rel.as_os_str().as_bytes();
    if bytes.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        return None;
    }
    // Bytes, not text: debugfs passes them through, so a non-UTF-8 name stays exact.
    let mut out = Vec::with_capacity(bytes.len() + 4);
    out.extend_from_slice(b"\"/");
    for &b in bytes {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
    Some(out)
}

/// [`inject`] then [`build_ext4`], on a blocking thread.
pub async fn build_rootfs(
    staging: PathBuf,
    init: PathBuf,
    config: ImageConfig,
    out: PathBuf,
    options: Ext4Options,
) -> Result<Ext4Image, OciError> {
    let path = out.clone();
    tokio::task::spawn_blocking(move || {
        inject(&staging, &init, &config)?;
        build_ext4(&staging, &out, &options)
    })
    .await
    .map_err(|e| OciError::io("the ext4 build task failed", path, io::Error::other(e)))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_adds_headroom_and_respects_the_minimum() {
        let opts = Ext4Options::default();
        let (size, inodes) = plan(TreeUsage::default(), &opts);
        assert!(size >= opts.min_size_bytes);
        assert!(inodes > 0);
        let usage = TreeUsage {
            bytes: 1000 * MIB,
            inodes: 20_000,
        };
        let (size, inodes) = plan(usage, &opts);
        assert!(size >= 1000 * MIB * 120 / 100 + 64 * MIB, "{size}");
        assert!(inodes >= 24_000);
        assert_eq!(size % MIB, 0);
        let bare = Ext4Options {
            headroom_percent: 0,
            headroom_bytes: 0,
            min_size_bytes: 0,
            ..opts
        };
        assert!(plan(usage, &bare).0 < size);
    }

    #[test]
    fn journal_sizes() {
        assert_eq!(journal_mib(100 * MIB), 4);
        assert_eq!(journal_mib(600 * MIB), 16);
        assert_eq!(journal_mib(10 << 30), 64);
    }
}
