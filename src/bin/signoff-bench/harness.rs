//! The harness a measurement runs in: the scratch database (SQLite file or PostgreSQL
//! database), the bench's config and policy, a signoff server on its own runtime with a fake
//! Slack and an agent of its own, and the machine helpers (scratch directory, disk, cores).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use signoff::config::{Config, Secret, SlackConfig};
use signoff::server::RunningServer;
use sqlx::{Connection, Executor};

use crate::{fake_slack, Args};

pub const SIGNING_SECRET: &str = "bench-signing-secret";

/// Name of the server runtime's threads, so their CPU time can be told apart.
pub const SERVER_THREAD_NAME: &str = "signoff-server";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct Database {
    pub url: String,
    scratch: Option<(String, String)>,
}

impl Database {
    /// A SQLite file, which needs no dropping.
    pub fn sqlite(file: &Path) -> Self {
        Self {
            url: format!("sqlite://{}", file.display()),
            scratch: None,
        }
    }

    pub async fn create(
        backend: Backend,
        directory: &Path,
        postgres_url: &str,
    ) -> anyhow::Result<Self> {
        match backend {
            Backend::Sqlite => Ok(Self::sqlite(&directory.join("bench.db"))),
            Backend::Postgres => {
                let name = format!("signoff_bench_{}", std::process::id());
                let mut admin = sqlx::PgConnection::connect(postgres_url)
                    .await
                    .with_context(|| {
                        format!("connecting to {postgres_url} (use --skip-postgres without one)")
                    })?;
                admin
                    .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
                    .await?;
                admin
                    .execute(format!("CREATE DATABASE {name}").as_str())
                    .await?;
                let mut url = url::Url::parse(postgres_url)?;
                url.set_path(&format!("/{name}"));
                Ok(Self {
                    url: url.to_string(),
                    scratch: Some((postgres_url.to_string(), name)),
                })
            }
        }
    }

    pub async fn drop_scratch(&self) {
        if let Some((admin_url, name)) = &self.scratch {
            if let Ok(mut admin) = sqlx::PgConnection::connect(admin_url).await {
                let _ = admin
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await;
            }
        }
    }
}

pub const BENCH_POLICY: &str = r#"version: 1
default: deny
tiers:
  medium:
    route: ["slack:C0BENCH"]
    approvers: ["slack:U0BENCH", "cli:bench"]
    ttl: 1h
rules:
  - name: reads
    match: ["*.get"]
    effect: allow
  - name: email
    match: ["email.send"]
    effect: require_approval
    tier: medium
"#;

pub fn bench_config(database: &Database, policy: &Path, listen: &str) -> Config {
    Config {
        listen: listen.into(),
        database_url: Secret::new(database.url.clone()),
        policy: policy.to_path_buf(),
        database_max_connections: 64,
        // One agent sends all of the load: the per-agent quotas would refuse most of it.
        max_pending_per_agent: 0,
        agent_rate_limit: 0,
        max_waiting_per_agent: 0,
        ..Config::default()
    }
}

/// The per-agent quotas on, checked on every submission and never refusing: the rate
/// limiter's state is spent, the pending count is cached and re-read once a second.
pub fn turn_quotas_on(config: &mut Config) {
    config.max_pending_per_agent = 100_000_000;
    config.agent_rate_limit = 1_000_000_000;
    config.max_waiting_per_agent = 1_000_000;
}

/// A request the bench's policy allows at once (rule `reads`).
pub fn auto_allowed() -> Value {
    json!({"action": "customers.get", "args": {"id": 42}})
}

/// The two intakes measured: allowed at once, and pending (a card posted to the fake Slack).
pub fn intakes() -> [(&'static str, Value); 2] {
    [
        ("auto-allowed intake", auto_allowed()),
        (
            "pending intake",
            json!({"action": "email.send", "args": {"to": "a@example.com"}}),
        ),
    ]
}

pub struct Harness {
    pub server: RunningServer,
    /// The server's configuration, for opening the same database beside it.
    pub config: Config,
    /// The server runs on its own runtime, so the load generator's timers and tasks do
    /// not queue behind the server's (they still share the machine's cores).
    server_runtime: tokio::runtime::Runtime,
    pub base_url: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl Harness {
    pub async fn start(
        args: &Args,
        database: &Database,
        directory: &Path,
        quotas_on: bool,
    ) -> anyhow::Result<Self> {
        Self::start_configured(args, database, directory, quotas_on, |_| {}).await
    }

    /// `start`, with `configure` changing the server's config last (another policy, a
    /// chat platform more).
    pub async fn start_configured(
        args: &Args,
        database: &Database,
        directory: &Path,
        quotas_on: bool,
        configure: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let slack = fake_slack::start().await?;
        let policy = directory.join("bench-policy.yaml");
        std::fs::write(&policy, BENCH_POLICY)?;
        let mut config = bench_config(database, &policy, "127.0.0.1:0");
        config.sqlite_synchronous = args.sqlite_synchronous.clone();
        if quotas_on {
            turn_quotas_on(&mut config);
        }
        config.slack = SlackConfig {
            bot_token: Secret::new("xoxb-bench"),
            signing_secret: Secret::new(SIGNING_SECRET),
            api_url: slack,
            command: "/signoff".into(),
        };
        configure(&mut config);
        let server_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(num_cpus())
            .thread_name(SERVER_THREAD_NAME)
            .enable_all()
            .build()?;
        let server = server_runtime
            .spawn(RunningServer::start(config.clone()))
            .await??;
        // Several harnesses may start on one database in a run (the quota cost's rounds).
        static HARNESSES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let number = HARNESSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let credentials = server
            .engine()
            .create_agent(
                &format!("agent-{}-{number}", std::process::id()),
                Vec::new(),
            )
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        Ok(Self {
            base_url: format!("http://{}", server.address()),
            server,
            config,
            server_runtime,
            key: credentials.api_key,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(1024)
                .build()?,
        })
    }

    pub async fn stop(self) {
        self.server.shutdown(Duration::from_secs(10)).await;
        self.server_runtime.shutdown_background();
    }

    /// A submission of `body` by the harness's agent, ready to send.
    pub fn intake(&self, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/v1/requests", self.base_url))
            .bearer_auth(&self.key)
            .json(body)
    }

    pub async fn submit(&self, body: &Value) -> anyhow::Result<Value> {
        let response = self.intake(body).send().await?;
        if response.status() != reqwest::StatusCode::CREATED {
            bail!("submit answered {}", response.status());
        }
        Ok(response.json().await?)
    }
}

/// Flushes what earlier work (a build, the previous step) left for the disk to write, so a
/// measurement does not pay for it.
pub fn settle_disk() {
    let _ = std::process::Command::new("sync").status();
}

pub fn tempfile_directory() -> anyhow::Result<PathBuf> {
    let directory = std::env::temp_dir().join(format!("signoff-bench-{}", std::process::id()));
    std::fs::create_dir_all(&directory)?;
    Ok(directory)
}

pub fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get())
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|name| name.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
