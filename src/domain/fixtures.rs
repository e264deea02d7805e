//! Requests for unit tests: one pending refund that card renderers and stores start from.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;

use super::{action_hash, ApprovalRequest, RequestContext, Status, Vote, VoteKind};

/// 2026-11-21 10:`minute`:00 UTC.
pub fn at(minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 10, minute, 0)
        .single()
        .expect("a valid time")
}

/// A €2,000 refund at tier `high` (two approvals), asked for by `requester` and approved
/// once, by `approver`, five minutes in.
pub fn pending_refund(requester: &str, approver: &str) -> ApprovalRequest {
    ApprovalRequest {
        id: "apr_test0000000000000000000000".into(),
        agent: "finance-bot".into(),
        action: "payments.refund".into(),
        args: json!({"amount": 2000, "currency": "EUR", "order": "A-1042"}),
        original_args: json!({"amount": 2000, "currency": "EUR", "order": "A-1042"}),
        context: RequestContext {
            summary: Some("Refund order A-1042".into()),
            reason: Some("Item arrived broken".into()),
            reversible: Some(false),
            links: vec!["https://shop.example.com/orders/A-1042".into()],
            extra: serde_json::Map::new(),
        },
        on_behalf_of: Some(requester.parse().expect("a principal")),
        callback_url: None,
        status: Status::Pending,
        tier: Some("high".into()),
        rule: Some("large-refund".into()),
        approvals_required: 2,
        revision: 1,
        votes: vec![Vote {
            principal: approver.parse().expect("a principal"),
            vote: VoteKind::Approve,
            note: None,
            at: at(5),
            revision: 1,
            aliases: vec![],
            grant: None,
            groups: vec![],
        }],
        decision: None,
        sampled: false,
        shadow: Vec::new(),
        action_hash: action_hash("payments.refund", &json!({})),
        policy_hash: "sha256:policy".into(),
        created_at: at(0),
        expires_at: Some(at(59)),
        executed: None,
        reminded_at: None,
        escalated_at: None,
        remind_at: None,
        escalate_at: None,
        previous_tiers: Vec::new(),
        approvals_by_group: Default::default(),
        escalation_step: 0,
        version: 2,
    }
}
