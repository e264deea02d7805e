//! The use cases, one file each (ARCHITECTURE.md): `agents`, `submit`, `requests` (reads
//! and long-polls), `vote` (approve, deny, modify), `lifecycle` (cancel, execute, expire,
//! remind, escalate) and `audit_trail`. Every change to a stored request goes through
//! `Engine::transition`: planned on a copy of the request, stored with a compare-and-set
//! together with its audit events and outbox messages in one transaction, re-planned on
//! fresh state when another change won.

mod agents;
mod audit_trail;
mod clock;
mod grants;
mod lifecycle;
mod outbox;
mod outbox_signal;
mod requests;
mod submit;
mod vote;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::audit::NewAuditEvent;
use crate::callbacks::CallbackGuard;
use crate::domain::{
    mask_value, ApprovalRequest, AuditKind, Decision, Mask, OutboxKind, RedactPath, RedactRoot,
    Status, VoteRefusal,
};
use crate::policy::{Policy, PolicyError};
use crate::quota::{QuotaExceeded, Quotas};
use crate::store::{AgentRecord, NewOutboxMessage, RequestChange, Store, StoreError};
use crate::telemetry;

pub use agents::{hash_api_key, AgentCredentials};
pub use clock::{Clock, ManualClock, SystemClock};
pub use lifecycle::{IDEMPOTENCY_KEY_LIFETIME, SWEEP_BATCH};
pub use outbox_signal::OutboxSignal;
pub use submit::{Submission, Submitted};

use requests::Waiters;

/// How often one change is re-planned after losing a compare-and-set. Each loss means
/// another change won, and a request takes at most `approvals + 1` winning changes to end.
const MAX_ATTEMPTS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("request not found")]
    NotFound,
    #[error(transparent)]
    Refused(#[from] VoteRefusal),
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    /// The key is unknown or its agent revoked.
    #[error("invalid or revoked API key")]
    Unauthorized,
    /// A per-agent quota: answered 429.
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type EngineResult<T> = Result<T, EngineError>;

#[derive(Clone)]
pub struct Engine {
    store: Arc<dyn Store>,
    policy: Arc<ArcSwap<Policy>>,
    clock: Arc<dyn Clock>,
    waiters: Waiters,
    /// Wakes the local outbox worker after a commit that wrote outbox messages.
    outbox_signal: Arc<OutboxSignal>,
    /// Turns true when the server stops: long-polls answer at once instead of holding it up.
    stopping: watch::Sender<bool>,
    /// Agents that submitted lately, by API-key hash: a submission needs no read to know
    /// its agent. Safe because the database refuses a revoked agent's request at insert.
    submitters: Arc<Mutex<HashMap<String, AgentRecord>>>,
    /// Where agents' callback URLs may point (`callback_allowed_networks`).
    callbacks: Arc<CallbackGuard>,
    /// Per-agent limits at intake and on long-polls.
    quotas: Arc<Quotas>,
}

/// What a use case makes of the request as it stands now (see `Engine::transition`).
// One lives at a time, for the moment between planning and storing: boxing would only add
// an allocation per change.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Planned<T> {
    /// Store `next` (from `ApprovalRequest::successor`) in place of what was read, with
    /// these audit events and outbox messages; then answer `answer`.
    Commit {
        next: ApprovalRequest,
        audit: Vec<NewAuditEvent>,
        outbox: Vec<NewOutboxMessage>,
        answer: T,
    },
    /// Nothing to change: answer this.
    Unchanged(T),
}

impl Engine {
    pub fn new(store: Arc<dyn Store>, policy: Policy) -> Self {
        Self {
            store,
            policy: Arc::new(ArcSwap::from_pointee(policy)),
            clock: Arc::new(SystemClock),
            waiters: Waiters::default(),
            outbox_signal: Arc::default(),
            stopping: watch::channel(false).0,
            submitters: Arc::default(),
            callbacks: Arc::default(),
            quotas: Arc::new(Quotas::unlimited()),
        }
    }

    /// Callback URLs may reach these non-public networks; by default none.
    pub fn with_callback_guard(mut self, guard: CallbackGuard) -> Self {
        self.callbacks = Arc::new(guard);
        self
    }

    pub fn callback_guard(&self) -> &CallbackGuard {
        &self.callbacks
    }

    /// Enforces these per-agent quotas (without, there are none).
    pub fn with_quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = Arc::new(quotas);
        self
    }

    /// Reads time from `clock` (tests move a `ManualClock`) instead of the system clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The engine's time: expiry, reminders, escalation and outbox schedules all use it.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Answers every long-poll now with the request as it stands; the agent polls again
    /// (another replica, or this one after restart).
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
    }

    pub fn outbox_signal(&self) -> Arc<OutboxSignal> {
        self.outbox_signal.clone()
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Replaces the policy atomically; a policy that does not validate is refused and the
    /// current one stays.
    pub fn reload_policy(&self, path: &Path) -> anyhow::Result<Arc<Policy>> {
        let policy = Arc::new(load_policy(path)?);
        self.policy.store(policy.clone());
        tracing::info!(policy_hash = policy.hash(), "policy reloaded");
        Ok(policy)
    }

    /// The one way a stored request changes. Reads request `id` (only if `agent` made it,
    /// when given), lets `plan` decide on it (without I/O: what it needs is read first), and stores the planned change with a
    /// compare-and-set on (id, status, revision, version), its audit events and outbox
    /// messages in one transaction. When another change won in between, reads again and
    /// re-plans: the plan always judges the state it replaces.
    pub(crate) async fn transition<T>(
        &self,
        id: &str,
        agent: Option<&str>,
        mut plan: impl FnMut(&ApprovalRequest) -> EngineResult<Planned<T>>,
    ) -> EngineResult<T> {
        for _ in 0..MAX_ATTEMPTS {
            let current = match agent {
                Some(agent) => self.request_for_agent(agent, id).await?,
                None => self.request(id).await?,
            };
            let (next, audit, outbox, answer) = match plan(&current)? {
                Planned::Unchanged(answer) => return Ok(answer),
                Planned::Commit {
                    next,
                    audit,
                    outbox,
                    answer,
                } => (next, audit, outbox, answer),
            };
            debug_assert_eq!(next.version, current.version + 1, "plan from successor()");
            let destinations = OutboxSignal::destinations_of(&outbox);
            let stored = self
                .store
                .update_request(RequestChange {
                    request: &next,
                    expected_status: current.status,
                    expected_revision: current.revision,
                    expected_version: current.version,
                    audit,
                    outbox,
                })
                .await;
            match stored {
                Ok(()) => {
                    if next.status != current.status {
                        self.waiters.wake(&next.id);
                        record_decision_metrics(&next);
                    }
                    self.outbox_signal.wake(destinations);
                    return Ok(answer);
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(EngineError::Conflict {
            code: "contended",
            message: "the request changed too many times concurrently; retry".into(),
        })
    }

    /// One message of `kind` per card destination of the request: its tier's route, the
    /// escalation destinations once escalated, and the routes it moved up from.
    fn card_messages(
        &self,
        request: &ApprovalRequest,
        kind: OutboxKind,
        payload: Value,
        at: DateTime<Utc>,
    ) -> Vec<NewOutboxMessage> {
        self.policy()
            .card_destinations(request)
            .into_iter()
            .map(|destination| NewOutboxMessage {
                request_id: request.id.clone(),
                kind,
                destination,
                payload: payload.clone(),
                available_at: at,
            })
            .collect()
    }

    /// "Show the current state" on every card of the request.
    fn card_updates(&self, request: &ApprovalRequest, at: DateTime<Utc>) -> Vec<NewOutboxMessage> {
        self.card_messages(request, OutboxKind::Card, json!({}), at)
    }

    /// The audit event and messages that announce a final decision: `decided`, card
    /// updates and the agent's webhook.
    fn announce_final(
        &self,
        request: &ApprovalRequest,
        actor: &str,
        audit: &mut Vec<NewAuditEvent>,
        outbox: &mut Vec<NewOutboxMessage>,
    ) {
        let at = request
            .decision
            .as_ref()
            .map_or_else(|| self.now(), |d| d.at);
        audit.push(decided_event(
            request,
            actor,
            at,
            self.policy().redact_paths(),
        ));
        outbox.extend(webhook_message(request, at));
    }
}

/// Reads and compiles a policy file.
pub fn load_policy(path: &Path) -> anyhow::Result<Policy> {
    let source = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    // Kept as the source, not flattened into text: the admin API answers with the
    // problems alone, without the path.
    Policy::parse(&source).map_err(|error: PolicyError| {
        anyhow::Error::new(error).context(format!("policy {} is invalid", path.display()))
    })
}

/// Counts a final decision and, for requests that waited for people, how long they waited.
fn record_decision_metrics(request: &ApprovalRequest) {
    let tier = telemetry::label(request.tier.as_deref());
    metrics::counter!(telemetry::DECISIONS, "outcome" => request.status.as_str(), "tier" => tier.clone())
        .increment(1);
    if let (Some(decision), Some(_)) = (&request.decision, request.expires_at) {
        let waited = (decision.at - request.created_at).num_milliseconds().max(0) as f64 / 1000.0;
        metrics::histogram!(telemetry::TIME_TO_DECISION, "tier" => tier).record(waited);
    }
}

/// An audit event about `request`.
fn event(
    request: &ApprovalRequest,
    at: DateTime<Utc>,
    kind: AuditKind,
    actor: &str,
    payload: Value,
) -> NewAuditEvent {
    NewAuditEvent {
        at,
        request_id: Some(request.id.clone()),
        kind,
        actor: actor.to_string(),
        payload,
    }
}

fn decided_event(
    request: &ApprovalRequest,
    actor: &str,
    at: DateTime<Utc>,
    redact: &[RedactPath],
) -> NewAuditEvent {
    let decision = request.decision.as_ref().map(|decision| Decision {
        args: audit_args(&decision.args, redact),
        ..decision.clone()
    });
    event(
        request,
        at,
        AuditKind::Decided,
        actor,
        json!({
            "outcome": request.status,
            "decision": decision,
            "action_hash": request.action_hash,
        }),
    )
}

/// Args as the audit trail keeps them: each value at a `redact` path replaced by the
/// SHA-256 of its canonical JSON (the action hash still covers the real values).
fn audit_args(args: &Value, redact: &[RedactPath]) -> Value {
    mask_value(args, RedactRoot::Args, redact, Mask::Hashed)
}

/// The webhook for a request that just became final, if the agent gave a callback URL.
fn webhook_message(request: &ApprovalRequest, at: DateTime<Utc>) -> Option<NewOutboxMessage> {
    let url = request.callback_url.as_ref()?;
    let event_type = match request.status {
        Status::Approved | Status::Denied => "request.decided",
        Status::Expired => "request.expired",
        Status::Cancelled => "request.cancelled",
        Status::Pending => return None,
    };
    Some(NewOutboxMessage {
        request_id: request.id.clone(),
        kind: OutboxKind::Webhook,
        destination: url.clone(),
        payload: json!({
            "type": event_type,
            "timestamp": at,
            "data": request,
        }),
        available_at: at,
    })
}

/// `duration` after `at`, if that is a representable time.
fn after(at: DateTime<Utc>, duration: Duration) -> Option<DateTime<Utc>> {
    chrono::Duration::from_std(duration)
        .ok()
        .and_then(|offset| at.checked_add_signed(offset))
}
