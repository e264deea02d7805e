//! The YAML policy: parsed and compiled once, then evaluated per action — pure, no I/O.

mod compile;
mod condition;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use globset::GlobSet;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use chrono::{DateTime, Utc};

use crate::domain::{
    mask_request, ApprovalRequest, Mask, Principal, RedactPath, ShadowMatch, Voter,
};

pub use compile::{PolicyError, PolicyIssue};
use condition::Condition;
pub use condition::CounterSpec;

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
    /// Every counter any rule's `when` reads, once each; rules name them by index.
    counters: Vec<CounterSpec>,
    /// Does any tier allow grants? If not, intake never looks for one.
    any_grants: bool,
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
    /// Caps on grants given in this tier; `None`: approvers may not grant.
    pub grants: Option<GrantLimits>,
}

/// A tier's `grants: {max_ttl, max_uses}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantLimits {
    pub max_ttl: Duration,
    pub max_uses: u32,
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

    /// Does it list anyone by email (an address a chat platform tells only at a vote)?
    pub fn names_emails(&self) -> bool {
        self.principals
            .iter()
            .any(|principal| principal.starts_with("email:"))
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
    /// `sample: F` of an allow rule: that fraction of its matches go to review at `tier`.
    sample: Option<f64>,
    /// `mode: shadow`: recorded when it matches, never enforced.
    shadow: bool,
    /// Indexes into `Policy::counters` of the counters its `when` reads.
    counters: Vec<usize>,
}

/// What intake knows beside the request: the clock, the counters' values (in the order of
/// `Policy::counters_for`) and a uniform draw in [0, 1) for sampling. `/v1/check` and
/// `explain` have no history and make no draw: counters read 0 and no rule is sampled.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub now: DateTime<Utc>,
    pub counters: &'a [(CounterSpec, f64)],
    pub sample_draw: Option<f64>,
}

impl Facts<'_> {
    /// No history and no draw, at `now`.
    pub fn at(now: DateTime<Utc>) -> Facts<'static> {
        Facts {
            now,
            counters: &[],
            sample_draw: None,
        }
    }
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
    /// True when a sampled allow rule sent the request to review (never from check/explain).
    pub sampled: bool,
    /// Shadow rules that matched: what they would have done, never enforced.
    pub shadow: Vec<ShadowMatch>,
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
    /// An allow rule's sample rate: the fraction of its matches sent to review.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample: Option<f64>,
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

    /// Does `source` (a grant's `when`) compile and hold for `input` at `at`? Anything
    /// else, an evaluation error included, is false: a grant never widens by accident.
    pub fn condition_holds(
        &self,
        source: &str,
        input: EvaluationInput<'_>,
        at: DateTime<Utc>,
    ) -> bool {
        let Ok(condition) = Condition::compile(source) else {
            return false;
        };
        let facts = Facts::at(at);
        let variables = condition::Variables::new(&input, &facts, &[], false);
        condition.evaluate(&variables) == Ok(true)
    }

    /// Checks a grant's `when`: it must compile and use no counters.
    pub fn check_grant_condition(source: &str) -> Result<(), String> {
        let condition = Condition::compile(source)?;
        if condition.counters().is_empty() {
            Ok(())
        } else {
            Err("a grant's `when` cannot use recent_count or recent_sum".into())
        }
    }

    /// Does any tier allow grants?
    pub fn any_grants(&self) -> bool {
        self.any_grants
    }

    /// The counters the rules that could match `agent`'s `action` read (whatever their
    /// `when` says): intake computes exactly these. Empty for most actions.
    pub fn counters_for(&self, agent: &str, action: &str) -> Vec<CounterSpec> {
        if self.counters.is_empty() {
            return Vec::new();
        }
        let mut indexes: Vec<usize> = self
            .candidate_rules(action)
            .into_iter()
            .map(|index| &self.rules[index])
            .filter(|rule| rule.agents.is_empty() || rule.agents.iter().any(|name| name == agent))
            .flat_map(|rule| rule.counters.iter().copied())
            .collect();
        indexes.sort_unstable();
        indexes.dedup();
        indexes
            .into_iter()
            .map(|index| self.counters[index].clone())
            .collect()
    }

    fn candidate_rules(&self, action: &str) -> Vec<usize> {
        let mut candidates = Vec::new();
        self.patterns.matches_into(action, &mut candidates);
        let mut rule_indexes: Vec<usize> = candidates
            .iter()
            .map(|&pattern| self.pattern_rule[pattern])
            .collect();
        rule_indexes.sort_unstable();
        rule_indexes.dedup();
        rule_indexes
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

    /// Could `principal` still approve at `tier`, as far as the policy alone can tell? A
    /// tier that admits platform user groups or email addresses (whose members and owners a
    /// platform tells only when they vote) is given the benefit of the doubt.
    pub fn may_still_approve(&self, tier: &str, principal: &Principal) -> bool {
        self.tier(tier).is_some_and(|tier| {
            !tier.approvers.user_groups.is_empty()
                || tier.approvers.names_emails()
                || tier
                    .approvers
                    .admits(&self.identify(&Voter::new(principal.clone())))
        })
    }

    /// Deny beats require_approval beats allow; the highest tier wins among approvals;
    /// nothing matching means the default.
    /// `evaluate_with` at `now` with no history and no sampling draw.
    pub fn evaluate(&self, input: EvaluationInput<'_>) -> Verdict {
        self.evaluate_with(input, Facts::at(crate::domain::now()))
    }

    /// Evaluates with the clock, counters and sampling draw intake supplies. A sampled
    /// allow rule counts as require_approval at its tier; shadow rules are listed apart and
    /// never decide.
    pub fn evaluate_with(&self, input: EvaluationInput<'_>, facts: Facts<'_>) -> Verdict {
        let rule_indexes = self.candidate_rules(input.action);
        let mut variables = None;
        let mut matches = Vec::new();
        let mut shadow = Vec::new();
        let mut deciding: Option<(&Rule, Effect, Option<usize>)> = None;
        for index in rule_indexes {
            let rule = &self.rules[index];
            if !rule.agents.is_empty() && !rule.agents.iter().any(|agent| agent == input.agent) {
                continue;
            }
            let (condition, condition_error) = match &rule.condition {
                None => (ConditionResult::None, None),
                Some(condition) => {
                    let variables = variables.get_or_insert_with(|| {
                        condition::Variables::new(
                            &input,
                            &facts,
                            facts.counters,
                            !self.counters.is_empty(),
                        )
                    });
                    match condition.evaluate(variables) {
                        Ok(true) => (ConditionResult::True, None),
                        Ok(false) => continue,
                        // Fail closed: an unevaluable condition never grants, always restricts.
                        Err(_) if rule.effect == Effect::Allow => continue,
                        Err(error) => (ConditionResult::ErrorFailedClosed, Some(error)),
                    }
                }
            };
            let tier_name = rule.tier.map(|tier| self.tiers[tier].name.clone());
            if rule.shadow {
                shadow.push(ShadowMatch {
                    rule: rule.name.clone(),
                    effect: rule.effect.as_str().to_string(),
                    tier: (rule.effect == Effect::RequireApproval)
                        .then(|| self.effective_tier(rule.effect, rule.tier))
                        .flatten()
                        .map(|tier| self.tiers[tier].name.clone()),
                });
                continue;
            }
            matches.push(RuleMatch {
                rule: rule.name.clone(),
                line: rule.line,
                effect: rule.effect,
                tier: tier_name,
                condition,
                condition_error,
                sample: rule.sample,
            });
            // A sampled match is a require_approval at the rule's tier.
            let sampled = rule.effect == Effect::Allow
                && rule
                    .sample
                    .zip(facts.sample_draw)
                    .is_some_and(|(rate, draw)| draw < rate);
            let (effect, tier) = if sampled {
                (Effect::RequireApproval, rule.tier)
            } else {
                (rule.effect, self.effective_tier(rule.effect, rule.tier))
            };
            if deciding.is_none_or(|(_, current_effect, current_tier)| {
                (effect, tier) > (current_effect, current_tier)
                    && (effect != current_effect || effect == Effect::RequireApproval)
            }) {
                deciding = Some((rule, effect, tier));
            }
        }

        let sampled = deciding.is_some_and(|(rule, effect, _)| rule.effect != effect);
        let (effect, tier, rule, reason) = match deciding {
            Some((rule, effect, tier)) => (
                effect,
                tier,
                Some(rule.name.clone()),
                if sampled {
                    Some(format!("sampled for review by rule {:?}", rule.name))
                } else {
                    rule.reason.clone()
                },
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
            sampled,
            shadow,
        }
    }

    fn effective_tier(&self, effect: Effect, tier: Option<usize>) -> Option<usize> {
        (effect == Effect::RequireApproval)
            .then(|| tier.or(self.default_tier))
            .flatten()
    }
}

#[cfg(test)]
mod tests;
