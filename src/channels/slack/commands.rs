//! The slash command (`/signoff pending | show | approve | deny | help`): verified like every
//! Slack request, answered ephemerally to the person who typed it.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use slack_morphism::prelude::*;

use super::card::{escape, mention, render_card};
use super::handlers::{
    explain, foreign_workspace, form_fields, voter, SignedBody, SlackState, CARDS_PER_MESSAGE,
};
use crate::channels::{
    decidable_by, grants_visible_to, revoke_grant_for, CardView, ChatCommand, ListedGrant,
    PendingError, HELP_LINES,
};
use crate::domain::{ApprovalRequest, VoteEffect, VoteRequest};

/// The help text, in Slack's mrkdwn.
fn help(command: &str) -> String {
    let mut text = format!("*{command}* — approve what your AI agents want to do.");
    for (words, meaning) in HELP_LINES {
        text.push_str(&format!("\n• `{words}` — {meaning}"));
    }
    text
}

/// The slash command. Every answer is ephemeral.
pub(super) async fn commands(
    State(state): State<SlackState>,
    SignedBody { body, signed_at }: SignedBody,
) -> Response {
    let fields = form_fields(&body);
    let team = fields
        .get("team_id")
        .map(String::as_str)
        .unwrap_or_default();
    if let Some(refused) = foreign_workspace(&state, &[team]).await {
        return refused;
    }
    let user = fields.get("user_id").cloned().unwrap_or_default();
    let text = fields.get("text").cloned().unwrap_or_default();
    let answer = match ChatCommand::parse(&text) {
        ChatCommand::Pending => pending_for(&state, &user).await,
        ChatCommand::Grants => grants_for(&state, &user).await,
        ChatCommand::RevokeGrant { id } => revoke_grant(&state, &id, &user).await,
        ChatCommand::Show { id } => show_to(&state, &id, &user).await,
        ChatCommand::Approve { id, note } => {
            vote_from_command(&state, &id, &user, signed_at, VoteRequest::Approve { note }).await
        }
        ChatCommand::Deny { id, reason } => {
            let vote = VoteRequest::Deny { reason };
            vote_from_command(&state, &id, &user, signed_at, vote).await
        }
        ChatCommand::DenyWithoutReason => ephemeral(format!(
            "A deny needs a reason: `{} deny ID reason`",
            state.slack.command
        )),
        ChatCommand::MissingId { word } => ephemeral(format!(
            "Which request? `{} {word} ID`",
            state.slack.command
        )),
        ChatCommand::Help => ephemeral(help(&state.slack.command)),
    };
    Json(answer).into_response()
}

/// `grants`: the grants of tiers this user approves in, newest first (spent, expired and
/// revoked too).
async fn grants_for(state: &SlackState, user: &str) -> Value {
    let voter_for = |request: ApprovalRequest| async move {
        state
            .slack
            .voter_for(&state.engine, &request, user)
            .await
            .ok()
    };
    let listed = match grants_visible_to(&state.engine, voter_for).await {
        Ok(listed) => listed,
        Err(message) => return ephemeral(message),
    };
    if listed.is_empty() {
        return ephemeral("No grants in tiers you approve for.".into());
    }
    let lines: Vec<String> = listed
        .iter()
        .map(|ListedGrant { grant, state }| {
            format!(
                "• `{}` {} · `{}` by {} · {state} · {} uses left · until {}",
                grant.id,
                escape(&grant.agent),
                escape(&grant.action),
                grant
                    .created_by
                    .iter()
                    .map(mention)
                    .collect::<Vec<_>>()
                    .join(", "),
                grant.uses_left,
                grant.expires_at.to_rfc3339(),
            )
        })
        .collect();
    ephemeral(format!("Standing grants:\n{}", lines.join("\n")))
}

/// `grants revoke GRANT_ID`: approvers of the grant's tier may end it at once.
async fn revoke_grant(state: &SlackState, id: &str, user: &str) -> Value {
    let voter_for = |request: ApprovalRequest| async move {
        state
            .slack
            .voter_for(&state.engine, &request, user)
            .await
            .ok()
    };
    match revoke_grant_for(&state.engine, id, voter_for).await {
        Ok(grant) => ephemeral(format!(
            "Grant `{}` revoked; it approves nothing more.",
            grant.id
        )),
        Err(message) => ephemeral(message),
    }
}

/// `show ID`: the card, for people who may see the request (approvers of its tier, its
/// requester, the agent's owners); anyone else learns nothing, not even that it exists.
async fn show_to(state: &SlackState, id: &str, user: &str) -> Value {
    const NOT_SHOWN: &str = "That request does not exist, or you may not see it.";
    let (request, voter) = match voter(state, id, user).await {
        Ok(found) => found,
        Err(_) => return ephemeral(NOT_SHOWN.into()),
    };
    match state.engine.may_view(&request, &voter).await {
        Ok(true) => ephemeral_blocks(
            format!("Request {id}"),
            render_card(&CardView::of(&request, &state.engine.policy())),
        ),
        Ok(false) => ephemeral(NOT_SHOWN.into()),
        Err(error) => ephemeral(explain(&error)),
    }
}

/// A typed vote acts on the revision that was current when it was typed (its signed
/// timestamp): a captured command sent again after a modification cannot count for the
/// new args. The answer says which revision, and the args it approved.
async fn vote_from_command(
    state: &SlackState,
    id: &str,
    user: &str,
    signed_at: i64,
    vote: VoteRequest,
) -> Value {
    let (request, voter) = match voter(state, id, user).await {
        Ok(found) => found,
        Err(message) => return ephemeral(message),
    };
    let typed_at = chrono::DateTime::from_timestamp(signed_at, 0).unwrap_or_default();
    let seen_revision = request.revision_at(typed_at);
    let voted = state
        .engine
        .record_vote(id, &voter, vote, Some(seen_revision))
        .await
        .map(|(request, effect)| (state.engine.policy().redacted(&request), effect));
    match voted {
        Ok((
            request,
            VoteEffect::Counted {
                approvals,
                required,
            },
        )) => ephemeral(format!(
            "Recorded your approval of `{id}` (revision {}): {approvals} of {required} approvals. Args: `{}`",
            request.revision,
            escape(&request.args.to_string())
        )),
        Ok((request, VoteEffect::Decided(status))) => ephemeral(format!(
            "`{id}` is now {} (revision {}). Args: `{}`",
            status.as_str(),
            request.revision,
            escape(&request.args.to_string())
        )),
        Err(error) => ephemeral(explain(&error)),
    }
}

/// Pending requests this user may approve, as cards with buttons.
async fn pending_for(state: &SlackState, user: &str) -> Value {
    let decidable = match decidable_by(&state.engine, |request| async move {
        state
            .slack
            .voter_for(&state.engine, &request, user)
            .await
            .ok()
    })
    .await
    {
        Ok(decidable) => decidable,
        Err(PendingError::Engine(message)) => return ephemeral(message),
        Err(PendingError::Unidentified) => {
            return ephemeral(
                "Slack could not tell signoff who you are just now. Please try again.".into(),
            )
        }
    };
    if decidable.is_empty() {
        return ephemeral("Nothing is waiting for you.".into());
    }
    let total = decidable.len();
    let policy = state.engine.policy();
    let mut blocks = vec![SlackBlock::from(SlackSectionBlock::new().with_text(md!(
        format!(
            "*{total} request{} waiting for you*",
            if total == 1 { "" } else { "s" }
        )
    )))];
    for request in decidable.iter().take(CARDS_PER_MESSAGE) {
        blocks.push(SlackDividerBlock::new().into());
        blocks.extend(render_card(&CardView::of(request, &policy)));
    }
    if total > CARDS_PER_MESSAGE {
        blocks.push(
            SlackContextBlock::new(vec![md!(format!(
                "…and {} more. Decide these first, or list them all with `signoff pending`.",
                total - CARDS_PER_MESSAGE
            ))])
            .into(),
        );
    }
    ephemeral_blocks(format!("{total} pending"), blocks)
}

fn ephemeral(text: String) -> Value {
    json!({"response_type": "ephemeral", "text": text})
}

fn ephemeral_blocks(text: String, blocks: Vec<SlackBlock>) -> Value {
    json!({"response_type": "ephemeral", "text": escape(&text), "blocks": blocks})
}
