//! The object store conformance suite: the behaviour every [`ObjectStore`] must show,
//! run by each implementation's tests against a real backend (a directory, a real S3
//! server). Each case is a public async function that panics with a description of the
//! first deviation; [`conformance_tests!`](crate::conformance_tests) turns them into one
//! test per case.
//!
//! Cases use their own key prefixes, so they may share one store.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::{
    get_file_verified, sha256_file, sha256_hex, ObjectKey, ObjectStore, StoreError, MAX_RANGE_LEN,
};

/// What a test gives the suite: a store and a scratch directory for local files.
pub trait Harness {
    fn store(&self) -> &dyn ObjectStore;
    fn scratch(&self) -> &Path;
}

/// Generates one `#[tokio::test]` per conformance case. `$setup` is an async function
/// returning a [`Harness`].
#[macro_export]
macro_rules! conformance_tests {
    ($setup:path) => {
        $crate::conformance_tests!(@cases $setup;
            round_trip, large_file_streamed, ranged_reads, overwrite, delete_is_idempotent,
            list_by_prefix, list_pages_past_1000, not_found, invalid_keys, concurrent_puts,
            get_file_is_atomic, verified_download);
    };
    (@cases $setup:path; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $setup().await;
                $crate::conformance::$case(
                    $crate::conformance::Harness::store(&harness),
                    $crate::conformance::Harness::scratch(&harness),
                )
                .await;
            }
        )*
    };
}

/// Runs every case in turn.
pub async fn run_all(store: &dyn ObjectStore, scratch: &Path) {
    round_trip(store, scratch).await;
    large_file_streamed(store, scratch).await;
    ranged_reads(store, scratch).await;
    overwrite(store, scratch).await;
    delete_is_idempotent(store, scratch).await;
    list_by_prefix(store, scratch).await;
    list_pages_past_1000(store, scratch).await;
    not_found(store, scratch).await;
    invalid_keys(store, scratch).await;
    concurrent_puts(store, scratch).await;
    get_file_is_atomic(store, scratch).await;
    verified_download(store, scratch).await;
}

fn key(s: &str) -> ObjectKey {
    ObjectKey::new(s).unwrap_or_else(|e| panic!("test key {s:?}: {e}"))
}

/// Deterministic, incompressible-looking bytes (xorshift64).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `len` pattern bytes to `path` in 1 MiB pieces (never all in memory).
fn write_pattern_file(path: &Path, seed: u64, len: u64) {
    let mut file =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    let mut left = len;
    let mut chunk = 0u64;
    while left > 0 {
        let n = left.min(1 << 20);
        let data = pattern(seed.wrapping_add(chunk), usize::try_from(n).unwrap_or(0));
        file.write_all(&data)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        left -= n;
        chunk += 1;
    }
}

async fn must<T>(what: &str, fut: impl std::future::Future<Output = Result<T, StoreError>>) -> T {
    fut.await.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn assert_not_found<T: std::fmt::Debug>(what: &str, result: Result<T, StoreError>) {
    match result {
        Err(StoreError::NotFound { .. }) => {}
        other => panic!("{what}: expected NotFound, got {other:?}"),
    }
}

/// Small and empty objects survive put, head, ranged read and download unchanged.
pub async fn round_trip(store: &dyn ObjectStore, scratch: &Path) {
    for (name, data) in [
        ("round-trip/small", Bytes::from_static(b"hello, nanobox")),
        ("round-trip/empty", Bytes::new()),
        ("round-trip/1MiB+1", Bytes::from(pattern(1, (1 << 20) + 1))),
    ] {
        let k = key(name);
        let meta = must("put_bytes", store.put_bytes(&k, data.clone())).await;
        assert_eq!(meta.key, k);
        assert_eq!(meta.size, data.len() as u64, "{name}: size from put");
        assert_eq!(meta.sha256.as_deref(), Some(sha256_hex(&data).as_str()));
        let head = must("head", store.head(&k)).await;
        assert_eq!(head.size, data.len() as u64, "{name}: size from head");
        if let Some(sha) = &head.sha256 {
            assert_eq!(*sha, sha256_hex(&data), "{name}: sha256 from head");
        }
        let all = must("get_range", store.get_range(&k, 0, data.len() as u64)).await;
        assert_eq!(all, data, "{name}: full range");
        let dest = scratch.join("round-trip.out");
        let got = must("get_file", store.get_file(&k, &dest)).await;
        assert_eq!(got.size, data.len() as u64);
        let back = std::fs::read(&dest).unwrap_or_else(|e| panic!("reading back: {e}"));
        assert_eq!(back, data, "{name}: downloaded content");
    }
}

/// A 40 MiB file (above the S3 multipart threshold, not a multiple of the part size)
/// goes up from disk and comes back byte for byte.
pub async fn large_file_streamed(store: &dyn ObjectStore, scratch: &Path) {
    const SIZE: u64 = (40 << 20) + 12_345;
    let src = scratch.join("large.in");
    write_pattern_file(&src, 40, SIZE);
    let (want_sha, _) = must("hashing source", sha256_file(&src)).await;
    let k = key("large/blob.bin");
    let meta = must("put_file", store.put_file(&k, &src)).await;
    assert_eq!(meta.size, SIZE);
    assert_eq!(meta.sha256.as_deref(), Some(want_sha.as_str()));
    assert_eq!(must("head", store.head(&k)).await.size, SIZE);
    let dest = scratch.join("large.out");
    let got = must("get_file", store.get_file(&k, &dest)).await;
    assert_eq!(got.size, SIZE);
    assert_eq!(
        got.sha256.as_deref(),
        Some(want_sha.as_str()),
        "sha256 from get_file"
    );
    let (got_sha, got_len) = must("hashing download", sha256_file(&dest)).await;
    assert_eq!(got_len, SIZE);
    assert_eq!(got_sha, want_sha, "downloaded content differs");
    // A range across the first part boundary (16 MiB).
    let offset = (16 << 20) - 100;
    let range = must("get_range", store.get_range(&k, offset, 200)).await;
    let file = std::fs::File::open(&src).unwrap_or_else(|e| panic!("{e}"));
    let mut want = vec![0u8; 200];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut want, offset)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&range[..], &want[..], "range across a part boundary");
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dest);
}

/// Ranged reads return exactly the bytes asked for; ranges outside the object, and
/// ranges above the size cap, are errors rather than short reads.
pub async fn ranged_reads(store: &dyn ObjectStore, _scratch: &Path) {
    let data = Bytes::from(pattern(7, 1000));
    let k = key("ranges/obj");
    must("put", store.put_bytes(&k, data.clone())).await;
    for (offset, len) in [
        (0u64, 10u64),
        (990, 10),
        (500, 1),
        (123, 456),
        (500, 0),
        (1000, 0),
    ] {
        let got = must("get_range", store.get_range(&k, offset, len)).await;
        let (o, l) = (offset as usize, len as usize);
        assert_eq!(&got[..], &data[o..o + l], "range {offset}+{len}");
    }
    for (offset, len) in [
        (995u64, 10u64),
        (1000, 1),
        (1001, 0),
        (5000, 1),
        (u64::MAX, 2),
    ] {
        match store.get_range(&k, offset, len).await {
            Err(StoreError::RangeOutOfBounds { size, .. }) => {
                assert_eq!(size, 1000, "reported size for {offset}+{len}")
            }
            other => panic!("range {offset}+{len}: expected RangeOutOfBounds, got {other:?}"),
        }
    }
    match store.get_range(&k, 0, MAX_RANGE_LEN + 1).await {
        Err(StoreError::RangeTooLarge { .. }) => {}
        other => panic!("oversized range: expected RangeTooLarge, got {other:?}"),
    }
}

/// A second put replaces the object entirely (also when it is shorter).
pub async fn overwrite(store: &dyn ObjectStore, scratch: &Path) {
    let k = key("overwrite/obj");
    must("put 1", store.put_bytes(&k, Bytes::from(pattern(1, 5000)))).await;
    let second = Bytes::from_static(b"short");
    must("put 2", store.put_bytes(&k, second.clone())).await;
    assert_eq!(must("head", store.head(&k)).await.size, 5);
    assert_eq!(must("range", store.get_range(&k, 0, 5)).await, second);
    let src = scratch.join("overwrite.in");
    write_pattern_file(&src, 3, 4096);
    must("put_file", store.put_file(&k, &src)).await;
    let dest = scratch.join("overwrite.out");
    must("get_file", store.get_file(&k, &dest)).await;
    assert_eq!(
        std::fs::read(&dest).unwrap_or_default(),
        std::fs::read(&src).unwrap_or_default(),
        "content after overwrite from a file"
    );
}

/// Deleting works and deleting what is not there is not an error.
pub async fn delete_is_idempotent(store: &dyn ObjectStore, _scratch: &Path) {
    let k = key("delete/obj");
    must("delete absent", store.delete(&k)).await;
    must("put", store.put_bytes(&k, Bytes::from_static(b"x"))).await;
    must("delete", store.delete(&k)).await;
    assert_not_found("head after delete", store.head(&k).await);
    must("delete again", store.delete(&k)).await;
    assert!(
        must("list", store.list("delete/")).await.is_empty(),
        "deleted object still listed"
    );
    // Deleting one key leaves its neighbours (a prefix of it, and keys below it) alone.
    let parent = key("delete/p");
    let child = key("delete/p/child");
    must(
        "put parent",
        store.put_bytes(&parent, Bytes::from_static(b"p")),
    )
    .await;
    must(
        "put child",
        store.put_bytes(&child, Bytes::from_static(b"c")),
    )
    .await;
    must("delete parent", store.delete(&parent)).await;
    assert_eq!(must("head child", store.head(&child)).await.size, 1);
}

/// Listing is by plain string prefix, sorted, with sizes; `a` and `a/b` coexist.
pub async fn list_by_prefix(store: &dyn ObjectStore, _scratch: &Path) {
    let keys = [
        "list/p",
        "list/p/a",
        "list/p/b/c",
        "list/p/b/d",
        "list/p/bc",
        "list/q/x",
    ];
    for (i, k) in keys.iter().enumerate() {
        must("put", store.put_bytes(&key(k), Bytes::from(vec![b'x'; i]))).await;
    }
    let names = |list: Vec<crate::ObjectSummary>| -> Vec<String> {
        list.into_iter().map(|s| s.key.to_string()).collect()
    };
    let all = must("list", store.list("list/")).await;
    assert_eq!(names(all.clone()), keys.to_vec());
    for (i, summary) in all.iter().enumerate() {
        assert_eq!(summary.size, i as u64, "size of {}", summary.key);
    }
    let cases: [(&str, &[&str]); 6] = [
        (
            "list/p/",
            &["list/p/a", "list/p/b/c", "list/p/b/d", "list/p/bc"],
        ),
        ("list/p/b", &["list/p/b/c", "list/p/b/d", "list/p/bc"]),
        ("list/p/b/", &["list/p/b/c", "list/p/b/d"]),
        (
            "list/p",
            &[
                "list/p",
                "list/p/a",
                "list/p/b/c",
                "list/p/b/d",
                "list/p/bc",
            ],
        ),
        ("list/q/x", &["list/q/x"]),
        ("list/none/", &[]),
    ];
    for (prefix, want) in cases {
        let got = names(must("list", store.list(prefix)).await);
        assert_eq!(got, want.to_vec(), "list({prefix:?})");
    }
    let everything = names(must("list all", store.list("")).await);
    for k in keys {
        assert!(everything.iter().any(|e| e == k), "list(\"\") misses {k}");
    }
}

/// More than 1000 keys (one S3 ListObjectsV2 page) come back complete and in order.
pub async fn list_pages_past_1000(store: &dyn ObjectStore, _scratch: &Path) {
    const N: usize = 1100;
    let want: Vec<String> = (0..N).map(|i| format!("paging/k{i:05}")).collect();
    futures::stream::iter(want.iter())
        .map(|name| async move {
            store
                .put_bytes(&key(name), Bytes::from(name.clone().into_bytes()))
                .await
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .unwrap_or_else(|e| panic!("putting {N} objects: {e}"));
    let got: Vec<String> = must("list", store.list("paging/"))
        .await
        .into_iter()
        .map(|s| s.key.to_string())
        .collect();
    assert_eq!(got.len(), N, "listed count");
    assert_eq!(got, want);
}

/// Every read of a missing key says NotFound, and that is not retryable.
pub async fn not_found(store: &dyn ObjectStore, scratch: &Path) {
    let k = key("missing/nothing-here");
    assert_not_found("head", store.head(&k).await);
    assert_not_found("get_range", store.get_range(&k, 0, 1).await);
    assert_not_found("get_range of 0 bytes", store.get_range(&k, 0, 0).await);
    let dest = scratch.join("missing.out");
    let err = store.get_file(&k, &dest).await;
    assert!(
        !matches!(&err, Err(e) if e.is_retryable()),
        "NotFound must not be retryable"
    );
    assert_not_found("get_file", err);
    assert!(!dest.exists(), "a failed download created its destination");
}

/// Bad keys never reach the store; bad list prefixes are refused by it.
pub async fn invalid_keys(store: &dyn ObjectStore, _scratch: &Path) {
    for bad in ["", "/abs", "a/../b", "..", "a//b", "trailing/", "ctl\u{1}"] {
        assert!(
            matches!(ObjectKey::new(bad), Err(StoreError::InvalidKey { .. })),
            "key {bad:?} accepted"
        );
    }
    assert!(
        ObjectKey::new("k".repeat(1025)).is_err(),
        "over-long key accepted"
    );
    for bad in ["../", "/x", "a/../", "nul\0"] {
        match store.list(bad).await {
            Err(StoreError::InvalidKey { .. }) => {}
            other => panic!("list({bad:?}): expected InvalidKey, got {other:?}"),
        }
    }
}

/// Concurrent puts of different keys all land; concurrent puts of one key leave exactly
/// one writer's complete content.
pub async fn concurrent_puts(store: &dyn ObjectStore, _scratch: &Path) {
    let distinct: Vec<(ObjectKey, Bytes)> = (0..16u64)
        .map(|i| {
            (
                key(&format!("concurrent/k{i}")),
                Bytes::from(pattern(100 + i, 10_000 + i as usize)),
            )
        })
        .collect();
    futures::future::try_join_all(distinct.iter().map(|(k, d)| store.put_bytes(k, d.clone())))
        .await
        .unwrap_or_else(|e| panic!("concurrent puts: {e}"));
    for (k, d) in &distinct {
        let got = must("range", store.get_range(k, 0, d.len() as u64)).await;
        assert_eq!(got, *d, "{k}");
    }
    let same = key("concurrent/same");
    let versions: Vec<Bytes> = (0..8u64)
        .map(|i| Bytes::from(pattern(200 + i, 256 << 10)))
        .collect();
    futures::future::try_join_all(versions.iter().map(|d| store.put_bytes(&same, d.clone())))
        .await
        .unwrap_or_else(|e| panic!("racing puts: {e}"));
    let got = must("range", store.get_range(&same, 0, 256 << 10)).await;
    let hashes: BTreeSet<String> = versions.iter().map(|v| sha256_hex(v)).collect();
    assert!(
        hashes.contains(&sha256_hex(&got)),
        "content after racing puts is no writer's version"
    );
}

/// A download replaces an existing file whole, a failed one leaves it untouched, and no
/// temporary files stay behind.
pub async fn get_file_is_atomic(store: &dyn ObjectStore, scratch: &Path) {
    let dir: PathBuf = scratch.join("atomic");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let dest = dir.join("target");
    std::fs::write(&dest, b"old content that is longer than the new one")
        .unwrap_or_else(|e| panic!("{e}"));
    let k = key("atomic/obj");
    must("put", store.put_bytes(&k, Bytes::from_static(b"new"))).await;
    must("get_file", store.get_file(&k, &dest)).await;
    assert_eq!(std::fs::read(&dest).unwrap_or_default(), b"new");
    assert_not_found(
        "get_file of a missing key",
        store.get_file(&key("atomic/missing"), &dest).await,
    );
    assert_eq!(
        std::fs::read(&dest).unwrap_or_default(),
        b"new",
        "a failed download touched the existing file"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "target")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// [`get_file_verified`] accepts the right digest and removes the file on a wrong one.
pub async fn verified_download(store: &dyn ObjectStore, scratch: &Path) {
    let data = Bytes::from(pattern(9, 3000));
    let k = key("verified/obj");
    must("put", store.put_bytes(&k, data.clone())).await;
    let dest = scratch.join("verified.out");
    let good = sha256_hex(&data).to_ascii_uppercase();
    must("verified get", get_file_verified(store, &k, &dest, &good)).await;
    assert_eq!(std::fs::read(&dest).unwrap_or_default(), data);
    match get_file_verified(store, &k, &dest, &sha256_hex(b"other")).await {
        Err(StoreError::DigestMismatch { actual, .. }) => assert_eq!(actual, sha256_hex(&data)),
        other => panic!("wrong digest: expected DigestMismatch, got {other:?}"),
    }
    assert!(!dest.exists(), "a mismatching download was left in place");
}
