//! The kinds of audit events and outbox messages, as stored (the strings are part of the
//! audit chain's hashes and the outbox table: never rename one).

use std::fmt;

/// What an audit event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuditKind {
    AgentCreated,
    AgentRevoked,
    Submitted,
    Verdict,
    Vote,
    Modified,
    Decided,
    Expired,
    Cancelled,
    Executed,
    Reminded,
    Escalated,
    /// A card's first post, or a webhook's delivery.
    Delivered,
    GrantCreated,
    GrantUsed,
    GrantRevoked,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::AgentCreated => "agent_created",
            AuditKind::AgentRevoked => "agent_revoked",
            AuditKind::Submitted => "submitted",
            AuditKind::Verdict => "verdict",
            AuditKind::Vote => "vote",
            AuditKind::Modified => "modified",
            AuditKind::Decided => "decided",
            AuditKind::Expired => "expired",
            AuditKind::Cancelled => "cancelled",
            AuditKind::Executed => "executed",
            AuditKind::Reminded => "reminded",
            AuditKind::Escalated => "escalated",
            AuditKind::Delivered => "delivered",
            AuditKind::GrantCreated => "grant_created",
            AuditKind::GrantUsed => "grant_used",
            AuditKind::GrantRevoked => "grant_revoked",
        }
    }

    /// The kind stored as `text`, if it is one.
    pub fn parse(text: &str) -> Option<Self> {
        use AuditKind::*;
        [
            AgentCreated,
            AgentRevoked,
            Submitted,
            Verdict,
            Vote,
            Modified,
            Decided,
            Expired,
            Cancelled,
            Executed,
            Reminded,
            Escalated,
            Delivered,
            GrantCreated,
            GrantUsed,
            GrantRevoked,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == text)
    }

    /// Does an event of this kind mean its request became final? Its commit then
    /// announces the decision to other processes.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            AuditKind::Decided | AuditKind::Expired | AuditKind::Cancelled
        )
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// What an outbox message asks the delivery worker to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutboxKind {
    /// Make the card at a chat destination show the request as it is now (post or update).
    Card,
    /// Remind the approvers in the thread of the card at a chat destination.
    Reminder,
    /// Send the agent a signed webhook about its request's final state.
    Webhook,
}

impl OutboxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Card => "card",
            OutboxKind::Reminder => "reminder",
            OutboxKind::Webhook => "webhook",
        }
    }

    /// The kind stored as `text`, if it is one.
    pub fn parse(text: &str) -> Option<Self> {
        [OutboxKind::Card, OutboxKind::Reminder, OutboxKind::Webhook]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// A kind equals its stored name (`OutboxKind::Card == "card"`).
impl PartialEq<&str> for OutboxKind {
    fn eq(&self, name: &&str) -> bool {
        self.as_str() == *name
    }
}

impl fmt::Display for OutboxKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_kinds_read_back_as_written() {
        for kind in [OutboxKind::Card, OutboxKind::Reminder, OutboxKind::Webhook] {
            assert_eq!(OutboxKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(OutboxKind::parse("carrier-pigeon"), None);
    }

    #[test]
    fn only_decisions_expiries_and_cancellations_are_final() {
        let finals = [AuditKind::Decided, AuditKind::Expired, AuditKind::Cancelled];
        for kind in [AuditKind::Vote, AuditKind::Modified, AuditKind::Executed] {
            assert!(!kind.is_final(), "{kind}");
        }
        assert!(finals.into_iter().all(AuditKind::is_final));
    }
}
