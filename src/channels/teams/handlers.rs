//! `POST /teams/messages`, the bot's messaging endpoint: size limit, then the Bot
//! Framework's token (and the tenant) verified before anything is acted on. Card actions
//! are answered in the same HTTP response with the card as that person should now see it;
//! message commands are answered with a reply activity; every verified activity records
//! where its conversation is reached.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::card::{
    card_activity, render_card, render_card_for, ForViewer, CONTENT_TYPE, GRANT_INPUT, REFRESH,
};
use super::{TeamsChannel, TeamsUser};
use crate::channels::{
    decidable_by, explain, grants_visible_to, parse_modified_args, revoke_grant_for, CardView,
    ChatCommand, ListedGrant, PendingError, VoteTarget, APPROVE, APPROVE_FOR, DENY, HELP_LINES,
    MODIFY,
};
use crate::domain::{
    ApprovalRequest, GrantAsk, VoteEffect, VoteKind, VoteRefusal, VoteRequest, Voter,
};
use crate::engine::{Engine, EngineError};
use crate::http::ApiError;

/// Cards in one reply to `pending`.
const CARDS_PER_MESSAGE: usize = 5;
const INVOKE_CARD_ACTION: &str = "adaptiveCard/action";

/// The parts of an activity signoff reads; the Bot Framework adds fields over time.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Activity {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    id: String,
    channel_id: String,
    service_url: String,
    from: Account,
    conversation: Conversation,
    channel_data: ChannelData,
    value: Value,
    text: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Account {
    id: String,
    aad_object_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Conversation {
    id: String,
    tenant_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ChannelData {
    tenant: Tenant,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Tenant {
    id: String,
}

impl Activity {
    fn tenant(&self) -> Option<&str> {
        [&self.channel_data.tenant.id, &self.conversation.tenant_id]
            .into_iter()
            .find(|id| !id.is_empty())
            .map(String::as_str)
    }

    fn user(&self) -> TeamsUser<'_> {
        TeamsUser {
            aad_object_id: &self.from.aad_object_id,
            member: Some((&self.service_url, &self.conversation.id, &self.from.id)),
        }
    }
}

#[derive(Clone)]
struct TeamsState {
    engine: Engine,
    teams: Arc<TeamsChannel>,
    body_limit: usize,
}

pub fn router(engine: Engine, teams: Arc<TeamsChannel>, body_limit: usize) -> Router {
    Router::new()
        .route("/teams/messages", post(messages))
        .with_state(TeamsState {
            engine,
            teams,
            body_limit,
        })
        .layer(DefaultBodyLimit::max(body_limit))
}

/// An activity the Bot Framework sent: within the body limit, its token verified, from the
/// bot's tenant when one is configured. Anything else is refused with 401.
struct VerifiedActivity(Activity);

impl FromRequest<TeamsState> for VerifiedActivity {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &TeamsState) -> Result<Self, ApiError> {
        let authorization = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| ApiError::from_body_rejection(rejection, state.body_limit))?;
        if authorization.is_none() {
            return Err(ApiError::unauthorized("missing Bot Framework token"));
        }
        // The token does not cover the body: it is read (bounded) to learn the channel and
        // service URL the token must be valid for, and acted on only once it is.
        let activity: Activity = serde_json::from_slice(&body)
            .map_err(|_| ApiError::unauthorized("unreadable activity"))?;
        let teams = &state.teams;
        if let Err(error) = teams
            .verifier
            .verify(
                authorization.as_deref(),
                &activity.channel_id,
                &activity.service_url,
                state.engine.now(),
            )
            .await
        {
            tracing::warn!(%error, "Teams activity refused");
            return Err(ApiError::unauthorized("invalid Bot Framework token"));
        }
        if let Some(home) = &teams.tenant_id {
            if activity.tenant() != Some(home.as_str()) {
                tracing::warn!(tenant = ?activity.tenant(), "Teams activity from another tenant refused");
                return Err(ApiError::unauthorized("activity from another tenant"));
            }
        }
        Ok(Self(activity))
    }
}

async fn messages(
    State(state): State<TeamsState>,
    VerifiedActivity(activity): VerifiedActivity,
) -> Response {
    state
        .teams
        .record_endpoint(
            &activity.conversation.id,
            &activity.service_url,
            activity.tenant(),
        )
        .await;
    match activity.kind.as_str() {
        "invoke" if activity.name == INVOKE_CARD_ACTION => {
            let card = card_action(&state, &activity).await;
            Json(json!({"statusCode": 200, "type": CONTENT_TYPE, "value": card})).into_response()
        }
        "message" => {
            message(&state, &activity).await;
            StatusCode::OK.into_response()
        }
        // conversationUpdate (the bot was added) needs nothing beyond the endpoint above.
        _ => StatusCode::OK.into_response(),
    }
}

/// A card that only says `text`.
fn text_card(text: &str) -> Value {
    json!({
        "type": "AdaptiveCard",
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.5",
        "body": [{"type": "TextBlock", "text": text, "wrap": true}],
    })
}

/// The grant an "Approve for …" choice asks for: its length as the card's choice set sent
/// it (a string), or as a number from a client that sends one.
fn grant_ask(data: &Value) -> Option<GrantAsk> {
    let chosen = &data[GRANT_INPUT];
    let ttl_seconds = chosen
        .as_u64()
        .or_else(|| chosen.as_str().and_then(|text| text.trim().parse().ok()))?;
    Some(GrantAsk {
        ttl_seconds,
        uses: None,
        when: None,
    })
}

/// The card as this person should see it after their action: the result, or why nothing
/// happened.
async fn card_action(state: &TeamsState, activity: &Activity) -> Value {
    let action = &activity.value["action"];
    let verb = action["verb"].as_str().unwrap_or_default();
    let data = &action["data"];
    let Ok(target) = serde_json::from_value::<VoteTarget>(json!({
        "request_id": data["request_id"],
        "revision": data["revision"],
    })) else {
        return text_card("That card is out of date, so nothing was recorded. Send `show ID` to see the request as it is now.");
    };
    if activity.from.aad_object_id.is_empty() {
        return text_card("Teams did not say who you are, so nothing was recorded.");
    }
    let request_id = target.request_id.as_str();
    let (request, voter) = match voter(state, activity, request_id).await {
        Ok(found) => found,
        Err(message) => return text_card(&message),
    };
    let seen = Some(target.revision);
    let mut grant = None;
    let vote = match verb {
        REFRESH => {
            return if shown_to(state, &request, &voter, activity).await {
                render_card(&CardView::of(&request, &state.engine.policy()))
            } else {
                text_card("That request does not exist, or you may not see it.")
            };
        }
        APPROVE => VoteRequest::Approve { note: None },
        APPROVE_FOR => {
            let Some(ask) = grant_ask(data) else {
                return refused_card(
                    state,
                    activity,
                    &voter,
                    request_id,
                    "That choice names no grant; nothing was recorded.",
                    None,
                )
                .await;
            };
            grant = Some(ask);
            VoteRequest::Approve { note: None }
        }
        DENY => {
            let reason = data["reason"].as_str().unwrap_or_default().trim();
            if reason.is_empty() {
                // Teams enforces the required input; a client that does not is told why,
                // after what may matter more (may this person deny at all?).
                if let Err(error) = state
                    .engine
                    .check_voter(request_id, &voter, VoteKind::Deny, seen)
                    .await
                {
                    return refusal_card(state, activity, &voter, request_id, &error).await;
                }
                return refused_card(
                    state,
                    activity,
                    &voter,
                    request_id,
                    "A deny needs a reason. Nothing was recorded.",
                    None,
                )
                .await;
            }
            VoteRequest::Deny {
                reason: reason.to_string(),
            }
        }
        MODIFY => {
            let typed = data["args"].as_str().unwrap_or_default();
            match parse_modified_args(typed) {
                Ok(args) => VoteRequest::Modify { args, note: None },
                Err(problem) => {
                    // Refused before the form's values are thrown away: the voter must be
                    // allowed to modify at all, else that is the explanation.
                    if let Err(error) = state
                        .engine
                        .check_voter(request_id, &voter, VoteKind::Modify, seen)
                        .await
                    {
                        return refusal_card(state, activity, &voter, request_id, &error).await;
                    }
                    let text = format!("The args are {problem}. Nothing was recorded.");
                    return refused_card(state, activity, &voter, request_id, &text, Some(typed))
                        .await;
                }
            }
        }
        _ => return text_card("signoff does not know that action; nothing was recorded."),
    };
    match state
        .engine
        .record_vote_asking_grant(request_id, &voter, vote, seen, grant)
        .await
    {
        Ok((request, effect)) => {
            let notice = match effect {
                VoteEffect::Counted {
                    approvals,
                    required,
                } => format!("Recorded. {approvals} of {required} approvals so far."),
                VoteEffect::Decided(status) => {
                    format!("Recorded: the request is now {}.", status.as_str())
                }
            };
            let card = CardView::of(&request, &state.engine.policy());
            render_card_for(
                &card,
                &ForViewer {
                    notice: Some(&notice),
                    typed_args: None,
                },
            )
        }
        Err(error) => refusal_card(state, activity, &voter, request_id, &error).await,
    }
}

/// The engine's refusal in words above the request's current card, for someone who may see
/// it; the words alone for anyone else.
async fn refusal_card(
    state: &TeamsState,
    activity: &Activity,
    voter: &Voter,
    request_id: &str,
    error: &EngineError,
) -> Value {
    let mut text = explain(error);
    if let EngineError::Refused(VoteRefusal::StaleRevision { .. }) = error {
        text.push_str(" This is the request as it is now.");
    }
    refused_card(state, activity, voter, request_id, &text, None).await
}

async fn refused_card(
    state: &TeamsState,
    activity: &Activity,
    voter: &Voter,
    request_id: &str,
    text: &str,
    typed_args: Option<&str>,
) -> Value {
    match state.engine.request(request_id).await {
        Ok(request) if shown_to(state, &request, voter, activity).await => render_card_for(
            &CardView::of(&request, &state.engine.policy()),
            &ForViewer {
                notice: Some(text),
                typed_args,
            },
        ),
        _ => text_card(text),
    }
}

/// May this person see the request as it is now? Those who may see it anywhere, and anyone
/// in a conversation its card was posted to (they see that card already).
async fn shown_to(
    state: &TeamsState,
    request: &ApprovalRequest,
    voter: &Voter,
    activity: &Activity,
) -> bool {
    if state.engine.may_view(request, voter).await.unwrap_or(false) {
        return true;
    }
    let destination = TeamsChannel::destination_of(&activity.conversation.id);
    matches!(
        state.engine.chat_message(&request.id, &destination).await,
        Ok(Some(_))
    )
}

/// The request and the voter behind the activity's sender, or a message saying why not.
async fn voter(
    state: &TeamsState,
    activity: &Activity,
    request_id: &str,
) -> Result<(ApprovalRequest, Voter), String> {
    let request = state
        .engine
        .request(request_id)
        .await
        .map_err(|error| explain(&error))?;
    let voter = state
        .teams
        .voter_for(&request, &activity.user())
        .await
        .map_err(|error| {
            tracing::warn!(%error, "could not resolve a Teams user");
            "Teams could not tell signoff who you are just now, so nothing was recorded. Please try again.".to_string()
        })?;
    Ok((request, voter))
}

/// The message's text without the bot's mention (`<at>signoff</at>`).
fn without_mentions(text: &str) -> String {
    let mut rest = text;
    let mut plain = String::new();
    while let Some(start) = rest.find("<at>") {
        plain.push_str(&rest[..start]);
        match rest[start..].find("</at>") {
            Some(end) => rest = &rest[start + end + "</at>".len()..],
            None => {
                rest = "";
            }
        }
    }
    plain.push_str(rest);
    plain.replace("&nbsp;", " ").trim().to_string()
}

/// A command typed to the bot, answered with a reply activity in the same conversation.
async fn message(state: &TeamsState, activity: &Activity) {
    let reply = match ChatCommand::parse(&without_mentions(&activity.text)) {
        ChatCommand::Pending => pending_for(state, activity).await,
        ChatCommand::Show { id } => show_to(state, activity, &id).await,
        ChatCommand::Approve { id, note } => {
            vote_from_message(state, activity, &id, VoteRequest::Approve { note }).await
        }
        ChatCommand::Deny { id, reason } => {
            vote_from_message(state, activity, &id, VoteRequest::Deny { reason }).await
        }
        ChatCommand::DenyWithoutReason => text_reply("A deny needs a reason: `deny ID reason`"),
        ChatCommand::MissingId { word } => text_reply(&format!("Which request? `{word} ID`")),
        ChatCommand::Grants => grants_for(state, activity).await,
        ChatCommand::RevokeGrant { id } => revoke_grant(state, activity, &id).await,
        ChatCommand::Help => {
            let mut text = "**signoff** — approve what your AI agents want to do.".to_string();
            for (words, meaning) in HELP_LINES {
                text.push_str(&format!("\n\n- `{words}` — {meaning}"));
            }
            text_reply(&text)
        }
    };
    send_reply(state, activity, reply).await;
}

fn text_reply(text: &str) -> Value {
    json!({"type": "message", "text": text, "textFormat": "markdown"})
}

async fn send_reply(state: &TeamsState, activity: &Activity, mut reply: Value) {
    if !activity.id.is_empty() {
        reply["replyToId"] = json!(activity.id);
    }
    if let Err(error) = state
        .teams
        .connector
        .post_activity(&activity.service_url, &activity.conversation.id, &reply)
        .await
    {
        tracing::warn!(%error, "could not answer a Teams message");
    }
}

/// `grants`: the grants of tiers this person approves in, newest first (spent, expired and
/// revoked too).
async fn grants_for(state: &TeamsState, activity: &Activity) -> Value {
    let user = activity.user();
    let voter_for = |request: ApprovalRequest| {
        let user = &user;
        async move { state.teams.voter_for(&request, user).await.ok() }
    };
    let listed = match grants_visible_to(&state.engine, voter_for).await {
        Ok(listed) => listed,
        Err(message) => return text_reply(&message),
    };
    if listed.is_empty() {
        return text_reply("No grants in tiers you approve for.");
    }
    let mut text = "Standing grants:".to_string();
    for ListedGrant { grant, state } in &listed {
        let by: Vec<&str> = grant
            .created_by
            .iter()
            .map(|principal| principal.as_str())
            .collect();
        // Agent and action names are the agent's words: in code spans, never markdown.
        text.push_str(&format!(
            "\n\n- `{}` {} · {} by {} · {state} · {} uses left · until {}",
            grant.id,
            code_span(&grant.agent),
            code_span(&grant.action),
            code_span(&by.join(", ")),
            grant.uses_left,
            grant.expires_at.to_rfc3339(),
        ));
    }
    text_reply(&text)
}

/// `text` as a markdown code span, which shows it as written.
fn code_span(text: &str) -> String {
    format!("`{}`", text.replace('`', "'"))
}

/// `grants revoke GRANT_ID`: approvers of the grant's tier may end it at once.
async fn revoke_grant(state: &TeamsState, activity: &Activity, id: &str) -> Value {
    let user = activity.user();
    let voter_for = |request: ApprovalRequest| {
        let user = &user;
        async move { state.teams.voter_for(&request, user).await.ok() }
    };
    match revoke_grant_for(&state.engine, id, voter_for).await {
        Ok(grant) => text_reply(&format!(
            "Grant `{}` revoked; it approves nothing more.",
            grant.id
        )),
        Err(message) => text_reply(&message),
    }
}

/// `show ID`: the card, for people who may see the request; anyone else learns nothing.
async fn show_to(state: &TeamsState, activity: &Activity, id: &str) -> Value {
    const NOT_SHOWN: &str = "That request does not exist, or you may not see it.";
    let Ok((request, voter)) = voter(state, activity, id).await else {
        return text_reply(NOT_SHOWN);
    };
    match state.engine.may_view(&request, &voter).await {
        Ok(true) => card_activity(
            &format!("Request {id}"),
            vec![render_card(&CardView::of(&request, &state.engine.policy()))],
        ),
        Ok(false) => text_reply(NOT_SHOWN),
        Err(error) => text_reply(&explain(&error)),
    }
}

/// A typed vote acts on the current revision; the answer says which, and the args.
async fn vote_from_message(
    state: &TeamsState,
    activity: &Activity,
    id: &str,
    vote: VoteRequest,
) -> Value {
    let (_, voter) = match voter(state, activity, id).await {
        Ok(found) => found,
        Err(message) => return text_reply(&message),
    };
    let voted = state
        .engine
        .record_vote(id, &voter, vote, None)
        .await
        .map(|(request, effect)| (state.engine.policy().redacted(&request), effect));
    match voted {
        Ok((
            request,
            VoteEffect::Counted {
                approvals,
                required,
            },
        )) => text_reply(&format!(
            "Recorded your approval of `{id}` (revision {}): {approvals} of {required} approvals. Args: `{}`",
            request.revision, request.args
        )),
        Ok((request, VoteEffect::Decided(status))) => text_reply(&format!(
            "`{id}` is now {} (revision {}). Args: `{}`",
            status.as_str(),
            request.revision,
            request.args
        )),
        Err(error) => text_reply(&explain(&error)),
    }
}

/// Pending requests this person may approve, as cards.
async fn pending_for(state: &TeamsState, activity: &Activity) -> Value {
    let user = &activity.user();
    let decidable = match decidable_by(&state.engine, |request| async move {
        state.teams.voter_for(&request, user).await.ok()
    })
    .await
    {
        Ok(decidable) => decidable,
        Err(PendingError::Engine(message)) => return text_reply(&message),
        Err(PendingError::Unidentified) => {
            return text_reply(
                "Teams could not tell signoff who you are just now. Please try again.",
            )
        }
    };
    if decidable.is_empty() {
        return text_reply("Nothing is waiting for you.");
    }
    let total = decidable.len();
    let mut text = format!(
        "{total} request{} waiting for you",
        if total == 1 { "" } else { "s" }
    );
    if total > CARDS_PER_MESSAGE {
        text.push_str(&format!(
            "; the first {CARDS_PER_MESSAGE} are below. Decide these first, or list them all with `signoff pending`."
        ));
    }
    let cards = decidable
        .iter()
        .take(CARDS_PER_MESSAGE)
        .map(|request| render_card(&CardView::of(request, &state.engine.policy())))
        .collect();
    card_activity(&text, cards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_are_removed() {
        assert_eq!(without_mentions("<at>signoff</at> pending"), "pending");
        assert_eq!(
            without_mentions("approve <at>signoff</at>&nbsp;apr_1 ok"),
            "approve  apr_1 ok"
        );
        assert_eq!(without_mentions("<at>broken"), "");
    }
}
