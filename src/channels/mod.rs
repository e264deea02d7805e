//! The chat-channel boundary (ARCHITECTURE.md): `trait ChatChannel` is everything the rest
//! of signoff asks of a chat platform — post and update a card, post a reminder, say who
//! clicked, serve its own signed routes — and `ChatChannels` is the registry the server
//! fills and the delivery worker looks destinations up in. Platform code lives below, one
//! folder each (`slack/`, `teams/`); nothing outside this folder names a platform.

mod commands;
mod grants;
pub mod slack;
pub mod teams;
mod view;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;

use crate::domain::{ApprovalRequest, Destination, Voter};
use crate::engine::{Engine, EngineError};

pub use commands::{decidable_by, explain, ChatCommand, PendingError, HELP_LINES};
pub use grants::{
    grant_state, grants_visible_to, revoke_grant_for, ListedGrant, GRANTS_LISTED, UNKNOWN_GRANT,
};
pub use view::{
    changed_args, parse_modified_args, vote_from_form, CardView, GrantChoice, VoteTarget, APPROVE,
    APPROVE_FOR, DENY, MODIFY,
};

/// A chat platform signoff posts approval cards to and takes votes from.
#[async_trait]
pub trait ChatChannel: Send + Sync + 'static {
    /// The platform its destinations name (`slack` in `slack:C0HIGH`).
    fn platform(&self) -> &'static str;

    /// Makes the card at `destination` show `card` (the request as it is now, redacted
    /// under the policy): posts it when `posted` is `None` (the answer's reference is
    /// saved with the delivery), else updates that message.
    async fn sync_card(
        &self,
        card: &CardView,
        destination: &Destination,
        posted: Option<&Value>,
    ) -> Result<CardSync, ChannelError>;

    /// Reminds the approvers in the thread of the card message `posted`.
    async fn post_reminder(
        &self,
        reminder: &Reminder,
        destination: &Destination,
        posted: &Value,
    ) -> Result<(), ChannelError>;

    /// Who the platform's user `user` is, as the engine judges a vote on `request`: their
    /// principal, aliases (an email) and groups, as far as the platform can tell.
    async fn resolve_voter(
        &self,
        engine: &Engine,
        request: &ApprovalRequest,
        user: &str,
    ) -> Result<Voter, ChannelError>;

    /// The platform's inbound routes (signed interactions, commands, events), each
    /// verified before anything is parsed and limited to `body_limit` bytes.
    fn routes(self: Arc<Self>, engine: Engine, body_limit: usize) -> axum::Router;
}

/// What syncing a card did.
#[derive(Clone, Debug, PartialEq)]
pub enum CardSync {
    /// A new message: where it lives, kept with the delivery's finish so later changes
    /// update it in place.
    Posted {
        reference: Value,
    },
    Updated,
}

/// Why a call to a chat platform failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ChannelError {
    #[error("chat call failed, will retry: {reason}")]
    Retry {
        reason: String,
        /// The platform's Retry-After, when it sent one.
        after: Option<Duration>,
    },
    #[error("chat platform refused the call: {0}")]
    Permanent(String),
}

impl From<EngineError> for ChannelError {
    fn from(error: EngineError) -> Self {
        ChannelError::Retry {
            reason: error.to_string(),
            after: None,
        }
    }
}

/// A reminder's content, as the sweeper wrote it into the outbox.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Reminder {
    /// Everyone who may vote, as the policy names them.
    #[serde(default)]
    pub approvers: Vec<String>,
    #[serde(default)]
    pub approvals: u64,
    #[serde(default)]
    pub required: u64,
}

/// The chat channels this process runs, by platform.
#[derive(Clone, Default)]
pub struct ChatChannels {
    by_platform: HashMap<&'static str, Arc<dyn ChatChannel>>,
}

impl ChatChannels {
    /// Adds `channel`; a later channel of the same platform replaces an earlier one.
    pub fn register(&mut self, channel: Arc<dyn ChatChannel>) {
        self.by_platform.insert(channel.platform(), channel);
    }

    /// The channel that delivers to `destination`, if this process runs it.
    pub fn for_destination(&self, destination: &Destination) -> Option<&Arc<dyn ChatChannel>> {
        self.by_platform.get(destination.platform())
    }

    /// Does this process run the channel of `destination` (as stored in the outbox)?
    pub fn delivers_to(&self, destination: &str) -> bool {
        Destination::parse(destination)
            .is_some_and(|destination| self.for_destination(&destination).is_some())
    }

    /// Every channel's inbound routes, merged.
    pub fn routes(&self, engine: &Engine, body_limit: usize) -> axum::Router {
        self.by_platform
            .values()
            .fold(axum::Router::new(), |router, channel| {
                router.merge(channel.clone().routes(engine.clone(), body_limit))
            })
    }
}
