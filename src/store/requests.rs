//! Approval requests in the `requests` table: their stored form, creation (group commit),
//! the compare-and-set update, listing, counting, and what the sweeper finds due.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{ColumnIndex, Executor, QueryBuilder};

use super::backend::{conflict_on_unique, Backend, Column, Param, SqlStore};
use super::counters::{counted, CounterChanges};
use super::group_commit::{self, QueuedRequest};
use super::idempotency::TAKEN_OVER;
use super::{Due, NewRequest, RequestChange, RequestFilter, StoreError, StoreResult};
use crate::domain::{ApprovalRequest, Principal};

/// How a request sits in the `body` column: the API object plus what the API does not show.
#[derive(Serialize, Deserialize)]
pub struct StoredRequest {
    #[serde(flatten)]
    pub request: ApprovalRequest,
    pub original_args: Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_tiers: Vec<String>,
    /// Each vote's aliases, in the order of `votes` (the API object never shows them).
    /// Bodies written before this field kept them inside each vote, where they are read.
    #[serde(default)]
    pub vote_aliases: Vec<Vec<Principal>>,
    /// Steps of the escalation ladder taken: the sweeper's compare-and-set moves it on.
    #[serde(default)]
    pub escalation_step: u32,
}

/// `StoredRequest` for writing, borrowed: serialising needs no copy of the request.
#[derive(Serialize)]
pub struct StoredRequestRef<'a> {
    #[serde(flatten)]
    pub request: &'a ApprovalRequest,
    pub original_args: &'a Value,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub previous_tiers: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vote_aliases: Vec<&'a [Principal]>,
    #[serde(skip_serializing_if = "is_zero")]
    pub escalation_step: u32,
}

fn is_zero(step: &u32) -> bool {
    *step == 0
}

impl StoredRequest {
    pub fn from_request(request: &ApprovalRequest) -> StoredRequestRef<'_> {
        let any_aliases = request.votes.iter().any(|vote| !vote.aliases.is_empty());
        StoredRequestRef {
            request,
            original_args: &request.original_args,
            previous_tiers: &request.previous_tiers,
            escalation_step: request.escalation_step,
            vote_aliases: if any_aliases {
                request
                    .votes
                    .iter()
                    .map(|vote| vote.aliases.as_slice())
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    /// The request, with what lives in columns rather than in the body.
    pub fn into_request(self, columns: RequestColumns) -> ApprovalRequest {
        let mut request = self.request;
        request.original_args = self.original_args;
        request.previous_tiers = self.previous_tiers;
        request.escalation_step = self.escalation_step;
        for (vote, aliases) in request.votes.iter_mut().zip(self.vote_aliases) {
            if !aliases.is_empty() {
                vote.aliases = aliases;
            }
        }
        (request.version, request.remind_at, request.escalate_at) = columns;
        request
    }
}

/// `version, remind_at, escalate_at`, read beside `body`.
pub type RequestColumns = (i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// `body, version, remind_at, escalate_at`: a request as read.
type RequestRow = (
    Json<StoredRequest>,
    i64,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

fn request_from_row((body, version, remind_at, escalate_at): RequestRow) -> ApprovalRequest {
    body.0.into_request((version, remind_at, escalate_at))
}

/// Which due work to look for.
fn due_query(kind: Due) -> &'static str {
    match kind {
        Due::Expiry => {
            "SELECT id FROM requests WHERE status = 'pending' AND expires_at <= $1 ORDER BY expires_at LIMIT $2"
        }
        Due::Reminder => {
            "SELECT id FROM requests WHERE status = 'pending' AND remind_at <= $1 ORDER BY remind_at LIMIT $2"
        }
        Due::Escalation => {
            "SELECT id FROM requests WHERE status = 'pending' AND escalate_at <= $1 ORDER BY escalate_at LIMIT $2"
        }
    }
}

/// Why the database refused new requests: a taken id, a revoked agent (the
/// `requests_from_active_agents` trigger of both backends raises this message), or an
/// Idempotency-Key taken over by a later attempt.
pub(super) fn refused_request_insert(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(database) if database.message().contains("agent revoked") => {
            StoreError::AgentRevoked
        }
        sqlx::Error::Database(database) if database.message().contains(TAKEN_OVER) => {
            StoreError::IdempotencyKeyTakenOver
        }
        _ => conflict_on_unique(error, "request id already exists"),
    }
}

impl<DB> SqlStore<DB>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    usize: ColumnIndex<DB::Row>,
    i64: Column<DB>,
    i32: Column<DB>,
    String: Column<DB>,
    Option<String>: Column<DB>,
    DateTime<Utc>: Column<DB>,
    Option<DateTime<Utc>>: Column<DB>,
    Json<Value>: Column<DB>,
    Json<StoredRequest>: Column<DB>,
    Json<crate::domain::Grant>: Column<DB>,
    f64: Column<DB>,
    for<'q> Json<&'q crate::domain::Grant>: Param<'q, DB>,
    for<'q> &'q str: Param<'q, DB>,
    for<'q> Option<&'q str>: Param<'q, DB>,
    for<'q> Json<&'q Value>: Param<'q, DB>,
    for<'q> Json<&'q RawValue>: Param<'q, DB>,
    for<'q> Json<StoredRequestRef<'q>>: Param<'q, DB>,
{
    /// Queues the request for the next group commit and waits for it.
    #[tracing::instrument(skip_all, fields(request_id = %new.request.id))]
    pub(super) async fn insert_request(&self, new: NewRequest<'_>) -> StoreResult<()> {
        let (queued, outcome) = QueuedRequest::new(new)?;
        match &self.group_commit {
            Some(group_commit) => group_commit.queue(queued)?,
            None => self.commit_group(vec![queued]).await,
        }
        group_commit::committed(outcome).await
    }

    /// One multi-row insert of a group's new requests.
    pub(super) fn push_request_rows<'rows>(
        sql: &mut QueryBuilder<'rows, DB>,
        group: &'rows [QueuedRequest],
    ) {
        sql.push(
            "INSERT INTO requests (id, agent, action, status, revision, version, created_at, \
             expires_at, updated_at, body, remind_at, escalate_at) ",
        );
        sql.push_values(group, |mut row, queued| {
            let request = &queued.request;
            row.push_bind(&request.id)
                .push_bind(&request.agent)
                .push_bind(&request.action)
                .push_bind(request.status.as_str())
                .push_bind(i64::from(request.revision))
                .push_bind(request.version)
                .push_bind(request.created_at)
                .push_bind(request.expires_at)
                .push_bind(request.created_at)
                .push_bind(Json(&*queued.body))
                .push_bind(request.remind_at)
                .push_bind(request.escalate_at);
        });
    }

    #[tracing::instrument(skip_all, fields(request_id = %id))]
    pub(super) async fn request(&self, id: &str) -> StoreResult<Option<ApprovalRequest>> {
        let row: Option<RequestRow> = sqlx::query_as(
            "SELECT body, version, remind_at, escalate_at FROM requests WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(request_from_row))
    }

    /// The compare-and-set on (id, status, revision, version), with the change's outbox
    /// rows and audit events, and the decision's announcement, in one transaction.
    #[tracing::instrument(skip_all, fields(request_id = %change.request.id))]
    pub(super) async fn update_request(&self, change: RequestChange<'_>) -> StoreResult<()> {
        let request = change.request;
        let mut transaction = DB::begin_write(self).await?;
        let counters = Self::counter_changes(&mut transaction, &change).await?;
        let updated = sqlx::query(
            "UPDATE requests SET status = $1, revision = $2, version = $3, expires_at = $4, \
             updated_at = $5, body = $6, remind_at = $11, escalate_at = $12 \
             WHERE id = $7 AND status = $8 AND revision = $9 AND version = $10",
        )
        .bind(request.status.as_str())
        .bind(i64::from(request.revision))
        .bind(request.version)
        .bind(request.expires_at)
        .bind(crate::domain::now())
        .bind(Json(StoredRequest::from_request(request)))
        .bind(&request.id)
        .bind(change.expected_status.as_str())
        .bind(i64::from(change.expected_revision))
        .bind(change.expected_version)
        .bind(request.remind_at)
        .bind(request.escalate_at)
        .execute(&mut *transaction)
        .await?;
        if DB::rows_affected(&updated) != 1 {
            return Err(StoreError::Conflict(format!(
                "request {} changed concurrently",
                request.id
            )));
        }
        Self::insert_created_grants(&mut transaction, &change.audit).await?;
        let finalized = change.audit.iter().any(|event| event.kind.is_final());
        // Outbox rows before the audit lock, as every transaction that touches both does (a
        // delivery's finish locks its outbox row first): the other order deadlocks against
        // it on PostgreSQL.
        let outbox: Vec<_> = change.outbox.iter().collect();
        Self::append_outbox(&mut transaction, &outbox).await?;
        Self::append_audit_events(&mut transaction, change.audit).await?;
        // Under the audit lock, as every change of the buckets is: they cannot deadlock.
        Self::adjust_counters(&mut transaction, &counters).await?;
        if finalized {
            DB::notify_finalized(&mut transaction, &request.id).await?;
        }
        DB::commit(transaction).await
    }

    /// What `change` does to the counters: a request leaving pending/approved stops
    /// counting, and a modification swaps the old args' sums for the new. The old args are
    /// read only then, from the version the compare-and-set expects.
    async fn counter_changes(
        connection: &mut DB::Connection,
        change: &RequestChange<'_>,
    ) -> StoreResult<CounterChanges> {
        let request = change.request;
        let mut changes = CounterChanges::default();
        let args_replaced = change.expected_revision != request.revision;
        let (counted_before, counted_after) =
            (counted(change.expected_status), counted(request.status));
        if counted_before {
            let previous_args = if args_replaced {
                let stored: Option<(Json<Value>,)> =
                    sqlx::query_as("SELECT body FROM requests WHERE id = $1 AND version = $2")
                        .bind(&request.id)
                        .bind(change.expected_version)
                        .fetch_optional(&mut *connection)
                        .await?;
                let Some((Json(mut body),)) = stored else {
                    return Err(StoreError::Conflict(format!(
                        "request {} changed concurrently",
                        request.id
                    )));
                };
                body.get_mut("args").map(Value::take).unwrap_or(Value::Null)
            } else if counted_after {
                return Ok(changes);
            } else {
                request.args.clone()
            };
            changes.count(request, change.expected_status, &previous_args, -1);
        }
        changes.count(request, request.status, &request.args, 1);
        Ok(changes)
    }

    #[tracing::instrument(skip_all)]
    pub(super) async fn list_requests(
        &self,
        filter: &RequestFilter,
    ) -> StoreResult<Vec<ApprovalRequest>> {
        let limit = if filter.limit > 0 { filter.limit } else { 1000 };
        let rows: Vec<RequestRow> = sqlx::query_as(
            "SELECT body, version, remind_at, escalate_at FROM requests \
             WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR agent = $2) \
             ORDER BY created_at, id LIMIT $3",
        )
        .bind(filter.status.map(|status| status.as_str()))
        .bind(filter.agent.as_deref())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(request_from_row).collect())
    }

    #[tracing::instrument(skip_all)]
    pub(super) async fn pending_count(&self) -> StoreResult<i64> {
        let (count,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM requests WHERE status = 'pending'")
                .fetch_one(&self.pool)
                .await?;
        Ok(count)
    }

    #[tracing::instrument(skip_all, fields(agent = %agent))]
    pub(super) async fn pending_count_of_agent(&self, agent: &str) -> StoreResult<i64> {
        let (count,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM requests WHERE agent = $1 AND status = 'pending'")
                .bind(agent)
                .fetch_one(&self.pool)
                .await?;
        Ok(count)
    }

    #[tracing::instrument(skip_all, fields(due = due.as_str()))]
    pub(super) async fn due_request_ids(
        &self,
        due: Due,
        now: DateTime<Utc>,
        limit: i64,
    ) -> StoreResult<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(due_query(due))
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// `Backend::DECIDED_AMONG`: the set of ids comes as a JSON array.
    #[tracing::instrument(skip_all, fields(count = request_ids.len()))]
    pub(super) async fn decided_among(&self, request_ids: &[String]) -> StoreResult<Vec<String>> {
        if request_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = serde_json::to_string(request_ids)
            .map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
        Ok(sqlx::query_scalar(DB::DECIDED_AMONG)
            .bind(ids)
            .fetch_all(&self.pool)
            .await?)
    }
}
