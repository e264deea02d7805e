//! Votes: approve, deny and modify, under the decision rules (ARCHITECTURE.md), and who
//! may see a request in chat.

use serde_json::{json, Value};
use tracing::instrument;

use super::grants::{check_grant_ask, grant_from_approval};
use super::{after, audit_args, event, Engine, EngineError, EngineResult, Planned};
use crate::domain::{
    check_voter, plan_vote, restore_redacted, sets_redacted_value, ApprovalRequest, AuditKind,
    GrantAsk, Principal, Reevaluation, Status, VoteContext, VoteEffect, VoteKind, VoteRefusal,
    VoteRequest, Voter,
};
use crate::policy::{Effect, EvaluationInput, Facts, Policy};

impl Engine {
    /// What the engine needs to judge `voter` (already identified through the policy's
    /// `people`) on `request`: eligibility in its tier under the current policy, whether
    /// they are its requester or an owner of its agent, and whether their email matters
    /// but could not be read.
    fn vote_context<'a>(
        &self,
        policy: &Policy,
        request: &ApprovalRequest,
        owners: &[Principal],
        voter: &'a Voter,
        seen_revision: Option<u32>,
    ) -> VoteContext<'a> {
        let tier = request.tier.as_deref().and_then(|tier| policy.tier(tier));
        let eligible = tier.is_some_and(|tier| tier.approvers.admits(voter));
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
        VoteContext {
            principal: &voter.principal,
            aliases: &voter.aliases,
            eligible,
            groups: &[],
            is_requester,
            email_unreadable: voter.email_unreadable && names_people_by_email,
            seen_revision,
            modification: None,
            now: self.now(),
        }
    }

    /// The owners of `agent`: they may never approve its requests.
    async fn owners_of(&self, agent: &str) -> EngineResult<Vec<Principal>> {
        Ok(self
            .store
            .agent(agent)
            .await?
            .map(|agent| agent.owners)
            .unwrap_or_default())
    }

    /// Could `voter` cast this kind of vote on `id`, at the revision they saw, now? Lets a
    /// channel refuse at the click instead of after asking for a reason or new args.
    pub async fn check_voter(
        &self,
        id: &str,
        voter: &Voter,
        kind: VoteKind,
        seen_revision: Option<u32>,
    ) -> EngineResult<ApprovalRequest> {
        let policy = self.policy();
        let voter = policy.identify(voter);
        let request = self.request(id).await?;
        let owners = self.owners_of(&request.agent).await?;
        let context = self.vote_context(&policy, &request, &owners, &voter, seen_revision);
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
        let owners = self.owners_of(&request.agent).await?;
        let context = self.vote_context(&policy, request, &owners, &voter, None);
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
        // Counters read 0 here: a modification is judged on its args, not on history.
        let verdict = policy.evaluate_with(
            EvaluationInput {
                action: &request.action,
                args,
                agent: &request.agent,
                context: &context,
            },
            Facts::at(self.now()),
        );
        // The new args are judged by the policy in force: the tier's quorum as it is now,
        // if a reload raised it.
        let current_tier = request.tier.as_deref().and_then(|tier| policy.tier(tier));
        let same_tier = Reevaluation::SameTier {
            approvals_required: current_tier.map_or(request.approvals_required, |tier| {
                tier.approvals.max(request.approvals_required)
            }),
            // A per-group quorum as the tier has it now; the request's own if the tier
            // went away or asks a plain count.
            approvals_by_group: current_tier
                .map(|tier| tier.approvals_by_group.clone())
                .filter(|by_group| !by_group.is_empty())
                .unwrap_or_else(|| request.approvals_by_group.clone()),
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
                        let new_tier = policy.tier(&tier);
                        Reevaluation::MovesUp {
                            modifier_eligible: policy.admits(&tier, voter),
                            modifier_groups: new_tier
                                .map(|new_tier| new_tier.quorum_groups_of(voter))
                                .unwrap_or_default(),
                            approvals_by_group: new_tier
                                .map(|new_tier| new_tier.approvals_by_group.clone())
                                .unwrap_or_default(),
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
        self.record_vote_asking_grant(id, voter, vote, seen_revision, None)
            .await
    }

    /// `record_vote`, where an approve vote may also ask for a standing grant. A grant
    /// the tier does not allow refuses the vote (nothing is cast); the grant is created
    /// with the approval only if every counted approval asked for one.
    #[instrument(skip_all, fields(request_id = %id, principal = %voter.principal))]
    pub async fn record_vote_asking_grant(
        &self,
        id: &str,
        voter: &Voter,
        vote: VoteRequest,
        seen_revision: Option<u32>,
        grant: Option<GrantAsk>,
    ) -> EngineResult<(ApprovalRequest, VoteEffect)> {
        if grant.is_some() && !matches!(vote, VoteRequest::Approve { .. }) {
            return Err(EngineError::Invalid(
                "only an approve vote can ask for a grant".into(),
            ));
        }
        let principal = &voter.principal;
        let policy = self.policy();
        let voter = policy.identify(voter);
        // A request's agent never changes: its owners are read once, not per attempt.
        let owners = self.owners_of(&self.request(id).await?.agent).await?;
        let voted = self.transition(id, None, |current| {
            // What the modify form showed as `[redacted]` keeps the value it stands for.
            let vote = match &vote {
                VoteRequest::Modify { args, .. }
                    if sets_redacted_value(args, policy.redact_paths()) =>
                {
                    return Err(VoteRefusal::RedactedValue.into());
                }
                VoteRequest::Modify { args, note } => VoteRequest::Modify {
                    args: restore_redacted(args, &current.args, policy.redact_paths()),
                    note: note.clone(),
                },
                other => other.clone(),
            };
            let groups = current
                .tier
                .as_deref()
                .and_then(|tier| policy.tier(tier))
                .map(|tier| tier.quorum_groups_of(&voter))
                .unwrap_or_default();
            let mut context =
                self.vote_context(&policy, current, &owners, &voter, seen_revision);
            context.groups = &groups;
            let at = context.now;
            // The new args go through the policy again, but only for someone who may
            // modify: others learn nothing of the policy from a refusal.
            let reevaluation = match &vote {
                VoteRequest::Modify { args, .. } => {
                    match check_voter(current, VoteKind::Modify, &context) {
                        Ok(()) => Some(self.reevaluate(&policy, current, args, &voter)),
                        Err(refusal) => return Err(refusal.into()),
                    }
                }
                _ => None,
            };
            context.modification = reevaluation.as_ref();
            if let Some(ask) = &grant {
                check_voter(current, VoteKind::Approve, &context)?;
                check_grant_ask(&policy, current.tier.as_deref(), ask)?;
            }
            let mut next = current.successor();
            let effect = match plan_vote(&mut next, vote.clone(), context) {
                Ok(effect) => effect,
                Err(refusal) => return Err(refusal.into()),
            };
            if let (Some(ask), Some(cast)) = (&grant, next.votes.last_mut()) {
                cast.grant = Some(ask.clone());
            }
            if next.tier != current.tier {
                schedule_follow_ups(&policy, &mut next);
            }
            if next.revision != current.revision {
                // The policy that judged the new args.
                next.policy_hash = policy.hash().to_string();
            }
            let (kind, payload) = match &vote {
                VoteRequest::Modify { note, .. } => (
                    AuditKind::Modified,
                    json!({
                        "revision": next.revision,
                        "previous_args": audit_args(&current.args, policy.redact_paths()),
                        "args": audit_args(&next.args, policy.redact_paths()),
                        "action_hash": next.action_hash,
                        "note": note,
                        "tier": next.tier,
                        "previous_tier": current.tier,
                        "approvals_required": next.approvals_required,
                        "policy_hash": next.policy_hash,
                        "counts_as_approval": next.votes.last().is_some_and(|vote| vote.vote == VoteKind::Approve),
                        "channel": voter.channel,
                    }),
                ),
                VoteRequest::Approve { note } => (
                    AuditKind::Vote,
                    json!({
                        "vote": "approve", "note": note, "revision": next.revision,
                        "channel": voter.channel, "grant": grant,
                    }),
                ),
                VoteRequest::Deny { reason } => (
                    AuditKind::Vote,
                    json!({
                        "vote": "deny", "reason": reason.trim(), "revision": next.revision,
                        "channel": voter.channel,
                    }),
                ),
            };
            let mut audit = vec![event(&next, at, kind, principal.as_str(), payload)];
            let mut outbox = self.card_updates(&next, at);
            if let VoteEffect::Decided(_) = effect {
                if next.status == Status::Approved {
                    if let Some(created) = grant_from_approval(&policy, &next, at) {
                        // The store inserts the grant this event carries, in this commit.
                        audit.push(event(
                            &next,
                            at,
                            AuditKind::GrantCreated,
                            principal.as_str(),
                            serde_json::to_value(&created).unwrap_or(Value::Null),
                        ));
                    }
                }
                self.announce_final(&next, principal.as_str(), &mut audit, &mut outbox);
            }
            Ok(Planned::Commit {
                answer: (next.clone(), effect),
                next,
                audit,
                outbox,
            })
        })
        .await;
        // A refused vote changes nothing, except that a vote refused because the request
        // is past its expiry expires it (fail closed, without waiting for the sweeper).
        if let Err(EngineError::Refused(VoteRefusal::Expired)) = &voted {
            self.expire_request(id).await?;
        }
        voted
    }
}

/// After a move to another tier: reminders and escalation as that tier has them,
/// counted from the submission, unless they already happened.
fn schedule_follow_ups(policy: &Policy, request: &mut ApprovalRequest) {
    let Some(tier) = request.tier.as_deref().and_then(|tier| policy.tier(tier)) else {
        return;
    };
    let created_at = request.created_at;
    if request.reminded_at.is_none() {
        request.remind_at = tier.remind_after.and_then(|delay| after(created_at, delay));
    }
    // The next step of the new tier's ladder not yet taken.
    request.escalate_at = tier
        .escalation
        .get(request.escalation_steps_taken() as usize)
        .and_then(|step| after(created_at, step.after));
}
