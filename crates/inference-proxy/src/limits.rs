//! Per-agent request rate limits with GCRA (generic cell rate algorithm): requests are
//! spaced by `60 s / rpm` with a tolerance of `rpm - 1` intervals, so an agent may
//! send its whole minute's allowance at once and then one request per interval, with
//! no double burst at window edges. One limiter per process, shared by every worker.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused; the caller may retry after this long.
    Deny {
        retry_after: Duration,
    },
}

/// A GCRA limiter keyed by agent.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    tolerance: Duration,
    /// Theoretical arrival time per agent.
    tat: Mutex<HashMap<String, Instant>>,
}

impl RateLimiter {
    /// `rpm` requests per minute per agent (at least 1).
    pub fn per_minute(rpm: u32) -> Self {
        let rpm = rpm.max(1);
        let interval = Duration::from_secs(60) / rpm;
        Self {
            interval,
            tolerance: interval * (rpm - 1),
            tat: Mutex::new(HashMap::new()),
        }
    }

    /// Decides for `agent` at `now` and records an allowed request.
    pub fn check_at(&self, agent: &str, now: Instant) -> Decision {
        let mut map = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let tat = map.get(agent).copied().unwrap_or(now).max(now);
        let allow_at = tat.checked_sub(self.tolerance).unwrap_or(now);
        if now < allow_at {
            return Decision::Deny {
                retry_after: allow_at - now,
            };
        }
        map.insert(agent.to_owned(), tat + self.interval);
        Decision::Allow
    }

    pub fn check(&self, agent: &str) -> Decision {
        self.check_at(agent, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixty_per_minute_allows_sixty_then_one_per_second() {
        let l = RateLimiter::per_minute(60);
        let t0 = Instant::now();
        let allowed = (0..61)
            .filter(|_| l.check_at("a", t0) == Decision::Allow)
            .count();
        assert_eq!(allowed, 60, "exactly one of 61 is refused");
        match l.check_at("a", t0) {
            Decision::Deny { retry_after } => {
                assert!(retry_after <= Duration::from_secs(1) && retry_after > Duration::ZERO)
            }
            d => panic!("{d:?}"),
        }
        // Another agent is unaffected.
        assert_eq!(l.check_at("b", t0), Decision::Allow);
        // One interval later exactly one more fits; no second burst.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.check_at("a", t1), Decision::Allow);
        assert!(matches!(l.check_at("a", t1), Decision::Deny { .. }));
        // After a full idle minute the allowance is back, but not more.
        let t2 = t1 + Duration::from_secs(61);
        assert_eq!(
            (0..70)
                .filter(|_| l.check_at("a", t2) == Decision::Allow)
                .count(),
            60
        );
    }
}
