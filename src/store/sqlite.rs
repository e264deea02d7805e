//! The embedded SQLite backend: WAL, busy timeout, foreign keys, one writer at a time, and
//! group commit for new requests.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};

use serde_json::Value;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::shared::implement_store;
use super::{IdempotencyKey, NewOutboxMessage, StoreError, StoreResult};
use crate::audit::NewAuditEvent;
use crate::config::Config;
use crate::domain::ApprovalRequest;

#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// New requests are committed in groups: see `insert_new_request`.
    group_commit: Arc<GroupCommit>,
}

#[derive(Debug, Default)]
struct GroupCommit {
    queue: std::sync::Mutex<Vec<QueuedRequest>>,
    /// Held by the caller committing a group; the others wait for their outcome.
    /// Its connection is kept between groups: statements stay prepared and no pool
    /// checkout sits on the commit path.
    writer: tokio::sync::Mutex<Option<PoolConnection<Sqlite>>>,
}

/// A new request waiting for the group-commit writer, and where to send its outcome.
struct QueuedRequest {
    request: ApprovalRequest,
    audit: Vec<NewAuditEvent>,
    outbox: Vec<NewOutboxMessage>,
    idempotency: Option<(IdempotencyKey, Value)>,
    committed: oneshot::Sender<StoreResult<()>>,
}

impl std::fmt::Debug for QueuedRequest {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("QueuedRequest")
            .field("id", &self.request.id)
            .finish()
    }
}

/// At most this many new requests share one commit.
const GROUP_COMMIT_LIMIT: usize = 256;

impl SqliteStore {
    const MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

    /// One statement: SQLite runs it under its single writer lock.
    const CLAIM_OUTBOX: &'static str = "UPDATE outbox SET lease_until = $2 WHERE id IN (\
         SELECT id FROM outbox WHERE state = 'pending' AND available_at <= $1 \
         AND (lease_until IS NULL OR lease_until <= $1) ORDER BY available_at, id LIMIT $3) \
         RETURNING id, request_id, kind, destination, payload, attempts, generation, created_at";

    pub async fn connect(config: &Config) -> anyhow::Result<Self> {
        let synchronous = match config.sqlite_synchronous.as_str() {
            "normal" => SqliteSynchronous::Normal,
            _ => SqliteSynchronous::Full,
        };
        let options = SqliteConnectOptions::from_str(config.database_url.expose())
            .context("database_url is not a valid sqlite: URL")?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(config.database_max_connections.max(2))
            // A local file does not drop connections; a ping per checkout only adds latency.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .context("cannot open the SQLite database")?;
        Ok(Self {
            pool,
            group_commit: Arc::default(),
        })
    }

    /// Group commit: the request joins a queue; whoever holds the writer lock commits
    /// everything queued so far in one transaction (one disk sync), one savepoint per
    /// request so a refused one does not take the others with it. Each caller returns only
    /// after the commit that holds its request, so `synchronous=FULL` still means an
    /// acknowledged request survives power loss.
    async fn insert_new_request(&self, new: super::NewRequest<'_>) -> StoreResult<()> {
        let (committed, mut outcome) = oneshot::channel();
        let queued = QueuedRequest {
            request: new.request.clone(),
            audit: new.audit,
            outbox: new.outbox,
            idempotency: new
                .idempotency
                .map(|(key, response)| (key.clone(), response)),
            committed,
        };
        self.queue().push(queued);
        let mut writer = self.group_commit.writer.lock().await;
        // The previous writer may have committed ours along with its own.
        if let Ok(result) = outcome.try_recv() {
            return result;
        }
        loop {
            let batch: Vec<QueuedRequest> = {
                let mut queue = self.queue();
                let take = queue.len().min(GROUP_COMMIT_LIMIT);
                queue.drain(..take).collect()
            };
            if batch.is_empty() {
                break;
            }
            let connection = match writer.as_mut() {
                Some(connection) => connection,
                None => match self.pool.acquire().await {
                    Ok(connection) => writer.insert(connection),
                    Err(error) => {
                        refuse_all(batch.into_iter().map(|queued| queued.committed), &error);
                        if let Ok(result) = outcome.try_recv() {
                            return result;
                        }
                        continue;
                    }
                },
            };
            if !commit_batch(connection, batch).await {
                // Something is wrong with the connection; take a fresh one next time.
                *writer = None;
            }
            if let Ok(result) = outcome.try_recv() {
                return result;
            }
        }
        Err(StoreError::Database(sqlx::Error::PoolClosed))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<QueuedRequest>> {
        self.group_commit
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `BEGIN IMMEDIATE` takes the write lock up front, so a transaction that reads and
    /// then writes waits its turn (busy timeout) instead of failing on upgrade.
    async fn begin_write(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Writers already take the single write lock at `BEGIN IMMEDIATE`.
    async fn serialize_audit_appends(_connection: &mut SqliteConnection) -> StoreResult<()> {
        Ok(())
    }

    async fn notifications(&self) -> StoreResult<Option<super::Notifications>> {
        Ok(None)
    }

    /// Other processes learn of decisions from the audit table (see `watcher`).
    async fn notify_finalized(
        _transaction: &mut Transaction<'_, Sqlite>,
        _request_id: &str,
    ) -> StoreResult<()> {
        Ok(())
    }
}

implement_store!(SqliteStore, sqlx::Sqlite);

/// Commits one group on `connection`; returns false if the connection misbehaved.
async fn commit_batch(connection: &mut SqliteConnection, batch: Vec<QueuedRequest>) -> bool {
    if let Err(error) = sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *connection)
        .await
    {
        refuse_all(batch.into_iter().map(|queued| queued.committed), &error);
        return false;
    }
    let mut written = Vec::with_capacity(batch.len());
    for queued in batch {
        match write_with_savepoint(connection, &queued).await {
            Ok(()) => written.push(queued.committed),
            Err(error) => {
                let _ = queued.committed.send(Err(error));
            }
        }
    }
    match sqlx::query("COMMIT").execute(&mut *connection).await {
        Ok(_) => {
            for committed in written {
                let _ = committed.send(Ok(()));
            }
            true
        }
        Err(error) => {
            let _ = sqlx::query("ROLLBACK").execute(&mut *connection).await;
            refuse_all(written.into_iter(), &error);
            false
        }
    }
}

/// Nothing in the group was committed; every waiting caller hears so.
fn refuse_all(
    waiting: impl Iterator<Item = oneshot::Sender<StoreResult<()>>>,
    error: &sqlx::Error,
) {
    for committed in waiting {
        let _ = committed.send(Err(StoreError::Database(sqlx::Error::Protocol(
            error.to_string(),
        ))));
    }
}

async fn write_with_savepoint(
    connection: &mut SqliteConnection,
    queued: &QueuedRequest,
) -> StoreResult<()> {
    {
        sqlx::query("SAVEPOINT new_request")
            .execute(&mut *connection)
            .await?;
        let written = SqliteStore::write_new_request(
            &mut *connection,
            &queued.request,
            queued.audit.clone(),
            queued.outbox.clone(),
            queued
                .idempotency
                .as_ref()
                .map(|(key, response)| (key, response.clone())),
        )
        .await;
        if written.is_err() {
            sqlx::query("ROLLBACK TO new_request")
                .execute(&mut *connection)
                .await?;
        }
        sqlx::query("RELEASE new_request")
            .execute(&mut *connection)
            .await?;
        written
    }
}
