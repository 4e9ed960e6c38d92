//! `outbox-relay run`: the relay with its HTTP endpoints (metrics, health)
//! until SIGTERM or Ctrl-C.

use std::sync::Arc;

use crate::cli;
use anyhow::Context;
use outbox_relay::{telemetry, Relay};
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::{describe, http, pool, UsageError};

pub(crate) async fn run(
    opts: PgConnectOptions,
    args: cli::RunArgs,
    transaction_pooler: bool,
    database_url: Option<&str>,
) -> anyhow::Result<()> {
    let mut cfg = args.to_config(transaction_pooler);
    if args.source == cli::SourceArg::Wal {
        let target =
            outbox_relay::slot::ReplicationTarget::from_url(database_url.unwrap_or_default())
                .map_err(|e| UsageError(e.to_string()))?;
        let mut wal = outbox_relay::WalSource::new(target);
        wal.slot = args.slot.slot.clone();
        wal.publication = args.slot.publication.clone();
        wal.heartbeat_interval = args.wal_heartbeat;
        wal.retained_warn_bytes = args.wal_retained_warn_mib.saturating_mul(1 << 20);
        cfg.wal = Some(wal);
    }
    cfg.validate().map_err(|e| UsageError(e.to_string()))?;
    if args.migrate {
        let pool = pool(&opts).await?;
        let report = outbox_core::migrate(&pool).await?;
        info!(applied = ?report.applied, version = ?report.current_version, "outbox migrations checked");
        pool.close().await;
    }
    let metrics = install_metrics()?;
    let relay = Relay::new(cfg.clone(), opts.clone())
        .map_err(|e| UsageError(format!("{:#}", anyhow::Error::from(e))))?;
    let health = relay.health();
    let listener = http::bind(args.http_addr)
        .await
        .map_err(|e| UsageError(e.to_string()))?;

    let shutdown = CancellationToken::new();
    let http_task = tokio::spawn(http::serve(
        listener,
        metrics,
        Arc::clone(&health),
        shutdown.clone(),
    ));
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            info!("shutdown signal received; finishing the batch in flight");
            shutdown.cancel();
        }
    });
    info!(
        database = %describe(&opts),
        sink = match &cfg.rabbitmq {
            Some(r) => format!("rabbitmq {}", r.broker_for_logs()),
            None => format!("kafka {}", cfg.brokers),
        },
        batch_size = cfg.batch_size,
        poll_interval = ?cfg.poll_interval,
        listen = cfg.listen && !cfg.transaction_pooler,
        transaction_pooler = cfg.transaction_pooler,
        relay.id = %relay.relay_id(),
        lease_ttl = ?cfg.lease_ttl,
        exactly_once = cfg.exactly_once,
        http = %args.http_addr,
        "outbox-relay starting"
    );
    relay.run(shutdown.clone()).await;
    shutdown.cancel();
    if let Ok(Err(e)) = http_task.await {
        error!(error = %e, "http server failed");
    }
    info!("outbox-relay stopped");
    Ok(())
}

fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(telemetry::COMMIT_TO_ACK.into()),
            telemetry::LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(telemetry::BATCH_DURATION.into()),
            telemetry::LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(telemetry::TRANSACTION_COMMIT.into()),
            telemetry::LATENCY_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(telemetry::BATCH_SIZE.into()),
            telemetry::BATCH_BUCKETS,
        )?
        .install_recorder()
        .context("cannot install the Prometheus recorder")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let ctrl_c = tokio::signal::ctrl_c();
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
