//! The Slack Web API calls signoff makes, through one shared slack-morphism client, with
//! failures sorted into "try again (maybe after Retry-After)" and "will never work".

use std::time::Duration;

use anyhow::Context as _;
use hyper_rustls::HttpsConnectorBuilder;
use slack_morphism::errors::SlackClientError;
use slack_morphism::prelude::*;

use crate::config::check_outbound_url;

/// No Slack call may hold a worker or an interaction longer than this.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `ok:false` error codes worth retrying; every other code means the call cannot succeed
/// as it is (bad channel, missing scope, revoked token...).
const TRANSIENT_ERRORS: &[&str] = &[
    "ratelimited",
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
    "team_added_to_org",
];

/// Slack calls fail like any chat platform's: retry (maybe after Retry-After), or never.
pub type SlackCallError = crate::channels::ChannelError;

/// Sorts a slack-morphism failure of `method` into retry or never.
fn call_error(method: &str, error: SlackClientError) -> SlackCallError {
    match error {
        SlackClientError::ApiError(api) if TRANSIENT_ERRORS.contains(&api.code.as_str()) => {
            SlackCallError::Retry {
                reason: format!("{method}: {}", api.code),
                after: None,
            }
        }
        SlackClientError::ApiError(api) => {
            SlackCallError::Permanent(format!("{method}: {}", api.code))
        }
        SlackClientError::RateLimitError(limit) => SlackCallError::Retry {
            reason: format!("{method}: rate limited"),
            after: limit.retry_after,
        },
        SlackClientError::HttpError(http)
            if http.status_code.is_client_error() && http.status_code.as_u16() != 408 =>
        {
            SlackCallError::Permanent(format!("{method}: HTTP {}", http.status_code))
        }
        other => SlackCallError::Retry {
            reason: format!("{method}: {other}"),
            after: None,
        },
    }
}

/// Where a card was posted.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PostedMessage {
    pub channel: String,
    pub ts: String,
}

pub struct SlackApi {
    client: SlackHyperClient,
    token: SlackApiToken,
}

impl SlackApi {
    /// A client for `api_url` (https, or plain http to a loopback address for local fakes).
    pub fn new(api_url: &str, bot_token: &str) -> anyhow::Result<Self> {
        check_outbound_url(api_url).map_err(|error| anyhow::anyhow!("slack.api_url: {error}"))?;
        let https = HttpsConnectorBuilder::new()
            .with_native_roots()
            .context("loading the system's CA certificates for Slack")?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let connector = SlackClientHyperConnector::with_connector(https)
            .with_slack_api_url(api_url.trim_end_matches('/'));
        Ok(Self {
            client: SlackClient::new(connector),
            token: SlackApiToken::new(SlackApiTokenValue::from(bot_token.to_string())),
        })
    }

    async fn call<T, F>(&self, method: &str, call: F) -> Result<T, SlackCallError>
    where
        F: std::future::Future<Output = Result<T, SlackClientError>>,
    {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(result) => result.map_err(|error| call_error(method, error)),
            Err(_) => Err(SlackCallError::Retry {
                reason: format!("{method}: no answer within {CALL_TIMEOUT:?}"),
                after: None,
            }),
        }
    }

    pub async fn post_message(
        &self,
        channel: &str,
        text: String,
        blocks: Vec<SlackBlock>,
        thread_ts: Option<&str>,
    ) -> Result<PostedMessage, SlackCallError> {
        let session = self.client.open_session(&self.token);
        let request = SlackApiChatPostMessageRequest::new(
            channel.into(),
            SlackMessageContent::new()
                .with_text(text)
                .with_blocks(blocks),
        )
        .opt_thread_ts(thread_ts.map(Into::into));
        let response = self
            .call("chat.postMessage", session.chat_post_message(&request))
            .await?;
        Ok(PostedMessage {
            channel: response.channel.to_string(),
            ts: response.ts.to_string(),
        })
    }

    pub async fn update_message(
        &self,
        message: &PostedMessage,
        text: String,
        blocks: Vec<SlackBlock>,
    ) -> Result<(), SlackCallError> {
        let session = self.client.open_session(&self.token);
        let request = SlackApiChatUpdateRequest::new(
            message.channel.as_str().into(),
            SlackMessageContent::new()
                .with_text(text)
                .with_blocks(blocks),
            message.ts.as_str().into(),
        );
        self.call("chat.update", session.chat_update(&request))
            .await?;
        Ok(())
    }

    pub async fn post_ephemeral(
        &self,
        channel: &str,
        user: &str,
        text: String,
    ) -> Result<(), SlackCallError> {
        let session = self.client.open_session(&self.token);
        let request = SlackApiChatPostEphemeralRequest::new(
            channel.into(),
            user.into(),
            SlackMessageContent::new().with_text(text),
        );
        self.call("chat.postEphemeral", session.chat_post_ephemeral(&request))
            .await?;
        Ok(())
    }

    pub async fn open_view(&self, trigger_id: &str, view: SlackView) -> Result<(), SlackCallError> {
        let session = self.client.open_session(&self.token);
        let request = SlackApiViewsOpenRequest::new(trigger_id.into(), view);
        self.call("views.open", session.views_open(&request))
            .await?;
        Ok(())
    }

    /// The id of the workspace the bot token belongs to (auth.test); `None` when the API
    /// at `api_url` has no auth.test at all (`unknown_method`, 404, or an `ok` answer
    /// without a team: a stand-in that is not Slack). Slack itself always answers it with
    /// a team, so no answer from Slack can get `None`.
    pub async fn team_id(&self) -> Result<Option<String>, SlackCallError> {
        let session = self.client.open_session(&self.token);
        match tokio::time::timeout(CALL_TIMEOUT, session.auth_test()).await {
            Ok(Ok(response)) => Ok(Some(response.team_id.to_string())),
            Ok(Err(SlackClientError::ApiError(api))) if api.code == "unknown_method" => Ok(None),
            Ok(Err(SlackClientError::HttpError(http))) if http.status_code.as_u16() == 404 => {
                Ok(None)
            }
            Ok(Err(SlackClientError::ProtocolError(_))) => Ok(None),
            Ok(Err(error)) => Err(call_error("auth.test", error)),
            Err(_) => Err(SlackCallError::Retry {
                reason: format!("auth.test: no answer within {CALL_TIMEOUT:?}"),
                after: None,
            }),
        }
    }

    /// The user's email address (needs users:read.email), if Slack has one.
    pub async fn user_email(&self, user: &str) -> Result<Option<String>, SlackCallError> {
        let session = self.client.open_session(&self.token);
        let request = SlackApiUsersInfoRequest::new(user.into());
        let response = self
            .call("users.info", session.users_info(&request))
            .await?;
        Ok(response
            .user
            .profile
            .and_then(|profile| profile.email)
            .map(|email| email.to_string()))
    }

    /// The user ids in a Slack user group.
    pub async fn usergroup_members(&self, group: &str) -> Result<Vec<String>, SlackCallError> {
        let session = self.client.open_session(&self.token);
        let request = SlackApiUserGroupsUsersListRequest::new(group.into());
        let response = self
            .call(
                "usergroups.users.list",
                session.usergroups_users_list(&request),
            )
            .await?;
        Ok(response
            .users
            .into_iter()
            .map(|user| user.to_string())
            .collect())
    }
}
