//! How the relay waits between tries: the delay is the shared
//! [`outbox_core::backoff`] policy; waiting ends early on shutdown.

use std::time::Duration;

use outbox_core::backoff::Backoff;
use tokio_util::sync::CancellationToken;

/// Sleeps for `d`; returns true if `shutdown` fired first.
pub(crate) async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.cancelled() => true,
    }
}

/// Sleeps for `backoff`'s next delay, or until `shutdown`.
pub(crate) async fn back_off(backoff: &mut Backoff, shutdown: &CancellationToken) {
    sleep_or_cancel(backoff.next_delay(), shutdown).await;
}
