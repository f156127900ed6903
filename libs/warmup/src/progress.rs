//! A warmup task's progress: updated from download and conversion callbacks (cheap
//! atomics), written to Postgres by a flusher a few times a second, and on every state
//! change at once. All writes go through one lock that is held while the values are
//! read, so a state can never be overwritten by an older one.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nanobox_core::TemplateState;
use nanobox_oci::{ConvertEvent, PullProgress};
use nanobox_store::metadata::{Progress, TaskUpdate};
use nanobox_store::MetadataStore;
use uuid::Uuid;

use crate::WarmupError;

/// How often pending progress is written.
const FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// No state change pending (the [`Shared::pending_state`] encoding).
const NO_STATE: u8 = 0;

struct Shared {
    meta: MetadataStore,
    id: Uuid,
    layers_done: AtomicU32,
    layers_total: AtomicU32,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    dirty: AtomicBool,
    /// A state change requested from a synchronous callback, for the flusher.
    pending_state: AtomicU8,
    write: tokio::sync::Mutex<()>,
}

fn encode(state: TemplateState) -> u8 {
    match state {
        TemplateState::Queued => 1,
        TemplateState::Pulling => 2,
        TemplateState::Extracting => 3,
        TemplateState::Building => 4,
        TemplateState::Uploading => 5,
        TemplateState::Ready => 6,
        TemplateState::Failed => 7,
    }
}

fn decode(value: u8) -> Option<TemplateState> {
    Some(match value {
        1 => TemplateState::Queued,
        2 => TemplateState::Pulling,
        3 => TemplateState::Extracting,
        4 => TemplateState::Building,
        5 => TemplateState::Uploading,
        6 => TemplateState::Ready,
        7 => TemplateState::Failed,
        _ => return None,
    })
}

impl Shared {
    fn progress(&self) -> Progress {
        let bytes_total = self.bytes_total.load(Ordering::Relaxed);
        let layers_total = self.layers_total.load(Ordering::Relaxed);
        Progress {
            // Retried downloads count their bytes twice; never show more than all.
            bytes_done: self.bytes_done.load(Ordering::Relaxed).min(bytes_total),
            bytes_total,
            layers_done: self.layers_done.load(Ordering::Relaxed).min(layers_total),
            layers_total,
        }
    }

    /// Writes pending progress (and a pending state) if there is any.
    async fn flush(&self) -> Result<(), WarmupError> {
        let _write = self.write.lock().await;
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let update = TaskUpdate {
            state: decode(self.pending_state.swap(NO_STATE, Ordering::AcqRel)),
            progress: Some(self.progress()),
            ..TaskUpdate::default()
        };
        self.meta.update_task(self.id, &update).await?;
        Ok(())
    }

    async fn write(&self, mut update: TaskUpdate) -> Result<(), WarmupError> {
        let _write = self.write.lock().await;
        self.pending_state.store(NO_STATE, Ordering::Release);
        self.dirty.store(false, Ordering::Release);
        update.progress = Some(self.progress());
        self.meta.update_task(self.id, &update).await?;
        Ok(())
    }
}

/// Tracks one task; stops its flusher when dropped.
pub(crate) struct Tracker {
    shared: Arc<Shared>,
    flusher: tokio::task::AbortHandle,
}

impl Tracker {
    pub(crate) fn new(meta: MetadataStore, id: Uuid) -> Self {
        let shared = Arc::new(Shared {
            meta,
            id,
            layers_done: AtomicU32::new(0),
            layers_total: AtomicU32::new(0),
            bytes_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            pending_state: AtomicU8::new(NO_STATE),
            write: tokio::sync::Mutex::new(()),
        });
        let flusher = tokio::spawn({
            let shared = shared.clone();
            async move {
                let mut tick = tokio::time::interval(FLUSH_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = shared.flush().await {
                        tracing::debug!(task = %shared.id, error = %e, "progress not written");
                    }
                }
            }
        })
        .abort_handle();
        Self { shared, flusher }
    }

    /// Moves the task to `state`, now.
    pub(crate) async fn set_state(&self, state: TemplateState) -> Result<(), WarmupError> {
        self.shared
            .write(TaskUpdate {
                state: Some(state),
                ..TaskUpdate::default()
            })
            .await
    }

    /// Records the resolved manifest: its digest and what there is to pull.
    pub(crate) async fn resolved(
        &self,
        digest: &str,
        layers: usize,
        bytes: u64,
    ) -> Result<(), WarmupError> {
        self.shared
            .layers_total
            .store(u32::try_from(layers).unwrap_or(u32::MAX), Ordering::Relaxed);
        self.shared.bytes_total.store(bytes, Ordering::Relaxed);
        self.shared
            .write(TaskUpdate {
                manifest_digest: Some(digest.to_owned()),
                ..TaskUpdate::default()
            })
            .await
    }

    /// Everything is done (the root filesystem was found built).
    pub(crate) fn complete(&self) {
        let s = &self.shared;
        s.bytes_done
            .store(s.bytes_total.load(Ordering::Relaxed), Ordering::Relaxed);
        s.layers_done
            .store(s.layers_total.load(Ordering::Relaxed), Ordering::Relaxed);
        s.dirty.store(true, Ordering::Release);
    }

    /// Marks the task ready, with complete progress.
    pub(crate) async fn finish(&self) -> Result<(), WarmupError> {
        self.complete();
        self.set_state(TemplateState::Ready).await
    }

    /// The callback for [`nanobox_oci::convert`].
    pub(crate) fn convert_events(&self) -> Arc<dyn Fn(ConvertEvent) + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move |event| {
            match event {
                ConvertEvent::LayerApplied { done, .. } => shared
                    .layers_done
                    .store(u32::try_from(done).unwrap_or(u32::MAX), Ordering::Relaxed),
                ConvertEvent::Building { .. } => shared
                    .pending_state
                    .store(encode(TemplateState::Building), Ordering::Release),
            }
            shared.dirty.store(true, Ordering::Release);
        })
    }

    /// Stops the flusher (pending progress is dropped; a final state write follows).
    pub(crate) async fn stop(&self) {
        self.flusher.abort();
        // Wait out a write in flight, so nothing lands after the caller's final write.
        let _write = self.shared.write.lock().await;
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.flusher.abort();
    }
}

impl PullProgress for Tracker {
    fn bytes(&self, n: u64) {
        self.shared.bytes_done.fetch_add(n, Ordering::Relaxed);
        self.shared.dirty.store(true, Ordering::Release);
    }

    fn layer_done(&self, size: u64, downloaded: bool) {
        if !downloaded {
            // Found in the cache: its bytes never streamed past `bytes`.
            self.shared.bytes_done.fetch_add(size, Ordering::Relaxed);
            self.shared.dirty.store(true, Ordering::Release);
        }
    }
}
