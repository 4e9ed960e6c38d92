//! The operator's commands: `topic create`, `status`, `failed list|retry|discard`.

use crate::cli::{self, FailedCommand, TopicCommand};
use anyhow::Context;
use outbox_relay::store::{self, Selection};
use sqlx::postgres::PgConnectOptions;
use std::time::Duration;

use crate::{describe, pool, UsageError};

/// `text`, or its first `max` characters and how long it was.
fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => text.into(),
        Some((end, _)) => format!("{}… ({} bytes in all)", &text[..end], text.len()).into(),
    }
}

pub(crate) async fn topic(cmd: TopicCommand) -> anyhow::Result<()> {
    use outbox_relay::topics::{self, Created, TopicError};
    let TopicCommand::Create {
        name,
        partitions,
        replication,
        kafka_brokers,
        kafka_properties,
    } = cmd;
    let properties = kafka_properties.into_iter().collect();
    match topics::create(&kafka_brokers, &properties, &name, partitions, replication).await {
        Ok(Created::New) => out!("created topic {name} ({partitions} partitions)"),
        // Created::AlreadyExists (the enum is non_exhaustive).
        Ok(_) => out!("topic {name} already exists"),
        Err(e @ (TopicError::InvalidName(_) | TopicError::Client(_))) => {
            return Err(UsageError(e.to_string()).into())
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

async fn require_schema(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let (outbox, partitions, waiting, delayed): (bool, bool, bool, bool) = sqlx::query_as(
        "SELECT to_regclass('outbox') IS NOT NULL, to_regclass('outbox_relay_partitions') IS NOT NULL, \
                EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('outbox_relays') \
                        AND attname = 'waiting_since' AND NOT attisdropped), \
                to_regclass('outbox_delayed') IS NOT NULL",
    )
    .persistent(false)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    if !outbox {
        anyhow::bail!(
            "there is no outbox table in this database: run `outbox-relay migrate` first"
        );
    }
    if !partitions || !waiting || !delayed {
        anyhow::bail!(
            "the outbox schema is older than this relay (it lacks {}): run `outbox-relay migrate`",
            if !partitions {
                "the outbox_relay_partitions table, migration V2"
            } else if !waiting {
                "outbox_relays.waiting_since, migration V4"
            } else {
                "the outbox_delayed table, migration V10"
            }
        );
    }
    Ok(())
}

/// Where `status --exactly-once` reads the relays' checkpoints.
pub(crate) struct CheckpointSource {
    pub(crate) brokers: String,
    pub(crate) topic: String,
    pub(crate) properties: std::collections::BTreeMap<String, String>,
}

pub(crate) async fn status(
    opts: &PgConnectOptions,
    json: bool,
    checkpoints: Option<CheckpointSource>,
) -> anyhow::Result<()> {
    let pool = pool(opts).await?;
    require_schema(&pool).await?;
    let checkpoints = match checkpoints {
        None => None,
        Some(src) => Some(
            tokio::task::spawn_blocking(move || {
                let cc = outbox_relay::checkpoint::connection_config(&src.brokers, &src.properties);
                outbox_relay::checkpoint::read(&cc, &src.topic, None, Duration::from_secs(30))
            })
            .await?
            .context("cannot read the checkpoints")?,
        ),
    };
    // One transaction: a consistent picture, and it works through a
    // transaction-mode pooler.
    let mut tx = pool.begin().await?;
    let totals = store::stats(&mut tx).await?;
    let relays = store::relays(&mut *tx).await?;
    let partitions = store::partition_stats(&mut *tx).await?;
    let next_due = store::next_delayed_due(&mut *tx).await?;
    tx.commit().await?;
    if json {
        let doc = serde_json::json!({
            "pending": totals.pending,
            "oldest_pending_age_seconds": totals.oldest_pending_age_seconds,
            "failed": totals.failed,
            "published_kept": totals.published_kept,
            "delayed": totals.delayed,
            "next_delayed_due_in_seconds": next_due,
            "relays": relays,
            "partitions": partitions,
            "checkpoints": checkpoints,
        });
        out!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    out!("outbox at {}", describe(opts));
    out!("  pending:            {}", totals.pending);
    out!(
        "  oldest pending age: {:.1}s",
        totals.oldest_pending_age_seconds
    );
    out!("  failed:             {}", totals.failed);
    out!("  published (kept):   {}", totals.published_kept);
    match next_due {
        Some(s) if s > 0.0 => out!(
            "  delayed:            {} (next due in {:.1}s)",
            totals.delayed,
            s
        ),
        Some(s) => out!(
            "  delayed:            {} (overdue by {:.1}s: is a relay running?)",
            totals.delayed,
            -s
        ),
        None => out!("  delayed:            {}", totals.delayed),
    }
    let live = relays.iter().filter(|r| r.live).count();
    out!("relays: {live} live");
    for r in &relays {
        out!(
            "  {:<40} {:<8} pid {:<7} heartbeat {:>5.1}s ago  {:<7}  partitions {}",
            r.relay_id,
            if r.live { "live" } else { "expired" },
            r.pid.map(|p| p.to_string()).unwrap_or_default(),
            r.heartbeat_age_seconds,
            if r.waiting { "waiting" } else { "busy" },
            ranges(&r.partitions),
        );
    }
    if let Some(cks) = &checkpoints {
        out!("checkpoints (exactly-once): {}", cks.len());
        for (key, ck) in cks {
            let (first, last) = (
                ck.ids.first().map_or(0, |r| r.0),
                ck.ids.last().map_or(0, |r| r.1),
            );
            // WAL source: the slot's key, who wrote it and up to where.
            let unit = match &ck.lsn {
                Some(lsn) => format!("{key} (relay {}) up to {lsn}", ck.relay),
                None => ck.relay.clone(),
            };
            out!(
                "  {:<40} transaction {:<8} {:>5} ids ({first}..{last})  at {}",
                unit,
                ck.transaction,
                ck.len(),
                ck.at.format("%Y-%m-%d %H:%M:%S%.3fZ")
            );
        }
    }
    out!("partitions: {}", partitions.len());
    out!(
        "  {:>9}  {:<40} {:>9}  {:>11}",
        "partition",
        "owner",
        "pending",
        "oldest age"
    );
    for p in &partitions {
        let mut owner = match (&p.owner, p.owner_live) {
            (None, _) => "(none)".to_string(),
            (Some(o), true) => o.clone(),
            (Some(o), false) => format!("{o} (expired)"),
        };
        if !p.unfenced.is_empty() {
            owner = format!("{owner}; to fence: {}", p.unfenced.join(","));
        }
        out!(
            "  {:>9}  {:<40} {:>9}  {:>10.1}s",
            p.partition,
            owner,
            p.pending,
            p.oldest_pending_age_seconds
        );
    }
    Ok(())
}

/// `0-3,7,9-10` for a sorted list of partitions.
fn ranges(ps: &[i32]) -> String {
    if ps.is_empty() {
        return "none".into();
    }
    let mut out: Vec<String> = Vec::new();
    let mut start = ps[0];
    let mut prev = ps[0];
    for &p in &ps[1..] {
        if p != prev + 1 {
            out.push(if start == prev {
                start.to_string()
            } else {
                format!("{start}-{prev}")
            });
            start = p;
        }
        prev = p;
    }
    out.push(if start == prev {
        start.to_string()
    } else {
        format!("{start}-{prev}")
    });
    out.join(",")
}

pub(crate) async fn failed(opts: &PgConnectOptions, cmd: FailedCommand) -> anyhow::Result<()> {
    let pool = pool(opts).await?;
    require_schema(&pool).await?;
    let mut tx = pool.begin().await?;
    let selection = |s: cli::SelectArgs| {
        if s.all {
            Selection::All
        } else if !s.id.is_empty() {
            Selection::Ids(s.id)
        } else {
            Selection::EventIds(s.event_id)
        }
    };
    match cmd {
        FailedCommand::List { limit, json } => {
            let rows = store::failed_list(&mut *tx, limit).await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                out!("no failed rows");
            } else {
                // One line per row: long keys and reasons are clipped here
                // (--json keeps them whole).
                for r in rows {
                    out!(
                        "id={} event_id={} key={}/{} type={} attempts={} failed_at={} reason: {}",
                        r.id,
                        r.event_id,
                        clip(&r.aggregate_type, 80),
                        clip(&r.aggregate_id, 120),
                        clip(&r.event_type, 80),
                        r.attempts,
                        r.failed_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                        clip(r.last_error.as_deref().unwrap_or_default(), 400)
                    );
                }
            }
        }
        FailedCommand::Retry(s) => match store::wal_reader(&mut tx).await? {
            // A relay reading the WAL sees inserts only.
            Some((relay, slot)) => {
                let n = store::failed_retry_as_new_rows(&mut *tx, &selection(s)).await?;
                out!(
                    "{n} failed rows inserted again as new pending rows, in their order \
                     (relay {relay} reads them from slot {slot})"
                );
            }
            None => {
                let n = store::failed_retry(&mut *tx, &selection(s)).await?;
                out!("{n} failed rows put back to pending");
            }
        },
        FailedCommand::Discard(s) => {
            let n = store::failed_discard(&mut *tx, &selection(s)).await?;
            out!("{n} failed rows discarded");
        }
    }
    tx.commit().await?;
    Ok(())
}

/// `slot create|status|drop`.
pub(crate) async fn slot(
    pool: &sqlx::PgPool,
    url: &str,
    through_pooler: bool,
    cmd: cli::SlotCommand,
) -> anyhow::Result<()> {
    use outbox_relay::slot;
    match cmd {
        cli::SlotCommand::Create { names } => {
            if through_pooler {
                return Err(UsageError(
                    "--transaction-pooler: logical replication needs a direct connection to \
                     PostgreSQL; point DATABASE_URL at PostgreSQL itself for `slot create` and \
                     for a relay with a WAL source"
                        .into(),
                )
                .into());
            }
            slot::preflight(pool).await?;
            let target = slot::ReplicationTarget::from_url(url)?;
            let at = slot::probe_replication(&target).await?;
            let made = slot::create(pool, &names.slot, &names.publication).await?;
            let said = |created: bool| if created { "created" } else { "exists" };
            out!(
                "publication {}: {}; slot {}: {} (pgoutput); replication connection as {} works (server WAL at {at})",
                names.publication,
                said(made.publication),
                names.slot,
                said(made.slot),
                target.user()
            );
            if !made.extra_actions.is_empty() {
                out!(
                    "{}",
                    slot::extra_actions_advice(&names.publication, &made.extra_actions)
                );
            }
            let (pending, last): (i64, Option<i64>) =
                sqlx::query_as("SELECT count(*), max(id) FROM outbox WHERE status = 'pending'")
                    .fetch_one(pool)
                    .await?;
            if pending > 0 {
                out!(
                    "{pending} pending rows (ids up to {}) were written before the slot: keep a \
                     --source poll relay running until they are published, then switch (README, \
                     \"Switching from poll to WAL\")",
                    last.unwrap_or_default()
                );
            }
            Ok(())
        }
        cli::SlotCommand::Status { names, json } => {
            let Some(st) = slot::status(pool, &names.slot).await? else {
                return Err(slot::SlotError::NotFound { slot: names.slot }.into());
            };
            if json {
                out!("{}", serde_json::to_string_pretty(&st)?);
                return Ok(());
            }
            let bytes = |b: Option<i64>| b.map_or("-".to_string(), |b| format!("{b} bytes"));
            out!("slot {} ({})", st.slot, st.plugin);
            out!(
                "  reader:     {}",
                match st.active_pid {
                    Some(pid) if st.active => format!("pid {pid}"),
                    _ => "none".into(),
                }
            );
            out!(
                "  confirmed:  {}  (server at {})",
                st.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                st.current_lsn
            );
            out!("  lag:        {}", bytes(st.lag_bytes));
            out!(
                "  WAL kept:   {}  (restart at {}, {})",
                bytes(st.retained_wal_bytes),
                st.restart_lsn.as_deref().unwrap_or("-"),
                st.wal_status.as_deref().unwrap_or("-")
            );
            Ok(())
        }
        cli::SlotCommand::Drop {
            names,
            with_publication,
        } => {
            let dropped = slot::drop(
                pool,
                &names.slot,
                with_publication.then_some(names.publication.as_str()),
            )
            .await?;
            out!(
                "slot {} dropped{}",
                names.slot,
                match (with_publication, dropped.publication) {
                    (false, _) => String::new(),
                    (true, true) => format!(", publication {} dropped", names.publication),
                    (true, false) => format!(
                        "; no publication named {} (name it with --publication)",
                        names.publication
                    ),
                }
            );
            Ok(())
        }
    }
}
