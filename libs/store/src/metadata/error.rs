//! Errors of the metadata store.

/// Errors of [`crate::MetadataStore`].
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The pool could not be built from the settings.
    #[error("invalid metadata database settings: {0}")]
    Config(String),
    /// No connection could be had from the pool (database down, pool exhausted).
    #[error("no database connection")]
    Pool(#[source] deadpool_postgres::PoolError),
    /// A query failed.
    #[error("database error while {context}")]
    Db {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A migration's SQL failed; nothing of that start-up's migrations was applied.
    #[error("schema migration {version} ({name}) failed")]
    Migration {
        version: i64,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The database was migrated by newer code; this code must not use it.
    #[error(
        "the database schema is at version {database}, older than the {needed} this service \
         reads; the scheduler and the template-builder apply migrations: start one first"
    )]
    SchemaTooOld { database: i64, needed: i64 },
    #[error("the database schema is at version {database}, newer than this build knows ({known}); upgrade NanoBox")]
    SchemaTooNew { database: i64, known: i64 },
    /// An applied migration differs from the one this code has (history was edited).
    #[error("applied schema migration {version} ({name}) does not match this build's migration of that version")]
    MigrationChanged { version: i64, name: String },
    /// No warmup task with this id.
    #[error("warmup task {0} not found")]
    TaskNotFound(uuid::Uuid),
    /// The warmup task has already ended (ready or failed) and cannot change any more.
    #[error("warmup task {id} has already finished ({state})")]
    TaskFinished {
        id: uuid::Uuid,
        state: nanobox_core::TemplateState,
    },
    /// A row holds a value this code cannot read (an unknown state, bad JSON).
    #[error("unreadable {what} in the database: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// A value does not fit the database column (sizes past i64::MAX).
    #[error("{0} is out of range for the database")]
    OutOfRange(&'static str),
}

impl MetadataError {
    /// Whether trying again later may succeed: connection failures, an exhausted pool,
    /// serialization failures, deadlocks, a server shutting down.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Pool(e) => !matches!(e, deadpool_postgres::PoolError::NoRuntimeSpecified),
            Self::Db { source, .. } => is_retryable_db(source),
            _ => false,
        }
    }
}

fn is_retryable_db(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let code = code.code();
            // 08: connection exceptions; 40001 serialization failure; 40P01 deadlock;
            // 53300 too many connections; 57P01..03 shutdown / cannot connect now.
            code.starts_with("08")
                || matches!(
                    code,
                    "40001" | "40P01" | "53300" | "57P01" | "57P02" | "57P03"
                )
        }
        // No SQLSTATE: an I/O or protocol failure on the connection.
        None => true,
    }
}
