//! Storage on a NanoBox node, for the node agent: the local cache of template root
//! filesystems fetched from the object store ([`TemplateCache`]), and the per-sandbox
//! copy-on-write root disks cloned from them ([`clone_rootfs`]).
//!
//! The flow for one sandbox: [`TemplateCache::acquire`] the template's ext4 key (fetched
//! and verified on first use, a local hit afterwards), [`clone_rootfs`] its path into the
//! sandbox's directory, boot the VM from the clone with the clone's
//! [`CowClone::format`], and drop the [`CachedTemplate`] hold when the sandbox is gone.

mod cache;
mod cow;
mod error;
mod tool;

pub use cache::{CacheEntry, CacheOptions, CacheUsage, CachedTemplate, TemplateCache};
pub use cow::{
    clone_rootfs, clone_rootfs_async, clone_rootfs_with, measure_cow, sparse_copy_file,
    CloneOptions, CowClone, CowMethod, CowPreference, CowTiming,
};
pub use error::{CacheError, CowError};
