//! The decision rules for one vote: eligibility, separation of duties, quorum, modification.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{action_hash, ApprovalRequest, Principal, Status, Vote, VoteKind};

/// Who is voting: the principal they act as, plus what else they are known as (their
/// email address through Slack, the Slack user groups they belong to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Voter {
    pub principal: Principal,
    pub aliases: Vec<Principal>,
    /// `slack-group:S…` memberships, resolved by the channel.
    pub groups: Vec<String>,
}

impl Voter {
    pub fn new(principal: Principal) -> Self {
        Self {
            principal,
            aliases: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// The principal and every alias.
    pub fn identities(&self) -> impl Iterator<Item = &Principal> {
        std::iter::once(&self.principal).chain(self.aliases.iter())
    }

    pub fn is(&self, principal: &Principal) -> bool {
        self.identities().any(|identity| identity == principal)
    }
}

/// What the engine knows about the voter, resolved before planning.
#[derive(Clone, Copy, Debug)]
pub struct VoteContext<'a> {
    pub principal: &'a Principal,
    /// The voter's other identities.
    pub aliases: &'a [Principal],
    /// In the approvers of the request's tier.
    pub eligible: bool,
    /// The request's `on_behalf_of`, or an owner of the requesting agent.
    pub is_requester: bool,
    pub now: DateTime<Utc>,
}

/// What the voter asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum VoteEffect {
    /// The vote counted; the request still waits for `required - approvals` more.
    Counted { approvals: u32, required: u32 },
    /// The vote ended the request.
    Decided(Status),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VoteRefusal {
    #[error("this request is already {}", .0.as_str())]
    NotPending(Status),
    #[error("this request expired before the vote")]
    Expired,
    #[error("{0} requested this action (or owns the agent) and cannot approve or modify it")]
    Requester(String),
    #[error("{0} is not an approver for the {1} tier")]
    NotEligible(String, String),
    #[error(
        "{0} already approved this request; a second approval by the same person does not count"
    )]
    AlreadyApproved(String),
    #[error("a deny needs a reason")]
    ReasonRequired,
    #[error("args must be a JSON object")]
    ArgsNotObject,
    #[error("the new args are the same as the current ones; approve instead")]
    ArgsUnchanged,
}

#[derive(Clone, Debug, PartialEq)]
pub enum VoteRequest {
    Approve { note: Option<String> },
    Deny { reason: String },
    Modify { args: Value, note: Option<String> },
}

/// The kinds of vote, for checking whether someone may cast one before asking them for
/// details (a reason, new args).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteKindRequested {
    Approve,
    Deny,
    Modify,
}

/// Could this voter cast this kind of vote now? The same checks `plan_vote` makes first.
pub fn check_voter(
    request: &ApprovalRequest,
    kind: VoteKindRequested,
    voter: &VoteContext<'_>,
) -> Result<(), VoteRefusal> {
    if request.status != Status::Pending {
        return Err(VoteRefusal::NotPending(request.status));
    }
    if request.is_overdue(voter.now) {
        return Err(VoteRefusal::Expired);
    }
    let tier = request.tier.clone().unwrap_or_default();
    if kind != VoteKindRequested::Deny && voter.is_requester {
        return Err(VoteRefusal::Requester(voter.principal.to_string()));
    }
    if !voter.eligible {
        return Err(VoteRefusal::NotEligible(voter.principal.to_string(), tier));
    }
    let identities = std::iter::once(voter.principal).chain(voter.aliases.iter());
    if kind == VoteKindRequested::Approve && request.approved_by_any(identities) {
        return Err(VoteRefusal::AlreadyApproved(voter.principal.to_string()));
    }
    Ok(())
}

impl VoteRequest {
    pub fn kind(&self) -> VoteKindRequested {
        match self {
            VoteRequest::Approve { .. } => VoteKindRequested::Approve,
            VoteRequest::Deny { .. } => VoteKindRequested::Deny,
            VoteRequest::Modify { .. } => VoteKindRequested::Modify,
        }
    }
}

/// Applies one vote to an in-memory copy of the request. The caller persists the result
/// with a compare-and-set, so a concurrent change makes it plan again on fresh state.
pub fn plan_vote(
    request: &mut ApprovalRequest,
    vote: VoteRequest,
    voter: VoteContext<'_>,
) -> Result<VoteEffect, VoteRefusal> {
    check_voter(request, vote.kind(), &voter)?;
    match vote {
        VoteRequest::Deny { reason } => {
            let reason = reason.trim().to_string();
            if reason.is_empty() {
                return Err(VoteRefusal::ReasonRequired);
            }
            record(request, &voter, VoteKind::Deny, Some(reason.clone()));
            request.decide(
                Status::Denied,
                vec![voter.principal.clone()],
                Some(reason),
                voter.now,
            );
            Ok(VoteEffect::Decided(Status::Denied))
        }
        VoteRequest::Approve { note } => {
            record(request, &voter, VoteKind::Approve, note);
            Ok(count_approvals(request, voter.now))
        }
        VoteRequest::Modify { args, note } => {
            if !args.is_object() {
                return Err(VoteRefusal::ArgsNotObject);
            }
            if args == request.args {
                return Err(VoteRefusal::ArgsUnchanged);
            }
            // A new revision: earlier approvals are void, the modifier's vote is the first.
            request.revision += 1;
            request.action_hash = action_hash(&request.action, &args);
            request.args = args;
            record(request, &voter, VoteKind::Approve, note);
            Ok(count_approvals(request, voter.now))
        }
    }
}

fn record(
    request: &mut ApprovalRequest,
    voter: &VoteContext<'_>,
    kind: VoteKind,
    note: Option<String>,
) {
    request.votes.push(Vote {
        principal: voter.principal.clone(),
        vote: kind,
        note: note.filter(|text| !text.trim().is_empty()),
        at: voter.now,
        revision: request.revision,
        aliases: voter.aliases.to_vec(),
    });
}

fn count_approvals(request: &mut ApprovalRequest, at: DateTime<Utc>) -> VoteEffect {
    let approvers: Vec<Principal> = request.current_approvers().into_iter().cloned().collect();
    let approvals = approvers.len() as u32;
    if approvals >= request.approvals_required {
        request.decide(Status::Approved, approvers, None, at);
        VoteEffect::Decided(Status::Approved)
    } else {
        VoteEffect::Counted {
            approvals,
            required: request.approvals_required,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{now, RequestContext};
    use chrono::Duration;
    use serde_json::json;

    fn pending(required: u32) -> ApprovalRequest {
        let at = now();
        ApprovalRequest {
            id: "apr_test".into(),
            agent: "finance-bot".into(),
            action: "payments.refund".into(),
            args: json!({"amount": 500}),
            original_args: json!({"amount": 500}),
            context: RequestContext::default(),
            on_behalf_of: None,
            callback_url: None,
            status: Status::Pending,
            tier: Some("high".into()),
            rule: Some("large-refund".into()),
            approvals_required: required,
            revision: 1,
            votes: vec![],
            decision: None,
            action_hash: action_hash("payments.refund", &json!({"amount": 500})),
            policy_hash: "sha256:x".into(),
            created_at: at,
            expires_at: Some(at + Duration::minutes(30)),
            executed: None,
            reminded_at: None,
            escalated_at: None,
            remind_at: None,
            escalate_at: None,
            version: 1,
        }
    }

    fn person(name: &str) -> Principal {
        format!("cli:{name}").parse().unwrap()
    }

    fn voter(principal: &Principal) -> VoteContext<'_> {
        VoteContext {
            principal,
            aliases: &[],
            eligible: true,
            is_requester: false,
            now: now(),
        }
    }

    fn approve() -> VoteRequest {
        VoteRequest::Approve { note: None }
    }

    #[test]
    fn quorum_needs_distinct_approvers() {
        let (alice, bob) = (person("alice"), person("bob"));
        let mut request = pending(2);
        assert_eq!(
            plan_vote(&mut request, approve(), voter(&alice)),
            Ok(VoteEffect::Counted {
                approvals: 1,
                required: 2
            })
        );
        assert_eq!(
            plan_vote(&mut request, approve(), voter(&alice)),
            Err(VoteRefusal::AlreadyApproved("cli:alice".into()))
        );
        assert_eq!(
            plan_vote(&mut request, approve(), voter(&bob)),
            Ok(VoteEffect::Decided(Status::Approved))
        );
        let decision = request.decision.as_ref().unwrap();
        assert_eq!(decision.by, vec![alice, bob]);
        assert!(!decision.modified);
        assert_eq!(request.status, Status::Approved);
    }

    #[test]
    fn refusals_change_nothing() {
        let alice = person("alice");
        let table: Vec<(&str, VoteContext<'_>, VoteRequest, VoteRefusal)> = vec![
            (
                "outsider approves",
                VoteContext {
                    eligible: false,
                    ..voter(&alice)
                },
                approve(),
                VoteRefusal::NotEligible("cli:alice".into(), "high".into()),
            ),
            (
                "outsider denies",
                VoteContext {
                    eligible: false,
                    ..voter(&alice)
                },
                VoteRequest::Deny {
                    reason: "no".into(),
                },
                VoteRefusal::NotEligible("cli:alice".into(), "high".into()),
            ),
            (
                "requester approves",
                VoteContext {
                    is_requester: true,
                    ..voter(&alice)
                },
                approve(),
                VoteRefusal::Requester("cli:alice".into()),
            ),
            (
                "requester modifies",
                VoteContext {
                    is_requester: true,
                    ..voter(&alice)
                },
                VoteRequest::Modify {
                    args: json!({"amount": 1}),
                    note: None,
                },
                VoteRefusal::Requester("cli:alice".into()),
            ),
            (
                "deny without reason",
                voter(&alice),
                VoteRequest::Deny {
                    reason: "  ".into(),
                },
                VoteRefusal::ReasonRequired,
            ),
            (
                "modify to a non-object",
                voter(&alice),
                VoteRequest::Modify {
                    args: json!([1]),
                    note: None,
                },
                VoteRefusal::ArgsNotObject,
            ),
            (
                "modify to the same args",
                voter(&alice),
                VoteRequest::Modify {
                    args: json!({"amount": 500}),
                    note: None,
                },
                VoteRefusal::ArgsUnchanged,
            ),
            (
                "vote after expiry",
                VoteContext {
                    now: now() + Duration::hours(1),
                    ..voter(&alice)
                },
                approve(),
                VoteRefusal::Expired,
            ),
        ];
        for (name, context, vote, refusal) in table {
            let mut request = pending(2);
            let before = request.clone();
            assert_eq!(
                plan_vote(&mut request, vote, context),
                Err(refusal),
                "{name}"
            );
            assert_eq!(request, before, "{name} changed the request");
        }
    }

    #[test]
    fn decided_requests_refuse_votes() {
        let alice = person("alice");
        for status in [
            Status::Approved,
            Status::Denied,
            Status::Expired,
            Status::Cancelled,
        ] {
            let mut request = pending(1);
            request.status = status;
            assert_eq!(
                plan_vote(&mut request, approve(), voter(&alice)),
                Err(VoteRefusal::NotPending(status))
            );
        }
    }

    #[test]
    fn one_person_under_two_names_counts_once() {
        let slack_alice: Principal = "slack:U01ALICE".parse().unwrap();
        let email_alice: Principal = "email:alice@example.com".parse().unwrap();
        let mut request = pending(2);
        let aliases = [email_alice.clone()];
        let in_slack = VoteContext {
            aliases: &aliases,
            ..voter(&slack_alice)
        };
        plan_vote(&mut request, approve(), in_slack).unwrap();
        // The same person, now by email address (say, from the CLI): refused.
        assert_eq!(
            plan_vote(&mut request, approve(), voter(&email_alice)),
            Err(VoteRefusal::AlreadyApproved(
                "email:alice@example.com".into()
            ))
        );
        assert_eq!(request.current_approvers().len(), 1);
    }

    #[test]
    fn one_deny_ends_the_request() {
        let (alice, bob) = (person("alice"), person("bob"));
        let mut request = pending(2);
        plan_vote(&mut request, approve(), voter(&alice)).unwrap();
        let effect = plan_vote(
            &mut request,
            VoteRequest::Deny {
                reason: " too large ".into(),
            },
            voter(&bob),
        );
        assert_eq!(effect, Ok(VoteEffect::Decided(Status::Denied)));
        let decision = request.decision.unwrap();
        assert_eq!(decision.by, vec![bob]);
        assert_eq!(decision.reason.as_deref(), Some("too large"));
    }

    #[test]
    fn requester_may_still_deny_when_eligible() {
        let alice = person("alice");
        let mut request = pending(2);
        let context = VoteContext {
            is_requester: true,
            ..voter(&alice)
        };
        let effect = plan_vote(
            &mut request,
            VoteRequest::Deny {
                reason: "wrong".into(),
            },
            context,
        );
        assert_eq!(effect, Ok(VoteEffect::Decided(Status::Denied)));
    }

    #[test]
    fn modify_starts_a_new_revision() {
        let (alice, bob, carol) = (person("alice"), person("bob"), person("carol"));
        let mut request = pending(2);
        plan_vote(&mut request, approve(), voter(&alice)).unwrap();
        let old_hash = request.action_hash.clone();
        let effect = plan_vote(
            &mut request,
            VoteRequest::Modify {
                args: json!({"amount": 100}),
                note: Some("cap".into()),
            },
            voter(&bob),
        );
        // Alice's approval is void; Bob's modification is the first approval of revision 2.
        assert_eq!(
            effect,
            Ok(VoteEffect::Counted {
                approvals: 1,
                required: 2
            })
        );
        assert_eq!(request.revision, 2);
        assert_ne!(request.action_hash, old_hash);
        assert_eq!(
            plan_vote(&mut request, approve(), voter(&bob)),
            Err(VoteRefusal::AlreadyApproved("cli:bob".into()))
        );
        assert_eq!(
            plan_vote(&mut request, approve(), voter(&carol)),
            Ok(VoteEffect::Decided(Status::Approved))
        );
        let decision = request.decision.unwrap();
        assert!(decision.modified);
        assert_eq!(decision.args, json!({"amount": 100}));
        assert_eq!(decision.by, vec![bob, carol]);
    }

    #[test]
    fn modify_with_one_approval_required_decides() {
        let alice = person("alice");
        let mut request = pending(1);
        let effect = plan_vote(
            &mut request,
            VoteRequest::Modify {
                args: json!({"amount": 50}),
                note: None,
            },
            voter(&alice),
        );
        assert_eq!(effect, Ok(VoteEffect::Decided(Status::Approved)));
        assert!(request.decision.unwrap().modified);
    }
}
