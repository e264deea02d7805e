//! Agents in the `agents` table: registration and revocation (each with its audit event),
//! lookup by name or by the hash of the API key.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{ColumnIndex, Executor};

use super::backend::{conflict_on_unique, Backend, Column, Param, SqlStore};
use super::{AgentRecord, StoreResult};
use crate::audit::NewAuditEvent;
use crate::domain::Principal;

/// `name, api_key_hash, webhook_secret, owners, created_at, revoked_at`.
type AgentRow = (
    String,
    String,
    String,
    Json<Vec<Principal>>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

fn agent_from_row(row: AgentRow) -> AgentRecord {
    let (name, api_key_hash, webhook_secret, owners, created_at, revoked_at) = row;
    AgentRecord {
        name,
        api_key_hash,
        webhook_secret,
        owners: owners.0,
        created_at,
        revoked_at,
    }
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
    Json<Vec<Principal>>: Column<DB>,
    for<'q> &'q str: Param<'q, DB>,
    for<'q> Json<&'q RawValue>: Param<'q, DB>,
    for<'q> Json<&'q Vec<Principal>>: Param<'q, DB>,
{
    #[tracing::instrument(skip_all, fields(agent = %agent.name))]
    pub(super) async fn create_agent(
        &self,
        agent: &AgentRecord,
        audit: NewAuditEvent,
    ) -> StoreResult<()> {
        let mut transaction = DB::begin_write(self).await?;
        sqlx::query(
            "INSERT INTO agents (name, api_key_hash, webhook_secret, owners, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&agent.name)
        .bind(&agent.api_key_hash)
        .bind(&agent.webhook_secret)
        .bind(Json(&agent.owners))
        .bind(agent.created_at)
        .execute(&mut *transaction)
        .await
        .map_err(|error| {
            conflict_on_unique(
                error,
                &format!("an agent named {:?} already exists", agent.name),
            )
        })?;
        Self::append_audit_events(&mut transaction, vec![audit]).await?;
        DB::commit(transaction).await
    }

    /// An active agent by the SHA-256 of its API key.
    #[tracing::instrument(skip_all)]
    pub(super) async fn agent_by_key_hash(
        &self,
        api_key_hash: &str,
    ) -> StoreResult<Option<AgentRecord>> {
        let row: Option<AgentRow> = sqlx::query_as(
            "SELECT name, api_key_hash, webhook_secret, owners, created_at, revoked_at \
             FROM agents WHERE api_key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(api_key_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(agent_from_row))
    }

    #[tracing::instrument(skip_all, fields(agent = %name))]
    pub(super) async fn agent(&self, name: &str) -> StoreResult<Option<AgentRecord>> {
        let row: Option<AgentRow> = sqlx::query_as(
            "SELECT name, api_key_hash, webhook_secret, owners, created_at, revoked_at \
             FROM agents WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(agent_from_row))
    }

    #[tracing::instrument(skip_all)]
    pub(super) async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        let rows: Vec<AgentRow> = sqlx::query_as(
            "SELECT name, api_key_hash, webhook_secret, owners, created_at, revoked_at \
             FROM agents ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(agent_from_row).collect())
    }

    /// Returns false when no active agent has that name (and then appends nothing).
    #[tracing::instrument(skip_all, fields(agent = %name))]
    pub(super) async fn revoke_agent(&self, name: &str, audit: NewAuditEvent) -> StoreResult<bool> {
        let mut transaction = DB::begin_write(self).await?;
        let revoked =
            sqlx::query("UPDATE agents SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL")
                .bind(name)
                .bind(audit.at)
                .execute(&mut *transaction)
                .await?;
        let revoked = DB::rows_affected(&revoked) == 1;
        if revoked {
            Self::append_audit_events(&mut transaction, vec![audit]).await?;
            DB::commit(transaction).await?;
        }
        Ok(revoked)
    }
}
