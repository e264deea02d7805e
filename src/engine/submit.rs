//! Intake: a submission is checked (quotas, callback URL, Idempotency-Key), judged by the
//! policy and stored with its audit events and first outbox messages.

use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tracing::instrument;

use super::{
    after, audit_args, event, record_decision_metrics, Engine, EngineError, EngineResult,
    OutboxSignal,
};
use crate::domain::{
    action_hash, mask_context, new_request_id, ApprovalRequest, AuditKind, Mask, Principal,
    RequestContext, Status,
};
use crate::policy::{Effect, EvaluationInput, Verdict};
use crate::store::{AgentRecord, IdempotencyKey, NewRequest, Reservation, StoreError};
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
    /// Evaluates the policy without storing anything.
    pub fn check(&self, agent: &str, action: &str, args: &Value, context: &Value) -> Verdict {
        self.policy().evaluate(EvaluationInput {
            action,
            args,
            agent,
            context,
        })
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
        let verdict = policy.evaluate(EvaluationInput {
            action: &submission.action,
            args: &submission.args,
            agent: &agent.name,
            context: &context_value,
        });
        let at = self.now();
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
                Principal::agent(&agent.name).as_str(),
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
            self.announce_final(&request, by_policy.as_str(), &mut audit, &mut outbox);
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
