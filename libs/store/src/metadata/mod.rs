//! The metadata store: the small, mutable records that describe NanoBox's objects, in
//! PostgreSQL, behind a connection pool.
//!
//! The schema is versioned ([`migrate`]): embedded SQL files under `migrations/`, applied
//! in one transaction when a [`MetadataStore`] is opened. Tables now: `templates` (one row
//! per template name; several names may share one root filesystem object),
//! `warmup_tasks` (one row per warmup, with its progress), and for the scheduler `nodes`
//! and `sandboxes` (desired and observed state; see `cluster`).
//!
//! Migration 3 added `nodes` and `sandboxes` (the `sb-` ULID as id, `node_id` referencing
//! `nodes`), migration 4 a paused sandbox's snapshot columns; a `snapshots` table comes
//! with the snapshot store (issue 12), with the same conventions (upper-case TEXT states
//! with CHECKs, TIMESTAMPTZ `created_at`/`updated_at`, object keys as TEXT).
//! `sandboxes.template_name` has no foreign key to `templates` (finished sandboxes stay as
//! history), and nothing checks for sandboxes when a template is deleted: the
//! template-builder deletes templates in use (issue 11 makes it refuse without `force`).

mod cluster;
mod error;
pub mod migrate;

use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use nanobox_core::{ImageConfig, TemplateName, TemplateState};
use tokio_postgres::Row;
use uuid::Uuid;

pub use cluster::{
    NewSandbox, NodeObserved, NodeRecord, NodeReport, SandboxFilter, SandboxObservation,
    SandboxRecord, TemplateUsers,
};
pub use error::MetadataError;

const ALL_STATES: [TemplateState; 7] = [
    TemplateState::Queued,
    TemplateState::Pulling,
    TemplateState::Extracting,
    TemplateState::Building,
    TemplateState::Uploading,
    TemplateState::Ready,
    TemplateState::Failed,
];

fn parse_state(s: &str) -> Result<TemplateState, MetadataError> {
    ALL_STATES
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| MetadataError::Corrupt {
            what: "state",
            detail: s.to_owned(),
        })
}

/// A template as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: TemplateName,
    pub image_ref: String,
    pub manifest_digest: Option<String>,
    pub rootfs_key: Option<String>,
    pub size_bytes: Option<u64>,
    pub image_config: ImageConfig,
    pub state: TemplateState,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

/// What [`MetadataStore::upsert_template`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRecord {
    pub name: TemplateName,
    pub image_ref: String,
    pub manifest_digest: Option<String>,
    pub rootfs_key: Option<String>,
    pub size_bytes: Option<u64>,
    pub image_config: ImageConfig,
    pub state: TemplateState,
}

/// How far a warmup got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub layers_done: u32,
    pub layers_total: u32,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// A warmup task as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmupTask {
    pub id: Uuid,
    pub template: TemplateName,
    pub image_ref: String,
    /// The platform pulled, `os/arch[/variant]`.
    pub platform: String,
    pub manifest_digest: Option<String>,
    pub state: TemplateState,
    pub progress: Progress,
    /// Why the task failed.
    pub message: Option<String>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

/// A change to a warmup task. Fields left `None` keep their value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskUpdate {
    pub state: Option<TemplateState>,
    pub progress: Option<Progress>,
    pub manifest_digest: Option<String>,
    pub message: Option<String>,
}

/// The oldest schema the template reads of a node agent ([`MetadataStore::get_template`],
/// [`MetadataStore::latest_task`]) work with: migration 2 added the last column they read.
pub const READER_SCHEMA: i64 = 2;

/// Pool settings: how many connections the pool keeps, and how long a caller waits for
/// one.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub max_connections: usize,
    /// How long a caller waits for a free connection (and for a new one to be made).
    pub acquire_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

/// Typed access to the metadata database.
#[derive(Clone)]
pub struct MetadataStore {
    pool: Pool,
}

impl std::fmt::Debug for MetadataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataStore")
            .field("status", &self.pool.status())
            .finish()
    }
}

fn db(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> MetadataError {
    move |source| MetadataError::Db { context, source }
}

fn to_i64(value: u64, what: &'static str) -> Result<i64, MetadataError> {
    i64::try_from(value).map_err(|_| MetadataError::OutOfRange(what))
}

fn to_u64(value: i64, what: &'static str) -> Result<u64, MetadataError> {
    u64::try_from(value).map_err(|_| MetadataError::Corrupt {
        what,
        detail: value.to_string(),
    })
}

fn to_u32(value: i32, what: &'static str) -> Result<u32, MetadataError> {
    u32::try_from(value).map_err(|_| MetadataError::Corrupt {
        what,
        detail: value.to_string(),
    })
}

fn name_from(row: &Row, column: &str) -> Result<TemplateName, MetadataError> {
    let name: String = row.get(column);
    TemplateName::new(&name).map_err(|_| MetadataError::Corrupt {
        what: "template name",
        detail: name,
    })
}

const TEMPLATE_COLUMNS: &str = "name, image_ref, manifest_digest, rootfs_key, size_bytes, \
                                image_config, state, created_at, updated_at";
const TASK_COLUMNS: &str = "id, template_name, image_ref, platform, manifest_digest, state, \
                            layers_done, layers_total, bytes_done, bytes_total, message, \
                            created_at, updated_at";

fn template_from(row: &Row) -> Result<Template, MetadataError> {
    let config: serde_json::Value = row.get("image_config");
    Ok(Template {
        name: name_from(row, "name")?,
        image_ref: row.get("image_ref"),
        manifest_digest: row.get("manifest_digest"),
        rootfs_key: row.get("rootfs_key"),
        size_bytes: row
            .get::<_, Option<i64>>("size_bytes")
            .map(|s| to_u64(s, "size_bytes"))
            .transpose()?,
        image_config: serde_json::from_value(config).map_err(|e| MetadataError::Corrupt {
            what: "image_config",
            detail: e.to_string(),
        })?,
        state: parse_state(row.get("state"))?,
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    })
}

fn task_from(row: &Row) -> Result<WarmupTask, MetadataError> {
    Ok(WarmupTask {
        id: row.get("id"),
        template: name_from(row, "template_name")?,
        image_ref: row.get("image_ref"),
        platform: row.get("platform"),
        manifest_digest: row.get("manifest_digest"),
        state: parse_state(row.get("state"))?,
        progress: Progress {
            layers_done: to_u32(row.get("layers_done"), "layers_done")?,
            layers_total: to_u32(row.get("layers_total"), "layers_total")?,
            bytes_done: to_u64(row.get("bytes_done"), "bytes_done")?,
            bytes_total: to_u64(row.get("bytes_total"), "bytes_total")?,
        },
        message: row.get("message"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    })
}

async fn upsert_template(
    client: &tokio_postgres::Client,
    record: &TemplateRecord,
) -> Result<Template, MetadataError> {
    let config =
        serde_json::to_value(&record.image_config).map_err(|e| MetadataError::Corrupt {
            what: "image_config",
            detail: e.to_string(),
        })?;
    let size = record
        .size_bytes
        .map(|s| to_i64(s, "size_bytes"))
        .transpose()?;
    let row = client
        .query_one(
            &format!(
                "INSERT INTO templates
                     (name, image_ref, manifest_digest, rootfs_key, size_bytes, image_config, state)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (name) DO UPDATE SET
                     image_ref = EXCLUDED.image_ref,
                     manifest_digest = EXCLUDED.manifest_digest,
                     rootfs_key = EXCLUDED.rootfs_key,
                     size_bytes = EXCLUDED.size_bytes,
                     image_config = EXCLUDED.image_config,
                     state = EXCLUDED.state,
                     updated_at = now()
                 RETURNING {TEMPLATE_COLUMNS}"
            ),
            &[
                &record.name.as_str(),
                &record.image_ref,
                &record.manifest_digest,
                &record.rootfs_key,
                &size,
                &config,
                &record.state.as_str(),
            ],
        )
        .await
        .map_err(db("writing a template"))?;
    template_from(&row)
}

/// The lock on one root filesystem object ([`MetadataStore::lock_rootfs`]): an open
/// transaction holding a Postgres advisory lock. [`RootfsLock::commit`] makes its changes
/// durable and releases it; dropping it without a commit discards the connection, so
/// the server rolls back and releases the lock.
pub struct RootfsLock {
    client: Option<deadpool_postgres::Object>,
    key: String,
}

impl std::fmt::Debug for RootfsLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootfsLock")
            .field("key", &self.key)
            .finish()
    }
}

impl RootfsLock {
    fn client(&mut self) -> Result<&deadpool_postgres::Object, MetadataError> {
        self.client.as_ref().ok_or(MetadataError::Config(
            "the rootfs lock was already released".to_owned(),
        ))
    }

    /// The object key this lock covers.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// How many templates point at the object.
    pub async fn users(&mut self) -> Result<u64, MetadataError> {
        let key = self.key.clone();
        let row = self
            .client()?
            .query_one(
                "SELECT count(*) FROM templates WHERE rootfs_key = $1",
                &[&key],
            )
            .await
            .map_err(db("counting templates of a rootfs"))?;
        to_u64(row.get(0), "count")
    }

    /// Inserts or replaces a template, inside the lock's transaction.
    pub async fn upsert_template(
        &mut self,
        record: &TemplateRecord,
    ) -> Result<Template, MetadataError> {
        upsert_template(self.client()?, record).await
    }

    /// Removes a template inside the lock's transaction; returns whether it existed.
    pub async fn delete_template(&mut self, name: &TemplateName) -> Result<bool, MetadataError> {
        let n = self
            .client()?
            .execute("DELETE FROM templates WHERE name = $1", &[&name.as_str()])
            .await
            .map_err(db("deleting a template"))?;
        Ok(n > 0)
    }

    /// Commits the changes and releases the lock.
    pub async fn commit(mut self) -> Result<(), MetadataError> {
        let client = self.client()?;
        client
            .batch_execute("COMMIT")
            .await
            .map_err(db("committing a rootfs transaction"))?;
        self.client = None;
        Ok(())
    }
}

impl Drop for RootfsLock {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Mid-transaction: never hand this connection back to the pool. Dropping the
            // detached client closes it; the server rolls back and frees the lock.
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

impl MetadataStore {
    /// Builds the pool and brings the schema up to date (see [`migrate`]). Fails if the
    /// database cannot be reached or its schema is newer than this code.
    pub async fn open(
        config: tokio_postgres::Config,
        options: PoolOptions,
    ) -> Result<Self, MetadataError> {
        let store = Self::pooled(config, options)?;
        let mut client = store.client().await?;
        migrate::apply(&mut client, migrate::MIGRATIONS).await?;
        Ok(store)
    }

    /// Opens the database for reading only, as node agents do: no migrations are applied
    /// (an upgraded node never changes the schema under an older control plane, and a
    /// node needs no rights to change it), and every transaction of every connection is
    /// read-only (`default_transaction_read_only`), whatever the role could do. Refused,
    /// clearly, while the schema is older than [`READER_SCHEMA`]; a newer one is fine as
    /// long as the columns read are there, which migrations never take away.
    pub async fn open_read_only(
        mut config: tokio_postgres::Config,
        options: PoolOptions,
    ) -> Result<Self, MetadataError> {
        let mut startup = config.get_options().unwrap_or_default().to_owned();
        if !startup.is_empty() {
            startup.push(' ');
        }
        startup.push_str("-c default_transaction_read_only=on");
        config.options(&startup);
        let store = Self::pooled(config, options)?;
        let client = store.client().await?;
        // Postgres resolves every table a statement names, even in a branch not taken: ask
        // whether the table exists first.
        let exists: bool = client
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .await
            .map_err(db("reading the schema version"))?
            .get(0);
        let database: i64 = if exists {
            client
                .query_one(
                    "SELECT coalesce(max(version), 0) FROM schema_migrations",
                    &[],
                )
                .await
                .map_err(db("reading the schema version"))?
                .get(0)
        } else {
            0
        };
        if database < READER_SCHEMA {
            return Err(MetadataError::SchemaTooOld {
                database,
                needed: READER_SCHEMA,
            });
        }
        Ok(store)
    }

    /// The store over a pool of connections made with `config`, none made yet.
    fn pooled(config: tokio_postgres::Config, options: PoolOptions) -> Result<Self, MetadataError> {
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.acquire_timeout))
            .create_timeout(Some(options.acquire_timeout))
            .build()
            .map_err(|e| MetadataError::Config(e.to_string()))?;
        Ok(Self { pool })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, MetadataError> {
        self.pool.get().await.map_err(MetadataError::Pool)
    }

    /// The schema version of the database.
    pub async fn schema_version(&self) -> Result<i64, MetadataError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(db("reading the schema version"))?;
        Ok(row.get(0))
    }

    /// Inserts or replaces the template `record.name`; `created_at` survives a replace.
    pub async fn upsert_template(
        &self,
        record: &TemplateRecord,
    ) -> Result<Template, MetadataError> {
        let client = self.client().await?;
        upsert_template(&client, record).await
    }

    /// Takes the lock of the root filesystem object `key`, held until the returned
    /// guard is committed or dropped.
    ///
    /// Publishing a template that points at an object and deleting the last template of
    /// an object (then the object) both happen under this lock, so a delete never removes
    /// an object that a template is being published over. The lock is a Postgres
    /// transaction-scoped advisory lock, so it holds across every service replica and
    /// is released by the server if the holder dies.
    pub async fn lock_rootfs(&self, key: &str) -> Result<RootfsLock, MetadataError> {
        let client = self.client().await?;
        client
            .batch_execute("BEGIN")
            .await
            .map_err(db("starting a rootfs transaction"))?;
        let mut lock = RootfsLock {
            client: Some(client),
            key: key.to_owned(),
        };
        lock.client()?
            .execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                &[&key],
            )
            .await
            .map_err(db("taking a rootfs lock"))?;
        Ok(lock)
    }

    /// The latest unfinished warmup task of every template name that has no template
    /// row yet (names being warmed up for the first time), by name.
    pub async fn first_warmups(&self) -> Result<Vec<WarmupTask>, MetadataError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT DISTINCT ON (template_name) {TASK_COLUMNS} FROM warmup_tasks t
                     WHERE state NOT IN ('READY', 'FAILED')
                       AND NOT EXISTS (SELECT 1 FROM templates WHERE name = t.template_name)
                     ORDER BY template_name, created_at DESC, id DESC"
                ),
                &[],
            )
            .await
            .map_err(db("listing first warmups"))?;
        rows.iter().map(task_from).collect()
    }

    /// The template called `name`, if any.
    pub async fn get_template(
        &self,
        name: &TemplateName,
    ) -> Result<Option<Template>, MetadataError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {TEMPLATE_COLUMNS} FROM templates WHERE name = $1"),
                &[&name.as_str()],
            )
            .await
            .map_err(db("reading a template"))?;
        row.as_ref().map(template_from).transpose()
    }

    /// All templates (only those in `state`, if given), by name.
    pub async fn list_templates(
        &self,
        state: Option<TemplateState>,
    ) -> Result<Vec<Template>, MetadataError> {
        let client = self.client().await?;
        let state = state.map(TemplateState::as_str);
        let rows = client
            .query(
                &format!(
                    "SELECT {TEMPLATE_COLUMNS} FROM templates
                     WHERE $1::TEXT IS NULL OR state = $1 ORDER BY name"
                ),
                &[&state],
            )
            .await
            .map_err(db("listing templates"))?;
        rows.iter().map(template_from).collect()
    }

    /// Removes the template; returns whether it existed.
    pub async fn delete_template(&self, name: &TemplateName) -> Result<bool, MetadataError> {
        let client = self.client().await?;
        let n = client
            .execute("DELETE FROM templates WHERE name = $1", &[&name.as_str()])
            .await
            .map_err(db("deleting a template"))?;
        Ok(n > 0)
    }

    /// How many templates use the root filesystem object `key` (0 means it can go).
    pub async fn templates_using_rootfs(&self, key: &str) -> Result<u64, MetadataError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM templates WHERE rootfs_key = $1",
                &[&key],
            )
            .await
            .map_err(db("counting templates of a rootfs"))?;
        to_u64(row.get(0), "count")
    }

    /// Records a new warmup task of `image_ref` for `platform` (`os/arch[/variant]`),
    /// queued, with no progress.
    pub async fn create_task(
        &self,
        template: &TemplateName,
        image_ref: &str,
        platform: &str,
    ) -> Result<WarmupTask, MetadataError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO warmup_tasks (id, template_name, image_ref, platform, state)
                     VALUES ($1, $2, $3, $4, $5) RETURNING {TASK_COLUMNS}"
                ),
                &[
                    &Uuid::now_v7(),
                    &template.as_str(),
                    &image_ref,
                    &platform,
                    &TemplateState::Queued.as_str(),
                ],
            )
            .await
            .map_err(db("creating a warmup task"))?;
        task_from(&row)
    }

    /// Applies `update` to an unfinished task. A finished task (ready or failed) is
    /// never changed again: [`MetadataError::TaskFinished`].
    pub async fn update_task(
        &self,
        id: Uuid,
        update: &TaskUpdate,
    ) -> Result<WarmupTask, MetadataError> {
        let p = update.progress;
        let layers_done = p.map(|p| p.layers_done.min(i32::MAX as u32) as i32);
        let layers_total = p.map(|p| p.layers_total.min(i32::MAX as u32) as i32);
        let bytes_done = p.map(|p| to_i64(p.bytes_done, "bytes_done")).transpose()?;
        let bytes_total = p
            .map(|p| to_i64(p.bytes_total, "bytes_total"))
            .transpose()?;
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE warmup_tasks SET
                         state = coalesce($2, state),
                         layers_done = coalesce($3, layers_done),
                         layers_total = coalesce($4, layers_total),
                         bytes_done = coalesce($5, bytes_done),
                         bytes_total = coalesce($6, bytes_total),
                         manifest_digest = coalesce($7, manifest_digest),
                         message = coalesce($8, message),
                         updated_at = now()
                     WHERE id = $1 AND state NOT IN ('READY', 'FAILED')
                     RETURNING {TASK_COLUMNS}"
                ),
                &[
                    &id,
                    &update.state.map(TemplateState::as_str),
                    &layers_done,
                    &layers_total,
                    &bytes_done,
                    &bytes_total,
                    &update.manifest_digest,
                    &update.message,
                ],
            )
            .await
            .map_err(db("updating a warmup task"))?;
        match row {
            Some(row) => task_from(&row),
            None => match self.get_task(id).await? {
                Some(task) => Err(MetadataError::TaskFinished {
                    id,
                    state: task.state,
                }),
                None => Err(MetadataError::TaskNotFound(id)),
            },
        }
    }

    /// The task with this id, if any.
    pub async fn get_task(&self, id: Uuid) -> Result<Option<WarmupTask>, MetadataError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {TASK_COLUMNS} FROM warmup_tasks WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(db("reading a warmup task"))?;
        row.as_ref().map(task_from).transpose()
    }

    /// The most recent task of a template, if any.
    pub async fn latest_task(
        &self,
        template: &TemplateName,
    ) -> Result<Option<WarmupTask>, MetadataError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {TASK_COLUMNS} FROM warmup_tasks WHERE template_name = $1
                     ORDER BY created_at DESC, id DESC LIMIT 1"
                ),
                &[&template.as_str()],
            )
            .await
            .map_err(db("reading the latest warmup task"))?;
        row.as_ref().map(task_from).transpose()
    }

    /// Tasks neither ready nor failed, oldest first (to resume or fail after a restart).
    pub async fn unfinished_tasks(&self) -> Result<Vec<WarmupTask>, MetadataError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {TASK_COLUMNS} FROM warmup_tasks
                     WHERE state NOT IN ('READY', 'FAILED') ORDER BY created_at, id"
                ),
                &[],
            )
            .await
            .map_err(db("listing unfinished warmup tasks"))?;
        rows.iter().map(task_from).collect()
    }
}
