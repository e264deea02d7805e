//! The PostgreSQL backend for several replicas: audit appends serialised by an advisory lock,
//! decisions announced with NOTIFY.

use anyhow::Context as _;
use futures::StreamExt;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use super::shared::implement_store;
use super::StoreResult;
use crate::config::Config;

/// The NOTIFY channel on which a committed decision names its request id.
pub const FINALIZED_CHANNEL: &str = "signoff_finalized";

/// Held from the audit append to the end of the transaction, so audit sequence numbers and
/// hashes are appended one transaction at a time across every replica.
const AUDIT_APPEND_LOCK: i64 = 0x5167_0ff0_a0d1;

#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    const MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

    /// `SKIP LOCKED`: replicas claiming at once take different messages.
    const CLAIM_OUTBOX: &'static str = "UPDATE outbox SET lease_until = $2 WHERE id IN (\
         SELECT id FROM outbox WHERE state = 'pending' AND available_at <= $1 \
         AND (lease_until IS NULL OR lease_until <= $1) ORDER BY available_at, id LIMIT $3 \
         FOR UPDATE SKIP LOCKED) \
         RETURNING id, request_id, kind, destination, payload, attempts, generation, created_at";

    pub async fn connect(config: &Config) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(config.database_max_connections.max(2))
            .connect(config.database_url.expose())
            .await
            .context("cannot connect to PostgreSQL")?;
        Ok(Self { pool })
    }

    /// Decisions committed by any replica or CLI. The listener reconnects by itself; what
    /// it misses meanwhile the watcher's periodic re-check finds.
    async fn notifications(&self) -> StoreResult<Option<super::Notifications>> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(FINALIZED_CHANNEL).await?;
        let stream = listener
            .into_stream()
            .filter_map(|notification| async move {
                notification
                    .ok()
                    .map(|notification| notification.payload().to_string())
            })
            .boxed();
        Ok(Some(stream))
    }

    async fn begin_write(&self) -> StoreResult<Transaction<'static, Postgres>> {
        Ok(self.pool.begin().await?)
    }

    /// Taken just before the audit head is read and held to commit: writers queue only for
    /// the append and the commit, not for their whole transaction.
    async fn serialize_audit_appends(connection: &mut sqlx::PgConnection) -> StoreResult<()> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(AUDIT_APPEND_LOCK)
            .execute(&mut *connection)
            .await?;
        Ok(())
    }

    async fn insert_new_request(&self, new: super::NewRequest<'_>) -> StoreResult<()> {
        let mut transaction = self.begin_write().await?;
        Self::write_new_request(
            &mut transaction,
            new.request,
            new.audit,
            new.outbox,
            new.idempotency,
        )
        .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Delivered to listeners only if the transaction commits.
    async fn notify_finalized(
        transaction: &mut Transaction<'_, Postgres>,
        request_id: &str,
    ) -> StoreResult<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(FINALIZED_CHANNEL)
            .bind(request_id)
            .execute(&mut **transaction)
            .await?;
        Ok(())
    }
}

implement_store!(PostgresStore, sqlx::Postgres);
