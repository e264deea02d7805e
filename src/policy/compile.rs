//! Parsing and validation of policy YAML into a compiled `Policy`, reporting every error with its line.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use globset::{GlobBuilder, GlobSetBuilder};
use indexmap::IndexMap;
use serde::Deserialize;
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

use super::condition::Condition;
use super::{
    Approvers, CounterSpec, Effect, EscalationStep, GrantLimits, People, Policy, Rule, Tier,
};
use crate::domain::Principal;
use crate::domain::RedactPath;

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
    #[serde(default)]
    redact: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    #[serde(default)]
    route: Vec<String>,
    #[serde(default)]
    approvers: Vec<String>,
    #[serde(default)]
    approvals: Option<RawApprovals>,
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
    #[serde(default)]
    escalate: Option<Vec<RawEscalationStep>>,
}

/// `approvals: 2`, or per group: `approvals: {finance: 1, sre: 1}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawApprovals {
    Count(u32),
    ByGroup(IndexMap<String, u32>),
}

/// One step of an escalation ladder: `{after: 15m, to: ["slack:C0ONCALL"]}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEscalationStep {
    after: DurationText,
    to: Vec<String>,
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

        let redact = self.redact(raw.redact.as_ref());
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
            redact,
        }
    }

    /// The `redact` paths: each into `args` or `context`, each once.
    fn redact(&mut self, raw: Option<&Spanned<Vec<String>>>) -> Vec<RedactPath> {
        let Some(raw) = raw else {
            return Vec::new();
        };
        let line = raw.defined.line();
        let mut paths = Vec::new();
        for text in &raw.value {
            match RedactPath::parse(text) {
                Ok(path) if paths.contains(&path) => {
                    self.issue(line, None, format!("redact path {text:?} is listed twice"))
                }
                Ok(path) => paths.push(path),
                Err(error) => self.issue(line, None, error),
            }
        }
        paths
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
        let mut group_approvers: HashMap<String, Approvers> = HashMap::new();
        for entry in &raw.approvers {
            let group_name = entry.strip_prefix("group:");
            let members = match group_name {
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
                    Ok(entry) => {
                        approvers.add(&entry, &member);
                        if let Some(group) = group_name {
                            group_approvers
                                .entry(group.to_string())
                                .or_default()
                                .add(&entry, &member);
                        }
                    }
                    Err(error) => self.issue(line, None, format!("{context}: {error}")),
                }
            }
        }
        let (approvals, approvals_by_group, quorum_groups) =
            self.quorum(&context, line, raw, &mut group_approvers);
        // A tier with too few approvers for its quorum (or none) is allowed: its requests
        // can only expire, which fails closed.
        let escalation_destinations = raw
            .escalate
            .iter()
            .flatten()
            .flat_map(|step| step.to.iter());
        for destination in raw
            .route
            .iter()
            .chain(&raw.escalate_to)
            .chain(escalation_destinations)
        {
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
        let mut ladder = Vec::new();
        for (index, step) in raw.escalate.iter().flatten().enumerate() {
            let after = duration(
                &format!("escalate step {}: after", index + 1),
                &Some(step.after.clone()),
            );
            ladder.push((after, step.to.clone()));
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
        let escalation = self.escalation(&context, line, raw, escalate_after, ladder);
        Tier {
            name: name.to_string(),
            route: raw.route.clone(),
            approvers,
            approvals: approvals.max(1),
            approvals_by_group,
            quorum_groups,
            ttl,
            remind_after,
            escalation,
            grants,
        }
    }

    /// `approvals`: a count, or a map of groups (each among the tier's `group:` approvers,
    /// each at least 1) whose total is the count. Returns the total, the map and each
    /// mapped group's approvers.
    fn quorum(
        &mut self,
        context: &str,
        line: u64,
        raw: &RawTier,
        group_approvers: &mut HashMap<String, Approvers>,
    ) -> (u32, BTreeMap<String, u32>, BTreeMap<String, Approvers>) {
        match &raw.approvals {
            None => (1, BTreeMap::new(), BTreeMap::new()),
            Some(RawApprovals::Count(count)) => {
                if *count == 0 {
                    self.issue(
                        line,
                        None,
                        format!("{context}: approvals must be at least 1"),
                    );
                }
                (*count, BTreeMap::new(), BTreeMap::new())
            }
            Some(RawApprovals::ByGroup(map)) => {
                if map.is_empty() {
                    self.issue(
                        line,
                        None,
                        format!("{context}: approvals by group needs at least one group"),
                    );
                }
                let mut by_group = BTreeMap::new();
                let mut quorum_groups = BTreeMap::new();
                for (group, count) in map {
                    if *count == 0 {
                        self.issue(
                            line,
                            None,
                            format!("{context}: approvals of group {group:?} must be at least 1"),
                        );
                    }
                    if !raw
                        .approvers
                        .iter()
                        .any(|entry| entry.strip_prefix("group:") == Some(group))
                    {
                        self.issue(
                            line,
                            None,
                            format!(
                                "{context}: approvals names group {group:?}, which is not among the tier's approvers (add \"group:{group}\")"
                            ),
                        );
                    }
                    by_group.insert(group.clone(), *count);
                    quorum_groups.insert(
                        group.clone(),
                        group_approvers.remove(group).unwrap_or_default(),
                    );
                }
                (
                    by_group
                        .values()
                        .fold(0u32, |total, count| total.saturating_add(*count)),
                    by_group,
                    quorum_groups,
                )
            }
        }
    }

    /// The escalation ladder: `escalate` steps, or `escalate_after`/`escalate_to` as one
    /// step — not both. Steps come later one after another, each with destinations.
    fn escalation(
        &mut self,
        context: &str,
        line: u64,
        raw: &RawTier,
        escalate_after: Option<Duration>,
        ladder: Vec<(Option<Duration>, Vec<String>)>,
    ) -> Vec<EscalationStep> {
        if raw.escalate.is_some() && (raw.escalate_after.is_some() || !raw.escalate_to.is_empty()) {
            self.issue(
                line,
                None,
                format!("{context}: use either escalate (a ladder) or escalate_after/escalate_to (one step), not both"),
            );
            return Vec::new();
        }
        if raw.escalate.is_none() {
            if escalate_after.is_some() && raw.escalate_to.is_empty() {
                self.issue(
                    line,
                    None,
                    format!("{context}: escalate_after needs escalate_to"),
                );
            }
            if raw.escalate_after.is_none() && !raw.escalate_to.is_empty() {
                self.issue(
                    line,
                    None,
                    format!("{context}: escalate_to needs escalate_after"),
                );
            }
            return match escalate_after {
                Some(after) if !raw.escalate_to.is_empty() => vec![EscalationStep {
                    after,
                    to: raw.escalate_to.clone(),
                }],
                _ => Vec::new(),
            };
        }
        if ladder.is_empty() {
            self.issue(
                line,
                None,
                format!("{context}: escalate needs at least one step"),
            );
        }
        let mut steps: Vec<EscalationStep> = Vec::new();
        for (index, (after, to)) in ladder.into_iter().enumerate() {
            let number = index + 1;
            if to.is_empty() {
                self.issue(
                    line,
                    None,
                    format!("{context}: escalate step {number} needs destinations in `to`"),
                );
            }
            let Some(after) = after else { continue };
            if let Some(previous) = steps.last() {
                if after <= previous.after {
                    self.issue(
                        line,
                        None,
                        format!("{context}: escalate step {number} must come after step {} (its `after` must be longer)", steps.len()),
                    );
                    continue;
                }
            }
            steps.push(EscalationStep { after, to });
        }
        steps
    }
}

pub(crate) enum ApproverEntry {
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
