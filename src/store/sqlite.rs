//! The embedded SQLite backend: WAL, busy timeout, foreign keys, one writer at a time.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

use super::shared::implement_store;
use super::StoreResult;
use crate::config::Config;

#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    const MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

    /// One statement: SQLite runs it under its single writer lock.
    const CLAIM_OUTBOX: &'static str = "UPDATE outbox SET lease_until = $2 WHERE id IN (\
         SELECT id FROM outbox WHERE state = 'pending' AND available_at <= $1 \
         AND (lease_until IS NULL OR lease_until <= $1) ORDER BY available_at, id LIMIT $3) \
         RETURNING id, request_id, kind, destination, payload, attempts, generation, created_at";

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
            .connect_with(options)
            .await
            .context("cannot open the SQLite database")?;
        Ok(Self { pool })
    }

    /// `BEGIN IMMEDIATE` takes the write lock up front, so a transaction that reads and
    /// then writes waits its turn (busy timeout) instead of failing on upgrade.
    async fn begin_write(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn notifications(&self) -> StoreResult<Option<super::Notifications>> {
        Ok(None)
    }

    /// Other processes learn of decisions from the audit table (see `watcher`).
    async fn notify_finalized(
        _transaction: &mut Transaction<'_, Sqlite>,
        _request_id: &str,
    ) -> StoreResult<()> {
        Ok(())
    }
}

implement_store!(SqliteStore, sqlx::Sqlite);
