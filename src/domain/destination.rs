//! Where a card goes: a chat platform and a conversation there, as a tier's route writes it.

use std::fmt;

/// `slack:C0HIGH`, `teams:19:abc@thread.tacv2`: the platform before the first `:`, the
/// platform's own conversation id after it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    platform: String,
    conversation: String,
}

impl Destination {
    /// `None` unless `text` is `platform:conversation` with both parts non-empty.
    pub fn parse(text: &str) -> Option<Self> {
        let (platform, conversation) = text.split_once(':')?;
        (!platform.is_empty() && !conversation.is_empty()).then(|| Self {
            platform: platform.to_string(),
            conversation: conversation.to_string(),
        })
    }

    /// The chat platform (`slack`), which picks the channel that delivers there.
    pub fn platform(&self) -> &str {
        &self.platform
    }

    /// The platform's id of the conversation (a Slack channel id, a Teams conversation id).
    pub fn conversation(&self) -> &str {
        &self.conversation
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}:{}", self.platform, self.conversation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_and_print_as_routes_write_them() {
        let cases = [
            ("slack:C0HIGH", Some(("slack", "C0HIGH"))),
            (
                "teams:19:abc@thread.tacv2",
                Some(("teams", "19:abc@thread.tacv2")),
            ),
            ("slack:", None),
            (":C0HIGH", None),
            ("https", None),
        ];
        for (text, expected) in cases {
            let parsed = Destination::parse(text);
            assert_eq!(
                parsed
                    .as_ref()
                    .map(|destination| (destination.platform(), destination.conversation())),
                expected,
                "{text}"
            );
            if let Some(destination) = parsed {
                assert_eq!(destination.to_string(), text);
            }
        }
    }
}
