//! Time-driven work, found in the database rather than kept in timers: pending requests
//! past `expires_at` expire, past `remind_after` get a reminder, past each step of their
//! escalation ladder are escalated — also what fell due while no server ran. `sweep_once`
//! is one pass, at the engine's clock; `run` repeats it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::store::Due;

/// Old Idempotency-Keys are purged this often; they only need to go eventually.
const PURGE_EVERY: Duration = Duration::from_secs(600);

/// What one sweep changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub expired: usize,
    pub escalated: usize,
    pub reminded: usize,
}

/// Expires, escalates and reminds whatever is due at the engine's clock now. A kind that
/// fails is logged and left for the next sweep; the others still run.
pub async fn sweep_once(engine: &Engine) -> Swept {
    let mut swept = Swept::default();
    for due in [Due::Expiry, Due::Escalation, Due::Reminder] {
        let changed = match engine.sweep_due(due).await {
            Ok(changed) => changed,
            Err(error) => {
                tracing::warn!(?due, %error, "sweep failed; will retry");
                0
            }
        };
        if changed > 0 {
            tracing::info!(?due, changed, "swept due requests");
        }
        match due {
            Due::Expiry => swept.expired = changed,
            Due::Escalation => swept.escalated = changed,
            Due::Reminder => swept.reminded = changed,
        }
    }
    swept
}

/// Sweeps at start and then every `interval` until `cancel`.
pub async fn run(engine: Engine, interval: Duration, cancel: CancellationToken) {
    let mut last_purge: Option<tokio::time::Instant> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = cancel.cancelled() => return,
        }
        sweep_once(&engine).await;
        if last_purge.is_none_or(|at| at.elapsed() >= PURGE_EVERY) {
            last_purge = Some(tokio::time::Instant::now());
            if let Err(error) = engine.purge_idempotency_keys().await {
                tracing::warn!(%error, "purging old Idempotency-Keys failed; will retry");
            }
        }
    }
}
