//! Wakes local long-polls for decisions committed by other processes (CLI, other replicas):
//! PostgreSQL pushes them with NOTIFY; on every backend one indexed query every interval
//! looks up the requests this process's long-polls wait on (SQLite's only way,
//! PostgreSQL's fallback). `watch_once` is one such look.

use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, EngineResult};
use crate::store::Notifications;

/// Wakes the long-polls whose requests were decided elsewhere; returns how many. Only what
/// someone waits on is looked up: decisions nobody waits for (every auto-allowed request,
/// say) cost this process nothing.
pub async fn watch_once(engine: &Engine) -> EngineResult<usize> {
    let awaited = engine.awaited_request_ids();
    if awaited.is_empty() {
        return Ok(0);
    }
    let decided = engine.decided_among(&awaited).await?;
    for request_id in &decided {
        engine.announce_decision(request_id);
    }
    Ok(decided.len())
}

/// Listens for notifications and looks every `interval` until `cancel`.
pub async fn run(engine: Engine, interval: Duration, cancel: CancellationToken) {
    let mut notifications = match engine.decision_notifications().await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "LISTEN failed; relying on polling");
            None
        }
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            notified = next_notification(&mut notifications) => {
                match notified {
                    Some(request_id) => engine.announce_decision(&request_id),
                    None => notifications = None,
                }
            }
            _ = ticker.tick() => {
                if let Err(error) = watch_once(&engine).await {
                    tracing::warn!(%error, "decision watcher query failed");
                }
            }
        }
    }
}

async fn next_notification(notifications: &mut Option<Notifications>) -> Option<String> {
    match notifications {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}
