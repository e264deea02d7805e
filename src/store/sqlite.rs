//! The embedded SQLite backend: WAL, busy timeout, foreign keys, one writer connection
//! taken in turn by every write of this process, and group commit for new requests.

use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::Context as _;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult,
    SqliteSynchronous,
};
use sqlx::{Connection as _, QueryBuilder, Sqlite, SqliteConnection};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::audit::seal_events;
use super::backend::{Backend, SqlStore};
use super::counters::CounterChanges;
use super::group_commit::QueuedRequest;
use super::outbox::candidates_sql;
use super::requests::refused_request_insert;
use super::{NewOutboxMessage, Notifications, StoreResult};
use crate::config::Config;

/// The store on SQLite: its pool serves readers (WAL lets them run beside the writer), and
/// every write of this process goes through one writer connection.
pub type SqliteStore = SqlStore<Sqlite>;

/// Opens a write transaction and reads the audit head (`audit::AUDIT_HEAD`) in one round
/// trip.
const BEGIN_WITH_AUDIT_HEAD: &str =
    "BEGIN IMMEDIATE; SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1";

/// The one connection this process writes through. Writes queue for it in order (a fair
/// async mutex), so they never meet SQLite's busy handler, which sleeps and polls; its
/// statements stay prepared, and no pool checkout sits on the commit path.
#[derive(Debug)]
pub struct Writer {
    connection: SqliteConnection,
    /// A write that began a transaction and never finished it (its caller went away):
    /// the next one rolls it back first.
    in_transaction: bool,
    /// The audit head as this writer's last group commit left it, so the next group need
    /// not read it first. Another process (the CLI) may have appended since: then the
    /// group's first audit row takes a `seq` that exists, the primary key refuses it, and
    /// the group is written again the slow way. Other transactions of this process forget
    /// it, since they may append.
    audit_head: Option<(i64, String)>,
}

/// The writer, held: `Deref`s to its connection. From `begin_write` it is inside
/// `BEGIN IMMEDIATE` until `commit`; from `write_connection` each statement commits alone.
///
/// Dropped inside a transaction (an error returned early, a conflict, a caller that went
/// away), it rolls back at once in a task of its own: SQLite's write lock must not stay
/// taken until this process's next write, while the CLI and other processes wait on it.
#[derive(Debug)]
pub struct HeldWriter(OwnedMutexGuard<Writer>, Arc<Mutex<Writer>>);

impl Drop for HeldWriter {
    fn drop(&mut self) {
        if !self.0.in_transaction {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let writer = self.1.clone();
        // Runs once this guard is gone; a writer that gets the lock first rolls back itself.
        runtime.spawn(async move {
            let mut writer = writer.lock().await;
            if writer.in_transaction {
                let _ = sqlx::query("ROLLBACK")
                    .execute(&mut writer.connection)
                    .await;
                writer.in_transaction = false;
            }
        });
    }
}

impl Deref for HeldWriter {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.0.connection
    }
}

impl DerefMut for HeldWriter {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.0.connection
    }
}

impl SqliteStore {
    pub async fn connect(config: &Config) -> anyhow::Result<Self> {
        let synchronous = match config.sqlite_synchronous.as_str() {
            "normal" => SqliteSynchronous::Normal,
            _ => SqliteSynchronous::Full,
        };
        let options = SqliteConnectOptions::from_str(config.database_url.expose())
            .context("database_url is not a valid sqlite: URL")?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(config.database_max_connections.max(2))
            // A local file does not drop connections; a ping per checkout only adds latency.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .context("cannot open the SQLite database")?;
        let connection = SqliteConnection::connect_with(&options)
            .await
            .context("cannot open the SQLite database for writing")?;
        let store = Self {
            pool,
            writer: Arc::new(Mutex::new(Writer {
                connection,
                in_transaction: false,
                audit_head: None,
            })),
            group_commit: None,
            judged_commit: None,
        };
        Ok(store.with_group_commit().with_judged_commit())
    }

    /// Every row of `group` chained onto `head`, and the `COMMIT`, as one batch after
    /// `prefix`. Keeps the new audit head on success.
    async fn write_group_batch(
        writer: &mut HeldWriter,
        group: &[QueuedRequest],
        head: Option<(i64, String)>,
        prefix: &str,
    ) -> StoreResult<()> {
        let sealed = seal_events(head, group.iter().flat_map(|queued| &queued.audit));
        let outbox: Vec<&NewOutboxMessage> =
            group.iter().flat_map(|queued| &queued.outbox).collect();
        let counters = CounterChanges::of_new(group.iter().map(|queued| &queued.request));
        let mut statements = QueryBuilder::new(prefix);
        Self::push_request_rows(&mut statements, group);
        if !sealed.is_empty() {
            statements.push("; ");
            Self::push_audit_rows(&mut statements, &sealed);
        }
        if !outbox.is_empty() {
            statements.push("; ");
            Self::push_outbox_rows(&mut statements, &outbox);
        }
        Self::push_counter_changes(&mut statements, &counters);
        for queued in group {
            if let Some((key, response)) = &queued.idempotency {
                statements.push("; ");
                Self::push_idempotency_answer(&mut statements, &queued.request.id, key, response);
                // One batch cannot look at the update's row count: the fence's trigger
                // raises `TAKEN_OVER` unless the answer landed, failing the whole batch.
                statements
                    .push("; INSERT INTO idempotency_fences (agent, idempotency_key, request_id) VALUES (")
                    .push_bind(&key.agent)
                    .push(", ")
                    .push_bind(&key.key)
                    .push(", ")
                    .push_bind(&queued.request.id)
                    .push(")");
            }
        }
        statements.push("; COMMIT");
        writer.0.in_transaction = true;
        statements
            .build()
            // Groups of one are the common shape when load is light: keep it prepared.
            .persistent(group.len() == 1)
            .execute(&mut **writer)
            .await
            .map_err(refused_request_insert)?;
        writer.0.in_transaction = false;
        writer.0.audit_head = sealed.last().map(|(_, link)| (link.seq, link.hash.clone()));
        Ok(())
    }
}

impl Backend for Sqlite {
    type Writer = Arc<Mutex<Writer>>;
    type Transaction = HeldWriter;
    type WriteConnection = HeldWriter;

    const MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");
    const BATCHES_STATEMENTS: bool = true;
    /// One connection writes, so one task commits groups.
    const GROUP_WRITERS: usize = 1;

    const DECIDED_AMONG: &'static str = "SELECT id FROM requests \
         WHERE id IN (SELECT value FROM json_each($1)) AND status <> 'pending'";

    /// One statement under SQLite's single writer lock.
    const CLAIM_OUTBOX: &'static str = "UPDATE outbox SET lease_until = $2 \
         WHERE id IN (SELECT value FROM json_each($3)) \
         AND state = 'pending' AND available_at <= $1 \
         AND (lease_until IS NULL OR lease_until <= $1) \
         RETURNING id, request_id, kind, destination, payload, attempts, generation, created_at";

    const RENEW_OUTBOX_LEASES: &'static str = "UPDATE outbox SET lease_until = $2 \
         WHERE id IN (SELECT value FROM json_each($1)) AND state = 'pending' AND lease_until IS NOT NULL";

    /// Each queue's messages by a correlated `IN (... LIMIT $2)`, an index range each.
    fn outbox_candidates_sql() -> &'static str {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            candidates_sql(
                "SELECT value FROM json_each($4)",
                "SELECT value FROM json_each($5)",
                "SELECT outbox.id, outbox.kind, outbox.destination, outbox.agent, outbox.available_at \
                 FROM queues JOIN outbox ON outbox.id IN (\
                 SELECT id FROM outbox WHERE state = 'pending' AND destination = queues.destination \
                 AND agent = queues.agent AND available_at <= $1 \
                 AND (lease_until IS NULL OR lease_until <= $1) ORDER BY available_at, id LIMIT $2) \
                 WHERE queues.agent IS NOT NULL ORDER BY outbox.available_at, outbox.id LIMIT $3",
            )
        });
        &SQL
    }

    /// `BEGIN IMMEDIATE` takes SQLite's write lock up front (other processes, such as the
    /// CLI, wait for it under the busy timeout).
    async fn begin_write(store: &SqliteStore) -> StoreResult<HeldWriter> {
        let mut writer = Self::write_connection(store).await?;
        writer.0.audit_head = None;
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *writer).await?;
        writer.0.in_transaction = true;
        Ok(writer)
    }

    async fn commit(mut transaction: HeldWriter) -> StoreResult<()> {
        sqlx::query("COMMIT").execute(&mut *transaction).await?;
        transaction.0.in_transaction = false;
        Ok(())
    }

    /// The writer, outside any transaction: each statement commits on its own.
    async fn write_connection(store: &SqliteStore) -> StoreResult<HeldWriter> {
        let mut writer = store.writer.clone().lock_owned().await;
        if writer.in_transaction {
            // Fails harmlessly if the transaction never began; a real problem shows at the
            // next BEGIN.
            let _ = sqlx::query("ROLLBACK")
                .execute(&mut writer.connection)
                .await;
            writer.in_transaction = false;
        }
        Ok(HeldWriter(writer, store.writer.clone()))
    }

    /// One round trip to the writer connection's thread for a whole group when the audit
    /// head is known (`BEGIN IMMEDIATE`, every insert and the `COMMIT` as one batch of
    /// statements), two when it must be read first. Each round trip wakes that thread and
    /// then ours, which on an idle virtual machine costs more than the statements do.
    async fn write_group(store: &SqliteStore, group: &[QueuedRequest]) -> StoreResult<()> {
        let mut writer = Self::write_connection(store).await?;
        if let Some(head) = writer.0.audit_head.take() {
            match SqliteStore::write_group_batch(
                &mut writer,
                group,
                Some(head),
                "BEGIN IMMEDIATE; ",
            )
            .await
            {
                Ok(()) => return Ok(()),
                // Most likely another process appended to the audit trail; if not, the
                // slow way fails the same way and says why.
                Err(_) => {
                    // Fails harmlessly if the batch failed before its BEGIN took effect.
                    let _ = sqlx::query("ROLLBACK").execute(&mut *writer).await;
                    writer.0.in_transaction = false;
                }
            }
        }
        writer.0.in_transaction = true;
        let written = match sqlx::query_as(BEGIN_WITH_AUDIT_HEAD)
            .fetch_optional(&mut *writer)
            .await
        {
            Ok(head) => SqliteStore::write_group_batch(&mut writer, group, head, "").await,
            Err(error) => Err(error.into()),
        };
        if written.is_err() {
            // Let go of SQLite's write lock now, not at this process's next write: the CLI
            // may be waiting for it.
            let _ = sqlx::query("ROLLBACK").execute(&mut *writer).await;
            writer.0.in_transaction = false;
        }
        written
    }

    const COUNTED_BETWEEN: &'static str = "SELECT created_at, CASE WHEN $5 = '' THEN 1.0 \
         WHEN json_type(body, '$.args.' || $5) IN ('integer', 'real') \
         THEN CAST(json_extract(body, '$.args.' || $5) AS REAL) ELSE 0.0 END AS value FROM requests \
         WHERE agent = $1 AND action = $2 AND created_at > $3 AND created_at < $4 \
         AND status IN ('pending', 'approved')";

    /// The one writer connection, held from `BEGIN IMMEDIATE`, serialises every intake.
    async fn serialize_intake(
        _connection: &mut SqliteConnection,
        _agent: &str,
        _action: &str,
    ) -> StoreResult<()> {
        Ok(())
    }

    /// Writers already take the single write lock at `BEGIN IMMEDIATE`.
    async fn serialize_audit_appends(_connection: &mut SqliteConnection) -> StoreResult<()> {
        Ok(())
    }

    /// Other processes learn of decisions from the audit table (see `watcher`).
    async fn notify_finalized(
        _connection: &mut SqliteConnection,
        _request_id: &str,
    ) -> StoreResult<()> {
        Ok(())
    }

    /// No such channel: the watcher polls.
    async fn finalized_notifications(_store: &SqliteStore) -> StoreResult<Option<Notifications>> {
        Ok(None)
    }

    async fn execute_built(
        builder: &mut QueryBuilder<'_, Sqlite>,
        connection: &mut SqliteConnection,
    ) -> Result<u64, sqlx::Error> {
        Ok(builder.build().execute(connection).await?.rows_affected())
    }

    fn rows_affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
    }
}

#[cfg(test)]
mod tests {
    use super::BEGIN_WITH_AUDIT_HEAD;
    use crate::store::audit::AUDIT_HEAD;

    #[test]
    fn the_group_commit_reads_the_same_audit_head_as_every_append() {
        assert_eq!(
            BEGIN_WITH_AUDIT_HEAD,
            format!("BEGIN IMMEDIATE; {AUDIT_HEAD}")
        );
    }
}
