//! Time-driven work, found in the database rather than kept in timers: pending requests
//! past `expires_at` expire, past `remind_after` get a reminder, past `escalate_after` are
//! escalated — also what fell due while no server ran.

use std::time::Duration;

use tokio::sync::watch;

use crate::engine::Engine;
use crate::store::Due;

/// Old Idempotency-Keys are purged this often; they only need to go eventually.
const PURGE_EVERY: Duration = Duration::from_secs(600);

/// Sweeps at start and then every `interval` until `shutdown` turns true.
pub async fn run_sweeper(engine: Engine, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut last_purge: Option<tokio::time::Instant> = None;
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
        for due in [Due::Expiry, Due::Escalation, Due::Reminder] {
            match engine.sweep_due(due).await {
                Ok(0) => {}
                Ok(changed) => tracing::info!(?due, changed, "swept due requests"),
                Err(error) => tracing::warn!(?due, %error, "sweep failed; will retry"),
            }
        }
        if last_purge.is_none_or(|at| at.elapsed() >= PURGE_EVERY) {
            last_purge = Some(tokio::time::Instant::now());
            if let Err(error) = engine.purge_idempotency_keys().await {
                tracing::warn!(%error, "purging old Idempotency-Keys failed; will retry");
            }
        }
    }
}
