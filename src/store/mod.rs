//! Durable state: the `Store` trait and the types it takes and returns. All SQL lives in
//! this folder, one file per area; `backend` says what SQLite and PostgreSQL do differently.

mod agents;
mod audit;
mod backend;
mod conversations;
mod counters;
mod grants;
mod group_commit;
mod idempotency;
mod intake;
mod outbox;
mod postgres;
mod requests;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::audit::{AuditEvent, NewAuditEvent};
use crate::config::Config;
use crate::domain::{ApprovalRequest, Grant, OutboxKind, Principal, Status};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A compare-and-set lost, or a unique key is taken.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// The database refused a request from a revoked agent.
    #[error("the agent is revoked")]
    AgentRevoked,
    /// The request's Idempotency-Key reservation was taken over by a later attempt (this
    /// one was presumed dead): the request was not stored.
    #[error("the Idempotency-Key reservation was taken over by a later attempt")]
    IdempotencyKeyTakenOver,
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A stream of request ids whose decisions were committed elsewhere.
pub type Notifications = futures::stream::BoxStream<'static, String>;

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: String,
    /// SHA-256 of the API key; the key itself is never stored.
    pub api_key_hash: String,
    /// Needed in the clear to sign webhooks.
    pub webhook_secret: String,
    pub owners: Vec<Principal>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for AgentRecord {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AgentRecord")
            .field("name", &self.name)
            .field("owners", &self.owners)
            .field("created_at", &self.created_at)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

/// A message for the outbox worker (chat card, webhook), written with the change that causes it.
#[derive(Clone, Debug, PartialEq)]
pub struct NewOutboxMessage {
    pub request_id: String,
    pub kind: OutboxKind,
    pub destination: String,
    pub payload: Value,
    pub available_at: DateTime<Utc>,
}

/// An outbox message leased to one worker until its lease runs out.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxMessage {
    pub id: i64,
    pub request_id: String,
    pub kind: OutboxKind,
    pub destination: String,
    pub payload: Value,
    /// Failed attempts in a row, for the backoff.
    pub attempts: i32,
    /// For card messages: bumped by every later change, so a delivery of an older state
    /// does not mark a newer one done.
    pub generation: i32,
    pub created_at: DateTime<Utc>,
}

/// What a successful delivery leaves behind, committed with the message's finish: a card
/// whose reference was saved was also audited and marked done, never only some of these.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeliveryRecord {
    /// Where a newly posted chat message lives, so later changes update it in place.
    pub chat_message: Option<Value>,
    /// The `delivered` audit event (a card's first post, each webhook).
    pub audit: Option<NewAuditEvent>,
}

/// How an attempt at an outbox message ended.
#[derive(Clone, Debug, PartialEq)]
pub enum OutboxOutcome {
    /// Done; what goes with it is recorded in the same transaction.
    Delivered(DeliveryRecord),
    /// Failed; try again at `at` (counts as an attempt).
    Retry { at: DateTime<Utc>, error: String },
    /// Not attempted (rate limit); try at `at`.
    Defer { at: DateTime<Utc> },
    /// Will never succeed (e.g. 410 Gone); stop.
    Abandon { error: String },
}

/// A due, unleased outbox message a worker may claim: one of the first few of its
/// (destination, agent) queue. Reading candidates takes no lock; `claim_outbox` does.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxCandidate {
    pub id: i64,
    pub kind: OutboxKind,
    pub destination: String,
    /// The agent whose request it reports, for round-robin across agents.
    pub agent: String,
    pub available_at: DateTime<Utc>,
}

/// Which candidates to read.
#[derive(Clone, Debug)]
pub struct CandidateQuery<'a> {
    /// Destinations to leave out (paced channels with no token to spend now).
    pub skip: &'a [String],
    /// Webhook receiver hosts to leave out (`receiver_host`: at their cap in flight).
    pub skip_hosts: &'a [String],
    /// At most this many from each (destination, agent) queue, oldest first.
    pub per_queue: i64,
    /// At most this many in all, oldest first.
    pub limit: i64,
}

/// Pending outbox messages by kind, and the oldest one's age.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutboxBacklog {
    pub by_kind: Vec<(String, i64)>,
}

/// A stored request changes only through this: compare-and-set on (id, status, revision,
/// version), together with its audit events and outbox messages, in one transaction.
#[derive(Debug)]
pub struct RequestChange<'a> {
    /// The new state; its `version` must be `expected_version + 1`.
    pub request: &'a ApprovalRequest,
    pub expected_status: Status,
    pub expected_revision: u32,
    pub expected_version: i64,
    pub audit: Vec<NewAuditEvent>,
    pub outbox: Vec<NewOutboxMessage>,
}

/// What reserving an Idempotency-Key found.
#[derive(Clone, Debug, PartialEq)]
pub enum Reservation {
    /// The key is ours now; complete it with the insert or release it.
    Reserved,
    /// Another request with this key is being processed.
    InFlight,
    /// Already answered: the stored response.
    Completed { body_hash: String, response: Value },
}

/// One attempt at a submission with an Idempotency-Key.
#[derive(Clone, Debug)]
pub struct IdempotencyKey {
    pub agent: String,
    pub key: String,
    pub body_hash: String,
    /// This attempt's fencing token. A reservation abandoned long enough is taken over by a
    /// later attempt with a new token; the owner of an older token can then neither commit
    /// a request under the key nor release it, however late it wakes up.
    pub token: String,
}

impl IdempotencyKey {
    /// A new attempt, with a random fencing token.
    pub fn new(
        agent: impl Into<String>,
        key: impl Into<String>,
        body_hash: impl Into<String>,
    ) -> Self {
        Self {
            agent: agent.into(),
            key: key.into(),
            body_hash: body_hash.into(),
            token: format!("{:032x}", rand::random::<u128>()),
        }
    }
}

/// A request's creation: the row, its audit events, outbox messages and the answer kept
/// for its Idempotency-Key, in one transaction.
#[derive(Debug)]
pub struct NewRequest<'a> {
    pub request: &'a ApprovalRequest,
    pub audit: Vec<NewAuditEvent>,
    pub outbox: Vec<NewOutboxMessage>,
    pub idempotency: Option<(&'a IdempotencyKey, Value)>,
}

/// What a judged intake reads under its (agent, action) serialisation before it decides:
/// one counter per entry (`field: None` counts, `Some` sums `args.field`) over requests
/// created after `since`, and, when `grants`, the active grants for this agent and action.
#[derive(Clone, Debug)]
pub struct IntakeLookup {
    pub agent: String,
    pub action: String,
    pub now: DateTime<Utc>,
    pub counters: Vec<(Option<String>, DateTime<Utc>)>,
    pub grants: bool,
}

/// What the lookup found: counter values in `IntakeLookup::counters` order, active grants.
#[derive(Clone, Debug, Default)]
pub struct IntakeFacts {
    pub counters: Vec<f64>,
    pub grants: Vec<Grant>,
}

/// A request judged with `IntakeFacts`, ready to insert; `grant_used` is spent in the same
/// transaction.
#[derive(Debug)]
pub struct JudgedRequest {
    pub request: ApprovalRequest,
    pub audit: Vec<NewAuditEvent>,
    pub outbox: Vec<NewOutboxMessage>,
    pub idempotency: Option<(IdempotencyKey, Value)>,
    pub grant_used: Option<GrantUse>,
}

/// One use of a grant by a judged request.
#[derive(Clone, Debug, PartialEq)]
pub struct GrantUse {
    pub grant_id: String,
    /// The spend's compare-and-set keeps `uses_left` at or above this: the uses a lowered
    /// `max_uses` takes away (concurrent intakes must not spend past the current cap).
    pub uses_left_floor: u32,
}

/// Decides a request from what its lookup found; pure, run inside the transaction (again,
/// if a group's transaction fails and each is retried alone). An error (`Corrupt`: the
/// request could not be built) refuses that request only.
pub type Judge = Box<dyn Fn(IntakeFacts) -> StoreResult<JudgedRequest> + Send + Sync>;

/// Time-driven work the sweeper looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    Expiry,
    Reminder,
    Escalation,
}

impl Due {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Due::Expiry => "expiry",
            Due::Reminder => "reminder",
            Due::Escalation => "escalation",
        }
    }
}

/// Which requests to list.
#[derive(Clone, Debug, Default)]
pub struct RequestFilter {
    pub status: Option<Status>,
    pub agent: Option<String>,
    pub limit: i64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies pending migrations. When every migration is already applied it changes
    /// nothing and needs no DDL rights, so a runtime role without them can start.
    async fn migrate(&self) -> StoreResult<()>;
    /// A trivial query, for readiness.
    async fn ping(&self) -> StoreResult<()>;

    async fn create_agent(&self, agent: &AgentRecord, audit: NewAuditEvent) -> StoreResult<()>;
    async fn agent_by_key_hash(&self, api_key_hash: &str) -> StoreResult<Option<AgentRecord>>;
    async fn agent(&self, name: &str) -> StoreResult<Option<AgentRecord>>;
    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>>;
    /// Returns false when no active agent has that name.
    async fn revoke_agent(&self, name: &str, audit: NewAuditEvent) -> StoreResult<bool>;

    async fn insert_request(&self, new: NewRequest<'_>) -> StoreResult<()>;
    /// Reads `lookup` and inserts what `judge` makes of it, in one transaction serialised
    /// per (agent, action): counters and grant uses are exact under concurrency.
    async fn insert_judged_request(
        &self,
        lookup: IntakeLookup,
        judge: Judge,
    ) -> StoreResult<ApprovalRequest>;
    /// Every grant (spent, expired and revoked too), of one agent or all, newest first.
    async fn list_grants(&self, agent: Option<&str>) -> StoreResult<Vec<Grant>>;
    async fn grant(&self, id: &str) -> StoreResult<Option<Grant>>;
    /// Marks the grant revoked at `at` with its audit event; false when already revoked.
    async fn revoke_grant(
        &self,
        id: &str,
        at: DateTime<Utc>,
        audit: NewAuditEvent,
    ) -> StoreResult<bool>;
    async fn request(&self, id: &str) -> StoreResult<Option<ApprovalRequest>>;
    /// `Err(Conflict)` when the stored request is no longer at the expected state.
    async fn update_request(&self, change: RequestChange<'_>) -> StoreResult<()>;
    async fn list_requests(&self, filter: &RequestFilter) -> StoreResult<Vec<ApprovalRequest>>;
    async fn pending_count(&self) -> StoreResult<i64>;
    /// Pending requests of one agent (an index range over just those).
    async fn pending_count_of_agent(&self, agent: &str) -> StoreResult<i64>;
    /// Pending requests whose expiry, reminder or escalation is due, oldest first.
    async fn due_request_ids(
        &self,
        due: Due,
        now: DateTime<Utc>,
        limit: i64,
    ) -> StoreResult<Vec<String>>;

    /// Reserves the key for this attempt (`key.token`), taking over a reservation left in
    /// flight since before `now` minus a minute. A request inserted with the key commits
    /// only while the key still holds this attempt's token (else `IdempotencyKeyTakenOver`).
    async fn reserve_idempotency_key(
        &self,
        key: &IdempotencyKey,
        now: DateTime<Utc>,
    ) -> StoreResult<Reservation>;
    /// Frees the key if this attempt (`key.token`) still holds it unanswered.
    async fn release_idempotency_key(&self, key: &IdempotencyKey) -> StoreResult<()>;
    /// Forgets keys created before `before` (answered, or abandoned in flight); returns how many.
    async fn purge_idempotency_keys(&self, before: DateTime<Utc>) -> StoreResult<u64>;

    /// Audit events with `seq > after`, in order, at most `limit`.
    async fn audit_events(&self, after: i64, limit: i64) -> StoreResult<Vec<AuditEvent>>;
    /// Those of `request_ids` that are no longer pending (primary-key lookups).
    async fn decided_among(&self, request_ids: &[String]) -> StoreResult<Vec<String>>;
    async fn latest_audit_seq(&self) -> StoreResult<i64>;
    /// The last audit event's `(seq, hash)`; `None` while the trail is empty.
    async fn audit_head(&self) -> StoreResult<Option<(i64, String)>>;
    /// Appends events that go with no other change.
    async fn append_audit(&self, events: Vec<NewAuditEvent>) -> StoreResult<()>;

    /// Request ids pushed the moment another process commits a decision (PostgreSQL
    /// LISTEN/NOTIFY); `None` where the backend has no such channel and must be polled.
    async fn finalized_notifications(&self) -> StoreResult<Option<Notifications>>;

    /// Outbox messages still pending, for operators and tests.
    async fn pending_outbox(&self, limit: i64) -> StoreResult<Vec<OutboxMessage>>;
    /// The first due, unleased messages of each (destination, agent) queue (a loose index
    /// scan over the queues, then an index range each), oldest first.
    async fn outbox_candidates(
        &self,
        now: DateTime<Utc>,
        query: &CandidateQuery<'_>,
    ) -> StoreResult<Vec<OutboxCandidate>>;
    /// Leases those of `ids` still due and unleased until `lease_until`; on PostgreSQL with
    /// `FOR UPDATE SKIP LOCKED`, so replicas never take the same message.
    async fn claim_outbox(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        ids: &[i64],
    ) -> StoreResult<Vec<OutboxMessage>>;
    /// Extends the leases of messages whose delivery is still running; finished ones are
    /// left alone. Returns how many were extended.
    async fn renew_outbox_leases(
        &self,
        ids: &[i64],
        lease_until: DateTime<Utc>,
    ) -> StoreResult<u64>;
    async fn finish_outbox(
        &self,
        message: &OutboxMessage,
        outcome: OutboxOutcome,
    ) -> StoreResult<()>;
    async fn outbox_backlog(&self) -> StoreResult<OutboxBacklog>;

    /// Where the card for `request_id` was posted at `destination`, if it was.
    async fn chat_message(&self, request_id: &str, destination: &str)
        -> StoreResult<Option<Value>>;

    /// Records where a chat platform said a conversation is reached.
    async fn record_conversation_endpoint(
        &self,
        endpoint: &ConversationEndpoint,
    ) -> StoreResult<()>;
    /// Where `destination` was last said to be reached, if ever.
    async fn conversation_endpoint(
        &self,
        destination: &str,
    ) -> StoreResult<Option<ConversationEndpoint>>;
}

/// Where a chat platform said a conversation (`destination`, as routes name it) is reached:
/// the base URL of its API for that conversation, and the tenant it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationEndpoint {
    pub destination: String,
    pub service_url: String,
    pub tenant: Option<String>,
}

/// The host and port a webhook goes to (`host:port`), what the per-host cap of deliveries
/// in flight counts; stored with each webhook row.
pub fn receiver_host(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => format!(
            "{}:{}",
            parsed.host_str().unwrap_or_default(),
            parsed.port_or_known_default().unwrap_or_default()
        ),
        Err(_) => url.to_string(),
    }
}

/// Opens the database named by the config; does not migrate.
pub async fn connect(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let url = config.database_url.expose();
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(config).await?))
    } else {
        Ok(Arc::new(PostgresStore::connect(config).await?))
    }
}
