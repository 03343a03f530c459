//! Per-caller limits two daemons share: requests per minute with GCRA (generic cell
//! rate algorithm) — requests are spaced by `60 s / rpm` with a tolerance of `rpm - 1`
//! intervals, so a caller may send its whole minute's allowance at once and then one
//! request per interval, with no double burst at window edges — and a cap on requests
//! in flight. One of each per process, shared by every worker; the inference proxy
//! keys them by agent for LLM requests, skill-manager by agent for skill calls.

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

/// At most `max` requests per agent in flight at once (from authentication until the
/// upstream's answer has been read to its end), so one agent cannot hold an unbounded
/// share of the proxy's connections, memory and upstream capacity.
#[derive(Debug)]
pub struct InFlight {
    max: usize,
    count: Mutex<HashMap<String, usize>>,
}

impl InFlight {
    /// `max` requests per agent (at least 1).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            count: Mutex::new(HashMap::new()),
        }
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Takes a slot for `agent`, or says no: it already has `max` requests in flight.
    pub fn try_acquire(&self, agent: &str) -> bool {
        let mut map = self.count.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(agent.to_owned()).or_default();
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives a slot back.
    pub fn release(&self, agent: &str) {
        let mut map = self.count.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(agent) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(agent);
            }
        }
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

    /// Why the proxy's end-to-end test runs at RPM 2 and not 60: at 60, 61 requests spread
    /// over a little more than one interval (a busy machine) all pass.
    #[test]
    fn at_sixty_per_minute_one_slow_second_lets_a_sixty_first_through() {
        let l = RateLimiter::per_minute(60);
        let t0 = Instant::now();
        let step = Duration::from_millis(1100) / 60;
        let allowed = (0..61u32)
            .filter(|i| l.check_at("a", t0 + step * *i) == Decision::Allow)
            .count();
        assert_eq!(allowed, 61);
    }

    /// What the end-to-end test sees at RPM 2, whatever the machine's speed within
    /// 30 s: a burst of two, then one request per 30 s.
    #[test]
    fn two_per_minute_allows_two_then_one_per_thirty_seconds() {
        let l = RateLimiter::per_minute(2);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(l.check_at("a", at(0)), Decision::Allow);
        assert_eq!(l.check_at("a", at(5_000)), Decision::Allow);
        assert_eq!(
            l.check_at("a", at(10_000)),
            Decision::Deny {
                retry_after: Duration::from_secs(20)
            }
        );
        assert!(matches!(l.check_at("a", at(29_999)), Decision::Deny { .. }));
        assert_eq!(l.check_at("b", at(29_999)), Decision::Allow);
        assert_eq!(l.check_at("a", at(30_000)), Decision::Allow);
        assert!(matches!(l.check_at("a", at(30_000)), Decision::Deny { .. }));
    }
}
