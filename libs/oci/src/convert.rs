//! One call from a resolved image to a finished ext4 template: the warm-up pipeline
//! without the pull.
//!
//! The CLI and the template-builder service both need "layers applied, init and config
//! injected, ext4 built, scratch space cleaned up", with progress reported as it goes;
//! this module is that sequence, so the two cannot drift apart.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::compression::Compression;
use crate::error::OciError;
use crate::image::{OciLayout, ResolvedImage};
use crate::layer::{ApplyOptions, LayerApplier};
use crate::rootfs::{build_ext4, inject, Ext4Image, Ext4Options};

/// Options for [`convert`].
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// How layers are applied (limits, symlinked parents, ownership).
    pub apply: ApplyOptions,
    /// How the ext4 image is sized and made.
    pub ext4: Ext4Options,
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
/// The staging tree is a private temporary directory beside `out`, removed on return
/// (success or failure).
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
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Beside the output: the same file system (so space is accounted where the image
    // goes) and private to this conversion.
    let staging = tempfile::Builder::new()
        .prefix(".nanobox-staging-")
        .tempdir_in(dir)
        .map_err(|e| OciError::io("creating a staging directory", dir, e))?;
    let root = staging.path().join("rootfs");
    std::fs::create_dir(&root).map_err(|e| OciError::io("creating the staging root", &root, e))?;

    let mut applier = LayerApplier::new(&root, options.apply)?;
    let total = image.manifest.layers.len();
    for (n, layer) in image.manifest.layers.iter().enumerate() {
        let compression = Compression::from_media_type(&layer.media_type)?;
        let blob = layout.open_blob(layer)?;
        let verdict = blob.verdict();
        let result = applier.apply(blob, compression);
        // A digest or size mismatch is the real cause of whatever the stream did.
        if let Some(err) = verdict.lock().ok().and_then(|mut v| v.take()) {
            return Err(err);
        }
        result?;
        on_event(ConvertEvent::LayerApplied { done: n + 1, total });
    }

    on_event(ConvertEvent::Building);
    inject(&root, init, &image.config)?;
    let built = build_ext4(&root, out, &options.ext4)?;
    // The image is in place: a staging tree that cannot be removed is worth a warning,
    // not a failed conversion.
    let staging_path = staging.path().to_owned();
    if let Err(e) = staging.close() {
        tracing::warn!(path = %staging_path.display(), error = %e, "removing the staging directory failed");
    }
    Ok(built)
}
