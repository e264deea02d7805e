//! The use cases: submit, vote, modify, cancel, expire, execute. Each change is planned on a
//! copy of the request and stored with a compare-and-set, its audit events and its outbox
//! messages in one transaction; a lost compare-and-set re-plans on fresh state.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{watch, Notify};
use tracing::instrument;

use crate::audit::{AuditEvent, AuditHead, ChainBreak, ChainVerifier, NewAuditEvent};
use crate::callbacks::CallbackGuard;
use crate::channels::card_destinations;
use crate::domain::{
    action_hash, check_voter, new_request_id, now, plan_vote, ApprovalRequest, Execution,
    ExecutionOutcome, Principal, Reevaluation, RequestContext, Status, VoteContext, VoteEffect,
    VoteKind, VoteKindRequested, VoteRefusal, VoteRequest, Voter,
};
use crate::policy::{Effect, EvaluationInput, Policy, PolicyError, Verdict};
use crate::quota::{QuotaExceeded, Quotas};
use crate::store::{
    AgentRecord, Due, IdempotencyKey, NewOutboxMessage, NewRequest, RequestChange, RequestFilter,
    Reservation, Store, StoreError,
};
use crate::telemetry;

/// How often one change is re-planned after losing a compare-and-set. Each loss means
/// another change won, and a request takes at most `approvals + 1` winning changes to end.
const MAX_ATTEMPTS: usize = 64;

/// Due requests a sweep reads at a time.
pub const SWEEP_BATCH: usize = 500;

/// Idempotency-Keys are answered for at least this long (the agent API promises at least 24 h).
pub const IDEMPOTENCY_KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);

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

/// What an agent proposes.
#[derive(Clone, Debug, Serialize)]
pub struct Submission {
    pub action: String,
    pub args: Value,
    pub context: RequestContext,
    pub on_behalf_of: Option<Principal>,
    pub callback_url: Option<String>,
}

/// The answer to a submission: a new request, or the stored answer to an earlier one with
/// the same Idempotency-Key.
#[derive(Debug)]
pub enum Submitted {
    Created(Box<ApprovalRequest>),
    Replayed(Value),
}

/// A new agent's credentials, shown once.
#[derive(Clone, Serialize)]
pub struct AgentCredentials {
    pub agent: String,
    pub api_key: String,
    pub webhook_secret: String,
}

impl std::fmt::Debug for AgentCredentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AgentCredentials")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub struct Engine {
    store: Arc<dyn Store>,
    policy: Arc<ArcSwap<Policy>>,
    waiters: Waiters,
    /// Chat destination kinds (`slack`, ...) that get cards; others in a route are skipped.
    card_channels: Arc<Vec<&'static str>>,
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

/// Wakes the local outbox worker after a commit that wrote outbox messages, and tells it
/// for which destinations: a worker whose only backlog is for channels out of pacing
/// tokens need not look again (each look is a query over that backlog) until one of them
/// has a token or work arrives for another destination.
#[derive(Debug, Default)]
pub struct OutboxSignal {
    notify: Notify,
    destinations: Mutex<HashSet<String>>,
}

impl OutboxSignal {
    pub fn destinations_of(outbox: &[NewOutboxMessage]) -> Vec<String> {
        outbox
            .iter()
            .map(|message| message.destination.clone())
            .collect()
    }

    /// Nothing happens for no destinations: waking the worker for nothing would cost it
    /// a claim query.
    pub fn wake(&self, destinations: Vec<String>) {
        if destinations.is_empty() {
            return;
        }
        self.lock_destinations().extend(destinations);
        self.notify.notify_one();
    }

    /// Waits for the next wake-up.
    pub async fn woken(&self) {
        self.notify.notified().await;
    }

    /// The destinations named since the last call.
    pub fn take_destinations(&self) -> HashSet<String> {
        std::mem::take(&mut *self.lock_destinations())
    }

    fn lock_destinations(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // A set of names: a panic elsewhere cannot leave it half-changed.
        self.destinations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// More cached submitters than this and the cache starts over (agents are few; this only
/// bounds memory).
const SUBMITTER_CACHE_LIMIT: usize = 10_000;

impl Engine {
    pub fn new(store: Arc<dyn Store>, policy: Policy) -> Self {
        Self {
            store,
            policy: Arc::new(ArcSwap::from_pointee(policy)),
            waiters: Waiters::default(),
            card_channels: Arc::new(Vec::new()),
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

    /// Answers every long-poll now with the request as it stands; the agent polls again
    /// (another replica, or this one after restart).
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
    }

    /// Cards go to route destinations of these kinds.
    pub fn with_card_channels(mut self, kinds: Vec<&'static str>) -> Self {
        self.card_channels = Arc::new(kinds);
        self
    }

    pub fn outbox_signal(&self) -> Arc<OutboxSignal> {
        self.outbox_signal.clone()
    }

    /// One "show the current state" message per card destination of the request.
    fn card_messages(&self, request: &ApprovalRequest, at: DateTime<Utc>) -> Vec<NewOutboxMessage> {
        card_destinations(&self.policy(), request, &self.card_channels)
            .into_iter()
            .map(|destination| NewOutboxMessage {
                request_id: request.id.clone(),
                kind: "card",
                destination,
                payload: json!({}),
                available_at: at,
            })
            .collect()
    }

    /// Records in the audit trail that a card was first posted or a webhook delivered.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
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

    // ---- agents -------------------------------------------------------------------------

    #[instrument(skip_all, fields(agent = %name))]
    pub async fn create_agent(
        &self,
        name: &str,
        owners: Vec<Principal>,
    ) -> EngineResult<AgentCredentials> {
        validate_agent_name(name)?;
        let api_key = format!("sk_{}", random_token(32));
        let webhook_secret = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(random_bytes::<24>())
        );
        let at = now();
        let record = AgentRecord {
            name: name.to_string(),
            api_key_hash: hash_api_key(&api_key),
            webhook_secret: webhook_secret.clone(),
            owners: owners.clone(),
            created_at: at,
            revoked_at: None,
        };
        let audit = NewAuditEvent {
            at,
            request_id: None,
            kind: "agent_created",
            actor: "operator".into(),
            payload: json!({"agent": name, "owners": owners}),
        };
        self.store
            .create_agent(&record, audit)
            .await
            .map_err(|error| match error {
                StoreError::Conflict(message) => EngineError::Conflict {
                    code: "agent_exists",
                    message,
                },
                other => other.into(),
            })?;
        Ok(AgentCredentials {
            agent: name.to_string(),
            api_key,
            webhook_secret,
        })
    }

    pub async fn revoke_agent(&self, name: &str) -> EngineResult<()> {
        let audit = NewAuditEvent {
            at: now(),
            request_id: None,
            kind: "agent_revoked",
            actor: "operator".into(),
            payload: json!({"agent": name}),
        };
        if self.store.revoke_agent(name, audit).await? {
            self.forget_submitter(name);
            Ok(())
        } else {
            Err(EngineError::Invalid(format!(
                "no active agent named {name:?}"
            )))
        }
    }

    pub async fn list_agents(&self) -> EngineResult<Vec<AgentRecord>> {
        Ok(self.store.list_agents().await?)
    }

    /// The active agent holding `api_key`, if any.
    pub async fn authenticate_agent(&self, api_key: &str) -> EngineResult<Option<AgentRecord>> {
        let hash = hash_api_key(api_key);
        let agent = self.store.agent_by_key_hash(&hash).await?;
        // The lookup is by hash; compare again in constant time so equality never short-circuits.
        Ok(agent.filter(|agent| bool::from(agent.api_key_hash.as_bytes().ct_eq(hash.as_bytes()))))
    }

    /// `authenticate_agent` for submissions, from the cache of recent submitters when it
    /// can. A revoked agent found there still cannot submit: the insert is refused by the
    /// database, and `submit_request` then answers `Unauthorized` and forgets it.
    pub async fn authenticate_submitter(&self, api_key: &str) -> EngineResult<Option<AgentRecord>> {
        let hash = hash_api_key(api_key);
        let cached = self.lock_submitters().get(&hash).cloned();
        if let Some(agent) = cached {
            return Ok(Some(agent));
        }
        let agent = self.authenticate_agent(api_key).await?;
        if let Some(agent) = &agent {
            let mut submitters = self.lock_submitters();
            if submitters.len() >= SUBMITTER_CACHE_LIMIT {
                submitters.clear();
            }
            submitters.insert(hash, agent.clone());
        }
        Ok(agent)
    }

    /// `Unauthorized` (and forgotten) if `agent` was revoked since it was cached.
    async fn ensure_still_active(&self, agent: &AgentRecord) -> EngineResult<()> {
        let stored = self.store.agent(&agent.name).await?;
        if stored.is_none_or(|stored| stored.revoked_at.is_some()) {
            self.forget_submitter(&agent.name);
            return Err(EngineError::Unauthorized);
        }
        Ok(())
    }

    fn forget_submitter(&self, name: &str) {
        self.lock_submitters().retain(|_, agent| agent.name != name);
    }

    fn lock_submitters(&self) -> std::sync::MutexGuard<'_, HashMap<String, AgentRecord>> {
        // The map is only ever read or replaced whole-entry: a panic elsewhere cannot
        // leave it half-changed.
        self.submitters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    // ---- requests -----------------------------------------------------------------------

    /// Evaluates the policy without storing anything.
    pub fn check(&self, agent: &str, action: &str, args: &Value, context: &Value) -> Verdict {
        self.policy().evaluate(EvaluationInput {
            action,
            args,
            agent,
            context,
        })
    }

    #[instrument(skip_all, fields(agent = %agent.name, action = %submission.action))]
    pub async fn submit_request(
        &self,
        agent: &AgentRecord,
        submission: Submission,
        idempotency_key: Option<String>,
    ) -> EngineResult<Submitted> {
        // First, before any work: a flooding agent costs as little as possible.
        self.quotas.check_rate(&agent.name)?;
        validate_submission(&submission)?;
        if let Some(url) = &submission.callback_url {
            self.callbacks
                .check_url(url)
                .await
                .map_err(|refused| EngineError::Invalid(format!("callback_url: {refused}")))?;
        }
        let key = idempotency_key
            .map(|key| -> EngineResult<IdempotencyKey> {
                if key.is_empty() || key.len() > 255 {
                    return Err(EngineError::Invalid(
                        "Idempotency-Key must be 1 to 255 characters".into(),
                    ));
                }
                Ok(IdempotencyKey::new(
                    agent.name.clone(),
                    key,
                    submission_hash(&submission),
                ))
            })
            .transpose()?;
        if let Some(key) = &key {
            let reservation = self.store.reserve_idempotency_key(key, now()).await?;
            if reservation != Reservation::Reserved {
                // Every answer but a new insert is given without one, so the database
                // cannot refuse it: check here that the (possibly cached) agent is active.
                self.ensure_still_active(agent).await?;
            }
            match reservation {
                Reservation::Reserved => {}
                Reservation::Completed {
                    body_hash,
                    response,
                } if body_hash == key.body_hash => return Ok(Submitted::Replayed(response)),
                Reservation::InFlight => {
                    return Err(EngineError::Conflict {
                        code: "idempotency_in_flight",
                        message: "a request with this Idempotency-Key is still being processed; retry shortly".into(),
                    })
                }
                Reservation::Completed { .. } => {
                    return Err(EngineError::Unprocessable {
                        code: "idempotency_mismatch",
                        message: "this Idempotency-Key was used with a different body".into(),
                    })
                }
            }
        }
        let result = self.create_request(agent, submission, key.as_ref()).await;
        if let Err(EngineError::Store(StoreError::AgentRevoked)) = &result {
            self.forget_submitter(&agent.name);
        }
        let result = result.map_err(|error| match error {
            EngineError::Store(StoreError::AgentRevoked) => EngineError::Unauthorized,
            // This attempt was presumed dead and a retry holds the key now: its answer is
            // the one to wait for.
            EngineError::Store(StoreError::IdempotencyKeyTakenOver) => EngineError::Conflict {
                code: "idempotency_in_flight",
                message: "a later attempt with this Idempotency-Key took it over; retry shortly for its answer".into(),
            },
            other => other,
        });
        if let (Err(_), Some(key)) = (&result, &key) {
            // Free the key so a corrected retry is not stuck behind a failed attempt.
            if let Err(error) = self.store.release_idempotency_key(key).await {
                tracing::warn!(%error, "could not release an Idempotency-Key");
            }
        }
        result.map(|request| Submitted::Created(Box::new(request)))
    }

    async fn create_request(
        &self,
        agent: &AgentRecord,
        submission: Submission,
        key: Option<&IdempotencyKey>,
    ) -> EngineResult<ApprovalRequest> {
        let policy = self.policy();
        let context_value = serde_json::to_value(&submission.context).unwrap_or(Value::Null);
        let verdict = policy.evaluate(EvaluationInput {
            action: &submission.action,
            args: &submission.args,
            agent: &agent.name,
            context: &context_value,
        });
        let at = now();
        let mut request = ApprovalRequest {
            id: new_request_id(),
            agent: agent.name.clone(),
            action_hash: action_hash(&submission.action, &submission.args),
            action: submission.action,
            original_args: submission.args.clone(),
            args: submission.args,
            context: submission.context,
            on_behalf_of: submission.on_behalf_of,
            callback_url: submission.callback_url,
            status: Status::Pending,
            tier: verdict.tier.clone(),
            rule: verdict.rule.clone(),
            approvals_required: verdict.approvals_required,
            revision: 1,
            votes: Vec::new(),
            decision: None,
            policy_hash: policy.hash().to_string(),
            created_at: at,
            expires_at: None,
            executed: None,
            reminded_at: None,
            escalated_at: None,
            remind_at: None,
            escalate_at: None,
            previous_tiers: Vec::new(),
            version: 1,
        };
        let by_policy = Principal::policy_rule(verdict.rule.as_deref().unwrap_or("default"));
        let mut audit = vec![
            event(
                &request,
                at,
                "submitted",
                Principal::agent(&agent.name).as_str(),
                json!({
                    "action": request.action,
                    "args": request.args,
                    "context": request.context,
                    "on_behalf_of": request.on_behalf_of,
                    "action_hash": request.action_hash,
                }),
            ),
            event(
                &request,
                at,
                "verdict",
                by_policy.as_str(),
                json!({
                    "effect": verdict.effect,
                    "tier": verdict.tier,
                    "rule": verdict.rule,
                    "matched": verdict.matches.iter().map(|m| m.rule.as_str()).collect::<Vec<_>>(),
                    "policy_hash": request.policy_hash,
                }),
            ),
        ];
        match verdict.effect {
            Effect::Allow => request.decide(
                Status::Approved,
                vec![by_policy.clone()],
                verdict.reason.clone(),
                at,
            ),
            Effect::Deny => {
                let reason = verdict
                    .reason
                    .clone()
                    .unwrap_or_else(|| match &verdict.rule {
                        Some(rule) => format!("denied by policy rule {rule:?}"),
                        None => "denied by the policy default".to_string(),
                    });
                request.decide(Status::Denied, vec![by_policy.clone()], Some(reason), at);
            }
            Effect::RequireApproval => {
                let ttl = verdict.ttl.unwrap_or(Duration::from_secs(3600));
                let after = |duration: Duration| {
                    chrono::Duration::from_std(duration)
                        .ok()
                        .and_then(|offset| at.checked_add_signed(offset))
                        .context("duration out of range")
                };
                request.expires_at = Some(after(ttl).context("ttl out of range")?);
                if let Some(tier) = verdict.tier.as_deref().and_then(|tier| policy.tier(tier)) {
                    request.remind_at = tier.remind_after.and_then(|delay| after(delay).ok());
                    request.escalate_at = tier.escalate_after.and_then(|delay| after(delay).ok());
                }
            }
        }
        let mut outbox = self.card_messages(&request, at);
        if request.status.is_final() {
            audit.push(decided_event(&request, by_policy.as_str()));
            outbox.extend(webhook_message(&request, at));
        }
        // The answer kept for the Idempotency-Key, if there is one.
        let response = key
            .map(|key| {
                serde_json::to_value(&request)
                    .map(|response| (key, response))
                    .context("serialising the request")
            })
            .transpose()?;
        // Only a request that stays pending counts against the cap; the admission is held
        // until its insert is done (see `Quotas::admit_pending`).
        let admission = if request.status == Status::Pending {
            Some(
                self.quotas
                    .admit_pending(&agent.name, self.store.as_ref())
                    .await??,
            )
        } else {
            None
        };
        // Waking the worker for nothing would cost it a claim query per submission.
        let destinations = OutboxSignal::destinations_of(&outbox);
        self.store
            .insert_request(NewRequest {
                request: &request,
                audit,
                outbox,
                idempotency: response,
            })
            .await?;
        drop(admission);
        self.outbox_signal.wake(destinations);
        metrics::counter!(
            telemetry::REQUESTS,
            "effect" => verdict.effect.as_str(),
            "tier" => telemetry::label(verdict.tier.as_deref()),
            "rule" => telemetry::label(verdict.rule.as_deref()),
        )
        .increment(1);
        if request.status.is_final() {
            record_decision_metrics(&request);
        }
        tracing::info!(request_id = %request.id, status = request.status.as_str(), "request submitted");
        Ok(request)
    }

    /// The request, if `agent` made it: another agent's id is indistinguishable from none.
    pub async fn request_for_agent(&self, agent: &str, id: &str) -> EngineResult<ApprovalRequest> {
        match self.store.request(id).await? {
            Some(request) if request.agent == agent => Ok(request),
            _ => Err(EngineError::NotFound),
        }
    }

    pub async fn request(&self, id: &str) -> EngineResult<ApprovalRequest> {
        self.store.request(id).await?.ok_or(EngineError::NotFound)
    }

    /// Waits up to `timeout` for the request to leave pending; answers the moment a decision
    /// commits in this process or is announced by another.
    pub async fn wait_for_decision(
        &self,
        agent: &str,
        id: &str,
        timeout: Duration,
    ) -> EngineResult<ApprovalRequest> {
        // Held for as long as this long-poll waits.
        let _slot = self.quotas.wait_slot(agent)?;
        // Subscribe before reading, so a decision committed in between is not missed.
        let mut subscription = self.waiters.subscribe(id);
        let mut stopping = self.stopping.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut request = self.request_for_agent(agent, id).await?;
            if request.is_overdue(now()) {
                self.expire_request(id).await?;
                request = self.request_for_agent(agent, id).await?;
            }
            if request.status.is_final() {
                return Ok(request);
            }
            let wake_at = match request.expires_at {
                Some(expiry) => deadline.min(instant_at(expiry)),
                None => deadline,
            };
            if tokio::time::Instant::now() >= deadline || *stopping.borrow() {
                return Ok(request);
            }
            tracing::debug!(request_id = %id, "long-poll waiting for a decision");
            tokio::select! {
                _ = subscription.changed() => {}
                _ = stopping.changed() => {}
                _ = tokio::time::sleep_until(wake_at) => {
                    if tokio::time::Instant::now() >= deadline {
                        return self.request_for_agent(agent, id).await;
                    }
                }
            }
        }
    }

    /// Wakes local long-polls on `id`: its decision was committed (here or elsewhere).
    pub fn announce_decision(&self, id: &str) {
        self.waiters.wake(id);
    }

    /// The requests this process's long-polls are waiting on.
    pub fn awaited_request_ids(&self) -> Vec<String> {
        self.waiters.request_ids()
    }

    pub async fn list_requests(&self, filter: RequestFilter) -> EngineResult<Vec<ApprovalRequest>> {
        Ok(self.store.list_requests(&filter).await?)
    }

    /// What the engine needs to judge `voter` (already identified through the policy's
    /// `people`) on `request`: eligibility in its tier under the current policy, whether
    /// they are its requester or an owner of its agent, and whether their email matters
    /// but could not be read.
    async fn vote_context<'a>(
        &self,
        policy: &Policy,
        request: &ApprovalRequest,
        voter: &'a Voter,
        seen_revision: Option<u32>,
    ) -> EngineResult<VoteContext<'a>> {
        let tier = request.tier.as_deref().and_then(|tier| policy.tier(tier));
        let eligible = tier.is_some_and(|tier| tier.approvers.admits(voter));
        let owners = self
            .store
            .agent(&request.agent)
            .await?
            .map(|agent| agent.owners)
            .unwrap_or_default();
        let is_owner = owners.iter().any(|owner| voter.is(owner));
        let is_requester = is_owner
            || request
                .on_behalf_of
                .as_ref()
                .is_some_and(|requester| voter.is(requester));
        // Separation of duties fails closed: where anyone is named by email, a voter whose
        // email is unknown could be the requester, an owner or someone else entirely.
        let by_email = |principal: &Principal| principal.kind() == "email";
        let names_people_by_email = owners.iter().any(by_email)
            || request.on_behalf_of.as_ref().is_some_and(by_email)
            || tier.is_some_and(|tier| {
                tier.approvers
                    .principals
                    .iter()
                    .any(|approver| approver.starts_with("email:"))
            })
            || policy.people().names_anyone_by_email();
        Ok(VoteContext {
            principal: &voter.principal,
            aliases: &voter.aliases,
            eligible,
            is_requester,
            email_unreadable: voter.email_unreadable && names_people_by_email,
            seen_revision,
            modification: None,
            now: now(),
        })
    }

    /// Could `voter` cast this kind of vote on `id`, at the revision they saw, now? Lets a
    /// channel refuse at the click instead of after asking for a reason or new args.
    pub async fn check_voter(
        &self,
        id: &str,
        voter: &Voter,
        kind: VoteKindRequested,
        seen_revision: Option<u32>,
    ) -> EngineResult<ApprovalRequest> {
        let policy = self.policy();
        let voter = policy.identify(voter);
        let request = self.request(id).await?;
        let context = self
            .vote_context(&policy, &request, &voter, seen_revision)
            .await?;
        check_voter(&request, kind, &context)?;
        Ok(request)
    }

    /// May `voter` see `request` in chat? Approvers of its tier (or a tier it moved up
    /// from), its requester and the agent's owners may; nobody else.
    pub async fn may_view(&self, request: &ApprovalRequest, voter: &Voter) -> EngineResult<bool> {
        let policy = self.policy();
        let voter = policy.identify(voter);
        let approver = request
            .tier
            .iter()
            .chain(&request.previous_tiers)
            .any(|tier| policy.admits(tier, &voter));
        let context = self.vote_context(&policy, request, &voter, None).await?;
        Ok(approver || context.is_requester)
    }

    /// What the policy says of `args` as the new args of `request`: a deny refuses the
    /// modification; a higher tier moves the request up; it never moves down.
    fn reevaluate(
        &self,
        policy: &Policy,
        request: &ApprovalRequest,
        args: &Value,
        voter: &Voter,
    ) -> Reevaluation {
        let context = serde_json::to_value(&request.context).unwrap_or(Value::Null);
        let verdict = policy.evaluate(EvaluationInput {
            action: &request.action,
            args,
            agent: &request.agent,
            context: &context,
        });
        // The new args are judged by the policy in force: the tier's quorum as it is now,
        // if a reload raised it.
        let same_tier = Reevaluation::SameTier {
            approvals_required: request
                .tier
                .as_deref()
                .and_then(|tier| policy.tier(tier))
                .map_or(request.approvals_required, |tier| {
                    tier.approvals.max(request.approvals_required)
                }),
        };
        match verdict.effect {
            Effect::Deny => Reevaluation::Denied {
                reason: verdict
                    .reason
                    .clone()
                    .unwrap_or_else(|| "the policy denies these args".into()),
                rule: verdict.rule,
            },
            Effect::RequireApproval => {
                let rank = |tier: Option<&str>| tier.and_then(|tier| policy.tier_rank(tier));
                match verdict.tier {
                    Some(tier) if rank(Some(&tier)) > rank(request.tier.as_deref()) => {
                        Reevaluation::MovesUp {
                            modifier_eligible: policy.admits(&tier, voter),
                            tier,
                            rule: verdict.rule,
                            approvals_required: verdict.approvals_required,
                        }
                    }
                    _ => same_tier,
                }
            }
            Effect::Allow => same_tier,
        }
    }

    /// Approve, deny or modify, under the decision rules (ARCHITECTURE.md). `seen_revision`
    /// is the revision the voter was shown; a vote on any other is refused.
    #[instrument(skip_all, fields(request_id = %id, principal = %voter.principal))]
    pub async fn record_vote(
        &self,
        id: &str,
        voter: &Voter,
        vote: VoteRequest,
        seen_revision: Option<u32>,
    ) -> EngineResult<(ApprovalRequest, VoteEffect)> {
        let principal = &voter.principal;
        let policy = self.policy();
        let voter = policy.identify(voter);
        for _ in 0..MAX_ATTEMPTS {
            let current = self.request(id).await?;
            let mut context = self
                .vote_context(&policy, &current, &voter, seen_revision)
                .await?;
            let at = context.now;
            // The new args go through the policy again, but only for someone who may
            // modify: others learn nothing of the policy from a refusal.
            let reevaluation = match &vote {
                VoteRequest::Modify { args, .. } => {
                    match check_voter(&current, VoteKindRequested::Modify, &context) {
                        Ok(()) => Some(self.reevaluate(&policy, &current, args, &voter)),
                        Err(VoteRefusal::Expired) => {
                            self.expire_request(id).await?;
                            return Err(VoteRefusal::Expired.into());
                        }
                        Err(refusal) => return Err(refusal.into()),
                    }
                }
                _ => None,
            };
            context.modification = reevaluation.as_ref();
            let mut next = current.clone();
            let effect = match plan_vote(&mut next, vote.clone(), context) {
                Ok(effect) => effect,
                Err(VoteRefusal::Expired) => {
                    self.expire_request(id).await?;
                    return Err(VoteRefusal::Expired.into());
                }
                Err(refusal) => return Err(refusal.into()),
            };
            if next.tier != current.tier {
                self.schedule_follow_ups(&policy, &mut next);
            }
            if next.revision != current.revision {
                // The policy that judged the new args.
                next.policy_hash = policy.hash().to_string();
            }
            next.version += 1;
            let mut audit = Vec::new();
            match &vote {
                VoteRequest::Modify { note, .. } => audit.push(event(
                    &next,
                    at,
                    "modified",
                    principal.as_str(),
                    json!({
                        "revision": next.revision,
                        "previous_args": current.args,
                        "args": next.args,
                        "action_hash": next.action_hash,
                        "note": note,
                        "tier": next.tier,
                        "previous_tier": current.tier,
                        "approvals_required": next.approvals_required,
                        "policy_hash": next.policy_hash,
                        "counts_as_approval": next.votes.last().is_some_and(|vote| vote.vote == VoteKind::Approve),
                        "channel": voter.channel,
                    }),
                )),
                VoteRequest::Approve { note } => audit.push(event(
                    &next,
                    at,
                    "vote",
                    principal.as_str(),
                    json!({
                        "vote": "approve", "note": note, "revision": next.revision,
                        "channel": voter.channel,
                    }),
                )),
                VoteRequest::Deny { reason } => audit.push(event(
                    &next,
                    at,
                    "vote",
                    principal.as_str(),
                    json!({
                        "vote": "deny", "reason": reason.trim(), "revision": next.revision,
                        "channel": voter.channel,
                    }),
                )),
            }
            let mut outbox = self.card_messages(&next, at);
            if let VoteEffect::Decided(_) = effect {
                audit.push(decided_event(&next, principal.as_str()));
                outbox.extend(webhook_message(&next, at));
            }
            match self.commit_change(&current, &next, audit, outbox).await {
                Ok(()) => return Ok((next, effect)),
                Err(EngineError::Store(StoreError::Conflict(_))) => continue,
                Err(error) => return Err(error),
            }
        }
        Err(too_contended())
    }

    /// After a move to another tier: reminders and escalation as that tier has them,
    /// counted from the submission, unless they already happened.
    fn schedule_follow_ups(&self, policy: &Policy, request: &mut ApprovalRequest) {
        let Some(tier) = request.tier.as_deref().and_then(|tier| policy.tier(tier)) else {
            return;
        };
        let after = |delay: Option<Duration>| {
            delay
                .and_then(|delay| chrono::Duration::from_std(delay).ok())
                .and_then(|delay| request.created_at.checked_add_signed(delay))
        };
        if request.reminded_at.is_none() {
            request.remind_at = after(tier.remind_after);
        }
        if request.escalated_at.is_none() {
            request.escalate_at = after(tier.escalate_after);
        }
    }

    /// The agent withdraws a pending request.
    #[instrument(skip_all, fields(request_id = %id))]
    pub async fn cancel_request(&self, agent: &str, id: &str) -> EngineResult<ApprovalRequest> {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.request_for_agent(agent, id).await?;
            if current.status != Status::Pending {
                return Err(VoteRefusal::NotPending(current.status).into());
            }
            let at = now();
            let actor = Principal::agent(agent);
            let mut next = current.clone();
            next.decide(
                Status::Cancelled,
                vec![actor.clone()],
                Some("cancelled by the agent".into()),
                at,
            );
            next.version += 1;
            let audit = vec![event(&next, at, "cancelled", actor.as_str(), json!({}))];
            let mut outbox = self.card_messages(&next, at);
            outbox.extend(webhook_message(&next, at));
            match self.commit_change(&current, &next, audit, outbox).await {
                Ok(()) => return Ok(next),
                Err(EngineError::Store(StoreError::Conflict(_))) => continue,
                Err(error) => return Err(error),
            }
        }
        Err(too_contended())
    }

    /// The agent reports it executed an approved request: accepted once, which consumes the approval.
    #[instrument(skip_all, fields(request_id = %id))]
    pub async fn record_execution(
        &self,
        agent: &str,
        id: &str,
        outcome: ExecutionOutcome,
        detail: Value,
    ) -> EngineResult<ApprovalRequest> {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.request_for_agent(agent, id).await?;
            if current.status != Status::Approved {
                return Err(EngineError::Conflict {
                    code: "not_approved",
                    message: format!(
                        "only approved requests can be executed; this one is {}",
                        current.status.as_str()
                    ),
                });
            }
            if current.executed.is_some() {
                return Err(EngineError::Conflict {
                    code: "already_executed",
                    message: "this approval was already used".into(),
                });
            }
            let at = now();
            let mut next = current.clone();
            next.executed = Some(Execution {
                outcome,
                detail: detail.clone(),
                at,
            });
            next.version += 1;
            let audit = vec![event(
                &next,
                at,
                "executed",
                Principal::agent(agent).as_str(),
                json!({
                    "outcome": outcome, "detail": detail, "action_hash": next.action_hash,
                }),
            )];
            match self.commit_change(&current, &next, audit, Vec::new()).await {
                Ok(()) => return Ok(next),
                Err(EngineError::Store(StoreError::Conflict(_))) => continue,
                Err(error) => return Err(error),
            }
        }
        Err(too_contended())
    }

    /// Expires `id` if it is pending past its expiry. Returns whether this call expired it.
    #[instrument(skip_all, fields(request_id = %id))]
    pub async fn expire_request(&self, id: &str) -> EngineResult<bool> {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.request(id).await?;
            let at = now();
            if !current.is_overdue(at) {
                return Ok(false);
            }
            let mut next = current.clone();
            let reason = format!(
                "no decision before {}",
                current
                    .expires_at
                    .map(|expiry| expiry.to_rfc3339())
                    .unwrap_or_default()
            );
            next.decide(
                Status::Expired,
                vec![Principal::system("expiry")],
                Some(reason),
                at,
            );
            next.version += 1;
            let audit = vec![event(
                &next,
                at,
                "expired",
                "system:expiry",
                json!({
                    "expires_at": current.expires_at,
                }),
            )];
            let mut outbox = self.card_messages(&next, at);
            outbox.extend(webhook_message(&next, at));
            match self.commit_change(&current, &next, audit, outbox).await {
                Ok(()) => return Ok(true),
                Err(EngineError::Store(StoreError::Conflict(_))) => continue,
                Err(error) => return Err(error),
            }
        }
        Err(too_contended())
    }

    /// Expires every overdue pending request; returns how many this call expired.
    pub async fn expire_overdue(&self) -> EngineResult<usize> {
        self.sweep_due(Due::Expiry).await
    }

    /// Does the time-driven work that has fallen due (expiries, reminders or escalations);
    /// returns how many requests this call changed. Every replica may run it: each change is
    /// a compare-and-set, so each is done once.
    ///
    /// A request that fails (unreadable, say) is logged, counted and passed over: it stays
    /// due, first in line for the next sweep, but never holds up the ones behind it.
    #[instrument(skip_all, fields(due = ?due))]
    pub async fn sweep_due(&self, due: Due) -> EngineResult<usize> {
        let mut changed = 0;
        // Ids this sweep tried and left due (failed, or not changed): later batches ask for
        // that many more and skip them. A changed request is no longer due.
        let mut passed_over: HashSet<String> = HashSet::new();
        loop {
            let limit = SWEEP_BATCH + passed_over.len();
            let ids = self
                .store
                .due_request_ids(due, now(), i64::try_from(limit).unwrap_or(i64::MAX))
                .await?;
            let fetched = ids.len();
            let fresh: Vec<String> = ids
                .into_iter()
                .filter(|id| !passed_over.contains(id))
                .collect();
            // Nothing new: only what was passed over is left (a whole batch may fail).
            if fresh.is_empty() {
                return Ok(changed);
            }
            for id in fresh {
                let done = match due {
                    Due::Expiry => self.expire_request(&id).await,
                    Due::Reminder => self.remind_request(&id).await,
                    Due::Escalation => self.escalate_request(&id).await,
                };
                match done {
                    Ok(true) => changed += 1,
                    Ok(false) => {
                        passed_over.insert(id);
                    }
                    Err(error) => {
                        tracing::warn!(request_id = %id, ?due, %error, "sweep could not handle a due request; going on with the others");
                        metrics::counter!(telemetry::SWEEP_FAILURES, "due" => due.as_str())
                            .increment(1);
                        passed_over.insert(id);
                    }
                }
            }
            if fetched < limit {
                return Ok(changed);
            }
        }
    }

    /// Reminds the approvers of a request still pending past its tier's `remind_after`, in
    /// the thread of each card. Returns whether this call did it.
    #[instrument(skip_all, fields(request_id = %id))]
    pub async fn remind_request(&self, id: &str) -> EngineResult<bool> {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.request(id).await?;
            let at = now();
            if current.status != Status::Pending || current.remind_at.is_none_or(|due| due > at) {
                return Ok(false);
            }
            let mut next = current.clone();
            next.remind_at = None;
            next.reminded_at = Some(at);
            next.version += 1;
            let approvers = self.approver_names(&current);
            let audit = vec![event(
                &next,
                at,
                "reminded",
                "system:sweeper",
                json!({"approvers": approvers}),
            )];
            let reminder = json!({
                "approvers": approvers,
                "approvals": next.current_approvers().len(),
                "required": next.approvals_required,
            });
            let outbox = card_destinations(&self.policy(), &next, &self.card_channels)
                .into_iter()
                .map(|destination| NewOutboxMessage {
                    request_id: next.id.clone(),
                    kind: "reminder",
                    destination,
                    payload: reminder.clone(),
                    available_at: at,
                })
                .collect();
            match self.commit_change(&current, &next, audit, outbox).await {
                Ok(()) => return Ok(true),
                Err(EngineError::Store(StoreError::Conflict(_))) => continue,
                Err(error) => return Err(error),
            }
        }
        Err(too_contended())
    }

    /// Escalates a request still pending past its tier's `escalate_after`: its card is
    /// posted to `escalate_to`, and every card says so. Returns whether this call did it.
    #[instrument(skip_all, fields(request_id = %id))]
    pub async fn escalate_request(&self, id: &str) -> EngineResult<bool> {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.request(id).await?;
            let at = now();
            if current.status != Status::Pending || current.escalate_at.is_none_or(|due| due > at) {
                return Ok(false);
            }
            let mut next = current.clone();
            next.escalate_at = None;
            next.escalated_at = Some(at);
            next.version += 1;
            let policy = self.policy();
            let escalate_to = current
                .tier
                .as_deref()
                .and_then(|tier| policy.tier(tier))
                .map(|tier| tier.escalate_to.clone())
                .unwrap_or_default();
            let audit = vec![event(
                &next,
                at,
                "escalated",
                "system:sweeper",
                json!({"to": escalate_to}),
            )];
            // Now including the escalation destinations: new cards there, updates elsewhere.
            let outbox = self.card_messages(&next, at);
            match self.commit_change(&current, &next, audit, outbox).await {
                Ok(()) => return Ok(true),
                Err(EngineError::Store(StoreError::Conflict(_))) => continue,
                Err(error) => return Err(error),
            }
        }
        Err(too_contended())
    }

    /// Everyone who may vote on `request`, as written in the policy (groups expanded).
    fn approver_names(&self, request: &ApprovalRequest) -> Vec<String> {
        let policy = self.policy();
        let Some(tier) = request.tier.as_deref().and_then(|tier| policy.tier(tier)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = tier.approvers.principals.iter().cloned().collect();
        names.sort();
        names.extend(tier.approvers.slack_groups.iter().cloned());
        names
    }

    /// Forgets Idempotency-Keys answered more than `IDEMPOTENCY_KEY_LIFETIME` ago.
    pub async fn purge_idempotency_keys(&self) -> EngineResult<u64> {
        let lifetime = chrono::Duration::from_std(IDEMPOTENCY_KEY_LIFETIME).context("lifetime")?;
        Ok(self.store.purge_idempotency_keys(now() - lifetime).await?)
    }

    async fn commit_change(
        &self,
        current: &ApprovalRequest,
        next: &ApprovalRequest,
        audit: Vec<NewAuditEvent>,
        outbox: Vec<NewOutboxMessage>,
    ) -> EngineResult<()> {
        let destinations = OutboxSignal::destinations_of(&outbox);
        self.store
            .update_request(RequestChange {
                request: next,
                expected_status: current.status,
                expected_revision: current.revision,
                expected_version: current.version,
                audit,
                outbox,
            })
            .await?;
        if next.status != current.status {
            self.waiters.wake(&next.id);
            record_decision_metrics(next);
        }
        self.outbox_signal.wake(destinations);
        Ok(())
    }

    // ---- audit --------------------------------------------------------------------------

    /// Recomputes the whole chain; the first broken link is the error.
    pub async fn verify_audit_chain(&self) -> EngineResult<Result<u64, ChainBreak>> {
        let mut verifier = ChainVerifier::default();
        let mut after = 0;
        loop {
            let events = self.store.audit_events(after, 1000).await?;
            let Some(last) = events.last() else {
                return Ok(Ok(verifier.verified()));
            };
            after = last.seq;
            for event in &events {
                if let Err(broken) = verifier.check(event) {
                    return Ok(Err(broken));
                }
            }
        }
    }

    /// The last event's `{seq, hash}`, or the genesis head of an empty trail.
    #[instrument(skip_all)]
    pub async fn audit_head(&self) -> EngineResult<AuditHead> {
        Ok(self
            .store
            .audit_head()
            .await?
            .map_or_else(AuditHead::genesis, |(seq, hash)| AuditHead { seq, hash }))
    }

    /// Whether the trail still holds `head`, an earlier `audit_head`: its event is still
    /// there with the same hash. Catches what `verify_audit_chain` cannot: a trail cut
    /// short, or rewritten from some event on and rehashed.
    #[instrument(skip_all, fields(seq = head.seq))]
    pub async fn check_audit_head(&self, head: &AuditHead) -> EngineResult<Result<(), ChainBreak>> {
        let event = self.store.audit_events(head.seq - 1, 1).await?;
        let last_seq = self.store.latest_audit_seq().await?;
        Ok(head.check(event.first(), last_seq))
    }

    /// Every audit event in order, page by page.
    pub async fn export_audit(
        &self,
        mut write: impl FnMut(&AuditEvent) -> anyhow::Result<()>,
    ) -> EngineResult<u64> {
        let mut after = 0;
        let mut written = 0;
        loop {
            let events = self.store.audit_events(after, 1000).await?;
            let Some(last) = events.last() else {
                return Ok(written);
            };
            after = last.seq;
            for event in &events {
                write(event)?;
                written += 1;
            }
        }
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

pub fn hash_api_key(api_key: &str) -> String {
    hex::encode(Sha256::digest(api_key.as_bytes()))
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes
}

fn random_token(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buffer);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buffer)
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

fn too_contended() -> EngineError {
    EngineError::Conflict {
        code: "contended",
        message: "the request changed too many times concurrently; retry".into(),
    }
}

fn event(
    request: &ApprovalRequest,
    at: DateTime<Utc>,
    kind: &'static str,
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

fn decided_event(request: &ApprovalRequest, actor: &str) -> NewAuditEvent {
    let decision = request.decision.as_ref();
    event(
        request,
        decision.map_or_else(now, |decision| decision.at),
        "decided",
        actor,
        json!({
            "outcome": request.status,
            "decision": decision,
            "action_hash": request.action_hash,
        }),
    )
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
        kind: "webhook",
        destination: url.clone(),
        payload: json!({
            "type": event_type,
            "timestamp": at,
            "data": request,
        }),
        available_at: at,
    })
}

fn submission_hash(submission: &Submission) -> String {
    let canonical = serde_json_canonicalizer::to_vec(submission).unwrap_or_default();
    hex::encode(Sha256::digest(canonical))
}

fn validate_agent_name(name: &str) -> EngineResult<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(EngineError::Invalid(format!(
            "agent name {name:?} must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )))
    }
}

fn validate_submission(submission: &Submission) -> EngineResult<()> {
    let action = &submission.action;
    if action.is_empty() || action.len() > 200 {
        return Err(EngineError::Invalid(
            "action must be 1 to 200 characters".into(),
        ));
    }
    if !action
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-:/".contains(c))
    {
        return Err(EngineError::Invalid(format!(
            "action {action:?} may contain only letters, digits and . _ - : /"
        )));
    }
    if !submission.args.is_object() {
        return Err(EngineError::Invalid("args must be a JSON object".into()));
    }
    // The callback URL is checked by `CallbackGuard::check_url`, which may need DNS.
    // Links are evidence, not fetched: any text is kept; cards link only http(s) ones.
    if submission
        .context
        .links
        .iter()
        .any(|link| link.len() > 2000)
    {
        return Err(EngineError::Invalid(
            "context links must be at most 2000 characters".into(),
        ));
    }
    Ok(())
}

fn instant_at(at: DateTime<Utc>) -> tokio::time::Instant {
    let remaining = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + remaining
}

/// Long-polls waiting on a request, woken when its decision commits.
#[derive(Clone, Default)]
struct Waiters {
    channels: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
}

struct Subscription {
    id: String,
    receiver: Option<watch::Receiver<u64>>,
    waiters: Waiters,
}

impl Waiters {
    fn subscribe(&self, id: &str) -> Subscription {
        let receiver = self
            .lock_channels()
            .entry(id.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Subscription {
            id: id.to_string(),
            receiver: Some(receiver),
            waiters: self.clone(),
        }
    }

    fn wake(&self, id: &str) {
        if let Some(sender) = self.lock_channels().get(id) {
            sender.send_modify(|generation| *generation += 1);
        }
    }

    fn request_ids(&self) -> Vec<String> {
        self.lock_channels().keys().cloned().collect()
    }

    fn lock_channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        // Entries are only inserted or removed whole: a panic elsewhere leaves none half-made.
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Subscription {
    async fn changed(&mut self) {
        match self.receiver.as_mut() {
            Some(receiver) => {
                if receiver.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut channels = self.waiters.lock_channels();
        drop(self.receiver.take());
        if channels
            .get(&self.id)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            channels.remove(&self.id);
        }
    }
}
