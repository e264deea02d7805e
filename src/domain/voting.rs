//! The decision rules for one vote: eligibility, separation of duties, quorum, modification.

use std::collections::BTreeMap;

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
    /// The groups of the tier's per-group quorum the voter belongs to (empty for a plain
    /// count): the slots their approval may fill.
    pub groups: &'a [String],
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
    SameTier {
        approvals_required: u32,
        approvals_by_group: BTreeMap<String, u32>,
    },
    /// The new args need a higher tier: the request moves there.
    MovesUp {
        tier: String,
        rule: Option<String>,
        approvals_required: u32,
        approvals_by_group: BTreeMap<String, u32>,
        /// Is the modifier an approver of the new tier? Only then does their modification
        /// count as its first approval.
        modifier_eligible: bool,
        /// The new tier's quorum groups the modifier belongs to.
        modifier_groups: Vec<String>,
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
    #[error("a redacted value cannot be changed by a modification; leave it as [redacted]")]
    RedactedValue,
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
            VoteRefusal::RedactedValue => "redacted_value",
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
            let mut groups = voter.groups.to_vec();
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
                Some(Reevaluation::SameTier {
                    approvals_required,
                    approvals_by_group,
                }) => {
                    request.approvals_required = *approvals_required;
                    request.approvals_by_group = approvals_by_group.clone();
                    true
                }
                Some(Reevaluation::MovesUp {
                    tier,
                    rule,
                    approvals_required,
                    approvals_by_group,
                    modifier_eligible,
                    modifier_groups,
                }) => {
                    if let Some(previous) = request.tier.replace(tier.clone()) {
                        request.previous_tiers.push(previous);
                    }
                    request.rule = rule.clone();
                    request.approvals_required = *approvals_required;
                    request.approvals_by_group = approvals_by_group.clone();
                    groups = modifier_groups.clone();
                    *modifier_eligible
                }
            };
            // A new revision: earlier approvals are void, the modifier's vote is the first
            // (when they may approve in the request's tier, as it now is).
            request.revision += 1;
            request.action_hash = action_hash(&request.action, &args);
            request.args = args;
            let context = VoteContext {
                groups: &groups,
                ..voter
            };
            if modifier_counts {
                record(request, &context, VoteKind::Approve, note);
            } else {
                record(request, &context, VoteKind::Modify, note);
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
        grant: None,
        groups: voter.groups.to_vec(),
    });
}

/// Decides the request once its quorum is met: distinct people, or per group through the
/// best assignment of people to slots. An approval that fits no open slot is still
/// recorded: a later voter may let it move to another slot.
fn count_approvals(request: &mut ApprovalRequest, at: DateTime<Utc>) -> VoteEffect {
    let approvers: Vec<Principal> = request.current_approvers().into_iter().cloned().collect();
    let approvals = request.approvals_counted();
    if request.quorum_met() {
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
mod tests;
