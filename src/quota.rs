//! Per-agent quotas, so one agent can never starve the others at intake: a cap
//! on pending requests, a submission rate limit and a cap on concurrent long-polls.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::OwnedMutexGuard;

use crate::config::Config;
use crate::store::{Store, StoreResult};

/// A request refused by a quota; answered 429.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuotaExceeded {
    #[error("this agent already has {limit} pending requests; wait for some to be decided")]
    TooManyPending { limit: u64 },
    #[error("this agent submits faster than {limit} requests per second")]
    RateLimited { limit: u32, retry_after: Duration },
    #[error("this agent already has {limit} long-polls waiting")]
    TooManyWaiting { limit: u64 },
}

impl QuotaExceeded {
    /// The stable error code of the answer.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooManyPending { .. } => "too_many_pending",
            Self::RateLimited { .. } => "rate_limited",
            Self::TooManyWaiting { .. } => "too_many_waiting",
        }
    }

    /// Whole seconds to wait, rounded up, at least 1 (for `Retry-After`).
    pub fn retry_after_seconds(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after, .. } => {
                let whole = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                Some(whole.max(1))
            }
            _ => None,
        }
    }
}

/// A cached count of an agent's pending requests older than this is read again.
const PENDING_COUNT_FRESH: Duration = Duration::from_secs(1);
/// Agents tracked before the per-agent maps start over (agents are few; this bounds memory).
const TRACKED_AGENTS_LIMIT: usize = 10_000;

pub struct Quotas {
    max_pending: u64,
    rate_per_second: u32,
    rate: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
    max_waiting: u64,
    waiting: Arc<Mutex<HashMap<String, u64>>>,
    pending: Mutex<HashMap<String, PendingEstimate>>,
}

/// What this process knows of an agent's pending requests.
struct PendingEstimate {
    /// Counted in the database at `counted_at` (`None`: not yet)...
    counted: u64,
    counted_at: Option<Instant>,
    /// ...plus those admitted here since.
    admitted: u64,
    /// Held from the count to the insert while the agent is near its cap, so this
    /// process's submissions of one agent cannot all pass the same count at once.
    gate: Arc<tokio::sync::Mutex<()>>,
}

/// Admission of one more pending request: keep it until the request is inserted (or not).
#[derive(Debug)]
pub struct PendingAdmission {
    _gate: Option<OwnedMutexGuard<()>>,
}

/// One long-poll's place in its agent's count; frees it when dropped.
#[derive(Debug)]
pub struct WaitingSlot {
    agent: String,
    waiting: Arc<Mutex<HashMap<String, u64>>>,
}

impl Drop for WaitingSlot {
    fn drop(&mut self) {
        let mut waiting = lock(&self.waiting);
        if let Some(count) = waiting.get_mut(&self.agent) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                waiting.remove(&self.agent);
            }
        }
    }
}

impl Quotas {
    /// No limits (the CLI, tests of other things).
    pub fn unlimited() -> Self {
        Self::new(0, 0, 0)
    }

    pub fn from_config(config: &Config) -> Self {
        Self::new(
            config.max_pending_per_agent,
            config.agent_rate_limit,
            config.max_waiting_per_agent,
        )
    }

    /// 0 turns a limit off.
    pub fn new(max_pending: u64, rate_per_second: u32, max_waiting: u64) -> Self {
        let rate = NonZeroU32::new(rate_per_second).map(|rate| {
            let burst = NonZeroU32::new(rate.get().saturating_mul(2)).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            max_pending,
            rate_per_second,
            rate,
            clock: DefaultClock::default(),
            max_waiting,
            waiting: Arc::default(),
            pending: Mutex::default(),
        }
    }

    /// Spends one of the agent's submissions (GCRA, in process: a few atomic operations).
    pub fn check_rate(&self, agent: &str) -> Result<(), QuotaExceeded> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        if rate.len() > TRACKED_AGENTS_LIMIT {
            rate.retain_recent();
        }
        rate.check_key(&agent.to_string())
            .map_err(|not_until| QuotaExceeded::RateLimited {
                limit: self.rate_per_second,
                retry_after: not_until.wait_time_from(self.clock.now()),
            })
    }

    /// A place among the agent's concurrent long-polls, held as long as the slot lives.
    pub fn wait_slot(&self, agent: &str) -> Result<Option<WaitingSlot>, QuotaExceeded> {
        if self.max_waiting == 0 {
            return Ok(None);
        }
        let mut waiting = lock(&self.waiting);
        let count = waiting.entry(agent.to_string()).or_default();
        if *count >= self.max_waiting {
            return Err(QuotaExceeded::TooManyWaiting {
                limit: self.max_waiting,
            });
        }
        *count += 1;
        Ok(Some(WaitingSlot {
            agent: agent.to_string(),
            waiting: self.waiting.clone(),
        }))
    }

    /// Admits one more pending request of `agent`, or refuses it at the cap.
    ///
    /// Far below the cap (under half of it) a count at most a second old, plus what this
    /// process admitted since, is enough: no query. Nearer, every admission counts in the
    /// database (an index range over the agent's pending requests) and holds the agent's
    /// gate until its insert is done, so this process admits one at a time per agent and
    /// never overshoots. A stale count is read again by one admission while the others wait
    /// for it, then use it. Replicas do not share the gate: each may admit what it has in
    /// flight at the moment it counts, so across N replicas the cap can be exceeded by at
    /// most N-1 requests in flight at once.
    #[tracing::instrument(skip_all, fields(agent = %agent))]
    pub async fn admit_pending(
        &self,
        agent: &str,
        store: &dyn Store,
    ) -> StoreResult<Result<PendingAdmission, QuotaExceeded>> {
        if self.max_pending == 0 {
            return Ok(Ok(PendingAdmission { _gate: None }));
        }
        let gate = {
            let mut pending = lock(&self.pending);
            if pending.len() > TRACKED_AGENTS_LIMIT {
                pending.clear();
            }
            match pending.get_mut(agent) {
                Some(estimate) if self.far_below_cap(estimate) => {
                    estimate.admitted += 1;
                    return Ok(Ok(PendingAdmission { _gate: None }));
                }
                Some(estimate) => estimate.gate.clone(),
                None => {
                    let gate = Arc::new(tokio::sync::Mutex::new(()));
                    pending.insert(
                        agent.to_string(),
                        PendingEstimate {
                            counted: 0,
                            counted_at: None,
                            admitted: 0,
                            gate: gate.clone(),
                        },
                    );
                    gate
                }
            }
        };
        let held = gate.lock_owned().await;
        // Whoever held the gate before may just have counted: then there is no need to
        // count again (at saturation, every submission would otherwise queue for a count).
        if self.admit_from_estimate(agent) {
            return Ok(Ok(PendingAdmission { _gate: None }));
        }
        let counted = u64::try_from(store.pending_count_of_agent(agent).await?).unwrap_or(0);
        if let Some(estimate) = lock(&self.pending).get_mut(agent) {
            estimate.counted = counted;
            estimate.counted_at = Some(Instant::now());
            estimate.admitted = u64::from(counted < self.max_pending);
        }
        if counted >= self.max_pending {
            return Ok(Err(QuotaExceeded::TooManyPending {
                limit: self.max_pending,
            }));
        }
        // Far from the cap, the others need not wait for this insert.
        let near = (counted + 1) * 2 > self.max_pending;
        Ok(Ok(PendingAdmission {
            _gate: near.then_some(held),
        }))
    }
}

impl Quotas {
    /// A count under a second old, with what was admitted since, under half the cap.
    fn far_below_cap(&self, estimate: &PendingEstimate) -> bool {
        estimate
            .counted_at
            .is_some_and(|at| at.elapsed() < PENDING_COUNT_FRESH)
            && (estimate.counted + estimate.admitted + 1) * 2 <= self.max_pending
    }

    /// Admits one on the estimate alone when `far_below_cap`.
    fn admit_from_estimate(&self, agent: &str) -> bool {
        let mut pending = lock(&self.pending);
        match pending.get_mut(agent) {
            Some(estimate) if self.far_below_cap(estimate) => {
                estimate.admitted += 1;
                true
            }
            _ => false,
        }
    }
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Quotas")
            .field("max_pending", &self.max_pending)
            .field("rate_per_second", &self.rate_per_second)
            .field("max_waiting", &self.max_waiting)
            .finish_non_exhaustive()
    }
}

/// The maps hold counts only: a panic elsewhere cannot leave them half-changed.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_allows_a_burst_of_twice_the_rate_then_says_when() {
        let quotas = Quotas::new(0, 5, 0);
        for _ in 0..10 {
            quotas.check_rate("a").expect("within the burst");
        }
        let refused = quotas.check_rate("a").expect_err("burst spent");
        assert_eq!(refused.code(), "rate_limited");
        assert_eq!(refused.retry_after_seconds(), Some(1));
        // Another agent has its own budget.
        quotas.check_rate("b").expect("b is not limited by a");
    }

    #[test]
    fn waiting_slots_are_given_back_when_dropped() {
        let quotas = Quotas::new(0, 0, 2);
        let first = quotas.wait_slot("a").expect("first");
        let _second = quotas.wait_slot("a").expect("second");
        assert_eq!(
            quotas.wait_slot("a").expect_err("third").code(),
            "too_many_waiting"
        );
        assert!(quotas.wait_slot("b").is_ok());
        drop(first);
        assert!(quotas.wait_slot("a").is_ok());
    }

    #[test]
    fn retry_after_rounds_up() {
        let limited = |retry_after| QuotaExceeded::RateLimited {
            limit: 1,
            retry_after,
        };
        assert_eq!(
            limited(Duration::from_millis(1)).retry_after_seconds(),
            Some(1)
        );
        assert_eq!(
            limited(Duration::from_millis(2001)).retry_after_seconds(),
            Some(3)
        );
        assert_eq!(limited(Duration::ZERO).retry_after_seconds(), Some(1));
    }
}
