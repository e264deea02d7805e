//! The approval request, its status state machine, votes, decisions, principals and ids — pure, no I/O.

pub mod canonical_json;
mod destination;
#[cfg(test)]
pub(crate) mod fixtures;
mod grant;
mod kinds;
mod principal;
mod quorum;
mod redaction;
mod request;
mod voting;

pub use destination::Destination;
pub use grant::{new_grant_id, Grant, GrantAsk};
pub use kinds::{AuditKind, OutboxKind};
pub use principal::{Principal, PrincipalError};
pub use quorum::{fill_quorum, quorum_met, GroupProgress};
pub use redaction::{
    mask_context, mask_request, mask_value, restore_redacted, sets_redacted_value, Mask,
    RedactPath, RedactRoot, REDACTED,
};
pub use request::{
    action_hash, new_request_id, now, ApprovalRequest, Decision, Execution, ExecutionOutcome,
    Outcome, RequestContext, ShadowMatch, Status, Vote, VoteKind,
};
pub use voting::{
    check_voter, plan_vote, Reevaluation, VoteContext, VoteEffect, VoteRefusal, VoteRequest, Voter,
};
