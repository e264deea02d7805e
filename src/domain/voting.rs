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
    /// Where the vote came from (`cli`, `slack`, `teams`), for the audit trail.
    pub channel: &'static str,
    /// The chat platform was asked for the voter's email and could not tell (hidden
    /// profile, guest, missing scope): where people are named by email, such a voter
    /// cannot be told apart from the requester or an approver, so they are refused.
    pub email_unreadable: bool,
}

impl Voter {
    /// A voter acting as `principal`, through the channel its kind names (`cli` for any
    /// kind without a chat channel of its own).
    pub fn new(principal: Principal) -> Self {
        let channel = match principal.kind() {
            "slack" => "slack",
            "teams" => "teams",
            _ => "cli",
        };
        Self {
            principal,
            aliases: Vec::new(),
            groups: Vec::new(),
            channel,
            email_unreadable: false,
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
    /// The email behind the voter's chat account could not be read, and the request's
    /// policy, requester or owners name people by email.
    pub email_unreadable: bool,
    /// The revision the voter saw (card button, modal, `--revision`); `None` for a typed
    /// command, which acts on the current revision.
    pub seen_revision: Option<u32>,
    /// For a modification: what the policy says of the new args.
    pub modification: Option<&'a Reevaluation>,
    pub now: DateTime<Utc>,
}

/// The policy's verdict on modified args, as the engine found it.
#[derive(Clone, Debug, PartialEq)]
pub enum Reevaluation {
    /// The new args are denied: the modification is refused.
    Denied {
        rule: Option<String>,
        reason: String,
    },
    /// The request stays in its tier (the verdict asks for it or a lower one: never
    /// down), needing as many approvals as that tier asks now (a reloaded policy may ask
    /// more; never fewer than before).
    SameTier { approvals_required: u32 },
    /// The new args need a higher tier: the request moves there.
    MovesUp {
        tier: String,
        rule: Option<String>,
        approvals_required: u32,
        /// Is the modifier an approver of the new tier? Only then does their modification
        /// count as its first approval.
        modifier_eligible: bool,
    },
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
    #[error("this request changed since you saw it (you saw revision {seen}; it is now at revision {current}); look at the current card and vote again")]
    StaleRevision { seen: u32, current: u32 },
    #[error("the policy denies the new args ({}): {reason}; nothing changed", rule_words(.rule))]
    ModificationDenied {
        rule: Option<String>,
        reason: String,
    },
    #[error("signoff cannot read the email address of {0} (hidden profile, guest account or missing users:read.email scope), and this request's policy, requester or owners name people by email, so it cannot tell whether you may decide it; nothing was recorded")]
    EmailUnreadable(String),
}

fn rule_words(rule: &Option<String>) -> String {
    match rule {
        Some(rule) => format!("rule {rule:?}"),
        None => "the policy default".into(),
    }
}

impl VoteRefusal {
    /// The stable code of this refusal, for APIs and chat answers.
    pub fn code(&self) -> &'static str {
        match self {
            VoteRefusal::NotPending(_) => "not_pending",
            VoteRefusal::Expired => "expired",
            VoteRefusal::Requester(_) => "requester_cannot_approve",
            VoteRefusal::NotEligible(..) => "not_an_approver",
            VoteRefusal::AlreadyApproved(_) => "already_voted",
            VoteRefusal::ReasonRequired => "reason_required",
            VoteRefusal::ArgsNotObject => "invalid_args",
            VoteRefusal::ArgsUnchanged => "args_unchanged",
            VoteRefusal::StaleRevision { .. } => "stale_revision",
            VoteRefusal::ModificationDenied { .. } => "modification_denied",
            VoteRefusal::EmailUnreadable(_) => "email_unreadable",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum VoteRequest {
    Approve { note: Option<String> },
    Deny { reason: String },
    Modify { args: Value, note: Option<String> },
}

/// Could this voter cast this kind of vote now? The same checks `plan_vote` makes first.
pub fn check_voter(
    request: &ApprovalRequest,
    kind: VoteKind,
    voter: &VoteContext<'_>,
) -> Result<(), VoteRefusal> {
    if request.status != Status::Pending {
        return Err(VoteRefusal::NotPending(request.status));
    }
    if request.is_overdue(voter.now) {
        return Err(VoteRefusal::Expired);
    }
    if let Some(seen) = voter.seen_revision {
        if seen != request.revision {
            return Err(VoteRefusal::StaleRevision {
                seen,
                current: request.revision,
            });
        }
    }
    if voter.email_unreadable {
        return Err(VoteRefusal::EmailUnreadable(voter.principal.to_string()));
    }
    let tier = request.tier.clone().unwrap_or_default();
    if kind != VoteKind::Deny && voter.is_requester {
        return Err(VoteRefusal::Requester(voter.principal.to_string()));
    }
    if !voter.eligible {
        return Err(VoteRefusal::NotEligible(voter.principal.to_string(), tier));
    }
    let identities = std::iter::once(voter.principal).chain(voter.aliases.iter());
    if kind == VoteKind::Approve && request.approved_by_any(identities) {
        return Err(VoteRefusal::AlreadyApproved(voter.principal.to_string()));
    }
    Ok(())
}

impl VoteRequest {
    pub fn kind(&self) -> VoteKind {
        match self {
            VoteRequest::Approve { .. } => VoteKind::Approve,
            VoteRequest::Deny { .. } => VoteKind::Deny,
            VoteRequest::Modify { .. } => VoteKind::Modify,
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
            // The engine re-evaluates the policy on the new args; planning without that
            // verdict would let a modification around it, so none means refused.
            let modifier_counts = match voter.modification {
                None => {
                    return Err(VoteRefusal::ModificationDenied {
                        rule: None,
                        reason: "the new args were not checked against the policy".into(),
                    })
                }
                Some(Reevaluation::Denied { rule, reason }) => {
                    return Err(VoteRefusal::ModificationDenied {
                        rule: rule.clone(),
                        reason: reason.clone(),
                    })
                }
                Some(Reevaluation::SameTier { approvals_required }) => {
                    request.approvals_required = *approvals_required;
                    true
                }
                Some(Reevaluation::MovesUp {
                    tier,
                    rule,
                    approvals_required,
                    modifier_eligible,
                }) => {
                    if let Some(previous) = request.tier.replace(tier.clone()) {
                        request.previous_tiers.push(previous);
                    }
                    request.rule = rule.clone();
                    request.approvals_required = *approvals_required;
                    *modifier_eligible
                }
            };
            // A new revision: earlier approvals are void, the modifier's vote is the first
            // (when they may approve in the request's tier, as it now is).
            request.revision += 1;
            request.action_hash = action_hash(&request.action, &args);
            request.args = args;
            if modifier_counts {
                record(request, &voter, VoteKind::Approve, note);
            } else {
                record(request, &voter, VoteKind::Modify, note);
            }
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
            previous_tiers: Vec::new(),
            version: 1,
        }
    }

    fn person(name: &str) -> Principal {
        format!("cli:{name}").parse().unwrap()
    }

    const SAME_TIER: Reevaluation = Reevaluation::SameTier {
        approvals_required: 2,
    };

    fn voter(principal: &Principal) -> VoteContext<'_> {
        VoteContext {
            principal,
            aliases: &[],
            eligible: true,
            is_requester: false,
            email_unreadable: false,
            seen_revision: None,
            modification: Some(&SAME_TIER),
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
        let denied = Reevaluation::Denied {
            rule: Some("no-drop".into()),
            reason: "never".into(),
        };
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
                "vote on a revision no longer current",
                VoteContext {
                    seen_revision: Some(0),
                    ..voter(&alice)
                },
                approve(),
                VoteRefusal::StaleRevision {
                    seen: 0,
                    current: 1,
                },
            ),
            (
                "modify on a revision no longer current",
                VoteContext {
                    seen_revision: Some(2),
                    ..voter(&alice)
                },
                VoteRequest::Modify {
                    args: json!({"amount": 1}),
                    note: None,
                },
                VoteRefusal::StaleRevision {
                    seen: 2,
                    current: 1,
                },
            ),
            (
                "modify into args the policy denies",
                VoteContext {
                    modification: Some(&denied),
                    ..voter(&alice)
                },
                VoteRequest::Modify {
                    args: json!({"amount": 1}),
                    note: None,
                },
                VoteRefusal::ModificationDenied {
                    rule: Some("no-drop".into()),
                    reason: "never".into(),
                },
            ),
            (
                "modify without a policy verdict",
                VoteContext {
                    modification: None,
                    ..voter(&alice)
                },
                VoteRequest::Modify {
                    args: json!({"amount": 1}),
                    note: None,
                },
                VoteRefusal::ModificationDenied {
                    rule: None,
                    reason: "the new args were not checked against the policy".into(),
                },
            ),
            (
                "email unreadable where people are named by email",
                VoteContext {
                    email_unreadable: true,
                    ..voter(&alice)
                },
                approve(),
                VoteRefusal::EmailUnreadable("cli:alice".into()),
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
    fn modify_into_a_higher_tier_moves_the_request_up() {
        let alice = person("alice");
        for (modifier_eligible, approvals, vote_kind) in
            [(true, 1, VoteKind::Approve), (false, 0, VoteKind::Modify)]
        {
            let mut request = pending(1);
            request.tier = Some("medium".into());
            let moves_up = Reevaluation::MovesUp {
                tier: "high".into(),
                rule: Some("production".into()),
                approvals_required: 2,
                modifier_eligible,
            };
            let effect = plan_vote(
                &mut request,
                VoteRequest::Modify {
                    args: json!({"amount": 5000}),
                    note: None,
                },
                VoteContext {
                    modification: Some(&moves_up),
                    ..voter(&alice)
                },
            );
            assert_eq!(
                effect,
                Ok(VoteEffect::Counted {
                    approvals,
                    required: 2
                }),
                "modifier eligible: {modifier_eligible}"
            );
            assert_eq!(request.tier.as_deref(), Some("high"));
            assert_eq!(request.rule.as_deref(), Some("production"));
            assert_eq!(request.previous_tiers, vec!["medium".to_string()]);
            assert_eq!(request.revision, 2);
            assert_eq!(request.votes.last().map(|vote| vote.vote), Some(vote_kind));
            assert_eq!(request.status, Status::Pending);
        }
    }

    #[test]
    fn a_stale_vote_of_a_second_approver_does_not_decide() {
        let (alice, bob) = (person("alice"), person("bob"));
        let mut request = pending(2);
        plan_vote(&mut request, approve(), voter(&alice)).unwrap();
        plan_vote(
            &mut request,
            VoteRequest::Modify {
                args: json!({"amount": 9}),
                note: None,
            },
            voter(&alice),
        )
        .unwrap();
        // Bob saw revision 1: his click must not count for revision 2.
        let before = request.clone();
        let stale = VoteContext {
            seen_revision: Some(1),
            ..voter(&bob)
        };
        assert_eq!(
            plan_vote(&mut request, approve(), stale),
            Err(VoteRefusal::StaleRevision {
                seen: 1,
                current: 2
            })
        );
        assert_eq!(request, before);
    }

    #[test]
    fn modify_with_one_approval_required_decides() {
        let alice = person("alice");
        let mut request = pending(1);
        let one = Reevaluation::SameTier {
            approvals_required: 1,
        };
        let effect = plan_vote(
            &mut request,
            VoteRequest::Modify {
                args: json!({"amount": 50}),
                note: None,
            },
            VoteContext {
                modification: Some(&one),
                ..voter(&alice)
            },
        );
        assert_eq!(effect, Ok(VoteEffect::Decided(Status::Approved)));
        assert!(request.decision.unwrap().modified);
    }

    #[test]
    fn modify_takes_the_quorum_the_policy_asks_now() {
        // A reloaded policy asks two approvals of the tier: the modified args need them.
        let alice = person("alice");
        let mut request = pending(1);
        let two = Reevaluation::SameTier {
            approvals_required: 2,
        };
        let effect = plan_vote(
            &mut request,
            VoteRequest::Modify {
                args: json!({"amount": 50}),
                note: None,
            },
            VoteContext {
                modification: Some(&two),
                ..voter(&alice)
            },
        );
        assert_eq!(
            effect,
            Ok(VoteEffect::Counted {
                approvals: 1,
                required: 2
            })
        );
    }

    #[test]
    fn the_revision_at_a_time_counts_only_earlier_modifications() {
        let alice = person("alice");
        let mut request = pending(2);
        let start = now();
        let modify = |request: &mut ApprovalRequest, amount: u32, at| {
            plan_vote(
                request,
                VoteRequest::Modify {
                    args: json!({ "amount": amount }),
                    note: None,
                },
                VoteContext {
                    now: at,
                    ..voter(&alice)
                },
            )
            .unwrap();
        };
        modify(&mut request, 10, start + Duration::seconds(10));
        modify(&mut request, 20, start + Duration::seconds(20));
        let table = [(0, 1), (9, 1), (10, 1), (11, 2), (20, 2), (21, 3)];
        for (seconds, revision) in table {
            assert_eq!(
                request.revision_at(start + Duration::seconds(seconds)),
                revision,
                "at +{seconds}s"
            );
        }
    }
}
