//! The outbox, the `outbox` and `chat_messages` tables: messages written with the change
//! that causes them, read as candidates per (destination, agent) queue, claimed under a
//! lease, and finished with what a delivery leaves behind.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{ColumnIndex, Executor, QueryBuilder};

use super::backend::{Backend, Column, Param, SqlStore};
use super::{
    receiver_host, CandidateQuery, DeliveryRecord, NewOutboxMessage, OutboxBacklog,
    OutboxCandidate, OutboxMessage, OutboxOutcome, StoreError, StoreResult,
};
use crate::domain::OutboxKind;

/// The candidate query, `Backend::outbox_candidates_sql`, from a backend's parts. First the
/// (destination, agent) queues of the pending outbox, one index probe each (a loose index
/// scan: neither backend skips through an index by itself), as the CTE
/// `queues(destination, agent)`, leaving out the destinations `skip` names and those whose
/// host `skip_hosts` names (the backend's set expressions over the JSON arrays `$4` and
/// `$5`; a destination's host is read from its first row); then `candidates`, the backend's
/// read of the first due messages of each queue.
pub(super) fn candidates_sql(skip: &str, skip_hosts: &str, candidates: &str) -> String {
    format!(
        "WITH RECURSIVE destinations(name) AS (\
         SELECT MIN(destination) FROM outbox WHERE state = 'pending' \
         UNION ALL SELECT (SELECT MIN(destination) FROM outbox \
         WHERE state = 'pending' AND destination > name) \
         FROM destinations WHERE name IS NOT NULL), \
         queues(destination, agent) AS (\
         SELECT name, (SELECT MIN(agent) FROM outbox WHERE state = 'pending' AND destination = name) \
         FROM destinations WHERE name IS NOT NULL AND name NOT IN ({skip}) \
         AND (SELECT host FROM outbox WHERE state = 'pending' AND destination = name LIMIT 1) \
         NOT IN ({skip_hosts}) UNION ALL SELECT destination, (SELECT MIN(agent) FROM outbox \
         WHERE state = 'pending' AND destination = queues.destination AND agent > queues.agent) \
         FROM queues WHERE agent IS NOT NULL) {candidates}"
    )
}

/// `id, request_id, kind, destination, payload, attempts, generation, created_at`: what
/// reads and claims of messages return.
type OutboxRow = (
    i64,
    String,
    String,
    String,
    Json<Value>,
    i32,
    i32,
    DateTime<Utc>,
);

fn outbox_from_row(row: OutboxRow) -> StoreResult<OutboxMessage> {
    let (id, request_id, kind, destination, payload, attempts, generation, created_at) = row;
    Ok(OutboxMessage {
        id,
        request_id,
        kind: stored_kind(&kind)?,
        destination,
        payload: payload.0,
        attempts,
        generation,
        created_at,
    })
}

/// An outbox row's kind; one this version does not know is unreadable, never guessed.
fn stored_kind(kind: &str) -> StoreResult<OutboxKind> {
    OutboxKind::parse(kind)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown outbox message kind {kind:?}")))
}

/// A set of ids as the JSON array the backends' statements take.
fn json_array<T: Into<Value> + Clone>(items: &[T]) -> String {
    Value::from(items.to_vec()).to_string()
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
    Json<Value>: Column<DB>,
    for<'q> &'q str: Param<'q, DB>,
    for<'q> Json<&'q Value>: Param<'q, DB>,
    for<'q> Json<&'q RawValue>: Param<'q, DB>,
{
    #[tracing::instrument(skip_all)]
    pub(super) async fn pending_outbox(&self, limit: i64) -> StoreResult<Vec<OutboxMessage>> {
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT id, request_id, kind, destination, payload, attempts, generation, created_at \
             FROM outbox WHERE state = 'pending' ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(outbox_from_row).collect()
    }

    /// `Backend::outbox_candidates_sql`.
    #[tracing::instrument(skip_all)]
    pub(super) async fn outbox_candidates(
        &self,
        now: DateTime<Utc>,
        query: &CandidateQuery<'_>,
    ) -> StoreResult<Vec<OutboxCandidate>> {
        let rows: Vec<(i64, String, String, String, DateTime<Utc>)> =
            sqlx::query_as(DB::outbox_candidates_sql())
                .bind(now)
                .bind(query.per_queue)
                .bind(query.limit)
                .bind(json_array(query.skip))
                .bind(json_array(query.skip_hosts))
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(id, kind, destination, agent, available_at)| {
                Ok(OutboxCandidate {
                    id,
                    kind: stored_kind(&kind)?,
                    destination,
                    agent,
                    available_at,
                })
            })
            .collect()
    }

    /// `Backend::CLAIM_OUTBOX`.
    #[tracing::instrument(skip_all, fields(count = ids.len()))]
    pub(super) async fn claim_outbox(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        ids: &[i64],
    ) -> StoreResult<Vec<OutboxMessage>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = DB::write_connection(self).await?;
        let rows: Vec<OutboxRow> = sqlx::query_as(DB::CLAIM_OUTBOX)
            .bind(now)
            .bind(lease_until)
            .bind(json_array(ids))
            .fetch_all(&mut *connection)
            .await?;
        rows.into_iter().map(outbox_from_row).collect()
    }

    /// `Backend::RENEW_OUTBOX_LEASES`.
    #[tracing::instrument(skip_all, fields(count = ids.len()))]
    pub(super) async fn renew_outbox_leases(
        &self,
        ids: &[i64],
        lease_until: DateTime<Utc>,
    ) -> StoreResult<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut connection = DB::write_connection(self).await?;
        let renewed = sqlx::query(DB::RENEW_OUTBOX_LEASES)
            .bind(json_array(ids))
            .bind(lease_until)
            .execute(&mut *connection)
            .await?;
        Ok(DB::rows_affected(&renewed))
    }

    #[tracing::instrument(skip_all, fields(outbox_id = message.id))]
    pub(super) async fn finish_outbox(
        &self,
        message: &OutboxMessage,
        outcome: OutboxOutcome,
    ) -> StoreResult<()> {
        let now = crate::domain::now();
        match outcome {
            OutboxOutcome::Delivered(record) => {
                return self.finish_delivered(message, record).await
            }
            OutboxOutcome::Retry { at, error } => {
                sqlx::query(
                    "UPDATE outbox SET attempts = attempts + 1, available_at = $2, \
                     lease_until = NULL, last_error = $3 WHERE id = $1",
                )
                .bind(message.id)
                .bind(at)
                .bind(error)
                .execute(&mut *DB::write_connection(self).await?)
                .await?;
            }
            OutboxOutcome::Defer { at } => {
                sqlx::query(
                    "UPDATE outbox SET available_at = $2, lease_until = NULL WHERE id = $1",
                )
                .bind(message.id)
                .bind(at)
                .execute(&mut *DB::write_connection(self).await?)
                .await?;
            }
            OutboxOutcome::Abandon { error } => {
                sqlx::query(
                    "UPDATE outbox SET state = 'abandoned', finished_at = $2, lease_until = NULL, \
                     attempts = attempts + 1, last_error = $3 WHERE id = $1",
                )
                .bind(message.id)
                .bind(now)
                .bind(error)
                .execute(&mut *DB::write_connection(self).await?)
                .await?;
            }
        }
        Ok(())
    }

    /// A delivery's finish and what goes with it (`DeliveryRecord`), in one transaction.
    async fn finish_delivered(
        &self,
        message: &OutboxMessage,
        record: DeliveryRecord,
    ) -> StoreResult<()> {
        let now = crate::domain::now();
        let mut transaction = DB::begin_write(self).await?;
        if let Some(reference) = &record.chat_message {
            sqlx::query(
                "INSERT INTO chat_messages (request_id, destination, message, created_at) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (request_id, destination) DO UPDATE SET message = excluded.message",
            )
            .bind(&message.request_id)
            .bind(&message.destination)
            .bind(Json(reference))
            .bind(now)
            .execute(&mut *transaction)
            .await?;
        }
        let finished = sqlx::query(
            "UPDATE outbox SET state = 'delivered', finished_at = $2, lease_until = NULL \
             WHERE id = $1 AND generation = $3",
        )
        .bind(message.id)
        .bind(now)
        .bind(message.generation)
        .execute(&mut *transaction)
        .await?;
        if DB::rows_affected(&finished) == 0 {
            // A newer change arrived meanwhile: run again now, with a clean slate, since this
            // attempt succeeded.
            sqlx::query("UPDATE outbox SET lease_until = NULL, attempts = 0 WHERE id = $1")
                .bind(message.id)
                .execute(&mut *transaction)
                .await?;
        }
        // Last: the audit lock is held from here to the commit.
        Self::append_audit_events(&mut transaction, record.audit.into_iter().collect()).await?;
        DB::commit(transaction).await
    }

    #[tracing::instrument(skip_all)]
    pub(super) async fn outbox_backlog(&self) -> StoreResult<OutboxBacklog> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT kind, COUNT(*) FROM outbox WHERE state = 'pending' GROUP BY kind ORDER BY kind",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(OutboxBacklog { by_kind: rows })
    }

    #[tracing::instrument(skip_all, fields(request_id = %request_id))]
    pub(super) async fn chat_message(
        &self,
        request_id: &str,
        destination: &str,
    ) -> StoreResult<Option<Value>> {
        let row: Option<(Json<Value>,)> = sqlx::query_as(
            "SELECT message FROM chat_messages WHERE request_id = $1 AND destination = $2",
        )
        .bind(request_id)
        .bind(destination)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(message,)| message.0))
    }

    /// Appends `messages` in the caller's write transaction.
    pub(super) async fn append_outbox(
        connection: &mut DB::Connection,
        messages: &[&NewOutboxMessage],
    ) -> StoreResult<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut insert = QueryBuilder::new("");
        Self::push_outbox_rows(&mut insert, messages);
        DB::execute_built(&mut insert, connection).await?;
        Ok(())
    }

    /// One multi-row insert of outbox messages; a pending card message for the same
    /// destination absorbs a new one.
    pub(super) fn push_outbox_rows<'rows>(
        sql: &mut QueryBuilder<'rows, DB>,
        messages: &'rows [&'rows NewOutboxMessage],
    ) {
        sql.push(
            "INSERT INTO outbox (request_id, kind, destination, payload, available_at, \
             created_at, host, agent) ",
        );
        sql.push_values(messages, |mut row, message| {
            row.push_bind(&message.request_id)
                .push_bind(message.kind.as_str())
                .push_bind(&message.destination)
                .push_bind(Json(&message.payload))
                .push_bind(message.available_at)
                .push_bind(message.available_at)
                .push_bind(if message.kind == OutboxKind::Webhook {
                    receiver_host(&message.destination)
                } else {
                    String::new()
                })
                // The request's agent (a primary-key probe; the request is written first in
                // every transaction that writes both), for fair queues.
                .push("COALESCE((SELECT agent FROM requests WHERE id = ")
                .push_bind_unseparated(&message.request_id)
                .push_unseparated("), '')");
        });
        // A pending card message for the same destination absorbs the new change.
        sql.push(
            " ON CONFLICT (request_id, kind, destination) WHERE state = 'pending' AND kind = 'card' \
             DO UPDATE SET generation = outbox.generation + 1",
        );
    }
}
