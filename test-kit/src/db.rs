//! A fresh database, by name, on a PostgreSQL server.

use anyhow::Context;
use sqlx::{postgres::PgConnectOptions, Executor, PgPool};

/// Drops `name` (closing its connections) and creates it empty on the
/// server `server` points at. Returns `server`'s options for the new
/// database. `name` must be letters, digits and `_`.
pub async fn recreate(server: &PgConnectOptions, name: &str) -> anyhow::Result<PgConnectOptions> {
    anyhow::ensure!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "database name {name:?} must be letters, digits and _"
    );
    let admin = PgPool::connect_with(server.clone())
        .await
        .context("cannot connect to PostgreSQL (DATABASE_URL)")?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
        .await?;
    admin
        .execute(format!("CREATE DATABASE \"{name}\"").as_str())
        .await?;
    admin.close().await;
    Ok(server.clone().database(name))
}
