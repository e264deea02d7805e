//! Table-driven tests of policy parsing, validation and evaluation.

use serde_json::{json, Value};

use super::*;

const POLICY: &str = r#"version: 1
default: deny
default_tier: medium
groups:
  sre: ["slack:U01AAAA", "email:ops@example.com", "slack-group:S01BBBB", "cli:alice"]
  finance: ["slack:U02CCCC", "cli:bob"]
tiers:
  low:
    route: ["slack:C0LOW"]
    approvers: ["group:sre"]
    ttl: 10m
  medium:
    route: ["slack:C0MEDIUM"]
    approvers: ["group:sre"]
    approvals: 1
    ttl: 30m
  high:
    route: ["slack:C0HIGH", "teams:19:abc"]
    approvers: ["group:sre", "group:finance"]
    approvals: 2
    ttl: 1h
    remind_after: 15m
    escalate_after: 30m
    escalate_to: ["slack:C0ONCALL"]
rules:
  - name: read-only
    match: ["*.get", "*.list", "search_*"]
    effect: allow
  - name: small-refund
    match: "payments.refund"
    when: "args.amount <= 100"
    effect: allow
  - name: large-refund
    match: ["payments.refund"]
    agents: ["finance-bot"]
    when: "args.amount > 100"
    effect: require_approval
    tier: high
  - name: any-refund-other-agent
    match: ["payments.refund"]
    agents: ["support-bot"]
    effect: require_approval
    tier: low
  - name: email
    match: ["email.send"]
    when: "args.to.endsWith('@example.com') == false"
    effect: require_approval
  - name: vip-customer
    match: ["crm.*"]
    when: "context.customer.tier == 'vip'"
    effect: require_approval
    tier: high
  - name: crm-low
    match: ["crm.*"]
    effect: require_approval
    tier: low
  - name: no-drop
    match: ["db.drop_*"]
    effect: deny
    reason: "Dropping tables is never allowed"
  - name: db-reads
    match: ["db.*"]
    effect: allow
"#;

fn policy() -> Policy {
    Policy::parse(POLICY).unwrap_or_else(|error| panic!("example policy invalid:\n{error}"))
}

fn evaluate(policy: &Policy, action: &str, args: Value, agent: &str, context: Value) -> Verdict {
    policy.evaluate(EvaluationInput {
        action,
        args: &args,
        agent,
        context: &context,
    })
}

/// (action, args, agent, context, effect, tier, deciding rule)
type EvaluationCase = (
    &'static str,
    Value,
    &'static str,
    Value,
    Effect,
    Option<&'static str>,
    Option<&'static str>,
);

#[test]
fn evaluation_table() {
    let policy = policy();
    let table: Vec<EvaluationCase> = vec![
        (
            "users.get",
            json!({}),
            "any",
            json!({}),
            Effect::Allow,
            None,
            Some("read-only"),
        ),
        (
            "search_docs",
            json!({}),
            "any",
            json!({}),
            Effect::Allow,
            None,
            Some("read-only"),
        ),
        // Nothing matches: the default.
        (
            "users.delete",
            json!({}),
            "any",
            json!({}),
            Effect::Deny,
            None,
            None,
        ),
        // Numeric CEL both ways, agent filter applies.
        (
            "payments.refund",
            json!({"amount": 50}),
            "finance-bot",
            json!({}),
            Effect::Allow,
            None,
            Some("small-refund"),
        ),
        (
            "payments.refund",
            json!({"amount": 2000}),
            "finance-bot",
            json!({}),
            Effect::RequireApproval,
            Some("high"),
            Some("large-refund"),
        ),
        (
            "payments.refund",
            json!({"amount": 150.5}),
            "finance-bot",
            json!({}),
            Effect::RequireApproval,
            Some("high"),
            Some("large-refund"),
        ),
        // Agent filter excludes large-refund; nothing else matches -> default deny.
        (
            "payments.refund",
            json!({"amount": 2000}),
            "other-bot",
            json!({}),
            Effect::Deny,
            None,
            None,
        ),
        // require_approval beats allow.
        (
            "payments.refund",
            json!({"amount": 50}),
            "support-bot",
            json!({}),
            Effect::RequireApproval,
            Some("low"),
            Some("any-refund-other-agent"),
        ),
        // Missing field: allow fails closed (not matched), require_approval fails closed (matched).
        (
            "payments.refund",
            json!({}),
            "finance-bot",
            json!({}),
            Effect::RequireApproval,
            Some("high"),
            Some("large-refund"),
        ),
        // Type error: a string amount cannot be compared with a number.
        (
            "payments.refund",
            json!({"amount": "lots"}),
            "finance-bot",
            json!({}),
            Effect::RequireApproval,
            Some("high"),
            Some("large-refund"),
        ),
        // String function in CEL; rule without tier uses default_tier.
        (
            "email.send",
            json!({"to": "x@evil.test"}),
            "any",
            json!({}),
            Effect::RequireApproval,
            Some("medium"),
            Some("email"),
        ),
        (
            "email.send",
            json!({"to": "x@example.com"}),
            "any",
            json!({}),
            Effect::Deny,
            None,
            None,
        ),
        // Nested context field; the highest tier wins among approvals.
        (
            "crm.update",
            json!({}),
            "any",
            json!({"customer": {"tier": "vip"}}),
            Effect::RequireApproval,
            Some("high"),
            Some("vip-customer"),
        ),
        (
            "crm.update",
            json!({}),
            "any",
            json!({"customer": {"tier": "basic"}}),
            Effect::RequireApproval,
            Some("low"),
            Some("crm-low"),
        ),
        // Deny beats allow, with its reason.
        (
            "db.drop_users",
            json!({}),
            "any",
            json!({}),
            Effect::Deny,
            None,
            Some("no-drop"),
        ),
        (
            "db.select",
            json!({}),
            "any",
            json!({}),
            Effect::Allow,
            None,
            Some("db-reads"),
        ),
    ];
    for (action, args, agent, context, effect, tier, rule) in table {
        let verdict = evaluate(&policy, action, args.clone(), agent, context);
        assert_eq!(
            (
                verdict.effect,
                verdict.tier.as_deref(),
                verdict.rule.as_deref()
            ),
            (effect, tier, rule),
            "{action} {args} by {agent}: {verdict:#?}"
        );
    }
}

#[test]
fn verdict_carries_reason_quorum_and_all_matches() {
    let policy = policy();
    let verdict = evaluate(&policy, "db.drop_users", json!({}), "a", json!({}));
    assert_eq!(
        verdict.reason.as_deref(),
        Some("Dropping tables is never allowed")
    );
    let names: Vec<&str> = verdict.matches.iter().map(|m| m.rule.as_str()).collect();
    assert_eq!(names, vec!["no-drop", "db-reads"]);

    let verdict = evaluate(
        &policy,
        "payments.refund",
        json!({"amount": 500}),
        "finance-bot",
        json!({}),
    );
    assert_eq!(verdict.approvals_required, 2);
    assert_eq!(verdict.ttl, Some(std::time::Duration::from_secs(3600)));

    let verdict = evaluate(
        &policy,
        "payments.refund",
        json!({}),
        "finance-bot",
        json!({}),
    );
    assert_eq!(
        verdict.matches[0].condition,
        ConditionResult::ErrorFailedClosed
    );
    assert!(verdict.matches[0].condition_error.is_some());
}

#[test]
fn default_effects() {
    for (default, effect, tier) in [
        ("allow", Effect::Allow, None),
        ("deny", Effect::Deny, None),
        ("require_approval", Effect::RequireApproval, Some("t")),
    ] {
        let source = format!(
            "version: 1\ndefault: {default}\ndefault_tier: t\ntiers:\n  t:\n    approvers: [\"cli:a\"]\n"
        );
        let policy = Policy::parse(&source).unwrap();
        let verdict = evaluate(&policy, "anything", json!({}), "a", json!({}));
        assert_eq!(
            (verdict.effect, verdict.tier.as_deref(), verdict.rule),
            (effect, tier, None)
        );
    }
}

#[test]
fn approvers_expand_groups() {
    let policy = policy();
    let approver = |tier: &str, who: &str| policy.is_approver(tier, &who.parse().unwrap());
    assert!(approver("medium", "cli:alice"));
    assert!(approver("medium", "email:OPS@example.com"));
    assert!(!approver("medium", "cli:bob"));
    assert!(approver("high", "cli:bob"));
    assert!(!approver("nonexistent", "cli:alice"));
    assert_eq!(
        policy.tier("high").unwrap().approvers.user_groups,
        vec!["slack-group:S01BBBB"]
    );
    assert!(policy.hash().starts_with("sha256:"));
}

#[test]
fn people_tie_principals_to_one_person() {
    let policy = Policy::parse(
        "version: 1\npeople:\n  alice: [\"cli:alice\", \"slack:U01ALICE\", \"email:Alice@example.com\"]\ngroups:\n  ops: [\"person:alice\", \"cli:bob\"]\ntiers:\n  low:\n    approvers: [\"group:ops\"]\n  high:\n    approvers: [\"person:alice\"]\n",
    )
    .unwrap();
    for tier in ["low", "high"] {
        for principal in ["cli:alice", "slack:U01ALICE", "email:alice@example.com"] {
            assert!(
                policy.is_approver(tier, &principal.parse().unwrap()),
                "{principal} in {tier}"
            );
        }
    }
    assert!(!policy.is_approver("high", &"cli:bob".parse().unwrap()));
    // A voter acting under one principal is known under all of the person's.
    let voter = policy.identify(&Voter::new("slack:U01ALICE".parse().unwrap()));
    for principal in ["cli:alice", "email:alice@example.com"] {
        assert!(voter.is(&principal.parse().unwrap()), "{principal}");
    }
    assert_eq!(voter.aliases.len(), 2);
    // Someone in no person's entry is only themself.
    let bob = policy.identify(&Voter::new("cli:bob".parse().unwrap()));
    assert!(bob.aliases.is_empty());
    assert!(policy.people().names_anyone_by_email());
    assert_eq!(policy.tier_rank("low"), Some(0));
    assert_eq!(policy.tier_rank("high"), Some(1));
}

/// Each broken policy must be refused with a message naming the rule (where there is one)
/// and the line.
#[test]
fn validation_errors() {
    let table: Vec<(&str, &str, Option<&str>, u64, &str)> = vec![
        (
            "unknown key in a rule",
            "version: 1\nrules:\n  - name: r1\n    match: [\"a\"]\n    effect: allow\n  - name: r2\n    match: [\"b\"]\n    efect: deny\n",
            Some("r2"), 8, "unknown field",
        ),
        (
            "unknown top-level key",
            "version: 1\nrulez: []\n",
            None, 2, "unknown field",
        ),
        (
            "unknown tier",
            "version: 1\nrules:\n  - name: r1\n    match: [\"a\"]\n    effect: require_approval\n    tier: hgih\n",
            Some("r1"), 3, "unknown tier \"hgih\"",
        ),
        (
            "unknown group",
            "version: 1\ntiers:\n  t:\n    approvers: [\"group:nope\"]\n",
            None, 4, "unknown group \"nope\"",
        ),
        (
            "bad glob",
            "version: 1\nrules:\n  - name: r1\n    match: [\"a[\"]\n    effect: allow\n",
            Some("r1"), 3, "bad glob",
        ),
        (
            "CEL that does not compile",
            "version: 1\nrules:\n  - name: r1\n    match: [\"a\"]\n    when: \"args.amount >\"\n    effect: allow\n",
            Some("r1"), 3, "does not compile",
        ),
        (
            "CEL with unknown variable",
            "version: 1\nrules:\n  - name: r1\n    match: [\"a\"]\n    when: \"amount > 1\"\n    effect: allow\n",
            Some("r1"), 3, "unknown variable(s) amount",
        ),
        (
            "unknown effect",
            "version: 1\nrules:\n  - name: r1\n    match: [\"a\"]\n    effect: maybe\n",
            Some("r1"), 3, "unknown effect",
        ),
        (
            "require_approval without any tier",
            "version: 1\nrules:\n  - name: r1\n    match: [\"a\"]\n    effect: require_approval\n",
            Some("r1"), 3, "needs a `tier`",
        ),
        (
            "duplicate rule name",
            "version: 1\nrules:\n  - name: r1\n    match: [\"a\"]\n    effect: allow\n  - name: r1\n    match: [\"b\"]\n    effect: allow\n",
            Some("r1"), 6, "duplicate rule name",
        ),
        (
            "bad principal in group",
            "version: 1\ngroups:\n  g: [\"alice\"]\n",
            None, 3, "kind:identifier",
        ),
        (
            "bad ttl",
            "version: 1\ntiers:\n  t:\n    approvers: [\"cli:a\"]\n    ttl: soon\n",
            None, 4, "ttl \"soon\"",
        ),
        (
            "bad route",
            "version: 1\ntiers:\n  t:\n    approvers: [\"cli:a\"]\n    route: [\"C0123\"]\n",
            None, 4, "route destination",
        ),
        (
            "unknown default_tier",
            "version: 1\ndefault_tier: nope\n",
            None, 2, "default_tier \"nope\"",
        ),
        (
            "wrong version",
            "version: 2\n",
            None, 1, "unsupported version",
        ),
        (
            "escalation without destination",
            "version: 1\ntiers:\n  t:\n    approvers: [\"cli:a\"]\n    escalate_after: 5m\n",
            None, 4, "escalate_after needs escalate_to",
        ),
        (
            "a principal in two people",
            "version: 1\npeople:\n  alice: [\"cli:alice\", \"slack:U01\"]\n  bob: [\"slack:U01\"]\n",
            None, 4, "already belongs to person \"alice\"",
        ),
        (
            "bad principal of a person",
            "version: 1\npeople:\n  alice: [\"alice\"]\n",
            None, 3, "person \"alice\"",
        ),
        (
            "unknown person in a group",
            "version: 1\ngroups:\n  g: [\"person:zed\"]\n",
            None, 3, "unknown person \"zed\"",
        ),
        (
            "unknown person among approvers",
            "version: 1\ntiers:\n  t:\n    approvers: [\"person:zed\"]\n",
            None, 4, "unknown person \"zed\"",
        ),
        (
            "tier on an allow rule",
            "version: 1\ntiers:\n  t:\n    approvers: [\"cli:a\"]\nrules:\n  - name: r1\n    match: a\n    effect: allow\n    tier: t\n",
            Some("r1"), 6, "only applies to require_approval",
        ),
    ];
    for (name, source, rule, line, message) in table {
        let error = Policy::parse(source).expect_err(name);
        let issue = error
            .issues
            .iter()
            .find(|issue| issue.message.contains(message))
            .unwrap_or_else(|| panic!("{name}: no issue mentions {message:?}: {error}"));
        assert_eq!(issue.rule.as_deref(), rule, "{name}: {error}");
        assert_eq!(issue.line, Some(line), "{name}: {error}");
    }
}

#[test]
fn durations_take_units_or_bare_seconds() {
    let policy = Policy::parse(
        "version: 1\ntiers:\n  quick:\n    approvers: [\"cli:a\"]\n    ttl: 90\n    remind_after: 1m 30s\n",
    )
    .unwrap();
    let tier = policy.tier("quick").unwrap();
    assert_eq!(tier.ttl, std::time::Duration::from_secs(90));
    assert_eq!(tier.remind_after, Some(std::time::Duration::from_secs(90)));
    let error =
        Policy::parse("version: 1\ntiers:\n  slow:\n    approvers: [\"cli:a\"]\n    ttl: 400d\n")
            .unwrap_err();
    assert!(error.to_string().contains("longer than a year"), "{error}");
    // Too few approvers for the quorum is allowed: such requests can only expire.
    assert!(Policy::parse(
        "version: 1\ntiers:\n  t:\n    approvers: [\"cli:a\"]\n    approvals: 2\n"
    )
    .is_ok());
}

#[test]
fn every_error_is_reported_at_once() {
    let source = "version: 1\nrules:\n  - name: r1\n    match: [\"a[\"]\n    effect: allow\n  - name: r2\n    match: [\"b\"]\n    effect: require_approval\n    tier: nope\n";
    let error = Policy::parse(source).unwrap_err();
    assert_eq!(error.issues.len(), 2, "{error}");
    let printed = error.to_string();
    assert!(printed.contains("line 3: rule \"r1\""), "{printed}");
    assert!(printed.contains("line 6: rule \"r2\""), "{printed}");
}

const INTAKE_POLICY: &str = r#"version: 1
default: allow
tiers:
  low:
    approvers: ["cli:alice"]
  medium:
    approvers: ["cli:alice"]
    grants: {max_ttl: 8h, max_uses: 20}
  high:
    approvers: ["cli:alice"]
rules:
  - name: first-three-free
    match: ["email.send"]
    when: "recent_count('1h') >= 3"
    effect: require_approval
    tier: medium
  - name: daily-budget
    match: ["payments.*"]
    when: "recent_sum('amount', '24h') + args.amount > 1000"
    effect: require_approval
    tier: high
  - name: office-hours
    match: ["content.publish"]
    when: "!(now.getHours('Europe/Berlin') >= 9 && now.getHours('Europe/Berlin') < 17)"
    effect: require_approval
    tier: low
  - name: weekend
    match: ["deploy.*"]
    when: "now.getDayOfWeek('America/New_York') == 0"
    effect: deny
  - name: spot-check
    match: ["tickets.update"]
    effect: allow
    sample: 0.25
    tier: low
  - name: trial-deny
    match: ["users.delete", "tickets.update"]
    effect: deny
    mode: shadow
  - name: trial-review
    match: ["users.delete"]
    effect: require_approval
    tier: high
    mode: shadow
"#;

fn intake_policy() -> Policy {
    Policy::parse(INTAKE_POLICY).unwrap_or_else(|error| panic!("intake policy invalid:\n{error}"))
}

fn at(text: &str) -> chrono::DateTime<chrono::Utc> {
    text.parse().unwrap()
}

/// Evaluates with every counter `counters_for` names set to `value`.
fn evaluate_with(
    policy: &Policy,
    action: &str,
    args: Value,
    now: &str,
    counter_value: f64,
    sample_draw: Option<f64>,
) -> Verdict {
    let counters: Vec<(CounterSpec, f64)> = policy
        .counters_for("bot", action)
        .into_iter()
        .map(|spec| (spec, counter_value))
        .collect();
    policy.evaluate_with(
        EvaluationInput {
            action,
            args: &args,
            agent: "bot",
            context: &json!({}),
        },
        Facts {
            now: at(now),
            counters: &counters,
            sample_draw,
        },
    )
}

#[test]
fn counters_are_compiled_per_rule_and_read_as_given() {
    let policy = intake_policy();
    let hour = std::time::Duration::from_secs(3600);
    assert_eq!(
        policy.counters_for("bot", "email.send"),
        vec![CounterSpec {
            field: None,
            window: hour
        }]
    );
    assert_eq!(
        policy.counters_for("bot", "payments.refund"),
        vec![CounterSpec {
            field: Some("amount".into()),
            window: 24 * hour
        }]
    );
    assert!(policy.counters_for("bot", "users.get").is_empty());
    let noon = "2026-12-07T12:00:00Z";
    // (action, args, counter value, effect, tier)
    let table: Vec<(&str, Value, f64, Effect, Option<&str>)> = vec![
        ("email.send", json!({}), 0.0, Effect::Allow, None),
        ("email.send", json!({}), 2.0, Effect::Allow, None),
        (
            "email.send",
            json!({}),
            3.0,
            Effect::RequireApproval,
            Some("medium"),
        ),
        (
            "payments.refund",
            json!({"amount": 100}),
            900.0,
            Effect::Allow,
            None,
        ),
        (
            "payments.refund",
            json!({"amount": 101}),
            900.0,
            Effect::RequireApproval,
            Some("high"),
        ),
        (
            "payments.refund",
            json!({"amount": 1}),
            999.5,
            Effect::RequireApproval,
            Some("high"),
        ),
    ];
    for (action, args, value, effect, tier) in table {
        let verdict = evaluate_with(&policy, action, args.clone(), noon, value, None);
        assert_eq!(verdict.effect, effect, "{action} {args} at {value}");
        assert_eq!(verdict.tier.as_deref(), tier, "{action} {args} at {value}");
    }
    // Without the counters supplied (no history), the condition fails: closed for
    // require_approval.
    let unsupplied = policy.evaluate_with(
        EvaluationInput {
            action: "email.send",
            args: &json!({}),
            agent: "bot",
            context: &json!({}),
        },
        Facts::at(at(noon)),
    );
    assert_eq!(unsupplied.effect, Effect::RequireApproval);
    let error = unsupplied.matches[0]
        .condition_error
        .as_deref()
        .unwrap_or_default();
    assert!(error.contains("needs request history"), "{error}");
}

#[test]
fn now_reads_the_clock_in_a_time_zone() {
    let policy = intake_policy();
    // (action, now in UTC, effect): Berlin is UTC+1 in December; New York UTC-5.
    let table: Vec<(&str, &str, Effect)> = vec![
        (
            "content.publish",
            "2026-12-07T07:59:00Z",
            Effect::RequireApproval,
        ),
        ("content.publish", "2026-12-07T08:00:00Z", Effect::Allow),
        ("content.publish", "2026-12-07T15:59:00Z", Effect::Allow),
        (
            "content.publish",
            "2026-12-07T16:00:00Z",
            Effect::RequireApproval,
        ),
        // Sunday 03:00 UTC is still Saturday in New York.
        ("deploy.web", "2026-12-06T03:00:00Z", Effect::Allow),
        ("deploy.web", "2026-12-06T06:00:00Z", Effect::Deny),
    ];
    for (action, now, effect) in table {
        let verdict = evaluate_with(&policy, action, json!({}), now, 0.0, None);
        assert_eq!(verdict.effect, effect, "{action} at {now}");
    }
}

#[test]
fn sampling_sends_a_fraction_to_review_and_check_reports_the_rate() {
    let policy = intake_policy();
    let noon = "2026-12-07T12:00:00Z";
    // (draw, effect, sampled)
    let table: Vec<(Option<f64>, Effect, bool)> = vec![
        (None, Effect::Allow, false),
        (Some(0.0), Effect::RequireApproval, true),
        (Some(0.2499), Effect::RequireApproval, true),
        (Some(0.25), Effect::Allow, false),
        (Some(0.99), Effect::Allow, false),
    ];
    for (draw, effect, sampled) in table {
        let verdict = evaluate_with(&policy, "tickets.update", json!({}), noon, 0.0, draw);
        assert_eq!(verdict.effect, effect, "draw {draw:?}");
        assert_eq!(verdict.sampled, sampled, "draw {draw:?}");
        assert_eq!(verdict.matches[0].sample, Some(0.25));
        if sampled {
            assert_eq!(verdict.tier.as_deref(), Some("low"));
            assert_eq!(verdict.rule.as_deref(), Some("spot-check"));
        }
    }
}

#[test]
fn shadow_rules_are_listed_and_never_decide() {
    let policy = intake_policy();
    let noon = "2026-12-07T12:00:00Z";
    let verdict = evaluate_with(&policy, "users.delete", json!({}), noon, 0.0, None);
    assert_eq!(
        verdict.effect,
        Effect::Allow,
        "the default, not the shadow deny"
    );
    assert_eq!(verdict.rule, None);
    assert!(verdict.matches.is_empty());
    assert_eq!(
        verdict.shadow,
        vec![
            ShadowMatch {
                rule: "trial-deny".into(),
                effect: "deny".into(),
                tier: None
            },
            ShadowMatch {
                rule: "trial-review".into(),
                effect: "require_approval".into(),
                tier: Some("high".into()),
            },
        ]
    );
    let plain = evaluate_with(&policy, "users.get", json!({}), noon, 0.0, None);
    assert!(plain.shadow.is_empty());
    let explained = serde_json::to_value(verdict.explain("sha256:x")).unwrap();
    assert_eq!(explained["shadow"][0]["rule"], "trial-deny");
    assert_eq!(explained["shadow"][0]["tier"], Value::Null);
}

#[test]
fn intake_feature_validation_errors() {
    let tiers = "version: 1\ntiers:\n  t:\n    approvers: [\"cli:a\"]\nrules:\n";
    // (name, rules, rule, line, message)
    let table: Vec<(&str, &str, Option<&str>, u64, &str)> = vec![
        ("sample on a deny rule", "  - name: r\n    match: a\n    effect: deny\n    sample: 0.5\n", Some("r"), 6, "`sample` only applies to allow rules"),
        ("sample without a tier", "  - name: r\n    match: a\n    effect: allow\n    sample: 0.5\n", Some("r"), 6, "needs a `tier`"),
        ("sample out of range", "  - name: r\n    match: a\n    effect: allow\n    sample: 1.5\n    tier: t\n", Some("r"), 6, "between 0 and 1"),
        ("unknown mode", "  - name: r\n    match: a\n    effect: deny\n    mode: trial\n", Some("r"), 6, "unknown mode"),
        ("counter window not literal", "  - name: r\n    match: a\n    when: \"recent_count(args.w) > 1\"\n    effect: deny\n", Some("r"), 6, "string literal"),
        ("counter window not a duration", "  - name: r\n    match: a\n    when: \"recent_count('soon') > 1\"\n    effect: deny\n", Some("r"), 6, "not a duration"),
        ("sum field not a key", "  - name: r\n    match: a\n    when: \"recent_sum('a.b', '1h') > 1\"\n    effect: deny\n", Some("r"), 6, "top-level args key"),
        ("unknown variable", "  - name: r\n    match: a\n    when: \"later > 1\"\n    effect: deny\n", Some("r"), 6, "unknown variable"),
    ];
    for (name, rules, rule, line, message) in table {
        let source = format!("{tiers}{rules}");
        let error = Policy::parse(&source).expect_err(name);
        let issue = error
            .issues
            .iter()
            .find(|issue| issue.message.contains(message))
            .unwrap_or_else(|| panic!("{name}: no issue mentions {message:?}: {error}"));
        assert_eq!(issue.rule.as_deref(), rule, "{name}: {error}");
        assert_eq!(issue.line, Some(line), "{name}: {error}");
    }
    let grants = Policy::parse(
        "version: 1\ntiers:\n  t:\n    approvers: [\"cli:a\"]\n    grants: {max_ttl: forever, max_uses: 0}\n",
    )
    .unwrap_err();
    let printed = grants.to_string();
    assert!(
        printed.contains("line 4: tier \"t\": grants.max_ttl"),
        "{printed}"
    );
    assert!(
        printed.contains("grants.max_uses must be at least 1"),
        "{printed}"
    );
    let policy = intake_policy();
    assert_eq!(
        policy.tier("medium").and_then(|tier| tier.grants),
        Some(GrantLimits {
            max_ttl: std::time::Duration::from_secs(8 * 3600),
            max_uses: 20
        })
    );
    assert!(policy.any_grants());
}

const DECISION_FEATURES: &str = r#"version: 1
groups:
  finance: ["cli:frank", "cli:grace", "cli:both"]
  sre: ["cli:alice", "cli:both", "slack-group:S01SRE"]
tiers:
  high:
    route: ["slack:C0HIGH"]
    approvers: ["group:finance", "group:sre", "cli:auditor"]
    approvals: {finance: 1, sre: 1}
    escalate:
      - {after: 15m, to: ["slack:C0ONCALL"]}
      - {after: 45m, to: ["teams:19:managers@thread.tacv2"]}
  single:
    route: ["slack:C0SINGLE"]
    approvers: ["group:sre"]
    escalate_after: 30m
    escalate_to: ["slack:C0ONCALL"]
redact: ["args.card_number", "context.customer.email"]
"#;

#[test]
fn per_group_quorum_ladders_and_redaction_compile() {
    let policy = Policy::parse(DECISION_FEATURES).unwrap_or_else(|error| panic!("{error}"));
    let high = policy.tier("high").unwrap();
    assert_eq!(high.approvals, 2, "the map's total");
    assert_eq!(
        high.approvals_by_group,
        [("finance".to_string(), 1), ("sre".to_string(), 1)].into()
    );
    let table = [
        ("cli:frank", vec!["finance"]),
        ("cli:alice", vec!["sre"]),
        ("cli:both", vec!["finance", "sre"]),
        ("cli:auditor", vec![]),
    ];
    for (who, groups) in table {
        let voter = Voter::new(who.parse().unwrap());
        assert_eq!(high.quorum_groups_of(&voter), groups, "{who}");
    }
    let mut in_user_group = Voter::new("slack:U0X".parse().unwrap());
    in_user_group.groups = vec!["slack-group:S01SRE".into()];
    assert_eq!(high.quorum_groups_of(&in_user_group), vec!["sre"]);
    let minutes = |count: u64| Duration::from_secs(count * 60);
    assert_eq!(
        high.escalation
            .iter()
            .map(|step| (step.after, step.to.clone()))
            .collect::<Vec<_>>(),
        vec![
            (minutes(15), vec!["slack:C0ONCALL".to_string()]),
            (
                minutes(45),
                vec!["teams:19:managers@thread.tacv2".to_string()]
            ),
        ]
    );
    let single = policy.tier("single").unwrap();
    assert_eq!(
        single.escalation.len(),
        1,
        "escalate_after/escalate_to is one step"
    );
    assert_eq!(single.escalation[0].after, minutes(30));
    assert!(single.approvals_by_group.is_empty());
    assert_eq!(policy.redact_paths().len(), 2);
}

#[test]
fn decision_feature_validation_errors() {
    let tier = |body: &str| {
        format!("version: 1\ngroups:\n  finance: [\"cli:f\"]\n  sre: [\"cli:s\"]\ntiers:\n  high:\n    approvers: [\"group:finance\", \"cli:x\"]\n{body}")
    };
    let table: Vec<(&str, String, u64, &str)> = vec![
        (
            "a quorum group not among the approvers",
            tier("    approvals: {finance: 1, sre: 1}\n"),
            7, "tier \"high\": approvals names group \"sre\", which is not among the tier's approvers",
        ),
        (
            "a quorum group needing nobody",
            tier("    approvals: {finance: 0}\n"),
            7, "approvals of group \"finance\" must be at least 1",
        ),
        (
            "both escalation forms",
            tier("    escalate_after: 5m\n    escalate_to: [\"slack:C1\"]\n    escalate:\n      - {after: 10m, to: [\"slack:C2\"]}\n"),
            7, "tier \"high\": use either escalate (a ladder) or escalate_after/escalate_to (one step), not both",
        ),
        (
            "steps out of order",
            tier("    escalate:\n      - {after: 30m, to: [\"slack:C1\"]}\n      - {after: 10m, to: [\"slack:C2\"]}\n"),
            7, "escalate step 2 must come after step 1",
        ),
        (
            "a step without destinations",
            tier("    escalate:\n      - {after: 30m, to: []}\n"),
            7, "escalate step 1 needs destinations",
        ),
        (
            "a step with a bad destination",
            tier("    escalate:\n      - {after: 30m, to: [\"email:x@y.z\"]}\n"),
            7, "route destination \"email:x@y.z\"",
        ),
        (
            "a step with a bad duration",
            tier("    escalate:\n      - {after: soon, to: [\"slack:C1\"]}\n"),
            7, "escalate step 1: after \"soon\" is not a duration",
        ),
        (
            "escalate_to alone",
            tier("    escalate_to: [\"slack:C1\"]\n"),
            7, "escalate_to needs escalate_after",
        ),
        (
            "a redact path outside args and context",
            "version: 1\nredact: [\"args.card\", \"body.card\"]\n".to_string(),
            2, "redact path \"body.card\" must start with args. or context.",
        ),
        (
            "a redact path without a field",
            "version: 1\nredact: [\"context\"]\n".to_string(),
            2, "needs a field after its root",
        ),
    ];
    for (name, source, line, message) in table {
        let error = Policy::parse(&source).expect_err(name);
        let issue = error
            .issues
            .iter()
            .find(|issue| issue.message.contains(message))
            .unwrap_or_else(|| panic!("{name}: no issue mentions {message:?}: {error}"));
        assert_eq!(issue.line, Some(line), "{name}: {error}");
    }
    // Every problem at once, each naming its tier.
    let error = Policy::parse(&tier(
        "    approvals: {sre: 1}\n    escalate_after: 5m\n    escalate_to: [\"slack:C1\"]\n    escalate:\n      - {after: 10m, to: [\"slack:C2\"]}\nredact: [\"nope\"]\n",
    ))
    .unwrap_err();
    assert_eq!(error.issues.len(), 3, "{error}");
}
