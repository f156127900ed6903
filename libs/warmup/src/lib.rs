//! Template warmup: turns an image reference into a ready template, as a background task.
//!
//! A [`Warmer`] takes warmup requests ([`Warmer::submit`] returns at once with the queued
//! task) and runs each as a task: resolve the manifest in the registry, pull the layers
//! into the local blob cache, convert them into an ext4 root filesystem with the guest
//! init injected, upload it to the object store, and publish the template in Postgres.
//! The task's state and progress are written to Postgres as it goes, for `Status`.
//!
//! What makes it safe to run for real:
//! - **Content addressing.** The root filesystem's object key is derived from the image's
//!   manifest digest and the init's version ([`rootfs_keys`]): two template names over one
//!   image share one object, and an image that was converted before is never converted
//!   again. Objects are written whole (the store's contract) and the small sidecar
//!   (`image.json`: config, size, sha256) is written last, so its presence means the
//!   ext4 beside it is complete.
//! - **Single flight.** Tasks that resolve to the same object build it once; the others
//!   wait and then find it built. Different images build in parallel, up to a limit.
//! - **Publication under a lock.** A template row pointing at an object is written, and
//!   the last template of an object is deleted together with the object, under the
//!   object's Postgres advisory lock, so a delete never pulls an object out from under a
//!   template being published.
//! - **Restart safety.** Nothing is visible as a template until it is published, and a
//!   task's work is idempotent, so after a restart [`Warmer::resume`] simply runs every
//!   unfinished task again (cached layers and objects make that cheap). A failed first
//!   warmup leaves only its task record (for `Status`), no template and no object.
//!
//! Each task runs in a `warmup` span, a child of the request that submitted it, and its
//! outcome and duration are recorded as Prometheus series ([`metrics`]).

#![forbid(unsafe_code)]

mod error;
pub mod metrics;
mod progress;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use nanobox_core::{describe, ImageConfig, TemplateName, TemplateState};
use nanobox_oci::{convert, ConvertOptions, Platform, Reference, RegistryClient, RegistryOptions};
use nanobox_store::metadata::{Progress, TaskUpdate, Template, TemplateRecord, WarmupTask};
use nanobox_store::rootfs::{rootfs_keys, sidecar_key, RootfsInfo, RootfsKeys};
use nanobox_store::{MetadataStore, ObjectKey, ObjectStore, StoreError};
use sha2::{Digest as _, Sha256};
use tokio::task::AbortHandle;
use tracing::Instrument as _;
use uuid::Uuid;

pub use error::WarmupError;
use progress::Tracker;

/// How a [`Warmer`] works.
#[derive(Debug, Clone)]
pub struct WarmupConfig {
    /// Local working space: the layer blob cache (`oci/`) and ext4 images being built
    /// (`builds/`). Layers stay cached here between warmups.
    pub work_dir: PathBuf,
    /// The guest init injected into every root filesystem.
    pub init: PathBuf,
    /// Registry access (plain-HTTP registries, credentials, limits). The platform is set
    /// per task.
    pub registry: RegistryOptions,
    /// Layer application limits and ext4 sizing.
    pub convert: ConvertOptions,
    /// Images converted at once; further tasks wait, queued.
    pub max_parallel: usize,
}

/// A template as the API shows it: a published template, or a first warmup in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateView {
    pub name: TemplateName,
    pub image_ref: String,
    pub manifest_digest: Option<String>,
    pub state: TemplateState,
    pub size_bytes: Option<u64>,
    pub image_config: ImageConfig,
    pub created_at: std::time::SystemTime,
}

impl From<Template> for TemplateView {
    fn from(t: Template) -> Self {
        Self {
            name: t.name,
            image_ref: t.image_ref,
            manifest_digest: t.manifest_digest,
            state: t.state,
            size_bytes: t.size_bytes,
            image_config: t.image_config,
            created_at: t.created_at,
        }
    }
}

impl From<WarmupTask> for TemplateView {
    fn from(t: WarmupTask) -> Self {
        Self {
            name: t.template,
            image_ref: t.image_ref,
            manifest_digest: t.manifest_digest,
            state: t.state,
            size_bytes: None,
            image_config: ImageConfig::default(),
            created_at: t.created_at,
        }
    }
}

/// A running task, for sharing and superseding.
struct Running {
    task: Uuid,
    image_ref: String,
    platform: String,
    abort: AbortHandle,
}

struct Inner {
    meta: MetadataStore,
    objects: Arc<dyn ObjectStore>,
    config: WarmupConfig,
    init_version: String,
    running: Mutex<HashMap<TemplateName, Running>>,
    /// One lock per root filesystem object being built (single flight).
    flights: Mutex<HashMap<ObjectKey, Arc<tokio::sync::Mutex<()>>>>,
    builders: tokio::sync::Semaphore,
}

/// Runs warmups; cheap to clone.
#[derive(Clone)]
pub struct Warmer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Warmer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warmer")
            .field("work_dir", &self.inner.config.work_dir)
            .field("init_version", &self.inner.init_version)
            .finish()
    }
}

/// Parses `os/arch` (empty means linux/amd64).
pub fn parse_platform(platform: &str) -> Result<Platform, WarmupError> {
    if platform.is_empty() {
        return Ok(Platform::linux_amd64());
    }
    let invalid = |reason: &str| WarmupError::InvalidArgument {
        field: "platform",
        reason: format!("{platform:?}: {reason}"),
    };
    let mut parts = platform.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(os), Some(arch), None)
            if !os.is_empty()
                && !arch.is_empty()
                && platform
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'_') =>
        {
            Ok(Platform {
                os: os.to_owned(),
                architecture: arch.to_owned(),
            })
        }
        (Some(_), Some(_), Some(_)) => Err(invalid("platform variants are not supported")),
        _ => Err(invalid("expected os/arch, like linux/amd64")),
    }
}

fn platform_string(p: &Platform) -> String {
    format!("{}/{}", p.os, p.architecture)
}

/// The init's version: the first 16 hex digits of its sha256.
fn init_version(init: &Path) -> Result<String, WarmupError> {
    let data = std::fs::read(init).map_err(|e| WarmupError::Io {
        context: "reading the guest init",
        path: init.to_owned(),
        source: e,
    })?;
    Ok(hex::encode(Sha256::digest(&data))[..16].to_owned())
}

impl Warmer {
    /// A warmer over these stores. Creates the working directories and removes builds
    /// that a previous run left half done.
    pub fn new(
        meta: MetadataStore,
        objects: Arc<dyn ObjectStore>,
        config: WarmupConfig,
    ) -> Result<Self, WarmupError> {
        let init_version = init_version(&config.init)?;
        let builds = config.work_dir.join("builds");
        if builds.exists() {
            std::fs::remove_dir_all(&builds).map_err(|e| WarmupError::Io {
                context: "clearing old builds",
                path: builds.clone(),
                source: e,
            })?;
        }
        for dir in [builds, config.work_dir.join("oci")] {
            std::fs::create_dir_all(&dir).map_err(|e| WarmupError::Io {
                context: "creating the work directory",
                path: dir,
                source: e,
            })?;
        }
        let builders = tokio::sync::Semaphore::new(config.max_parallel.max(1));
        Ok(Self {
            inner: Arc::new(Inner {
                meta,
                objects,
                config,
                init_version,
                running: Mutex::new(HashMap::new()),
                flights: Mutex::new(HashMap::new()),
                builders,
            }),
        })
    }

    /// The version of the injected init (part of every root filesystem's key).
    pub fn init_version(&self) -> &str {
        &self.inner.init_version
    }

    /// Runs again every task a previous run left unfinished (the latest task of each
    /// template; older ones fail as superseded). Returns how many were resumed.
    pub async fn resume(&self) -> Result<usize, WarmupError> {
        let mut resumed = 0;
        for task in self.inner.meta.unfinished_tasks().await? {
            let latest = self.inner.meta.latest_task(&task.template).await?;
            if latest.as_ref().map(|t| t.id) != Some(task.id) {
                self.inner
                    .fail(task.id, "superseded by a newer warmup of this template")
                    .await;
                continue;
            }
            let task = self
                .inner
                .meta
                .update_task(
                    task.id,
                    &TaskUpdate {
                        state: Some(TemplateState::Queued),
                        progress: Some(Progress::default()),
                        ..TaskUpdate::default()
                    },
                )
                .await?;
            tracing::info!(task = %task.id, template = %task.template, "resuming warmup");
            self.spawn(task);
            resumed += 1;
        }
        Ok(resumed)
    }

    /// Submits a warmup of `image_ref` (a registry reference) for `platform` (`os/arch`,
    /// empty for linux/amd64) as template `name`, and returns the task at once.
    ///
    /// A warmup of the same name, image and platform already running is shared: its
    /// task is returned. One of the same name with another image is superseded (it
    /// fails, saying so).
    pub async fn submit(
        &self,
        name: TemplateName,
        image_ref: &str,
        platform: &str,
    ) -> Result<WarmupTask, WarmupError> {
        // The request's span (the gRPC call's) names the template.
        tracing::Span::current().record("template", name.as_str());
        if image_ref.starts_with("oci-layout:") || image_ref.starts_with("docker-archive:") {
            return Err(WarmupError::InvalidArgument {
                field: "image",
                reason: "images on the builder's disk are only for `nanobox template build`; \
                         push the image to a registry"
                    .to_owned(),
            });
        }
        Reference::parse(image_ref).map_err(|e| WarmupError::InvalidArgument {
            field: "image",
            reason: describe(&e),
        })?;
        let platform = platform_string(&parse_platform(platform)?);

        let superseded = {
            let running = lock(&self.inner.running);
            match running.get(&name) {
                Some(r) if r.image_ref == image_ref && r.platform == platform => Some(Ok(r.task)),
                Some(r) => Some(Err((r.task, r.abort.clone()))),
                None => None,
            }
        };
        match superseded {
            Some(Ok(task)) => {
                if let Some(task) = self.inner.meta.get_task(task).await? {
                    if !task.state.is_terminal() {
                        return Ok(task);
                    }
                }
            }
            Some(Err((task, abort))) => {
                abort.abort();
                self.inner
                    .fail(
                        task,
                        &format!("superseded by a newer warmup of this template ({image_ref})"),
                    )
                    .await;
            }
            None => {}
        }
        let task = self
            .inner
            .meta
            .create_task(&name, image_ref, &platform)
            .await?;
        self.spawn(task.clone());
        Ok(task)
    }

    fn spawn(&self, task: WarmupTask) {
        let inner = self.inner.clone();
        let name = task.template.clone();
        let id = task.id;
        let entry = (task.image_ref.clone(), task.platform.clone());
        // The map stays locked until the task is registered, so the task's own removal
        // at its end always comes after its registration.
        let mut running = lock(&self.inner.running);
        // A child of the submitting request's span (none for a resumed task), so the
        // trace of a warmup call shows the work it started.
        let span = tracing::info_span!("warmup", template = %name, task = %id);
        let handle = tokio::spawn({
            let name = name.clone();
            async move {
                inner.run(task).await;
                let mut running = lock(&inner.running);
                if running.get(&name).is_some_and(|r| r.task == id) {
                    running.remove(&name);
                }
            }
            .instrument(span)
        });
        running.insert(
            name,
            Running {
                task: id,
                image_ref: entry.0,
                platform: entry.1,
                abort: handle.abort_handle(),
            },
        );
    }

    /// The latest task of `name` and its template, if it was ever published. A template
    /// that was deleted is not found, though its tasks stay on record.
    pub async fn status(
        &self,
        name: &TemplateName,
    ) -> Result<(WarmupTask, Option<Template>), WarmupError> {
        // The task first: a warmup that turns READY between the two reads is then seen
        // with its template (the template row is published before the task is marked).
        let task = self.inner.meta.latest_task(name).await?;
        let template = self.inner.meta.get_template(name).await?;
        match task {
            // A ready task without its template: the template was deleted since.
            Some(task) if task.state == TemplateState::Ready && template.is_none() => {
                Err(WarmupError::NotFound(name.clone()))
            }
            Some(task) => Ok((task, template)),
            None => Err(WarmupError::NotFound(name.clone())),
        }
    }

    /// Published templates (only in `state`, if given) and first warmups in progress,
    /// by name.
    pub async fn list(
        &self,
        state: Option<TemplateState>,
    ) -> Result<Vec<TemplateView>, WarmupError> {
        let mut views: Vec<TemplateView> = self
            .inner
            .meta
            .list_templates(state)
            .await?
            .into_iter()
            .map(TemplateView::from)
            .collect();
        views.extend(
            self.inner
                .meta
                .first_warmups()
                .await?
                .into_iter()
                .filter(|t| state.is_none_or(|s| s == t.state))
                .map(TemplateView::from),
        );
        views.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(views)
    }

    /// Removes template `name`: cancels its warmup if one runs, deletes its row, and
    /// deletes its root filesystem objects when no other template uses them. Refused
    /// ([`WarmupError::InUse`]) while sandboxes of it are live or nodes hold pool VMs of
    /// it, unless `force`: then those sandboxes keep running on the nodes' cached copies,
    /// and the nodes retire the pools of a template that is gone.
    pub async fn delete(&self, name: &TemplateName, force: bool) -> Result<(), WarmupError> {
        if !force {
            let users = self.inner.meta.template_users(name).await?;
            if users.sandboxes > 0 || users.pool_vms > 0 {
                return Err(WarmupError::InUse {
                    template: name.clone(),
                    sandboxes: users.sandboxes,
                    pool_vms: users.pool_vms,
                });
            }
        }
        let cancelled = lock(&self.inner.running).remove(name);
        if let Some(running) = &cancelled {
            running.abort.abort();
            self.inner
                .fail(running.task, "the template was deleted during its warmup")
                .await;
        }
        let Some(template) = self.inner.meta.get_template(name).await? else {
            return if cancelled.is_some() {
                Ok(())
            } else {
                Err(WarmupError::NotFound(name.clone()))
            };
        };
        let Some(key) = template.rootfs_key.clone() else {
            self.inner.meta.delete_template(name).await?;
            return Ok(());
        };
        let keys = RootfsKeys {
            info: sidecar_key(&key)?,
            ext4: ObjectKey::new(key)?,
        };
        let mut lock = self.inner.meta.lock_rootfs(keys.ext4.as_str()).await?;
        lock.delete_template(name).await?;
        if lock.users().await? == 0 {
            // Sidecar first: without it the ext4 no longer counts as built.
            self.inner.objects.delete(&keys.info).await?;
            self.inner.objects.delete(&keys.ext4).await?;
            tracing::info!(key = %keys.ext4, "deleted an unused root filesystem");
        }
        lock.commit().await?;
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep using it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inner {
    async fn fail(&self, task: Uuid, message: &str) {
        let update = TaskUpdate {
            state: Some(TemplateState::Failed),
            message: Some(message.to_owned()),
            ..TaskUpdate::default()
        };
        if let Err(e) = self.meta.update_task(task, &update).await {
            tracing::warn!(%task, error = %describe(&e), "could not record a failed warmup");
        }
    }

    async fn run(self: &Arc<Self>, task: WarmupTask) {
        let id = task.id;
        let started = std::time::Instant::now();
        let _running = metrics::Running::start();
        let tracker = Tracker::new(self.meta.clone(), id);
        let result = self.execute(&task, &tracker).await;
        tracker.stop().await;
        metrics::finished(result.is_ok(), started.elapsed());
        match result {
            Ok(()) => tracing::info!(task = %id, template = %task.template, "warmup ready"),
            Err(e) => {
                // What the client is told; an internal failure's detail is logged once,
                // under the error id the message carries, by public_message itself.
                let shown = e.public_message();
                tracing::warn!(task = %id, template = %task.template, error = %shown, "warmup failed");
                self.fail(id, &shown).await;
            }
        }
    }

    fn flight(&self, key: &ObjectKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut flights = lock(&self.flights);
        flights.retain(|_, m| Arc::strong_count(m) > 1);
        flights.entry(key.clone()).or_default().clone()
    }

    async fn execute(
        self: &Arc<Self>,
        task: &WarmupTask,
        tracker: &Tracker,
    ) -> Result<(), WarmupError> {
        let _permit = self
            .builders
            .acquire()
            .await
            .map_err(|_| WarmupError::Internal("the warmer is shutting down".to_owned()))?;
        tracker.set_state(TemplateState::Pulling).await?;
        let reference = Reference::parse(&task.image_ref).map_err(nanobox_oci::OciError::from)?;
        let mut options = self.config.registry.clone();
        options.platform = parse_platform(&task.platform)?;
        let client = RegistryClient::new(&self.config.work_dir.join("oci"), options)?;
        let remote = client.resolve(&reference).await?;
        tracker
            .resolved(
                &remote.digest,
                remote.manifest.layers.len(),
                remote.layer_bytes(),
            )
            .await?;
        let keys = rootfs_keys(&remote.digest, &self.init_version)?;

        let flight = self.flight(&keys.ext4);
        let _flight = flight.lock().await;
        let (info, uploaded) = match self.built(&keys).await? {
            Some(info) => {
                tracing::info!(key = %keys.ext4, "root filesystem already built");
                tracker.complete();
                (info, false)
            }
            None => (
                self.build(task, &client, &remote, &keys, tracker).await?,
                true,
            ),
        };
        match self.publish(task, &keys, &info).await {
            Ok(()) => {}
            Err(e) => {
                if uploaded {
                    self.discard_if_unused(&keys).await;
                }
                return Err(e);
            }
        }
        tracker.finish().await
    }

    /// The sidecar of an already built root filesystem, if there is one.
    async fn built(&self, keys: &RootfsKeys) -> Result<Option<RootfsInfo>, WarmupError> {
        let meta = match self.objects.head(&keys.info).await {
            Ok(meta) => meta,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let data = self.objects.get_range(&keys.info, 0, meta.size).await?;
        match serde_json::from_slice::<RootfsInfo>(&data) {
            Ok(info) => Ok(Some(info)),
            Err(e) => {
                tracing::warn!(key = %keys.info, error = %e, "unreadable sidecar; rebuilding");
                Ok(None)
            }
        }
    }

    async fn build(
        &self,
        task: &WarmupTask,
        client: &RegistryClient,
        remote: &nanobox_oci::RemoteImage,
        keys: &RootfsKeys,
        tracker: &Tracker,
    ) -> Result<RootfsInfo, WarmupError> {
        let pulled = client.fetch(remote, tracker).await?;
        tracker.set_state(TemplateState::Extracting).await?;
        let out = self
            .config
            .work_dir
            .join("builds")
            .join(format!("{}.ext4", task.id));
        let config = pulled.image.config.clone();
        let events = tracker.convert_events();
        let result = convert(
            pulled.layout,
            pulled.image,
            self.config.init.clone(),
            out.clone(),
            self.config.convert.clone(),
            events,
        )
        .await;
        let outcome = async {
            let image = result?;
            tracker.set_state(TemplateState::Uploading).await?;
            let meta = self.objects.put_file(&keys.ext4, &image.path).await?;
            let info = RootfsInfo {
                manifest_digest: remote.digest.clone(),
                init_version: self.init_version.clone(),
                size_bytes: meta.size,
                sha256: meta.sha256.clone().unwrap_or_default(),
                config,
            };
            let json = serde_json::to_vec_pretty(&info)
                .map_err(|e| WarmupError::Internal(format!("encoding the sidecar: {e}")))?;
            self.objects
                .put_bytes(&keys.info, Bytes::from(json))
                .await?;
            Ok(info)
        }
        .await;
        if let Err(e) = tokio::fs::remove_file(&out).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %out.display(), error = %e, "could not remove a build");
            }
        }
        if outcome.is_err() {
            self.discard_if_unused(keys).await;
        }
        outcome
    }

    async fn publish(
        &self,
        task: &WarmupTask,
        keys: &RootfsKeys,
        info: &RootfsInfo,
    ) -> Result<(), WarmupError> {
        let mut lock = self.meta.lock_rootfs(keys.ext4.as_str()).await?;
        // Under the lock: a delete that removed the object has finished, or waits.
        if self.built(keys).await?.is_none() {
            return Err(WarmupError::Internal(
                "the root filesystem was deleted while the template was being published; \
                 warm it up again"
                    .to_owned(),
            ));
        }
        lock.upsert_template(&TemplateRecord {
            name: task.template.clone(),
            image_ref: task.image_ref.clone(),
            manifest_digest: Some(info.manifest_digest.clone()),
            rootfs_key: Some(keys.ext4.to_string()),
            size_bytes: Some(info.size_bytes),
            image_config: info.config.clone(),
            state: TemplateState::Ready,
        })
        .await?;
        lock.commit().await?;
        Ok(())
    }

    /// Deletes the objects of `keys` when no template uses them (after a failed build).
    async fn discard_if_unused(&self, keys: &RootfsKeys) {
        let result = async {
            let mut lock = self.meta.lock_rootfs(keys.ext4.as_str()).await?;
            if lock.users().await? == 0 {
                self.objects.delete(&keys.info).await?;
                self.objects.delete(&keys.ext4).await?;
            }
            lock.commit().await?;
            Ok::<_, WarmupError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(key = %keys.ext4, error = %describe(&e), "could not discard a failed build");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms() {
        assert_eq!(
            parse_platform("").expect("default"),
            Platform::linux_amd64()
        );
        let arm = parse_platform("linux/arm64").expect("arm64");
        assert_eq!(platform_string(&arm), "linux/arm64");
        for bad in ["linux", "linux/", "/amd64", "linux/arm/v7", "linux/amd 64"] {
            let err = parse_platform(bad).expect_err(bad);
            assert!(
                matches!(
                    err,
                    WarmupError::InvalidArgument {
                        field: "platform",
                        ..
                    }
                ),
                "{bad}"
            );
        }
    }
}
