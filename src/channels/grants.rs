//! Grants in chat, independent of the platform: which grants a chat user may see (`grants`), what state each is in, and revoking one
//! (`grants revoke GRANT_ID`). Platforms only say who the user is and format the answer.

use std::future::Future;

use chrono::{DateTime, Utc};

use super::explain;
use crate::domain::{ApprovalRequest, Grant, Voter};
use crate::engine::Engine;

/// Grants listed in one answer, newest first.
pub const GRANTS_LISTED: usize = 50;

/// The answer to a revoke of a grant that does not exist or that the user may not see:
/// the same either way, so a stranger learns nothing.
pub const UNKNOWN_GRANT: &str = "That grant does not exist, or you may not revoke it.";

/// Where a grant stands, in one word.
pub fn grant_state(grant: &Grant, now: DateTime<Utc>) -> &'static str {
    match grant.revoked_at {
        Some(_) => "revoked",
        None if grant.expires_at <= now => "expired",
        None if grant.uses_left == 0 => "spent",
        None => "active",
    }
}

/// One grant as a chat user is shown it.
#[derive(Clone, Debug, PartialEq)]
pub struct ListedGrant {
    pub grant: Grant,
    pub state: &'static str,
}

/// The grants of tiers the chat user approves in, newest first (spent, expired and revoked
/// too). `voter_for` says who the user is for a grant's request (its tier's groups); a
/// grant whose request cannot tell is left out rather than shown to a stranger.
pub async fn grants_visible_to<F, Fut>(
    engine: &Engine,
    voter_for: F,
) -> Result<Vec<ListedGrant>, String>
where
    F: Fn(ApprovalRequest) -> Fut,
    Fut: Future<Output = Option<Voter>>,
{
    let grants = engine
        .list_grants(None)
        .await
        .map_err(|error| explain(&error))?;
    let policy = engine.policy();
    let now = engine.now();
    let mut visible = Vec::new();
    for grant in grants {
        if visible.len() == GRANTS_LISTED {
            break;
        }
        let Ok(request) = engine.request(&grant.request_id).await else {
            continue;
        };
        let Some(voter) = voter_for(request).await else {
            continue;
        };
        if policy.admits(&grant.tier, &policy.identify(&voter)) {
            let state = grant_state(&grant, now);
            visible.push(ListedGrant { grant, state });
        }
    }
    Ok(visible)
}

/// Revokes grant `id` for the chat user: the engine allows approvers of the grant's tier
/// (and operators). Refusals come back in words for the user.
pub async fn revoke_grant_for<F, Fut>(
    engine: &Engine,
    id: &str,
    voter_for: F,
) -> Result<Grant, String>
where
    F: FnOnce(ApprovalRequest) -> Fut,
    Fut: Future<Output = Option<Voter>>,
{
    let Ok(Some(grant)) = engine
        .list_grants(None)
        .await
        .map(|grants| grants.into_iter().find(|grant| grant.id == id))
    else {
        return Err(UNKNOWN_GRANT.into());
    };
    let Ok(request) = engine.request(&grant.request_id).await else {
        return Err(UNKNOWN_GRANT.into());
    };
    let Some(voter) = voter_for(request).await else {
        return Err(UNKNOWN_GRANT.into());
    };
    engine
        .revoke_grant(id, &voter)
        .await
        .map_err(|error| explain(&error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn grant_states() {
        let at = |hour| Utc.with_ymd_and_hms(2026, 12, 1, hour, 0, 0).unwrap();
        let grant = Grant {
            id: "grt_1".into(),
            agent: "ops".into(),
            action: "ops.restart".into(),
            action_hash: None,
            when: None,
            tier: "medium".into(),
            created_by: Vec::new(),
            request_id: "apr_1".into(),
            created_at: at(1),
            expires_at: at(5),
            uses_left: 2,
            uses_granted: 3,
            revoked_at: None,
        };
        assert_eq!(grant_state(&grant, at(2)), "active");
        assert_eq!(grant_state(&grant, at(5)), "expired");
        let spent = Grant {
            uses_left: 0,
            uses_granted: 3,
            ..grant.clone()
        };
        assert_eq!(grant_state(&spent, at(2)), "spent");
        let revoked = Grant {
            revoked_at: Some(at(3)),
            ..spent
        };
        assert_eq!(grant_state(&revoked, at(6)), "revoked");
    }
}
