#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The template cache against a real local object store holding real ext4 images and
//! their sidecars.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt as _;
use nanobox_node_storage::{CacheError, CacheOptions, TemplateCache};
use nanobox_store::rootfs::{rootfs_keys, RootfsInfo};
use nanobox_store::{LocalFsStore, ObjectKey, ObjectMeta, ObjectStore, ObjectSummary, StoreError};

/// The real store, with downloads counted (and optionally slowed, to widen the window
/// in which concurrent acquires overlap).
#[derive(Debug)]
struct CountingStore {
    inner: LocalFsStore,
    get_file_calls: AtomicUsize,
    delay: Duration,
}

impl CountingStore {
    fn new(inner: LocalFsStore, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner,
            get_file_calls: AtomicUsize::new(0),
            delay,
        })
    }

    fn downloads(&self) -> usize {
        self.get_file_calls.load(Ordering::SeqCst)
    }
}

impl ObjectStore for CountingStore {
    fn put_file<'a>(
        &'a self,
        key: &'a ObjectKey,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<ObjectMeta, StoreError>> {
        self.inner.put_file(key, path)
    }

    fn put_bytes<'a>(
        &'a self,
        key: &'a ObjectKey,
        data: Bytes,
    ) -> BoxFuture<'a, Result<ObjectMeta, StoreError>> {
        self.inner.put_bytes(key, data)
    }

    fn get_file<'a>(
        &'a self,
        key: &'a ObjectKey,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<ObjectMeta, StoreError>> {
        self.get_file_calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(self.delay).await;
            self.inner.get_file(key, dest).await
        }
        .boxed()
    }

    fn get_range<'a>(
        &'a self,
        key: &'a ObjectKey,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        self.inner.get_range(key, offset, len)
    }

    fn head<'a>(&'a self, key: &'a ObjectKey) -> BoxFuture<'a, Result<ObjectMeta, StoreError>> {
        self.inner.head(key)
    }

    fn delete<'a>(&'a self, key: &'a ObjectKey) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.delete(key)
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ObjectSummary>, StoreError>> {
        self.inner.list(prefix)
    }
}

/// A store directory and a cache directory.
struct World {
    _dir: tempfile::TempDir,
    store: LocalFsStore,
    cache_dir: PathBuf,
    images: PathBuf,
}

const IMAGE_MIB: u64 = 8;

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalFsStore::open(dir.path().join("store")).unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        Self {
            cache_dir: dir.path().join("cache"),
            store,
            images,
            _dir: dir,
        }
    }

    /// Publishes an ext4 (distinct per `n`) and its sidecar as the template builder
    /// does, returning the ext4 key and the local original.
    async fn publish(&self, n: u8) -> (ObjectKey, PathBuf) {
        let image = self.images.join(format!("t{n}.ext4"));
        support::make_ext4(
            &image,
            IMAGE_MIB,
            &format!("t{n}"),
            &[("data.bin", support::noise(256 << 10, u64::from(n)))],
        );
        let digest = format!("sha256:{}", format!("{n:02x}").repeat(32));
        let keys = rootfs_keys(&digest, "test-init").unwrap();
        let (sha256, size_bytes) = nanobox_store::sha256_file(&image).await.unwrap();
        self.store.put_file(&keys.ext4, &image).await.unwrap();
        let info = RootfsInfo {
            manifest_digest: digest,
            init_version: "test-init".into(),
            size_bytes,
            sha256,
            config: nanobox_core::ImageConfig::default(),
        };
        self.store
            .put_bytes(&keys.info, Bytes::from(serde_json::to_vec(&info).unwrap()))
            .await
            .unwrap();
        (keys.ext4, image)
    }

    async fn cache(&self, budget: u64, objects: Arc<CountingStore>) -> TemplateCache {
        TemplateCache::open(&self.cache_dir, budget, objects)
            .await
            .unwrap()
    }

    /// Every file under the cache directory, relative to it.
    fn files(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["templates", "tmp"] {
            if let Ok(entries) = std::fs::read_dir(self.cache_dir.join(sub)) {
                for entry in entries.flatten() {
                    out.push(format!("{sub}/{}", entry.file_name().to_string_lossy()));
                }
            }
        }
        out.sort();
        out
    }
}

fn keys_of(cache: &TemplateCache) -> Vec<ObjectKey> {
    cache.list().into_iter().map(|e| e.key).collect()
}

#[tokio::test]
async fn first_acquire_downloads_and_verifies_second_is_a_hit() {
    let world = World::new();
    let (key, original) = world.publish(1).await;
    let objects = CountingStore::new(world.store.clone(), Duration::ZERO);
    let cache = world.cache(1 << 30, objects.clone()).await;

    let first = cache.acquire(&key).await.unwrap();
    assert_eq!(objects.downloads(), 1);
    assert_eq!(first.key(), &key);
    assert_eq!(
        std::fs::read(first.path()).unwrap(),
        std::fs::read(&original).unwrap()
    );
    assert_eq!(first.info().size_bytes, IMAGE_MIB << 20);
    assert_eq!(first.info().init_version, "test-init");
    let mode = std::fs::metadata(first.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o444, "cached templates are read-only");

    let listed = cache.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, key);
    assert_eq!(listed[0].in_use, 1);
    assert_eq!(listed[0].size_bytes, IMAGE_MIB << 20);
    assert_eq!(listed[0].manifest_digest, first.info().manifest_digest);

    let second = cache.acquire(&key).await.unwrap();
    assert_eq!(objects.downloads(), 1, "the second acquire is a hit");
    assert_eq!(second.path(), first.path());
    assert_eq!(cache.list()[0].in_use, 2);
    let third = second.clone();
    assert_eq!(cache.list()[0].in_use, 3);
    drop((first, second, third));
    assert_eq!(cache.list()[0].in_use, 0);
    assert_eq!(cache.usage().used_bytes, IMAGE_MIB << 20);
    // Nothing left in progress.
    assert!(world.files().iter().all(|f| f.starts_with("templates/")));
}

#[tokio::test]
async fn concurrent_acquires_download_once() {
    let world = World::new();
    let (key, _) = world.publish(2).await;
    let objects = CountingStore::new(world.store.clone(), Duration::from_millis(300));
    let cache = world.cache(1 << 30, objects.clone()).await;

    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let cache = cache.clone();
            let key = key.clone();
            tokio::spawn(async move { cache.acquire(&key).await })
        })
        .collect();
    let mut holds = Vec::new();
    for task in tasks {
        holds.push(task.await.unwrap().unwrap());
    }
    assert_eq!(objects.downloads(), 1, "single flight");
    assert!(holds.iter().all(|h| h.path() == holds[0].path()));
    assert_eq!(cache.list()[0].in_use, 8);
}

#[tokio::test]
async fn corrupted_object_is_refused_and_leaves_nothing() {
    let world = World::new();
    let (key, original) = world.publish(3).await;
    // The object is replaced by same-size content that differs in one byte; the sidecar
    // still has the original's sha256.
    let mut bytes = std::fs::read(&original).unwrap();
    bytes[4096] ^= 0xff;
    world
        .store
        .put_bytes(&key, Bytes::from(bytes))
        .await
        .unwrap();

    let objects = CountingStore::new(world.store.clone(), Duration::ZERO);
    let cache = world.cache(1 << 30, objects.clone()).await;
    let err = cache.acquire(&key).await.unwrap_err();
    assert!(matches!(err, CacheError::DigestMismatch { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(key.as_str()), "{message}");
    assert!(!err.is_retryable());
    assert!(cache.list().is_empty());
    assert!(world.files().is_empty(), "left behind: {:?}", world.files());

    // A sidecar that lies about the size is refused as well.
    let (key4, _) = world.publish(4).await;
    let sidecar = nanobox_store::rootfs::sidecar_key(key4.as_str()).unwrap();
    let mut info: RootfsInfo = serde_json::from_slice(
        &world
            .store
            .get_range(&sidecar, 0, world.store.head(&sidecar).await.unwrap().size)
            .await
            .unwrap(),
    )
    .unwrap();
    info.size_bytes += 1;
    world
        .store
        .put_bytes(&sidecar, Bytes::from(serde_json::to_vec(&info).unwrap()))
        .await
        .unwrap();
    let err = cache.acquire(&key4).await.unwrap_err();
    assert!(matches!(err, CacheError::SizeMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains(key4.as_str()));
    assert!(world.files().is_empty(), "left behind: {:?}", world.files());

    // And a key with no object is the store's not-found, naming the key.
    let missing = rootfs_keys(&format!("sha256:{}", "ee".repeat(32)), "test-init")
        .unwrap()
        .ext4;
    let err = cache.acquire(&missing).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::Store { source, .. } if source.is_not_found()),
        "{err:?}"
    );
    assert!(err.to_string().contains(missing.as_str()));
}

#[tokio::test]
async fn lru_eviction_never_touches_templates_in_use() {
    let world = World::new();
    let (a, _) = world.publish(10).await;
    let (b, _) = world.publish(11).await;
    let (c, _) = world.publish(12).await;
    let objects = CountingStore::new(world.store.clone(), Duration::ZERO);
    // Room for two templates, not three.
    let budget = (IMAGE_MIB << 20) * 5 / 2;
    let cache = world.cache(budget, objects.clone()).await;

    // A held (and the least recently used), B used and released: C must evict B.
    let hold_a = cache.acquire(&a).await.unwrap();
    drop(cache.acquire(&b).await.unwrap());
    let hold_c = cache.acquire(&c).await.unwrap();
    let mut keys = keys_of(&cache);
    keys.sort();
    let mut want = vec![a.clone(), c.clone()];
    want.sort();
    assert_eq!(
        keys, want,
        "B (unused) evicted, A (in use, though older) kept"
    );
    assert!(hold_a.path().exists());
    assert!(cache.usage().used_bytes <= budget);

    // Released: A last used before C, so B's return evicts A.
    drop(hold_a);
    drop(hold_c);
    drop(cache.acquire(&c).await.unwrap());
    let hold_b = cache.acquire(&b).await.unwrap();
    let mut keys = keys_of(&cache);
    keys.sort();
    let mut want = vec![b.clone(), c.clone()];
    want.sort();
    assert_eq!(keys, want, "A, least recently used, evicted");
    assert_eq!(keys_of(&cache)[0], b, "list is most recent first");

    // Everything in use and a third needed: allowed over budget, nothing evicted...
    let hold_c = cache.acquire(&c).await.unwrap();
    let hold_a = cache.acquire(&a).await.unwrap();
    assert_eq!(cache.list().len(), 3);
    assert!(cache.usage().used_bytes > budget);
    assert!(hold_b.path().exists() && hold_c.path().exists() && hold_a.path().exists());
    // ...and back under budget as soon as something is released.
    drop(hold_b);
    let mut keys = keys_of(&cache);
    keys.sort();
    let mut want = vec![a.clone(), c.clone()];
    want.sort();
    assert_eq!(keys, want);
    assert!(cache.usage().used_bytes <= budget);
    drop((hold_a, hold_c));
    // Evicted files are deleted on a blocking thread; give it a moment.
    for _ in 0..100 {
        if world.files().iter().all(|f| f.starts_with("templates/")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        world.files().len(),
        4,
        "two templates and their records: {:?}",
        world.files()
    );
    assert_eq!(objects.downloads(), 5);
}

#[tokio::test]
async fn reopen_after_crash_rebuilds_the_index() {
    let world = World::new();
    let (a, _) = world.publish(20).await;
    let (b, _) = world.publish(21).await;
    let (c, _) = world.publish(22).await;
    let objects = CountingStore::new(world.store.clone(), Duration::ZERO);
    let (path_a, path_c) = {
        let cache = world.cache(1 << 30, objects.clone()).await;
        let ha = cache.acquire(&b).await.unwrap();
        drop(ha);
        // Distinct mtimes, whatever the file system's time granularity.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let hold_a = cache.acquire(&a).await.unwrap();
        let hold_c = cache.acquire(&c).await.unwrap();
        (hold_a.path().to_owned(), hold_c.path().to_owned())
        // The "crash": the cache and its holds vanish without any shutdown step.
    };
    // What a crash can leave: a download in progress, an ext4 whose record was never
    // written, and a cached file changed behind our back (C made writable and extended).
    std::fs::write(world.cache_dir.join("tmp/abc.download"), b"partial").unwrap();
    std::fs::write(world.cache_dir.join("tmp/.abc.part-1"), b"partial").unwrap();
    let orphan = world
        .cache_dir
        .join(format!("templates/{}.ext4", "0".repeat(64)));
    std::fs::write(&orphan, b"no record").unwrap();
    std::fs::write(world.cache_dir.join("templates/junk.json"), b"{").unwrap();
    std::fs::set_permissions(&path_c, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path_c)
        .unwrap();
    std::io::Write::write_all(&mut f, b"x").unwrap();
    drop(f);

    let objects = CountingStore::new(world.store.clone(), Duration::ZERO);
    let cache = world.cache(1 << 30, objects.clone()).await;
    let listed = cache.list();
    assert_eq!(
        listed.iter().map(|e| e.key.clone()).collect::<Vec<_>>(),
        vec![a.clone(), b.clone()],
        "A and B survive, most recent (A) first; C, damaged, is dropped"
    );
    assert!(listed.iter().all(|e| e.in_use == 0));
    assert!(!orphan.exists());
    assert!(!path_c.exists());
    assert!(
        world.files().iter().all(|f| f.starts_with("templates/")),
        "{:?}",
        world.files()
    );
    assert_eq!(world.files().len(), 4);

    let hold = cache.acquire(&a).await.unwrap();
    assert_eq!(hold.path(), path_a);
    assert_eq!(objects.downloads(), 0, "a hit after the restart");
    drop(cache.acquire(&c).await.unwrap());
    assert_eq!(objects.downloads(), 1, "the dropped one is fetched again");

    // Re-hashing on open finds nothing wrong with intact entries.
    drop(hold);
    drop(cache);
    let mut options = CacheOptions::with_budget(1 << 30);
    options.verify_on_open = true;
    let cache = TemplateCache::open_with(&world.cache_dir, options, objects.clone())
        .await
        .unwrap();
    assert_eq!(cache.list().len(), 3);
}

#[tokio::test]
async fn reopen_with_a_smaller_budget_evicts_down_to_it() {
    let world = World::new();
    let (a, _) = world.publish(30).await;
    let (b, _) = world.publish(31).await;
    let objects = CountingStore::new(world.store.clone(), Duration::ZERO);
    {
        let cache = world.cache(1 << 30, objects.clone()).await;
        drop(cache.acquire(&a).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(cache.acquire(&b).await.unwrap());
    }
    let cache = world.cache((IMAGE_MIB << 20) * 3 / 2, objects).await;
    assert_eq!(keys_of(&cache), vec![b], "the older one goes");
}

#[tokio::test]
async fn a_template_deleted_behind_the_cache_is_fetched_again() {
    let world = World::new();
    let (key, original) = world.publish(40).await;
    let objects = CountingStore::new(world.store.clone(), Duration::ZERO);
    let cache = world.cache(1 << 30, objects.clone()).await;
    let old = cache.acquire(&key).await.unwrap();
    std::fs::remove_file(old.path()).unwrap();

    let new = cache.acquire(&key).await.unwrap();
    assert_eq!(objects.downloads(), 2);
    assert_eq!(
        std::fs::read(new.path()).unwrap(),
        std::fs::read(&original).unwrap()
    );
    // The stale hold's release does not count against the new entry.
    drop(old);
    assert_eq!(cache.list()[0].in_use, 1);
    drop(new);
    assert_eq!(cache.list()[0].in_use, 0);
}
