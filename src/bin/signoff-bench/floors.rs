//! The physical floors: intake's request row inserted raw, one row per commit at the
//! server's durability setting (as fast as it goes, and under the open-loop schedule), and
//! below any database one 4 KiB write + fdatasync per due time.

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};
use sqlx::{Connection, Executor};
use tokio::task::JoinSet;

use crate::harness::{bench_config, settle_disk, Backend, Database};
use crate::latency::{histogram, paced, schedule, LoadResult};

/// Raw inserts of the same rows, one row per commit, at the server's durability setting.
pub async fn floors(
    backend: Backend,
    database: &Database,
    rows: usize,
) -> anyhow::Result<Vec<(String, f64)>> {
    let config = bench_config(database, Path::new("unused"), "127.0.0.1:0");
    let store = signoff::store::connect(&config).await?;
    store.migrate().await?;
    let agent = signoff::engine::Engine::new(
        store,
        signoff::policy::Policy::parse("version: 1").map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    agent
        .create_agent("bench", Vec::new())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    settle_disk();
    let connection_counts: &[usize] = match backend {
        Backend::Sqlite => &[1],
        Backend::Postgres => &[1, 64],
    };
    let mut results = Vec::new();
    for &connections in connection_counts {
        let mut connected = Vec::new();
        for _ in 0..connections {
            connected.push(floor_connection(database).await?);
        }
        let started = Instant::now();
        let mut workers = JoinSet::new();
        for (worker, mut connection) in connected.into_iter().enumerate() {
            let share = rows / connections + usize::from(worker < rows % connections);
            workers.spawn(async move {
                for _ in 0..share {
                    insert_floor_row(&mut connection).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = workers.join_next().await {
            done??;
        }
        let rate = rows as f64 / started.elapsed().as_secs_f64();
        let label = match backend {
            Backend::Sqlite => "SQLite, 1 row per commit, synchronous=FULL".to_string(),
            Backend::Postgres => {
                format!("PostgreSQL, 1 row per commit, {connections} connection(s)")
            }
        };
        results.push((label, rate));
    }
    Ok(results)
}

/// The floor under the same open-loop load as intake: one connection inserts one row per
/// commit for each due time, in order, so a stall of the disk delays the ones behind it
/// exactly as it would delay a server that commits each request alone.
pub async fn floor_under_load(database: &Database, rate: f64, seconds: f64) -> LoadResult {
    let mut histogram = histogram();
    let mut errors = 0;
    let connection = floor_connection(database).await;
    let Ok(mut connection) = connection else {
        return LoadResult {
            histogram,
            errors: 1,
        };
    };
    let mut due_times = schedule(rate, seconds);
    while let Some(due) = due_times.recv().await {
        match insert_floor_row(&mut connection).await {
            Ok(()) => {
                let _ = histogram.record(due.elapsed().as_micros() as u64);
            }
            Err(_) => errors += 1,
        }
    }
    LoadResult { histogram, errors }
}

/// Below any database: one 4 KiB write and `fdatasync` per due time, in the directory the
/// SQLite file lives in. Whatever tail this has, every durable commit inherits.
pub fn disk_sync_under_load(
    directory: &Path,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<LoadResult> {
    use std::os::unix::fs::FileExt as _;
    let path = directory.join("sync-probe.bin");
    let file = std::fs::File::create(&path)?;
    let page = [7u8; 4096];
    let mut histogram = histogram();
    for (index, due) in (0u64..).zip(paced(rate, seconds)) {
        // Sixteen pages written over and over: the file never grows, so no metadata is synced.
        file.write_all_at(&page, (index % 16) * 4096)?;
        file.sync_data()?;
        let _ = histogram.record(due.elapsed().as_micros() as u64);
    }
    std::fs::remove_file(&path)?;
    Ok(LoadResult {
        histogram,
        errors: 0,
    })
}

/// A connection for raw inserts, at the server's durability setting.
pub enum FloorConnection {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

pub async fn floor_connection(database: &Database) -> anyhow::Result<FloorConnection> {
    if database.url.starts_with("sqlite:") {
        let mut connection = sqlx::SqliteConnection::connect(&database.url).await?;
        connection
            .execute(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
            )
            .await?;
        Ok(FloorConnection::Sqlite(connection))
    } else {
        Ok(FloorConnection::Postgres(
            sqlx::PgConnection::connect(&database.url).await?,
        ))
    }
}

/// One request row as intake stores it, in a commit of its own. Ids sort by time, as the
/// server's do.
pub async fn insert_floor_row(connection: &mut FloorConnection) -> anyhow::Result<()> {
    let id = format!("apr_floor_{}", signoff::domain::new_request_id());
    macro_rules! insert_with {
        ($connection:expr) => {
            sqlx::query(FLOOR_INSERT)
                .bind(&id)
                .bind(signoff::domain::now())
                .bind(sqlx::types::Json(sample_body(&id)))
                .execute($connection)
                .await?
        };
    }
    match connection {
        FloorConnection::Sqlite(connection) => {
            insert_with!(&mut *connection);
        }
        FloorConnection::Postgres(connection) => {
            insert_with!(&mut *connection);
        }
    }
    Ok(())
}

/// One request row exactly as intake stores it.
pub fn sample_body(id: &str) -> Value {
    json!({
        "id": id, "agent": "bench", "action": "customers.get", "args": {"id": 42},
        "context": {}, "on_behalf_of": null, "status": "approved", "tier": null,
        "rule": "reads", "approvals_required": 0, "revision": 1, "votes": [],
        "decision": {"outcome": "approved", "by": ["policy:reads"], "reason": null,
                     "at": "2026-11-21T10:00:00.000Z", "modified": false, "args": {"id": 42}},
        "action_hash": "sha256:0000", "policy_hash": "sha256:0000",
        "created_at": "2026-11-21T10:00:00.000Z", "expires_at": null, "executed": null,
        "original_args": {"id": 42}
    })
}

pub const FLOOR_INSERT: &str = "INSERT INTO requests (id, agent, action, status, revision, version, created_at, expires_at, updated_at, body) VALUES ($1, 'bench', 'customers.get', 'approved', 1, 1, $2, NULL, $2, $3)";
