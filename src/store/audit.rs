//! The store side of the audit trail, the `audit_events` table: appending events chained
//! onto the head (the chain itself, hashing and verifying, is `crate::audit`) and reading
//! them back.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{ColumnIndex, Executor, QueryBuilder};

use super::backend::{Backend, Column, Param, SqlStore};
use super::StoreResult;
use crate::audit::{AuditEvent, ChainLink, NewAuditEvent, PreparedAuditEvent, GENESIS_HASH};

/// The last audit event: the next one's predecessor.
pub(super) const AUDIT_HEAD: &str = "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1";

/// `seq, at, request_id, kind, actor, payload, prev_hash, hash`.
type AuditRow = (
    i64,
    DateTime<Utc>,
    Option<String>,
    String,
    String,
    Json<Value>,
    String,
    String,
);

fn audit_event_from_row(row: AuditRow) -> AuditEvent {
    let (seq, at, request_id, kind, actor, payload, prev_hash, hash) = row;
    AuditEvent {
        seq,
        at,
        request_id,
        kind,
        actor,
        payload: payload.0,
        prev_hash,
        hash,
    }
}

/// Chains `events` onto `head` (or the genesis hash): sequence numbers and hashes.
pub(super) fn seal_events<'events>(
    head: Option<(i64, String)>,
    events: impl IntoIterator<Item = &'events PreparedAuditEvent>,
) -> Vec<(&'events PreparedAuditEvent, ChainLink)> {
    let (mut seq, mut previous) = head.unwrap_or((0, GENESIS_HASH.to_string()));
    events
        .into_iter()
        .map(|event| {
            seq += 1;
            let link = event.link(seq, std::mem::take(&mut previous));
            previous.clone_from(&link.hash);
            (event, link)
        })
        .collect()
}

impl<DB> SqlStore<DB>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    usize: ColumnIndex<DB::Row>,
    i64: Column<DB>,
    String: Column<DB>,
    Option<String>: Column<DB>,
    DateTime<Utc>: Column<DB>,
    Json<Value>: Column<DB>,
    for<'q> &'q str: Param<'q, DB>,
    for<'q> Json<&'q RawValue>: Param<'q, DB>,
{
    #[tracing::instrument(skip_all, fields(after = after))]
    pub(super) async fn audit_events(
        &self,
        after: i64,
        limit: i64,
    ) -> StoreResult<Vec<AuditEvent>> {
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT seq, at, request_id, kind, actor, payload, prev_hash, hash \
             FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(audit_event_from_row).collect())
    }

    #[tracing::instrument(skip_all)]
    pub(super) async fn latest_audit_seq(&self) -> StoreResult<i64> {
        let (seq,): (Option<i64>,) = sqlx::query_as("SELECT MAX(seq) FROM audit_events")
            .fetch_one(&self.pool)
            .await?;
        Ok(seq.unwrap_or(0))
    }

    #[tracing::instrument(skip_all)]
    pub(super) async fn audit_head(&self) -> StoreResult<Option<(i64, String)>> {
        Ok(sqlx::query_as(AUDIT_HEAD)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Events that go with no other change, in a transaction of their own.
    #[tracing::instrument(skip_all, fields(count = events.len()))]
    pub(super) async fn append_audit(&self, events: Vec<NewAuditEvent>) -> StoreResult<()> {
        let mut transaction = DB::begin_write(self).await?;
        Self::append_audit_events(&mut transaction, events).await?;
        DB::commit(transaction).await
    }

    /// Appends `events` in the caller's write transaction.
    pub(super) async fn append_audit_events(
        connection: &mut DB::Connection,
        events: Vec<NewAuditEvent>,
    ) -> StoreResult<()> {
        let prepared: Vec<_> = events.into_iter().map(NewAuditEvent::prepare).collect();
        let prepared: Vec<_> = prepared.iter().collect();
        Self::append_prepared_audit_events(connection, &prepared).await
    }

    /// Takes the backend's audit lock, reads the head and chains `events` onto it, all in
    /// the caller's write transaction.
    pub(super) async fn append_prepared_audit_events(
        connection: &mut DB::Connection,
        events: &[&PreparedAuditEvent],
    ) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        DB::serialize_audit_appends(&mut *connection).await?;
        let head: Option<(i64, String)> = sqlx::query_as(AUDIT_HEAD)
            .fetch_optional(&mut *connection)
            .await?;
        let sealed = seal_events(head, events.iter().copied());
        // One statement for all of them: one round trip however many there are.
        let mut insert = QueryBuilder::new("");
        Self::push_audit_rows(&mut insert, &sealed);
        DB::execute_built(&mut insert, connection).await?;
        Ok(())
    }

    /// One multi-row insert of sealed events.
    pub(super) fn push_audit_rows<'rows>(
        sql: &mut QueryBuilder<'rows, DB>,
        sealed: &'rows [(&'rows PreparedAuditEvent, ChainLink)],
    ) {
        sql.push(
            "INSERT INTO audit_events (seq, at, request_id, kind, actor, payload, prev_hash, hash) ",
        );
        sql.push_values(sealed, |mut row, (prepared, link)| {
            let event = &prepared.event;
            row.push_bind(link.seq)
                .push_bind(event.at)
                .push_bind(&event.request_id)
                .push_bind(event.kind.as_str())
                .push_bind(&event.actor)
                .push_bind(Json(&*prepared.payload_json))
                .push_bind(&link.prev_hash)
                .push_bind(&link.hash);
        });
    }
}
