//! The local file-system store: the conformance suite in a temporary directory, plus
//! what is specific to the on-disk layout.

use std::path::Path;

use nanobox_store::conformance::Harness;
use nanobox_store::{LocalFsStore, ObjectKey, ObjectStore};

struct Local {
    store: LocalFsStore,
    root: tempfile::TempDir,
    scratch: tempfile::TempDir,
}

impl Harness for Local {
    fn store(&self) -> &dyn ObjectStore {
        &self.store
    }
    fn scratch(&self) -> &Path {
        self.scratch.path()
    }
}

async fn setup() -> Local {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let scratch = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = LocalFsStore::open(root.path()).unwrap_or_else(|e| panic!("{e}"));
    Local {
        store,
        root,
        scratch,
    }
}

nanobox_store::conformance_tests!(setup);

fn key(s: &str) -> ObjectKey {
    ObjectKey::new(s).unwrap_or_else(|e| panic!("{e}"))
}

/// Every file the store writes stays under its root, whatever the key looks like, and
/// nothing is left in its temporary directory.
#[tokio::test]
async fn writes_stay_inside_the_root() {
    let h = setup().await;
    let outside = h
        .root
        .path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let before: Vec<_> = std::fs::read_dir(&outside)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    for k in ["..a", "a..", "...", ".o", ".d", "x.d/y.o", "tmp", "objects"] {
        h.store
            .put_bytes(&key(k), bytes::Bytes::from(k.to_owned()))
            .await
            .unwrap_or_else(|e| panic!("{k}: {e}"));
        let got = h
            .store
            .get_range(&key(k), 0, k.len() as u64)
            .await
            .unwrap_or_else(|e| panic!("{k}: {e}"));
        assert_eq!(&got[..], k.as_bytes());
    }
    let after: Vec<_> = std::fs::read_dir(&outside)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let new: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
    assert!(new.is_empty(), "created outside the root: {new:?}");
    let tmp: Vec<_> = std::fs::read_dir(h.root.path().join("tmp"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(tmp.is_empty(), "left in tmp/: {tmp:?}");
    let listed = h.store.list("").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(listed.len(), 8);
}

/// Reopening a store sees what was written before and drops interrupted writes.
#[tokio::test]
async fn reopen_keeps_objects_and_drops_partial_writes() {
    let h = setup().await;
    h.store
        .put_bytes(&key("keep/me"), bytes::Bytes::from_static(b"kept"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(h.root.path().join("tmp/put-interrupted"), b"half")
        .unwrap_or_else(|e| panic!("{e}"));
    let reopened = LocalFsStore::open(h.root.path()).unwrap_or_else(|e| panic!("{e}"));
    let meta = reopened
        .head(&key("keep/me"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(meta.size, 4);
    assert!(!h.root.path().join("tmp/put-interrupted").exists());
}

/// Uploading a file that does not exist is an I/O error and creates no object.
#[tokio::test]
async fn put_of_a_missing_file_fails_cleanly() {
    let h = setup().await;
    let k = key("missing/source");
    let err = h
        .store
        .put_file(&k, &h.scratch.path().join("nope"))
        .await
        .err()
        .unwrap_or_else(|| panic!("put of a missing file succeeded"));
    assert!(
        matches!(err, nanobox_store::StoreError::Io { .. }),
        "{err:?}"
    );
    assert!(h.store.head(&k).await.is_err());
}
