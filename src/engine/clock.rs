//! The engine's time. Production reads the system clock; tests inject a `ManualClock` and
//! move it, so expiry, reminders and escalation are tested without waiting.

use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};

/// Where the engine and its workers read the time from.
pub trait Clock: Send + Sync + 'static {
    /// Now, to the millisecond (what the store and the audit chain keep).
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        crate::domain::now()
    }
}

/// A clock that stands still until moved: tests set the time the engine sees.
#[derive(Clone, Debug)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    /// Starts at the system's time now.
    pub fn new() -> Self {
        Self::starting_at(crate::domain::now())
    }

    pub fn starting_at(at: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(Mutex::new(at)),
        }
    }

    /// Moves the clock forward (or back, with a negative duration).
    pub fn advance(&self, by: chrono::Duration) {
        *self.lock() += by;
    }

    pub fn set(&self, at: DateTime<Utc>) {
        *self.lock() = at;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DateTime<Utc>> {
        // A plain value: a panic elsewhere cannot leave it half-written.
        self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::new();
        let start = clock.now();
        assert_eq!(clock.now(), start);
        clock.advance(chrono::Duration::minutes(31));
        assert_eq!(clock.now() - start, chrono::Duration::minutes(31));
        let shared: Arc<dyn Clock> = Arc::new(clock.clone());
        clock.advance(chrono::Duration::seconds(1));
        assert_eq!(shared.now() - start, chrono::Duration::seconds(31 * 60 + 1));
    }
}
