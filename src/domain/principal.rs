//! Principals: who a person or system is, as `kind:identifier` (`slack:U01`, `cli:alice`, ...).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

/// The principal kinds a person can act as. `policy:` and `system:` name non-people in decisions.
const PERSON_KINDS: &[&str] = &["slack", "email", "teams", "cli"];

/// `kind:identifier`: `slack:U…`, `email:…`, `teams:…`, `cli:…` for people; `policy:…`,
/// `agent:…` and `system:…` in decisions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ToSchema)]
#[schema(value_type = String, example = "slack:U0XYZ")]
pub struct Principal(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PrincipalError(String);

impl Principal {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn kind(&self) -> &str {
        self.0.split_once(':').map(|(kind, _)| kind).unwrap_or("")
    }
    pub fn system(name: &str) -> Self {
        Self(format!("system:{name}"))
    }
    pub fn policy_rule(rule: &str) -> Self {
        Self(format!("policy:{rule}"))
    }
    pub fn agent(name: &str) -> Self {
        Self(format!("agent:{name}"))
    }
    /// A standing grant that approved a request: `grant:grt_…`.
    pub fn grant(id: &str) -> Self {
        Self(format!("grant:{id}"))
    }
}

impl FromStr for Principal {
    type Err = PrincipalError;

    /// Parses a person principal: `slack:U…`, `email:a@b`, `teams:<aad id>` or `cli:<name>`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let Some((kind, identifier)) = text.split_once(':') else {
            return Err(PrincipalError(format!(
                "principal {text:?} must look like kind:identifier (slack:U123, email:a@example.com, teams:<id>, cli:alice)"
            )));
        };
        if !PERSON_KINDS.contains(&kind) {
            return Err(PrincipalError(format!(
                "principal {text:?} has unknown kind {kind:?}; expected one of slack, email, teams, cli"
            )));
        }
        let valid_identifier = !identifier.is_empty()
            && identifier.len() <= 200
            && identifier
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@+".contains(c));
        if !valid_identifier {
            return Err(PrincipalError(format!(
                "principal {text:?} has an empty or malformed identifier"
            )));
        }
        if kind == "email" && !identifier.contains('@') {
            return Err(PrincipalError(format!(
                "principal {text:?} is not an email address"
            )));
        }
        // Emails are case-insensitive; everything else is kept as given.
        let identifier = if kind == "email" {
            identifier.to_ascii_lowercase()
        } else {
            identifier.to_string()
        };
        Ok(Self(format!("{kind}:{identifier}")))
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl Serialize for Principal {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Principal {
    /// Stored principals include system ones (`policy:rule`), so deserialising does not re-validate.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self(String::deserialize(deserializer)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_person_principals() {
        let table = [
            ("slack:U01AAAA", Ok("slack:U01AAAA")),
            ("email:Ops@Example.com", Ok("email:ops@example.com")),
            (
                "teams:00000000-aad-object-id",
                Ok("teams:00000000-aad-object-id"),
            ),
            ("cli:alice", Ok("cli:alice")),
            ("alice", Err(())),
            ("slack:", Err(())),
            ("policy:rule", Err(())),
            ("email:not-an-address", Err(())),
            ("slack:U01 AAAA", Err(())),
        ];
        for (input, expected) in table {
            let parsed = input.parse::<Principal>();
            match expected {
                Ok(text) => assert_eq!(parsed.unwrap().as_str(), text, "{input}"),
                Err(()) => assert!(parsed.is_err(), "{input} should be refused"),
            }
        }
    }

    #[test]
    fn kind_is_the_prefix() {
        assert_eq!("slack:U1".parse::<Principal>().unwrap().kind(), "slack");
        assert_eq!(Principal::policy_rule("r").kind(), "policy");
    }
}
