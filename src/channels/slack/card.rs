//! Block Kit rendering of a request's card and of the deny / modify modals — pure functions.

use slack_morphism::prelude::*;

use crate::channels::{CardView, VoteTarget, APPROVE, APPROVE_FOR, DENY, MODIFY};
use crate::domain::{Principal, Status};

/// Block Kit limits (https://api.slack.com/reference/block-kit/blocks).
const HEADER_LIMIT: usize = 150;
const SECTION_LIMIT: usize = 3000;
const FIELD_LIMIT: usize = 2000;
/// Room left for the args after the label, code fences and the truncation note.
const ARGS_LIMIT: usize = 2600;
/// Slack's limit on a plain-text input's value.
pub const INPUT_LIMIT: usize = 3000;

pub const DENY_CALLBACK: &str = "signoff_deny";
pub const MODIFY_CALLBACK: &str = "signoff_modify";
pub const REASON_BLOCK: &str = "reason";
pub const ARGS_BLOCK: &str = "args";

/// The card for a request: header, facts, args, evidence, progress, and either the buttons
/// (pending) or the outcome (final).
pub fn render_card(card: &CardView) -> Vec<SlackBlock> {
    let mut blocks: Vec<SlackBlock> =
        vec![SlackHeaderBlock::new(pt!(truncate(&card.action, HEADER_LIMIT))).into()];
    if let Some(summary) = &card.summary {
        blocks.push(
            SlackSectionBlock::new()
                .with_text(md!(truncate(&escape(summary), SECTION_LIMIT)))
                .into(),
        );
    }
    let mut fields = vec![
        field("Agent", &escape(&card.agent)),
        field(
            "Requested by",
            &card
                .requester
                .as_ref()
                .map_or_else(|| "—".to_string(), mention),
        ),
        field("Tier", &escape(card.tier.as_deref().unwrap_or("—"))),
        field("Rule", &escape(card.rule.as_deref().unwrap_or("—"))),
    ];
    if let Some(expires_at) = card.expires_at {
        fields.push(field("Expires", &slack_date(expires_at)));
    }
    fields.push(field("Request", &format!("`{}`", card.id)));
    blocks.push(SlackSectionBlock::new().with_fields(fields).into());
    blocks.push(
        SlackSectionBlock::new()
            .with_text(md!(args_text(card)))
            .into(),
    );

    let evidence = evidence_text(card);
    if !evidence.is_empty() {
        blocks.push(
            SlackSectionBlock::new()
                .with_text(md!(truncate(&evidence, SECTION_LIMIT)))
                .into(),
        );
    }
    if let Some(modification) = modification_text(card) {
        blocks.push(
            SlackSectionBlock::new()
                .with_text(md!(truncate(&modification, SECTION_LIMIT)))
                .into(),
        );
    }
    if let (Some(at), true) = (card.escalated_at, card.is_pending()) {
        let step = card
            .escalation_step
            .map(|(step, of)| format!(": step {step} of {of}"))
            .unwrap_or_default();
        blocks.push(
            SlackContextBlock::new(vec![md!(format!(
                ":rotating_light: *Escalated{step}* {} — still waiting for a decision",
                slack_date(at)
            ))])
            .into(),
        );
    }
    blocks.push(SlackContextBlock::new(vec![md!(progress_text(card))]).into());

    if card.is_pending() {
        blocks.push(buttons(card).into());
    } else {
        blocks.push(
            SlackSectionBlock::new()
                .with_text(md!(truncate(&outcome_text(card), SECTION_LIMIT)))
                .into(),
        );
    }
    blocks
}

/// The plain-text fallback Slack shows in notifications.
pub fn card_fallback_text(card: &CardView) -> String {
    match card.status {
        Status::Pending => format!("Approval needed: {} by {}", card.action, card.agent),
        status => format!("{} {}: {}", card.action, card.agent, status.as_str()),
    }
}

/// Every button carries the request id and the revision shown, so a click on an older
/// card cannot count for a newer revision.
fn buttons(card: &CardView) -> SlackActionsBlock {
    let target = VoteTarget::of(card).encode();
    let confirm = SlackBlockConfirmItem::new(
        pt!("Approve this action?"),
        md!("Your approval is recorded under your name and cannot be taken back."),
        pt!("Approve"),
        pt!("Cancel"),
    );
    let mut elements = slack_blocks![
        some_into(
            SlackBlockButtonElement::new(pt!("Approve"))
                .with_action_id(APPROVE.into())
                .with_value(target.clone())
                .with_style(SlackBlockButtonStyle::Primary)
                .with_confirm(confirm)
        ),
        some_into(
            SlackBlockButtonElement::new(pt!("Deny"))
                .with_action_id(DENY.into())
                .with_value(target.clone())
                .with_style(SlackBlockButtonStyle::Danger)
        ),
        some_into(
            SlackBlockButtonElement::new(pt!("Modify"))
                .with_action_id(MODIFY.into())
                .with_value(target)
        )
    ];
    if let Some(select) = grant_select(card) {
        elements.push(select.into());
    }
    SlackActionsBlock::new(elements)
        .with_block_id(format!("signoff:{}:{}", card.id, card.revision).into())
}

/// "Approve for …": each option an approve vote asking for a grant of its length.
fn grant_select(card: &CardView) -> Option<SlackBlockStaticSelectElement> {
    if card.grant_choices.is_empty() {
        return None;
    }
    let options = card
        .grant_choices
        .iter()
        .map(|choice| {
            let target = VoteTarget {
                grant_seconds: Some(choice.ttl_seconds),
                ..VoteTarget::of(card)
            };
            SlackBlockChoiceItem::new(pt!(choice.label.clone()), target.encode())
        })
        .collect();
    Some(
        SlackBlockStaticSelectElement::new()
            .with_action_id(APPROVE_FOR.into())
            .with_placeholder(pt!("Approve for…"))
            .with_options(options)
            .with_confirm(SlackBlockConfirmItem::new(
                pt!("Approve and grant?"),
                md!("Your approval is recorded under your name, and later requests for the same action and args are approved at once until the grant expires or is revoked."),
                pt!("Approve"),
                pt!("Cancel"),
            )),
    )
}

fn field(label: &str, value: &str) -> SlackBlockText {
    md!(truncate(&format!("*{label}*\n{value}"), FIELD_LIMIT))
}

fn args_text(card: &CardView) -> String {
    let pretty = serde_json::to_string_pretty(&card.args).unwrap_or_default();
    // Inside a code block only the three characters Slack treats as control need escaping.
    let escaped = escape(&pretty).replace("```", "`\u{200b}``");
    let shown = truncate_chars(&escaped, ARGS_LIMIT);
    if shown.len() < escaped.len() {
        let hidden = escaped[shown.len()..].chars().count();
        format!("*Args*\n```{shown}```\n_Truncated: {hidden} more characters not shown. The full args are in `signoff show {}`._", card.id)
    } else {
        format!("*Args*\n```{shown}```")
    }
}

fn evidence_text(card: &CardView) -> String {
    let mut lines = Vec::new();
    if let Some(reason) = &card.reason {
        lines.push(format!("*Why:* {}", escape(reason)));
    }
    if let Some(reversible) = card.reversible {
        lines.push(format!(
            "*Reversible:* {}",
            if reversible { "yes" } else { "no" }
        ));
    }
    if !card.links.is_empty() {
        let links: Vec<String> = card
            .links
            .iter()
            .map(|link| {
                if link.starts_with("https://") || link.starts_with("http://") {
                    format!("<{}>", link.replace(['<', '>', '|'], ""))
                } else {
                    escape(link)
                }
            })
            .collect();
        lines.push(format!("*Links:* {}", links.join(" · ")));
    }
    lines.join("\n")
}

fn modification_text(card: &CardView) -> Option<String> {
    if card.revision <= 1 {
        return None;
    }
    let by = card
        .modified_by
        .as_ref()
        .map_or_else(|| "an approver".to_string(), mention);
    let mut text = format!(":pencil2: *Modified* by {by} (revision {})", card.revision);
    for (key, before, after) in &card.changes {
        text.push_str(&format!(
            "\n• `{}`: `{}` → `{}`",
            escape(key),
            escape(&truncate(&before.to_string(), 200)),
            escape(&truncate(&after.to_string(), 200))
        ));
    }
    Some(text)
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
            .map(|group| {
                format!(
                    "{} {}/{}",
                    escape(&group.group),
                    group.filled,
                    group.required
                )
            })
            .collect();
        text.push_str(&format!(" ({})", groups.join(" · ")));
    }
    if !card.approvers.is_empty() {
        let names: Vec<String> = card.approvers.iter().map(mention).collect();
        text.push_str(&format!(" · approved by {}", names.join(", ")));
    }
    truncate(&text, SECTION_LIMIT)
}

fn outcome_text(card: &CardView) -> String {
    let (icon, word) = match card.status {
        Status::Approved => (":white_check_mark:", "Approved"),
        Status::Denied => (":no_entry:", "Denied"),
        Status::Expired => (":hourglass:", "Expired"),
        Status::Cancelled => (":heavy_multiplication_x:", "Cancelled"),
        Status::Pending => (":hourglass_flowing_sand:", "Pending"),
    };
    let by: Vec<String> = card.decided_by.iter().map(mention).collect();
    let mut text = format!("{icon} *{word}*");
    if !by.is_empty() {
        text.push_str(&format!(" by {}", by.join(", ")));
    }
    if let Some(at) = card.decided_at {
        text.push_str(&format!(" · {}", slack_date(at)));
    }
    if let Some(reason) = &card.decision_reason {
        text.push_str(&format!("\n*Reason:* {}", escape(reason)));
    }
    if card.status == Status::Approved && card.revision > 1 {
        text.push_str("\n_Approved with the modified args above._");
    }
    text
}

/// The modal that asks a denier for the reason.
pub fn deny_modal(card: &CardView) -> SlackView {
    SlackView::Modal(
        SlackModalView::new(
            pt!("Deny request"),
            slack_blocks![
                some_into(SlackSectionBlock::new().with_text(md!(format!(
                    "Deny *{}* requested by *{}*?",
                    escape(&truncate(&card.action, 200)),
                    escape(&card.agent)
                )))),
                some_into(
                    SlackInputBlock::new(
                        pt!("Reason"),
                        SlackBlockPlainTextInputElement::new()
                            .with_action_id(REASON_BLOCK.into())
                            .with_multiline(true)
                            .with_max_length(2000)
                            .with_placeholder(pt!("Why may this not run? The agent sees this."))
                            .into(),
                    )
                    .with_block_id(REASON_BLOCK.into())
                )
            ],
        )
        .with_submit(pt!("Deny"))
        .with_close(pt!("Cancel"))
        .with_callback_id(DENY_CALLBACK.into())
        .with_private_metadata(VoteTarget::of(card).encode()),
    )
}

/// The modal with the args prefilled as JSON, for an approver to change. `None` when the
/// args are too long for a Slack text input.
pub fn modify_modal(card: &CardView) -> Option<SlackView> {
    let pretty = serde_json::to_string_pretty(&card.args).ok()?;
    if pretty.chars().count() > INPUT_LIMIT {
        return None;
    }
    Some(SlackView::Modal(
        SlackModalView::new(
            pt!("Modify request"),
            slack_blocks![
                some_into(SlackSectionBlock::new().with_text(md!(format!(
                    "Change the args of *{}*. Saving starts a new revision: earlier approvals no longer count, and yours counts as the first. The policy checks the new args again: it may refuse them, or move the request to a higher tier.",
                    escape(&truncate(&card.action, 200))
                )))),
                some_into(
                    SlackInputBlock::new(
                        pt!("Args (JSON object)"),
                        SlackBlockPlainTextInputElement::new()
                            .with_action_id(ARGS_BLOCK.into())
                            .with_multiline(true)
                            .with_max_length(INPUT_LIMIT as u64)
                            .with_initial_value(pretty)
                            .into(),
                    )
                    .with_block_id(ARGS_BLOCK.into())
                )
            ],
        )
        .with_submit(pt!("Save and approve"))
        .with_close(pt!("Cancel"))
        .with_callback_id(MODIFY_CALLBACK.into())
        .with_private_metadata(VoteTarget::of(card).encode()),
    ))
}

/// The reminder posted in a card's thread, naming who can still decide.
pub fn reminder_text(approvers: &[String], approvals: u64, required: u64) -> String {
    let names: Vec<String> = approvers
        .iter()
        .map(|approver| match approver.strip_prefix("slack-group:") {
            Some(group) => format!("<!subteam^{group}>"),
            None => approver
                .parse::<Principal>()
                .map(|principal| mention(&principal))
                .unwrap_or_else(|_| escape(approver)),
        })
        .collect();
    let missing = required.saturating_sub(approvals);
    format!(
        ":bell: Still waiting: {missing} more approval{} needed ({approvals} of {required}). Approvers: {}",
        if missing == 1 { "" } else { "s" },
        names.join(", ")
    )
}

/// `<@U123>` for Slack users; the principal as text for everyone else.
pub fn mention(principal: &Principal) -> String {
    match principal.as_str().strip_prefix("slack:") {
        Some(user) => format!("<@{user}>"),
        None => escape(principal.as_str()),
    }
}

/// A date Slack shows in the reader's time zone, with an ISO fallback.
fn slack_date(at: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "<!date^{}^{{date_short_pretty}} {{time}}|{}>",
        at.timestamp(),
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

/// Slack's mrkdwn control characters.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn truncate(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        return text.to_string();
    }
    let mut shortened = truncate_chars(text, limit.saturating_sub(1)).to_string();
    shortened.push('…');
    shortened
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
    use crate::domain::{ApprovalRequest, Decision, RequestContext, Vote, VoteKind};
    use serde_json::json;

    /// The shared refund, with text a card must escape.
    fn pending_refund() -> ApprovalRequest {
        let mut request = pending_refund_between("slack:U0REQUESTER", "slack:U01ALICE");
        request.context.summary = Some("Refund order A-1042 <urgent>".into());
        request.context.reason = Some("Item arrived broken & customer asked twice".into());
        request
    }

    /// A policy without tiers, ladders or redaction: the card shows the request as it is.
    fn no_policy() -> crate::policy::Policy {
        crate::policy::Policy::parse("version: 1\n").unwrap()
    }

    fn blocks_json(request: &ApprovalRequest) -> serde_json::Value {
        serde_json::to_value(render_card(&CardView::of(request, &no_policy()))).unwrap()
    }

    #[test]
    fn pending_card() {
        insta::assert_json_snapshot!(blocks_json(&pending_refund()));
    }

    #[test]
    fn approved_after_modification_card() {
        let mut request = pending_refund();
        request.revision = 2;
        request.args = json!({"amount": 150, "currency": "EUR", "order": "A-1042"});
        request.votes.push(Vote {
            principal: "cli:bob".parse().unwrap(),
            vote: VoteKind::Approve,
            note: Some("cap at 150".into()),
            at: at(7),
            revision: 2,
            aliases: vec![],
            grant: None,
            groups: vec![],
        });
        request.votes.push(Vote {
            principal: "slack:U02CAROL".parse().unwrap(),
            vote: VoteKind::Approve,
            note: None,
            at: at(8),
            revision: 2,
            aliases: vec![],
            grant: None,
            groups: vec![],
        });
        request.status = Status::Approved;
        request.decision = Some(Decision {
            outcome: Status::Approved,
            by: vec![
                "cli:bob".parse().unwrap(),
                "slack:U02CAROL".parse().unwrap(),
            ],
            reason: None,
            at: at(8),
            modified: true,
            args: request.args.clone(),
        });
        insta::assert_json_snapshot!(blocks_json(&request));
    }

    #[test]
    fn denied_card() {
        let mut request = pending_refund();
        request.status = Status::Denied;
        request.decision = Some(Decision {
            outcome: Status::Denied,
            by: vec!["slack:U03DAVE".parse().unwrap()],
            reason: Some("Customer was already refunded".into()),
            at: at(9),
            modified: false,
            args: request.args.clone(),
        });
        insta::assert_json_snapshot!(blocks_json(&request));
    }

    #[test]
    fn long_args_are_truncated_within_block_kit_limits() {
        let mut request = pending_refund();
        request.args = json!({"blob": "x".repeat(10_000), "emoji": "é".repeat(3000)});
        let blocks = blocks_json(&request);
        let all = blocks.as_array().unwrap();
        assert!(all.len() <= 50);
        for block in all {
            if let Some(text) = block["text"]["text"].as_str() {
                let limit = if block["type"] == "header" {
                    HEADER_LIMIT
                } else {
                    SECTION_LIMIT
                };
                assert!(
                    text.chars().count() <= limit,
                    "{} chars",
                    text.chars().count()
                );
            }
            for field in block["fields"].as_array().into_iter().flatten() {
                assert!(field["text"].as_str().unwrap().chars().count() <= FIELD_LIMIT);
            }
            for element in block["elements"].as_array().into_iter().flatten() {
                if element["type"] == "button" {
                    assert!(element["text"]["text"].as_str().unwrap().chars().count() <= 75);
                    assert!(element["value"].as_str().unwrap().len() <= 2000);
                }
            }
        }
        let args = all
            .iter()
            .find(|block| {
                block["text"]["text"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("*Args*"))
            })
            .unwrap();
        assert!(args["text"]["text"]
            .as_str()
            .unwrap()
            .contains("Truncated:"));
        assert!(modify_modal(&CardView::of(&request, &no_policy())).is_none());
    }

    #[test]
    fn modals_carry_the_request_and_prefilled_args() {
        let card = CardView::of(&pending_refund(), &no_policy());
        insta::assert_json_snapshot!(serde_json::to_value(deny_modal(&card)).unwrap());
        let modify = serde_json::to_value(modify_modal(&card).unwrap()).unwrap();
        assert_eq!(
            VoteTarget::decode(modify["private_metadata"].as_str().unwrap()),
            Some(VoteTarget {
                request_id: card.id.clone(),
                revision: card.revision,
                grant_seconds: None,
            })
        );
        assert_eq!(modify["callback_id"], MODIFY_CALLBACK);
        let initial = modify["blocks"][1]["element"]["initial_value"]
            .as_str()
            .unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(initial).unwrap(),
            card.args
        );
    }

    #[test]
    fn reminders_mention_people_and_groups() {
        let text = reminder_text(
            &[
                "slack:U01".into(),
                "email:ops@example.com".into(),
                "slack-group:S9".into(),
            ],
            1,
            2,
        );
        assert_eq!(
            text,
            ":bell: Still waiting: 1 more approval needed (1 of 2). Approvers: <@U01>, email:ops@example.com, <!subteam^S9>"
        );
    }

    #[test]
    fn escalated_pending_cards_say_so() {
        let mut request = pending_refund();
        request.escalated_at = Some(at(30));
        let blocks = blocks_json(&request).to_string();
        assert!(blocks.contains("Escalated"), "{blocks}");
        request.status = Status::Expired;
        assert!(!blocks_json(&request).to_string().contains("Escalated"));
    }

    #[test]
    fn cards_show_group_progress_escalation_steps_and_no_redacted_value() {
        let policy = crate::policy::Policy::parse(
            r#"version: 1
groups:
  finance: ["slack:U01ALICE"]
  sre: ["cli:bob"]
tiers:
  high:
    route: ["slack:C0HIGH"]
    approvers: ["group:finance", "group:sre"]
    approvals: {finance: 1, sre: 1}
    escalate:
      - {after: 15m, to: ["slack:C0ONCALL"]}
      - {after: 45m, to: ["slack:C0MANAGERS"]}
redact: ["args.order", "context.summary"]
"#,
        )
        .unwrap();
        let mut request = pending_refund();
        request.approvals_by_group = [("finance".to_string(), 1), ("sre".to_string(), 1)].into();
        request.votes[0].groups = vec!["finance".into()];
        request.escalated_at = Some(at(45));
        request.escalation_step = 2;
        request.context.links.clear();
        let blocks = serde_json::to_value(render_card(&CardView::of(&request, &policy)))
            .unwrap()
            .to_string();
        assert!(blocks.contains("finance 1/1 · sre 0/1"), "{blocks}");
        assert!(blocks.contains("Escalated: step 2 of 2"), "{blocks}");
        assert!(!blocks.contains("A-1042"), "{blocks}");
        assert!(blocks.contains("[redacted]"), "{blocks}");
        let modal = serde_json::to_string(&modify_modal(&CardView::of(&request, &policy))).unwrap();
        assert!(
            !modal.contains("A-1042") && modal.contains("[redacted]"),
            "{modal}"
        );
    }

    /// An approver who changes only a redacted value: the card says that value changed,
    /// without showing either the old or the new one.
    #[test]
    fn a_modified_redacted_value_is_listed_as_changed_and_stays_hidden() {
        let policy = crate::policy::Policy::parse(
            "version: 1\ntiers:\n  high:\n    route: [\"slack:C0HIGH\"]\n    approvers: [\"slack:U01ALICE\"]\nredact: [\"args.order\"]\n",
        )
        .unwrap();
        let mut request = pending_refund();
        request.args = json!({"amount": 2000, "currency": "EUR", "order": "B-9999"});
        request.revision = 2;
        request.votes.clear();
        request.context = RequestContext::default();
        let card = CardView::of(&request, &policy);
        let changed: Vec<&str> = card
            .changes
            .iter()
            .map(|(key, _, _)| key.as_str())
            .collect();
        assert_eq!(changed, ["order"]);
        let blocks = serde_json::to_value(render_card(&card))
            .unwrap()
            .to_string();
        assert!(
            !blocks.contains("A-1042") && !blocks.contains("B-9999"),
            "{blocks}"
        );
    }

    #[test]
    fn escaping_and_mentions() {
        assert_eq!(escape("a<b>&c"), "a&lt;b&gt;&amp;c");
        assert_eq!(mention(&"slack:U1".parse().unwrap()), "<@U1>");
        assert_eq!(mention(&"email:a@b.c".parse().unwrap()), "email:a@b.c");
    }
}
