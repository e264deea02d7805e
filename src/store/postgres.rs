//! The PostgreSQL backend for several replicas: audit appends serialised by an advisory lock,
//! decisions announced with NOTIFY, new requests committed in groups.

use std::sync::LazyLock;

use anyhow::Context as _;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgListener, PgPoolOptions, PgQueryResult};
use sqlx::{PgConnection, Postgres, QueryBuilder, Transaction};

use super::backend::{Backend, SqlStore};
use super::counters::CounterChanges;
use super::group_commit::QueuedRequest;
use super::outbox::candidates_sql;
use super::requests::refused_request_insert;
use super::{NewOutboxMessage, Notifications, StoreError, StoreResult};
use crate::config::Config;

/// The store on PostgreSQL. New requests are committed in groups: the audit lock is held to
/// commit, so one transaction per request would flush the WAL once per request, one after
/// another.
pub type PostgresStore = SqlStore<Postgres>;

/// The NOTIFY channel on which a committed decision names its request id.
pub const FINALIZED_CHANNEL: &str = "signoff_finalized";

/// Held from the audit append to the end of the transaction, so audit sequence numbers and
/// hashes are appended one transaction at a time across every replica.
const AUDIT_APPEND_LOCK: i64 = 0x5167_0ff0_a0d1;

impl PostgresStore {
    pub async fn connect(config: &Config) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(config.database_max_connections.max(2))
            // No ping per checkout: it doubles the round trips of every query. A connection
            // broken by a database restart fails one statement and is then replaced.
            .test_before_acquire(false)
            .connect(config.database_url.expose())
            .await
            .context("cannot connect to PostgreSQL")?;
        let store = Self {
            pool,
            writer: (),
            group_commit: None,
            judged_commit: None,
        };
        Ok(store.with_group_commit().with_judged_commit())
    }
}

impl Backend for Postgres {
    /// The pool is all: PostgreSQL serialises writers itself.
    type Writer = ();
    type Transaction = Transaction<'static, Postgres>;
    type WriteConnection = PoolConnection<Postgres>;

    const MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");
    const BATCHES_STATEMENTS: bool = false;
    /// Two groups in flight: one inserts its rows while the other holds the audit lock to
    /// append and commit.
    const GROUP_WRITERS: usize = 2;

    const DECIDED_AMONG: &'static str = "SELECT id FROM requests \
         WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb)) AND status <> 'pending'";

    /// `SKIP LOCKED`: replicas claiming at once take different messages.
    const CLAIM_OUTBOX: &'static str = "UPDATE outbox SET lease_until = $2 \
         WHERE id IN (SELECT id FROM outbox \
         WHERE id IN (SELECT jsonb_array_elements_text($3::jsonb)::bigint) \
         AND state = 'pending' AND available_at <= $1 \
         AND (lease_until IS NULL OR lease_until <= $1) FOR UPDATE SKIP LOCKED) \
         RETURNING id, request_id, kind, destination, payload, attempts, generation, created_at";

    const RENEW_OUTBOX_LEASES: &'static str = "UPDATE outbox SET lease_until = $2 \
         WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb)::bigint) \
         AND state = 'pending' AND lease_until IS NOT NULL";

    /// Each queue's messages by a `LATERAL` subquery, an index range each.
    fn outbox_candidates_sql() -> &'static str {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            candidates_sql(
                "SELECT jsonb_array_elements_text($4::jsonb)",
                "SELECT jsonb_array_elements_text($5::jsonb)",
                "SELECT candidate.* FROM queues CROSS JOIN LATERAL (\
                 SELECT id, kind, destination, agent, available_at FROM outbox \
                 WHERE state = 'pending' AND destination = queues.destination AND agent = queues.agent \
                 AND available_at <= $1 AND (lease_until IS NULL OR lease_until <= $1) \
                 ORDER BY available_at, id LIMIT $2) candidate \
                 WHERE queues.agent IS NOT NULL ORDER BY candidate.available_at, candidate.id LIMIT $3",
            )
        });
        &SQL
    }

    async fn begin_write(store: &PostgresStore) -> StoreResult<Transaction<'static, Postgres>> {
        Ok(store.pool.begin().await?)
    }

    async fn commit(transaction: Transaction<'static, Postgres>) -> StoreResult<()> {
        transaction.commit().await?;
        Ok(())
    }

    /// PostgreSQL runs concurrent single statements itself.
    async fn write_connection(store: &PostgresStore) -> StoreResult<PoolConnection<Postgres>> {
        Ok(store.pool.acquire().await?)
    }

    /// One transaction per group: the rows first, then the audit lock, the audit append and
    /// the commit, so the lock that orders every replica's appends is held briefly.
    async fn write_group(store: &PostgresStore, group: &[QueuedRequest]) -> StoreResult<()> {
        let mut transaction = Self::begin_write(store).await?;
        let mut requests = QueryBuilder::new("");
        PostgresStore::push_request_rows(&mut requests, group);
        requests
            .build()
            .execute(&mut *transaction)
            .await
            .map_err(refused_request_insert)?;
        let outbox: Vec<&NewOutboxMessage> =
            group.iter().flat_map(|queued| &queued.outbox).collect();
        PostgresStore::append_outbox(&mut transaction, &outbox).await?;
        for queued in group {
            if let Some((key, response)) = &queued.idempotency {
                let mut answer = QueryBuilder::new("");
                PostgresStore::push_idempotency_answer(
                    &mut answer,
                    &queued.request.id,
                    key,
                    response,
                );
                // The key row stays locked to the commit: no takeover can slip in after.
                let answered = answer
                    .build()
                    .execute(&mut *transaction)
                    .await?
                    .rows_affected();
                if answered == 0 {
                    // Rolled back with the transaction; the group is then written again
                    // one by one, and only this request fails.
                    return Err(StoreError::IdempotencyKeyTakenOver);
                }
            }
        }
        let audit: Vec<_> = group.iter().flat_map(|queued| &queued.audit).collect();
        PostgresStore::append_prepared_audit_events(&mut transaction, &audit).await?;
        // Under the audit lock, as every change of the buckets is: they cannot deadlock.
        let counters = CounterChanges::of_new(group.iter().map(|queued| &queued.request));
        PostgresStore::adjust_counters(&mut transaction, &counters).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// Taken just before the audit head is read and held to commit: writers queue only for
    /// the append and the commit, not for their whole transaction.
    async fn serialize_audit_appends(connection: &mut PgConnection) -> StoreResult<()> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(AUDIT_APPEND_LOCK)
            .execute(&mut *connection)
            .await?;
        Ok(())
    }

    /// Delivered to listeners only if the transaction commits.
    const COUNTED_BETWEEN: &'static str = "SELECT created_at, CASE WHEN $5 = '' THEN 1.0::float8 \
         WHEN jsonb_typeof(body->'args'->$5) = 'number' THEN (body->'args'->>$5)::float8 \
         ELSE 0.0::float8 END AS value FROM requests \
         WHERE agent = $1 AND action = $2 AND created_at > $3 AND created_at < $4 \
         AND status IN ('pending', 'approved')";

    /// A transaction-scoped advisory lock on a hash of (agent, action): replicas' intakes
    /// of the same agent and action take turns, others do not wait.
    async fn serialize_intake(
        connection: &mut PgConnection,
        agent: &str,
        action: &str,
    ) -> StoreResult<()> {
        let digest = Sha256::new()
            .chain_update(agent.as_bytes())
            .chain_update([0])
            .chain_update(action.as_bytes())
            .finalize();
        let mut key = [0u8; 8];
        key.copy_from_slice(&digest[..8]);
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(i64::from_be_bytes(key))
            .execute(connection)
            .await?;
        Ok(())
    }

    async fn notify_finalized(connection: &mut PgConnection, request_id: &str) -> StoreResult<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(FINALIZED_CHANNEL)
            .bind(request_id)
            .execute(&mut *connection)
            .await?;
        Ok(())
    }

    /// Decisions committed by any replica or CLI. The listener reconnects by itself; what
    /// it misses meanwhile the watcher's periodic re-check finds.
    async fn finalized_notifications(store: &PostgresStore) -> StoreResult<Option<Notifications>> {
        let mut listener = PgListener::connect_with(&store.pool).await?;
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

    async fn execute_built(
        builder: &mut QueryBuilder<'_, Postgres>,
        connection: &mut PgConnection,
    ) -> Result<u64, sqlx::Error> {
        Ok(builder.build().execute(connection).await?.rows_affected())
    }

    fn rows_affected(result: &PgQueryResult) -> u64 {
        result.rows_affected()
    }
}
