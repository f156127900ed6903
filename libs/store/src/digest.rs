//! Content digests: sha256 of files and objects, computed while streaming.

use std::io::Read as _;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::{ObjectKey, ObjectStore, StoreError};

/// Buffer size for streamed copies and hashing.
pub(crate) const COPY_BUF: usize = 1 << 20;

/// Lower-case hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Lower-case hex sha256 and length of a local file, read in 1 MiB chunks on a blocking
/// thread.
pub async fn sha256_file(path: &Path) -> Result<(String, u64), StoreError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || sha256_file_blocking(&path))
        .await
        .map_err(|e| StoreError::io("hashing task", std::io::Error::other(e)))?
}

pub(crate) fn sha256_file_blocking(path: &Path) -> Result<(String, u64), StoreError> {
    let context = || format!("reading {}", path.display());
    let mut file = std::fs::File::open(path).map_err(|e| StoreError::io(context(), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| StoreError::io(context(), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// Downloads `key` into `dest` and checks that its content has the sha256 `expected`
/// (hex, either case). On a mismatch `dest` is removed and
/// [`StoreError::DigestMismatch`] returned.
pub async fn get_file_verified(
    store: &dyn ObjectStore,
    key: &ObjectKey,
    dest: &Path,
    expected: &str,
) -> Result<(), StoreError> {
    store.get_file(key, dest).await?;
    let (actual, _) = sha256_file(dest).await?;
    if !actual.eq_ignore_ascii_case(expected) {
        let _ = tokio::fs::remove_file(dest).await;
        return Err(StoreError::DigestMismatch {
            key: key.to_string(),
            expected: expected.to_ascii_lowercase(),
            actual,
        });
    }
    Ok(())
}

/// A unique temporary name beside `dest`, in the same directory so that the final rename
/// is atomic.
pub(crate) fn temp_beside(dest: &Path) -> std::path::PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.part-{}", uuid::Uuid::new_v4().simple()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
