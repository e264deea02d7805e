//! Table tests of the decision rules.
use super::*;
use crate::domain::{now, RequestContext};
use chrono::Duration;
use serde_json::json;
use std::collections::BTreeMap;

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
        sampled: false,
        shadow: Vec::new(),
        remind_at: None,
        escalate_at: None,
        previous_tiers: Vec::new(),
        approvals_by_group: BTreeMap::new(),
        escalation_step: 0,
        version: 1,
    }
}

fn person(name: &str) -> Principal {
    format!("cli:{name}").parse().unwrap()
}

static SAME_TIER: Reevaluation = Reevaluation::SameTier {
    approvals_required: 2,
    approvals_by_group: BTreeMap::new(),
};

fn voter(principal: &Principal) -> VoteContext<'_> {
    VoteContext {
        principal,
        aliases: &[],
        eligible: true,
        groups: &[],
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
            approvals_by_group: BTreeMap::new(),
            modifier_eligible,
            modifier_groups: Vec::new(),
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
        approvals_by_group: BTreeMap::new(),
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
        approvals_by_group: BTreeMap::new(),
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

#[test]
fn a_per_group_quorum_counts_any_assignment_of_people_to_slots() {
    let both = vec!["finance".to_string(), "ops".to_string()];
    let finance = vec!["finance".to_string()];
    let none: Vec<String> = Vec::new();
    let (dana, frank, carol) = (person("dana"), person("frank"), person("carol"));
    let mut request = pending(2);
    request.approvals_by_group = [("finance".to_string(), 1), ("ops".to_string(), 1)].into();
    // Someone in both groups fills one slot only.
    let effect = plan_vote(
        &mut request,
        approve(),
        VoteContext {
            groups: &both,
            ..voter(&dana)
        },
    );
    assert_eq!(
        effect,
        Ok(VoteEffect::Counted {
            approvals: 1,
            required: 2
        })
    );
    // An eligible approver in no quorum group is recorded but fills nothing.
    let effect = plan_vote(
        &mut request,
        approve(),
        VoteContext {
            groups: &none,
            ..voter(&carol)
        },
    );
    assert_eq!(
        effect,
        Ok(VoteEffect::Counted {
            approvals: 1,
            required: 2
        })
    );
    assert_eq!(request.votes.len(), 2);
    // A finance person: dana moves to the ops slot, and the quorum is met.
    let effect = plan_vote(
        &mut request,
        approve(),
        VoteContext {
            groups: &finance,
            ..voter(&frank)
        },
    );
    assert_eq!(effect, Ok(VoteEffect::Decided(Status::Approved)));
    assert_eq!(request.votes[2].groups, finance);
}
