//! The outbox as the delivery worker and the chat channels see it: due messages, leases,
//! outcomes, and where each card was posted. Thin on purpose: the worker decides what to
//! send; the store keeps it; nothing outside the engine touches the store.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{Engine, EngineResult};
use crate::store::{
    CandidateQuery, ConversationEndpoint, OutboxBacklog, OutboxCandidate, OutboxMessage,
    OutboxOutcome,
};

impl Engine {
    /// The first due, unleased messages of each (destination, agent) queue, oldest first.
    pub async fn outbox_candidates(
        &self,
        at: DateTime<Utc>,
        query: &CandidateQuery<'_>,
    ) -> EngineResult<Vec<OutboxCandidate>> {
        Ok(self.store.outbox_candidates(at, query).await?)
    }

    /// Leases the messages `ids` (those still due and free) until `lease_until`.
    pub async fn claim_outbox(
        &self,
        at: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        ids: &[i64],
    ) -> EngineResult<Vec<OutboxMessage>> {
        Ok(self.store.claim_outbox(at, lease_until, ids).await?)
    }

    /// Extends the leases of deliveries still running.
    pub async fn renew_outbox_leases(
        &self,
        ids: &[i64],
        lease_until: DateTime<Utc>,
    ) -> EngineResult<u64> {
        Ok(self.store.renew_outbox_leases(ids, lease_until).await?)
    }

    /// Records how an attempt ended, with what a delivery leaves behind, in one transaction.
    pub async fn finish_outbox(
        &self,
        message: &OutboxMessage,
        outcome: OutboxOutcome,
    ) -> EngineResult<()> {
        Ok(self.store.finish_outbox(message, outcome).await?)
    }

    /// Outbox messages still pending, for operators and tests.
    pub async fn pending_outbox(&self, limit: i64) -> EngineResult<Vec<OutboxMessage>> {
        Ok(self.store.pending_outbox(limit).await?)
    }

    /// Pending outbox messages by kind.
    pub async fn outbox_backlog(&self) -> EngineResult<OutboxBacklog> {
        Ok(self.store.outbox_backlog().await?)
    }

    /// Where the card for `request_id` was posted at `destination`, if it was (the
    /// channel's own reference, saved with the post's delivery).
    pub async fn chat_message(
        &self,
        request_id: &str,
        destination: &str,
    ) -> EngineResult<Option<Value>> {
        Ok(self.store.chat_message(request_id, destination).await?)
    }

    /// The secret that signs webhooks about `request_id`: its agent's.
    pub async fn webhook_secret(&self, request_id: &str) -> EngineResult<String> {
        let request = self.request(request_id).await?;
        let agent = self.agent(&request.agent).await?.ok_or_else(|| {
            super::EngineError::Internal(anyhow::anyhow!(
                "agent {} no longer exists",
                request.agent
            ))
        })?;
        Ok(agent.webhook_secret)
    }

    /// Records where a chat platform said a conversation is reached (from its verified
    /// inbound requests), for the cards posted there later.
    pub async fn record_conversation_endpoint(
        &self,
        endpoint: &ConversationEndpoint,
    ) -> EngineResult<()> {
        Ok(self.store.record_conversation_endpoint(endpoint).await?)
    }

    /// Where `destination` was last said to be reached, if ever.
    pub async fn conversation_endpoint(
        &self,
        destination: &str,
    ) -> EngineResult<Option<ConversationEndpoint>> {
        Ok(self.store.conversation_endpoint(destination).await?)
    }
}
