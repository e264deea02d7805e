//! Reading requests, and long-polls that answer the moment a decision commits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::{Engine, EngineError, EngineResult};
use crate::domain::ApprovalRequest;
use crate::store::{Notifications, RequestFilter};

impl Engine {
    /// The request, if `agent` made it: another agent's id is indistinguishable from none.
    pub async fn request_for_agent(&self, agent: &str, id: &str) -> EngineResult<ApprovalRequest> {
        match self.store.request(id).await? {
            Some(request) if request.agent == agent => Ok(request),
            _ => Err(EngineError::NotFound),
        }
    }

    pub async fn request(&self, id: &str) -> EngineResult<ApprovalRequest> {
        self.store.request(id).await?.ok_or(EngineError::NotFound)
    }

    /// Waits up to `timeout` for the request to leave pending; answers the moment a decision
    /// commits in this process or is announced by another.
    pub async fn wait_for_decision(
        &self,
        agent: &str,
        id: &str,
        timeout: Duration,
    ) -> EngineResult<ApprovalRequest> {
        // Held for as long as this long-poll waits.
        let _slot = self.quotas.wait_slot(agent)?;
        // Subscribe before reading, so a decision committed in between is not missed.
        let mut subscription = self.waiters.subscribe(id);
        let mut stopping = self.stopping.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut request = self.request_for_agent(agent, id).await?;
            if request.is_overdue(self.now()) {
                self.expire_request(id).await?;
                request = self.request_for_agent(agent, id).await?;
            }
            if request.status.is_final() {
                return Ok(request);
            }
            let wake_at = match request.expires_at {
                Some(expiry) => deadline.min(self.instant_at(expiry)),
                None => deadline,
            };
            if tokio::time::Instant::now() >= deadline || *stopping.borrow() {
                return Ok(request);
            }
            tracing::debug!(request_id = %id, "long-poll waiting for a decision");
            tokio::select! {
                _ = subscription.changed() => {}
                _ = stopping.changed() => {}
                _ = tokio::time::sleep_until(wake_at) => {
                    if tokio::time::Instant::now() >= deadline {
                        return self.request_for_agent(agent, id).await;
                    }
                }
            }
        }
    }

    /// Wakes local long-polls on `id`: its decision was committed (here or elsewhere).
    pub fn announce_decision(&self, id: &str) {
        self.waiters.wake(id);
    }

    /// The requests this process's long-polls are waiting on.
    pub fn awaited_request_ids(&self) -> Vec<String> {
        self.waiters.request_ids()
    }

    /// A trivial query, for readiness.
    pub async fn ping(&self) -> EngineResult<()> {
        Ok(self.store.ping().await?)
    }

    /// Pending requests in all.
    pub async fn pending_count(&self) -> EngineResult<i64> {
        Ok(self.store.pending_count().await?)
    }

    /// Which of `request_ids` are no longer pending (decisions other processes committed).
    pub async fn decided_among(&self, request_ids: &[String]) -> EngineResult<Vec<String>> {
        Ok(self.store.decided_among(request_ids).await?)
    }

    /// Request ids pushed the moment another process commits a decision, where the
    /// database can push (PostgreSQL); `None` where it must be polled.
    pub async fn decision_notifications(&self) -> EngineResult<Option<Notifications>> {
        Ok(self.store.finalized_notifications().await?)
    }

    pub async fn list_requests(&self, filter: RequestFilter) -> EngineResult<Vec<ApprovalRequest>> {
        Ok(self.store.list_requests(&filter).await?)
    }

    /// The tokio instant at which the engine's clock reads `at`.
    fn instant_at(&self, at: DateTime<Utc>) -> tokio::time::Instant {
        let remaining = (at - self.now()).to_std().unwrap_or(Duration::ZERO);
        tokio::time::Instant::now() + remaining
    }
}

/// Long-polls waiting on a request, woken when its decision commits.
#[derive(Clone, Default)]
pub(super) struct Waiters {
    channels: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
}

struct Subscription {
    id: String,
    receiver: Option<watch::Receiver<u64>>,
    waiters: Waiters,
}

impl Waiters {
    fn subscribe(&self, id: &str) -> Subscription {
        let receiver = self
            .lock_channels()
            .entry(id.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Subscription {
            id: id.to_string(),
            receiver: Some(receiver),
            waiters: self.clone(),
        }
    }

    pub(super) fn wake(&self, id: &str) {
        if let Some(sender) = self.lock_channels().get(id) {
            sender.send_modify(|generation| *generation += 1);
        }
    }

    fn request_ids(&self) -> Vec<String> {
        self.lock_channels().keys().cloned().collect()
    }

    fn lock_channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        // Entries are only inserted or removed whole: a panic elsewhere leaves none half-made.
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Subscription {
    async fn changed(&mut self) {
        match self.receiver.as_mut() {
            Some(receiver) => {
                if receiver.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut channels = self.waiters.lock_channels();
        drop(self.receiver.take());
        if channels
            .get(&self.id)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            channels.remove(&self.id);
        }
    }
}
