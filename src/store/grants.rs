//! Standing grants in the `grants` table, and the judged intake: counters and a grant's use
//! read and written in the transaction that inserts the request.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{ColumnIndex, Executor, QueryBuilder};

use super::backend::{Backend, Column, Param, SqlStore};
use super::group_commit::QueuedRequest;
use super::requests::{refused_request_insert, StoredRequest, StoredRequestRef};
use super::{IntakeFacts, IntakeLookup, Judge, NewRequest, StoreError, StoreResult};
use crate::audit::NewAuditEvent;
use crate::domain::{ApprovalRequest, AuditKind, Grant};

/// This agent's requests for this action created after `$3`, pending or approved (by any
/// route), through the `requests_agent_action_created` index.
const RECENT_COUNT: &str = "SELECT COUNT(*) FROM requests \
     WHERE agent = $1 AND action = $2 AND created_at > $3 AND status IN ('pending', 'approved')";

const ACTIVE_GRANTS: &str = "SELECT body, uses_left FROM grants \
     WHERE agent = $1 AND action = $2 AND expires_at > $3 AND revoked_at IS NULL AND uses_left > 0 \
     ORDER BY created_at, id";

impl<DB> SqlStore<DB>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    usize: ColumnIndex<DB::Row>,
    i64: Column<DB>,
    i32: Column<DB>,
    f64: Column<DB>,
    String: Column<DB>,
    Option<String>: Column<DB>,
    DateTime<Utc>: Column<DB>,
    Option<DateTime<Utc>>: Column<DB>,
    Json<Value>: Column<DB>,
    Json<StoredRequest>: Column<DB>,
    Json<Grant>: Column<DB>,
    for<'q> &'q str: Param<'q, DB>,
    for<'q> Option<&'q str>: Param<'q, DB>,
    for<'q> Json<&'q Value>: Param<'q, DB>,
    for<'q> Json<&'q RawValue>: Param<'q, DB>,
    for<'q> Json<&'q Grant>: Param<'q, DB>,
    for<'q> Json<StoredRequestRef<'q>>: Param<'q, DB>,
{
    /// See `Store::insert_judged_request`. Outside the group commit: its reads must see
    /// every earlier intake of the same agent and action, committed.
    #[tracing::instrument(skip_all, fields(agent = %lookup.agent, action = %lookup.action))]
    pub(super) async fn insert_judged_request(
        &self,
        lookup: IntakeLookup,
        judge: Judge,
    ) -> StoreResult<ApprovalRequest> {
        let mut transaction = DB::begin_write(self).await?;
        DB::serialize_intake(&mut transaction, &lookup.agent, &lookup.action).await?;
        let mut facts = IntakeFacts::default();
        for (field, since) in &lookup.counters {
            let value: f64 = match field {
                None => {
                    let (count,): (i64,) = sqlx::query_as(RECENT_COUNT)
                        .bind(lookup.agent.as_str())
                        .bind(lookup.action.as_str())
                        .bind(*since)
                        .fetch_one(&mut *transaction)
                        .await?;
                    count as f64
                }
                Some(field) => {
                    let (sum,): (f64,) = sqlx::query_as(DB::RECENT_SUM)
                        .bind(lookup.agent.as_str())
                        .bind(lookup.action.as_str())
                        .bind(*since)
                        .bind(field.as_str())
                        .fetch_one(&mut *transaction)
                        .await?;
                    sum
                }
            };
            facts.counters.push(value);
        }
        if lookup.grants {
            let rows: Vec<(Json<Grant>, i64)> = sqlx::query_as(ACTIVE_GRANTS)
                .bind(lookup.agent.as_str())
                .bind(lookup.action.as_str())
                .bind(lookup.now)
                .fetch_all(&mut *transaction)
                .await?;
            facts.grants = rows
                .into_iter()
                .map(|(body, uses_left)| Grant {
                    uses_left: u32::try_from(uses_left).unwrap_or(0),
                    ..body.0
                })
                .collect();
        }
        let judged = judge(facts)?;
        if let Some(grant_id) = &judged.grant_used {
            // The compare-and-set that makes each use count once.
            let spent = sqlx::query(
                "UPDATE grants SET uses_left = uses_left - 1 \
                 WHERE id = $1 AND uses_left > 0 AND revoked_at IS NULL AND expires_at > $2",
            )
            .bind(grant_id.as_str())
            .bind(lookup.now)
            .execute(&mut *transaction)
            .await?;
            if DB::rows_affected(&spent) != 1 {
                return Err(StoreError::Conflict(format!(
                    "grant {grant_id} was used up concurrently"
                )));
            }
        }
        let request = judged.request.clone();
        let (queued, _outcome) = QueuedRequest::new(NewRequest {
            request: &judged.request,
            audit: Vec::new(),
            outbox: Vec::new(),
            idempotency: None,
        })?;
        let group = std::slice::from_ref(&queued);
        let mut insert = QueryBuilder::new("");
        Self::push_request_rows(&mut insert, group);
        DB::execute_built(&mut insert, &mut transaction)
            .await
            .map_err(refused_request_insert)?;
        let outbox: Vec<_> = judged.outbox.iter().collect();
        Self::append_outbox(&mut transaction, &outbox).await?;
        if let Some((key, response)) = &judged.idempotency {
            let mut answer = QueryBuilder::new("");
            Self::push_idempotency_answer(&mut answer, &request.id, key, response);
            if DB::execute_built(&mut answer, &mut transaction).await? == 0 {
                return Err(StoreError::IdempotencyKeyTakenOver);
            }
        }
        let finalized = judged.audit.iter().any(|event| event.kind.is_final());
        Self::append_audit_events(&mut transaction, judged.audit).await?;
        if finalized {
            DB::notify_finalized(&mut transaction, &request.id).await?;
        }
        DB::commit(transaction).await?;
        Ok(request)
    }

    /// Inserts the grants that `audit`'s `grant_created` events carry (their payload is the
    /// grant): a grant exists exactly when the approval that made it is stored.
    pub(super) async fn insert_created_grants(
        connection: &mut DB::Connection,
        audit: &[NewAuditEvent],
    ) -> StoreResult<()> {
        for event in audit
            .iter()
            .filter(|event| event.kind == AuditKind::GrantCreated)
        {
            let grant: Grant = serde_json::from_value(event.payload.clone())
                .map_err(|error| StoreError::Database(sqlx::Error::Decode(Box::new(error))))?;
            sqlx::query(
                "INSERT INTO grants (id, agent, action, created_at, expires_at, uses_left, revoked_at, body) \
                 VALUES ($1, $2, $3, $4, $5, $6, NULL, $7)",
            )
            .bind(grant.id.as_str())
            .bind(grant.agent.as_str())
            .bind(grant.action.as_str())
            .bind(grant.created_at)
            .bind(grant.expires_at)
            .bind(i64::from(grant.uses_left))
            .bind(Json(&grant))
            .execute(&mut *connection)
            .await?;
        }
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    pub(super) async fn list_grants(&self, agent: Option<&str>) -> StoreResult<Vec<Grant>> {
        let rows: Vec<GrantRow> = sqlx::query_as(
            "SELECT body, uses_left, revoked_at FROM grants WHERE ($1 IS NULL OR agent = $1) \
             ORDER BY created_at DESC, id DESC LIMIT 1000",
        )
        .bind(agent)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(grant_from_row).collect())
    }

    #[tracing::instrument(skip_all, fields(grant_id = %id))]
    pub(super) async fn grant(&self, id: &str) -> StoreResult<Option<Grant>> {
        let row: Option<GrantRow> =
            sqlx::query_as("SELECT body, uses_left, revoked_at FROM grants WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(grant_from_row))
    }

    #[tracing::instrument(skip_all, fields(grant_id = %id))]
    pub(super) async fn revoke_grant(
        &self,
        id: &str,
        at: DateTime<Utc>,
        audit: NewAuditEvent,
    ) -> StoreResult<bool> {
        let mut transaction = DB::begin_write(self).await?;
        let revoked =
            sqlx::query("UPDATE grants SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .bind(at)
                .execute(&mut *transaction)
                .await?;
        if DB::rows_affected(&revoked) != 1 {
            return Ok(false);
        }
        Self::append_audit_events(&mut transaction, vec![audit]).await?;
        DB::commit(transaction).await?;
        Ok(true)
    }
}

/// `body, uses_left, revoked_at`: the columns a use or a revocation changes win over the body.
type GrantRow = (Json<Grant>, i64, Option<DateTime<Utc>>);

fn grant_from_row((body, uses_left, revoked_at): GrantRow) -> Grant {
    Grant {
        uses_left: u32::try_from(uses_left).unwrap_or(0),
        revoked_at,
        ..body.0
    }
}
