//! Slack's HTTP endpoints: interactions (buttons, modals), the slash command and events.
//! Every request is size-limited, then signature-verified, before anything is parsed; Web API
//! calls other than views.open (which must use the trigger within 3 s) run after answering.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use slack_morphism::prelude::*;

use super::card::{
    deny_modal, escape, modify_modal, render_card, ARGS_BLOCK, DENY_CALLBACK, MODIFY_CALLBACK,
    REASON_BLOCK,
};
use super::SlackChannel;
pub(super) use crate::channels::explain;
use crate::channels::{
    parse_modified_args, CardView, VoteTarget, APPROVE, APPROVE_FOR, DENY, MODIFY,
};
use crate::config::check_outbound_url;
use crate::domain::{ApprovalRequest, GrantAsk, VoteKind, VoteRefusal, VoteRequest, Voter};
use crate::engine::{Engine, EngineError};
use crate::http::ApiError;

/// The parts of an interaction payload signoff reads. Slack adds fields over time and
/// omits some by surface, so only these are required to be present, and none strictly.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Interaction {
    #[serde(rename = "type")]
    kind: String,
    team: Identified,
    user: User,
    channel: Option<Identified>,
    container: Container,
    trigger_id: String,
    response_url: Option<String>,
    actions: Vec<Action>,
    view: Option<View>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Identified {
    id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct User {
    id: String,
    /// The user's own workspace: differs from `team` for Slack Connect guests.
    team_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Container {
    channel_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Action {
    action_id: String,
    value: Option<String>,
    /// A select's choice (the "Approve for …" menu).
    selected_option: Option<SelectedOption>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SelectedOption {
    value: String,
}

impl Action {
    /// A button's value, or a select's chosen option's.
    fn target_text(&self) -> &str {
        self.value
            .as_deref()
            .or(self
                .selected_option
                .as_ref()
                .map(|option| option.value.as_str()))
            .unwrap_or_default()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct View {
    callback_id: String,
    private_metadata: String,
    state: ViewState,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ViewState {
    values: HashMap<String, HashMap<String, InputValue>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct InputValue {
    value: Option<String>,
}

impl View {
    fn input(&self, block: &str) -> String {
        self.state
            .values
            .get(block)
            .and_then(|inputs| inputs.get(block))
            .and_then(|input| input.value.clone())
            .unwrap_or_default()
    }
}

/// Cards fit five to a message within Block Kit's 50-block limit.
pub(super) const CARDS_PER_MESSAGE: usize = 5;

#[derive(Clone)]
pub(super) struct SlackState {
    pub(super) engine: Engine,
    pub(super) slack: Arc<SlackChannel>,
    body_limit: usize,
}

pub fn router(engine: Engine, slack: Arc<SlackChannel>, body_limit: usize) -> Router {
    Router::new()
        .route("/slack/interactions", post(interactions))
        .route("/slack/commands", post(super::commands::commands))
        .route("/slack/events", post(events))
        .with_state(SlackState {
            engine,
            slack,
            body_limit,
        })
        .layer(DefaultBodyLimit::max(body_limit))
}

/// A request body Slack signed: within the body limit, signature verified in constant time,
/// timestamp within 300 s of now — all before anything is parsed.
pub(super) struct SignedBody {
    pub(super) body: String,
    /// The signed timestamp (Unix seconds): when Slack sent it.
    pub(super) signed_at: i64,
}

impl FromRequest<SlackState> for SignedBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &SlackState) -> Result<Self, ApiError> {
        let headers = request.headers().clone();
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| ApiError::from_body_rejection(rejection, state.body_limit))?;
        let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
        let (Some(signature), Some(timestamp)) = (
            header("x-slack-signature"),
            header("x-slack-request-timestamp"),
        ) else {
            return Err(ApiError::unauthorized("missing Slack signature headers"));
        };
        let text = std::str::from_utf8(&body)
            .map_err(|_| ApiError::unauthorized("invalid Slack signature"))?;
        state
            .slack
            .verifier
            .verify(signature, text, timestamp)
            .map_err(|_| ApiError::unauthorized("invalid or stale Slack signature"))?;
        Ok(Self {
            body: text.to_string(),
            signed_at: timestamp.trim().parse().unwrap_or_default(),
        })
    }
}

pub(super) fn form_fields(body: &str) -> HashMap<String, String> {
    url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect()
}

async fn interactions(
    State(state): State<SlackState>,
    SignedBody { body, .. }: SignedBody,
) -> Response {
    let Some(payload) = form_fields(&body).remove("payload") else {
        return ApiError::bad_request("invalid_request", "no payload field").into_response();
    };
    let interaction: Interaction = match serde_json::from_str(&payload) {
        Ok(interaction) => interaction,
        Err(error) => {
            tracing::warn!(%error, "unreadable Slack interaction");
            return ApiError::bad_request("invalid_request", "unreadable interaction payload")
                .into_response();
        }
    };
    if let Some(refused) =
        foreign_workspace(&state, &[&interaction.team.id, &interaction.user.team_id]).await
    {
        return refused;
    }
    match interaction.kind.as_str() {
        "block_actions" => block_action(&state, interaction).await,
        "view_submission" => view_submission(&state, interaction).await,
        _ => StatusCode::OK.into_response(),
    }
}

/// Refuses (403, nothing changed) anything from a workspace other than the bot's own.
pub(super) async fn foreign_workspace(state: &SlackState, teams: &[&str]) -> Option<Response> {
    match state.slack.is_home_team(teams).await {
        Ok(true) => None,
        Ok(false) => {
            tracing::warn!(?teams, "Slack request from another workspace refused");
            Some(
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "wrong_workspace",
                    "this signoff installation serves another Slack workspace; nothing was recorded",
                )
                .into_response(),
            )
        }
        Err(error) => {
            tracing::warn!(%error, "auth.test failed: cannot tell which workspace this is");
            Some(
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "slack_unavailable",
                    "signoff cannot confirm its Slack workspace just now; nothing was recorded, please try again",
                )
                .into_response(),
            )
        }
    }
}

/// Why nothing was done for a click, and the request as it now stands when the person
/// should see it again (their card was out of date).
struct Refusal {
    text: String,
    current: Option<Box<CardView>>,
}

impl From<String> for Refusal {
    fn from(text: String) -> Self {
        Self {
            text,
            current: None,
        }
    }
}

impl Refusal {
    /// The engine's refusal in words; a stale revision also shows the current card, to
    /// someone who may see the request (`/signoff show`'s rule): an old card in a channel
    /// is no ticket to the request as it is now.
    async fn of(state: &SlackState, request_id: &str, voter: &Voter, error: &EngineError) -> Self {
        let mut current = None;
        if let EngineError::Refused(VoteRefusal::StaleRevision { .. }) = error {
            if let Ok(request) = state.engine.request(request_id).await {
                if state
                    .engine
                    .may_view(&request, voter)
                    .await
                    .unwrap_or(false)
                {
                    current = Some(Box::new(CardView::of(&request, &state.engine.policy())));
                }
            }
        }
        Self {
            text: explain(error),
            current,
        }
    }

    fn message(&self) -> Value {
        match &self.current {
            Some(card) => json!({
                "response_type": "ephemeral",
                "replace_original": false,
                "text": escape(&self.text),
                "blocks": current_card_blocks(&self.text, card),
            }),
            None => json!({
                "response_type": "ephemeral",
                "replace_original": false,
                "text": self.text,
            }),
        }
    }
}

/// The explanation, then the request's current card (with buttons for its current revision).
fn current_card_blocks(text: &str, card: &CardView) -> Vec<SlackBlock> {
    let mut blocks = vec![SlackBlock::from(
        SlackSectionBlock::new().with_text(md!(escape(text))),
    )];
    blocks.push(SlackDividerBlock::new().into());
    blocks.extend(render_card(card));
    blocks
}

/// A button on a card: approve at once; deny and modify open a modal first. Anyone who
/// may not do what they clicked is told why, only them, and nothing changes.
async fn block_action(state: &SlackState, interaction: Interaction) -> Response {
    let Some(refusal) = click_refusal(state, &interaction).await else {
        return StatusCode::OK.into_response();
    };
    let answer = refusal.message();
    tell_user(state, &interaction, answer.clone());
    // Slack ignores this body for button clicks; it helps anyone calling us by hand.
    Json(answer).into_response()
}

/// The request and revision a button or modal names. A value without a revision (a card
/// posted before votes were bound to revisions, or a crafted one) votes on nothing.
fn vote_target(value: &str) -> Result<VoteTarget, Refusal> {
    VoteTarget::decode(value).ok_or_else(|| {
        String::from(
            "That card is out of date, so nothing was recorded. Use `/signoff show ID` to see the request as it is now.",
        )
        .into()
    })
}

/// Acts on the click; returns the explanation for the user when nothing could be done.
async fn click_refusal(state: &SlackState, interaction: &Interaction) -> Option<Refusal> {
    let user = interaction.user.id.as_str();
    let action = interaction.actions.first()?;
    let target = match vote_target(action.target_text()) {
        Ok(target) => target,
        Err(refusal) => return Some(refusal),
    };
    let request_id = target.request_id.as_str();
    let seen = Some(target.revision);
    let voter = match voter(state, request_id, user).await {
        Ok((_, voter)) => voter,
        Err(message) => return Some(message.into()),
    };
    match action.action_id.as_str() {
        APPROVE => match state
            .engine
            .record_vote(
                request_id,
                &voter,
                VoteRequest::Approve { note: None },
                seen,
            )
            .await
        {
            Ok(_) => None,
            Err(error) => Some(Refusal::of(state, request_id, &voter, &error).await),
        },
        APPROVE_FOR => {
            let Some(ttl_seconds) = target.grant_seconds else {
                return Some(
                    String::from("That choice names no grant; nothing was recorded.").into(),
                );
            };
            let ask = GrantAsk {
                ttl_seconds,
                uses: None,
                when: None,
            };
            match state
                .engine
                .record_vote_asking_grant(
                    request_id,
                    &voter,
                    VoteRequest::Approve { note: None },
                    seen,
                    Some(ask),
                )
                .await
            {
                Ok(_) => None,
                Err(error) => Some(Refusal::of(state, request_id, &voter, &error).await),
            }
        }
        action_id @ (DENY | MODIFY) => {
            let kind = if action_id == DENY {
                VoteKind::Deny
            } else {
                VoteKind::Modify
            };
            let request = match state
                .engine
                .check_voter(request_id, &voter, kind, seen)
                .await
            {
                Ok(request) => request,
                Err(error) => return Some(Refusal::of(state, request_id, &voter, &error).await),
            };
            let card = CardView::of(&request, &state.engine.policy());
            let view = if kind == VoteKind::Deny {
                Some(deny_modal(&card))
            } else {
                modify_modal(&card)
            };
            let Some(view) = view else {
                return Some(format!(
                    "The args are too long to edit in Slack; an operator can use `signoff modify {request_id} --revision {} --as cli:NAME --args …`.",
                    request.revision
                ).into());
            };
            match state
                .slack
                .api
                .open_view(&interaction.trigger_id, view)
                .await
            {
                Ok(()) => None,
                Err(error) => {
                    tracing::warn!(%error, "views.open failed");
                    Some(String::from("Slack could not open the form; please click again.").into())
                }
            }
        }
        _ => None,
    }
}

/// A deny reason or modified args submitted from a modal. Problems are shown inside the
/// modal (`response_action: errors`); success closes it. The modal names the revision it
/// was opened on: if the request changed meanwhile, nothing is overwritten.
async fn view_submission(state: &SlackState, interaction: Interaction) -> Response {
    let Some(view) = &interaction.view else {
        return StatusCode::OK.into_response();
    };
    let (block, vote) = match view.callback_id.as_str() {
        DENY_CALLBACK => {
            let reason = view.input(REASON_BLOCK);
            if reason.trim().is_empty() {
                return modal_error(REASON_BLOCK, "A deny needs a reason.");
            }
            (REASON_BLOCK, VoteRequest::Deny { reason })
        }
        MODIFY_CALLBACK => match parse_modified_args(&view.input(ARGS_BLOCK)) {
            Ok(args) => (ARGS_BLOCK, VoteRequest::Modify { args, note: None }),
            Err(problem) => return modal_error(ARGS_BLOCK, &problem),
        },
        _ => return StatusCode::OK.into_response(),
    };
    let target = match vote_target(&view.private_metadata) {
        Ok(target) => target,
        Err(refusal) => return modal_error(block, &refusal.text),
    };
    let request_id = target.request_id.as_str();
    let voter = match voter(state, request_id, &interaction.user.id).await {
        Ok((_, voter)) => voter,
        Err(message) => return modal_error(block, &message),
    };
    match state
        .engine
        .record_vote(request_id, &voter, vote, Some(target.revision))
        .await
    {
        Ok(_) => StatusCode::OK.into_response(),
        Err(error) => {
            let refusal = Refusal::of(state, request_id, &voter, &error).await;
            if refusal.current.is_some() {
                // The modal shows the reason; the current card follows as an ephemeral
                // message where Slack lets us send one.
                tell_user(state, &interaction, refusal.message());
            }
            modal_error(block, &refusal.text)
        }
    }
}

fn modal_error(block: &str, message: &str) -> Response {
    let response = SlackViewSubmissionResponse::Errors(SlackViewSubmissionErrorsResponse::new(
        HashMap::from([(block.to_string(), message.to_string())]),
    ));
    Json(response).into_response()
}

/// The request and the voter behind Slack user `user`, or a message saying why not.
pub(super) async fn voter(
    state: &SlackState,
    request_id: &str,
    user: &str,
) -> Result<(ApprovalRequest, Voter), String> {
    let request = state
        .engine
        .request(request_id)
        .await
        .map_err(|error| explain(&error))?;
    let voter = state.slack.voter_for(&state.engine, &request, user).await.map_err(|error| {
        tracing::warn!(%error, "could not resolve a Slack user");
        "Slack could not tell signoff who you are just now, so nothing was recorded. Please try again.".to_string()
    })?;
    Ok((request, voter))
}

/// Sends an ephemeral message to the clicking user after the click is answered: through
/// the interaction's `response_url` when it has one, else chat.postEphemeral.
fn tell_user(state: &SlackState, interaction: &Interaction, message: Value) {
    let channel = interaction
        .channel
        .as_ref()
        .map(|channel| channel.id.clone())
        .or_else(|| interaction.container.channel_id.clone());
    let response_url = interaction
        .response_url
        .clone()
        .filter(|url| check_outbound_url(url).is_ok());
    let slack = state.slack.clone();
    let user = interaction.user.id.clone();
    tokio::spawn(async move {
        let sent = match (response_url, channel) {
            (Some(url), _) => slack.respond(&url, &message).await,
            (None, Some(channel)) => {
                let text = message["text"].as_str().unwrap_or_default().to_string();
                slack
                    .api
                    .post_ephemeral(&channel, &user, text)
                    .await
                    .map_err(|error| error.to_string())
            }
            (None, None) => Err("no response_url and no channel to answer in".into()),
        };
        if let Err(error) = sent {
            tracing::warn!(%error, "could not tell a Slack user why nothing changed");
        }
    });
}

/// Events API: answers the URL verification handshake; other events are acknowledged.
async fn events(SignedBody { body, .. }: SignedBody) -> Response {
    let event: Value = match serde_json::from_str(&body) {
        Ok(event) => event,
        Err(error) => {
            return ApiError::bad_request("invalid_json", format!("malformed JSON: {error}"))
                .into_response()
        }
    };
    if event["type"] == "url_verification" {
        return Json(json!({"challenge": event["challenge"]})).into_response();
    }
    StatusCode::OK.into_response()
}
