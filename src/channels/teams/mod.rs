//! Microsoft Teams, as a Bot Framework bot: verified activities in (card actions, messages,
//! conversation updates); Adaptive Cards out through the Bot Connector.

pub mod auth;
pub mod card;
pub mod connector;
mod handlers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;

use self::auth::TokenVerifier;
use self::card::{card_activity, card_fallback_text, reminder_text, render_card};
use self::connector::{Connector, PostedActivity};
use super::{CardSync, CardView, ChannelError, ChatChannel, Reminder};
use crate::config::{Config, TeamsConfig};
use crate::domain::{ApprovalRequest, Destination, Voter};
use crate::engine::Engine;
use crate::store::ConversationEndpoint;

/// Route destinations `teams:<conversation id>`; approvers `teams:<AAD object id>`.
pub const PLATFORM: &str = "teams";
/// How long a member's email is trusted.
const EMAIL_TTL: Duration = Duration::from_secs(600);
/// Lookups happen while Teams waits for the answer to a card action.
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(1500);

/// The conversation a Teams conversation id names: a thread in a channel
/// (`19:abc@thread.tacv2;messageid=123`) is the channel's conversation.
pub fn conversation_of(conversation_id: &str) -> &str {
    conversation_id
        .split_once(";messageid=")
        .map_or(conversation_id, |(conversation, _)| conversation)
}

/// Everything Teams-specific a server holds: the token verifier, the connector client, the
/// conversations' service URLs and the members' emails.
pub struct TeamsChannel {
    engine: Engine,
    tenant_id: Option<String>,
    default_service_url: String,
    verifier: TokenVerifier,
    pub connector: Connector,
    /// Service URL and tenant per destination, as last recorded (mirrors the store so a
    /// click that repeats what is known writes nothing).
    endpoints: std::sync::Mutex<HashMap<String, (String, Option<String>)>>,
    emails: tokio::sync::Mutex<HashMap<String, (Instant, Option<String>)>>,
}

impl TeamsChannel {
    /// The Teams channel `config` asks for, if it asks for one (an app id is set).
    pub fn configured(
        config: &Config,
        http: reqwest::Client,
        engine: &Engine,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(teams) = config.teams_config() else {
            return Ok(None);
        };
        Ok(Some(Arc::new(Self::from_config(
            teams,
            http,
            engine.clone(),
        ))))
    }

    pub fn from_config(config: &TeamsConfig, http: reqwest::Client, engine: Engine) -> Self {
        let tenant_id = Some(config.tenant_id.trim().to_string()).filter(|id| !id.is_empty());
        let token_url = config.token_url.replace(
            "{tenant}",
            tenant_id.as_deref().unwrap_or("botframework.com"),
        );
        Self {
            engine,
            verifier: TokenVerifier::new(http.clone(), &config.openid_metadata_url, &config.app_id),
            connector: Connector::new(
                http,
                token_url,
                config.app_id.clone(),
                config.app_password.clone(),
                config.allowed_service_urls.clone(),
            ),
            tenant_id,
            default_service_url: config.default_service_url.clone(),
            endpoints: std::sync::Mutex::new(HashMap::new()),
            emails: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    fn destination_of(conversation_id: &str) -> String {
        format!("{PLATFORM}:{}", conversation_of(conversation_id))
    }

    /// Remembers where a conversation is reached, writing only when that changed.
    async fn record_endpoint(
        &self,
        conversation_id: &str,
        service_url: &str,
        tenant: Option<&str>,
    ) {
        if conversation_id.is_empty() || service_url.is_empty() {
            return;
        }
        // A URL signoff would never call must not replace one it can (the conversation's
        // cards would stop); such a conversation keeps what was known, else the default.
        if !self.connector.may_call(service_url) {
            tracing::warn!(
                service_url,
                "a Teams activity came from a service URL outside teams.allowed_service_urls; not recorded"
            );
            return;
        }
        let destination = Self::destination_of(conversation_id);
        let known = (service_url.to_string(), tenant.map(str::to_string));
        let unchanged = self
            .endpoints
            .lock()
            .map(|endpoints| endpoints.get(&destination) == Some(&known))
            .unwrap_or(false);
        if unchanged {
            return;
        }
        let endpoint = ConversationEndpoint {
            destination: destination.clone(),
            service_url: known.0.clone(),
            tenant: known.1.clone(),
        };
        match self.engine.record_conversation_endpoint(&endpoint).await {
            Ok(()) => {
                if let Ok(mut endpoints) = self.endpoints.lock() {
                    insert_bounded(&mut endpoints, destination, known, |_| false);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "could not record a Teams conversation's service URL")
            }
        }
    }

    /// The service URL of a conversation: the one recorded for it, else the default.
    async fn service_url(&self, conversation_id: &str) -> Result<String, ChannelError> {
        let destination = Self::destination_of(conversation_id);
        let cached = self
            .endpoints
            .lock()
            .ok()
            .and_then(|endpoints| endpoints.get(&destination).map(|(url, _)| url.clone()));
        if let Some(url) = cached {
            return Ok(url);
        }
        Ok(
            match self.engine.conversation_endpoint(&destination).await? {
                Some(endpoint) => {
                    if let Ok(mut endpoints) = self.endpoints.lock() {
                        let known = (endpoint.service_url.clone(), endpoint.tenant.clone());
                        insert_bounded(&mut endpoints, destination, known, |_| false);
                    }
                    endpoint.service_url
                }
                None => self.default_service_url.clone(),
            },
        )
    }

    /// The voter behind a Teams user: `teams:<AAD object id>`, with the email the
    /// conversation's member list gives where someone is named by email (only when the
    /// bot is pinned to one tenant).
    async fn voter_for(
        &self,
        request: &ApprovalRequest,
        user: &TeamsUser<'_>,
    ) -> Result<Voter, ChannelError> {
        let principal = format!("{PLATFORM}:{}", user.aad_object_id)
            .parse()
            .map_err(|_| ChannelError::Permanent("not a Teams user id".into()))?;
        let mut voter = Voter::new(principal);
        let needs_email = self.needs_email(request).await;
        if !needs_email {
            return Ok(voter);
        }
        // Where no tenant is configured, activities come from any tenant, and a member
        // list's email is whatever that tenant's administrators set: it proves nothing.
        let email = match user.member.filter(|_| self.tenant_id.is_some()) {
            Some((service_url, conversation, member)) => {
                self.email(service_url, conversation, member).await?
            }
            None => None,
        };
        match email.and_then(|email| format!("email:{email}").parse().ok()) {
            Some(alias) => voter.aliases.push(alias),
            None => voter.email_unreadable = true,
        }
        Ok(voter)
    }

    /// Does anyone who matters for `request` go by email (approvers, requester, owners,
    /// `people`)? Only then is the member list asked, so a connector outage cannot block
    /// other votes.
    async fn needs_email(&self, request: &ApprovalRequest) -> bool {
        let policy = self.engine.policy();
        let is_email = |principal: &str| principal.starts_with("email:");
        let owners_by_email = match self.engine.agent(&request.agent).await {
            Ok(agent) => {
                agent.is_some_and(|agent| agent.owners.iter().any(|owner| is_email(owner.as_str())))
            }
            Err(_) => true,
        };
        owners_by_email
            || policy.people().names_anyone_by_email()
            || request
                .on_behalf_of
                .as_ref()
                .is_some_and(|requester| is_email(requester.as_str()))
            || request
                .tier
                .as_deref()
                .and_then(|tier| policy.tier(tier))
                .is_some_and(|tier| tier.approvers.principals.iter().any(|p| is_email(p)))
    }

    async fn email(
        &self,
        service_url: &str,
        conversation: &str,
        member: &str,
    ) -> Result<Option<String>, ChannelError> {
        if let Some((at, email)) = self.emails.lock().await.get(member) {
            if at.elapsed() < EMAIL_TTL {
                return Ok(email.clone());
            }
        }
        let lookup =
            self.connector
                .member_email(service_url, conversation_of(conversation), member);
        let email = tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
            .await
            .unwrap_or_else(|_| {
                Err(ChannelError::Retry {
                    reason: "Teams member lookup timed out".into(),
                    after: None,
                })
            })?;
        let expired = |(at, _): &(Instant, Option<String>)| at.elapsed() >= EMAIL_TTL;
        insert_bounded(
            &mut *self.emails.lock().await,
            member.to_string(),
            (Instant::now(), email.clone()),
            expired,
        );
        Ok(email)
    }
}

/// Entries each in-memory cache may hold. Every new conversation or member adds one, so
/// without a bound a stream of activities could grow memory without end.
const CACHE_CAPACITY: usize = 10_000;

/// Inserts into a cache of at most `CACHE_CAPACITY` entries: when full, expired entries go
/// first, and if none has expired the cache starts over (every entry can be read again from
/// the store or the connector).
fn insert_bounded<K: std::hash::Hash + Eq, V>(
    cache: &mut HashMap<K, V>,
    key: K,
    value: V,
    expired: impl Fn(&V) -> bool,
) {
    if cache.len() >= CACHE_CAPACITY && !cache.contains_key(&key) {
        cache.retain(|_, value| !expired(value));
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
    }
    cache.insert(key, value);
}

/// A Teams user as an activity names them: the AAD object id (who they are) and, for
/// email lookups, where the connector lists them (service URL, conversation, `from.id`).
pub struct TeamsUser<'a> {
    pub aad_object_id: &'a str,
    pub member: Option<(&'a str, &'a str, &'a str)>,
}

#[async_trait]
impl ChatChannel for TeamsChannel {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn sync_card(
        &self,
        view: &CardView,
        destination: &Destination,
        posted: Option<&Value>,
    ) -> Result<CardSync, ChannelError> {
        let activity = card_activity(&card_fallback_text(view), vec![render_card(view)]);
        let existing = posted
            .and_then(|reference| serde_json::from_value::<PostedActivity>(reference.clone()).ok());
        match existing {
            Some(posted) => {
                let service_url = self.service_url(&posted.conversation).await?;
                self.connector
                    .update_activity(&service_url, &posted, &activity)
                    .await?;
                Ok(CardSync::Updated)
            }
            None => {
                let conversation = destination.conversation();
                let service_url = self.service_url(conversation).await?;
                let activity_id = self
                    .connector
                    .post_activity(&service_url, conversation, &activity)
                    .await?;
                let reference = serde_json::to_value(PostedActivity {
                    conversation: conversation.to_string(),
                    activity_id,
                })
                .unwrap_or_default();
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
        let card = serde_json::from_value::<PostedActivity>(posted.clone()).map_err(|error| {
            ChannelError::Permanent(format!("the card's Teams reference is unreadable: {error}"))
        })?;
        let service_url = self.service_url(&card.conversation).await?;
        let activity = serde_json::json!({
            "type": "message",
            "text": reminder_text(&reminder.approvers, reminder.approvals, reminder.required),
            "replyToId": card.activity_id,
        });
        self.connector
            .post_activity(&service_url, &card.conversation, &activity)
            .await?;
        Ok(())
    }

    async fn resolve_voter(
        &self,
        _engine: &Engine,
        request: &ApprovalRequest,
        user: &str,
    ) -> Result<Voter, ChannelError> {
        self.voter_for(
            request,
            &TeamsUser {
                aad_object_id: user,
                member: None,
            },
        )
        .await
    }

    fn routes(self: Arc<Self>, engine: Engine, body_limit: usize) -> axum::Router {
        handlers::router(engine, self, body_limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_never_grow_past_their_capacity() {
        let mut cache = HashMap::new();
        for key in 0..CACHE_CAPACITY * 3 {
            // Every third entry counts as expired.
            insert_bounded(&mut cache, key, key % 3 == 0, |expired| *expired);
            assert!(cache.len() <= CACHE_CAPACITY);
        }
        assert!(cache.contains_key(&(CACHE_CAPACITY * 3 - 1)));
        // Replacing a key that is there never evicts anything.
        let before = cache.len();
        let last = CACHE_CAPACITY * 3 - 1;
        insert_bounded(&mut cache, last, false, |expired| *expired);
        assert_eq!(cache.len(), before);
    }

    #[test]
    fn a_thread_names_its_conversation() {
        assert_eq!(
            conversation_of("19:abc@thread.tacv2;messageid=1712345"),
            "19:abc@thread.tacv2"
        );
        assert_eq!(conversation_of("a:1xyz"), "a:1xyz");
    }
}
