//! Standing grants: which grant covers a submission at intake, creating one when an
//! approval asked for it, listing and revoking.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::domain::Grant;
use crate::policy::{Effect, EvaluationInput, Policy, Verdict};

/// The first active grant that approves this submission: the verdict is require_approval
/// at the grant's tier or lower, and the grant covers the same agent and action and the
/// same args (its `action_hash`) or args its `when` accepts. Never over a deny or allow.
#[allow(clippy::too_many_arguments)]
pub(super) fn covering_grant<'a>(
    policy: &Policy,
    verdict: &Verdict,
    action: &str,
    args: &Value,
    agent: &str,
    context: &Value,
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
