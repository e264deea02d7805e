//! Adaptive Card 1.5 rendering of a request's card — pure functions. Every action carries
//! the request id and the revision shown; the card refreshes itself for whoever views it.

use serde_json::{json, Value};

use crate::channels::{CardView, VoteTarget, APPROVE, APPROVE_FOR, DENY, MODIFY};
use crate::domain::{Principal, Status};

pub const CONTENT_TYPE: &str = "application/vnd.microsoft.card.adaptive";
pub const REFRESH: &str = "refresh";
/// The inputs' ids, which come back merged into the action's data.
pub const REASON_INPUT: &str = "reason";
pub const ARGS_INPUT: &str = "args";
/// The "Approve for …" choice: the grant's length in seconds.
pub const GRANT_INPUT: &str = "grant_seconds";
/// Room for the args in the card's text before they are truncated with a note.
const ARGS_LIMIT: usize = 2600;
/// Longer args are not prefilled for editing (Teams' card payload is limited to ~28 KB).
pub const INPUT_LIMIT: usize = 10_000;

/// What one person is shown beyond the card itself: why nothing happened (or what did), and
/// the args they typed when those were refused.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForViewer<'a> {
    pub notice: Option<&'a str>,
    pub typed_args: Option<&'a str>,
}

/// The card for a request: facts, args, evidence, progress, and either the actions
/// (pending) or the outcome (final).
pub fn render_card(card: &CardView) -> Value {
    render_card_for(card, &ForViewer::default())
}

pub fn render_card_for(card: &CardView, viewer: &ForViewer<'_>) -> Value {
    let target = VoteTarget::of(card);
    let mut body = Vec::new();
    if let Some(notice) = viewer.notice {
        body.push(plain_block(vec![json!({
            "type": "TextRun", "text": notice, "weight": "Bolder", "color": "Attention",
        })]));
    }
    body.push(plain_block(vec![json!({
        "type": "TextRun", "text": card.action, "size": "Large", "weight": "Bolder",
    })]));
    if let Some(summary) = &card.summary {
        body.push(plain(summary));
    }
    let mut facts = vec![
        fact("Agent", &card.agent),
        fact(
            "Requested by",
            &card.requester.as_ref().map_or_else(|| "—".into(), name),
        ),
        fact("Tier", card.tier.as_deref().unwrap_or("—")),
        fact("Rule", card.rule.as_deref().unwrap_or("—")),
    ];
    if let Some(expires_at) = card.expires_at {
        facts.push(fact("Expires", &date(expires_at)));
    }
    facts.push(fact("Request", &card.id));
    facts.push(fact("Revision", &card.revision.to_string()));
    body.push(json!({"type": "FactSet", "facts": facts}));
    body.extend(args_blocks(card));
    for (label, value) in evidence_lines(card) {
        body.push(plain_block(vec![bold(&format!("{label}: ")), run(&value)]));
    }
    body.extend(modification_blocks(card));
    if let (Some(at), true) = (card.escalated_at, card.is_pending()) {
        body.push(json!({
            "type": "TextBlock", "color": "Warning", "wrap": true,
            "text": format!(
                "**Escalated{}** {} — still waiting for a decision",
                card.escalation_step
                    .map(|(step, of)| format!(": step {step} of {of}"))
                    .unwrap_or_default(),
                date(at)
            ),
        }));
    }
    body.push(json!({
        "type": "TextBlock", "text": progress_text(card), "wrap": true, "isSubtle": true,
    }));
    if !card.is_pending() {
        body.push(outcome_block(card));
    }
    let mut rendered = json!({
        "type": "AdaptiveCard",
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.5",
        "refresh": {"action": execute(REFRESH, "Refresh", &target)},
        "body": body,
    });
    if card.is_pending() {
        rendered["actions"] = Value::Array(actions(card, &target, viewer));
    }
    rendered
}

/// The card as a message's attachment.
pub fn attachment(card: Value) -> Value {
    json!({"contentType": CONTENT_TYPE, "content": card})
}

/// An activity carrying `cards`, with `text` for notifications.
pub fn card_activity(text: &str, cards: Vec<Value>) -> Value {
    json!({
        "type": "message",
        "text": text,
        "attachments": cards.into_iter().map(attachment).collect::<Vec<_>>(),
    })
}

/// The text Teams shows in notifications.
pub fn card_fallback_text(card: &CardView) -> String {
    match card.status {
        Status::Pending => format!("Approval needed: {} by {}", card.action, card.agent),
        status => format!("{} {}: {}", card.action, card.agent, status.as_str()),
    }
}

/// Approve at once; approve for a while (tiers with grants), deny and modify each open a
/// form first.
fn actions(card: &CardView, target: &VoteTarget, viewer: &ForViewer<'_>) -> Vec<Value> {
    let mut actions = vec![execute(APPROVE, "Approve", target)];
    actions.extend(grant_action(card, target));
    actions.extend([json!({
        "type": "Action.ShowCard",
        "title": "Deny",
        "card": {
            "type": "AdaptiveCard",
            "body": [{
                "type": "Input.Text", "id": REASON_INPUT, "isMultiline": true,
                "isRequired": true, "maxLength": 2000,
                "label": "Reason (the agent sees this)",
                "errorMessage": "A deny needs a reason.",
            }],
            "actions": [execute(DENY, "Deny", target)],
        },
    })]);
    let prefilled = viewer.typed_args.map(str::to_string).or_else(|| {
        serde_json::to_string_pretty(&card.args)
            .ok()
            .filter(|pretty| pretty.chars().count() <= INPUT_LIMIT)
    });
    if let Some(prefilled) = prefilled {
        actions.push(json!({
            "type": "Action.ShowCard",
            "title": "Modify",
            "card": {
                "type": "AdaptiveCard",
                "body": [
                    {
                        "type": "TextBlock", "wrap": true, "isSubtle": true,
                        "text": "Saving starts a new revision: earlier approvals no longer count, and yours counts as the first. The policy checks the new args again: it may refuse them, or move the request to a higher tier.",
                    },
                    {
                        "type": "Input.Text", "id": ARGS_INPUT, "isMultiline": true,
                        "isRequired": true, "label": "Args (JSON object)", "value": prefilled,
                    },
                ],
                "actions": [execute(MODIFY, "Save and approve", target)],
            },
        }));
    }
    actions
}

/// "Approve for …": a choice of durations, then an approve vote asking for a grant that
/// long. The choice comes back in the action's data as `grant_seconds`.
fn grant_action(card: &CardView, target: &VoteTarget) -> Option<Value> {
    let first = card.grant_choices.first()?;
    let choices: Vec<Value> = card
        .grant_choices
        .iter()
        .map(|choice| json!({"title": choice.label, "value": choice.ttl_seconds.to_string()}))
        .collect();
    Some(json!({
        "type": "Action.ShowCard",
        "title": "Approve for …",
        "card": {
            "type": "AdaptiveCard",
            "body": [
                {
                    "type": "Input.ChoiceSet", "id": GRANT_INPUT, "style": "expanded",
                    "isRequired": true, "label": "How long",
                    "value": first.ttl_seconds.to_string(), "choices": choices,
                    "errorMessage": "Choose how long.",
                },
                {
                    "type": "TextBlock", "wrap": true, "isSubtle": true,
                    "text": "Your approval is recorded under your name, and later requests for the same action and args are approved at once until the grant expires or is revoked.",
                },
            ],
            "actions": [execute(APPROVE_FOR, "Approve and grant", target)],
        },
    }))
}

fn execute(verb: &str, title: &str, target: &VoteTarget) -> Value {
    let mut action = json!({
        "type": "Action.Execute",
        "verb": verb,
        "title": title,
        "data": target,
    });
    if verb == APPROVE || verb == APPROVE_FOR {
        action["style"] = json!("positive");
    }
    if verb == DENY {
        action["style"] = json!("destructive");
    }
    action
}

fn fact(title: &str, value: &str) -> Value {
    json!({"title": title, "value": value})
}

fn args_blocks(card: &CardView) -> Vec<Value> {
    let pretty = serde_json::to_string_pretty(&card.args).unwrap_or_default();
    let shown = truncate_chars(&pretty, ARGS_LIMIT);
    let mut blocks = vec![
        plain_block(vec![bold("Args")]),
        plain_block(vec![
            json!({"type": "TextRun", "text": shown, "fontType": "Monospace"}),
        ]),
    ];
    if shown.len() < pretty.len() {
        let hidden = pretty[shown.len()..].chars().count();
        blocks.push(json!({
            "type": "TextBlock", "wrap": true, "isSubtle": true,
            "text": format!("Truncated: {hidden} more characters not shown. The full args are in `signoff show {}`.", card.id),
        }));
    }
    blocks
}

/// (label, value) lines of what the agent gave as evidence.
fn evidence_lines(card: &CardView) -> Vec<(&'static str, String)> {
    let mut lines = Vec::new();
    if let Some(reason) = &card.reason {
        lines.push(("Why", reason.clone()));
    }
    if let Some(reversible) = card.reversible {
        lines.push(("Reversible", if reversible { "yes" } else { "no" }.into()));
    }
    if !card.links.is_empty() {
        lines.push(("Links", card.links.join(" · ")));
    }
    lines
}

fn modification_blocks(card: &CardView) -> Vec<Value> {
    if card.revision <= 1 {
        return Vec::new();
    }
    let by = card
        .modified_by
        .as_ref()
        .map_or_else(|| "an approver".to_string(), name);
    let mut blocks = vec![plain_block(vec![
        bold("Modified"),
        run(&format!(" by {by} (revision {})", card.revision)),
    ])];
    for (key, before, after) in &card.changes {
        blocks.push(plain(&format!(
            "• {key}: {} → {}",
            truncate_chars(&before.to_string(), 200),
            truncate_chars(&after.to_string(), 200)
        )));
    }
    blocks
}

fn progress_text(card: &CardView) -> String {
    let mut text = format!(
        "{} of {} approval{}",
        card.approvals,
        card.approvals_required,
        if card.approvals_required == 1 {
            ""
        } else {
            "s"
        }
    );
    if !card.group_progress.is_empty() {
        let groups: Vec<String> = card
            .group_progress
            .iter()
            .map(|group| format!("{} {}/{}", group.group, group.filled, group.required))
            .collect();
        text.push_str(&format!(" ({})", groups.join(" · ")));
    }
    if !card.approvers.is_empty() {
        let names: Vec<String> = card.approvers.iter().map(name).collect();
        text.push_str(&format!(" · approved by {}", names.join(", ")));
    }
    text
}

fn outcome_block(card: &CardView) -> Value {
    let (word, color) = match card.status {
        Status::Approved => ("Approved", "Good"),
        Status::Denied => ("Denied", "Attention"),
        Status::Expired => ("Expired", "Warning"),
        Status::Cancelled => ("Cancelled", "Default"),
        Status::Pending => ("Pending", "Default"),
    };
    let by: Vec<String> = card.decided_by.iter().map(name).collect();
    let mut text = word.to_string();
    if !by.is_empty() {
        text.push_str(&format!(" by {}", by.join(", ")));
    }
    if let Some(at) = card.decided_at {
        // Text runs do not format DATE()/TIME() in the reader's zone: UTC, spelt out.
        text.push_str(&format!(" · {}", at.format("%Y-%m-%d %H:%M UTC")));
    }
    let mut runs =
        vec![json!({"type": "TextRun", "text": text, "weight": "Bolder", "color": color})];
    if let Some(reason) = &card.decision_reason {
        runs.push(bold("\nReason: "));
        runs.push(run(reason));
    }
    if card.status == Status::Approved && card.revision > 1 {
        runs.push(run("\nApproved with the modified args above."));
    }
    plain_block(runs)
}

/// Text as written: a RichTextBlock's runs are never read as markdown, so what an agent or
/// a voter wrote cannot pose as a link or as formatting of the card's own.
fn plain(text: &str) -> Value {
    plain_block(vec![run(text)])
}

fn plain_block(runs: Vec<Value>) -> Value {
    json!({"type": "RichTextBlock", "inlines": runs})
}

fn run(text: &str) -> Value {
    json!({"type": "TextRun", "text": text})
}

fn bold(text: &str) -> Value {
    json!({"type": "TextRun", "text": text, "weight": "Bolder"})
}

/// The reminder posted as a reply to a card, naming who can still decide.
pub fn reminder_text(approvers: &[String], approvals: u64, required: u64) -> String {
    let missing = required.saturating_sub(approvals);
    format!(
        "Still waiting: {missing} more approval{} needed ({approvals} of {required}). Approvers: {}",
        if missing == 1 { "" } else { "s" },
        approvers.join(", ")
    )
}

/// A principal as the card names it (Teams mentions need the user's display name, which
/// signoff does not have).
fn name(principal: &Principal) -> String {
    principal.as_str().to_string()
}

/// Adaptive Cards format `{{DATE(…)}}` and `{{TIME(…)}}` in the reader's time zone.
fn date(at: chrono::DateTime<chrono::Utc>) -> String {
    let iso = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    format!("{{{{DATE({iso}, SHORT)}}}} {{{{TIME({iso})}}}}")
}

fn truncate_chars(text: &str, limit: usize) -> &str {
    match text.char_indices().nth(limit) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::fixtures::{at, pending_refund as pending_refund_between};
    use crate::domain::{ApprovalRequest, Decision};

    /// A policy without tiers, ladders or redaction: the card shows the request as it is.
    /// The card's tier `high` allows grants of up to 6 hours.
    fn granting_policy() -> crate::policy::Policy {
        crate::policy::Policy::parse(
            r#"version: 1
tiers:
  high:
    route: ["teams:19:high@thread.tacv2"]
    approvers: ["teams:00000000-0000-0000-0000-0000000a11ce"]
    grants: {max_ttl: 6h, max_uses: 4}
"#,
        )
        .unwrap()
    }

    fn no_policy() -> crate::policy::Policy {
        crate::policy::Policy::parse("version: 1\n").unwrap()
    }

    fn pending_refund() -> ApprovalRequest {
        pending_refund_between(
            "teams:00000000-0000-0000-0000-00000000000a",
            "teams:00000000-0000-0000-0000-0000000a11ce",
        )
    }

    #[test]
    fn pending_adaptive_card() {
        insta::assert_json_snapshot!(render_card(&CardView::of(&pending_refund(), &no_policy())));
    }

    #[test]
    fn pending_adaptive_card_offering_grants() {
        let card = CardView::of(&pending_refund(), &granting_policy());
        insta::assert_json_snapshot!(render_card(&card));
    }

    #[test]
    fn decided_cards_offer_no_grants() {
        let mut request = pending_refund();
        request.status = Status::Approved;
        let card = CardView::of(&request, &granting_policy());
        assert!(!render_card(&card).to_string().contains(APPROVE_FOR));
    }

    #[test]
    fn denied_adaptive_card() {
        let mut request = pending_refund();
        request.status = Status::Denied;
        request.decision = Some(Decision {
            outcome: Status::Denied,
            by: vec!["teams:00000000-0000-0000-0000-0000000da7e0"
                .parse()
                .unwrap()],
            reason: Some("Customer was already refunded".into()),
            at: at(9),
            modified: false,
            args: request.args.clone(),
        });
        insta::assert_json_snapshot!(render_card(&CardView::of(&request, &no_policy())));
    }

    #[test]
    fn refused_modification_keeps_what_was_typed_and_says_why() {
        let card = CardView::of(&pending_refund(), &no_policy());
        let rendered = render_card_for(
            &card,
            &ForViewer {
                notice: Some("args: not valid JSON"),
                typed_args: Some("{amount: 5}"),
            },
        );
        insta::assert_json_snapshot!(rendered);
    }

    #[test]
    fn what_agents_and_voters_wrote_is_never_read_as_markdown() {
        let mut request = pending_refund();
        request.action = "**Urgent** [approve here](https://evil.example)".into();
        request.context.summary = Some("[approve here](https://evil.example)".into());
        request.context.reason = Some("_see_ [link](https://evil.example)".into());
        request.status = Status::Denied;
        request.decision = Some(Decision {
            outcome: Status::Denied,
            by: vec!["teams:00000000-0000-0000-0000-0000000da7e0"
                .parse()
                .unwrap()],
            reason: Some("[x](https://evil.example)".into()),
            at: at(9),
            modified: false,
            args: request.args.clone(),
        });
        fn text_blocks(value: &Value, found: &mut Vec<String>) {
            match value {
                Value::Object(object) => {
                    if object.get("type") == Some(&json!("TextBlock")) {
                        found.push(object["text"].to_string());
                    }
                    object.values().for_each(|inner| text_blocks(inner, found));
                }
                Value::Array(items) => items.iter().for_each(|inner| text_blocks(inner, found)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        text_blocks(
            &render_card(&CardView::of(&request, &no_policy())),
            &mut found,
        );
        assert!(found.iter().all(|text| !text.contains("evil")), "{found:?}");
        assert!(render_card(&CardView::of(&request, &no_policy()))
            .to_string()
            .contains("[x](https://evil.example)"));
    }

    #[test]
    fn cards_show_group_progress_escalation_steps_and_no_redacted_value() {
        let policy = crate::policy::Policy::parse(
            r#"version: 1
groups:
  finance: ["teams:00000000-0000-0000-0000-00000000a11c"]
  sre: ["cli:bob"]
tiers:
  high:
    route: ["teams:19:high@thread.tacv2"]
    approvers: ["group:finance", "group:sre"]
    approvals: {finance: 1, sre: 1}
    escalate:
      - {after: 15m, to: ["teams:19:oncall@thread.tacv2"]}
      - {after: 45m, to: ["teams:19:managers@thread.tacv2"]}
redact: ["args.order"]
"#,
        )
        .unwrap();
        let mut request = pending_refund();
        request.approvals_by_group = [("finance".to_string(), 1), ("sre".to_string(), 1)].into();
        request.votes[0].groups = vec!["finance".into()];
        request.escalated_at = Some(request.created_at);
        request.escalation_step = 2;
        request.context.summary = None;
        request.context.links.clear();
        let card = CardView::of(&request, &policy);
        let rendered = render_card(&card).to_string();
        assert!(rendered.contains("finance 1/1 · sre 0/1"), "{rendered}");
        assert!(rendered.contains("Escalated: step 2 of 2"), "{rendered}");
        assert!(rendered.contains("[redacted]"), "{rendered}");
        assert!(!rendered.contains("A-1042"), "{rendered}");
        assert_eq!(card.args["order"], "[redacted]");
    }

    #[test]
    fn every_execute_carries_the_request_and_revision() {
        let mut request = pending_refund();
        request.revision = 3;
        let rendered = render_card(&CardView::of(&request, &no_policy())).to_string();
        let data = format!(
            "\"data\":{{\"request_id\":\"{}\",\"revision\":3}}",
            request.id
        );
        // approve, deny, modify and refresh.
        assert_eq!(rendered.matches(&data).count(), 4, "{rendered}");
    }

    #[test]
    fn long_args_are_truncated_and_not_offered_for_editing() {
        let mut request = pending_refund();
        request.args = json!({"blob": "x".repeat(20_000)});
        let rendered = render_card(&CardView::of(&request, &no_policy()));
        let text = rendered.to_string();
        assert!(text.contains("Truncated:"), "{text}");
        assert!(text.len() < 8_000, "{}", text.len());
        let titles: Vec<&str> = rendered["actions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|action| action["title"].as_str())
            .collect();
        assert_eq!(titles, ["Approve", "Deny"]);
    }
}
