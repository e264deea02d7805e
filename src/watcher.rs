//! Wakes local long-polls for decisions committed by other processes (CLI, other replicas):
//! PostgreSQL pushes them with NOTIFY; on every backend one indexed query every interval
//! looks up the requests this process's long-polls wait on (SQLite's only way,
//! PostgreSQL's fallback).

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use crate::engine::Engine;

pub async fn run_decision_watcher(
    engine: Engine,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
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
            _ = shutdown.changed() => return,
            notified = next_notification(&mut notifications) => {
                match notified {
                    Some(request_id) => engine.announce_decision(&request_id),
                    None => notifications = None,
                }
            }
            _ = ticker.tick() => {
                // Only what someone waits on: decisions nobody waits for (every
                // auto-allowed request, say) cost this process nothing.
                let awaited = engine.awaited_request_ids();
                if awaited.is_empty() {
                    continue;
                }
                match engine.decided_among(&awaited).await {
                    Ok(decided) => {
                        for request_id in decided {
                            engine.announce_decision(&request_id);
                        }
                    }
                    Err(error) => tracing::warn!(%error, "decision watcher query failed"),
                }
            }
        }
    }
}

async fn next_notification(
    notifications: &mut Option<crate::store::Notifications>,
) -> Option<String> {
    match notifications {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}
