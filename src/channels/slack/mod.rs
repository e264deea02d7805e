//! Slack: signed interactions, the slash command and events in; cards and modals out.

pub mod api;
pub mod card;
mod commands;
mod directory;
mod handlers;

use std::sync::Arc;

use slack_morphism::prelude::SlackSigningSecret;
use slack_morphism::signature_verifier::SlackEventSignatureVerifier;

use async_trait::async_trait;
use serde_json::Value;

use self::api::{PostedMessage, SlackApi, SlackCallError};
use self::card::{card_fallback_text, reminder_text, render_card};
use self::directory::Directory;
use super::{CardSync, CardView, ChannelError, ChatChannel, Reminder};
use crate::config::{Config, SlackConfig};
use crate::domain::{ApprovalRequest, Destination, Voter};
use crate::engine::Engine;

/// Route destinations `slack:<channel id>`.
pub const PLATFORM: &str = "slack";

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

impl SlackChannel {
    /// The Slack channel `config` asks for, if it asks for one (a bot token is set).
    pub fn configured(config: &Config, http: reqwest::Client) -> anyhow::Result<Option<Arc<Self>>> {
        if !config.slack_enabled() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Self::from_config(&config.slack, http)?)))
    }

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
            .map(|tier| tier.approvers.user_groups.clone())
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

#[async_trait]
impl ChatChannel for SlackChannel {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn sync_card(
        &self,
        view: &CardView,
        destination: &Destination,
        posted: Option<&Value>,
    ) -> Result<CardSync, ChannelError> {
        let blocks = render_card(view);
        let text = card_fallback_text(view);
        let existing = posted
            .and_then(|message| serde_json::from_value::<PostedMessage>(message.clone()).ok());
        match existing {
            Some(message) => {
                self.api.update_message(&message, text, blocks).await?;
                Ok(CardSync::Updated)
            }
            None => {
                let posted = self
                    .api
                    .post_message(destination.conversation(), text, blocks, None)
                    .await?;
                let reference = serde_json::to_value(&posted).unwrap_or_default();
                Ok(CardSync::Posted { reference })
            }
        }
    }

    async fn post_reminder(
        &self,
        reminder: &Reminder,
        _destination: &Destination,
        posted: &Value,
    ) -> Result<(), ChannelError> {
        let card = serde_json::from_value::<PostedMessage>(posted.clone()).map_err(|error| {
            ChannelError::Permanent(format!("the card's Slack reference is unreadable: {error}"))
        })?;
        let text = reminder_text(&reminder.approvers, reminder.approvals, reminder.required);
        self.api
            .post_message(&card.channel, text, Vec::new(), Some(&card.ts))
            .await?;
        Ok(())
    }

    async fn resolve_voter(
        &self,
        engine: &Engine,
        request: &ApprovalRequest,
        user: &str,
    ) -> Result<Voter, ChannelError> {
        self.voter_for(engine, request, user).await
    }

    fn routes(self: Arc<Self>, engine: Engine, body_limit: usize) -> axum::Router {
        handlers::router(engine, self, body_limit)
    }
}
