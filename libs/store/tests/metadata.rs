//! The metadata store against a real, private PostgreSQL started by the test kit: each
//! test gets its own server and database.

use nanobox_core::{ImageConfig, TemplateName, TemplateState};
use nanobox_store::metadata::{migrate, PoolOptions, Progress, TaskUpdate, TemplateRecord};
use nanobox_store::{MetadataError, MetadataStore};
use nanobox_testkit::postgres::Postgres;

async fn open(config: tokio_postgres::Config) -> Result<MetadataStore, MetadataError> {
    MetadataStore::open(config, PoolOptions::default()).await
}

async fn fresh() -> (Postgres, tokio_postgres::Config, MetadataStore) {
    let pg = Postgres::start().await;
    let config = pg.create_database().await;
    let store = open(config.clone()).await.unwrap_or_else(|e| panic!("{e}"));
    (pg, config, store)
}

async fn raw(config: &tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(connection);
    client
}

fn name(s: &str) -> TemplateName {
    TemplateName::new(s).unwrap_or_else(|e| panic!("{e}"))
}

fn record(n: &str, state: TemplateState) -> TemplateRecord {
    TemplateRecord {
        name: name(n),
        image_ref: format!("docker.io/library/{n}:latest"),
        manifest_digest: Some(format!("sha256:{}", "ab".repeat(32))),
        rootfs_key: Some(format!("rootfs/{n}.ext4")),
        size_bytes: Some(123 << 20),
        image_config: ImageConfig {
            env: vec!["PATH=/usr/bin:/bin".into(), "LANG=C.UTF-8".into()],
            working_dir: "/app".into(),
            user: "1000:1000".into(),
            entrypoint: vec!["/usr/bin/node".into()],
            cmd: vec!["index.js".into(), "--flag=\"quoted\"".into()],
        },
        state,
    }
}

/// Opening applies the migrations once; opening again changes nothing.
#[tokio::test]
async fn migrations_apply_once() {
    let (_pg, config, store) = fresh().await;
    assert_eq!(
        store
            .schema_version()
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        migrate::latest_version()
    );
    let again = open(config.clone()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        again
            .schema_version()
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        migrate::latest_version()
    );
    let client = raw(&config).await;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .get(0);
    assert_eq!(rows, migrate::MIGRATIONS.len() as i64);
}

/// Several services starting at once against an empty database all succeed.
#[tokio::test]
async fn concurrent_start_ups_migrate_once() {
    let pg = Postgres::start().await;
    let config = pg.create_database().await;
    let results = futures::future::join_all((0..4).map(|_| open(config.clone()))).await;
    for result in results {
        result.unwrap_or_else(|e| panic!("concurrent open: {e}"));
    }
    let client = raw(&config).await;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .get(0);
    assert_eq!(rows, migrate::MIGRATIONS.len() as i64);
}

/// A database migrated by newer code is refused.
#[tokio::test]
async fn newer_schema_is_refused() {
    let (_pg, config, _store) = fresh().await;
    raw(&config)
        .await
        .execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'future', 'x')",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match open(config).await {
        Err(MetadataError::SchemaTooNew { database, known }) => {
            assert_eq!(database, 9999);
            assert_eq!(known, migrate::latest_version());
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

/// An applied migration that no longer matches the code's is refused.
#[tokio::test]
async fn edited_migration_history_is_refused() {
    let (_pg, config, _store) = fresh().await;
    raw(&config)
        .await
        .execute(
            "UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match open(config).await {
        Err(MetadataError::MigrationChanged { version: 1, .. }) => {}
        other => panic!("expected MigrationChanged, got {other:?}"),
    }
}

/// An unreachable database is reported as a retryable pool error.
#[tokio::test]
async fn unreachable_database_is_retryable() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut config = tokio_postgres::Config::new();
    config.host_path(dir.path()).user("postgres").dbname("none");
    let options = PoolOptions {
        max_connections: 1,
        acquire_timeout: std::time::Duration::from_secs(5),
    };
    match MetadataStore::open(config, options).await {
        Err(e @ MetadataError::Pool(_)) => assert!(e.is_retryable(), "{e}"),
        other => panic!("expected a pool error, got {other:?}"),
    }
}

#[tokio::test]
async fn templates_round_trip() {
    let (_pg, _config, store) = fresh().await;
    let rec = record("node-22", TemplateState::Building);
    let created = store
        .upsert_template(&rec)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(created.name, rec.name);
    assert_eq!(created.image_config, rec.image_config);
    assert_eq!(created.size_bytes, Some(123 << 20));
    assert_eq!(created.state, TemplateState::Building);
    let got = store
        .get_template(&rec.name)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("template missing"));
    assert_eq!(got, created);

    // Replacing keeps created_at and moves updated_at forward (or leaves it equal).
    let mut ready = rec.clone();
    ready.state = TemplateState::Ready;
    ready.image_config = ImageConfig::default();
    ready.size_bytes = None;
    let updated = store
        .upsert_template(&ready)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(updated.state, TemplateState::Ready);
    assert_eq!(updated.image_config, ImageConfig::default());
    assert_eq!(updated.size_bytes, None);
    assert_eq!(updated.created_at, created.created_at);
    assert!(updated.updated_at >= created.updated_at);

    assert!(store
        .get_template(&name("absent"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .is_none());
}

#[tokio::test]
async fn templates_list_filter_and_delete() {
    let (_pg, _config, store) = fresh().await;
    for (n, state) in [
        ("c-tmpl", TemplateState::Ready),
        ("a-tmpl", TemplateState::Failed),
        ("b-tmpl", TemplateState::Ready),
    ] {
        store
            .upsert_template(&record(n, state))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let names = |ts: Vec<nanobox_store::metadata::Template>| -> Vec<String> {
        ts.into_iter().map(|t| t.name.to_string()).collect()
    };
    let all = store
        .list_templates(None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(names(all), ["a-tmpl", "b-tmpl", "c-tmpl"]);
    let ready = store
        .list_templates(Some(TemplateState::Ready))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(names(ready), ["b-tmpl", "c-tmpl"]);

    // Two names over one rootfs object: it stays in use until both are gone.
    let mut alias = record("alias", TemplateState::Ready);
    alias.rootfs_key = Some("rootfs/b-tmpl.ext4".into());
    store
        .upsert_template(&alias)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let users = |store: &MetadataStore| {
        let store = store.clone();
        async move {
            store
                .templates_using_rootfs("rootfs/b-tmpl.ext4")
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    assert_eq!(users(&store).await, 2);
    assert!(store
        .delete_template(&name("b-tmpl"))
        .await
        .unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(users(&store).await, 1);
    assert!(!store
        .delete_template(&name("b-tmpl"))
        .await
        .unwrap_or_else(|e| panic!("{e}")));
    assert!(store
        .delete_template(&name("alias"))
        .await
        .unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(users(&store).await, 0);
}

#[tokio::test]
async fn warmup_tasks_progress_and_finish() {
    let (_pg, _config, store) = fresh().await;
    let tmpl = name("python");
    let task = store
        .create_task(&tmpl, "python:3.12", "linux/amd64")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(task.state, TemplateState::Queued);
    assert_eq!(task.progress, Progress::default());
    assert_eq!(task.message, None);

    let progress = Progress {
        layers_done: 1,
        layers_total: 3,
        bytes_done: 5 << 30,
        bytes_total: 6 << 30,
    };
    let pulled = store
        .update_task(
            task.id,
            &TaskUpdate {
                state: Some(TemplateState::Pulling),
                progress: Some(progress),
                manifest_digest: Some("sha256:feed".into()),
                message: None,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pulled.state, TemplateState::Pulling);
    assert_eq!(pulled.progress, progress);
    assert_eq!(pulled.manifest_digest.as_deref(), Some("sha256:feed"));
    // A state-only update keeps the progress and digest.
    let building = store
        .update_task(
            task.id,
            &TaskUpdate {
                state: Some(TemplateState::Building),
                ..TaskUpdate::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(building.progress, progress);
    assert_eq!(building.manifest_digest.as_deref(), Some("sha256:feed"));
    assert_eq!(
        store
            .get_task(task.id)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Some(building.clone())
    );
    assert_eq!(
        store
            .unfinished_tasks()
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        vec![building]
    );

    let failed = store
        .update_task(
            task.id,
            &TaskUpdate {
                state: Some(TemplateState::Failed),
                message: Some("manifest unknown: python:3.12".into()),
                ..TaskUpdate::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        failed.message.as_deref(),
        Some("manifest unknown: python:3.12")
    );
    assert!(store
        .unfinished_tasks()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .is_empty());

    // Finished tasks do not change any more.
    match store
        .update_task(
            task.id,
            &TaskUpdate {
                state: Some(TemplateState::Ready),
                ..TaskUpdate::default()
            },
        )
        .await
    {
        Err(MetadataError::TaskFinished { state, .. }) => assert_eq!(state, TemplateState::Failed),
        other => panic!("expected TaskFinished, got {other:?}"),
    }
    let missing = uuid::Uuid::now_v7();
    match store.update_task(missing, &TaskUpdate::default()).await {
        Err(MetadataError::TaskNotFound(id)) => assert_eq!(id, missing),
        other => panic!("expected TaskNotFound, got {other:?}"),
    }
    assert!(store
        .get_task(missing)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .is_none());

    // The latest task of a template is the newest one.
    let second = store
        .create_task(&tmpl, "python:3.13", "linux/amd64")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let latest = store
        .latest_task(&tmpl)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no latest task"));
    assert_eq!(latest.id, second.id);
    assert!(store
        .latest_task(&name("other"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .is_none());
}

/// Sizes that do not fit the database are refused before they reach it.
#[tokio::test]
async fn out_of_range_sizes_are_refused() {
    let (_pg, _config, store) = fresh().await;
    let mut rec = record("huge", TemplateState::Ready);
    rec.size_bytes = Some(u64::MAX);
    match store.upsert_template(&rec).await {
        Err(MetadataError::OutOfRange("size_bytes")) => {}
        other => panic!("expected OutOfRange, got {other:?}"),
    }
}

/// The rootfs lock serialises publishers and deleters of one object across connections,
/// its changes land only on commit, and a dropped lock rolls back and frees the lock.
#[tokio::test]
async fn rootfs_lock_serialises_and_rolls_back() {
    let (_pg, _config, store) = fresh().await;
    let key = "rootfs/node.ext4";

    // Dropped without commit: nothing written, and the lock is free again.
    let mut lock = store.lock_rootfs(key).await.unwrap();
    lock.upsert_template(&record("node", TemplateState::Ready))
        .await
        .unwrap();
    drop(lock);
    assert_eq!(store.get_template(&name("node")).await.unwrap(), None);

    let mut first = store.lock_rootfs(key).await.unwrap();
    first
        .upsert_template(&record("node", TemplateState::Ready))
        .await
        .unwrap();
    assert_eq!(first.users().await.unwrap(), 1);

    // A second holder waits until the first commits, then sees its row.
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut second = store.lock_rootfs(key).await.unwrap();
            let users = second.users().await.unwrap();
            assert!(second.delete_template(&name("node")).await.unwrap());
            let left = second.users().await.unwrap();
            second.commit().await.unwrap();
            (users, left)
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the second lock did not wait");
    first.commit().await.unwrap();
    let (users, left) = waiter.await.unwrap();
    assert_eq!((users, left), (1, 0));
    assert_eq!(store.get_template(&name("node")).await.unwrap(), None);
}

/// `first_warmups` lists names being warmed up that have no template yet.
#[tokio::test]
async fn first_warmups_are_names_without_a_template() {
    let (_pg, _config, store) = fresh().await;
    store
        .upsert_template(&record("ready", TemplateState::Ready))
        .await
        .unwrap();
    store
        .create_task(&name("ready"), "ready:2", "linux/amd64")
        .await
        .unwrap();
    let fresh_task = store
        .create_task(&name("fresh"), "fresh:1", "linux/arm64")
        .await
        .unwrap();
    let failed = store
        .create_task(&name("failed"), "failed:1", "linux/amd64")
        .await
        .unwrap();
    store
        .update_task(
            failed.id,
            &TaskUpdate {
                state: Some(TemplateState::Failed),
                message: Some("no such image".into()),
                ..TaskUpdate::default()
            },
        )
        .await
        .unwrap();
    let first = store.first_warmups().await.unwrap();
    assert_eq!(first, vec![fresh_task.clone()]);
    assert_eq!(first[0].platform, "linux/arm64");
}

#[tokio::test]
async fn a_read_only_store_migrates_nothing_writes_nothing_and_says_when_the_schema_is_missing() {
    let pg = Postgres::start().await;
    let config = pg.create_database().await;
    // A database no control-plane service has migrated yet: refused, with what to do.
    let err = MetadataStore::open_read_only(config.clone(), PoolOptions::default())
        .await
        .err()
        .unwrap_or_else(|| panic!("opened an unmigrated database"));
    assert!(
        matches!(
            err,
            MetadataError::SchemaTooOld {
                database: 0,
                needed: 2
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("start one first"), "{err}");
    let tables = raw(&config)
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tables.get::<_, i64>(0), 0, "it created nothing");

    // Migrated by a control-plane service: reads work, writes are refused by Postgres.
    let writer = open(config.clone()).await.unwrap_or_else(|e| panic!("{e}"));
    writer
        .upsert_template(&record("web", TemplateState::Ready))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let reader = MetadataStore::open_read_only(config, PoolOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = reader
        .get_template(&name("web"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.map(|t| t.state), Some(TemplateState::Ready));
    let err = reader
        .upsert_template(&record("other", TemplateState::Ready))
        .await
        .err()
        .unwrap_or_else(|| panic!("a read-only store wrote"));
    assert!(
        format!("{err:?}").contains("read-only transaction"),
        "{err:?}"
    );
}
