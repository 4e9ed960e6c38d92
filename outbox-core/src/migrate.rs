//! The SQL migrations, run with refinery over an sqlx pool.
//!
//! A [`Schema`] is one independent set of migrations with its own history
//! table. Each crate ships the set it needs:
//!
//! | schema | files | history table | lives in |
//! |---|---|---|---|
//! | [`OUTBOX`] (this crate) | `outbox-core/migrations/V*__*.sql` | `outbox_schema_history` | the producer's database |
//! | `consumer_kit::SCHEMA` | `consumer-kit/migrations/V*__*.sql` | `consumer_kit_schema_history` | each consumer's database |
//!
//! The files are plain PostgreSQL in refinery's naming, so they can also be
//! applied with psql or Flyway (then skip [`Schema::apply`]; it would see an
//! empty history and try again). Applying twice is a no-op. Migrations are
//! forward-only: an applied file whose content changed is refused with
//! [`MigrateError::Changed`]. `docs/schema.md` documents every table.
//!
//! Concurrent runs (several relays starting at once) serialize on a
//! PostgreSQL advisory lock, so each migration applies once.

use futures_core::future::BoxFuture;
use refinery::{Migration, Runner};
use refinery_core::traits::r#async::{AsyncMigrate, AsyncQuery, AsyncTransaction};
use sqlx::{pool::PoolConnection, postgres::PgRow, PgPool, Postgres, Row};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

mod outbox_files {
    refinery::embed_migrations!("migrations");
}

/// The outbox schema: the `outbox` table, its notify trigger, the relays'
/// partition leases and the published-id memory. It lives in the
/// producer's database; [`crate::migrate()`] applies it.
pub const OUTBOX: Schema = Schema::new(
    "outbox_schema_history",
    0x6f75_7462_6f78_0001,
    outbox_files::migrations::runner,
);

/// One set of migrations, with its own history table and advisory lock.
///
/// [`OUTBOX`] is this crate's; consumer-kit ships its own
/// (`consumer_kit::SCHEMA`).
#[derive(Clone, Copy)]
pub struct Schema {
    history_table: &'static str,
    lock_key: i64,
    migrations: fn() -> Runner,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema")
            .field("history_table", &self.history_table)
            .finish_non_exhaustive()
    }
}

impl Schema {
    /// A schema from files embedded with `refinery::embed_migrations!`.
    /// For crates of this toolkit that ship their own migrations; the
    /// `lock_key` must differ between schemas.
    #[doc(hidden)]
    pub const fn new(
        history_table: &'static str,
        lock_key: i64,
        migrations: fn() -> Runner,
    ) -> Self {
        Schema {
            history_table,
            lock_key,
            migrations,
        }
    }

    /// The refinery history table of this schema.
    pub fn history_table(&self) -> &'static str {
        self.history_table
    }

    fn runner(&self) -> Runner {
        let mut runner = (self.migrations)();
        runner.set_migration_table_name(self.history_table);
        runner.set_abort_divergent(true).set_abort_missing(true)
    }

    /// The `(version, name)` of every migration in this build, in order.
    pub fn known(&self) -> Vec<(i32, String)> {
        self.runner()
            .get_migrations()
            .iter()
            .map(|m| (m.version(), m.name().to_string()))
            .collect()
    }

    /// Applies the migrations that are not applied yet.
    pub async fn apply(&self, pool: &PgPool) -> Result<MigrationReport, MigrateError> {
        run(pool, self).await
    }

    /// The highest applied version, or `None` if none is applied (or the
    /// history table does not exist yet).
    pub async fn current_version(&self, pool: &PgPool) -> Result<Option<i32>, MigrateError> {
        current_version(pool, self).await
    }
}

/// What [`Schema::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Migrations applied by this run, as `V{version}__{name}`. Empty when
    /// the schema was already current.
    pub applied: Vec<String>,
    /// The schema version after the run.
    pub current_version: Option<i32>,
}

/// Why migrations could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// An already applied migration file changed since it was applied.
    #[error(
        "migration V{version}__{name} in {table} was changed after it was applied (its checksum differs); \
         migrations are forward-only: restore the original file and put the change in a new migration"
    )]
    Changed {
        /// Version of the changed migration.
        version: i32,
        /// Its name.
        name: String,
        /// The history table.
        table: &'static str,
    },
    /// The database has a migration this build does not know.
    #[error(
        "the database has migration V{version}__{name} in {table}, which this build does not know; \
         it was applied by a newer release: run that release or a later one"
    )]
    Unknown {
        /// Version of the unknown migration.
        version: i32,
        /// Its name.
        name: String,
        /// The history table.
        table: &'static str,
    },
    /// The database refused a statement or could not be reached.
    #[error("migrating {table} failed: {source}")]
    Database {
        /// The history table of the set being migrated.
        table: &'static str,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

async fn run(pool: &PgPool, set: &Schema) -> Result<MigrationReport, MigrateError> {
    let table = set.history_table;
    let db_err = |e: sqlx::Error| MigrateError::Database {
        table,
        source: Box::new(e),
    };
    let mut conn = SqlxConnection(pool.acquire().await.map_err(db_err)?);
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(set.lock_key)
        .execute(&mut *conn.0)
        .await
        .map_err(db_err)?;
    let result = set.runner().run_async(&mut conn).await;
    // Unlock on the same connection; if that fails the connection is
    // closed below, which releases the lock too.
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(set.lock_key)
        .execute(&mut *conn.0)
        .await;
    if unlocked.is_err() {
        conn.0.close_on_drop();
    }
    let report = result.map_err(|e| classify(e, table))?;
    let applied: Vec<String> = report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect();
    let current_version = current_version(pool, set).await?;
    Ok(MigrationReport {
        applied,
        current_version,
    })
}

async fn current_version(pool: &PgPool, set: &Schema) -> Result<Option<i32>, MigrateError> {
    let table = set.history_table;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(pool)
        .await
        .map_err(|e| MigrateError::Database {
            table,
            source: Box::new(e),
        })?;
    if !exists {
        return Ok(None);
    }
    // `table` is a constant of a crate of this toolkit, never user input.
    sqlx::query_scalar(&format!("SELECT max(version) FROM {table}"))
        .fetch_one(pool)
        .await
        .map_err(|e| MigrateError::Database {
            table,
            source: Box::new(e),
        })
}

fn classify(err: refinery::Error, table: &'static str) -> MigrateError {
    match err.kind() {
        refinery_core::error::Kind::DivergentVersion(applied, _) => MigrateError::Changed {
            version: applied.version(),
            name: applied.name().to_string(),
            table,
        },
        refinery_core::error::Kind::MissingVersion(applied) => MigrateError::Unknown {
            version: applied.version(),
            name: applied.name().to_string(),
            table,
        },
        _ => MigrateError::Database {
            table,
            source: Box::new(err),
        },
    }
}

/// refinery's async driver traits over one sqlx connection.
struct SqlxConnection(PoolConnection<Postgres>);

impl AsyncTransaction for SqlxConnection {
    type Error = sqlx::Error;

    async fn execute<'a, T: Iterator<Item = &'a str> + Send + 'a>(
        &mut self,
        queries: T,
    ) -> Result<usize, sqlx::Error> {
        let queries: Vec<String> = queries.map(str::to_owned).collect();
        execute_in_transaction(&mut self.0, queries).await
    }
}

impl AsyncQuery<Vec<Migration>> for SqlxConnection {
    async fn query(&mut self, query: &str) -> Result<Vec<Migration>, sqlx::Error> {
        let rows = fetch_rows(&mut self.0, query.to_owned()).await?;
        rows.iter()
            .map(|row| {
                let version: i32 = row.try_get(0)?;
                let name: String = row.try_get(1)?;
                let applied_on: String = row.try_get(2)?;
                let checksum: String = row.try_get(3)?;
                let applied_on = OffsetDateTime::parse(&applied_on, &Rfc3339)
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                let checksum = checksum
                    .parse::<u64>()
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                Ok(Migration::applied(version, name, applied_on, checksum))
            })
            .collect()
    }
}

// Boxed with concrete types: keeps rustc's Send inference for sqlx's
// executor lifetimes out of refinery's generic trait futures.
fn execute_in_transaction(
    conn: &mut PoolConnection<Postgres>,
    queries: Vec<String>,
) -> BoxFuture<'_, Result<usize, sqlx::Error>> {
    Box::pin(async move {
        let mut tx = sqlx::Connection::begin(&mut **conn).await?;
        for query in &queries {
            sqlx::Executor::execute(&mut *tx, query.as_str()).await?;
        }
        tx.commit().await?;
        Ok(queries.len())
    })
}

fn fetch_rows(
    conn: &mut PoolConnection<Postgres>,
    query: String,
) -> BoxFuture<'_, Result<Vec<PgRow>, sqlx::Error>> {
    Box::pin(async move { sqlx::Executor::fetch_all(&mut **conn, query.as_str()).await })
}

impl AsyncMigrate for SqlxConnection {}
