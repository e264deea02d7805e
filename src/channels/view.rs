//! What every chat platform's card shows and what a click on it names, independent of
//! the platform that draws it.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::domain::{ApprovalRequest, GroupProgress, Principal, Status, VoteRequest};
use crate::policy::Policy;

/// Everything a card shows, independent of the platform that draws it.
#[derive(Clone, Debug, PartialEq)]
pub struct CardView {
    pub id: String,
    pub action: String,
    pub agent: String,
    pub requester: Option<Principal>,
    pub tier: Option<String>,
    pub rule: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub args: Value,
    pub summary: Option<String>,
    pub reason: Option<String>,
    pub reversible: Option<bool>,
    pub links: Vec<String>,
    pub status: Status,
    pub approvals: usize,
    pub approvals_required: u32,
    pub approvers: Vec<Principal>,
    pub revision: u32,
    /// Top-level args that approvers changed, as (key, before, after).
    pub changes: Vec<(String, Value, Value)>,
    pub modified_by: Option<Principal>,
    pub decided_by: Vec<Principal>,
    pub decided_at: Option<DateTime<Utc>>,
    pub decision_reason: Option<String>,
    pub escalated_at: Option<DateTime<Utc>>,
    /// "Approve for …" choices when the request is pending and its tier allows grants.
    pub grant_choices: Vec<GrantChoice>,
    /// Per-group quorum progress ("finance 1/1 · sre 0/1"); empty for a plain count.
    pub group_progress: Vec<GroupProgress>,
    /// Once escalated: the step of the tier's ladder reached, and how many steps it has.
    pub escalation_step: Option<(u32, u32)>,
}

/// One "Approve for …" choice: an approve vote asking for a grant of this length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantChoice {
    pub label: String,
    pub ttl_seconds: u64,
}

/// The durations offered, up to the tier's `max_ttl` (which is offered too).
const GRANT_STEPS: [u64; 5] = [3600, 4 * 3600, 8 * 3600, 24 * 3600, 7 * 24 * 3600];

impl CardView {
    /// The "Approve for …" choices of a pending request on a tier whose grants last at
    /// most `max_ttl`: the standard steps below it, and `max_ttl` itself.
    fn grant_choices(&self, max_ttl: Option<std::time::Duration>) -> Vec<GrantChoice> {
        let Some(max_ttl) = max_ttl.filter(|_| self.is_pending()) else {
            return Vec::new();
        };
        let max = max_ttl.as_secs();
        let mut steps: Vec<u64> = GRANT_STEPS.into_iter().filter(|step| *step < max).collect();
        steps.push(max);
        steps
            .into_iter()
            .map(|seconds| GrantChoice {
                label: format!(
                    "Approve for {}",
                    humantime::format_duration(std::time::Duration::from_secs(seconds))
                ),
                ttl_seconds: seconds,
            })
            .collect()
    }

    /// What a card shows of `request` under `policy`: values at its `redact` paths show
    /// as `[redacted]`, the escalation step is counted against the tier's ladder.
    pub fn of(request: &ApprovalRequest, policy: &Policy) -> Self {
        // Which keys changed is read on the real args: a change to a redacted value alone
        // must still show (as `[redacted]` before and after).
        let changed_keys: Vec<String> = changed_args(&request.original_args, &request.args)
            .into_iter()
            .map(|(key, _, _)| key)
            .collect();
        let request = &policy.redacted(request);
        let tier = request.tier.as_deref().and_then(|tier| policy.tier(tier));
        let ladder = tier.map_or(0, |tier| tier.escalation.len() as u32);
        let grant_max_ttl = tier
            .and_then(|tier| tier.grants)
            .map(|limits| limits.max_ttl);
        let step = request.escalation_steps_taken();
        let decision = request.decision.as_ref();
        let modified_by = (request.revision > 1)
            .then(|| {
                request
                    .votes
                    .iter()
                    .find(|vote| vote.revision == request.revision)
                    .map(|vote| vote.principal.clone())
            })
            .flatten();
        let mut view = Self {
            id: request.id.clone(),
            action: request.action.clone(),
            agent: request.agent.clone(),
            requester: request.on_behalf_of.clone(),
            tier: request.tier.clone(),
            rule: request.rule.clone(),
            expires_at: request.expires_at,
            args: request.args.clone(),
            summary: request.context.summary.clone(),
            reason: request.context.reason.clone(),
            reversible: request.context.reversible,
            links: request.context.links.clone(),
            status: request.status,
            approvals: request.approvals_counted() as usize,
            approvals_required: request.approvals_required,
            approvers: request.current_approvers().into_iter().cloned().collect(),
            revision: request.revision,
            changes: changed_keys
                .into_iter()
                .map(|key| {
                    let shown = |args: &Value| args.get(&key).cloned().unwrap_or(Value::Null);
                    let (before, after) = (shown(&request.original_args), shown(&request.args));
                    (key, before, after)
                })
                .collect(),
            modified_by,
            decided_by: decision
                .map(|decision| decision.by.clone())
                .unwrap_or_default(),
            decided_at: decision.map(|decision| decision.at),
            decision_reason: decision.and_then(|decision| decision.reason.clone()),
            escalated_at: request.escalated_at,
            grant_choices: Vec::new(),
            group_progress: request.group_progress(),
            escalation_step: (step > 0).then_some((step, ladder.max(step))),
        };
        view.grant_choices = view.grant_choices(grant_max_ttl);
        view
    }

    pub fn is_pending(&self) -> bool {
        self.status == Status::Pending
    }
}

/// Top-level keys whose values differ between two args objects, in key order.
pub fn changed_args(before: &Value, after: &Value) -> Vec<(String, Value, Value)> {
    let (Some(before), Some(after)) = (before.as_object(), after.as_object()) else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|key| {
            let old = before.get(key).cloned().unwrap_or(Value::Null);
            let new = after.get(key).cloned().unwrap_or(Value::Null);
            (old != new).then(|| (key.clone(), old, new))
        })
        .collect()
}

/// What a card's button, a modal or a listing names: the request AND the revision the
/// person was shown, so a vote binds to exactly what they saw. Carried as a small JSON
/// object in button values, modal metadata and Adaptive Card data.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VoteTarget {
    pub request_id: String,
    pub revision: u32,
    /// An "Approve for …" choice: the grant's length in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_seconds: Option<u64>,
}

impl VoteTarget {
    pub fn of(card: &CardView) -> Self {
        Self {
            request_id: card.id.clone(),
            revision: card.revision,
            grant_seconds: None,
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `None` for anything else, a bare request id (a card from before votes were bound
    /// to revisions) included: such a click is answered with the current card.
    pub fn decode(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

/// Button action ids, the same on every platform.
pub const APPROVE: &str = "approve";
pub const DENY: &str = "deny";
pub const MODIFY: &str = "modify";
/// The "Approve for …" choice: an approve vote that asks for a grant.
pub const APPROVE_FOR: &str = "approve_for";

/// Parses the args an approver typed into a modify form.
pub fn parse_modified_args(text: &str) -> Result<Value, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|error| format!("not valid JSON: {error}"))?;
    if !value.is_object() {
        return Err("args must be a JSON object, like {\"amount\": 100}".into());
    }
    Ok(value)
}

/// A vote asked for in chat, ready for the engine.
pub fn vote_from_form(action: &str, text: Option<&str>) -> Result<VoteRequest, String> {
    match action {
        APPROVE => Ok(VoteRequest::Approve {
            note: text.map(str::to_string),
        }),
        DENY => Ok(VoteRequest::Deny {
            reason: text.unwrap_or_default().to_string(),
        }),
        MODIFY => Ok(VoteRequest::Modify {
            args: parse_modified_args(text.unwrap_or_default())?,
            note: None,
        }),
        other => Err(format!("unknown action {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changed_args_lists_differences_by_key() {
        let table = [
            (
                json!({"a": 1, "b": 2}),
                json!({"a": 1, "b": 3}),
                vec![("b", json!(2), json!(3))],
            ),
            (
                json!({"a": 1}),
                json!({"a": 1, "c": true}),
                vec![("c", json!(null), json!(true))],
            ),
            (
                json!({"a": 1}),
                json!({}),
                vec![("a", json!(1), json!(null))],
            ),
            (json!({"a": 1}), json!({"a": 1}), vec![]),
        ];
        for (before, after, expected) in table {
            let expected: Vec<(String, Value, Value)> = expected
                .into_iter()
                .map(|(key, old, new)| (key.to_string(), old, new))
                .collect();
            assert_eq!(changed_args(&before, &after), expected);
        }
    }

    #[test]
    fn vote_targets_round_trip_and_refuse_bare_ids() {
        let target = VoteTarget {
            request_id: "apr_1".into(),
            revision: 3,
            grant_seconds: None,
        };
        assert_eq!(VoteTarget::decode(&target.encode()), Some(target));
        for text in [
            "apr_1",
            "",
            "{\"request_id\":\"apr_1\"}",
            "{\"revision\":1}",
        ] {
            assert_eq!(VoteTarget::decode(text), None, "{text}");
        }
    }

    #[test]
    fn modified_args_must_be_an_object() {
        assert!(parse_modified_args("{\"amount\": 5}").is_ok());
        assert!(parse_modified_args("[1]")
            .unwrap_err()
            .contains("JSON object"));
        assert!(parse_modified_args("{amount: 5}")
            .unwrap_err()
            .contains("not valid JSON"));
    }
}
