//! Group commit: new requests that arrive while a commit is in progress share the next
//! one, so many submissions cost one transaction and one disk sync.

use std::future::Future;

use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::shared::StoredRequest;
use super::{IdempotencyKey, NewOutboxMessage, NewRequest, StoreError, StoreResult};
use crate::audit::{NewAuditEvent, PreparedAuditEvent};
use crate::domain::ApprovalRequest;

/// At most this many new requests share one commit (well under both backends' limits on
/// bind parameters per statement).
const GROUP_COMMIT_LIMIT: usize = 256;

/// A new request waiting for the group-commit writer, and where to send its outcome.
pub(super) struct QueuedRequest {
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

/// The submitting side of the writer task.
#[derive(Clone, Debug)]
pub(super) struct GroupCommit {
    queue: mpsc::UnboundedSender<QueuedRequest>,
}

impl GroupCommit {
    /// Starts the writer task; it ends when the last `GroupCommit` clone is dropped.
    /// `commit` writes one group in one transaction and answers each request in it.
    pub fn start<Commit, Committing>(commit: Commit) -> Self
    where
        Commit: Fn(Vec<QueuedRequest>) -> Committing + Send + 'static,
        Committing: Future<Output = ()> + Send,
    {
        let (queue, mut arrivals) = mpsc::unbounded_channel::<QueuedRequest>();
        tokio::spawn(async move {
            // The writer runs apart from the callers, so a caller that goes away (a client
            // that disconnects) never leaves a group half written.
            while let Some(first) = arrivals.recv().await {
                let mut group = vec![first];
                while group.len() < GROUP_COMMIT_LIMIT {
                    match arrivals.try_recv() {
                        Ok(next) => group.push(next),
                        Err(_) => break,
                    }
                }
                commit(group).await;
            }
        });
        Self { queue }
    }

    /// Hands the request to the writer task.
    pub fn queue(&self, queued: QueuedRequest) -> StoreResult<()> {
        self.queue
            .send(queued)
            .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))
    }
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
