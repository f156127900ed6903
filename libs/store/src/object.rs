//! The object store seam: what every implementation offers.

use std::path::Path;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::{ObjectKey, StoreError};

/// The largest ranged read, in bytes: a ranged read returns memory, so large transfers go
/// through [`ObjectStore::get_file`] instead.
pub const MAX_RANGE_LEN: u64 = 64 << 20;

/// What a store knows about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: ObjectKey,
    pub size: u64,
    /// The store's entity tag, if it has one (S3; opaque, quotes removed).
    pub etag: Option<String>,
    /// Lower-case hex sha256 of the content, when the store recorded it at upload.
    pub sha256: Option<String>,
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSummary {
    pub key: ObjectKey,
    pub size: u64,
}

/// A flat key -> bytes store. Objects are written whole and atomically: a reader sees the
/// old content or the new one, never a mixture or a partial write. Large objects move
/// between local files and the store streamed, never whole in memory.
///
/// Futures are boxed (like `nanobox_vmm::VmBackend`) so that the trait stays object safe
/// and services can hold an `Arc<dyn ObjectStore>` chosen at run time.
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Uploads the content of the local file `path` under `key`, replacing any object
    /// there. Returns what the store recorded, including the content's sha256.
    fn put_file<'a>(
        &'a self,
        key: &'a ObjectKey,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<ObjectMeta, StoreError>>;

    /// Stores `data` under `key`, replacing any object there.
    fn put_bytes<'a>(
        &'a self,
        key: &'a ObjectKey,
        data: Bytes,
    ) -> BoxFuture<'a, Result<ObjectMeta, StoreError>>;

    /// Downloads the object into the local file `dest`. The content is written to a
    /// temporary file beside `dest` and renamed over it only when complete (and, if the
    /// store recorded a sha256 at upload, verified), so `dest` is never half-written.
    /// The returned meta carries the sha256 of what was written.
    fn get_file<'a>(
        &'a self,
        key: &'a ObjectKey,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<ObjectMeta, StoreError>>;

    /// Reads `len` bytes starting at `offset`. The whole range must lie inside the object
    /// ([`StoreError::RangeOutOfBounds`] otherwise) and `len` must not exceed
    /// [`MAX_RANGE_LEN`].
    fn get_range<'a>(
        &'a self,
        key: &'a ObjectKey,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>>;

    /// The object's size and digests, or [`StoreError::NotFound`].
    fn head<'a>(&'a self, key: &'a ObjectKey) -> BoxFuture<'a, Result<ObjectMeta, StoreError>>;

    /// Removes the object. Removing an absent object succeeds.
    fn delete<'a>(&'a self, key: &'a ObjectKey) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Every object whose key starts with `prefix` (a plain string prefix, as in S3),
    /// sorted by key. Paging against the backend happens inside.
    fn list<'a>(&'a self, prefix: &'a str)
        -> BoxFuture<'a, Result<Vec<ObjectSummary>, StoreError>>;
}

/// Checks a ranged-read request against the object size and the size cap.
pub(crate) fn check_range(
    key: &ObjectKey,
    offset: u64,
    len: u64,
    size: u64,
) -> Result<(), StoreError> {
    if len > MAX_RANGE_LEN {
        return Err(StoreError::RangeTooLarge {
            len,
            max: MAX_RANGE_LEN,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StoreError::RangeOutOfBounds {
            key: key.to_string(),
            offset,
            len,
            size,
        }),
    }
}
