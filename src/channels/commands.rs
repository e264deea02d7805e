//! The chat command words every platform takes (`pending`, `show ID`, `approve ID [note]`,
//! `deny ID reason`, `help`), parsed once, and an engine refusal in words for a chat user.

use crate::engine::EngineError;

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
pub const HELP_LINES: [(&str, &str); 5] = [
    ("pending", "requests you can decide, with their buttons"),
    ("show ID", "one request"),
    ("approve ID [note]", "approve"),
    ("deny ID reason", "deny, with a reason"),
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
