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

/// Per-agent token budgets: tokens per rolling minute and per UTC day, charged with
/// what the upstream reported after each request. A request is refused while the
/// agent is at or over a budget, until the window lets it back in.
#[derive(Debug)]
pub struct TokenBudgets {
    per_minute: Option<u64>,
    per_day: Option<u64>,
    total: Option<u64>,
    spend: Mutex<HashMap<String, Spend>>,
}

#[derive(Debug, Default)]
struct Spend {
    /// (when, tokens) within the last minute.
    minute: std::collections::VecDeque<(Instant, u64)>,
    day: u64,
    day_tokens: u64,
    all_tokens: u64,
}

const DAY_MS: u64 = 86_400_000;

impl TokenBudgets {
    /// `0` disables a budget. `day_so_far` and `all_so_far` seed today's and the total
    /// spend (from the ledger), so a restart does not reset them.
    pub fn new(
        per_minute: u64,
        per_day: u64,
        total: u64,
        day_so_far: HashMap<String, u64>,
        all_so_far: HashMap<String, u64>,
        now_ms: u64,
    ) -> Self {
        let day = now_ms / DAY_MS;
        let mut spend: HashMap<String, Spend> = HashMap::new();
        for (a, t) in all_so_far {
            spend.entry(a).or_default().all_tokens = t;
        }
        for (a, t) in day_so_far {
            let s = spend.entry(a).or_default();
            s.day = day;
            s.day_tokens = t;
        }
        Self {
            per_minute: (per_minute > 0).then_some(per_minute),
            per_day: (per_day > 0).then_some(per_day),
            total: (total > 0).then_some(total),
            spend: Mutex::new(spend),
        }
    }

    /// Whether `agent` may send a request now.
    pub fn check(&self, agent: &str, now: Instant, now_ms: u64) -> Decision {
        let mut map = self.spend.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = map.get_mut(agent) else {
            return Decision::Allow;
        };
        if s.day != now_ms / DAY_MS {
            s.day = now_ms / DAY_MS;
            s.day_tokens = 0;
        }
        if let Some(limit) = self.total
            && s.all_tokens >= limit
        {
            // A total budget does not come back by itself: an operator raises it.
            return Decision::Deny {
                retry_after: Duration::from_secs(86_400),
            };
        }
        if let Some(limit) = self.per_day
            && s.day_tokens >= limit
        {
            let until_midnight = DAY_MS - now_ms % DAY_MS;
            return Decision::Deny {
                retry_after: Duration::from_millis(until_midnight),
            };
        }
        while s
            .minute
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= Duration::from_secs(60))
        {
            s.minute.pop_front();
        }
        if let Some(limit) = self.per_minute {
            let used: u64 = s.minute.iter().map(|(_, n)| n).sum();
            if used >= limit {
                let oldest = s.minute.front().map_or(now, |(t, _)| *t);
                let wait = Duration::from_secs(60).saturating_sub(now.duration_since(oldest));
                return Decision::Deny {
                    retry_after: wait.max(Duration::from_millis(1)),
                };
            }
        }
        Decision::Allow
    }

    /// Charges a finished request.
    pub fn charge(&self, agent: &str, tokens: u64, now: Instant, now_ms: u64) {
        if tokens == 0
            || (self.per_minute.is_none() && self.per_day.is_none() && self.total.is_none())
        {
            return;
        }
        let mut map = self.spend.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.entry(agent.to_owned()).or_default();
        if s.day != now_ms / DAY_MS {
            s.day = now_ms / DAY_MS;
            s.day_tokens = 0;
        }
        s.day_tokens += tokens;
        s.all_tokens += tokens;
        s.minute.push_back((now, tokens));
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

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn per_minute_budget_refuses_until_the_window_moves() {
        let b = TokenBudgets::new(100, 0, 0, HashMap::new(), HashMap::new(), 0);
        let t0 = Instant::now();
        assert_eq!(b.check("a", t0, 0), Decision::Allow);
        b.charge("a", 60, t0, 0);
        assert_eq!(b.check("a", t0, 0), Decision::Allow, "60 < 100");
        b.charge("a", 60, t0, 0);
        assert!(
            matches!(b.check("a", t0, 0), Decision::Deny { .. }),
            "120 >= 100"
        );
        assert_eq!(b.check("other", t0, 0), Decision::Allow);
        assert_eq!(
            b.check("a", t0 + Duration::from_secs(61), 61_000),
            Decision::Allow
        );
    }

    #[test]
    fn daily_budget_survives_a_restart_and_resets_at_midnight() {
        let noon = 10 * DAY_MS + DAY_MS / 2;
        let b = TokenBudgets::new(
            0,
            1000,
            0,
            HashMap::from([("a".to_owned(), 1000)]),
            HashMap::new(),
            noon,
        );
        let t = Instant::now();
        match b.check("a", t, noon) {
            Decision::Deny { retry_after } => {
                assert_eq!(retry_after, Duration::from_millis(DAY_MS / 2))
            }
            d => panic!("{d:?}"),
        }
        assert_eq!(b.check("a", t, 11 * DAY_MS), Decision::Allow, "a new day");
    }

    #[test]
    fn total_budget_does_not_reset() {
        let b = TokenBudgets::new(
            0,
            0,
            50,
            HashMap::new(),
            HashMap::from([("a".to_owned(), 40)]),
            0,
        );
        let t = Instant::now();
        assert_eq!(b.check("a", t, 0), Decision::Allow);
        b.charge("a", 10, t, 0);
        assert!(matches!(b.check("a", t, 0), Decision::Deny { .. }));
        assert!(matches!(
            b.check("a", t + Duration::from_secs(3 * 86_400), 3 * DAY_MS),
            Decision::Deny { .. }
        ));
    }
}
