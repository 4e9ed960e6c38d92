//! `outbox-dlq saga …`: the saga instances in a consumer's database
//! (`consumer_kit_sagas`): list them, show one, bring a stuck one's
//! timeouts forward (retry), or fail one without compensation.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use consumer_kit::saga::{self, ListFilter};

#[derive(Debug, Subcommand)]
pub(crate) enum SagaCommand {
    /// One line per instance: id, status, state, version, last change,
    /// pending timeouts, reason. Oldest last change first.
    List {
        #[command(flatten)]
        db: SagaArgs,
        /// Only this state (as stored, e.g. `Charging`).
        #[arg(long)]
        state: Option<String>,
        /// Only this status: running, completed or failed.
        #[arg(long)]
        status: Option<String>,
        /// Only running instances unchanged for at least this long (`10m`,
        /// `2h`): the stuck ones.
        #[arg(long, value_parser = humantime::parse_duration)]
        stuck_for: Option<Duration>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one instance: state, data, timeouts.
    Show {
        #[command(flatten)]
        db: SagaArgs,
        /// The instance (correlation) id.
        id: String,
    },
    /// Retry a stuck instance: its pending timeouts fire now, and the
    /// saga's own timeout handling runs (it retries the step or
    /// compensates, as the saga decides). Needs the relay running.
    Retry {
        #[command(flatten)]
        db: SagaArgs,
        /// The instance id.
        id: String,
    },
    /// Fail a running instance WITHOUT compensating: its timeouts are
    /// dropped and it is marked failed. For an instance whose effects were
    /// settled by hand; prefer `retry`, which lets the saga compensate.
    Fail {
        #[command(flatten)]
        db: SagaArgs,
        /// The instance id.
        id: String,
        /// Why (recorded as the instance's reason).
        #[arg(long)]
        reason: String,
        /// Confirms that nothing will be compensated.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Args)]
pub(crate) struct SagaArgs {
    /// The saga's database (where `consumer_kit_sagas` is).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// The saga's name (`Saga::NAME`).
    #[arg(long)]
    saga: String,
}

async fn connect(db: &SagaArgs) -> anyhow::Result<sqlx::PgPool> {
    super::connect_to(&db.database_url, "the saga's database").await
}

pub(crate) async fn run(cmd: SagaCommand) -> anyhow::Result<()> {
    match cmd {
        SagaCommand::List {
            db,
            state,
            status,
            stuck_for,
            limit,
            json,
        } => {
            let pool = connect(&db).await?;
            let filter = ListFilter {
                state,
                status: status.or_else(|| stuck_for.map(|_| "running".into())),
                unchanged_for: stuck_for,
                limit,
            };
            let rows = saga::list(&pool, &db.saga, &filter).await?;
            for r in &rows {
                if json {
                    out!("{}", serde_json::to_string(r)?);
                } else {
                    let timeouts = r
                        .timeouts
                        .as_object()
                        .map(|m| m.keys().cloned().collect::<Vec<_>>().join(","))
                        .unwrap_or_default();
                    out!(
                        "{}  {}  {}  v{}  {}  timeouts [{}]  {}",
                        r.instance_id,
                        r.status,
                        r.state,
                        r.version,
                        r.updated_at.format("%Y-%m-%dT%H:%M:%SZ"),
                        timeouts,
                        r.reason.as_deref().unwrap_or("")
                    );
                }
            }
            if !json {
                eprintln!("{} instances of saga {}", rows.len(), db.saga);
            }
        }
        SagaCommand::Show { db, id } => {
            let pool = connect(&db).await?;
            let row = saga::show(&pool, &db.saga, &id)
                .await?
                .with_context(|| format!("saga {} has no instance {id:?}", db.saga))?;
            out!("{}", serde_json::to_string_pretty(&row)?);
        }
        SagaCommand::Retry { db, id } => {
            let pool = connect(&db).await?;
            let n = saga::expire_timeouts(&pool, &db.saga, &id).await?;
            if n == 0 {
                anyhow::bail!(
                    "saga {} instance {id:?}: no pending timeout waits in the outbox (not \
                     running, none scheduled, or already on its way); `saga show` tells which",
                    db.saga
                );
            }
            out!("{n} timeouts of {id} are due now; the relay publishes them and the saga handles them");
        }
        SagaCommand::Fail {
            db,
            id,
            reason,
            yes,
        } => {
            if !yes {
                anyhow::bail!(
                    "`saga fail` does not compensate: pass --yes if the instance's effects are \
                     settled, or use `saga retry` to let the saga's timeout handling compensate"
                );
            }
            let pool = connect(&db).await?;
            if !saga::abandon(&pool, &db.saga, &id, &reason).await? {
                anyhow::bail!("saga {} has no running instance {id:?}", db.saga);
            }
            out!("{id} failed (not compensated): {reason}");
        }
    }
    Ok(())
}
