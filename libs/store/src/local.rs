//! The local file-system object store: the embedded default for single-machine setups
//! and the reference the S3 store is compared against.
//!
//! Layout under the root: `objects/` holds the objects, `tmp/` the writes in progress.
//! A key's segments become path components with a suffix, `.d` for a directory and `.o`
//! for the object itself, so that `a` (`objects/a.o`) and `a/b` (`objects/a.d/b.o`) can
//! coexist as they do in S3. Keys are validated ([`ObjectKey`]) before they reach a path:
//! no `..`, no empty or absolute segment, so a key never names anything outside the root.
//! Writes go to `tmp/` and are renamed into place after an fsync, so readers see whole
//! objects only. Empty directories left by deletes are kept (removing them would race
//! with concurrent writers); they hold no objects and listings skip them.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt as _;
use sha2::{Digest as _, Sha256};

use crate::digest::{temp_beside, COPY_BUF};
use crate::key::check_prefix;
use crate::object::check_range;
use crate::{ObjectKey, ObjectMeta, ObjectStore, ObjectSummary, StoreError};

const DIR_SUFFIX: &str = ".d";
const OBJECT_SUFFIX: &str = ".o";

/// An [`ObjectStore`] in a local directory.
#[derive(Debug, Clone)]
pub struct LocalFsStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    objects: PathBuf,
    tmp: PathBuf,
}

impl LocalFsStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let objects = root.join("objects");
        let tmp = root.join("tmp");
        for dir in [&objects, &tmp] {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
        }
        // Writes interrupted by a crash leave files in tmp/; nothing refers to them.
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            inner: Arc::new(Inner { objects, tmp }),
        })
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let inner = Arc::clone(&self.inner);
        async move {
            tokio::task::spawn_blocking(move || f(&inner))
                .await
                .map_err(|e| StoreError::io("local store task", std::io::Error::other(e)))?
        }
        .boxed()
    }
}

impl Inner {
    fn object_path(&self, key: &ObjectKey) -> PathBuf {
        let mut path = self.objects.clone();
        let mut segments = key.segments().peekable();
        while let Some(segment) = segments.next() {
            let suffix = if segments.peek().is_some() {
                DIR_SUFFIX
            } else {
                OBJECT_SUFFIX
            };
            path.push(format!("{segment}{suffix}"));
        }
        path
    }

    fn temp_path(&self) -> PathBuf {
        self.tmp
            .join(format!("put-{}", uuid::Uuid::new_v4().simple()))
    }

    /// Streams `source` into a temporary file while hashing it, then renames it into
    /// place under `key`.
    fn write(
        &self,
        key: &ObjectKey,
        mut source: impl std::io::Read,
    ) -> Result<ObjectMeta, StoreError> {
        let temp = self.temp_path();
        let result = (|| {
            let context = || format!("writing {}", temp.display());
            let mut file = File::create(&temp).map_err(|e| StoreError::io(context(), e))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; COPY_BUF];
            let mut size = 0u64;
            loop {
                let n = source
                    .read(&mut buf)
                    .map_err(|e| StoreError::io("reading the upload source", e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n])
                    .map_err(|e| StoreError::io(context(), e))?;
                size += n as u64;
            }
            file.sync_all().map_err(|e| StoreError::io(context(), e))?;
            let dest = self.object_path(key);
            let parent = dest.parent().unwrap_or(&self.objects);
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::io(format!("creating {}", parent.display()), e))?;
            std::fs::rename(&temp, &dest)
                .map_err(|e| StoreError::io(format!("renaming into {}", dest.display()), e))?;
            // Make the rename itself durable.
            if let Ok(dir) = File::open(parent) {
                let _ = dir.sync_all();
            }
            Ok(ObjectMeta {
                key: key.clone(),
                size,
                etag: None,
                sha256: Some(hex::encode(hasher.finalize())),
            })
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result
    }

    fn open(&self, key: &ObjectKey) -> Result<(File, u64), StoreError> {
        let path = self.object_path(key);
        let file = File::open(&path).map_err(|e| not_found_or(key, &path, e))?;
        let size = file
            .metadata()
            .map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?
            .len();
        Ok((file, size))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectSummary>, StoreError> {
        // Walk only the directory named by the prefix's complete segments.
        let mut dir = self.objects.clone();
        let mut key_prefix = String::new();
        if let Some((complete, _partial)) = prefix.rsplit_once('/') {
            for segment in complete.split('/') {
                dir.push(format!("{segment}{DIR_SUFFIX}"));
                key_prefix.push_str(segment);
                key_prefix.push('/');
            }
        }
        let mut out = Vec::new();
        walk(&dir, &key_prefix, prefix, &mut out)?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

fn walk(
    dir: &Path,
    key_prefix: &str,
    filter: &str,
    out: &mut Vec<ObjectSummary>,
) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io(format!("listing {}", dir.display()), e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(segment) = name.strip_suffix(DIR_SUFFIX) {
            let sub = format!("{key_prefix}{segment}/");
            // Descend only where keys can still match the prefix.
            if sub.starts_with(filter) || filter.starts_with(&sub) {
                walk(&entry.path(), &sub, filter, out)?;
            }
        } else if let Some(segment) = name.strip_suffix(OBJECT_SUFFIX) {
            let key = format!("{key_prefix}{segment}");
            if !key.starts_with(filter) {
                continue;
            }
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                // Deleted while we listed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(format!("stat {key}"), e)),
            };
            if let (true, Ok(key)) = (meta.is_file(), ObjectKey::new(key)) {
                out.push(ObjectSummary {
                    key,
                    size: meta.len(),
                });
            }
        }
    }
    Ok(())
}

fn not_found_or(key: &ObjectKey, path: &Path, e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StoreError::NotFound {
            key: key.to_string(),
        }
    } else {
        StoreError::io(format!("opening {}", path.display()), e)
    }
}

impl ObjectStore for LocalFsStore {
    fn put_file<'a>(
        &'a self,
        key: &'a ObjectKey,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<ObjectMeta, StoreError>> {
        let key = key.clone();
        let path = path.to_owned();
        self.run(move |inner| {
            let source = File::open(&path)
                .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
            inner.write(&key, source)
        })
    }

    fn put_bytes<'a>(
        &'a self,
        key: &'a ObjectKey,
        data: Bytes,
    ) -> BoxFuture<'a, Result<ObjectMeta, StoreError>> {
        let key = key.clone();
        self.run(move |inner| inner.write(&key, &data[..]))
    }

    fn get_file<'a>(
        &'a self,
        key: &'a ObjectKey,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<ObjectMeta, StoreError>> {
        let key = key.clone();
        let dest = dest.to_owned();
        self.run(move |inner| {
            let (mut source, _) = inner.open(&key)?;
            let temp = temp_beside(&dest);
            let result = (|| {
                let context = || format!("writing {}", temp.display());
                let mut file = File::create(&temp).map_err(|e| StoreError::io(context(), e))?;
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; COPY_BUF];
                let mut size = 0u64;
                loop {
                    let n = std::io::Read::read(&mut source, &mut buf)
                        .map_err(|e| StoreError::io(format!("reading {key}"), e))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    file.write_all(&buf[..n])
                        .map_err(|e| StoreError::io(context(), e))?;
                    size += n as u64;
                }
                file.sync_all().map_err(|e| StoreError::io(context(), e))?;
                std::fs::rename(&temp, &dest)
                    .map_err(|e| StoreError::io(format!("renaming into {}", dest.display()), e))?;
                Ok(ObjectMeta {
                    key: key.clone(),
                    size,
                    etag: None,
                    sha256: Some(hex::encode(hasher.finalize())),
                })
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            result
        })
    }

    fn get_range<'a>(
        &'a self,
        key: &'a ObjectKey,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        let key = key.clone();
        self.run(move |inner| {
            let (file, size) = inner.open(&key)?;
            check_range(&key, offset, len, size)?;
            let mut buf = BytesMut::zeroed(usize::try_from(len).unwrap_or(usize::MAX));
            file.read_exact_at(&mut buf, offset)
                .map_err(|e| StoreError::io(format!("reading {key}"), e))?;
            Ok(buf.freeze())
        })
    }

    fn head<'a>(&'a self, key: &'a ObjectKey) -> BoxFuture<'a, Result<ObjectMeta, StoreError>> {
        let key = key.clone();
        self.run(move |inner| {
            let (_, size) = inner.open(&key)?;
            Ok(ObjectMeta {
                key,
                size,
                etag: None,
                sha256: None,
            })
        })
    }

    fn delete<'a>(&'a self, key: &'a ObjectKey) -> BoxFuture<'a, Result<(), StoreError>> {
        let key = key.clone();
        self.run(move |inner| {
            let path = inner.object_path(&key);
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StoreError::io(format!("removing {}", path.display()), e)),
            }
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ObjectSummary>, StoreError>> {
        let prefix = prefix.to_owned();
        self.run(move |inner| {
            check_prefix(&prefix)?;
            inner.list(&prefix)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_inside_the_root() {
        let inner = Inner {
            objects: PathBuf::from("/r/objects"),
            tmp: PathBuf::from("/r/tmp"),
        };
        let path =
            |k: &str| inner.object_path(&ObjectKey::new(k).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(path("a"), PathBuf::from("/r/objects/a.o"));
        assert_eq!(path("a/b"), PathBuf::from("/r/objects/a.d/b.o"));
        assert_eq!(path("..x/y.."), PathBuf::from("/r/objects/..x.d/y...o"));
    }
}
