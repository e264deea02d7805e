//! The approval request as agents see it, its status machine and the canonical action hash.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::{canonical_json, fill_quorum, GroupProgress, Principal};

/// The current time at millisecond precision, so stored and echoed timestamps agree exactly.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// A new request id: see `request_id_at`.
pub fn new_request_id() -> String {
    request_id_at(now().timestamp_millis(), rand::thread_rng().gen())
}

/// `apr_` and a ULID in lower case: 48 bits of milliseconds, then 80 random bits, in
/// Crockford's base 32. Ids made later sort later, so new rows land at the end of the
/// primary-key index instead of on a random page of it: a commit rewrites fewer pages.
fn request_id_at(milliseconds: i64, random: u128) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let milliseconds = u128::from(milliseconds.clamp(0, (1 << 48) - 1) as u64);
    let value = (milliseconds << 80) | (random & ((1 << 80) - 1));
    let suffix: String = (0..26)
        .rev()
        .map(|place| ALPHABET[((value >> (place * 5)) & 31) as usize] as char)
        .collect();
    format!("apr_{suffix}")
}

/// SHA-256 over the RFC 8785 canonical JSON of `{"action","args"}`.
pub fn action_hash(action: &str, args: &Value) -> String {
    // The object `{"action","args"}`, keys already in canonical order.
    let mut canonical = Vec::with_capacity(64);
    canonical.extend_from_slice(br#"{"action":"#);
    canonical_json::write_string(&mut canonical, action);
    canonical.extend_from_slice(br#","args":"#);
    canonical_json::write_value(&mut canonical, args);
    canonical.push(b'}');
    format!("sha256:{}", hex::encode(Sha256::digest(canonical)))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Approved,
    Denied,
    Expired,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Denied => "denied",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => Status::Pending,
            "approved" => Status::Approved,
            "denied" => Status::Denied,
            "expired" => Status::Expired,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }

    /// Only pending requests change status; every final status is terminal.
    pub fn can_become(self, next: Status) -> bool {
        self == Status::Pending && next != Status::Pending
    }

    pub fn is_final(self) -> bool {
        self != Status::Pending
    }
}

/// The outcome recorded in a final decision; the same words as the final statuses.
pub type Outcome = Status;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VoteKind {
    Approve,
    Deny,
    /// A modification by someone who is not an approver of the tier it moved the request
    /// to: it made the new revision but does not count as one of its approvals.
    Modify,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Vote {
    pub principal: Principal,
    pub vote: VoteKind,
    // Always serialized, as null when absent: required for the OpenAPI document too.
    #[schema(required = true)]
    pub note: Option<String>,
    pub at: DateTime<Utc>,
    /// The args revision this vote was cast on; votes on earlier revisions no longer count.
    pub revision: u32,
    /// Other identities of the voter (e.g. the email behind a Slack user), so one person
    /// cannot count twice under two names. Personal data the agent has no need for: never
    /// serialised (not to agents, not in webhooks); the store keeps them beside the body.
    #[serde(default, skip_serializing)]
    pub aliases: Vec<Principal>,
    /// An approve vote that also asked for a standing grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<super::GrantAsk>,
    /// The groups of a per-group quorum (`approvals: {finance: 1, sre: 1}`) the voter
    /// belonged to when voting; absent for a plain count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

impl Vote {
    fn identities(&self) -> impl Iterator<Item = &Principal> + Clone {
        std::iter::once(&self.principal).chain(self.aliases.iter())
    }

    fn shares_identity<'a>(&self, mut others: impl Iterator<Item = &'a Principal>) -> bool {
        others.any(|other| self.identities().any(|mine| mine == other))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Decision {
    /// A final status: approved, denied, expired or cancelled, never pending.
    #[schema(value_type = Status)]
    pub outcome: Outcome,
    /// The people who decided, or `policy:<rule>`, `agent:<name>`, `system:expiry`.
    pub by: Vec<Principal>,
    #[schema(required = true)]
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
    pub modified: bool,
    /// The args the agent must execute.
    #[schema(value_type = Object)]
    pub args: Value,
}

/// A `mode: shadow` rule that matched a request: what it would have done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ShadowMatch {
    pub rule: String,
    /// allow, require_approval or deny.
    pub effect: String,
    /// The tier of a require_approval rule; null for allow and deny.
    #[schema(required = true)]
    pub tier: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionOutcome {
    Succeeded,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Execution {
    pub outcome: ExecutionOutcome,
    /// Whatever the agent reported; null when it sent none.
    pub detail: Value,
    pub at: DateTime<Utc>,
}

/// What the agent says about the action, shown to approvers as evidence.
/// The four known fields are shown on cards; any other field is kept, passed to `when`
/// conditions as `context.<field>`, and returned to the agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RequestContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reversible: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<String>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: serde_json::Map<String, Value>,
}

// Every `Option` but `callback_url` is always serialized (as null when absent), hence
// `required = true` on them: the OpenAPI document must say what agents receive.
/// The request object of the agent API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApprovalRequest {
    /// `apr_` and a lower-case ULID (48 bits of milliseconds, 80 random bits): ids made
    /// later sort later.
    pub id: String,
    pub agent: String,
    pub action: String,
    /// The current args: the agent's own, or an approver's modification.
    #[schema(value_type = Object)]
    pub args: Value,
    pub context: RequestContext,
    #[schema(required = true)]
    pub on_behalf_of: Option<Principal>,
    /// Present only when the agent gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub callback_url: Option<String>,
    pub status: Status,
    #[schema(required = true)]
    pub tier: Option<String>,
    #[schema(required = true)]
    pub rule: Option<String>,
    pub approvals_required: u32,
    /// A per-group quorum: distinct people needed from each group (their total is
    /// `approvals_required`); absent when the tier asks for a plain count.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub approvals_by_group: BTreeMap<String, u32>,
    /// 1 for the agent's args, +1 for each modification.
    pub revision: u32,
    pub votes: Vec<Vote>,
    /// Null while pending.
    #[schema(required = true)]
    pub decision: Option<Decision>,
    /// `sha256:` and the hex SHA-256 of the RFC 8785 canonical JSON of `{action, args}`.
    pub action_hash: String,
    pub policy_hash: String,
    pub created_at: DateTime<Utc>,
    #[schema(required = true)]
    pub expires_at: Option<DateTime<Utc>>,
    /// What the agent reported through `/execution`; null until then.
    #[schema(required = true)]
    pub executed: Option<Execution>,
    /// When approvers were reminded (the tier's `remind_after` passed while pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reminded_at: Option<DateTime<Utc>>,
    /// When the request last went up its tier's escalation ladder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalated_at: Option<DateTime<Utc>>,
    /// True when an allow rule's `sample` sent this request to review.
    #[serde(default)]
    #[schema(required = true)]
    pub sampled: bool,
    /// The shadow rules that matched: recorded, never enforced.
    #[serde(default)]
    #[schema(required = true)]
    pub shadow: Vec<ShadowMatch>,
    /// How many steps of the escalation ladder were taken (stored beside the body).
    #[serde(skip)]
    pub escalation_step: u32,
    /// Bumped by every stored change: the compare-and-set token.
    #[serde(skip)]
    pub version: i64,
    #[serde(skip)]
    pub original_args: Value,
    /// When a reminder / an escalation falls due; `None` when none is (still) due.
    #[serde(skip)]
    pub remind_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub escalate_at: Option<DateTime<Utc>>,
    /// Tiers the request was in before a modification moved it up: their destinations
    /// still carry its cards, which must keep showing the request as it is.
    #[serde(skip)]
    pub previous_tiers: Vec<String>,
}

impl ApprovalRequest {
    /// The people whose approvals count on the current revision: one vote per person, even
    /// when they voted under two of their identities.
    pub fn current_approvers(&self) -> Vec<&Principal> {
        self.counted_votes()
            .into_iter()
            .map(|vote| &vote.principal)
            .collect()
    }

    /// The current revision's approving votes, one per person (see `current_approvers`).
    fn counted_votes(&self) -> Vec<&Vote> {
        let mut counted: Vec<&Vote> = Vec::new();
        for vote in &self.votes {
            if vote.revision == self.revision
                && vote.vote == VoteKind::Approve
                && !counted
                    .iter()
                    .any(|earlier| earlier.shares_identity(vote.identities()))
            {
                counted.push(vote);
            }
        }
        counted
    }

    /// Progress per group of a per-group quorum (empty for a plain count): the largest
    /// assignment of the current approvers to the groups' slots, one slot per person.
    pub fn group_progress(&self) -> Vec<GroupProgress> {
        if self.approvals_by_group.is_empty() {
            return Vec::new();
        }
        let counted = self.counted_votes();
        let groups: Vec<&[String]> = counted.iter().map(|vote| vote.groups.as_slice()).collect();
        fill_quorum(&self.approvals_by_group, &groups)
    }

    /// Approvals toward the quorum on the current revision: distinct people, or under a
    /// per-group quorum the slots they fill (an approver who fits no slot adds none).
    pub fn approvals_counted(&self) -> u32 {
        if self.approvals_by_group.is_empty() {
            self.current_approvers().len() as u32
        } else {
            self.group_progress()
                .iter()
                .map(|group| group.filled.min(group.required))
                .sum()
        }
    }

    /// Is the quorum met on the current revision? Per group when the tier has a map, else
    /// by the number of distinct people.
    pub fn quorum_met(&self) -> bool {
        if self.approvals_by_group.is_empty() {
            self.current_approvers().len() as u32 >= self.approvals_required
        } else {
            self.group_progress()
                .iter()
                .all(|group| group.filled >= group.required)
        }
    }

    /// Has someone with any of these identities approved the current revision?
    pub fn approved_by_any<'a>(
        &self,
        identities: impl Iterator<Item = &'a Principal> + Clone,
    ) -> bool {
        self.votes.iter().any(|vote| {
            vote.revision == self.revision
                && vote.vote == VoteKind::Approve
                && vote.shares_identity(identities.clone())
        })
    }

    /// The revision that was current at `at`: each modification made later (its first
    /// vote is the modifier's) had not happened yet. Slack's timestamps have whole seconds,
    /// so a modification in the same second as `at` counts as later: fails closed.
    pub fn revision_at(&self, at: DateTime<Utc>) -> u32 {
        let later_modifications = (2..=self.revision)
            .filter(|revision| {
                self.votes
                    .iter()
                    .find(|vote| vote.revision == *revision)
                    .is_none_or(|vote| vote.at >= at)
            })
            .count() as u32;
        self.revision - later_modifications
    }

    /// Steps of the escalation ladder taken; a request escalated before ladders were
    /// stored took the one step there was.
    pub fn escalation_steps_taken(&self) -> u32 {
        if self.escalation_step == 0 && self.escalated_at.is_some() {
            1
        } else {
            self.escalation_step
        }
    }

    /// A copy to plan the next stored state on: the version the compare-and-set expects
    /// next. Every change to a stored request starts here.
    pub fn successor(&self) -> Self {
        Self {
            version: self.version + 1,
            ..self.clone()
        }
    }

    pub fn is_overdue(&self, at: DateTime<Utc>) -> bool {
        self.status == Status::Pending && self.expires_at.is_some_and(|expiry| expiry <= at)
    }

    /// The final decision, with the current args and whether they were modified.
    pub fn decide(
        &mut self,
        outcome: Outcome,
        by: Vec<Principal>,
        reason: Option<String>,
        at: DateTime<Utc>,
    ) {
        self.status = outcome;
        self.decision = Some(Decision {
            outcome,
            by,
            reason,
            at,
            modified: self.revision > 1,
            args: self.args.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_action_hash_is_taken_over_the_canonical_action_and_args() {
        for (action, args) in [
            (
                "payments.refund",
                json!({"amount": 2000, "currency": "usd"}),
            ),
            ("email.send", json!({})),
            (
                "db.query",
                json!({"z": [1.5, null], "a": "\u{1f600}", "\u{e000}": true}),
            ),
        ] {
            let reference =
                serde_json_canonicalizer::to_vec(&json!({"action": action, "args": args}))
                    .expect("canonical");
            assert_eq!(
                action_hash(action, &args),
                format!("sha256:{}", hex::encode(Sha256::digest(reference))),
                "{action}"
            );
        }
    }

    #[test]
    fn request_ids_are_lower_case_ulids_that_sort_by_time() {
        assert_eq!(request_id_at(0, 0), "apr_00000000000000000000000000");
        // The largest ULID: 48 bits of time, 80 random bits, all set.
        assert_eq!(
            request_id_at((1 << 48) - 1, u128::MAX),
            "apr_7zzzzzzzzzzzzzzzzzzzzzzzzz"
        );
        let cases = [
            (1_700_000_000_000, u128::MAX),
            (1_700_000_000_001, 0),
            (1_800_000_000_000, 7),
        ];
        for pair in cases.windows(2) {
            let (earlier, later) = (
                request_id_at(pair[0].0, pair[0].1),
                request_id_at(pair[1].0, pair[1].1),
            );
            assert!(earlier < later, "{earlier} should sort before {later}");
        }
        let id = new_request_id();
        assert_eq!(id.len(), 30);
        assert!(id[4..]
            .bytes()
            .all(|byte| byte.is_ascii_digit() || byte.is_ascii_lowercase()));
        assert_ne!(id, new_request_id());
    }

    #[test]
    fn action_hash_is_canonical() {
        // Key order and whitespace must not change the hash.
        let first = action_hash("payments.refund", &json!({"amount": 5, "currency": "EUR"}));
        let second: Value = serde_json::from_str(r#"{ "currency":"EUR",  "amount":5 }"#).unwrap();
        assert_eq!(first, action_hash("payments.refund", &second));
        assert!(first.starts_with("sha256:"));
        assert_eq!(first.len(), "sha256:".len() + 64);
        assert_ne!(
            first,
            action_hash("payments.refund", &json!({"amount": 6, "currency": "EUR"}))
        );
        assert_ne!(
            first,
            action_hash("payments.charge", &json!({"amount": 5, "currency": "EUR"}))
        );
    }

    #[test]
    fn only_pending_changes_status() {
        use Status::*;
        let table = [
            (Pending, Approved, true),
            (Pending, Denied, true),
            (Pending, Expired, true),
            (Pending, Cancelled, true),
            (Pending, Pending, false),
            (Approved, Denied, false),
            (Denied, Approved, false),
            (Expired, Approved, false),
            (Cancelled, Pending, false),
        ];
        for (from, to, allowed) in table {
            assert_eq!(from.can_become(to), allowed, "{from:?} -> {to:?}");
        }
    }

    #[test]
    fn request_ids_are_distinct_and_prefixed() {
        let first = new_request_id();
        assert!(first.starts_with("apr_"));
        assert_eq!(first.len(), 30);
        assert_ne!(first, new_request_id());
    }

    #[test]
    fn status_round_trips() {
        for status in [
            Status::Pending,
            Status::Approved,
            Status::Denied,
            Status::Expired,
            Status::Cancelled,
        ] {
            assert_eq!(Status::parse(status.as_str()), Some(status));
        }
        assert_eq!(Status::parse("done"), None);
    }
}
