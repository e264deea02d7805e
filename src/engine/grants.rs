//! Standing grants: which grant covers a submission at intake, creating one when an
//! approval asked for it, listing and revoking.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::{Engine, EngineError, EngineResult};
use crate::audit::NewAuditEvent;
use crate::domain::{
    new_grant_id, ApprovalRequest, AuditKind, Grant, GrantAsk, Principal, VoteKind, Voter,
};
use crate::policy::{Effect, EvaluationInput, Policy, Verdict};
use crate::store::GrantUse;

/// The first active grant that approves this submission: the verdict is require_approval
/// at the grant's tier or lower, and the grant covers the same agent and action and the
/// same args (its `action_hash`) or args its `when` accepts, and its tier still allows
/// grants (for no longer than its current `max_ttl`); none of its creators is the requester. Never over a deny or allow.
#[allow(clippy::too_many_arguments)]
pub(super) fn covering_grant<'a>(
    policy: &Policy,
    verdict: &Verdict,
    action: &str,
    args: &Value,
    agent: &str,
    context: &Value,
    requester: Option<&Principal>,
    grants: &'a [Grant],
    at: DateTime<Utc>,
) -> Option<&'a Grant> {
    if verdict.effect != Effect::RequireApproval || grants.is_empty() {
        return None;
    }
    let verdict_rank = policy.tier_rank(verdict.tier.as_deref()?)?;
    let hash = crate::domain::action_hash(action, args);
    grants.iter().find(|grant| {
        grant.is_active(at)
            && grant.agent == agent
            && grant.action == action
            && policy
                .tier_rank(&grant.tier)
                .is_some_and(|grant_rank| verdict_rank <= grant_rank)
            // A tier the current policy no longer lets grant stops its grants too, and a
            // shorter `max_ttl` or a lower `max_uses` cuts them short.
            && policy
                .tier(&grant.tier)
                .and_then(|tier| tier.grants)
                .is_some_and(|limits| {
                    chrono::Duration::from_std(limits.max_ttl)
                        .is_ok_and(|max_ttl| at < grant.created_at + max_ttl)
                        && grant.uses_granted.saturating_sub(grant.uses_left) < limits.max_uses
                })
            // A grant is its creators' approval: it lasts while each of them may still
            // approve at its tier, and nobody approves their own request.
            && grant
                .created_by
                .iter()
                .all(|creator| policy.may_still_approve(&grant.tier, creator))
            && !requester.is_some_and(|requester| {
                grant.created_by.iter().any(|creator| {
                    policy
                        .identify(&Voter::new(creator.clone()))
                        .is(requester)
                })
            })
            && match (&grant.action_hash, &grant.when) {
                (Some(grant_hash), _) => *grant_hash == hash,
                (None, Some(when)) => policy.condition_holds(
                    when,
                    EvaluationInput {
                        action,
                        args,
                        agent,
                        context,
                    },
                    at,
                ),
                (None, None) => false,
            }
    })
}

/// A use of `grant`, whose spend may not take `uses_left` below what the tier's current
/// `max_uses` leaves of it.
pub(super) fn grant_use(policy: &Policy, grant: &Grant) -> GrantUse {
    let max_uses = policy
        .tier(&grant.tier)
        .and_then(|tier| tier.grants)
        .map_or(0, |limits| limits.max_uses);
    GrantUse {
        grant_id: grant.id.clone(),
        uses_left_floor: grant.uses_granted.saturating_sub(max_uses),
    }
}

/// Refuses a grant the request's tier does not allow: a tier without `grants`, a duration
/// or a number of uses beyond its caps, a `when` that does not compile.
pub(super) fn check_grant_ask(
    policy: &Policy,
    tier: Option<&str>,
    ask: &GrantAsk,
) -> EngineResult<()> {
    let refuse = |message: String| {
        Err(EngineError::Unprocessable {
            code: "grant_refused",
            message,
        })
    };
    let Some(tier) = tier.and_then(|tier| policy.tier(tier)) else {
        return refuse("this request has no tier to grant in".into());
    };
    let Some(limits) = tier.grants else {
        return refuse(format!("tier {:?} does not allow grants", tier.name));
    };
    if ask.ttl_seconds == 0 || ask.ttl_seconds > limits.max_ttl.as_secs() {
        return refuse(format!(
            "a grant in tier {:?} lasts at most {}",
            tier.name,
            humantime::format_duration(limits.max_ttl)
        ));
    }
    if let Some(uses) = ask.uses {
        if uses == 0 || uses > limits.max_uses {
            return refuse(format!(
                "a grant in tier {:?} has 1 to {} uses",
                tier.name, limits.max_uses
            ));
        }
    }
    if let Some(when) = &ask.when {
        if let Err(error) = Policy::check_grant_condition(when) {
            return refuse(format!("--grant-when: {error}"));
        }
    }
    Ok(())
}

/// The grant an approval creates: only when every approve vote that counts on the decided
/// revision asked for one. The shortest duration and fewest uses win; a `when` is kept
/// only if every ask gave the same one (otherwise the same args only: the narrowest).
pub(super) fn grant_from_approval(
    policy: &Policy,
    request: &ApprovalRequest,
    at: DateTime<Utc>,
) -> Option<Grant> {
    let votes: Vec<_> = request
        .votes
        .iter()
        .filter(|vote| vote.revision == request.revision && vote.vote == VoteKind::Approve)
        .collect();
    if votes.is_empty() {
        return None;
    }
    let asks: Vec<&GrantAsk> = votes
        .iter()
        .map(|vote| vote.grant.as_ref())
        .collect::<Option<_>>()?;
    let tier_name = request.tier.clone()?;
    let limits = policy.tier(&tier_name)?.grants?;
    let ttl_seconds = asks.iter().map(|ask| ask.ttl_seconds).min()?;
    let uses = asks
        .iter()
        .map(|ask| ask.uses.unwrap_or(limits.max_uses))
        .min()?
        .min(limits.max_uses);
    let first_when = asks[0].when.clone();
    let when = first_when.filter(|when| asks.iter().all(|ask| ask.when.as_ref() == Some(when)));
    let expires_at = at + chrono::Duration::seconds(i64::try_from(ttl_seconds).ok()?);
    Some(Grant {
        id: new_grant_id(),
        agent: request.agent.clone(),
        action: request.action.clone(),
        action_hash: when.is_none().then(|| request.action_hash.clone()),
        when,
        tier: tier_name,
        created_by: votes.iter().map(|vote| vote.principal.clone()).collect(),
        request_id: request.id.clone(),
        created_at: at,
        expires_at,
        uses_left: uses,
        uses_granted: uses,
        revoked_at: None,
    })
}

impl Engine {
    /// Every grant, of one agent or all, newest first: spent, expired and revoked too.
    pub async fn list_grants(&self, agent: Option<&str>) -> EngineResult<Vec<Grant>> {
        Ok(self.store.list_grants(agent).await?)
    }

    /// Revokes a grant. Operators (`cli:`) and approvers of the grant's tier may.
    pub async fn revoke_grant(&self, id: &str, voter: &Voter) -> EngineResult<Grant> {
        let policy = self.policy();
        let voter = policy.identify(voter);
        let grant = self.store.grant(id).await?.ok_or(EngineError::NotFound)?;
        let operator = voter.principal.kind() == "cli";
        if !operator && !policy.admits(&grant.tier, &voter) {
            return Err(EngineError::Unprocessable {
                code: "not_allowed",
                message: format!(
                    "only approvers of tier {:?} and operators may revoke this grant",
                    grant.tier
                ),
            });
        }
        let at = self.now();
        let audit = NewAuditEvent {
            at,
            request_id: Some(grant.request_id.clone()),
            kind: AuditKind::GrantRevoked,
            actor: voter.principal.to_string(),
            payload: json!({"grant_id": grant.id}),
        };
        if !self.store.revoke_grant(id, at, audit).await? {
            return Err(EngineError::Conflict {
                code: "already_revoked",
                message: format!("grant {id} is already revoked"),
            });
        }
        Ok(Grant {
            revoked_at: Some(at),
            ..grant
        })
    }
}
