//! The node's local cache of template root filesystems: each ext4 fetched once from the
//! object store, verified, kept read-only on local disk within a byte budget, and shared
//! by every sandbox of that template (each gets its own copy-on-write clone, see
//! [`crate::clone_rootfs`]).
//!
//! Layout of the cache directory:
//!
//! - `templates/<h>.ext4`: a verified root filesystem, mode 0444 (read-only, so that no
//!   VMM given the template by mistake can change what every sandbox shares; root
//!   ignores the mode, so the node agent still hands VMMs clones only, and qcow2 opens
//!   its backing file read-only);
//! - `templates/<h>.json`: its record (the object key and the sidecar [`RootfsInfo`]),
//!   written after the ext4 is in place, so a record means "complete and verified". Its
//!   mtime is the entry's last use, which is what survives a restart;
//! - `tmp/`: downloads in progress and evicted files being deleted; emptied on open.
//!
//! `<h>` is the hex sha256 of the object key: keys are arbitrary printable strings, file
//! names are not.
//!
//! Budget: files are kept under `budget_bytes` by evicting the least recently used entry
//! that no sandbox holds ([`CachedTemplate`] is the hold). When every entry is in use
//! and a new template does not fit, the download goes ahead anyway, over budget, with a
//! warning: refusing would fail a sandbox create on a node whose disk most likely has
//! room, and the cache returns under budget by itself as holds are released. The budget
//! is therefore a target the cache converges to, not a hard cap; the node agent's
//! admission control (and [`TemplateCache::usage`]) is where a hard limit belongs.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use nanobox_store::rootfs::{rootfs_keys, sidecar_key, RootfsInfo};
use nanobox_store::{ObjectKey, ObjectStore};

use crate::CacheError;

/// The largest sidecar accepted: it is a few hundred bytes of JSON, and it is read into
/// memory, so anything much larger is not a sidecar.
const MAX_SIDECAR_BYTES: u64 = 1 << 20;

/// Version of the record format in `templates/<h>.json`; a record of another version is
/// dropped on open (the template is simply fetched again).
const RECORD_FORMAT: u32 = 1;

/// How a [`TemplateCache`] behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    /// The bytes of templates to keep on local disk (see the module docs for what
    /// happens when everything is in use).
    pub budget_bytes: u64,
    /// Bound on one download: sidecar, ext4 and verification. Concurrent acquires of the
    /// same template wait for that download, so this bounds them too. (A store read cut
    /// off by it may still finish in the background; its file lands in `tmp/`, which the
    /// next open empties.)
    pub download_timeout: Duration,
    /// Re-hash every cached file on open instead of trusting the records (size is always
    /// checked). Costs a full read of the cache; the records are only written after
    /// verification, so this guards against damage on disk rather than crashes.
    pub verify_on_open: bool,
}

impl CacheOptions {
    /// Defaults with the given budget.
    pub fn with_budget(budget_bytes: u64) -> Self {
        Self {
            budget_bytes,
            // Generous: a several-GiB template over a slow link still finishes, a hung
            // store does not hold sandbox creates forever.
            download_timeout: Duration::from_secs(30 * 60),
            verify_on_open: false,
        }
    }
}

/// One entry as [`TemplateCache::list`] reports it, for node status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    pub key: ObjectKey,
    pub manifest_digest: String,
    pub init_version: String,
    pub size_bytes: u64,
    /// How many holds ([`CachedTemplate`]s) are alive.
    pub in_use: usize,
    pub last_used: SystemTime,
    pub path: PathBuf,
}

/// Totals, for node status and admission decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheUsage {
    /// Bytes of cached templates on disk (downloads in progress not included).
    pub used_bytes: u64,
    pub budget_bytes: u64,
    pub entries: usize,
    /// Entries with at least one hold.
    pub in_use: usize,
}

/// The template cache. Cheap to clone (shared state); every clone is the same cache.
#[derive(Debug, Clone)]
pub struct TemplateCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    templates: PathBuf,
    tmp: PathBuf,
    options: CacheOptions,
    objects: Arc<dyn ObjectStore>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<ObjectKey, Entry>,
    /// One lock per key being downloaded: the first acquire of a missing key downloads
    /// under it, later ones wait on it and then find the entry (single flight).
    flights: HashMap<ObjectKey, Arc<tokio::sync::Mutex<()>>>,
    /// Bytes of downloads in progress, counted against the budget before they land.
    reserved: u64,
    /// Logical clock ordering uses: file times can tie, this cannot.
    clock: u64,
}

#[derive(Debug)]
struct Entry {
    info: Arc<RootfsInfo>,
    path: PathBuf,
    record: PathBuf,
    in_use: usize,
    last_used: SystemTime,
    tick: u64,
    /// Unique per entry (a tick of the clock when it was listed), so that a hold on an
    /// entry that was dropped and fetched again cannot count against the new one.
    generation: u64,
}

/// The record beside each cached ext4.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Record {
    format: u32,
    key: String,
    info: RootfsInfo,
}

/// A hold on one cached template: while it lives the file at [`CachedTemplate::path`] is
/// not evicted. Hold it for as long as anything reads the template (for a qcow2 clone,
/// the sandbox's whole life). Cloning makes another hold.
pub struct CachedTemplate {
    inner: Arc<Inner>,
    key: ObjectKey,
    generation: u64,
    path: PathBuf,
    info: Arc<RootfsInfo>,
}

impl CachedTemplate {
    /// The object key of the ext4.
    pub fn key(&self) -> &ObjectKey {
        &self.key
    }

    /// The read-only local file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The template's sidecar: digest, init version, size, sha256, image config.
    pub fn info(&self) -> &RootfsInfo {
        &self.info
    }
}

impl std::fmt::Debug for CachedTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedTemplate")
            .field("key", &self.key)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Clone for CachedTemplate {
    fn clone(&self) -> Self {
        if let Some(entry) = self.inner.lock().entries.get_mut(&self.key) {
            if entry.generation == self.generation {
                entry.in_use += 1;
            }
        }
        Self {
            inner: Arc::clone(&self.inner),
            key: self.key.clone(),
            generation: self.generation,
            path: self.path.clone(),
            info: Arc::clone(&self.info),
        }
    }
}

impl Drop for CachedTemplate {
    fn drop(&mut self) {
        self.inner.release(&self.key, self.generation);
    }
}

impl TemplateCache {
    /// Opens the cache in `dir` (created if missing) with default options and the given
    /// budget, rebuilding the index from what a previous run left there.
    pub async fn open(
        dir: impl Into<PathBuf>,
        budget_bytes: u64,
        objects: Arc<dyn ObjectStore>,
    ) -> Result<Self, CacheError> {
        Self::open_with(dir, CacheOptions::with_budget(budget_bytes), objects).await
    }

    /// Opens the cache in `dir` (created if missing). Files a crash left behind are
    /// dealt with: downloads in progress are deleted, an ext4 without a record (or a
    /// record without its ext4, or of the wrong size, or with `verify_on_open` the wrong
    /// sha256) is deleted, and each remaining entry's last use is its record's mtime.
    pub async fn open_with(
        dir: impl Into<PathBuf>,
        options: CacheOptions,
        objects: Arc<dyn ObjectStore>,
    ) -> Result<Self, CacheError> {
        let dir = dir.into();
        let templates = dir.join("templates");
        let tmp = dir.join("tmp");
        let scan_templates = templates.clone();
        let scan_tmp = tmp.clone();
        let found = tokio::task::spawn_blocking(move || scan(&scan_templates, &scan_tmp))
            .await
            .map_err(|e| CacheError::io("the cache scan task failed", io::Error::other(e)))??;
        let mut entries = HashMap::new();
        for (key, mut entry) in found {
            if options.verify_on_open {
                let ok = match nanobox_store::sha256_file(&entry.path).await {
                    Ok((actual, _)) => actual.eq_ignore_ascii_case(&entry.info.sha256),
                    Err(e) => {
                        tracing::warn!(key = %key, error = %e, "cannot hash cached template");
                        false
                    }
                };
                if !ok {
                    tracing::warn!(key = %key, "cached template fails verification; dropped");
                    remove_quietly(&entry.record);
                    remove_quietly(&entry.path);
                    continue;
                }
            }
            entry.in_use = 0;
            entries.insert(key, entry);
        }
        // Ticks follow the persisted last-use times, so LRU order survives the restart.
        let mut order: Vec<(SystemTime, ObjectKey)> = entries
            .iter()
            .map(|(k, e)| (e.last_used, k.clone()))
            .collect();
        order.sort();
        let mut state = State::default();
        for (_, key) in order {
            state.clock += 1;
            if let Some(entry) = entries.get_mut(&key) {
                entry.tick = state.clock;
                entry.generation = state.clock;
            }
        }
        state.entries = entries;
        let inner = Arc::new(Inner {
            templates,
            tmp,
            options,
            objects,
            state: Mutex::new(state),
        });
        // The budget may have shrunk since the last run.
        let victims = inner.evict_for(&mut inner.lock(), 0);
        delete_files(victims);
        let usage = inner.usage();
        tracing::info!(
            dir = %dir.display(),
            entries = usage.entries,
            used_bytes = usage.used_bytes,
            budget_bytes = usage.budget_bytes,
            "template cache opened"
        );
        Ok(Self { inner })
    }

    /// The template stored under `key` (an ext4 key, `.../rootfs.ext4`), as a local
    /// read-only file held against eviction. On first use the sidecar and the ext4 are
    /// fetched, and the ext4 is kept only if its size and sha256 match the sidecar.
    /// Concurrent acquires of one key download it once; if that download fails, each
    /// waiter then tries once itself, in turn (so a transient failure does not fail them
    /// all, and a persistent one fails each with its own error).
    pub async fn acquire(&self, key: &ObjectKey) -> Result<CachedTemplate, CacheError> {
        if let Some(hit) = self.inner.hit(key) {
            return Ok(hit);
        }
        let flight = Flight::join(&self.inner, key);
        // Waiting is bounded: whoever holds the lock is bounded by the download timeout.
        let _turn = flight.lock.lock().await;
        // Whoever held the lock before us may have fetched it.
        if let Some(hit) = self.inner.hit(key) {
            return Ok(hit);
        }
        let after = self.inner.options.download_timeout;
        match tokio::time::timeout(after, self.inner.download(key)).await {
            Ok(result) => result,
            Err(_) => Err(CacheError::Timeout {
                key: key.to_string(),
                after,
            }),
        }
    }

    /// Every cached template, most recently used first.
    pub fn list(&self) -> Vec<CacheEntry> {
        let state = self.inner.lock();
        let mut entries: Vec<(u64, CacheEntry)> = state
            .entries
            .iter()
            .map(|(key, e)| {
                (
                    e.tick,
                    CacheEntry {
                        key: key.clone(),
                        manifest_digest: e.info.manifest_digest.clone(),
                        init_version: e.info.init_version.clone(),
                        size_bytes: e.info.size_bytes,
                        in_use: e.in_use,
                        last_used: e.last_used,
                        path: e.path.clone(),
                    },
                )
            })
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        entries.into_iter().map(|(_, e)| e).collect()
    }

    /// Bytes used against the budget.
    pub fn usage(&self) -> CacheUsage {
        self.inner.usage()
    }
}

/// A place in the single-flight queue for one key; leaving it (even by cancellation)
/// drops the key's lock from the table once nobody else is queued.
struct Flight<'a> {
    inner: &'a Inner,
    key: ObjectKey,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> Flight<'a> {
    fn join(inner: &'a Inner, key: &ObjectKey) -> Self {
        let lock = Arc::clone(inner.lock().flights.entry(key.clone()).or_default());
        Self {
            inner,
            key: key.clone(),
            lock,
        }
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        // The table's reference and ours: nobody else is waiting. Counted under the
        // state lock, which every new waiter takes to clone the Arc, so none can sneak in.
        if Arc::strong_count(&self.lock) == 2 {
            state.flights.remove(&self.key);
        }
    }
}

/// Bytes of a download in progress, counted against the budget until it lands or fails.
struct Reservation<'a> {
    inner: &'a Inner,
    bytes: u64,
}

impl Reservation<'_> {
    /// Ends the reservation under a lock the caller already holds (the download has
    /// become an entry, which counts from now on).
    fn settle(&mut self, state: &mut State) {
        state.reserved = state.reserved.saturating_sub(self.bytes);
        self.bytes = 0;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut state = self.inner.lock();
            state.reserved = state.reserved.saturating_sub(self.bytes);
        }
    }
}

/// A file removed when dropped unless disarmed: the download temp file on every error
/// path, including cancellation and time-out.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            remove_quietly(&path);
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that are still meaningful (every
        // update is a single field write); carrying on beats failing every later call.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn usage(&self) -> CacheUsage {
        let state = self.lock();
        CacheUsage {
            used_bytes: state.used_bytes(),
            budget_bytes: self.options.budget_bytes,
            entries: state.entries.len(),
            in_use: state.entries.values().filter(|e| e.in_use > 0).count(),
        }
    }

    /// A hold on `key` if it is cached.
    fn hit(self: &Arc<Self>, key: &ObjectKey) -> Option<CachedTemplate> {
        let (path, info, record, generation) = {
            let mut state = self.lock();
            let tick = state.tick();
            let entry = state.entries.get_mut(key)?;
            // Someone deleted the file behind the cache's back (an operator clearing
            // disk): forget the entry and let the caller fetch it again.
            if !entry.path.is_file() {
                tracing::warn!(%key, path = %entry.path.display(), "cached template vanished; fetching it again");
                let record = entry.record.clone();
                state.entries.remove(key);
                remove_quietly(&record);
                return None;
            }
            entry.in_use += 1;
            entry.tick = tick;
            entry.last_used = SystemTime::now();
            (
                entry.path.clone(),
                Arc::clone(&entry.info),
                entry.record.clone(),
                entry.generation,
            )
        };
        touch(&record);
        tracing::debug!(%key, "template cache hit");
        Some(CachedTemplate {
            inner: Arc::clone(self),
            key: key.clone(),
            generation,
            path,
            info,
        })
    }

    fn release(&self, key: &ObjectKey, generation: u64) {
        let (record, victims) = {
            let mut state = self.lock();
            let tick = state.tick();
            let Some(entry) = state
                .entries
                .get_mut(key)
                .filter(|e| e.generation == generation)
            else {
                return;
            };
            entry.in_use = entry.in_use.saturating_sub(1);
            entry.tick = tick;
            entry.last_used = SystemTime::now();
            let record = entry.record.clone();
            // Only now can an over-budget cache (everything was in use) shrink.
            (record, self.evict_for(&mut state, 0))
        };
        touch(&record);
        delete_files(victims);
    }

    /// Evicts least recently used entries nobody holds until `incoming` more bytes fit
    /// in the budget, or nothing more can go. Under the state lock, the victims are
    /// unlisted and their files moved into `tmp/` (renames: fast, and a fresh download
    /// of the same key can never meet an old file in `templates/`); the returned files
    /// are deleted by the caller outside the lock.
    fn evict_for(&self, state: &mut State, incoming: u64) -> Vec<PathBuf> {
        let budget = self.options.budget_bytes;
        let mut victims = Vec::new();
        while state.used_bytes() + state.reserved + incoming > budget {
            let Some(key) = state
                .entries
                .iter()
                .filter(|(_, e)| e.in_use == 0)
                .min_by_key(|(_, e)| e.tick)
                .map(|(k, _)| k.clone())
            else {
                tracing::warn!(
                    used_bytes = state.used_bytes(),
                    downloading_bytes = state.reserved + incoming,
                    budget_bytes = budget,
                    "template cache over budget with every template in use; going over until some are released"
                );
                break;
            };
            let Some(entry) = state.entries.remove(&key) else {
                break;
            };
            // Record first: a crash between the two leaves an ext4 without a record,
            // which the next open deletes.
            remove_quietly(&entry.record);
            let parked = self
                .tmp
                .join(format!("evicted-{}.ext4", uuid::Uuid::new_v4().simple()));
            match std::fs::rename(&entry.path, &parked) {
                Ok(()) => victims.push(parked),
                Err(e) => {
                    tracing::warn!(path = %entry.path.display(), error = %e, "cannot move an evicted template aside; deleting in place");
                    remove_quietly(&entry.path);
                }
            }
            tracing::info!(key = %key, size_bytes = entry.info.size_bytes, "template evicted");
        }
        victims
    }

    async fn download(self: &Arc<Self>, key: &ObjectKey) -> Result<CachedTemplate, CacheError> {
        let store_err = |source| CacheError::Store {
            key: key.to_string(),
            source,
        };
        let info = self.fetch_sidecar(key).await?;

        let victims = {
            let mut state = self.lock();
            let victims = self.evict_for(&mut state, info.size_bytes);
            state.reserved += info.size_bytes;
            victims
        };
        let mut reservation = Reservation {
            inner: self,
            bytes: info.size_bytes,
        };
        delete_files(victims);

        let name = file_stem(key);
        let temp_path = self
            .tmp
            .join(format!("{name}.{}.download", uuid::Uuid::new_v4().simple()));
        let mut temp = TempFile(Some(temp_path.clone()));
        let start = std::time::Instant::now();
        tracing::info!(%key, size_bytes = info.size_bytes, "downloading template");
        let meta = self
            .objects
            .get_file(key, &temp_path)
            .await
            .map_err(store_err)?;

        let len = tokio::fs::metadata(&temp_path)
            .await
            .map_err(|e| CacheError::io(format!("reading {}", temp_path.display()), e))?
            .len();
        if len != info.size_bytes {
            return Err(CacheError::SizeMismatch {
                key: key.to_string(),
                expected: info.size_bytes,
                actual: len,
            });
        }
        // The store hashes what it writes (ObjectStore::get_file's contract), which spares
        // a second full read; only a store that does not report it costs one.
        let actual = match meta.sha256 {
            Some(sha) => sha,
            None => {
                nanobox_store::sha256_file(&temp_path)
                    .await
                    .map_err(store_err)?
                    .0
            }
        };
        if !actual.eq_ignore_ascii_case(&info.sha256) {
            return Err(CacheError::DigestMismatch {
                key: key.to_string(),
                expected: info.sha256.to_ascii_lowercase(),
                actual,
            });
        }

        let path = self.templates.join(format!("{name}.ext4"));
        let record_path = self.templates.join(format!("{name}.json"));
        let record = Record {
            format: RECORD_FORMAT,
            key: key.to_string(),
            info: info.clone(),
        };
        let record_json = serde_json::to_vec_pretty(&record)
            .map_err(|e| CacheError::io("encoding a cache record", io::Error::other(e)))?;
        let (tmp_dir, templates) = (self.tmp.clone(), self.templates.clone());
        let (from, to, rec) = (temp_path.clone(), path.clone(), record_path.clone());
        tokio::task::spawn_blocking(move || {
            install(&from, &to, &rec, &record_json, &tmp_dir, &templates)
        })
        .await
        .map_err(|e| CacheError::io("the cache install task failed", io::Error::other(e)))??;
        temp.0 = None;
        tracing::info!(
            %key,
            size_bytes = info.size_bytes,
            secs = start.elapsed().as_secs_f64(),
            "template downloaded and verified"
        );

        let info = Arc::new(info);
        let (victims, generation) = {
            let mut state = self.lock();
            let tick = state.tick();
            state.entries.insert(
                key.clone(),
                Entry {
                    info: Arc::clone(&info),
                    path: path.clone(),
                    record: record_path,
                    in_use: 1,
                    last_used: SystemTime::now(),
                    tick,
                    generation: tick,
                },
            );
            reservation.settle(&mut state);
            (self.evict_for(&mut state, 0), tick)
        };
        delete_files(victims);
        Ok(CachedTemplate {
            inner: Arc::clone(self),
            key: key.clone(),
            generation,
            path,
            info,
        })
    }

    async fn fetch_sidecar(&self, key: &ObjectKey) -> Result<RootfsInfo, CacheError> {
        let store_err = |source| CacheError::Store {
            key: key.to_string(),
            source,
        };
        let sidecar = sidecar_key(key.as_str()).map_err(store_err)?;
        let invalid = |reason: String| CacheError::Sidecar {
            key: key.to_string(),
            sidecar: sidecar.to_string(),
            reason,
        };
        let meta = self.objects.head(&sidecar).await.map_err(store_err)?;
        if meta.size > MAX_SIDECAR_BYTES {
            return Err(invalid(format!(
                "{} bytes, more than a sidecar can be ({MAX_SIDECAR_BYTES})",
                meta.size
            )));
        }
        let bytes = self
            .objects
            .get_range(&sidecar, 0, meta.size)
            .await
            .map_err(store_err)?;
        let info: RootfsInfo =
            serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
        if info.sha256.len() != 64 || !info.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!("sha256 {:?} is not a digest", info.sha256)));
        }
        // Keys are content addressed: a sidecar describing another image than its key
        // says is a builder bug or tampering, and its sha256 cannot be trusted for this key.
        match rootfs_keys(&info.manifest_digest, &info.init_version) {
            Ok(keys) if keys.ext4 == *key => {}
            _ => {
                return Err(invalid(format!(
                    "describes image {} with init {}, which is not this key's",
                    info.manifest_digest, info.init_version
                )))
            }
        }
        Ok(info)
    }
}

impl State {
    fn used_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.info.size_bytes).sum()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

/// The file name stem of a key: hex sha256 of the key text.
fn file_stem(key: &ObjectKey) -> String {
    nanobox_store::sha256_hex(key.as_str().as_bytes())
}

/// Makes the verified download read-only and durable, moves it into `templates/` and
/// writes its record beside it (record last: its presence means complete).
fn install(
    download: &Path,
    path: &Path,
    record_path: &Path,
    record_json: &[u8],
    tmp: &Path,
    templates: &Path,
) -> Result<(), CacheError> {
    let io_err = |what: &str, p: &Path, e| CacheError::io(format!("{what} {}", p.display()), e);
    std::fs::set_permissions(download, std::fs::Permissions::from_mode(0o444))
        .map_err(|e| io_err("making read-only", download, e))?;
    // Stores fsync what they write (the local one does); this makes it certain for any
    // store before the record claims the file is complete.
    File::open(download)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("syncing", download, e))?;
    std::fs::rename(download, path).map_err(|e| io_err("moving into place", path, e))?;
    let record_temp = tmp.join(format!("record-{}.json", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        std::fs::write(&record_temp, record_json)?;
        File::open(&record_temp)?.sync_all()?;
        std::fs::rename(&record_temp, record_path)?;
        File::open(templates)?.sync_all()
    })();
    if let Err(e) = written {
        remove_quietly(&record_temp);
        // Without its record the ext4 would be deleted on the next open anyway.
        remove_quietly(path);
        return Err(io_err("writing the record", record_path, e));
    }
    Ok(())
}

/// What a previous run left: entries with valid records, everything else deleted.
fn scan(templates: &Path, tmp: &Path) -> Result<Vec<(ObjectKey, Entry)>, CacheError> {
    for dir in [templates, tmp] {
        std::fs::create_dir_all(dir)
            .map_err(|e| CacheError::io(format!("creating {}", dir.display()), e))?;
    }
    // Downloads interrupted and evictions not finished by a crash; nothing refers to them.
    let leftovers = std::fs::read_dir(tmp)
        .map_err(|e| CacheError::io(format!("reading {}", tmp.display()), e))?;
    for entry in leftovers.flatten() {
        let path = entry.path();
        tracing::info!(path = %path.display(), "removing a leftover temporary file");
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(&path);
        } else {
            remove_quietly(&path);
        }
    }

    let mut found = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(templates)
        .map_err(|e| CacheError::io(format!("reading {}", templates.display()), e))?
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    let mut keep = std::collections::HashSet::new();
    for record_path in names
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
    {
        match load_record(record_path) {
            Ok((key, entry)) => {
                keep.insert(record_path.clone());
                keep.insert(entry.path.clone());
                found.push((key, entry));
            }
            Err(reason) => {
                tracing::warn!(record = %record_path.display(), %reason, "dropping a cache entry");
            }
        }
    }
    // Anything else in templates/ is ours and unaccounted for: an ext4 whose record was
    // never written (crash) or was dropped above, a bad record, a stray file.
    for path in names.iter().filter(|p| !keep.contains(*p)) {
        tracing::info!(path = %path.display(), "removing an unverifiable cache file");
        if path.is_dir() {
            let _ = std::fs::remove_dir_all(path);
        } else {
            remove_quietly(path);
        }
    }
    Ok(found)
}

fn load_record(record_path: &Path) -> Result<(ObjectKey, Entry), String> {
    let bytes = std::fs::read(record_path).map_err(|e| format!("unreadable: {e}"))?;
    let record: Record = serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))?;
    if record.format != RECORD_FORMAT {
        return Err(format!("record format {}", record.format));
    }
    let key = ObjectKey::new(record.key).map_err(|e| e.to_string())?;
    let stem = file_stem(&key);
    if record_path.file_stem().and_then(|s| s.to_str()) != Some(stem.as_str()) {
        return Err(format!("record names key {key}, which is not this file's"));
    }
    let path = record_path.with_extension("ext4");
    let meta = std::fs::symlink_metadata(&path).map_err(|e| format!("no ext4: {e}"))?;
    if !meta.is_file() {
        return Err("the ext4 is not a regular file".into());
    }
    if meta.len() != record.info.size_bytes {
        return Err(format!(
            "the ext4 has {} bytes, the record says {}",
            meta.len(),
            record.info.size_bytes
        ));
    }
    if meta.permissions().mode() & 0o222 != 0 {
        // Writable means someone changed it after we verified it, or tried to.
        return Err("the ext4 is writable".into());
    }
    let last_used = std::fs::metadata(record_path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok((
        key,
        Entry {
            info: Arc::new(record.info),
            path,
            record: record_path.to_owned(),
            in_use: 0,
            last_used,
            tick: 0,
            generation: 0,
        },
    ))
}

/// Records the last use in the record's mtime, which is what a restart reads back.
/// Best effort: a failure costs only LRU accuracy after a restart.
fn touch(record: &Path) {
    let result = std::fs::OpenOptions::new()
        .write(true)
        .open(record)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = result {
        tracing::debug!(record = %record.display(), error = %e, "cannot update last use");
    }
}

/// Deletes evicted files. Unlinking a multi-GiB file frees many extents and can take a
/// while, so inside a Tokio runtime it happens on a blocking thread.
fn delete_files(paths: Vec<PathBuf>) {
    if paths.is_empty() {
        return;
    }
    let work = move || {
        for path in &paths {
            remove_quietly(path);
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn_blocking(work);
        }
        Err(_) => work(),
    }
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove");
        }
    }
}
