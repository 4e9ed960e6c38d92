//! The relay's HTTP surface: `/metrics`, `/healthz`, `/readyz`.

use std::{net::SocketAddr, sync::Arc};

use axum::{extract::State as AxState, http::StatusCode, routing::get, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use outbox_relay::health::{Health, State};

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

/// Serves the HTTP endpoints on `listener` until `shutdown` fires.
///
/// - `/metrics`: Prometheus text format.
/// - `/healthz`: 200 while the process runs.
/// - `/readyz`: 200 when the relay can publish now (active or on standby,
///   connected to Kafka), 503 otherwise; the body names the state and why
///   (see `outbox_relay::health`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|AxState(s): AxState<AppState>| async move { s.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn readyz(AxState(s): AxState<AppState>) -> (StatusCode, String) {
    let (state, reason) = s.health.now();
    let body = format!("{}: {reason}\n", state.name());
    if matches!(state, State::Active | State::Standby) {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

/// Binds `addr` with a clear error naming the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for /metrics and health: {e}"),
        )
    })
}
