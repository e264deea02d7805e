//! Standing grants in the `grants` table: created with the approval that asks for them,
//! read and spent by judged intake, listed and revoked.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{ColumnIndex, Executor, QueryBuilder};

use super::backend::{Backend, Column, Param, SqlStore};
use super::requests::{StoredRequest, StoredRequestRef};
use super::{JudgedRequest, StoreError, StoreResult};
use crate::audit::NewAuditEvent;
use crate::domain::{AuditKind, Grant};

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
    /// This agent's active grants for this action at `now`, oldest first.
    pub(super) async fn active_grants(
        connection: &mut DB::Connection,
        agent: &str,
        action: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Grant>> {
        let rows: Vec<(Json<Grant>, i64)> = sqlx::query_as(ACTIVE_GRANTS)
            .bind(agent)
            .bind(action)
            .bind(now)
            .fetch_all(&mut *connection)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(body, uses_left)| Grant {
                uses_left: u32::try_from(uses_left).unwrap_or(0),
                uses_granted: uses_granted(&body.0),
                ..body.0
            })
            .collect())
    }

    /// Spends a group's grant uses, one compare-and-set per grant: either every use is
    /// still there, or the group fails.
    pub(super) async fn spend_grant_uses(
        connection: &mut DB::Connection,
        spends: &[GrantSpend<'_>],
    ) -> StoreResult<()> {
        for spend in spends {
            let mut update = QueryBuilder::new("");
            Self::push_grant_spend(&mut update, spend);
            if DB::execute_built(&mut update, connection).await? != 1 {
                return Err(StoreError::Conflict(format!(
                    "grant {} was used up concurrently",
                    spend.grant_id
                )));
            }
        }
        Ok(())
    }

    /// The compare-and-set of one spend: not revoked, not expired at the latest use, and
    /// `uses_left` not below the floor afterwards.
    fn push_grant_spend<'rows>(sql: &mut QueryBuilder<'rows, DB>, spend: &GrantSpend<'rows>) {
        sql.push("UPDATE grants SET uses_left = uses_left - ")
            .push_bind(spend.uses)
            .push(" WHERE id = ")
            .push_bind(spend.grant_id)
            .push(" AND uses_left - ")
            .push_bind(spend.uses)
            .push(" >= ")
            .push_bind(spend.uses_left_floor)
            .push(" AND revoked_at IS NULL AND expires_at > ")
            .push_bind(spend.latest_use);
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

/// A grant's body is written once, at creation, so its `uses_left` is what was granted
/// (bodies older than `uses_granted` have only that).
fn uses_granted(body: &Grant) -> u32 {
    body.uses_granted.max(body.uses_left)
}

fn grant_from_row((body, uses_left, revoked_at): GrantRow) -> Grant {
    Grant {
        uses_left: u32::try_from(uses_left).unwrap_or(0),
        uses_granted: uses_granted(&body.0),
        revoked_at,
        ..body.0
    }
}

/// What a group spends of one grant.
#[derive(Debug)]
pub(super) struct GrantSpend<'a> {
    pub grant_id: &'a str,
    pub uses: i64,
    /// When the latest of those uses was made: the grant must not have expired by then.
    pub latest_use: DateTime<Utc>,
    /// The highest floor among the uses (see `GrantUse::uses_left_floor`).
    pub uses_left_floor: i64,
}

/// The group's uses of each grant, summed.
pub(super) fn grant_spends(judged: &[JudgedRequest]) -> Vec<GrantSpend<'_>> {
    let mut spends: BTreeMap<&str, GrantSpend<'_>> = BTreeMap::new();
    for judgement in judged {
        if let Some(used) = &judgement.grant_used {
            let created_at = judgement.request.created_at;
            let spend = spends.entry(used.grant_id.as_str()).or_insert(GrantSpend {
                grant_id: used.grant_id.as_str(),
                uses: 0,
                latest_use: created_at,
                uses_left_floor: 0,
            });
            spend.uses += 1;
            spend.latest_use = spend.latest_use.max(created_at);
            spend.uses_left_floor = spend.uses_left_floor.max(i64::from(used.uses_left_floor));
        }
    }
    spends.into_values().collect()
}
