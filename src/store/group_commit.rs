//! Group commit: new requests that arrive while a commit is in progress share the next
//! one, so many submissions cost one transaction and one disk sync.

use std::future::Future;
use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::backend::{Backend, SqlStore};
use super::requests::StoredRequest;
use super::{IdempotencyKey, NewOutboxMessage, NewRequest, StoreError, StoreResult};
use crate::audit::{NewAuditEvent, PreparedAuditEvent};
use crate::domain::ApprovalRequest;

/// At most this many items share one commit (well under both backends' limits on bind
/// parameters per statement).
const GROUP_COMMIT_LIMIT: usize = 256;

/// A new request waiting for the group-commit writer, and where to send its outcome.
pub struct QueuedRequest {
    pub request: ApprovalRequest,
    /// The stored form of the request, serialised by the caller: the writer only copies it.
    pub body: Box<RawValue>,
    pub audit: Vec<PreparedAuditEvent>,
    pub outbox: Vec<NewOutboxMessage>,
    pub idempotency: Option<(IdempotencyKey, Value)>,
    pub committed: oneshot::Sender<StoreResult<()>>,
}

impl std::fmt::Debug for QueuedRequest {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("QueuedRequest")
            .field("id", &self.request.id)
            .finish_non_exhaustive()
    }
}

/// The submitting side of the writer tasks, for items of one kind (new requests, judged
/// intakes).
#[derive(Debug)]
pub(super) struct GroupCommit<Item> {
    queue: mpsc::UnboundedSender<Item>,
}

impl<Item> Clone for GroupCommit<Item> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<Item: Send + 'static> GroupCommit<Item> {
    /// Starts `writers` writer tasks; they end when the last `GroupCommit` clone is dropped.
    /// `commit` writes one group in one transaction and answers each item in it. A
    /// writer takes whatever has queued as its group and commits it while the next writer
    /// gathers the next group, so with two the work before one group's commit overlaps the
    /// other's.
    pub fn start<Commit, Committing>(writers: usize, commit: Commit) -> Self
    where
        Commit: Fn(Vec<Item>) -> Committing + Clone + Send + 'static,
        Committing: Future<Output = ()> + Send,
    {
        let (queue, arrivals) = mpsc::unbounded_channel::<Item>();
        let arrivals = Arc::new(Mutex::new(arrivals));
        for _ in 0..writers.max(1) {
            let arrivals = arrivals.clone();
            let commit = commit.clone();
            // The writers run apart from the callers, so a caller that goes away (a client
            // that disconnects) never leaves a group half written.
            tokio::spawn(async move {
                while let Some(group) = next_group(&arrivals).await {
                    commit(group).await;
                }
            });
        }
        Self { queue }
    }

    /// Hands the item to the writer tasks.
    pub fn queue(&self, queued: Item) -> StoreResult<()> {
        self.queue
            .send(queued)
            .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))
    }
}

/// The next arrival and whatever queued behind it, up to `GROUP_COMMIT_LIMIT`; `None` once
/// every sender is gone.
async fn next_group<Item>(arrivals: &Mutex<mpsc::UnboundedReceiver<Item>>) -> Option<Vec<Item>> {
    let mut arrivals = arrivals.lock().await;
    let mut group = vec![arrivals.recv().await?];
    while group.len() < GROUP_COMMIT_LIMIT {
        match arrivals.try_recv() {
            Ok(next) => group.push(next),
            Err(_) => break,
        }
    }
    Some(group)
}

impl QueuedRequest {
    /// The request ready for the writer, and where its outcome will arrive.
    pub fn new(new: NewRequest<'_>) -> StoreResult<(Self, oneshot::Receiver<StoreResult<()>>)> {
        let (committed, outcome) = oneshot::channel();
        let body = serde_json::value::to_raw_value(&StoredRequest::from_request(new.request))
            .map_err(|error| StoreError::Database(sqlx::Error::Encode(Box::new(error))))?;
        let queued = Self {
            request: new.request.clone(),
            body,
            audit: new.audit.into_iter().map(NewAuditEvent::prepare).collect(),
            outbox: new.outbox,
            idempotency: new
                .idempotency
                .map(|(key, response)| (key.clone(), response)),
            committed,
        };
        Ok((queued, outcome))
    }
}

/// Waits for the commit that holds a queued request: `Ok` means it is durable at the
/// database's durability setting.
pub(super) async fn committed(outcome: oneshot::Receiver<StoreResult<()>>) -> StoreResult<()> {
    outcome
        .await
        .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))?
}

impl<DB: Backend> SqlStore<DB> {
    /// Starts the group-commit writer tasks, on a copy of this store without them.
    pub(super) fn with_group_commit(self) -> Self {
        let group_commit = GroupCommit::start(DB::GROUP_WRITERS, {
            let store = self.clone();
            move |group| {
                let store = store.clone();
                async move { store.commit_group(group).await }
            }
        });
        Self {
            group_commit: Some(group_commit),
            ..self
        }
    }

    /// Commits a group of new requests in one transaction (`Backend::write_group`) and
    /// answers each. If the group is refused (a duplicate id, say), each request is tried
    /// on its own, so one bad request never takes the others with it.
    pub(super) async fn commit_group(&self, group: Vec<QueuedRequest>) {
        let result = DB::write_group(self, &group).await;
        match result {
            Ok(()) => {
                for queued in group {
                    let _ = queued.committed.send(Ok(()));
                }
            }
            Err(error) if group.len() == 1 => {
                if let Some(queued) = group.into_iter().next() {
                    let _ = queued.committed.send(Err(error));
                }
            }
            Err(_) => {
                for queued in group {
                    let result = DB::write_group(self, std::slice::from_ref(&queued)).await;
                    let _ = queued.committed.send(result);
                }
            }
        }
    }
}
