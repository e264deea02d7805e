//! Expiry driven from the database: pending requests past `expires_at` become expired,
//! also those that fell due while no server ran.

use std::time::Duration;

use tokio::sync::watch;

use crate::engine::Engine;

/// Sweeps at start and then every `interval` until `shutdown` turns true.
pub async fn run_sweeper(engine: Engine, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        match engine.expire_overdue().await {
            Ok(0) => {}
            Ok(expired) => tracing::info!(expired, "expired overdue requests"),
            Err(error) => tracing::warn!(%error, "expiry sweep failed; will retry"),
        }
    }
}
