//! The chat command words every platform takes (`pending`, `show ID`, `approve ID [note]`,
//! `deny ID reason`, `grants`, `grants revoke GRANT_ID`, `help`), parsed once, and an engine refusal in words for a chat user.

use std::future::Future;

use crate::domain::{ApprovalRequest, Status, VoteKind, Voter};
use crate::engine::{Engine, EngineError};
use crate::store::RequestFilter;

/// A command typed in chat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatCommand {
    Pending,
    Show {
        id: String,
    },
    Approve {
        id: String,
        note: Option<String>,
    },
    Deny {
        id: String,
        reason: String,
    },
    /// `deny ID` without a reason: a deny needs one.
    DenyWithoutReason,
    /// `grants`: standing grants of tiers the user approves in.
    Grants,
    /// `grants revoke GRANT_ID`.
    RevokeGrant {
        id: String,
    },
    /// `show`, `approve` or `deny` without an id.
    MissingId {
        word: String,
    },
    Help,
}

impl ChatCommand {
    /// Parses the text after the command (Slack) or the message (Teams, mention removed).
    /// Anything unrecognised asks for help.
    pub fn parse(text: &str) -> Self {
        let mut words = text.split_whitespace();
        let word = words.next().unwrap_or("help").to_ascii_lowercase();
        let id = words.next().map(str::to_string);
        let rest = words.collect::<Vec<_>>().join(" ");
        match (word.as_str(), id) {
            ("pending", _) => Self::Pending,
            ("grants", None) => Self::Grants,
            ("grants", Some(verb)) if verb.eq_ignore_ascii_case("revoke") && !rest.is_empty() => {
                Self::RevokeGrant { id: rest }
            }
            ("show", Some(id)) => Self::Show { id },
            ("approve", Some(id)) => Self::Approve {
                id,
                note: (!rest.is_empty()).then_some(rest),
            },
            ("deny", Some(id)) if !rest.is_empty() => Self::Deny { id, reason: rest },
            ("deny", Some(_)) => Self::DenyWithoutReason,
            ("show" | "approve" | "deny", None) => Self::MissingId { word },
            _ => Self::Help,
        }
    }
}

/// The command words, one per line, each with what it does (`{command}` is replaced by
/// how the platform invokes them).
pub const HELP_LINES: [(&str, &str); 7] = [
    ("pending", "requests you can decide, with their buttons"),
    ("show ID", "one request"),
    ("approve ID [note]", "approve"),
    ("deny ID reason", "deny, with a reason"),
    ("grants", "standing grants you approve for"),
    ("grants revoke GRANT_ID", "end a grant now"),
    ("help", "this message"),
];

/// An engine refusal in words for the person who clicked or typed.
pub fn explain(error: &EngineError) -> String {
    match error {
        EngineError::Refused(refusal) => format!("Nothing was recorded: {refusal}."),
        EngineError::NotFound => "That request does not exist.".into(),
        EngineError::Invalid(message)
        | EngineError::Conflict { message, .. }
        | EngineError::Unprocessable { message, .. } => message.clone(),
        EngineError::Quota(exceeded) => exceeded.to_string(),
        // Only agents' keys are refused this way; a click never is, so it is a failure.
        EngineError::Unauthorized | EngineError::Store(_) | EngineError::Internal(_) => {
            tracing::error!(%error, "chat vote failed");
            "signoff could not record that just now; please try again.".into()
        }
    }
}

/// Why `decidable_by` has no list: the engine failed (in words for the user), or the
/// platform could not say who the user is just now.
pub enum PendingError {
    Engine(String),
    Unidentified,
}

/// `pending`: the pending requests the chat user may approve. `voter_for` says who the user
/// is for a request (`None`: the platform cannot tell now, and the listing fails rather
/// than guess).
pub async fn decidable_by<F, Fut>(
    engine: &Engine,
    voter_for: F,
) -> Result<Vec<ApprovalRequest>, PendingError>
where
    F: Fn(ApprovalRequest) -> Fut,
    Fut: Future<Output = Option<Voter>>,
{
    let pending = engine
        .list_requests(RequestFilter {
            status: Some(Status::Pending),
            agent: None,
            limit: 1000,
        })
        .await
        .map_err(|error| PendingError::Engine(explain(&error)))?;
    let mut decidable = Vec::new();
    for request in pending {
        let voter = voter_for(request.clone())
            .await
            .ok_or(PendingError::Unidentified)?;
        if engine
            .check_voter(&request.id, &voter, VoteKind::Approve, None)
            .await
            .is_ok()
        {
            decidable.push(request);
        }
    }
    Ok(decidable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_words() {
        let table = [
            ("", ChatCommand::Help),
            ("help", ChatCommand::Help),
            ("nonsense 1", ChatCommand::Help),
            ("PENDING", ChatCommand::Pending),
            ("show apr_1", ChatCommand::Show { id: "apr_1".into() }),
            (
                "approve apr_1",
                ChatCommand::Approve {
                    id: "apr_1".into(),
                    note: None,
                },
            ),
            (
                "approve apr_1 looks  fine",
                ChatCommand::Approve {
                    id: "apr_1".into(),
                    note: Some("looks fine".into()),
                },
            ),
            (
                " deny apr_1 too big ",
                ChatCommand::Deny {
                    id: "apr_1".into(),
                    reason: "too big".into(),
                },
            ),
            ("deny apr_1", ChatCommand::DenyWithoutReason),
            (
                "approve",
                ChatCommand::MissingId {
                    word: "approve".into(),
                },
            ),
        ];
        for (text, expected) in table {
            assert_eq!(ChatCommand::parse(text), expected, "{text:?}");
        }
    }
}
