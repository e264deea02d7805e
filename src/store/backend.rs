//! `SqlStore`, the one `Store` implementation, and `Backend`: what SQLite and PostgreSQL do
//! differently. Each `Store` method forwards to the file of its area.
//!
//! The SQL is shared: both backends take `$N` placeholders and the same column types
//! through sqlx. The areas' code is generic over the sqlx database and names, in a `where`
//! clause, the sqlx traits it needs of it (Rust does not infer those from `DB: Backend`);
//! `Column` and `Param` shorten the list.

use std::fmt;
use std::future::Future;
use std::ops::DerefMut;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::migrate::{Migrate, Migrator};
use sqlx::types::Json;
use sqlx::{
    ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, QueryBuilder, Type,
};

use super::group_commit::{GroupCommit, QueuedRequest};
use super::requests::{StoredRequest, StoredRequestRef};
use super::{
    AgentRecord, CandidateQuery, ConversationEndpoint, Due, IdempotencyKey, IntakeLookup, Judge,
    NewRequest, Notifications, OutboxBacklog, OutboxCandidate, OutboxMessage, OutboxOutcome,
    RequestChange, RequestFilter, Reservation, Store, StoreError, StoreResult,
};
use crate::audit::{AuditEvent, NewAuditEvent};
use crate::domain::{ApprovalRequest, Grant, Principal};

/// What a backend does its own way: how writes serialise and commit, the audit lock,
/// decision announcements, and the statements whose SQL differs (sets from a JSON array,
/// `FOR UPDATE SKIP LOCKED`).
pub trait Backend:
    for<'q> Database<Arguments<'q>: IntoArguments<'q, Self>, Connection: Migrate>
{
    /// What the store keeps beside its pool for writing (SQLite: its one writer connection).
    type Writer: Clone + fmt::Debug + Send + Sync + 'static;
    /// A write transaction: statements run on it (`DerefMut` to a connection) until `commit`.
    type Transaction: DerefMut<Target = Self::Connection> + Send;
    /// A connection for a write that is one statement, committed on its own.
    type WriteConnection: DerefMut<Target = Self::Connection> + Send;

    const MIGRATOR: Migrator;
    /// Does one `execute` run several statements with bind parameters (SQLite), so a
    /// transaction's writes can go in one round trip?
    const BATCHES_STATEMENTS: bool;
    /// How many group-commit writers run at once.
    const GROUP_WRITERS: usize;

    /// Which of the ids in the JSON array `$1` are decided.
    const DECIDED_AMONG: &'static str;
    /// Of the ids in the JSON array `$3`, those still due and unleased at `$1`, leased until
    /// `$2`; returns the leased messages.
    const CLAIM_OUTBOX: &'static str;
    /// Of the ids in the JSON array `$1`, those still leased (delivery running), until `$2`.
    const RENEW_OUTBOX_LEASES: &'static str;
    /// The first `$2` due messages of each (destination, agent) queue whose destination is
    /// not in the JSON array `$4` nor its host in `$5`, the oldest `$3` in all
    /// (`outbox::candidates_sql` with this backend's parts).
    fn outbox_candidates_sql() -> &'static str;

    /// Begins a write transaction.
    fn begin_write(
        store: &SqlStore<Self>,
    ) -> impl Future<Output = StoreResult<Self::Transaction>> + Send;
    fn commit(transaction: Self::Transaction) -> impl Future<Output = StoreResult<()>> + Send;
    /// A connection for writes outside a transaction.
    fn write_connection(
        store: &SqlStore<Self>,
    ) -> impl Future<Output = StoreResult<Self::WriteConnection>> + Send;
    /// Writes a group of new requests, with their audit events, outbox rows and
    /// Idempotency-Key answers, in one transaction.
    fn write_group(
        store: &SqlStore<Self>,
        group: &[QueuedRequest],
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Called in a write transaction just before the audit head is read; holds whatever
    /// orders audit appends across processes until the commit.
    fn serialize_audit_appends(
        connection: &mut Self::Connection,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// `SELECT created_at, value` of this agent's (`$1`) requests for action `$2` created
    /// after `$3` and before `$4` that are pending or approved; `value` is 1 when `$5` is
    /// '', else the number `args.$5` (0 when missing or not a number), as a double.
    const COUNTED_BETWEEN: &'static str;
    /// Called first in a judged intake's transaction: holds whatever serialises intakes of
    /// the same agent and action across processes until the commit.
    fn serialize_intake(
        connection: &mut Self::Connection,
        agent: &str,
        action: &str,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Announces a decision to other processes when the transaction commits.
    fn notify_finalized(
        connection: &mut Self::Connection,
        request_id: &str,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// See `Store::finalized_notifications`.
    fn finalized_notifications(
        store: &SqlStore<Self>,
    ) -> impl Future<Output = StoreResult<Option<Notifications>>> + Send;
    /// Runs the statement `builder` holds and returns how many rows it changed. (Generic
    /// code cannot: it would have to borrow the builder for as long as its arguments live.)
    fn execute_built(
        builder: &mut QueryBuilder<'_, Self>,
        connection: &mut Self::Connection,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;
    fn rows_affected(result: &Self::QueryResult) -> u64;
}

/// `T: Column<DB>`: the shared SQL binds `T` (or `&T`) on `DB` and reads it back.
pub trait Column<DB: Database>: for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB> {}

impl<DB: Database, T> Column<DB> for T where
    T: for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB>
{
}

/// `T: Param<'q, DB>`: the shared SQL binds `T`, which borrows for `'q`, on `DB` (written
/// `for<'q> &'q str: Param<'q, DB>`).
pub trait Param<'q, DB: Database>: Encode<'q, DB> + Type<DB> {}

impl<'q, DB: Database, T> Param<'q, DB> for T where T: Encode<'q, DB> + Type<DB> {}

/// The store over one backend: `SqliteStore` and `PostgresStore`.
pub struct SqlStore<DB: Backend> {
    pub(super) pool: Pool<DB>,
    pub(super) writer: DB::Writer,
    /// New requests are committed in groups; `None` inside the group-commit task itself.
    pub(super) group_commit: Option<GroupCommit<QueuedRequest>>,
    /// Judged intakes (counters, grants) are committed in groups too; `None` inside the
    /// writer task itself.
    pub(super) judged_commit: Option<GroupCommit<super::intake::QueuedJudgement>>,
}

impl<DB: Backend> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            writer: self.writer.clone(),
            group_commit: self.group_commit.clone(),
            judged_commit: self.judged_commit.clone(),
        }
    }
}

impl<DB: Backend> fmt::Debug for SqlStore<DB> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SqlStore")
            .field("pool", &self.pool)
            .field("writer", &self.writer)
            .field("group_commit", &self.group_commit)
            .finish()
    }
}

/// Unique-key violations become `Conflict`; everything else stays a database error.
pub(super) fn conflict_on_unique(error: sqlx::Error, what: &str) -> StoreError {
    match &error {
        sqlx::Error::Database(database) if database.is_unique_violation() => {
            StoreError::Conflict(what.to_string())
        }
        _ => StoreError::Database(error),
    }
}

#[async_trait]
impl<DB> Store for SqlStore<DB>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    usize: ColumnIndex<DB::Row>,
    i64: Column<DB>,
    i32: Column<DB>,
    bool: Column<DB>,
    Vec<u8>: Column<DB>,
    String: Column<DB>,
    Option<String>: Column<DB>,
    DateTime<Utc>: Column<DB>,
    Option<DateTime<Utc>>: Column<DB>,
    Json<Value>: Column<DB>,
    Json<Vec<Principal>>: Column<DB>,
    Json<StoredRequest>: Column<DB>,
    Json<Grant>: Column<DB>,
    f64: Column<DB>,
    for<'q> Json<&'q Grant>: Param<'q, DB>,
    for<'q> &'q str: Param<'q, DB>,
    for<'q> Option<&'q str>: Param<'q, DB>,
    for<'q> Json<&'q Value>: Param<'q, DB>,
    for<'q> Json<&'q RawValue>: Param<'q, DB>,
    for<'q> Json<&'q Vec<Principal>>: Param<'q, DB>,
    for<'q> Json<StoredRequestRef<'q>>: Param<'q, DB>,
{
    /// Skips the migrator when the database holds exactly this build's migrations, each
    /// applied successfully and unchanged: sqlx's migrator creates its table before it looks
    /// (DDL, even when nothing is to be done), and skipping it lets a role that may only read
    /// and write rows run the server. Anything else, including an unreadable
    /// `_sqlx_migrations`, leaves the decision to the migrator.
    #[tracing::instrument(skip_all)]
    async fn migrate(&self) -> StoreResult<()> {
        let applied: Result<Vec<(i64, Vec<u8>, bool)>, _> = sqlx::query_as(
            "SELECT version, checksum, success FROM _sqlx_migrations ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await;
        let expected: Vec<(i64, Vec<u8>, bool)> = DB::MIGRATOR
            .iter()
            .filter(|migration| !migration.migration_type.is_down_migration())
            .map(|migration| (migration.version, migration.checksum.to_vec(), true))
            .collect();
        if applied.is_ok_and(|applied| applied == expected) {
            return Ok(());
        }
        DB::MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_agent(&self, agent: &AgentRecord, audit: NewAuditEvent) -> StoreResult<()> {
        self.create_agent(agent, audit).await
    }

    async fn agent_by_key_hash(&self, api_key_hash: &str) -> StoreResult<Option<AgentRecord>> {
        self.agent_by_key_hash(api_key_hash).await
    }

    async fn agent(&self, name: &str) -> StoreResult<Option<AgentRecord>> {
        self.agent(name).await
    }

    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        self.list_agents().await
    }

    async fn revoke_agent(&self, name: &str, audit: NewAuditEvent) -> StoreResult<bool> {
        self.revoke_agent(name, audit).await
    }

    async fn insert_request(&self, new: NewRequest<'_>) -> StoreResult<()> {
        self.insert_request(new).await
    }

    async fn insert_judged_request(
        &self,
        lookup: IntakeLookup,
        judge: Judge,
    ) -> StoreResult<ApprovalRequest> {
        self.insert_judged_request(lookup, judge).await
    }

    async fn list_grants(&self, agent: Option<&str>) -> StoreResult<Vec<Grant>> {
        self.list_grants(agent).await
    }

    async fn grant(&self, id: &str) -> StoreResult<Option<Grant>> {
        self.grant(id).await
    }

    async fn revoke_grant(
        &self,
        id: &str,
        at: DateTime<Utc>,
        audit: NewAuditEvent,
    ) -> StoreResult<bool> {
        self.revoke_grant(id, at, audit).await
    }

    async fn request(&self, id: &str) -> StoreResult<Option<ApprovalRequest>> {
        self.request(id).await
    }

    async fn update_request(&self, change: RequestChange<'_>) -> StoreResult<()> {
        self.update_request(change).await
    }

    async fn list_requests(&self, filter: &RequestFilter) -> StoreResult<Vec<ApprovalRequest>> {
        self.list_requests(filter).await
    }

    async fn pending_count(&self) -> StoreResult<i64> {
        self.pending_count().await
    }

    async fn pending_count_of_agent(&self, agent: &str) -> StoreResult<i64> {
        self.pending_count_of_agent(agent).await
    }

    async fn due_request_ids(
        &self,
        due: Due,
        now: DateTime<Utc>,
        limit: i64,
    ) -> StoreResult<Vec<String>> {
        self.due_request_ids(due, now, limit).await
    }

    async fn reserve_idempotency_key(
        &self,
        key: &IdempotencyKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Reservation> {
        self.reserve_idempotency_key(key, now).await
    }

    async fn release_idempotency_key(&self, key: &IdempotencyKey) -> StoreResult<()> {
        self.release_idempotency_key(key).await
    }

    async fn purge_idempotency_keys(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        self.purge_idempotency_keys(before).await
    }

    async fn audit_events(&self, after: i64, limit: i64) -> StoreResult<Vec<AuditEvent>> {
        self.audit_events(after, limit).await
    }

    async fn decided_among(&self, request_ids: &[String]) -> StoreResult<Vec<String>> {
        self.decided_among(request_ids).await
    }

    async fn latest_audit_seq(&self) -> StoreResult<i64> {
        self.latest_audit_seq().await
    }

    async fn audit_head(&self) -> StoreResult<Option<(i64, String)>> {
        self.audit_head().await
    }

    async fn append_audit(&self, events: Vec<NewAuditEvent>) -> StoreResult<()> {
        self.append_audit(events).await
    }

    #[tracing::instrument(skip_all)]
    async fn finalized_notifications(&self) -> StoreResult<Option<Notifications>> {
        DB::finalized_notifications(self).await
    }

    async fn pending_outbox(&self, limit: i64) -> StoreResult<Vec<OutboxMessage>> {
        self.pending_outbox(limit).await
    }

    async fn outbox_candidates(
        &self,
        now: DateTime<Utc>,
        query: &CandidateQuery<'_>,
    ) -> StoreResult<Vec<OutboxCandidate>> {
        self.outbox_candidates(now, query).await
    }

    async fn claim_outbox(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        ids: &[i64],
    ) -> StoreResult<Vec<OutboxMessage>> {
        self.claim_outbox(now, lease_until, ids).await
    }

    async fn renew_outbox_leases(
        &self,
        ids: &[i64],
        lease_until: DateTime<Utc>,
    ) -> StoreResult<u64> {
        self.renew_outbox_leases(ids, lease_until).await
    }

    async fn finish_outbox(
        &self,
        message: &OutboxMessage,
        outcome: OutboxOutcome,
    ) -> StoreResult<()> {
        self.finish_outbox(message, outcome).await
    }

    async fn outbox_backlog(&self) -> StoreResult<OutboxBacklog> {
        self.outbox_backlog().await
    }

    async fn chat_message(
        &self,
        request_id: &str,
        destination: &str,
    ) -> StoreResult<Option<Value>> {
        self.chat_message(request_id, destination).await
    }

    async fn record_conversation_endpoint(
        &self,
        endpoint: &ConversationEndpoint,
    ) -> StoreResult<()> {
        self.record_conversation_endpoint(endpoint).await
    }

    async fn conversation_endpoint(
        &self,
        destination: &str,
    ) -> StoreResult<Option<ConversationEndpoint>> {
        self.conversation_endpoint(destination).await
    }
}
