//! Agents: creating and revoking them, and knowing one by its API key.

use std::collections::HashMap;

use base64::Engine as _;
use rand::RngCore;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::instrument;

use super::{Engine, EngineError, EngineResult};
use crate::audit::NewAuditEvent;
use crate::domain::{AuditKind, Principal};
use crate::store::{AgentRecord, StoreError};

/// More cached submitters than this and the cache starts over (agents are few; this only
/// bounds memory).
const SUBMITTER_CACHE_LIMIT: usize = 10_000;

#[derive(Clone, Serialize)]
pub struct AgentCredentials {
    pub agent: String,
    pub api_key: String,
    pub webhook_secret: String,
}

impl std::fmt::Debug for AgentCredentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AgentCredentials")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl Engine {
    #[instrument(skip_all, fields(agent = %name))]
    pub async fn create_agent(
        &self,
        name: &str,
        owners: Vec<Principal>,
    ) -> EngineResult<AgentCredentials> {
        validate_agent_name(name)?;
        let api_key = format!("sk_{}", random_token(32));
        let webhook_secret = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(random_bytes::<24>())
        );
        let at = self.now();
        let record = AgentRecord {
            name: name.to_string(),
            api_key_hash: hash_api_key(&api_key),
            webhook_secret: webhook_secret.clone(),
            owners: owners.clone(),
            created_at: at,
            revoked_at: None,
        };
        let audit = NewAuditEvent {
            at,
            request_id: None,
            kind: AuditKind::AgentCreated,
            actor: "operator".into(),
            payload: json!({"agent": name, "owners": owners}),
        };
        self.store
            .create_agent(&record, audit)
            .await
            .map_err(|error| match error {
                StoreError::Conflict(message) => EngineError::Conflict {
                    code: "agent_exists",
                    message,
                },
                other => other.into(),
            })?;
        Ok(AgentCredentials {
            agent: name.to_string(),
            api_key,
            webhook_secret,
        })
    }

    pub async fn revoke_agent(&self, name: &str) -> EngineResult<()> {
        let audit = NewAuditEvent {
            at: self.now(),
            request_id: None,
            kind: AuditKind::AgentRevoked,
            actor: "operator".into(),
            payload: json!({"agent": name}),
        };
        if self.store.revoke_agent(name, audit).await? {
            self.forget_submitter(name);
            Ok(())
        } else {
            Err(EngineError::Invalid(format!(
                "no active agent named {name:?}"
            )))
        }
    }

    /// The agent named `name`, active or revoked.
    pub async fn agent(&self, name: &str) -> EngineResult<Option<AgentRecord>> {
        Ok(self.store.agent(name).await?)
    }

    pub async fn list_agents(&self) -> EngineResult<Vec<AgentRecord>> {
        Ok(self.store.list_agents().await?)
    }

    /// The active agent holding `api_key`, if any.
    pub async fn authenticate_agent(&self, api_key: &str) -> EngineResult<Option<AgentRecord>> {
        let hash = hash_api_key(api_key);
        let agent = self.store.agent_by_key_hash(&hash).await?;
        // The lookup is by hash; compare again in constant time so equality never short-circuits.
        Ok(agent.filter(|agent| bool::from(agent.api_key_hash.as_bytes().ct_eq(hash.as_bytes()))))
    }

    /// `authenticate_agent` for submissions, from the cache of recent submitters when it
    /// can. A revoked agent found there still cannot submit: the insert is refused by the
    /// database, and `submit_request` then answers `Unauthorized` and forgets it.
    pub async fn authenticate_submitter(&self, api_key: &str) -> EngineResult<Option<AgentRecord>> {
        let hash = hash_api_key(api_key);
        let cached = self.lock_submitters().get(&hash).cloned();
        if let Some(agent) = cached {
            return Ok(Some(agent));
        }
        let agent = self.authenticate_agent(api_key).await?;
        if let Some(agent) = &agent {
            let mut submitters = self.lock_submitters();
            if submitters.len() >= SUBMITTER_CACHE_LIMIT {
                submitters.clear();
            }
            submitters.insert(hash, agent.clone());
        }
        Ok(agent)
    }

    /// `Unauthorized` (and forgotten) if `agent` was revoked since it was cached.
    pub(super) async fn ensure_still_active(&self, agent: &AgentRecord) -> EngineResult<()> {
        let stored = self.store.agent(&agent.name).await?;
        if stored.is_none_or(|stored| stored.revoked_at.is_some()) {
            self.forget_submitter(&agent.name);
            return Err(EngineError::Unauthorized);
        }
        Ok(())
    }

    pub(super) fn forget_submitter(&self, name: &str) {
        self.lock_submitters().retain(|_, agent| agent.name != name);
    }

    fn lock_submitters(&self) -> std::sync::MutexGuard<'_, HashMap<String, AgentRecord>> {
        // The map is only ever read or replaced whole-entry: a panic elsewhere cannot
        // leave it half-changed.
        self.submitters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub fn hash_api_key(api_key: &str) -> String {
    hex::encode(Sha256::digest(api_key.as_bytes()))
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes
}

fn random_token(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buffer);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buffer)
}

fn validate_agent_name(name: &str) -> EngineResult<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(EngineError::Invalid(format!(
            "agent name {name:?} must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )))
    }
}
