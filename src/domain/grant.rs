//! Standing grants: an approver's "approve and don't ask again, for a while", and what a
//! grant covers.

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Principal;

/// A standing grant as listed by the CLI, chat and `GET /v1/grants`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Grant {
    /// `grt_` and 26 random base-32 characters.
    pub id: String,
    pub agent: String,
    pub action: String,
    /// The args it covers (their `action_hash`); null when `when` widens it.
    #[schema(required = true)]
    pub action_hash: Option<String>,
    /// A CEL condition over `args`, `context`, `agent`, `action`; null: the same args only.
    #[schema(required = true)]
    pub when: Option<String>,
    /// It covers requests whose verdict is require_approval at this tier or lower.
    pub tier: String,
    pub created_by: Vec<Principal>,
    /// The request whose approval created it.
    pub request_id: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub uses_left: u32,
    /// The uses it was created with (`uses_left` counts down from it).
    #[serde(default)]
    pub uses_granted: u32,
    #[schema(required = true)]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl Grant {
    /// Can it approve something at `at`: not revoked, not expired, a use left?
    pub fn is_active(&self, at: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at > at && self.uses_left > 0
    }
}

/// What an approver asked for with an approve vote: a grant of this length and uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GrantAsk {
    /// Seconds.
    pub ttl_seconds: u64,
    /// `None`: the tier's `max_uses`.
    #[schema(required = true)]
    pub uses: Option<u32>,
    #[schema(required = true)]
    pub when: Option<String>,
}

pub fn new_grant_id() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let mut random = rand::thread_rng();
    let suffix: String = (0..26)
        .map(|_| ALPHABET[random.gen_range(0..32)] as char)
        .collect();
    format!("grt_{suffix}")
}
