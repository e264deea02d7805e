//! Idempotency-Keys in the `idempotency_keys` table: reservations fenced by a token, the
//! answer kept with the request's insert, release and purge.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{ColumnIndex, Executor, QueryBuilder};

use super::backend::{Backend, Column, Param, SqlStore};
use super::{IdempotencyKey, Reservation, StoreResult};

/// In-flight Idempotency-Key reservations older than this are taken over: their owner died.
const ABANDONED_RESERVATION: chrono::Duration = chrono::Duration::seconds(60);

/// What SQLite's `idempotency_fences` trigger raises when a request's Idempotency-Key no
/// longer holds the attempt's token.
pub(super) const TAKEN_OVER: &str = "idempotency key taken over";

/// `body_hash, response, created_at, token` of a key.
type KeyRow = (String, Option<Json<Value>>, DateTime<Utc>, String);

impl<DB> SqlStore<DB>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    usize: ColumnIndex<DB::Row>,
    String: Column<DB>,
    DateTime<Utc>: Column<DB>,
    Json<Value>: Column<DB>,
    for<'q> &'q str: Param<'q, DB>,
    for<'q> Json<&'q Value>: Param<'q, DB>,
{
    #[tracing::instrument(skip_all, fields(agent = %key.agent))]
    pub(super) async fn reserve_idempotency_key(
        &self,
        key: &IdempotencyKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Reservation> {
        let mut connection = DB::write_connection(self).await?;
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (agent, idempotency_key, body_hash, created_at, token) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (agent, idempotency_key) DO NOTHING",
        )
        .bind(&key.agent)
        .bind(&key.key)
        .bind(&key.body_hash)
        .bind(now)
        .bind(&key.token)
        .execute(&mut *connection)
        .await?;
        if DB::rows_affected(&inserted) == 1 {
            return Ok(Reservation::Reserved);
        }
        let existing: Option<KeyRow> = sqlx::query_as(
            "SELECT body_hash, response, created_at, token FROM idempotency_keys \
             WHERE agent = $1 AND idempotency_key = $2",
        )
        .bind(&key.agent)
        .bind(&key.key)
        .fetch_optional(&mut *connection)
        .await?;
        let Some((body_hash, response, created_at, holder)) = existing else {
            // Released between our insert and select: someone else may take it; so may we.
            drop(connection);
            return Box::pin(self.reserve_idempotency_key(key, now)).await;
        };
        if let Some(response) = response {
            return Ok(Reservation::Completed {
                body_hash,
                response: response.0,
            });
        }
        if created_at + ABANDONED_RESERVATION < now {
            // A new token fences the presumed-dead holder off: should it be merely slow, its
            // insert no longer finds its token and is refused.
            let taken = sqlx::query(
                "UPDATE idempotency_keys SET created_at = $3, body_hash = $4, token = $6 \
                 WHERE agent = $1 AND idempotency_key = $2 AND response IS NULL AND token = $5",
            )
            .bind(&key.agent)
            .bind(&key.key)
            .bind(now)
            .bind(&key.body_hash)
            .bind(&holder)
            .bind(&key.token)
            .execute(&mut *connection)
            .await?;
            if DB::rows_affected(&taken) == 1 {
                return Ok(Reservation::Reserved);
            }
        }
        Ok(Reservation::InFlight)
    }

    #[tracing::instrument(skip_all, fields(agent = %key.agent))]
    pub(super) async fn release_idempotency_key(&self, key: &IdempotencyKey) -> StoreResult<()> {
        let mut connection = DB::write_connection(self).await?;
        // Only this attempt's own reservation: one taken over is no longer ours.
        sqlx::query(
            "DELETE FROM idempotency_keys \
             WHERE agent = $1 AND idempotency_key = $2 AND response IS NULL AND token = $3",
        )
        .bind(&key.agent)
        .bind(&key.key)
        .bind(&key.token)
        .execute(&mut *connection)
        .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    pub(super) async fn purge_idempotency_keys(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let mut connection = DB::write_connection(self).await?;
        let purged = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(before)
            .execute(&mut *connection)
            .await?;
        Ok(DB::rows_affected(&purged))
    }

    /// Keeps the answer for a new request's Idempotency-Key, if the key still holds this
    /// attempt's reservation: it changes no row when a later attempt took the key over (or
    /// it was released meanwhile), and the caller must then refuse the whole write.
    pub(super) fn push_idempotency_answer<'rows>(
        sql: &mut QueryBuilder<'rows, DB>,
        request_id: &'rows str,
        key: &'rows IdempotencyKey,
        response: &'rows Value,
    ) {
        sql.push("UPDATE idempotency_keys SET request_id = ")
            .push_bind(request_id)
            .push(", response = ")
            .push_bind(Json(response))
            .push(" WHERE agent = ")
            .push_bind(&key.agent)
            .push(" AND idempotency_key = ")
            .push_bind(&key.key)
            .push(" AND token = ")
            .push_bind(&key.token)
            .push(" AND response IS NULL");
    }
}
