//! Conversation endpoints, the `conversation_endpoints` table: where a chat platform said a
//! conversation is reached (its service URL) and its tenant, kept for later posts.

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Executor};

use super::backend::{Backend, Column, Param, SqlStore};
use super::{ConversationEndpoint, StoreResult};

impl<DB> SqlStore<DB>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    usize: ColumnIndex<DB::Row>,
    String: Column<DB>,
    Option<String>: Column<DB>,
    DateTime<Utc>: Column<DB>,
    for<'q> &'q str: Param<'q, DB>,
    for<'q> Option<&'q str>: Param<'q, DB>,
{
    /// Records (or replaces) where `endpoint.destination` is reached; a row that already
    /// says the same is left untouched, so repeating it writes nothing.
    #[tracing::instrument(skip_all)]
    pub(super) async fn record_conversation_endpoint(
        &self,
        endpoint: &ConversationEndpoint,
    ) -> StoreResult<()> {
        let mut connection = DB::write_connection(self).await?;
        sqlx::query(
            "INSERT INTO conversation_endpoints (destination, service_url, tenant, updated_at) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (destination) DO UPDATE SET service_url = excluded.service_url, \
             tenant = excluded.tenant, updated_at = excluded.updated_at \
             WHERE conversation_endpoints.service_url <> excluded.service_url \
             OR COALESCE(conversation_endpoints.tenant, '') <> COALESCE(excluded.tenant, '')",
        )
        .bind(endpoint.destination.as_str())
        .bind(endpoint.service_url.as_str())
        .bind(endpoint.tenant.as_deref())
        .bind(crate::domain::now())
        .execute(&mut *connection)
        .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    pub(super) async fn conversation_endpoint(
        &self,
        destination: &str,
    ) -> StoreResult<Option<ConversationEndpoint>> {
        let row: Option<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT destination, service_url, tenant FROM conversation_endpoints \
             WHERE destination = $1",
        )
        .bind(destination)
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map(|(destination, service_url, tenant)| ConversationEndpoint {
                destination,
                service_url,
                tenant,
            }),
        )
    }
}
