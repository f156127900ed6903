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
//! more than decompressing them, and the tree never needs to survive the call. An image
//! that outgrows the memory after all is converted again with the staging tree beside
//! the output.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::OciError;
use crate::image::{OciLayout, ResolvedImage};
use crate::layer::{ApplyOptions, LayerApplier};
use crate::rootfs::{build_ext4, inject, Ext4Image, Ext4Options};

/// The tmpfs every Linux system has.
const SHM: &str = "/dev/shm";
/// Decompressed bytes assumed per compressed layer byte when judging whether an image
/// fits in memory (gzip'd root file systems expand 2-4 times; the slack covers the rest).
const EXPANSION_ESTIMATE: u64 = 6;
/// Only this fraction of the available memory may hold a staging tree.
const MEMORY_SHARE_DIVISOR: u64 = 4;

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
    /// compressed size and that stays under a quarter of the available memory; else
    /// beside the output. If the memory runs out anyway, the conversion starts over
    /// beside the output.
    #[default]
    Auto,
    /// Beside the output (on the same file system).
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
    Building,
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
    match &options.staging {
        Staging::BesideOutput => attempt(layout, image, init, out, options, beside, &report),
        Staging::In(dir) => attempt(layout, image, init, out, options, dir, &report),
        Staging::Auto => {
            let compressed: u64 = image.manifest.layers.iter().map(|l| l.size).sum();
            if !fits_in_memory(Path::new(SHM), compressed) {
                return attempt(layout, image, init, out, options, beside, &report);
            }
            match attempt(layout, image, init, out, options, Path::new(SHM), &report) {
                Err(err) if out_of_room(&err) => {
                    tracing::info!(error = %err, "the staging tree outgrew memory; converting again on disk");
                    attempt(layout, image, init, out, options, beside, &report)
                }
                other => other,
            }
        }
    }
}

/// One conversion with the staging tree under `dir`.
fn attempt(
    layout: &OciLayout,
    image: &ResolvedImage,
    init: &Path,
    out: &Path,
    options: &ConvertOptions,
    dir: &Path,
    on_event: &dyn Fn(ConvertEvent),
) -> Result<Ext4Image, OciError> {
    let staging = tempfile::Builder::new()
        .prefix(".nanobox-staging-")
        .tempdir_in(dir)
        .map_err(|e| OciError::io("creating a staging directory", dir, e))?;
    let root = staging.path().join("rootfs");
    let result = stage_and_build(layout, image, init, out, options, &root, on_event);
    // The image is in place (or the error is the news): a staging tree that cannot be
    // removed is worth a warning, not a failed conversion.
    let staging_path = staging.path().to_owned();
    if let Err(e) = staging.close() {
        tracing::warn!(path = %staging_path.display(), error = %e, "removing the staging directory failed");
    }
    result
}

fn stage_and_build(
    layout: &OciLayout,
    image: &ResolvedImage,
    init: &Path,
    out: &Path,
    options: &ConvertOptions,
    root: &Path,
    on_event: &dyn Fn(ConvertEvent),
) -> Result<Ext4Image, OciError> {
    std::fs::create_dir(root).map_err(|e| OciError::io("creating the staging root", root, e))?;
    let mut applier = LayerApplier::new(root, options.apply)?;
    let total = image.manifest.layers.len();
    for n in 0..total {
        // Blob digest and size, and the diff_id of the decompressed tar, are checked as
        // the layer streams; a mismatch fails here, before anything is built, and the
        // caller removes the staging tree (`out` is only ever replaced by a finished
        // image).
        layout.apply_layer(image, n, &mut applier)?;
        on_event(ConvertEvent::LayerApplied { done: n + 1, total });
    }
    on_event(ConvertEvent::Building);
    inject(root, init, &image.config)?;
    build_ext4(root, out, &options.ext4)
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
