//! The audit trail as operators and auditors use it: verify the chain, its head, export.

use tracing::instrument;

use super::{Engine, EngineResult};
use crate::audit::{AuditEvent, AuditHead, ChainBreak, ChainVerifier};

impl Engine {
    /// Recomputes the whole chain; the first broken link is the error.
    pub async fn verify_audit_chain(&self) -> EngineResult<Result<u64, ChainBreak>> {
        let mut verifier = ChainVerifier::default();
        let mut after = 0;
        loop {
            let events = self.store.audit_events(after, 1000).await?;
            let Some(last) = events.last() else {
                return Ok(Ok(verifier.verified()));
            };
            after = last.seq;
            for event in &events {
                if let Err(broken) = verifier.check(event) {
                    return Ok(Err(broken));
                }
            }
        }
    }

    /// The last event's `{seq, hash}`, or the genesis head of an empty trail.
    #[instrument(skip_all)]
    pub async fn audit_head(&self) -> EngineResult<AuditHead> {
        Ok(self
            .store
            .audit_head()
            .await?
            .map_or_else(AuditHead::genesis, |(seq, hash)| AuditHead { seq, hash }))
    }

    /// Whether the trail still holds `head`, an earlier `audit_head`: its event is still
    /// there with the same hash. Catches what `verify_audit_chain` cannot: a trail cut
    /// short, or rewritten from some event on and rehashed.
    #[instrument(skip_all, fields(seq = head.seq))]
    pub async fn check_audit_head(&self, head: &AuditHead) -> EngineResult<Result<(), ChainBreak>> {
        let event = self.store.audit_events(head.seq - 1, 1).await?;
        let last_seq = self.store.latest_audit_seq().await?;
        Ok(head.check(event.first(), last_seq))
    }

    /// Every audit event in order, page by page.
    pub async fn export_audit(
        &self,
        mut write: impl FnMut(&AuditEvent) -> anyhow::Result<()>,
    ) -> EngineResult<u64> {
        let mut after = 0;
        let mut written = 0;
        loop {
            let events = self.store.audit_events(after, 1000).await?;
            let Some(last) = events.last() else {
                return Ok(written);
            };
            after = last.seq;
            for event in &events {
                write(event)?;
                written += 1;
            }
        }
    }

    /// The last audit event's sequence number (0 while the trail is empty).
    pub async fn latest_audit_seq(&self) -> EngineResult<i64> {
        Ok(self.store.latest_audit_seq().await?)
    }
}
