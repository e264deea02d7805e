//! The Bot Connector REST calls signoff makes (post, update and reply to activities; read a
//! member), with the bot's client-credentials token cached until shortly before it
//! expires, and failures sorted into "try again (maybe after Retry-After)" and "never".
//! Only service URLs under an allowed prefix are ever called.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::channels::ChannelError;
use crate::config::{check_outbound_url, Secret};

/// No connector call may hold a worker or an activity longer than this.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A token is renewed this long before it expires.
const TOKEN_RENEW_BEFORE: Duration = Duration::from_secs(300);
const TOKEN_SCOPE: &str = "https://api.botframework.com/.default";

/// Where a card was posted: the conversation and the activity's id there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostedActivity {
    pub conversation: String,
    pub activity_id: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: u64,
}

#[derive(Deserialize)]
struct ResourceAnswer {
    #[serde(default)]
    id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Member {
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    user_principal_name: Option<String>,
}

pub struct Connector {
    http: reqwest::Client,
    token_url: String,
    app_id: String,
    app_password: Secret,
    allowed_service_urls: Vec<String>,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl Connector {
    pub fn new(
        http: reqwest::Client,
        token_url: String,
        app_id: String,
        app_password: Secret,
        allowed_service_urls: Vec<String>,
    ) -> Self {
        Self {
            http,
            token_url,
            app_id,
            app_password,
            allowed_service_urls,
            token: tokio::sync::Mutex::new(None),
        }
    }

    /// Is `service_url` one signoff may call (under an allowed prefix; https, or plain http
    /// to loopback)?
    ///
    /// Both sides are compared as parsed URLs: the HTTP client resolves `..` and `%2e%2e`
    /// before sending, so `{prefix}../elsewhere/` must not pass as under the prefix, and a
    /// prefix without a trailing slash must not admit `host.evil.example` or `host@evil`.
    pub fn may_call(&self, service_url: &str) -> bool {
        let Ok(url) = check_outbound_url(service_url) else {
            return false;
        };
        self.allowed_service_urls.iter().any(|prefix| {
            url::Url::parse(prefix).is_ok_and(|prefix| {
                url.scheme() == prefix.scheme()
                    && url.host() == prefix.host()
                    && url.port_or_known_default() == prefix.port_or_known_default()
                    && url.username().is_empty()
                    && url.password().is_none()
                    && url.path().starts_with(prefix.path())
            })
        })
    }

    /// Posts `activity` to `conversation`; returns the new activity's id.
    pub async fn post_activity(
        &self,
        service_url: &str,
        conversation: &str,
        activity: &Value,
    ) -> Result<String, ChannelError> {
        let url = self.url(
            service_url,
            &format!("v3/conversations/{}/activities", encode(conversation)),
        )?;
        let answer: ResourceAnswer = self
            .send(self.http.post(url).json(activity), "post activity")
            .await?;
        Ok(answer.id)
    }

    /// Replaces the activity `posted` with `activity`.
    pub async fn update_activity(
        &self,
        service_url: &str,
        posted: &PostedActivity,
        activity: &Value,
    ) -> Result<(), ChannelError> {
        let url = self.url(
            service_url,
            &format!(
                "v3/conversations/{}/activities/{}",
                encode(&posted.conversation),
                encode(&posted.activity_id)
            ),
        )?;
        self.send::<Value>(self.http.put(url).json(activity), "update activity")
            .await?;
        Ok(())
    }

    /// The email (or user principal name) of the conversation member `member` (their
    /// `from.id`), if the connector has one.
    pub async fn member_email(
        &self,
        service_url: &str,
        conversation: &str,
        member: &str,
    ) -> Result<Option<String>, ChannelError> {
        let url = self.url(
            service_url,
            &format!(
                "v3/conversations/{}/members/{}",
                encode(conversation),
                encode(member)
            ),
        )?;
        let member: Member = self.send(self.http.get(url), "get member").await?;
        Ok(member
            .email
            .filter(|email| email.contains('@'))
            .or(member.user_principal_name.filter(|name| name.contains('@'))))
    }

    fn url(&self, service_url: &str, path: &str) -> Result<String, ChannelError> {
        if !self.may_call(service_url) {
            return Err(ChannelError::Permanent(format!(
                "service URL {service_url:?} is not under teams.allowed_service_urls"
            )));
        }
        let base = if service_url.ends_with('/') {
            service_url.to_string()
        } else {
            format!("{service_url}/")
        };
        Ok(format!("{base}{path}"))
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<T, ChannelError> {
        let token = self.token().await?;
        let call = request.bearer_auth(token).timeout(CALL_TIMEOUT).send();
        let response = call.await.map_err(|error| ChannelError::Retry {
            reason: format!("{what}: {error}"),
            after: None,
        })?;
        let status = response.status();
        if status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return serde_json::from_str(if text.trim().is_empty() { "{}" } else { &text })
                .map_err(|error| ChannelError::Retry {
                    reason: format!("{what}: unreadable answer: {error}"),
                    after: None,
                });
        }
        if status.as_u16() == 401 {
            // A token revoked or rotated early: the next attempt gets a new one.
            *self.token.lock().await = None;
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let reason = format!("{what}: HTTP {status}");
        if status.is_server_error() || matches!(status.as_u16(), 401 | 408 | 429) {
            Err(ChannelError::Retry {
                reason,
                after: retry_after,
            })
        } else {
            Err(ChannelError::Permanent(reason))
        }
    }

    /// The bot's token, from the cache while it has more than a few minutes left.
    async fn token(&self) -> Result<String, ChannelError> {
        let mut cached = self.token.lock().await;
        if let Some((token, renew_at)) = cached.as_ref() {
            if Instant::now() < *renew_at {
                return Ok(token.clone());
            }
        }
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.app_id.as_str()),
            ("client_secret", self.app_password.expose()),
            ("scope", TOKEN_SCOPE),
        ];
        let failed = |reason: String| ChannelError::Retry {
            reason: format!("bot token: {reason}"),
            after: None,
        };
        let response = self
            .http
            .post(&self.token_url)
            .form(&form)
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(|error| failed(error.to_string()))?;
        if !response.status().is_success() {
            return Err(failed(format!("HTTP {}", response.status())));
        }
        let answer: TokenAnswer = response
            .json()
            .await
            .map_err(|error| failed(error.to_string()))?;
        let lifetime = Duration::from_secs(answer.expires_in.max(60));
        let renew_at = Instant::now()
            + lifetime
                .saturating_sub(TOKEN_RENEW_BEFORE)
                .max(lifetime / 2);
        *cached = Some((answer.access_token.clone(), renew_at));
        Ok(answer.access_token)
    }
}

/// A path segment: conversation ids hold `:`, `@`, `;` and `=`.
fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(allowed: &[&str]) -> Connector {
        Connector::new(
            reqwest::Client::new(),
            "https://login.example/token".into(),
            "app".into(),
            Secret::new("secret"),
            allowed.iter().map(|prefix| prefix.to_string()).collect(),
        )
    }

    #[test]
    fn only_urls_under_an_allowed_prefix_after_normalising_may_be_called() {
        let with_slash = connector(&["https://smba.trafficmanager.net/amer/"]);
        let without_slash = connector(&["https://smba.trafficmanager.net"]);
        let cases = [
            (&with_slash, "https://smba.trafficmanager.net/amer/", true),
            (
                &with_slash,
                "https://smba.trafficmanager.net/amer/v3/x",
                true,
            ),
            (&with_slash, "https://SMBA.trafficmanager.net/amer/", true),
            (
                &with_slash,
                "https://smba.trafficmanager.net:443/amer/",
                true,
            ),
            (&with_slash, "https://smba.trafficmanager.net/emea/", false),
            (
                &with_slash,
                "https://smba.trafficmanager.net/amer/../emea/",
                false,
            ),
            (
                &with_slash,
                "https://smba.trafficmanager.net/amer/%2e%2e/emea/",
                false,
            ),
            (&with_slash, "http://smba.trafficmanager.net/amer/", false),
            (
                &with_slash,
                "https://smba.trafficmanager.net:8443/amer/",
                false,
            ),
            (
                &without_slash,
                "https://smba.trafficmanager.net/emea/",
                true,
            ),
            (
                &without_slash,
                "https://smba.trafficmanager.net.evil.example/",
                false,
            ),
            (
                &without_slash,
                "https://smba.trafficmanager.net@evil.example/",
                false,
            ),
            (
                &without_slash,
                "https://user@smba.trafficmanager.net/",
                false,
            ),
            (&without_slash, "not a url", false),
        ];
        for (connector, url, allowed) in cases {
            assert_eq!(connector.may_call(url), allowed, "{url}");
        }
    }
}
