//! Shared test harness: a real server on port 0 over a fresh SQLite file or PostgreSQL
//! database, typed request helpers, and the CLI binary pointed at the same database.
#![allow(dead_code)]

pub mod fake_slack;
pub mod fake_teams;
pub mod recording_channel;
pub mod webhook_receiver;

use std::future::Future;
use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::StatusCode;
use serde_json::{json, Value};
use signoff::channels::ChatChannel;
use signoff::config::{Config, Secret, SlackConfig, TeamsConfig};
use signoff::domain::{ApprovalRequest, Principal, VoteEffect, VoteRequest, Voter};
use signoff::engine::{Clock, Engine, EngineResult, ManualClock};
use signoff::server::{RunningServer, ServerOptions};
use signoff::store::{CandidateQuery, Store};
use signoff::workers::{sweep_once, Delivery, Swept};
use sqlx::Connection;
use tempfile::TempDir;

use self::fake_slack::{FakeSlack, SlackDriver};
use self::fake_teams::{FakeTeams, TokenSpec};

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const SLACK_SIGNING_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The backend matrix, written once: a test under `#[apply(backends)]` runs once on each
/// backend, as `case_1_sqlite` and `case_2_postgres`, its `#[case] backend: Backend` argument
/// saying which. The test keeps its own `#[tokio::test]` (flavour and worker threads are its
/// choice) right after the `#[apply]`, where `#[rstest]` wants it:
///
/// ```ignore
/// #[apply(backends)]
/// #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// async fn a_scenario(#[case] backend: Backend) { /* ... */ }
/// ```
///
/// The attributes are pasted into the test's module, which therefore needs `rstest::rstest`
/// and `rstest_reuse::apply` in scope.
#[rstest_reuse::template]
#[rstest]
#[case::sqlite(crate::support::Backend::Sqlite)]
#[case::postgres(crate::support::Backend::Postgres)]
pub fn backends(#[case] backend: Backend) {}

/// The policy most tests run under.
pub const TEST_POLICY: &str = r#"version: 1
default: deny
default_tier: medium
groups:
  sre: ["cli:alice", "cli:bob", "cli:carol", "cli:erin"]
  finance: ["cli:frank", "cli:grace"]
tiers:
  medium:
    route: ["slack:C0MEDIUM"]
    approvers: ["group:sre"]
    approvals: 1
    ttl: 30m
  high:
    route: ["slack:C0HIGH"]
    approvers: ["group:sre", "group:finance"]
    approvals: 2
    ttl: 1h
  flash:
    route: ["slack:C0FLASH"]
    approvers: ["group:sre"]
    approvals: 1
    ttl: 1s
rules:
  - name: read-only
    match: ["*.get", "*.list"]
    effect: allow
  - name: large-refund
    match: ["payments.refund"]
    when: "args.amount > 100"
    effect: require_approval
    tier: high
  - name: small-refund
    match: ["payments.refund"]
    when: "args.amount <= 100"
    effect: allow
  - name: email
    match: ["email.send"]
    effect: require_approval
  - name: flash
    match: ["flash.*"]
    effect: require_approval
    tier: flash
  - name: vip-customers
    match: ["crm.*"]
    when: "context.customer_tier == 'vip'"
    effect: require_approval
    tier: high
  - name: no-drop
    match: ["db.drop_*"]
    effect: deny
    reason: "Dropping tables is never allowed"
"#;

/// What tests let callbacks reach: their webhook receivers listen on loopback.
pub const LOOPBACK_NETWORKS: [&str; 2] = ["127.0.0.0/8", "::1/128"];

pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A fresh database for one test: a SQLite file in a temporary folder, or a new PostgreSQL
/// database dropped when the test ends.
pub struct TestDatabase {
    pub url: String,
    postgres: Option<(String, String)>,
}

impl TestDatabase {
    /// `None` when PostgreSQL is unreachable outside CI (the test then prints SKIPPED).
    pub async fn create(backend: Backend, directory: &TempDir) -> Option<Self> {
        match backend {
            Backend::Sqlite => Some(Self {
                url: format!("sqlite://{}", directory.path().join("signoff.db").display()),
                postgres: None,
            }),
            Backend::Postgres => {
                let admin_url = std::env::var("SIGNOFF_TEST_POSTGRES_URL")
                    .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_string());
                let mut admin = match sqlx::PgConnection::connect(&admin_url).await {
                    Ok(connection) => connection,
                    Err(error) => {
                        if std::env::var("CI").as_deref() == Ok("true") {
                            panic!("PostgreSQL at {admin_url} is required under CI=true: {error}");
                        }
                        eprintln!(
                            "\n*** SKIPPED: PostgreSQL case — cannot connect to {admin_url}: {error} ***\n"
                        );
                        return None;
                    }
                };
                let name = format!("signoff_test_{:016x}", rand::thread_rng().gen::<u64>());
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .expect("create test database");
                let url = replace_database(&admin_url, &name);
                Some(Self {
                    url,
                    postgres: Some((admin_url, name)),
                })
            }
        }
    }
}

fn replace_database(url: &str, database: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("postgres url");
    parsed.set_path(&format!("/{database}"));
    parsed.to_string()
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some((admin_url, name)) = self.postgres.take() else {
            return;
        };
        // Drop runs outside async; a short-lived runtime on its own thread does the cleanup.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// An agent created for a test, with its one-time credentials.
#[derive(Clone, Debug)]
pub struct TestAgent {
    pub name: String,
    pub key: String,
    pub webhook_secret: String,
}

pub struct TestApp {
    pub backend: Backend,
    /// The time the server sees. It stands still until a test moves it (`advance`).
    pub clock: ManualClock,
    /// Extra chat channels the server registers (a recording fake, say).
    channels: Vec<Arc<dyn ChatChannel>>,
    /// Run the real clock and the workers' loops: for the few tests whose subject is the
    /// loops' own timing (leases, pacing, concurrency across replicas).
    live: bool,
    pub slack: FakeSlack,
    /// The fake Bot Framework, when the app runs Teams (`spawn_with_teams`).
    pub teams: Option<FakeTeams>,
    pub base_url: String,
    pub config: Config,
    pub config_path: PathBuf,
    pub http: reqwest::Client,
    server: Option<RunningServer>,
    /// The test's own connection to the database, to look behind the server's back.
    store: tokio::sync::OnceCell<Arc<dyn Store>>,
    pub database: TestDatabase,
    pub directory: TempDir,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Option<Self> {
        Self::spawn_with_policy(backend, TEST_POLICY).await
    }

    pub async fn spawn_with_policy(backend: Backend, policy: &str) -> Option<Self> {
        Self::spawn_with_channels(backend, policy, Vec::new()).await
    }

    /// A server that also runs `channels` (each delivers its platform's destinations).
    pub async fn spawn_with_channels(
        backend: Backend,
        policy: &str,
        channels: Vec<Arc<dyn ChatChannel>>,
    ) -> Option<Self> {
        Self::spawn_full(backend, policy, channels, None).await
    }

    /// A server that also runs Teams, against a fake Bot Framework on loopback (its tenant
    /// `fake_teams::TENANT` configured, so other tenants are refused).
    pub async fn spawn_with_teams(backend: Backend, policy: &str) -> Option<Self> {
        let teams = FakeTeams::start().await;
        Self::spawn_full(backend, policy, Vec::new(), Some(teams)).await
    }

    /// As `spawn_with_teams`, but with no `teams.tenant_id`: activities from any tenant are
    /// taken.
    pub async fn spawn_with_teams_in_any_tenant(backend: Backend, policy: &str) -> Option<Self> {
        let mut teams = FakeTeams::start().await;
        teams.tenant_pinned = false;
        Self::spawn_full(backend, policy, Vec::new(), Some(teams)).await
    }

    async fn spawn_full(
        backend: Backend,
        policy: &str,
        channels: Vec<Arc<dyn ChatChannel>>,
        teams: Option<FakeTeams>,
    ) -> Option<Self> {
        let directory = tempfile::tempdir().expect("temp dir");
        let database = TestDatabase::create(backend, &directory).await?;
        let policy_path = directory.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).expect("write policy");
        let slack = FakeSlack::start().await;
        let config = Config {
            slack: SlackConfig {
                bot_token: Secret::new("xoxb-test-token"),
                signing_secret: Secret::new(SLACK_SIGNING_SECRET),
                api_url: slack.api_url.clone(),
                command: "/signoff".into(),
            },
            listen: "127.0.0.1:0".into(),
            database_url: Secret::new(database.url.clone()),
            policy: policy_path.clone(),
            sweep_interval_ms: 100,
            watch_interval_ms: 100,
            admin_token: Secret::new(ADMIN_TOKEN),
            database_max_connections: 8,
            // Webhook receivers in tests listen on loopback.
            callback_allowed_networks: LOOPBACK_NETWORKS
                .iter()
                .map(|network| network.to_string())
                .collect(),
            teams: teams.as_ref().map(|teams| TeamsConfig {
                app_id: fake_teams::APP_ID.into(),
                app_password: Secret::new(fake_teams::APP_PASSWORD),
                tenant_id: if teams.tenant_pinned {
                    fake_teams::TENANT.into()
                } else {
                    String::new()
                },
                openid_metadata_url: teams.openid_metadata_url(),
                token_url: teams.token_url(),
                default_service_url: teams.service_url(),
                allowed_service_urls: vec![teams.service_url()],
            }),
            ..Config::default()
        };
        let config_path = directory.path().join("signoff.toml");
        std::fs::write(
            &config_path,
            format!(
                "listen = \"127.0.0.1:0\"\ndatabase_url = {:?}\npolicy = {:?}\ncallback_allowed_networks = [\"127.0.0.0/8\", \"::1/128\"]\nwatch_interval_ms = 100\nsweep_interval_ms = 100\n\n[slack]\nbot_token = \"xoxb-test-token\"\nsigning_secret = {:?}\napi_url = {:?}\n",
                database.url,
                policy_path.display().to_string(),
                SLACK_SIGNING_SECRET,
                slack.api_url,
            ),
        )
        .expect("write config");
        let mut app = Self {
            backend,
            clock: ManualClock::new(),
            channels,
            live: false,
            slack,
            teams,
            base_url: String::new(),
            config,
            config_path,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(70))
                .build()
                .expect("client"),
            server: None,
            store: tokio::sync::OnceCell::new(),
            database,
            directory,
        };
        app.start().await;
        Some(app)
    }

    /// Servers in tests run no delivery or sweeper loops: a test moves the clock and
    /// calls `deliver` and `sweep`, so nothing happens behind its back or on a timer.
    fn server_options(&self) -> ServerOptions {
        if self.live {
            return ServerOptions {
                channels: self.channels.clone(),
                ..ServerOptions::default()
            };
        }
        ServerOptions {
            clock: Arc::new(self.clock.clone()),
            channels: self.channels.clone(),
            background_workers: false,
        }
    }

    /// A server on the real clock with its delivery and sweeper loops running.
    pub async fn spawn_live(backend: Backend) -> Option<Self> {
        let mut app = Self::spawn(backend).await?;
        app.live = true;
        app.restart().await;
        Some(app)
    }

    async fn start(&mut self) {
        init_test_logging();
        let server = RunningServer::start_with(self.config.clone(), self.server_options())
            .await
            .expect("server starts");
        self.base_url = format!("http://{}", server.address());
        self.server = Some(server);
    }

    /// Another server on the same database and policy: a second replica.
    pub async fn start_replica(&self) -> RunningServer {
        RunningServer::start_with(self.config.clone(), self.server_options())
            .await
            .expect("replica starts")
    }

    /// This server's outbox worker, for a test that drives its steps itself.
    pub fn delivery(&self) -> &Arc<Delivery> {
        self.server.as_ref().expect("server running").delivery()
    }

    /// Delivers every outbox message due at the test clock (cards, reminders, webhooks)
    /// and returns once they are delivered and recorded.
    pub async fn deliver(&self) -> usize {
        self.delivery()
            .deliver_due()
            .await
            .expect("deliver due outbox messages")
    }

    /// `deliver`, again as paced chat destinations get tokens back (about one a second,
    /// real time), until nothing is due at the test clock: for a test that sends one
    /// destination more than its burst of three. Retries scheduled later are not due.
    pub async fn deliver_all(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut handled = 0;
        loop {
            handled += self.deliver().await;
            if !self.anything_due().await {
                return handled;
            }
            assert!(
                Instant::now() < deadline,
                "outbox messages still due after delivering for 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether any outbox message is due at the test clock and not being delivered.
    async fn anything_due(&self) -> bool {
        let due = self
            .engine()
            .outbox_candidates(
                self.engine().now(),
                &CandidateQuery {
                    skip: &[],
                    skip_hosts: &[],
                    per_queue: 1,
                    limit: 1,
                },
            )
            .await
            .expect("outbox candidates");
        !due.is_empty()
    }

    /// One sweep at the test clock: expiry, escalation, reminders.
    pub async fn sweep(&self) -> Swept {
        sweep_once(self.engine()).await
    }

    /// Moves the test clock forward.
    pub fn advance(&self, by: Duration) {
        self.clock
            .advance(chrono::Duration::from_std(by).expect("duration in range"));
    }

    /// Asserts that no outbox message of `kind` is pending: each was delivered or given up,
    /// none waits for a retry.
    pub async fn assert_none_pending(&self, kind: &str) {
        let pending = self
            .store()
            .await
            .pending_outbox(1000)
            .await
            .expect("pending outbox");
        let left: Vec<_> = pending
            .iter()
            .filter(|message| message.kind == kind)
            .collect();
        assert!(left.is_empty(), "{kind} messages still pending: {left:#?}");
    }

    /// Moves the test clock up to the real time, if behind it: what the CLI (a process on
    /// the real clock) queued becomes due.
    pub fn catch_up_with_the_cli(&self) {
        let now = chrono::Utc::now();
        if now > self.clock.now() {
            self.clock.set(now);
        }
    }

    /// Delivers what is due, then the fake Slack's successful `method` calls, of which
    /// there must be at least `count`.
    pub async fn delivered(&self, method: &str, count: usize) -> Vec<Value> {
        self.deliver().await;
        let calls = self.slack.calls(method);
        assert!(
            calls.len() >= count,
            "fake Slack: expected {count} {method} call(s) after delivery, got {}: {calls:#?}",
            calls.len()
        );
        calls
    }

    /// Stops the server (gracefully) and starts a new one on the same database.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown(Duration::from_secs(10)).await;
        }
    }

    pub async fn start_again(&mut self) {
        self.start().await;
    }

    /// Signs requests to this app's Slack endpoints as Slack would.
    pub fn slack_driver(&self) -> SlackDriver {
        SlackDriver {
            signing_secret: SLACK_SIGNING_SECRET.into(),
            base_url: self.base_url.clone(),
            http: self.http.clone(),
            response_url: self.slack.response_url.clone(),
        }
    }

    /// The fake Bot Framework (the app must run Teams).
    pub fn fake_teams(&self) -> &FakeTeams {
        self.teams.as_ref().expect("spawned with spawn_with_teams")
    }

    /// POSTs `activity` to /teams/messages with `token` as the bearer (none: no header).
    pub async fn teams_post(&self, activity: &Value, token: Option<String>) -> (StatusCode, Value) {
        let mut request = self.http.post(self.url("/teams/messages")).json(activity);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        read(request.send().await).await
    }

    /// Sends `activity` with a valid token for its serviceUrl, signed at the app's clock.
    pub async fn teams_send(&self, activity: &Value) -> (StatusCode, Value) {
        let service_url = activity["serviceUrl"].as_str().unwrap_or_default();
        let token = TokenSpec::valid(service_url).sign(self.clock.now());
        self.teams_post(activity, Some(token)).await
    }

    /// Clicks `verb` on a Teams card in `fake_teams::CHANNEL` as AAD user `user`, with the
    /// card's `data` (request id, revision, inputs); returns the card Teams would show them.
    pub async fn teams_invoke(&self, user: &str, verb: &str, data: Value) -> Value {
        let activity = fake_teams::invoke_activity(
            &self.fake_teams().service_url(),
            fake_teams::CHANNEL,
            user,
            verb,
            data,
        );
        let (status, body) = self.teams_send(&activity).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["statusCode"], 200, "{body}");
        assert_eq!(
            body["type"], "application/vnd.microsoft.card.adaptive",
            "{body}"
        );
        body["value"].clone()
    }

    /// Types `text` to the bot in `fake_teams::CHANNEL` as AAD user `user`; returns the
    /// reply activity the bot posted.
    pub async fn teams_message(&self, user: &str, text: &str) -> Value {
        let before = self.fake_teams().posted(fake_teams::CHANNEL).len();
        let activity = fake_teams::message_activity(
            &self.fake_teams().service_url(),
            fake_teams::CHANNEL,
            user,
            text,
        );
        let (status, body) = self.teams_send(&activity).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let posted = self.fake_teams().posted(fake_teams::CHANNEL);
        assert_eq!(posted.len(), before + 1, "one reply expected: {posted:#?}");
        posted.last().expect("reply").body.clone()
    }

    /// The database through the store API, independent of the server (it stays usable
    /// while the server is stopped).
    pub async fn store(&self) -> Arc<dyn Store> {
        self.store
            .get_or_init(|| async {
                signoff::store::connect(&self.config)
                    .await
                    .expect("test store connects")
            })
            .await
            .clone()
    }

    pub fn engine(&self) -> &Engine {
        self.server.as_ref().expect("server running").engine()
    }

    pub async fn create_agent(&self, name: &str, owners: &[&str]) -> TestAgent {
        let owners = owners
            .iter()
            .map(|owner| owner.parse().expect("principal"))
            .collect();
        let credentials = self
            .engine()
            .create_agent(name, owners)
            .await
            .expect("create agent");
        TestAgent {
            name: credentials.agent,
            key: credentials.api_key,
            webhook_secret: credentials.webhook_secret,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// POST /v1/requests; returns the status and JSON body.
    pub async fn submit(&self, agent: &TestAgent, body: Value) -> (StatusCode, Value) {
        self.submit_with_key(agent, body, None).await
    }

    pub async fn submit_with_key(
        &self,
        agent: &TestAgent,
        body: Value,
        idempotency_key: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .post(self.url("/v1/requests"))
            .bearer_auth(&agent.key)
            .json(&body);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        read(request.send().await).await
    }

    /// Submits `count` copies of `body` at once, every other one through a second server
    /// on the same database (started for them, and stopped after).
    pub async fn submit_on_two_replicas(
        &self,
        agent: &TestAgent,
        body: Value,
        count: usize,
    ) -> Vec<(StatusCode, Value)> {
        let replica = self.start_replica().await;
        let replica_url = format!("http://{}/v1/requests", replica.address());
        let answers = futures::future::join_all((0..count).map(|index| {
            let url = if index % 2 == 0 {
                self.url("/v1/requests")
            } else {
                replica_url.clone()
            };
            let request = self.http.post(url).bearer_auth(&agent.key).json(&body);
            async move { read(request.send().await).await }
        }))
        .await;
        replica.shutdown(Duration::from_secs(5)).await;
        answers
    }

    /// Submits and asserts 201; returns the request object.
    pub async fn submit_ok(&self, agent: &TestAgent, body: Value) -> Value {
        let (status, body) = self.submit(agent, body).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// Submits, asserts 201, returns the new request's id.
    pub async fn submit_id(&self, agent: &TestAgent, body: Value) -> String {
        let request = self.submit_ok(agent, body).await;
        request["id"].as_str().expect("id").to_string()
    }

    /// Returns once a long-poll on this server waits on `id`: a decision after this is
    /// answered by the wake, not by the long-poll's first read.
    pub async fn until_awaited(&self, id: &str) {
        eventually(Duration::from_secs(5), || async {
            self.engine()
                .awaited_request_ids()
                .iter()
                .any(|awaited| awaited == id)
                .then_some(())
        })
        .await;
    }

    /// Starts a long-poll on `id` in the background; yields the answer and when it came.
    pub fn spawn_long_poll(
        &self,
        agent: &TestAgent,
        id: &str,
        wait_seconds: u64,
    ) -> tokio::task::JoinHandle<(Value, Instant)> {
        let request = self
            .http
            .get(self.url(&format!("/v1/requests/{id}?wait={wait_seconds}")))
            .bearer_auth(&agent.key);
        tokio::spawn(async move {
            let body: Value = request
                .send()
                .await
                .expect("long-poll")
                .json()
                .await
                .expect("JSON");
            (body, Instant::now())
        })
    }

    pub async fn get_request(
        &self,
        agent: &TestAgent,
        id: &str,
        wait: Option<f64>,
    ) -> (StatusCode, Value) {
        let path = match wait {
            Some(seconds) => format!("/v1/requests/{id}?wait={seconds}"),
            None => format!("/v1/requests/{id}"),
        };
        read(
            self.http
                .get(self.url(&path))
                .bearer_auth(&agent.key)
                .send()
                .await,
        )
        .await
    }

    pub async fn post_json(
        &self,
        agent: &TestAgent,
        path: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        read(
            self.http
                .post(self.url(path))
                .bearer_auth(&agent.key)
                .json(&body)
                .send()
                .await,
        )
        .await
    }

    pub async fn vote(
        &self,
        id: &str,
        principal: &str,
        vote: VoteRequest,
    ) -> EngineResult<(ApprovalRequest, VoteEffect)> {
        let principal: Principal = principal.parse().expect("principal");
        self.engine()
            .record_vote(id, &Voter::new(principal), vote, None)
            .await
    }

    pub async fn approve(
        &self,
        id: &str,
        principal: &str,
    ) -> EngineResult<(ApprovalRequest, VoteEffect)> {
        self.vote(id, principal, VoteRequest::Approve { note: None })
            .await
    }

    pub async fn stored(&self, id: &str) -> ApprovalRequest {
        self.engine().request(id).await.expect("stored request")
    }

    /// The kinds of the audit events about `request_id` (or about no request), in order,
    /// without deliveries, which the outbox worker records whenever it gets to them.
    pub async fn audit_kinds(&self, request_id: Option<&str>) -> Vec<String> {
        let mut kinds = Vec::new();
        self.engine()
            .export_audit(|event| {
                if event.request_id.as_deref() == request_id && event.kind != "delivered" {
                    kinds.push(event.kind.clone());
                }
                Ok(())
            })
            .await
            .expect("export");
        kinds
    }

    /// The payloads of the `delivered` events about `request_id`, in order.
    pub async fn deliveries(&self, request_id: &str) -> Vec<serde_json::Value> {
        let mut payloads = Vec::new();
        self.engine()
            .export_audit(|event| {
                if event.request_id.as_deref() == Some(request_id) && event.kind == "delivered" {
                    payloads.push(event.payload.clone());
                }
                Ok(())
            })
            .await
            .expect("export");
        payloads
    }

    pub async fn audit_seq(&self) -> i64 {
        self.store()
            .await
            .latest_audit_seq()
            .await
            .expect("audit seq")
    }

    pub async fn request_count(&self) -> usize {
        self.engine()
            .list_requests(Default::default())
            .await
            .expect("list")
            .len()
    }

    /// Runs the `signoff` binary against this app's database and policy.
    pub fn cli(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_signoff"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .env_remove("SIGNOFF_CONFIG")
            .output()
            .expect("run signoff")
    }

    /// One integer from raw SQL (a count, say), read behind the server's back.
    pub async fn query_i64(&self, sql: &str) -> i64 {
        match self.backend {
            Backend::Sqlite => {
                let mut connection = sqlx::SqliteConnection::connect(&self.database.url)
                    .await
                    .expect("connect");
                sqlx::query_scalar(sql)
                    .fetch_one(&mut connection)
                    .await
                    .expect("query")
            }
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(&self.database.url)
                    .await
                    .expect("connect");
                sqlx::query_scalar(sql)
                    .fetch_one(&mut connection)
                    .await
                    .expect("query")
            }
        }
    }

    /// Executes several statements (no parameters) in one connection, behind the server's
    /// back.
    pub async fn execute_sql_batch(&self, sql: &str) -> Result<(), sqlx::Error> {
        match self.backend {
            Backend::Sqlite => {
                let mut connection = sqlx::SqliteConnection::connect(&self.database.url).await?;
                sqlx::raw_sql(sql).execute(&mut connection).await?;
            }
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(&self.database.url).await?;
                sqlx::raw_sql(sql).execute(&mut connection).await?;
            }
        }
        Ok(())
    }

    /// Executes raw SQL against the database behind the server's back.
    pub async fn execute_sql(&self, sql: &str) -> Result<u64, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => {
                let mut connection = sqlx::SqliteConnection::connect(&self.database.url).await?;
                Ok(sqlx::query(sql)
                    .execute(&mut connection)
                    .await?
                    .rows_affected())
            }
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(&self.database.url).await?;
                Ok(sqlx::query(sql)
                    .execute(&mut connection)
                    .await?
                    .rows_affected())
            }
        }
    }
}

async fn read(response: reqwest::Result<reqwest::Response>) -> (StatusCode, Value) {
    let response = response.expect("HTTP request");
    let status = response.status();
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text}))
    };
    (status, body)
}

/// Asserts an error body of the documented shape and returns its code.
pub fn error_code(body: &Value) -> &str {
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"));
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|message| !message.is_empty()),
        "error without message: {body}"
    );
    code
}

/// Polls `check` until it returns Some, failing after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// Spawns the app or returns from the test (PostgreSQL unreachable outside CI).
#[macro_export]
macro_rules! spawn_app {
    ($backend:expr) => {
        match $crate::support::TestApp::spawn($backend).await {
            Some(app) => app,
            None => return,
        }
    };
    (live $backend:expr) => {
        match $crate::support::TestApp::spawn_live($backend).await {
            Some(app) => app,
            None => return,
        }
    };
    ($backend:expr, $policy:expr) => {
        match $crate::support::TestApp::spawn_with_policy($backend, $policy).await {
            Some(app) => app,
            None => return,
        }
    };
}

/// `RUST_LOG=signoff=debug cargo test ...` shows the server's logs.
pub fn init_test_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
