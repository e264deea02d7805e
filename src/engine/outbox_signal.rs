//! Wakes the local outbox worker after a commit that wrote outbox messages, and tells it
//! for which destinations.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::store::NewOutboxMessage;

/// for which destinations: a worker whose only backlog is for channels out of pacing
/// tokens need not look again (each look is a query over that backlog) until one of them
/// has a token or work arrives for another destination.
#[derive(Debug, Default)]
pub struct OutboxSignal {
    notify: Notify,
    destinations: Mutex<HashSet<String>>,
}

impl OutboxSignal {
    pub fn destinations_of(outbox: &[NewOutboxMessage]) -> Vec<String> {
        outbox
            .iter()
            .map(|message| message.destination.clone())
            .collect()
    }

    /// Nothing happens for no destinations: waking the worker for nothing would cost it
    /// a claim query.
    pub fn wake(&self, destinations: Vec<String>) {
        if destinations.is_empty() {
            return;
        }
        self.lock_destinations().extend(destinations);
        self.notify.notify_one();
    }

    /// Waits for the next wake-up.
    pub async fn woken(&self) {
        self.notify.notified().await;
    }

    /// The destinations named since the last call.
    pub fn take_destinations(&self) -> HashSet<String> {
        std::mem::take(&mut *self.lock_destinations())
    }

    fn lock_destinations(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // A set of names: a panic elsewhere cannot leave it half-changed.
        self.destinations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
