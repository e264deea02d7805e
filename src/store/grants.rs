//! Standing grants in the `grants` table, and the judged intake: counters and a grant's use
//! read and written in the transaction that inserts the request.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{ColumnIndex, Executor, QueryBuilder};
use tokio::sync::{mpsc, oneshot};

use super::backend::{Backend, Column, Param, SqlStore};
use super::group_commit::QueuedRequest;
use super::requests::{refused_request_insert, StoredRequest, StoredRequestRef};
use super::{IntakeFacts, IntakeLookup, Judge, JudgedRequest, NewRequest, StoreError, StoreResult};
use crate::audit::NewAuditEvent;
use crate::domain::{ApprovalRequest, AuditKind, Grant, Status};

/// At most this many judged intakes share one commit.
const JUDGED_GROUP_LIMIT: usize = 256;

/// A judged intake waiting for the writer task, and where to send its outcome.
pub(super) struct QueuedJudgement {
    lookup: IntakeLookup,
    judge: Judge,
    answer: oneshot::Sender<StoreResult<ApprovalRequest>>,
}

/// The submitting side of the judged-intake writer task.
#[derive(Clone, Debug)]
pub(super) struct JudgedCommit {
    queue: mpsc::UnboundedSender<QueuedJudgement>,
}

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
    /// Starts the judged-intake writer task, on a copy of this store without it.
    pub(super) fn with_judged_commit(self) -> Self {
        let (queue, mut arrivals) = mpsc::unbounded_channel::<QueuedJudgement>();
        let store = self.clone();
        // Apart from the callers, so a client that goes away never leaves a group half
        // written; ends when the last sender (store clone) is dropped.
        tokio::spawn(async move {
            while let Some(first) = arrivals.recv().await {
                let mut group = vec![first];
                while group.len() < JUDGED_GROUP_LIMIT {
                    match arrivals.try_recv() {
                        Ok(next) => group.push(next),
                        Err(_) => break,
                    }
                }
                store.commit_judgements(group).await;
            }
        });
        Self {
            judged_commit: Some(JudgedCommit { queue }),
            ..self
        }
    }

    /// See `Store::insert_judged_request`: queued for the next judged group commit.
    #[tracing::instrument(skip_all, fields(agent = %lookup.agent, action = %lookup.action))]
    pub(super) async fn insert_judged_request(
        &self,
        lookup: IntakeLookup,
        judge: Judge,
    ) -> StoreResult<ApprovalRequest> {
        let (answer, outcome) = oneshot::channel();
        let queued = QueuedJudgement {
            lookup,
            judge,
            answer,
        };
        match &self.judged_commit {
            Some(commit) => commit
                .queue
                .send(queued)
                .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))?,
            None => self.commit_judgements(vec![queued]).await,
        }
        outcome
            .await
            .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))?
    }

    /// Judges and writes a group in one transaction; if it fails, each is tried alone, so
    /// one bad request never takes the others with it.
    async fn commit_judgements(&self, group: Vec<QueuedJudgement>) {
        let written = self.write_judgements(&group).await;
        match written {
            Ok(answers) => {
                for (queued, answer) in group.into_iter().zip(answers) {
                    let _ = queued.answer.send(answer);
                }
            }
            Err(error) if group.len() == 1 => {
                if let Some(queued) = group.into_iter().next() {
                    let _ = queued.answer.send(Err(error));
                }
            }
            Err(_) => {
                for queued in group {
                    let answer = match self.write_judgements(std::slice::from_ref(&queued)).await {
                        Ok(mut answers) => answers
                            .pop()
                            .unwrap_or(Err(StoreError::Conflict("nothing judged".into()))),
                        Err(error) => Err(error),
                    };
                    let _ = queued.answer.send(answer);
                }
            }
        }
    }

    /// One transaction: the (agent, action) pairs serialised (in a fixed order, so two
    /// replicas' groups cannot deadlock), then each request judged in arrival order on the
    /// database's counters and grants plus what earlier requests of the group add, then
    /// every row written. The answers are per request (a judge may refuse its own).
    async fn write_judgements(
        &self,
        group: &[QueuedJudgement],
    ) -> StoreResult<Vec<StoreResult<ApprovalRequest>>> {
        let mut transaction = DB::begin_write(self).await?;
        let mut pairs: Vec<(&str, &str)> = group
            .iter()
            .map(|queued| (queued.lookup.agent.as_str(), queued.lookup.action.as_str()))
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        for (agent, action) in pairs {
            DB::serialize_intake(&mut transaction, agent, action).await?;
        }
        let mut judged: Vec<JudgedRequest> = Vec::new();
        let mut answers: Vec<Option<StoreError>> = Vec::new();
        for queued in group {
            let facts = Self::intake_facts(&mut transaction, &queued.lookup, &judged).await?;
            match (queued.judge)(facts) {
                Ok(judgement) => {
                    judged.push(judgement);
                    answers.push(None);
                }
                Err(error) => answers.push(Some(error)),
            }
        }
        for judgement in &judged {
            if let Some(grant_id) = &judgement.grant_used {
                // The compare-and-set that makes each use count once.
                let spent = sqlx::query(
                    "UPDATE grants SET uses_left = uses_left - 1 \
                     WHERE id = $1 AND uses_left > 0 AND revoked_at IS NULL AND expires_at > $2",
                )
                .bind(grant_id.as_str())
                .bind(judgement.request.created_at)
                .execute(&mut *transaction)
                .await?;
                if DB::rows_affected(&spent) != 1 {
                    return Err(StoreError::Conflict(format!(
                        "grant {grant_id} was used up concurrently"
                    )));
                }
            }
        }
        if !judged.is_empty() {
            let rows: Vec<QueuedRequest> = judged
                .iter()
                .map(|judgement| {
                    QueuedRequest::new(NewRequest {
                        request: &judgement.request,
                        audit: Vec::new(),
                        outbox: Vec::new(),
                        idempotency: None,
                    })
                    .map(|(queued, _outcome)| queued)
                })
                .collect::<StoreResult<_>>()?;
            let mut insert = QueryBuilder::new("");
            Self::push_request_rows(&mut insert, &rows);
            DB::execute_built(&mut insert, &mut transaction)
                .await
                .map_err(refused_request_insert)?;
        }
        let outbox: Vec<_> = judged
            .iter()
            .flat_map(|judgement| &judgement.outbox)
            .collect();
        Self::append_outbox(&mut transaction, &outbox).await?;
        for judgement in &judged {
            if let Some((key, response)) = &judgement.idempotency {
                let mut answer = QueryBuilder::new("");
                Self::push_idempotency_answer(&mut answer, &judgement.request.id, key, response);
                if DB::execute_built(&mut answer, &mut transaction).await? == 0 {
                    return Err(StoreError::IdempotencyKeyTakenOver);
                }
            }
        }
        let mut audit = Vec::new();
        let mut finalized = Vec::new();
        let mut requests = Vec::new();
        for judgement in judged {
            if judgement.audit.iter().any(|event| event.kind.is_final()) {
                finalized.push(judgement.request.id.clone());
            }
            audit.extend(judgement.audit);
            requests.push(judgement.request);
        }
        Self::append_audit_events(&mut transaction, audit).await?;
        for id in &finalized {
            DB::notify_finalized(&mut transaction, id).await?;
        }
        DB::commit(transaction).await?;
        let mut requests = requests.into_iter();
        Ok(answers
            .into_iter()
            .map(|refused| match refused {
                Some(error) => Err(error),
                None => requests
                    .next()
                    .ok_or_else(|| StoreError::Conflict("nothing judged".into())),
            })
            .collect())
    }

    /// The lookup's counters and active grants as the database has them, plus what the
    /// requests judged earlier in the same group add (they are not written yet).
    async fn intake_facts(
        connection: &mut DB::Connection,
        lookup: &IntakeLookup,
        earlier: &[JudgedRequest],
    ) -> StoreResult<IntakeFacts> {
        let mut facts = IntakeFacts::default();
        let same_pair = || {
            earlier
                .iter()
                .map(|judgement| &judgement.request)
                .filter(|request| {
                    request.agent == lookup.agent
                        && request.action == lookup.action
                        && matches!(request.status, Status::Pending | Status::Approved)
                })
        };
        for (field, since) in &lookup.counters {
            let stored: f64 = match field {
                None => {
                    let (count,): (i64,) = sqlx::query_as(RECENT_COUNT)
                        .bind(lookup.agent.as_str())
                        .bind(lookup.action.as_str())
                        .bind(*since)
                        .fetch_one(&mut *connection)
                        .await?;
                    count as f64
                }
                Some(field) => {
                    let (sum,): (f64,) = sqlx::query_as(DB::RECENT_SUM)
                        .bind(lookup.agent.as_str())
                        .bind(lookup.action.as_str())
                        .bind(*since)
                        .bind(field.as_str())
                        .fetch_one(&mut *connection)
                        .await?;
                    sum
                }
            };
            let added: f64 = same_pair()
                .filter(|request| request.created_at > *since)
                .map(|request| match field {
                    None => 1.0,
                    Some(field) => request
                        .args
                        .get(field)
                        .and_then(Value::as_f64)
                        .unwrap_or(0.0),
                })
                .sum();
            facts.counters.push(stored + added);
        }
        if lookup.grants {
            let rows: Vec<(Json<Grant>, i64)> = sqlx::query_as(ACTIVE_GRANTS)
                .bind(lookup.agent.as_str())
                .bind(lookup.action.as_str())
                .bind(lookup.now)
                .fetch_all(&mut *connection)
                .await?;
            facts.grants = rows
                .into_iter()
                .filter_map(|(body, uses_left)| {
                    let spent = earlier
                        .iter()
                        .filter(|judgement| {
                            judgement.grant_used.as_deref() == Some(body.0.id.as_str())
                        })
                        .count();
                    let left = usize::try_from(uses_left)
                        .unwrap_or(0)
                        .saturating_sub(spent);
                    (left > 0).then(|| Grant {
                        uses_left: u32::try_from(left).unwrap_or(u32::MAX),
                        ..body.0
                    })
                })
                .collect();
        }
        Ok(facts)
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
