//! One call from a resolved image to a finished ext4 template: the warm-up pipeline
//! without the pull.
//!
//! The CLI and the template-builder service both need "layers applied, init and config
//! injected, ext4 built, scratch space cleaned up", with progress reported as it goes;
//! this module is that sequence, so the two cannot drift apart.
//!
//! Every layer is verified as it is applied (blob digest and size, and the diff_id of
//! its decompressed tar against the image config), so an image whose config does not
//! describe its layers fails before any ext4 exists.
//!
//! The staging tree is scratch space that `mkfs.ext4 -d` copies and that is deleted
//! right after, so by default it lives in memory (a tmpfs) when the image fits there
//! comfortably: creating and deleting thousands of files on a disk file system costs
//! more than decompressing them, and the tree never needs to survive the call.
//!
//! An image too big for memory is staged **hybrid**: the tree (directories, links,
//! metadata, small files) still in memory, the data of every file of 256 KiB or more in a
//! file of its own on the disk beside the output, with an empty placeholder in the tree.
//! mkfs then reads the tree in a private mount namespace of its own where each spill
//! file is bind-mounted over its placeholder, so it sees one tree and copies it as
//! usual (hardlinks, owners, xattrs and holes included), while the disk saw a few
//! hundred file creations instead of thousands. That needs the right to make a mount
//! namespace (CAP_SYS_ADMIN, as the builder has when run as root outside a container);
//! without it, or when the tree outgrows its memory budget after all, the tree goes on
//! the disk whole, as before. An in-memory attempt that runs out of memory is converted
//! again the same way.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::OciError;
use crate::image::{OciLayout, ResolvedImage};
use crate::layer::{ApplyOptions, LayerApplier, Spill};
use crate::mounts;
use crate::rootfs::{build_ext4, inject, Ext4Image, Ext4Options};

/// The tmpfs every Linux system has.
const SHM: &str = "/dev/shm";
/// Decompressed bytes assumed per compressed layer byte when judging whether an image
/// fits in memory (gzip'd root file systems expand 2-4 times; the slack covers the rest).
const EXPANSION_ESTIMATE: u64 = 6;
/// Only this fraction of the available memory may hold a staging tree.
const MEMORY_SHARE_DIVISOR: u64 = 4;
/// Hybrid staging: files of at least this size go to the disk.
const SPILL_MIN_BYTES: u64 = 256 << 10;
/// Hybrid staging: at most this many spill files (each is a mount in mkfs's namespace,
/// and Linux allows 100,000 mounts per namespace).
const SPILL_MAX_FILES: usize = 50_000;
/// Hybrid staging: the small files kept in memory, at most this share of the available
/// memory, and within these bounds.
const SPILL_TREE_DIVISOR: u64 = 8;
const SPILL_TREE_MIN: u64 = 32 << 20;
const SPILL_TREE_MAX: u64 = 1 << 30;

/// Options for [`convert`].
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// How layers are applied (limits, symlinked parents, ownership).
    pub apply: ApplyOptions,
    /// How the ext4 image is sized and made.
    pub ext4: Ext4Options,
    /// Where the staging tree lives.
    pub staging: Staging,
}

/// Where [`convert`] keeps its staging tree (always a fresh private directory, removed
/// on return).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Staging {
    /// In /dev/shm (memory) when it is a tmpfs with room for several times the image's
    /// compressed size and that stays under a quarter of the available memory; else as
    /// [`Staging::BesideOutput`]. If the memory runs out anyway, the conversion starts
    /// over as [`Staging::BesideOutput`].
    #[default]
    Auto,
    /// File data beside the output (on the same file system): hybrid when this process
    /// may make a mount namespace (the tree in memory, large files' data on disk; see the
    /// module doc), else, or if the hybrid tree outgrows its memory budget, the whole
    /// tree on disk.
    BesideOutput,
    /// Under this directory (no fallback).
    In(PathBuf),
}

/// Progress of a conversion, reported as it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvertEvent {
    /// `done` of `total` layers are applied.
    LayerApplied {
        /// Layers applied so far.
        done: usize,
        /// Layers in the image.
        total: usize,
    },
    /// Every layer is applied; the init is being injected and the ext4 image built.
    Building {
        /// Where the staging tree ended up.
        staging: Staged,
    },
}

/// Where a conversion's staging tree was (see [`Staging`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staged {
    /// Wholly in memory (a tmpfs).
    Memory,
    /// Hybrid: the tree in memory, the data of `spilled_files` large files on disk.
    Hybrid {
        /// Files whose data went to the disk.
        spilled_files: usize,
    },
    /// Wholly on a disk file system (or in the directory [`Staging::In`] named).
    Disk,
}

/// Converts a resolved image into a finished ext4 at `out` (replaced atomically), with
/// `init` injected as /sbin/nanobox-init and the image config as /etc/nanobox/image.json.
/// The staging tree is a private temporary directory (in memory or beside `out`, see
/// [`Staging`]), removed on return (success or failure).
///
/// `on_event` is called from a blocking thread, in order, as the conversion advances.
pub async fn convert(
    layout: OciLayout,
    image: ResolvedImage,
    init: PathBuf,
    out: PathBuf,
    options: ConvertOptions,
    on_event: Arc<dyn Fn(ConvertEvent) + Send + Sync>,
) -> Result<Ext4Image, OciError> {
    let path = out.clone();
    // All the work, the staging directory's removal included, happens on one blocking
    // thread that owns the directory: if the caller's future is dropped, the thread still
    // finishes and cleans up instead of racing a removal against running writes.
    tokio::task::spawn_blocking(move || {
        convert_blocking(&layout, &image, &init, &out, &options, &*on_event)
    })
    .await
    .map_err(|e| OciError::io("the conversion task failed", path, io::Error::other(e)))?
}

fn convert_blocking(
    layout: &OciLayout,
    image: &ResolvedImage,
    init: &Path,
    out: &Path,
    options: &ConvertOptions,
    on_event: &(dyn Fn(ConvertEvent) + Send + Sync),
) -> Result<Ext4Image, OciError> {
    let beside = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Layers a first attempt already reported are not reported again by a second one.
    let reported = AtomicUsize::new(0);
    let report = |event: ConvertEvent| {
        if let ConvertEvent::LayerApplied { done, .. } = event {
            if reported.fetch_max(done, Ordering::Relaxed) >= done {
                return;
            }
        }
        on_event(event);
    };
    // One attempt with the tree under `dir` and large files' data under `spill`.
    let try_in = |dir: &Path, spill: Option<&Path>| {
        attempt(layout, image, init, out, options, dir, spill, &report)
    };
    let on_disk = || {
        if !hybrid_possible() {
            return try_in(beside, None);
        }
        match try_in(Path::new(SHM), Some(beside)) {
            Err(err) if out_of_room(&err) => {
                tracing::info!(error = %err, "the hybrid staging tree outgrew its budget; converting again with the tree on disk");
                try_in(beside, None)
            }
            other => other,
        }
    };
    match &options.staging {
        Staging::BesideOutput => on_disk(),
        Staging::In(dir) => try_in(dir, None),
        Staging::Auto => {
            let compressed: u64 = image.manifest.layers.iter().map(|l| l.size).sum();
            if !fits_in_memory(Path::new(SHM), compressed) {
                return on_disk();
            }
            match try_in(Path::new(SHM), None) {
                Err(err) if out_of_room(&err) => {
                    tracing::info!(error = %err, "the staging tree outgrew memory; converting again on disk");
                    on_disk()
                }
                other => other,
            }
        }
    }
}

/// One conversion with the staging tree under `dir`, and large files' data under
/// `spill_in` (hybrid staging) when given.
#[allow(clippy::too_many_arguments)]
fn attempt(
    layout: &OciLayout,
    image: &ResolvedImage,
    init: &Path,
    out: &Path,
    options: &ConvertOptions,
    dir: &Path,
    spill_in: Option<&Path>,
    on_event: &dyn Fn(ConvertEvent),
) -> Result<Ext4Image, OciError> {
    let staging = tempfile::Builder::new()
        .prefix(".nanobox-staging-")
        .tempdir_in(dir)
        .map_err(|e| OciError::io("creating a staging directory", dir, e))?;
    let spill_dir = match spill_in {
        Some(place) => Some(
            tempfile::Builder::new()
                .prefix(".nanobox-spill-")
                .tempdir_in(place)
                .map_err(|e| OciError::io("creating a spill directory", place, e))?,
        ),
        None => None,
    };
    let spill = spill_dir.as_ref().map(|d| {
        let budget = (mem_available() / SPILL_TREE_DIVISOR).clamp(SPILL_TREE_MIN, SPILL_TREE_MAX);
        Spill::new(
            d.path().to_owned(),
            SPILL_MIN_BYTES,
            SPILL_MAX_FILES,
            budget,
        )
    });
    let root = staging.path().join("rootfs");
    let result = stage_and_build(layout, image, init, out, options, &root, spill, on_event);
    // The image is in place (or the error is the news): a staging tree that cannot be
    // removed is worth a warning, not a failed conversion.
    for dir in std::iter::once(staging).chain(spill_dir) {
        let path = dir.path().to_owned();
        if let Err(e) = dir.close() {
            tracing::warn!(path = %path.display(), error = %e, "removing a staging directory failed");
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn stage_and_build(
    layout: &OciLayout,
    image: &ResolvedImage,
    init: &Path,
    out: &Path,
    options: &ConvertOptions,
    root: &Path,
    spill: Option<Spill>,
    on_event: &dyn Fn(ConvertEvent),
) -> Result<Ext4Image, OciError> {
    std::fs::create_dir(root).map_err(|e| OciError::io("creating the staging root", root, e))?;
    let mut applier = match spill {
        Some(spill) => LayerApplier::with_spill(root, options.apply, spill)?,
        None => LayerApplier::new(root, options.apply)?,
    };
    let total = image.manifest.layers.len();
    for n in 0..total {
        // Blob digest and size, and the diff_id of the decompressed tar, are checked as
        // the layer streams; a mismatch fails here, before anything is built, and the
        // caller removes the staging tree (`out` is only ever replaced by a finished
        // image).
        layout.apply_layer(image, n, &mut applier)?;
        on_event(ConvertEvent::LayerApplied { done: n + 1, total });
    }
    let staging = match applier.spilled() {
        Some(spilled) => Staged::Hybrid {
            spilled_files: spilled.len(),
        },
        None if in_memory(root) => Staged::Memory,
        None => Staged::Disk,
    };
    on_event(ConvertEvent::Building { staging });
    inject(root, init, &image.config)?;
    match applier.spilled() {
        Some(spilled) if !spilled.is_empty() => {
            let binds = placeholders(root, spilled)?;
            link_shared(&binds)?;
            mounts::with_binds(&binds, || build_ext4(root, out, &options.ext4))
        }
        _ => build_ext4(root, out, &options.ext4),
    }
}

/// The (placeholder, spill file) pairs of the finished tree: every name of every
/// placeholder still in it. tmpfs never reuses an inode number within a mount's life,
/// so a placeholder's (device, inode) names it alone; a placeholder is always an empty
/// regular file, which is checked too.
fn placeholders(
    root: &Path,
    spilled: &HashMap<(u64, u64), PathBuf>,
) -> Result<Vec<(PathBuf, PathBuf)>, OciError> {
    let mut binds = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        let listing = std::fs::read_dir(&dir).map_err(|e| OciError::io("listing", &dir, e))?;
        for child in listing {
            let child = child.map_err(|e| OciError::io("listing", &dir, e))?;
            let path = child.path();
            let meta =
                std::fs::symlink_metadata(&path).map_err(|e| OciError::io("lstat", &path, e))?;
            if meta.is_dir() {
                dirs.push(path);
            } else if meta.is_file() && meta.len() == 0 {
                if let Some(spill) = spilled.get(&(meta.dev(), meta.ino())) {
                    binds.push((path, spill.clone()));
                }
            }
        }
    }
    Ok(binds)
}

/// Gives every spill file bound under more than one name a second name of its own in
/// the spill directory: mkfs looks for the other names of a file only when its link
/// count is above one, and a spill file otherwise has one name, however many
/// placeholders it stands for (mkfs counts the names it links, not `st_nlink`).
fn link_shared(binds: &[(PathBuf, PathBuf)]) -> Result<(), OciError> {
    let mut names: HashMap<&Path, usize> = HashMap::new();
    for (_, spill) in binds {
        *names.entry(spill.as_path()).or_default() += 1;
    }
    for (spill, count) in names {
        if count > 1 {
            let mut other = spill.as_os_str().to_owned();
            other.push(".link");
            std::fs::hard_link(spill, &other)
                .map_err(|e| OciError::io("linking a shared spill file", spill, e))?;
        }
    }
    Ok(())
}

/// Whether `dir` is on a tmpfs.
fn in_memory(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Whether hybrid staging can work here: a tmpfs for the tree, and the right to make a
/// private mount namespace with bind mounts (probed once).
fn hybrid_possible() -> bool {
    static POSSIBLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *POSSIBLE.get_or_init(|| {
        let possible = in_memory(Path::new(SHM)) && mounts::probe();
        tracing::debug!(
            possible,
            "hybrid staging (tree in memory, large files on disk)"
        );
        possible
    })
}

/// Whether a staging tree for `compressed` bytes of layers fits in the tmpfs at `dir`.
fn fits_in_memory(dir: &Path, compressed: u64) -> bool {
    let is_tmpfs = nix::sys::statfs::statfs(dir)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    let Ok(vfs) = nix::sys::statvfs::statvfs(dir) else {
        return false;
    };
    let free = vfs.blocks_available().saturating_mul(vfs.fragment_size());
    let need = compressed.saturating_mul(EXPANSION_ESTIMATE);
    is_tmpfs && free >= need && mem_available() / MEMORY_SHARE_DIVISOR >= need
}

/// `MemAvailable` from /proc/meminfo, in bytes (0 when unknown).
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib.saturating_mul(1024))
}

/// Whether `err` means the staging file system ran out of room (or of a feature a disk
/// file system has), so the conversion may succeed with the staging tree on disk.
fn out_of_room(err: &OciError) -> bool {
    let source = match err {
        OciError::Apply { source, .. } | OciError::Io { source, .. } => source,
        // mkfs reads the tree; inject writes two files.
        OciError::Tool { stderr, .. } => return stderr.contains("No space left"),
        _ => return false,
    };
    matches!(
        source.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::OutOfMemory
    ) || source.raw_os_error() == Some(nix::libc::EOPNOTSUPP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_memory_is_retried_on_disk_but_bad_input_is_not() {
        let full = OciError::Apply {
            entry: "big".to_owned(),
            op: "writing a file",
            source: io::Error::from_raw_os_error(nix::libc::ENOSPC),
        };
        assert!(out_of_room(&full));
        let unsupported = OciError::Apply {
            entry: "x".to_owned(),
            op: "setting an xattr",
            source: io::Error::from_raw_os_error(nix::libc::EOPNOTSUPP),
        };
        assert!(out_of_room(&unsupported));
        let hostile = OciError::UnsafePath {
            entry: "../x".to_owned(),
            reason: "leaves the root",
        };
        assert!(!out_of_room(&hostile));
        let denied = OciError::Apply {
            entry: "x".to_owned(),
            op: "chown",
            source: io::Error::from_raw_os_error(nix::libc::EPERM),
        };
        assert!(!out_of_room(&denied));
    }

    #[test]
    fn only_a_tmpfs_with_room_holds_staging_trees() {
        // The current directory (a build tree) is no tmpfs.
        assert!(!fits_in_memory(Path::new("."), 1));
        assert!(!fits_in_memory(Path::new(SHM), u64::MAX / 2));
    }
}
