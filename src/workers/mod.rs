//! Background work (ARCHITECTURE.md): `delivery` (the outbox: cards through the chat
//! channels, webhooks), `sweeper` (expiry, reminders, escalation) and `watcher` (decisions
//! made by other processes). Each exposes the step tests and operators drive
//! (`Delivery::deliver_due`, `sweep_once`, `watch_once`); `Workers` runs their loops and
//! stops them all through one CancellationToken and one TaskTracker.

pub mod delivery;
mod pacing;
pub mod sweeper;
pub mod watcher;
mod webhook;

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use delivery::Delivery;
pub use sweeper::{sweep_once, Swept};
pub use watcher::watch_once;
pub use webhook::sign_webhook;

/// The background tasks of one process, stopped together.
#[derive(Clone, Debug, Default)]
pub struct Workers {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Workers {
    /// Cancelled when the process stops; tasks end at their next safe point.
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Runs `task` until it ends; `stop` waits for it.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Cancels every task and waits up to `grace` for them to finish their work in hand.
    pub async fn stop(&self, grace: Duration) {
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over; abandoning unfinished work");
        }
    }
}
