//! Slack: signed interactions, the slash command and events in; cards and modals out.

pub mod api;
pub mod card;
mod directory;
mod handlers;

use std::sync::Arc;

use slack_morphism::prelude::SlackSigningSecret;
use slack_morphism::signature_verifier::SlackEventSignatureVerifier;

use self::api::{PostedMessage, SlackApi, SlackCallError};
use self::card::{card_fallback_text, reminder_text, render_card};
use self::directory::Directory;
use super::CardView;
use crate::config::SlackConfig;
use crate::domain::{ApprovalRequest, Voter};
use crate::engine::{Engine, EngineError};

pub use handlers::router;

/// Everything Slack-specific a server holds: the Web API client, the user directory, the
/// request verifier and the slash command's name.
pub struct SlackChannel {
    pub api: Arc<SlackApi>,
    /// The process's shared HTTP client, for posting to interactions' response URLs.
    http: reqwest::Client,
    directory: Directory,
    verifier: SlackEventSignatureVerifier,
    command: String,
    /// The workspace the bot token belongs to (auth.test), once Slack has told us.
    home_team: tokio::sync::OnceCell<Option<String>>,
}

/// What syncing a card did.
#[derive(Clone, Debug, PartialEq)]
pub enum CardSync {
    /// A new message: where it lives, for the caller to keep with the delivery's finish.
    Posted {
        reference: serde_json::Value,
    },
    Updated,
}

impl SlackChannel {
    pub fn from_config(config: &SlackConfig, http: reqwest::Client) -> anyhow::Result<Self> {
        let api = Arc::new(SlackApi::new(&config.api_url, config.bot_token.expose())?);
        Ok(Self {
            http,
            directory: Directory::new(api.clone()),
            api,
            verifier: SlackEventSignatureVerifier::new(&SlackSigningSecret::from(
                config.signing_secret.expose().to_string(),
            )),
            command: config.command.clone(),
            home_team: tokio::sync::OnceCell::new(),
        })
    }

    /// Is `team` (an interaction's or command's workspace) the one this bot is installed
    /// in? Another workspace — Slack Connect guests included — may not decide anything
    /// here. Fails closed whenever auth.test cannot tell us (Slack down, a revoked token:
    /// cards already posted stay clickable); only an API that has no auth.test at all (a
    /// stand-in, never Slack) leaves the check to the request signature alone. A payload
    /// without any team id is judged by its signature too.
    pub async fn is_home_team(&self, teams: &[&str]) -> Result<bool, SlackCallError> {
        let home = self
            .home_team
            .get_or_try_init(|| self.api.team_id())
            .await?;
        match home {
            Some(home) => Ok(teams.iter().all(|team| team.is_empty() || team == home)),
            None => {
                tracing::warn!("the Slack API has no auth.test: which workspace a click comes from is not checked");
                Ok(true)
            }
        }
    }

    /// Makes the card for `request_id` in `channel` show the request as it is now: posts it
    /// the first time (the caller saves the reference), updates that message afterwards.
    pub async fn sync_card(
        &self,
        engine: &Engine,
        request_id: &str,
        destination: &str,
        channel: &str,
    ) -> Result<CardSync, CardSyncError> {
        let request = engine.request(request_id).await?;
        let view = CardView::of(&request);
        let blocks = render_card(&view);
        let text = card_fallback_text(&view);
        let existing = engine
            .chat_message(request_id, destination)
            .await?
            .and_then(|message| serde_json::from_value::<PostedMessage>(message).ok());
        match existing {
            Some(message) => {
                self.api.update_message(&message, text, blocks).await?;
                Ok(CardSync::Updated)
            }
            None => {
                let posted = self.api.post_message(channel, text, blocks, None).await?;
                let reference = serde_json::to_value(&posted).unwrap_or_default();
                Ok(CardSync::Posted { reference })
            }
        }
    }

    /// Posts a message to an interaction's `response_url` (Slack shows it to that user).
    pub async fn respond(
        &self,
        response_url: &str,
        message: &serde_json::Value,
    ) -> Result<(), String> {
        let response = self
            .http
            .post(response_url)
            .timeout(std::time::Duration::from_secs(5))
            .json(message)
            .send()
            .await
            .map_err(|error| error.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("response_url answered {}", response.status()))
        }
    }

    /// Posts a reminder in the thread of the request's card in `channel`. Waits (retries)
    /// while the card itself has not been posted yet.
    pub async fn post_reminder(
        &self,
        engine: &Engine,
        request_id: &str,
        destination: &str,
        reminder: &serde_json::Value,
    ) -> Result<(), CardSyncError> {
        let card = engine
            .chat_message(request_id, destination)
            .await?
            .and_then(|message| serde_json::from_value::<PostedMessage>(message).ok())
            .ok_or_else(|| SlackCallError::Retry {
                reason: "the card is not posted yet".into(),
                after: None,
            })?;
        let approvers: Vec<String> = reminder["approvers"]
            .as_array()
            .map(|names| {
                names
                    .iter()
                    .filter_map(|name| name.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let text = reminder_text(
            &approvers,
            reminder["approvals"].as_u64().unwrap_or(0),
            reminder["required"].as_u64().unwrap_or(0),
        );
        self.api
            .post_message(&card.channel, text, Vec::new(), Some(&card.ts))
            .await?;
        Ok(())
    }

    /// The voter behind a Slack user, for this request's tier.
    pub async fn voter_for(
        &self,
        engine: &Engine,
        request: &ApprovalRequest,
        user: &str,
    ) -> Result<Voter, SlackCallError> {
        let policy = engine.policy();
        let tier = request.tier.as_deref().and_then(|tier| policy.tier(tier));
        let groups = tier
            .map(|tier| tier.approvers.slack_groups.clone())
            .unwrap_or_default();
        // The email (users.info) matters only where someone is named by email: an approver,
        // the requester, or an owner of the agent. Elsewhere a Slack outage cannot block votes.
        let is_email = |principal: &str| principal.starts_with("email:");
        let owners_by_email = match engine.agent(&request.agent).await {
            Ok(agent) => {
                agent.is_some_and(|agent| agent.owners.iter().any(|owner| is_email(owner.as_str())))
            }
            // Unknown: look the email up rather than risk missing a separation-of-duties match.
            Err(_) => true,
        };
        let needs_email = owners_by_email
            || policy.people().names_anyone_by_email()
            || request
                .on_behalf_of
                .as_ref()
                .is_some_and(|requester| is_email(requester.as_str()))
            || tier.is_some_and(|tier| {
                tier.approvers
                    .principals
                    .iter()
                    .any(|approver| is_email(approver))
            });
        self.directory.voter(user, &groups, needs_email).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CardSyncError {
    #[error(transparent)]
    Slack(#[from] SlackCallError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}
