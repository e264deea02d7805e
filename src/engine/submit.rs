//! Intake: a submission is checked (quotas, callback URL, Idempotency-Key), judged by the
//! policy and stored with its audit events and first outbox messages.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tracing::instrument;

use super::grants::{covering_grant, grant_use};
use super::{
    after, audit_args, event, record_decision_metrics, Engine, EngineError, EngineResult,
    OutboxSignal,
};
use crate::audit::NewAuditEvent;
use crate::domain::{
    action_hash, mask_context, new_request_id, ApprovalRequest, AuditKind, Grant, Mask, Principal,
    RequestContext, Status,
};
use crate::policy::{CounterSpec, Effect, EvaluationInput, Facts, Policy, Verdict};
use crate::store::{
    AgentRecord, IdempotencyKey, IntakeFacts, IntakeLookup, Judge, JudgedRequest, NewOutboxMessage,
    NewRequest, Reservation, StoreError,
};
use crate::telemetry;

#[derive(Clone, Debug, Serialize)]
pub struct Submission {
    pub action: String,
    pub args: Value,
    pub context: RequestContext,
    pub on_behalf_of: Option<Principal>,
    pub callback_url: Option<String>,
}

impl Submission {
    /// A submission from an agent's fields as they arrive, for every agent-facing edge
    /// (/v1 and MCP): `null` or missing args are `{}`, `on_behalf_of` is parsed.
    pub fn from_agent(
        action: String,
        args: Option<Value>,
        context: Option<RequestContext>,
        on_behalf_of: Option<&str>,
        callback_url: Option<String>,
    ) -> EngineResult<Self> {
        let on_behalf_of = on_behalf_of
            .map(str::parse::<Principal>)
            .transpose()
            .map_err(|error| EngineError::Invalid(format!("on_behalf_of: {error}")))?;
        Ok(Self {
            action,
            args: args
                .filter(|args| !args.is_null())
                .unwrap_or_else(|| json!({})),
            context: context.unwrap_or_default(),
            on_behalf_of,
            callback_url,
        })
    }
}

/// The answer to a submission: a new request, or the stored answer to an earlier one with
/// the same Idempotency-Key.
#[derive(Debug)]
pub enum Submitted {
    Created(Box<ApprovalRequest>),
    Replayed(Value),
}

impl Engine {
    /// Evaluates the policy without storing anything, at the engine's clock: counters read
    /// 0 (no history is looked up) and sampled rules report their rate, not a draw.
    pub fn check(&self, agent: &str, action: &str, args: &Value, context: &Value) -> Verdict {
        self.policy().evaluate_with(
            EvaluationInput {
                action,
                args,
                agent,
                context,
            },
            Facts::at(self.now()),
        )
    }

    /// `check`, for input straight from an agent: an empty action or non-object args are
    /// refused.
    pub fn check_agent_input(
        &self,
        agent: &str,
        action: &str,
        args: &Value,
        context: &Value,
    ) -> EngineResult<Verdict> {
        if action.is_empty() {
            return Err(EngineError::Invalid("action must not be empty".into()));
        }
        if !args.is_object() {
            return Err(EngineError::Invalid("args must be a JSON object".into()));
        }
        Ok(self.check(agent, action, args, context))
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
            let reservation = self.store.reserve_idempotency_key(key, self.now()).await?;
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
        let at = self.now();
        let sample_draw = rand::random::<f64>();
        let counters = policy.counters_for(&agent.name, &submission.action);
        if counters.is_empty() {
            let verdict = policy.evaluate_with(
                EvaluationInput {
                    action: &submission.action,
                    args: &submission.args,
                    agent: &agent.name,
                    context: &context_value,
                },
                Facts {
                    now: at,
                    counters: &[],
                    sample_draw: Some(sample_draw),
                },
            );
            // Only a require_approval verdict can be met by a grant; everything else
            // takes the group commit.
            if !(verdict.effect == Effect::RequireApproval && policy.any_grants()) {
                let (request, audit, outbox) =
                    self.judge_request(&policy, &agent.name, submission, &verdict, at, None)?;
                return self
                    .insert_plain(agent, request, audit, outbox, &verdict, key)
                    .await;
            }
        }
        self.insert_judged(agent, submission, context_value, counters, sample_draw, key)
            .await
    }

    /// The common path: the request joins the next group commit.
    async fn insert_plain(
        &self,
        agent: &AgentRecord,
        request: ApprovalRequest,
        audit: Vec<NewAuditEvent>,
        outbox: Vec<NewOutboxMessage>,
        verdict: &Verdict,
        key: Option<&IdempotencyKey>,
    ) -> EngineResult<ApprovalRequest> {
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
        record_intake_metrics(&request, verdict);
        Ok(request)
    }

    /// Counters or a grant decide: the policy is evaluated inside the insert's transaction,
    /// on the counters and grants it reads there under the (agent, action) serialisation.
    async fn insert_judged(
        &self,
        agent: &AgentRecord,
        submission: Submission,
        context_value: Value,
        counters: Vec<CounterSpec>,
        sample_draw: f64,
        key: Option<&IdempotencyKey>,
    ) -> EngineResult<ApprovalRequest> {
        let policy = self.policy();
        let at = self.now();
        let lookup = IntakeLookup {
            agent: agent.name.clone(),
            action: submission.action.clone(),
            now: at,
            counters: counters
                .iter()
                .map(|spec| {
                    let window =
                        chrono::Duration::from_std(spec.window).unwrap_or(chrono::Duration::zero());
                    (spec.field.clone(), at - window)
                })
                .collect(),
            grants: policy.any_grants(),
        };
        // The verdict may turn out pending: hold an admission as the plain path does. (At
        // the cap this refuses a submission the counters would have allowed.)
        let admission = self
            .quotas
            .admit_pending(&agent.name, self.store.as_ref())
            .await??;
        let engine = self.clone();
        let agent_name = agent.name.clone();
        let key = key.cloned();
        let verdict_slot: Arc<Mutex<Option<JudgedOutcome>>> = Arc::default();
        let verdict_out = verdict_slot.clone();
        let judge: Judge = Box::new(move |facts: IntakeFacts| {
            let values: Vec<(CounterSpec, f64)> =
                counters.iter().cloned().zip(facts.counters).collect();
            let verdict = policy.evaluate_with(
                EvaluationInput {
                    action: &submission.action,
                    args: &submission.args,
                    agent: &agent_name,
                    context: &context_value,
                },
                Facts {
                    now: at,
                    counters: &values,
                    sample_draw: Some(sample_draw),
                },
            );
            let grant = covering_grant(
                &policy,
                &verdict,
                &submission.action,
                &submission.args,
                &agent_name,
                &context_value,
                submission.on_behalf_of.as_ref(),
                &facts.grants,
                at,
            );
            let judged = engine.judge_request(
                &policy,
                &agent_name,
                submission.clone(),
                &verdict,
                at,
                grant.cloned(),
            );
            let (request, audit, outbox) =
                judged.map_err(|error| StoreError::Corrupt(error.to_string()))?;
            *verdict_out
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()) =
                Some((verdict, OutboxSignal::destinations_of(&outbox)));
            let idempotency = key
                .clone()
                .map(|key| {
                    serde_json::to_value(&request)
                        .map(|response| (key, response))
                        .map_err(|error| StoreError::Corrupt(error.to_string()))
                })
                .transpose()?;
            Ok(JudgedRequest {
                request,
                audit,
                outbox,
                idempotency,
                grant_used: grant.map(|grant| grant_use(&policy, grant)),
            })
        });
        let request = self.store.insert_judged_request(lookup, judge).await?;
        drop(admission);
        let judged = verdict_slot
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        if let Some((verdict, destinations)) = judged {
            self.outbox_signal.wake(destinations);
            record_intake_metrics(&request, &verdict);
        }
        Ok(request)
    }

    /// The request, its audit events and outbox rows for `verdict` (and the grant that
    /// approves it, if one does).
    fn judge_request(
        &self,
        policy: &Policy,
        agent: &str,
        submission: Submission,
        verdict: &Verdict,
        at: DateTime<Utc>,
        grant: Option<Grant>,
    ) -> EngineResult<(ApprovalRequest, Vec<NewAuditEvent>, Vec<NewOutboxMessage>)> {
        let mut request = ApprovalRequest {
            id: new_request_id(),
            agent: agent.to_string(),
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
            approvals_by_group: verdict
                .tier
                .as_deref()
                .and_then(|tier| policy.tier(tier))
                .map(|tier| tier.approvals_by_group.clone())
                .unwrap_or_default(),
            revision: 1,
            votes: Vec::new(),
            decision: None,
            policy_hash: policy.hash().to_string(),
            created_at: at,
            expires_at: None,
            executed: None,
            reminded_at: None,
            escalated_at: None,
            sampled: verdict.sampled,
            shadow: verdict.shadow.clone(),
            remind_at: None,
            escalate_at: None,
            previous_tiers: Vec::new(),
            escalation_step: 0,
            version: 1,
        };
        let by_policy = Principal::policy_rule(verdict.rule.as_deref().unwrap_or("default"));
        let mut audit = vec![
            event(
                &request,
                at,
                AuditKind::Submitted,
                Principal::agent(agent).as_str(),
                json!({
                    "action": request.action,
                    "args": audit_args(&request.args, policy.redact_paths()),
                    "context": mask_context(&request.context, policy.redact_paths(), Mask::Hashed),
                    "on_behalf_of": request.on_behalf_of,
                    "action_hash": request.action_hash,
                }),
            ),
            event(
                &request,
                at,
                AuditKind::Verdict,
                by_policy.as_str(),
                json!({
                    "effect": verdict.effect,
                    "tier": verdict.tier,
                    "rule": verdict.rule,
                    "matched": verdict.matches.iter().map(|m| m.rule.as_str()).collect::<Vec<_>>(),
                    "sampled": verdict.sampled,
                    "shadow": verdict.shadow,
                    "policy_hash": request.policy_hash,
                }),
            ),
        ];
        let mut decided_by = by_policy.clone();
        match (verdict.effect, grant) {
            (Effect::Allow, _) => request.decide(
                Status::Approved,
                vec![by_policy.clone()],
                verdict.reason.clone(),
                at,
            ),
            (Effect::Deny, _) => {
                let reason = verdict
                    .reason
                    .clone()
                    .unwrap_or_else(|| match &verdict.rule {
                        Some(rule) => format!("denied by policy rule {rule:?}"),
                        None => "denied by the policy default".to_string(),
                    });
                request.decide(Status::Denied, vec![by_policy.clone()], Some(reason), at);
            }
            (Effect::RequireApproval, Some(grant)) => {
                decided_by = Principal::grant(&grant.id);
                audit.push(event(
                    &request,
                    at,
                    AuditKind::GrantUsed,
                    decided_by.as_str(),
                    json!({
                        "grant_id": grant.id,
                        "uses_left": grant.uses_left.saturating_sub(1),
                    }),
                ));
                request.decide(
                    Status::Approved,
                    vec![decided_by.clone()],
                    Some(format!("approved by standing grant {}", grant.id)),
                    at,
                );
            }
            (Effect::RequireApproval, None) => {
                let ttl = verdict.ttl.unwrap_or(Duration::from_secs(3600));
                request.expires_at = Some(after(at, ttl).context("ttl out of range")?);
                if let Some(tier) = verdict.tier.as_deref().and_then(|tier| policy.tier(tier)) {
                    request.remind_at = tier.remind_after.and_then(|delay| after(at, delay));
                    request.escalate_at = tier
                        .escalation
                        .first()
                        .and_then(|step| after(at, step.after));
                }
            }
        }
        let mut outbox = self.card_updates(&request, at);
        if request.status.is_final() {
            self.announce_final(&request, decided_by.as_str(), &mut audit, &mut outbox);
        }
        Ok((request, audit, outbox))
    }
}

/// What the judge leaves for after the commit: its verdict (for metrics) and the card
/// destinations to wake the worker for.
type JudgedOutcome = (Verdict, Vec<String>);

/// Counts the submission in the request metrics and its shadow matches, once each.
fn record_intake_metrics(request: &ApprovalRequest, verdict: &Verdict) {
    metrics::counter!(
        telemetry::REQUESTS,
        "effect" => verdict.effect.as_str(),
        "tier" => telemetry::label(verdict.tier.as_deref()),
        "rule" => telemetry::label(verdict.rule.as_deref()),
    )
    .increment(1);
    for shadow in &verdict.shadow {
        metrics::counter!(
            telemetry::SHADOW_MATCHES,
            "rule" => shadow.rule.clone(),
            "effect" => shadow.effect.clone(),
        )
        .increment(1);
    }
    if request.status.is_final() {
        record_decision_metrics(request);
    }
    tracing::info!(request_id = %request.id, status = request.status.as_str(), "request submitted");
}

fn submission_hash(submission: &Submission) -> String {
    let canonical = serde_json_canonicalizer::to_vec(submission).unwrap_or_default();
    hex::encode(Sha256::digest(canonical))
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
