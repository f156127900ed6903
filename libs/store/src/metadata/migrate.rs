//! Versioned schema migrations: SQL files embedded at build time, applied in order at
//! start-up in one transaction, recorded in `schema_migrations`.
//!
//! A start-up takes an advisory lock first, so services starting together apply each
//! migration once. A database whose schema is newer than this code (a rollback of the
//! binary) is refused rather than used; so is one where an applied migration's SQL no
//! longer matches the file (history was edited).

use sha2::{Digest as _, Sha256};

use super::MetadataError;

/// One migration: a version (strictly increasing), a name and its SQL.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration this code knows, in order. Add new files at the end; never edit one
/// that has shipped.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "templates_and_warmup_tasks",
        sql: include_str!("../../migrations/0001_templates_and_warmup_tasks.sql"),
    },
    Migration {
        version: 2,
        name: "warmup_task_platform",
        sql: include_str!("../../migrations/0002_warmup_task_platform.sql"),
    },
    Migration {
        version: 3,
        name: "nodes_and_sandboxes",
        sql: include_str!("../../migrations/0003_nodes_and_sandboxes.sql"),
    },
    Migration {
        version: 4,
        name: "sandbox_snapshots",
        sql: include_str!("../../migrations/0004_sandbox_snapshots.sql"),
    },
];

/// The schema version this code expects.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Key of the advisory lock that serialises migrations ("nanobox" in ASCII).
const LOCK_KEY: i64 = 0x006e_616e_6f62_6f78;

fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// Applies the missing `migrations` in one transaction. Returns the versions applied.
pub(crate) async fn apply(
    client: &mut tokio_postgres::Client,
    migrations: &[Migration],
) -> Result<Vec<i64>, MetadataError> {
    let db = |context: &'static str| move |source| MetadataError::Db { context, source };
    let tx = client
        .transaction()
        .await
        .map_err(db("starting the migration transaction"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(db("taking the migration lock"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    BIGINT PRIMARY KEY,
             name       TEXT NOT NULL,
             checksum   TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(db("creating schema_migrations"))?;
    let rows = tx
        .query(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(db("reading schema_migrations"))?;
    let known = migrations.last().map_or(0, |m| m.version);
    let mut applied = std::collections::BTreeSet::new();
    for row in &rows {
        let version: i64 = row.get(0);
        let name: String = row.get(1);
        let sum: String = row.get(2);
        if version > known {
            return Err(MetadataError::SchemaTooNew {
                database: version,
                known,
            });
        }
        match migrations.iter().find(|m| m.version == version) {
            Some(m) if m.name == name && checksum(m.sql) == sum => {}
            _ => return Err(MetadataError::MigrationChanged { version, name }),
        }
        applied.insert(version);
    }
    let mut done = Vec::new();
    for migration in migrations.iter().filter(|m| !applied.contains(&m.version)) {
        tx.batch_execute(migration.sql)
            .await
            .map_err(|source| MetadataError::Migration {
                version: migration.version,
                name: migration.name,
                source,
            })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[
                &migration.version,
                &migration.name,
                &checksum(migration.sql),
            ],
        )
        .await
        .map_err(db("recording a migration"))?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied schema migration"
        );
        done.push(migration.version);
    }
    tx.commit().await.map_err(db("committing the migrations"))?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase() {
        let mut last = 0;
        for m in MIGRATIONS {
            assert!(m.version > last, "migration {} out of order", m.version);
            last = m.version;
        }
        assert_eq!(latest_version(), last);
    }

    async fn connect(config: tokio_postgres::Config) -> tokio_postgres::Client {
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(connection);
        client
    }

    /// A migration that fails rolls back every migration of that start-up, including the
    /// ones before it that succeeded.
    #[tokio::test]
    async fn a_failing_migration_rolls_back_the_whole_start_up() {
        let pg = nanobox_testkit::postgres::Postgres::start().await;
        let mut client = connect(pg.create_database().await).await;
        let migrations = [
            Migration {
                version: 1,
                name: "good",
                sql: "CREATE TABLE good (x INT)",
            },
            Migration {
                version: 2,
                name: "bad",
                sql: "CREATE TABLE bad (x NO_SUCH_TYPE)",
            },
        ];
        match apply(&mut client, &migrations).await {
            Err(MetadataError::Migration { version: 2, .. }) => {}
            other => panic!("expected migration 2 to fail, got {other:?}"),
        }
        let tables: i64 = client
            .query_one(
                "SELECT count(*) FROM information_schema.tables
                 WHERE table_name IN ('good', 'schema_migrations')",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .get(0);
        assert_eq!(tables, 0, "a failed start-up left tables behind");
        // With the bad one fixed, both apply; a second run applies nothing.
        let fixed = [
            migrations[0],
            Migration {
                version: 2,
                name: "bad",
                sql: "CREATE TABLE bad (x INT)",
            },
        ];
        let done = apply(&mut client, &fixed)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(done, vec![1, 2]);
        let again = apply(&mut client, &fixed)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(again.is_empty());
    }
}
