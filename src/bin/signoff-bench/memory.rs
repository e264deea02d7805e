//! Resident memory of a server process, idle and with many pending requests in its
//! database: this binary started again with `--serve`, its VmRSS read from /proc.

use std::path::Path;

use anyhow::Context as _;
use serde_json::{json, Value};
use signoff::config::Config;
use signoff::server::RunningServer;
use sqlx::Connection;

use crate::floors::sample_body;
use crate::harness::{Database, BENCH_POLICY};

/// Resident memory of the server process, in KiB.
pub struct Resident {
    pub idle: u64,
    /// With the pending requests loaded.
    pub loaded: u64,
}

/// Resident memory of a server process, idle and with many pending requests in its database.
pub async fn resident(directory: &Path, pending: usize) -> anyhow::Result<Resident> {
    let database = Database::sqlite(&directory.join("memory.db"));
    let policy = directory.join("memory-policy.yaml");
    std::fs::write(&policy, BENCH_POLICY)?;
    let config = directory.join("memory.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndatabase_url = {:?}\npolicy = {:?}\n",
            database.url,
            policy.display().to_string()
        ),
    )?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--serve")
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let address = lines.next_line().await?.context("server address")?;
    let pid = child.id().context("child pid")?;
    let http = reqwest::Client::new();
    http.get(format!("http://{address}/readyz")).send().await?;
    let idle = resident_kib(pid)?;

    // Load the pending rows in bulk (one transaction), then make the server look at them.
    let mut connection = sqlx::SqliteConnection::connect(&database.url).await?;
    let mut transaction = connection.begin().await?;
    sqlx::query("INSERT INTO agents (name, api_key_hash, webhook_secret, owners, created_at) VALUES ('bench', 'unused', 'whsec_unused', '[]', $1) ON CONFLICT DO NOTHING")
        .bind(signoff::domain::now())
        .execute(&mut *transaction)
        .await?;
    let expires = signoff::domain::now() + chrono::Duration::hours(1);
    for index in 0..pending {
        let id = format!("apr_memory_{index}");
        let mut body = sample_body(&id);
        body["status"] = json!("pending");
        body["decision"] = Value::Null;
        sqlx::query("INSERT INTO requests (id, agent, action, status, revision, version, created_at, expires_at, updated_at, body) VALUES ($1, 'bench', 'email.send', 'pending', 1, 1, $2, $3, $2, $4)")
            .bind(&id)
            .bind(signoff::domain::now())
            .bind(expires)
            .bind(sqlx::types::Json(body))
            .execute(&mut *transaction)
            .await?;
    }
    transaction.commit().await?;
    for _ in 0..3 {
        http.get(format!("http://{address}/metrics")).send().await?;
    }
    let loaded = resident_kib(pid)?;
    child.kill().await?;
    Ok(Resident { idle, loaded })
}

pub async fn serve_for_measurement(config: &Path) -> anyhow::Result<()> {
    let server = RunningServer::start(Config::load(Some(config))?).await?;
    println!("{}", server.address());
    tokio::signal::ctrl_c().await?;
    Ok(())
}

pub fn resident_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS not found")
}
