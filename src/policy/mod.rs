//! The YAML policy: parsed and compiled once, then evaluated per action — pure, no I/O.

mod compile;
mod condition;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use globset::GlobSet;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::domain::{mask_request, ApprovalRequest, Mask, Principal, RedactPath, Voter};

pub use compile::{PolicyError, PolicyIssue};
use condition::Condition;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    // Declared in precedence order: a later variant beats an earlier one.
    Allow,
    RequireApproval,
    Deny,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::RequireApproval => "require_approval",
            Effect::Deny => "deny",
        }
    }
}

/// A compiled policy. Cheap to share behind an `Arc`; replaced whole on reload.
#[derive(Debug)]
pub struct Policy {
    hash: String,
    default_effect: Effect,
    default_tier: Option<usize>,
    people: People,
    tiers: Vec<Tier>,
    rules: Vec<Rule>,
    /// Every rule's globs in one set; `pattern_rule[i]` is the rule of pattern `i`.
    patterns: GlobSet,
    pattern_rule: Vec<usize>,
    /// `redact`: values people never see in views, logs or the audit trail.
    redact: Vec<RedactPath>,
}

#[derive(Debug)]
pub struct Tier {
    pub name: String,
    pub route: Vec<String>,
    pub approvers: Approvers,
    /// Distinct people needed: a plain count, or the total of `approvals_by_group`.
    pub approvals: u32,
    /// A per-group quorum (empty for a plain count): people needed from each group.
    pub approvals_by_group: BTreeMap<String, u32>,
    /// Who belongs to each group of `approvals_by_group`.
    pub quorum_groups: BTreeMap<String, Approvers>,
    pub ttl: Duration,
    pub remind_after: Option<Duration>,
    /// The escalation ladder, in order (`escalate_after`/`escalate_to` is one step).
    pub escalation: Vec<EscalationStep>,
}

/// One step of an escalation ladder: after this long from submission, the card is also
/// posted to these destinations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EscalationStep {
    pub after: Duration,
    pub to: Vec<String>,
}

impl Tier {
    /// The groups of this tier's per-group quorum `voter` belongs to: the slots their
    /// approval may fill.
    pub fn quorum_groups_of(&self, voter: &Voter) -> Vec<String> {
        self.quorum_groups
            .iter()
            .filter(|(_, members)| members.admits(voter))
            .map(|(group, _)| group.clone())
            .collect()
    }
}

/// The `people` map: one person, several principals (a Slack id, a Teams id, an email, a
/// CLI name). Quorum counts people, and the requester/owner refusal covers every
/// principal of the same person.
#[derive(Debug, Default)]
pub struct People {
    principals: std::collections::HashMap<String, Vec<Principal>>,
    person: std::collections::HashMap<Principal, String>,
}

impl People {
    pub(crate) fn add(&mut self, name: &str, principal: Principal) {
        self.person.insert(principal.clone(), name.to_string());
        self.principals
            .entry(name.to_string())
            .or_default()
            .push(principal);
    }

    pub fn person_of(&self, principal: &Principal) -> Option<&str> {
        self.person.get(principal).map(String::as_str)
    }

    pub fn principals_of(&self, name: &str) -> Option<&[Principal]> {
        self.principals.get(name).map(Vec::as_slice)
    }

    /// Does any person carry an `email:` principal? Then a chat user's email decides who
    /// they are, and one whose email cannot be read is refused.
    pub fn names_anyone_by_email(&self) -> bool {
        self.person
            .keys()
            .any(|principal| principal.kind() == "email")
    }
}

/// Who may vote in a tier, with groups already expanded.
#[derive(Debug, Default)]
pub struct Approvers {
    pub principals: HashSet<String>,
    /// Chat user groups (`slack-group:S…`), resolved to members by their chat channel.
    pub user_groups: Vec<String>,
}

impl Approvers {
    pub(crate) fn add(&mut self, entry: &compile::ApproverEntry, written: &str) {
        match entry {
            compile::ApproverEntry::Principal(principal) => {
                self.principals.insert(principal.to_string());
            }
            compile::ApproverEntry::Person(principals) => {
                self.principals
                    .extend(principals.iter().map(ToString::to_string));
            }
            compile::ApproverEntry::UserGroup => self.user_groups.push(written.to_string()),
        }
    }

    pub fn contains(&self, principal: &Principal) -> bool {
        self.principals.contains(principal.as_str())
    }

    /// Listed under any of the voter's identities, or a member of a listed Slack user group.
    pub fn admits(&self, voter: &Voter) -> bool {
        voter.identities().any(|identity| self.contains(identity))
            || voter
                .groups
                .iter()
                .any(|group| self.user_groups.contains(group))
    }
}

#[derive(Debug)]
struct Rule {
    name: String,
    line: u64,
    agents: Vec<String>,
    condition: Option<Condition>,
    effect: Effect,
    tier: Option<usize>,
    reason: Option<String>,
}

/// What an action is evaluated on.
#[derive(Clone, Copy, Debug)]
pub struct EvaluationInput<'a> {
    pub action: &'a str,
    pub args: &'a Value,
    pub agent: &'a str,
    pub context: &'a Value,
}

// Its `Option`s are always serialized (as null), so `required = true` in the OpenAPI schema.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct Verdict {
    /// allow, require_approval or deny.
    #[serde(rename = "verdict")]
    pub effect: Effect,
    /// The tier for require_approval.
    #[schema(required = true)]
    pub tier: Option<String>,
    /// The deciding rule; null when the default applied.
    #[schema(required = true)]
    pub rule: Option<String>,
    #[schema(required = true)]
    pub reason: Option<String>,
    pub approvals_required: u32,
    /// Time to live of a pending request, from the tier.
    #[serde(skip)]
    pub ttl: Option<Duration>,
    /// Every rule that matched, in file order.
    pub matches: Vec<RuleMatch>,
}

#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct RuleMatch {
    pub rule: String,
    pub line: u64,
    pub effect: Effect,
    #[schema(required = true)]
    pub tier: Option<String>,
    /// How the `when` condition came out.
    pub condition: ConditionResult,
    /// Why the condition could not be evaluated, when it failed closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition_error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConditionResult {
    /// The rule has no `when`.
    None,
    True,
    /// Evaluation failed and the rule counts as matched (deny / require_approval fail closed).
    ErrorFailedClosed,
}

// A type rather than a JSON value so the OpenAPI document describes exactly this.
/// The verdict as `policy explain` and `/v1/check` print it: `verdict` (also as
/// `effect`), tier, deciding rule, reason, quorum, every match and the policy hash.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Explanation<'a> {
    #[serde(flatten)]
    pub verdict: &'a Verdict,
    /// The same as `verdict`.
    pub effect: Effect,
    pub policy_hash: &'a str,
}

impl Verdict {
    pub fn explain<'a>(&'a self, policy_hash: &'a str) -> Explanation<'a> {
        Explanation {
            verdict: self,
            effect: self.effect,
            policy_hash,
        }
    }
}

impl Policy {
    /// Parses and validates policy YAML; every problem is reported, each with its line.
    pub fn parse(source: &str) -> Result<Policy, PolicyError> {
        compile::compile(source)
    }

    /// `sha256:<hex>` of the policy file as written; recorded on every request.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn tier(&self, name: &str) -> Option<&Tier> {
        self.tiers.iter().find(|tier| tier.name == name)
    }

    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    pub fn people(&self) -> &People {
        &self.people
    }

    /// The `redact` paths.
    pub fn redact_paths(&self) -> &[RedactPath] {
        &self.redact
    }

    /// `request` as people may see it (cards, chat answers, CLI listings): every value at
    /// a `redact` path shows as `[redacted]`.
    pub fn redacted(&self, request: &ApprovalRequest) -> ApprovalRequest {
        mask_request(request, &self.redact, Mask::Shown)
    }

    /// `voter` with every principal of the person (or people) they are known as added to
    /// their aliases: one person, one vote, whichever principal they act under.
    pub fn identify(&self, voter: &Voter) -> Voter {
        let mut identified = voter.clone();
        for identity in voter.identities() {
            let Some(name) = self.people.person_of(identity) else {
                continue;
            };
            for principal in self.people.principals_of(name).unwrap_or_default() {
                if !identified.is(principal) {
                    identified.aliases.push(principal.clone());
                }
            }
        }
        identified
    }

    /// The destinations that should carry `request`'s card: its tier's route, once
    /// escalated the escalation destinations, and the routes of the tiers a modification
    /// moved it up from. Cards are written for every one of them, whatever platforms this
    /// process runs: a vote cast from the CLI must still update the cards servers posted.
    pub fn card_destinations(&self, request: &ApprovalRequest) -> Vec<String> {
        let Some(tier) = request.tier.as_deref().and_then(|tier| self.tier(tier)) else {
            return Vec::new();
        };
        let escalated = tier
            .escalation
            .iter()
            .take(request.escalation_steps_taken() as usize)
            .flat_map(|step| step.to.iter());
        // Tiers a modification moved the request up from keep their cards, kept current.
        let earlier_routes = request
            .previous_tiers
            .iter()
            .filter_map(|name| self.tier(name))
            .flat_map(|earlier| earlier.route.iter());
        let mut destinations: Vec<String> = Vec::new();
        for destination in tier.route.iter().chain(escalated).chain(earlier_routes) {
            // A channel both routed to and escalated to gets one card.
            if !destinations.contains(destination) {
                destinations.push(destination.clone());
            }
        }
        destinations
    }

    /// The index of `tier` in the order tiers are listed, lowest risk first.
    pub fn tier_rank(&self, tier: &str) -> Option<usize> {
        self.tiers
            .iter()
            .position(|candidate| candidate.name == tier)
    }

    /// Is `principal` an approver of `tier` (directly or through a group)?
    pub fn is_approver(&self, tier: &str, principal: &Principal) -> bool {
        self.tier(tier)
            .is_some_and(|tier| tier.approvers.contains(principal))
    }

    /// May `voter` vote in `tier`, under any of their identities or Slack user groups?
    pub fn admits(&self, tier: &str, voter: &Voter) -> bool {
        self.tier(tier)
            .is_some_and(|tier| tier.approvers.admits(voter))
    }

    /// Deny beats require_approval beats allow; the highest tier wins among approvals;
    /// nothing matching means the default.
    pub fn evaluate(&self, input: EvaluationInput<'_>) -> Verdict {
        let mut candidates = Vec::new();
        self.patterns.matches_into(input.action, &mut candidates);
        let mut rule_indexes: Vec<usize> = candidates
            .iter()
            .map(|&pattern| self.pattern_rule[pattern])
            .collect();
        rule_indexes.sort_unstable();
        rule_indexes.dedup();

        let mut variables = None;
        let mut matches = Vec::new();
        let mut deciding: Option<&Rule> = None;
        for index in rule_indexes {
            let rule = &self.rules[index];
            if !rule.agents.is_empty() && !rule.agents.iter().any(|agent| agent == input.agent) {
                continue;
            }
            let (condition, condition_error) = match &rule.condition {
                None => (ConditionResult::None, None),
                Some(condition) => {
                    let variables =
                        variables.get_or_insert_with(|| condition::Variables::new(&input));
                    match condition.evaluate(variables) {
                        Ok(true) => (ConditionResult::True, None),
                        Ok(false) => continue,
                        // Fail closed: an unevaluable condition never grants, always restricts.
                        Err(_) if rule.effect == Effect::Allow => continue,
                        Err(error) => (ConditionResult::ErrorFailedClosed, Some(error)),
                    }
                }
            };
            matches.push(RuleMatch {
                rule: rule.name.clone(),
                line: rule.line,
                effect: rule.effect,
                tier: rule.tier.map(|tier| self.tiers[tier].name.clone()),
                condition,
                condition_error,
            });
            if deciding.is_none_or(|current| self.outranks(rule, current)) {
                deciding = Some(rule);
            }
        }

        let (effect, tier, rule, reason) = match deciding {
            Some(rule) => (
                rule.effect,
                self.effective_tier(rule.effect, rule.tier),
                Some(rule.name.clone()),
                rule.reason.clone(),
            ),
            None => (
                self.default_effect,
                self.effective_tier(self.default_effect, None),
                None,
                None,
            ),
        };
        let tier = tier.map(|index| &self.tiers[index]);
        Verdict {
            effect,
            tier: tier.map(|tier| tier.name.clone()),
            rule,
            reason,
            approvals_required: tier.map_or(0, |tier| tier.approvals),
            ttl: tier.map(|tier| tier.ttl),
            matches,
        }
    }

    fn effective_tier(&self, effect: Effect, tier: Option<usize>) -> Option<usize> {
        (effect == Effect::RequireApproval)
            .then(|| tier.or(self.default_tier))
            .flatten()
    }

    /// Does `candidate` decide over `current`? Earlier rules win ties.
    fn outranks(&self, candidate: &Rule, current: &Rule) -> bool {
        if candidate.effect != current.effect {
            return candidate.effect > current.effect;
        }
        candidate.effect == Effect::RequireApproval
            && self.effective_tier(candidate.effect, candidate.tier)
                > self.effective_tier(current.effect, current.tier)
    }
}

#[cfg(test)]
mod tests;
