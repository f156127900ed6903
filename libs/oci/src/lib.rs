//! OCI images into NanoBox root file systems.
//!
//! An image's layers are applied in order into a private staging directory
//! ([`LayerApplier`]), exactly as `umoci unpack` would and without ever writing outside
//! it or past the budgets of [`Limits`], whatever the layers contain; the staging tree then becomes an auto-sized ext4
//! image with the guest init and the image config injected ([`rootfs`]). Images on disk
//! in the OCI layout are read, with every blob verified (and every layer's uncompressed
//! tar checked against the config's `rootfs.diff_ids`), by [`OciLayout`]; images in
//! registries are pulled into such a layout by [`RegistryClient`].

#![forbid(unsafe_code)]

pub mod archive;
mod compression;
mod convert;
mod diff_id;
mod error;
pub mod image;
pub mod layer;
mod mounts;
pub mod registry;
pub mod rootfs;
mod staging;
mod tar_reader;

pub use archive::{import_docker_archive, import_docker_archive_with, ArchiveOptions};
pub use compression::Compression;
pub use convert::{convert, ConvertEvent, ConvertOptions, Staged, Staging};
pub use error::{LimitKind, OciError};
pub use image::{Descriptor, Manifest, OciLayout, Platform, ResolvedImage, VerifiedBlob};
pub use layer::{ApplyOptions, LayerApplier, LayerStats, Limits};
pub use registry::{
    Credentials, DockerConfig, NoProgress, PullProgress, PullReport, PulledImage, Reference,
    RegistryClient, RegistryError, RegistryOptions, RemoteImage,
};
pub use rootfs::{build_ext4, build_rootfs, inject, Ext4Image, Ext4Options, TreeUsage};
