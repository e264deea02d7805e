//! A request's life after intake, apart from votes: the agent cancels it or reports its
//! execution; time expires it, reminds its approvers and escalates it (the sweeper).

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};
use tracing::instrument;

use super::{after, event, webhook_message, Engine, EngineError, EngineResult, Planned};
use crate::domain::{
    ApprovalRequest, AuditKind, Execution, ExecutionOutcome, OutboxKind, Principal, Status,
    VoteRefusal,
};
use crate::policy::EscalationStep;
use crate::store::Due;
use crate::telemetry;

/// Due requests a sweep reads at a time.
pub const SWEEP_BATCH: usize = 500;

/// Idempotency-Keys are answered for at least this long (the agent API promises at least 24 h).
pub const IDEMPOTENCY_KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl Engine {
    /// The agent withdraws a pending request.
    #[instrument(skip_all, fields(request_id = %id))]
    pub async fn cancel_request(&self, agent: &str, id: &str) -> EngineResult<ApprovalRequest> {
        self.transition(id, Some(agent), |current| {
            if current.status != Status::Pending {
                return Err(VoteRefusal::NotPending(current.status).into());
            }
            let at = self.now();
            let actor = Principal::agent(agent);
            let mut next = current.successor();
            next.decide(
                Status::Cancelled,
                vec![actor.clone()],
                Some("cancelled by the agent".into()),
                at,
            );
            let audit = vec![event(
                &next,
                at,
                AuditKind::Cancelled,
                actor.as_str(),
                json!({}),
            )];
            let mut outbox = self.card_updates(&next, at);
            outbox.extend(webhook_message(&next, at));
            Ok(Planned::Commit {
                answer: next.clone(),
                next,
                audit,
                outbox,
            })
        })
        .await
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
        self.transition(id, Some(agent), |current| {
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
            let at = self.now();
            let mut next = current.successor();
            next.executed = Some(Execution {
                outcome,
                detail: detail.clone(),
                at,
            });
            let audit = vec![event(
                &next,
                at,
                AuditKind::Executed,
                Principal::agent(agent).as_str(),
                json!({
                    "outcome": outcome, "detail": detail, "action_hash": next.action_hash,
                }),
            )];
            Ok(Planned::Commit {
                answer: next.clone(),
                next,
                audit,
                outbox: Vec::new(),
            })
        })
        .await
    }

    /// Expires `id` if it is pending past its expiry. Returns whether this call expired it.
    #[instrument(skip_all, fields(request_id = %id))]
    pub async fn expire_request(&self, id: &str) -> EngineResult<bool> {
        self.transition(id, None, |current| {
            let at = self.now();
            if !current.is_overdue(at) {
                return Ok(Planned::Unchanged(false));
            }
            let mut next = current.successor();
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
            let audit = vec![event(
                &next,
                at,
                AuditKind::Expired,
                "system:expiry",
                json!({"expires_at": current.expires_at}),
            )];
            let mut outbox = self.card_updates(&next, at);
            outbox.extend(webhook_message(&next, at));
            Ok(Planned::Commit {
                answer: true,
                next,
                audit,
                outbox,
            })
        })
        .await
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
                .due_request_ids(due, self.now(), i64::try_from(limit).unwrap_or(i64::MAX))
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
        self.transition(id, None, |current| {
            let at = self.now();
            if current.status != Status::Pending || current.remind_at.is_none_or(|due| due > at) {
                return Ok(Planned::Unchanged(false));
            }
            let mut next = current.successor();
            next.remind_at = None;
            next.reminded_at = Some(at);
            let approvers = self.approver_names(current);
            let audit = vec![event(
                &next,
                at,
                AuditKind::Reminded,
                "system:sweeper",
                json!({"approvers": approvers}),
            )];
            let reminder = json!({
                "approvers": approvers,
                "approvals": next.approvals_counted(),
                "required": next.approvals_required,
            });
            let outbox = self.card_messages(&next, OutboxKind::Reminder, reminder, at);
            Ok(Planned::Commit {
                answer: true,
                next,
                audit,
                outbox,
            })
        })
        .await
    }

    /// Takes the next step of the escalation ladder of a request still pending past it:
    /// the card is posted to that step's destinations (every step due now, when the sweeper
    /// comes late), every card says which step, and the next step is scheduled. The step
    /// number moves on by compare-and-set, so each step happens once across replicas.
    /// Returns whether this call escalated it.
    #[instrument(skip_all, fields(request_id = %id))]
    pub async fn escalate_request(&self, id: &str) -> EngineResult<bool> {
        self.transition(id, None, |current| {
            let at = self.now();
            if current.status != Status::Pending || current.escalate_at.is_none_or(|due| due > at) {
                return Ok(Planned::Unchanged(false));
            }
            let policy = self.policy();
            let ladder = current
                .tier
                .as_deref()
                .and_then(|tier| policy.tier(tier))
                .map(|tier| tier.escalation.as_slice())
                .unwrap_or_default();
            let taken = current.escalation_steps_taken() as usize;
            let due_now = |step: &&EscalationStep| {
                after(current.created_at, step.after).is_some_and(|due| due <= at)
            };
            let reached: Vec<(usize, &EscalationStep)> = ladder
                .iter()
                .enumerate()
                .skip(taken)
                .take_while(|(_, step)| due_now(step))
                .collect();
            let mut next = current.successor();
            next.escalate_at = ladder
                .get(taken + reached.len())
                .and_then(|step| after(current.created_at, step.after));
            if reached.is_empty() {
                // A reloaded policy shortened the ladder (or moved the step later): nothing
                // to post now, only the schedule to set right.
                return Ok(Planned::Commit {
                    answer: false,
                    next,
                    audit: Vec::new(),
                    outbox: Vec::new(),
                });
            }
            next.escalation_step = (taken + reached.len()) as u32;
            next.escalated_at = Some(at);
            let audit = reached
                .iter()
                .map(|(index, step)| {
                    event(
                        &next,
                        at,
                        AuditKind::Escalated,
                        "system:sweeper",
                        json!({"step": index + 1, "of": ladder.len(), "to": step.to}),
                    )
                })
                .collect();
            // Now including the new step's destinations: new cards there, updates elsewhere.
            let outbox = self.card_updates(&next, at);
            Ok(Planned::Commit {
                answer: true,
                next,
                audit,
                outbox,
            })
        })
        .await
    }

    /// Everyone who may vote on `request`, as written in the policy (groups expanded).
    fn approver_names(&self, request: &ApprovalRequest) -> Vec<String> {
        let policy = self.policy();
        let Some(tier) = request.tier.as_deref().and_then(|tier| policy.tier(tier)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = tier.approvers.principals.iter().cloned().collect();
        names.sort();
        names.extend(tier.approvers.user_groups.iter().cloned());
        names
    }

    /// Forgets Idempotency-Keys answered more than `IDEMPOTENCY_KEY_LIFETIME` ago.
    pub async fn purge_idempotency_keys(&self) -> EngineResult<u64> {
        let lifetime = chrono::Duration::from_std(IDEMPOTENCY_KEY_LIFETIME).context("lifetime")?;
        Ok(self
            .store
            .purge_idempotency_keys(self.now() - lifetime)
            .await?)
    }
}
