//! Who a Slack user is for signoff: `slack:U…`, their email (users.info) and the Slack user
//! groups they belong to (usergroups.users.list), cached with a TTL and re-read on a miss.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::api::{SlackApi, SlackCallError};
use crate::domain::{Principal, Voter};

/// How long a user's email is trusted.
const USER_TTL: Duration = Duration::from_secs(600);
/// How long a group's member list is trusted.
const GROUP_TTL: Duration = Duration::from_secs(300);
/// Lookups happen while Slack waits for our answer to a click (3 s at most), so they get
/// less time than background calls; a timeout refuses the vote, which the user can repeat.
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(1500);
/// A user missing from a cached group list triggers a re-read once the list is this old,
/// so someone just added to a group can vote without waiting out the TTL.
const MISS_REREAD_AFTER: Duration = Duration::from_secs(15);

/// A cached answer and when it was fetched.
type Cached<T> = (Instant, T);

pub struct Directory {
    api: Arc<SlackApi>,
    emails: Mutex<HashMap<String, Cached<Option<String>>>>,
    groups: Mutex<HashMap<String, Cached<Arc<Vec<String>>>>>,
}

impl Directory {
    pub fn new(api: Arc<SlackApi>) -> Self {
        Self {
            api,
            emails: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// The voter behind Slack user `user`, with memberships checked for `user_groups`
    /// (the groups the request's tier names). Fails closed: if Slack cannot tell us who
    /// the user is, the caller refuses the vote.
    pub async fn voter(
        &self,
        user: &str,
        user_groups: &[String],
        needs_email: bool,
    ) -> Result<Voter, SlackCallError> {
        let principal: Principal = format!("slack:{user}")
            .parse()
            .map_err(|_| SlackCallError::Permanent(format!("{user:?} is not a Slack user id")))?;
        let mut voter = Voter::new(principal);
        let email = if needs_email {
            self.email(user).await?
        } else {
            None
        };
        match email.and_then(|email| format!("email:{email}").parse().ok()) {
            Some(alias) => voter.aliases.push(alias),
            // Asked for and not told: the engine refuses where the email matters.
            None => voter.email_unreadable = needs_email,
        }
        for group in user_groups {
            let id = group.trim_start_matches("slack-group:");
            if self.is_member(id, user).await? {
                voter.groups.push(group.clone());
            }
        }
        Ok(voter)
    }

    async fn email(&self, user: &str) -> Result<Option<String>, SlackCallError> {
        if let Some((at, email)) = self.emails.lock().await.get(user) {
            if at.elapsed() < USER_TTL {
                return Ok(email.clone());
            }
        }
        let email = within_lookup_timeout(self.api.user_email(user)).await?;
        self.emails
            .lock()
            .await
            .insert(user.to_string(), (Instant::now(), email.clone()));
        Ok(email)
    }

    async fn is_member(&self, group: &str, user: &str) -> Result<bool, SlackCallError> {
        let cached = self.groups.lock().await.get(group).cloned();
        if let Some((at, members)) = &cached {
            let fresh = at.elapsed() < GROUP_TTL;
            let found = members.iter().any(|member| member == user);
            if fresh && (found || at.elapsed() < MISS_REREAD_AFTER) {
                return Ok(found);
            }
        }
        let members = Arc::new(within_lookup_timeout(self.api.usergroup_members(group)).await?);
        let found = members.iter().any(|member| member == user);
        self.groups
            .lock()
            .await
            .insert(group.to_string(), (Instant::now(), members));
        Ok(found)
    }
}

async fn within_lookup_timeout<T>(
    call: impl std::future::Future<Output = Result<T, SlackCallError>>,
) -> Result<T, SlackCallError> {
    tokio::time::timeout(LOOKUP_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(SlackCallError::Retry {
                reason: "Slack user lookup timed out".into(),
                after: None,
            })
        })
}
