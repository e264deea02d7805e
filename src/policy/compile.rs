//! Parsing and validation of policy YAML into a compiled `Policy`, reporting every error with its line.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use globset::{GlobBuilder, GlobSetBuilder};
use indexmap::IndexMap;
use serde::Deserialize;
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

use super::condition::Condition;
use super::{Approvers, CounterSpec, Effect, GrantLimits, People, Policy, Rule, Tier};
use crate::domain::Principal;

/// One problem in a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyIssue {
    pub line: Option<u64>,
    pub rule: Option<String>,
    pub message: String,
}

impl fmt::Display for PolicyIssue {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(formatter, "line {line}: ")?;
        }
        if let Some(rule) = &self.rule {
            write!(formatter, "rule {rule:?}: ")?;
        }
        formatter.write_str(&self.message)
    }
}

/// Every problem found in a policy file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub issues: Vec<PolicyIssue>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.issues.iter().map(ToString::to_string).collect();
        formatter.write_str(&lines.join("\n"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: Spanned<u32>,
    #[serde(default)]
    default: Option<Spanned<String>>,
    #[serde(default)]
    default_tier: Option<Spanned<String>>,
    #[serde(default)]
    people: IndexMap<String, Spanned<Vec<String>>>,
    #[serde(default)]
    groups: IndexMap<String, Spanned<Vec<String>>>,
    #[serde(default)]
    tiers: IndexMap<String, Spanned<RawTier>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    #[serde(default)]
    route: Vec<String>,
    #[serde(default)]
    approvers: Vec<String>,
    #[serde(default)]
    approvals: Option<u32>,
    #[serde(default)]
    ttl: Option<DurationText>,
    #[serde(default)]
    remind_after: Option<DurationText>,
    #[serde(default)]
    escalate_after: Option<DurationText>,
    #[serde(default)]
    escalate_to: Vec<String>,
    #[serde(default)]
    grants: Option<RawGrantLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrantLimits {
    max_ttl: DurationText,
    max_uses: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(rename = "match")]
    patterns: Patterns,
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    when: Option<String>,
    effect: String,
    #[serde(default)]
    tier: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    sample: Option<f64>,
    #[serde(default)]
    mode: Option<String>,
}

/// `30m`, `1h 30m`, or a bare number of seconds.
#[derive(Clone, Deserialize)]
#[serde(untagged)]
enum DurationText {
    Text(String),
    Seconds(u64),
}

impl DurationText {
    fn text(&self) -> String {
        match self {
            DurationText::Text(text) => text.clone(),
            DurationText::Seconds(seconds) => format!("{seconds}s"),
        }
    }
}

/// No tier waits longer than a year; it also keeps every computed time representable.
const LONGEST_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// `match` takes one glob or a list of globs.
#[derive(Deserialize)]
#[serde(untagged)]
enum Patterns {
    One(String),
    Many(Vec<String>),
}

/// Only the rule names, to say which rule a syntax error is in.
#[derive(Deserialize)]
struct RuleNamesOnly {
    #[serde(default)]
    rules: Vec<Spanned<NameOnly>>,
}

#[derive(Deserialize)]
struct NameOnly {
    #[serde(default)]
    name: Option<String>,
}

const DEFAULT_TTL: Duration = Duration::from_secs(3600);

pub(super) fn compile(source: &str) -> Result<Policy, PolicyError> {
    let raw: RawPolicy = serde_saphyr::from_str(source).map_err(|error| {
        let line = error.location().map(|location| location.line());
        PolicyError {
            issues: vec![PolicyIssue {
                line,
                rule: line.and_then(|line| rule_at_line(source, line)),
                message: first_line(&error.to_string()),
            }],
        }
    })?;
    let mut checker = Checker::default();
    let policy = checker.build(raw, source);
    if checker.issues.is_empty() {
        Ok(policy)
    } else {
        checker.issues.sort_by_key(|issue| issue.line.unwrap_or(0));
        Err(PolicyError {
            issues: checker.issues,
        })
    }
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_string()
}

/// The name of the last rule that starts at or before `line`.
fn rule_at_line(source: &str, line: u64) -> Option<String> {
    let names: RuleNamesOnly = serde_saphyr::from_str(source).ok()?;
    names
        .rules
        .iter()
        .rfind(|rule| rule.defined.line() <= line)
        .and_then(|rule| rule.value.name.clone())
}

#[derive(Default)]
struct Checker {
    issues: Vec<PolicyIssue>,
}

impl Checker {
    fn issue(&mut self, line: u64, rule: Option<&str>, message: impl Into<String>) {
        self.issues.push(PolicyIssue {
            line: Some(line),
            rule: rule.map(str::to_string),
            message: message.into(),
        });
    }

    fn build(&mut self, raw: RawPolicy, source: &str) -> Policy {
        if raw.version.value != 1 {
            self.issue(
                raw.version.defined.line(),
                None,
                format!("unsupported version {}; expected 1", raw.version.value),
            );
        }
        let default_effect = match &raw.default {
            None => Effect::Deny,
            Some(default) => self
                .effect(&default.value, default.defined.line(), None)
                .unwrap_or(Effect::Deny),
        };

        let people = self.people(&raw.people);
        let groups = self.groups(&raw.groups, &people);
        let tiers: Vec<Tier> = raw
            .tiers
            .iter()
            .map(|(name, tier)| self.tier(name, tier, &groups, &people))
            .collect();
        let tier_index: HashMap<&str, usize> = tiers
            .iter()
            .enumerate()
            .map(|(index, tier)| (tier.name.as_str(), index))
            .collect();

        let default_tier = raw.default_tier.as_ref().and_then(|tier| {
            let found = tier_index.get(tier.value.as_str()).copied();
            if found.is_none() {
                self.issue(
                    tier.defined.line(),
                    None,
                    format!("default_tier {:?} is not a tier", tier.value),
                );
            }
            found
        });
        if default_effect == Effect::RequireApproval && default_tier.is_none() {
            let line = raw
                .default
                .as_ref()
                .map_or(1, |default| default.defined.line());
            self.issue(line, None, "default: require_approval needs a default_tier");
        }

        let mut rules = Vec::new();
        let mut counters: Vec<CounterSpec> = Vec::new();
        let mut patterns = GlobSetBuilder::new();
        let mut pattern_rule = Vec::new();
        let mut names = HashSet::new();
        for spanned in &raw.rules {
            let line = spanned.defined.line();
            let raw_rule = &spanned.value;
            let name = raw_rule.name.as_str();
            if name.trim().is_empty() {
                self.issue(line, None, "a rule needs a non-empty name");
            } else if !names.insert(name) {
                self.issue(line, Some(name), "duplicate rule name");
            }
            let globs = match &raw_rule.patterns {
                Patterns::One(glob) => std::slice::from_ref(glob),
                Patterns::Many(globs) => globs.as_slice(),
            };
            if globs.is_empty() {
                self.issue(line, Some(name), "`match` needs at least one glob");
            }
            for glob in globs {
                match GlobBuilder::new(glob).literal_separator(false).build() {
                    Ok(compiled) if !glob.is_empty() => {
                        patterns.add(compiled);
                        pattern_rule.push(rules.len());
                    }
                    Ok(_) => self.issue(line, Some(name), "empty glob in `match`"),
                    Err(error) => {
                        self.issue(line, Some(name), format!("bad glob {glob:?}: {error}"))
                    }
                }
            }
            let effect = self
                .effect(&raw_rule.effect, line, Some(name))
                .unwrap_or(Effect::Deny);
            let sampled_allow = effect == Effect::Allow && raw_rule.sample.is_some();
            if let Some(rate) = raw_rule.sample {
                if effect != Effect::Allow {
                    self.issue(line, Some(name), "`sample` only applies to allow rules");
                } else if !(0.0..=1.0).contains(&rate) {
                    self.issue(
                        line,
                        Some(name),
                        format!("`sample` {rate} must be between 0 and 1"),
                    );
                }
                if effect == Effect::Allow && raw_rule.tier.is_none() {
                    self.issue(
                        line,
                        Some(name),
                        "a sampled allow rule needs a `tier` to send its samples to",
                    );
                }
            }
            let shadow = match raw_rule.mode.as_deref() {
                None | Some("enforce") => false,
                Some("shadow") => true,
                Some(other) => {
                    self.issue(
                        line,
                        Some(name),
                        format!("unknown mode {other:?}; expected shadow or enforce"),
                    );
                    false
                }
            };
            let tier = match &raw_rule.tier {
                None => None,
                Some(_) if effect != Effect::RequireApproval && !sampled_allow => {
                    self.issue(
                        line,
                        Some(name),
                        "`tier` only applies to require_approval rules and sampled allow rules",
                    );
                    None
                }
                Some(tier) => {
                    let found = tier_index.get(tier.as_str()).copied();
                    if found.is_none() {
                        self.issue(line, Some(name), format!("unknown tier {tier:?}"));
                    }
                    found
                }
            };
            if effect == Effect::RequireApproval
                && raw_rule.tier.is_none()
                && default_tier.is_none()
            {
                self.issue(
                    line,
                    Some(name),
                    "require_approval needs a `tier` (or a default_tier)",
                );
            }
            let condition = raw_rule.when.as_ref().and_then(|source| {
                Condition::compile(source)
                    .map_err(|error| self.issue(line, Some(name), error))
                    .ok()
            });
            for agent in &raw_rule.agents {
                if agent.trim().is_empty() {
                    self.issue(line, Some(name), "empty agent name in `agents`");
                }
            }
            let mut rule_counters = Vec::new();
            for spec in condition.iter().flat_map(|condition| condition.counters()) {
                let index = counters
                    .iter()
                    .position(|known| known == spec)
                    .unwrap_or_else(|| {
                        counters.push(spec.clone());
                        counters.len() - 1
                    });
                rule_counters.push(index);
            }
            rules.push(Rule {
                name: name.to_string(),
                line,
                agents: raw_rule.agents.clone(),
                condition,
                effect,
                tier,
                reason: raw_rule.reason.clone(),
                sample: raw_rule.sample.filter(|_| sampled_allow),
                shadow,
                counters: rule_counters,
            });
        }

        let patterns = patterns.build().unwrap_or_else(|error| {
            self.issue(1, None, format!("globs do not compile together: {error}"));
            globset::GlobSet::empty()
        });
        let any_grants = tiers.iter().any(|tier| tier.grants.is_some());
        Policy {
            hash: format!("sha256:{}", hex::encode(Sha256::digest(source.as_bytes()))),
            counters,
            any_grants,
            default_effect,
            default_tier,
            people,
            tiers,
            rules,
            patterns,
            pattern_rule,
        }
    }

    /// Validates the `people` map: each entry a person principal, each principal one
    /// person's only (otherwise one click could count for two people).
    fn people(&mut self, raw: &IndexMap<String, Spanned<Vec<String>>>) -> People {
        let mut people = People::default();
        for (name, principals) in raw {
            let line = principals.defined.line();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                self.issue(
                    line,
                    None,
                    format!("person {name:?}: names are letters, digits, '-', '_' or '.'"),
                );
            }
            if principals.value.is_empty() {
                self.issue(line, None, format!("person {name:?} has no principals"));
            }
            for entry in &principals.value {
                let principal = match entry.parse::<Principal>() {
                    Ok(principal) => principal,
                    Err(error) => {
                        self.issue(line, None, format!("person {name:?}: {error}"));
                        continue;
                    }
                };
                if let Some(other) = people.person_of(&principal) {
                    if other != name {
                        self.issue(
                            line,
                            None,
                            format!(
                                "person {name:?}: {principal} already belongs to person {other:?}; a principal may belong to one person only"
                            ),
                        );
                    }
                    continue;
                }
                people.add(name, principal);
            }
        }
        people
    }

    fn effect(&mut self, text: &str, line: u64, rule: Option<&str>) -> Option<Effect> {
        match text {
            "allow" => Some(Effect::Allow),
            "deny" => Some(Effect::Deny),
            "require_approval" => Some(Effect::RequireApproval),
            other => {
                self.issue(
                    line,
                    rule,
                    format!("unknown effect {other:?}; expected allow, require_approval or deny"),
                );
                None
            }
        }
    }

    /// Validates group members; returns each group's members.
    fn groups(
        &mut self,
        groups: &IndexMap<String, Spanned<Vec<String>>>,
        people: &People,
    ) -> HashMap<String, Vec<String>> {
        let mut resolved = HashMap::new();
        for (name, members) in groups {
            let line = members.defined.line();
            for member in &members.value {
                if member.starts_with("group:") {
                    self.issue(
                        line,
                        None,
                        format!("group {name:?}: groups cannot contain groups ({member})"),
                    );
                } else if let Err(error) = approver_entry(member, people) {
                    self.issue(line, None, format!("group {name:?}: {error}"));
                }
            }
            resolved.insert(name.clone(), members.value.clone());
        }
        resolved
    }

    fn tier(
        &mut self,
        name: &str,
        spanned: &Spanned<RawTier>,
        groups: &HashMap<String, Vec<String>>,
        people: &People,
    ) -> Tier {
        let line = spanned.defined.line();
        let raw = &spanned.value;
        let context = format!("tier {name:?}");
        let mut approvers = Approvers::default();
        for entry in &raw.approvers {
            let members = match entry.strip_prefix("group:") {
                Some(group) => match groups.get(group) {
                    Some(members) => members.clone(),
                    None => {
                        self.issue(line, None, format!("{context}: unknown group {group:?}"));
                        continue;
                    }
                },
                None => vec![entry.clone()],
            };
            for member in members {
                match approver_entry(&member, people) {
                    Ok(ApproverEntry::Principal(principal)) => {
                        approvers.principals.insert(principal.to_string());
                    }
                    Ok(ApproverEntry::Person(principals)) => {
                        approvers
                            .principals
                            .extend(principals.iter().map(ToString::to_string));
                    }
                    Ok(ApproverEntry::UserGroup) => approvers.user_groups.push(member),
                    Err(error) => self.issue(line, None, format!("{context}: {error}")),
                }
            }
        }
        let approvals = raw.approvals.unwrap_or(1);
        if approvals == 0 {
            self.issue(
                line,
                None,
                format!("{context}: approvals must be at least 1"),
            );
        }
        // A tier with too few approvers for its quorum (or none) is allowed: its requests
        // can only expire, which fails closed.
        for destination in raw.route.iter().chain(&raw.escalate_to) {
            if let Err(error) = validate_destination(destination) {
                self.issue(line, None, format!("{context}: {error}"));
            }
        }
        let mut duration = |field: &str, value: &Option<DurationText>| -> Option<Duration> {
            let text = value.as_ref()?.text();
            match humantime::parse_duration(&text) {
                Ok(parsed) if parsed > LONGEST_DURATION => {
                    self.issue(
                        line,
                        None,
                        format!("{context}: {field} {text:?} is longer than a year"),
                    );
                    None
                }
                Ok(parsed) if !parsed.is_zero() => Some(parsed),
                Ok(_) => {
                    self.issue(
                        line,
                        None,
                        format!("{context}: {field} must be more than zero"),
                    );
                    None
                }
                Err(error) => {
                    self.issue(
                        line,
                        None,
                        format!(
                            "{context}: {field} {text:?} is not a duration like 30m or 1h: {error}"
                        ),
                    );
                    None
                }
            }
        };
        let ttl = duration("ttl", &raw.ttl).unwrap_or(DEFAULT_TTL);
        let remind_after = duration("remind_after", &raw.remind_after);
        let escalate_after = duration("escalate_after", &raw.escalate_after);
        let grant_ttl = raw
            .grants
            .as_ref()
            .and_then(|limits| duration("grants.max_ttl", &Some(limits.max_ttl.clone())));
        if escalate_after.is_some() && raw.escalate_to.is_empty() {
            self.issue(
                line,
                None,
                format!("{context}: escalate_after needs escalate_to"),
            );
        }
        let grants = match (&raw.grants, grant_ttl) {
            (Some(limits), _) if limits.max_uses == 0 => {
                self.issue(
                    line,
                    None,
                    format!("{context}: grants.max_uses must be at least 1"),
                );
                None
            }
            (Some(limits), Some(max_ttl)) => Some(GrantLimits {
                max_ttl,
                max_uses: limits.max_uses,
            }),
            _ => None,
        };
        Tier {
            name: name.to_string(),
            route: raw.route.clone(),
            approvers,
            approvals: approvals.max(1),
            ttl,
            remind_after,
            escalate_after,
            escalate_to: raw.escalate_to.clone(),
            grants,
        }
    }
}

enum ApproverEntry {
    Principal(Principal),
    /// `person:NAME`: every principal of that person.
    Person(Vec<Principal>),
    /// A chat platform's user group (`slack-group:S…`), resolved by its channel.
    UserGroup,
}

fn approver_entry(entry: &str, people: &People) -> Result<ApproverEntry, String> {
    if let Some(name) = entry.strip_prefix("person:") {
        return match people.principals_of(name) {
            Some(principals) => Ok(ApproverEntry::Person(principals.to_vec())),
            None => Err(format!("unknown person {name:?} (not in `people`)")),
        };
    }
    if let Some(group) = entry.strip_prefix("slack-group:") {
        if group.is_empty() || !group.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!(
                "{entry:?} is not a Slack user group id (slack-group:S0123)"
            ));
        }
        return Ok(ApproverEntry::UserGroup);
    }
    entry
        .parse::<Principal>()
        .map(ApproverEntry::Principal)
        .map_err(|error| error.to_string())
}

fn validate_destination(destination: &str) -> Result<(), String> {
    let parsed = crate::domain::Destination::parse(destination);
    match parsed.as_ref().map(|d| (d.platform(), d.conversation())) {
        Some(("slack" | "teams", id)) if !id.contains(char::is_whitespace) => Ok(()),
        _ => Err(format!(
            "route destination {destination:?} must be slack:<channel id> or teams:<conversation id>"
        )),
    }
}
