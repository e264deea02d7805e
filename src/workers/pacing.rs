//! Pacing per chat destination (about one post a second, with a short burst) and whose
//! turn it is among the agents with cards waiting there.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// About one post per second per destination, with a short burst.
const BURST: f64 = 3.0;
const PER_SECOND: f64 = 1.0;

/// Round-robin among the agents of one destination: the agent served longest ago (or
/// never) goes next.
#[derive(Debug, Default)]
pub(super) struct Turns {
    served: HashMap<String, u64>,
    next: u64,
}

impl Turns {
    /// Of `agents` (each with a card waiting, oldest first), whose turn it is; counts it served.
    pub(super) fn take_turn<'a>(&mut self, agents: impl Iterator<Item = &'a str>) -> Option<usize> {
        // Oldest first among agents never served or served equally long ago.
        let (index, agent) = agents
            .enumerate()
            .min_by_key(|(_, agent)| self.served.get(*agent).copied())?;
        self.next += 1;
        self.served.insert(agent.to_string(), self.next);
        Some(index)
    }
}

/// Tokens for posts to one destination, refilled with time.
pub(super) struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub(super) fn full() -> Self {
        Self {
            tokens: BURST,
            updated: Instant::now(),
        }
    }

    pub(super) fn has_token(&self) -> bool {
        self.next_token_in().is_none()
    }

    /// `None` when a token is there now.
    pub(super) fn next_token_in(&self) -> Option<Duration> {
        let tokens = self.tokens + self.updated.elapsed().as_secs_f64() * PER_SECOND;
        (tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - tokens) / PER_SECOND))
    }

    pub(super) fn take(&mut self) -> Option<Duration> {
        let elapsed = self.updated.elapsed().as_secs_f64();
        self.updated = Instant::now();
        self.tokens = (self.tokens + elapsed * PER_SECOND).min(BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / PER_SECOND))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_allows_a_burst_then_about_one_per_second() {
        let mut bucket = TokenBucket::full();
        for _ in 0..3 {
            assert!(bucket.has_token());
            assert_eq!(bucket.next_token_in(), None);
            assert_eq!(bucket.take(), None);
        }
        // Spent: the worker knows how long to sleep before this channel may be sent to.
        assert!(!bucket.has_token());
        let next = bucket.next_token_in().expect("no token left");
        assert!(next > Duration::ZERO && next <= Duration::from_secs(1));
        let wait = bucket.take().expect("the burst is spent");
        assert!(wait <= Duration::from_secs(1));
    }
}
