//! Per-agent limits: the request rate and requests in flight (GCRA and a counter
//! shared with skill-manager, [`clawos_service::limits`]) and token budgets.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use clawos_service::limits::{Decision, InFlight, RateLimiter};

/// Per-agent token budgets: tokens per rolling minute, per UTC day and in total.
///
/// A request is admitted only if its largest possible cost (the caller's estimate:
/// input + `max_tokens`) fits every window on top of what was spent and what requests
/// in flight have reserved; the reservation is replaced by what the upstream reported
/// when the request ends ([`TokenBudgets::settle`]). So concurrent requests can never
/// spend more than a budget together, as long as the upstream reports no more than
/// the reservation.
///
/// A caller's credential may carry a total budget of its own (a VM's agent token with
/// the scope `clawos.budget.total:<N>`, [`TokenBudgets::reserve_within`]): the agent's
/// total is then the smaller of the configured one and `N`, counted and reserved the
/// same way, and a refusal names [`VM_TOTAL`] when `N` is the one that binds. Every
/// agent's all-time spend is kept (seeded from the ledger), whether budgets are
/// configured or not, so such a budget counts what was spent before it was seen.
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
    /// Reserved by requests in flight.
    reserved: u64,
}

/// A request's reservation, given back with [`TokenBudgets::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// Tokens reserved.
    pub tokens: u64,
    /// The UTC day (days since the epoch) the request began on; its tokens count there,
    /// like its ledger row.
    day: u64,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetRefusal {
    /// Not now: the window of `limit` tokens has `left` free (after reservations in
    /// flight).
    Wait {
        window: &'static str,
        limit: u64,
        left: u64,
        retry_after: Duration,
    },
    /// Never: the request alone may cost more than the whole budget.
    TooLarge { window: &'static str, limit: u64 },
}

/// The window of a total budget the caller's credential carries (a VM's
/// `clawos.budget.total` scope), when it is smaller than the configured total.
pub const VM_TOTAL: &str = "VM total";

const DAY_MS: u64 = 86_400_000;
/// Retry hint when only other requests' reservations are in the way.
const IN_FLIGHT_RETRY: Duration = Duration::from_secs(1);

impl Spend {
    fn roll(&mut self, now: Instant, now_ms: u64) {
        if self.day != now_ms / DAY_MS {
            self.day = now_ms / DAY_MS;
            self.day_tokens = 0;
        }
        while self
            .minute
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.minute.pop_front();
        }
    }
}

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

    /// Whether any budget is set.
    pub fn enabled(&self) -> bool {
        self.per_minute.is_some() || self.per_day.is_some() || self.total.is_some()
    }

    /// Reserves `tokens` for one request of `agent`, or refuses.
    pub fn reserve(
        &self,
        agent: &str,
        tokens: u64,
        now: Instant,
        now_ms: u64,
    ) -> Result<Ticket, BudgetRefusal> {
        self.reserve_within(agent, tokens, None, now, now_ms)
    }

    /// [`TokenBudgets::reserve`] for a caller whose credential carries a total budget
    /// of `vm_total` tokens: the agent's total is the smaller of it and the configured
    /// one.
    pub fn reserve_within(
        &self,
        agent: &str,
        tokens: u64,
        vm_total: Option<u64>,
        now: Instant,
        now_ms: u64,
    ) -> Result<Ticket, BudgetRefusal> {
        let day = now_ms / DAY_MS;
        if !self.enabled() && vm_total.is_none() {
            return Ok(Ticket { tokens: 0, day });
        }
        let (total, total_window) = match (self.total, vm_total) {
            (Some(t), Some(v)) if t < v => (Some(t), "total"),
            (_, Some(v)) => (Some(v), VM_TOTAL),
            (t, None) => (t, "total"),
        };
        for (limit, window) in [
            (self.per_minute, "per-minute"),
            (self.per_day, "per-day"),
            (total, total_window),
        ] {
            if let Some(limit) = limit
                && tokens > limit
            {
                return Err(BudgetRefusal::TooLarge { window, limit });
            }
        }
        let mut map = self.spend.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.entry(agent.to_owned()).or_default();
        s.roll(now, now_ms);
        let wait = |used: u64, limit: u64, window, later: Duration| {
            let left = limit.saturating_sub(used + s.reserved);
            // Only reservations in the way: they end soon.
            let retry_after = if used + tokens <= limit {
                IN_FLIGHT_RETRY
            } else {
                later
            };
            BudgetRefusal::Wait {
                window,
                limit,
                left,
                retry_after,
            }
        };
        if let Some(limit) = total
            && s.all_tokens + s.reserved + tokens > limit
        {
            // A total budget does not come back by itself: an operator raises it (or,
            // for a VM's, starts the VM with a new one).
            return Err(wait(
                s.all_tokens,
                limit,
                total_window,
                Duration::from_secs(86_400),
            ));
        }
        if let Some(limit) = self.per_day
            && s.day_tokens + s.reserved + tokens > limit
        {
            let until_midnight = Duration::from_millis(DAY_MS - now_ms % DAY_MS);
            return Err(wait(s.day_tokens, limit, "per-day", until_midnight));
        }
        if let Some(limit) = self.per_minute {
            let used: u64 = s.minute.iter().map(|(_, n)| n).sum();
            if used + s.reserved + tokens > limit {
                // When enough of the minute's spend has aged out for this to fit.
                let mut freed = 0;
                let mut at = now;
                for (t, n) in &s.minute {
                    freed += n;
                    at = *t;
                    if used - freed + s.reserved + tokens <= limit {
                        break;
                    }
                }
                let later = Duration::from_secs(60)
                    .saturating_sub(now.duration_since(at))
                    .max(Duration::from_millis(1));
                return Err(wait(used, limit, "per-minute", later));
            }
        }
        s.reserved += tokens;
        Ok(Ticket { tokens, day })
    }

    /// Ends a request: its reservation is released and `charged` tokens (what the
    /// upstream reported) are spent.
    pub fn settle(&self, agent: &str, ticket: Ticket, charged: u64, now: Instant, now_ms: u64) {
        if ticket.tokens == 0 && charged == 0 {
            return;
        }
        let mut map = self.spend.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.entry(agent.to_owned()).or_default();
        s.reserved = s.reserved.saturating_sub(ticket.tokens);
        if charged == 0 {
            return;
        }
        // Kept for every agent: a credential carrying a budget may come at any time.
        s.all_tokens += charged;
        if !self.enabled() {
            return;
        }
        s.roll(now, now_ms);
        if ticket.day == s.day {
            s.day_tokens += charged;
        }
        s.minute.push_back((now, charged));
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    fn ok(r: Result<Ticket, BudgetRefusal>) -> Ticket {
        r.unwrap_or_else(|e| panic!("refused: {e:?}"))
    }

    #[test]
    fn per_minute_budget_refuses_until_the_window_moves() {
        let b = TokenBudgets::new(100, 0, 0, HashMap::new(), HashMap::new(), 0);
        let t0 = Instant::now();
        let r = ok(b.reserve("a", 40, t0, 0));
        b.settle("a", r, 60, t0, 0);
        let r = ok(b.reserve("a", 40, t0, 0));
        b.settle("a", r, 30, t0, 0);
        // 90 spent: 20 more does not fit, 10 does.
        match b.reserve("a", 20, t0, 0) {
            Err(BudgetRefusal::Wait {
                window: "per-minute",
                limit: 100,
                left: 10,
                retry_after,
            }) => assert_eq!(retry_after, Duration::from_secs(60)),
            r => panic!("{r:?}"),
        }
        assert!(b.reserve("other", 100, t0, 0).is_ok());
        let t1 = t0 + Duration::from_secs(61);
        assert!(b.reserve("a", 100, t1, 61_000).is_ok());
    }

    #[test]
    fn concurrent_reservations_never_sum_past_the_budget() {
        let b = TokenBudgets::new(0, 1000, 0, HashMap::new(), HashMap::new(), 0);
        let t = Instant::now();
        let tickets: Vec<Ticket> = (0..40)
            .filter_map(|_| b.reserve("a", 300, t, 0).ok())
            .collect();
        assert_eq!(tickets.len(), 3, "3 × 300 fit in 1000, a fourth does not");
        match b.reserve("a", 300, t, 0) {
            Err(BudgetRefusal::Wait {
                retry_after, left, ..
            }) => {
                assert_eq!(left, 100);
                assert_eq!(
                    retry_after, IN_FLIGHT_RETRY,
                    "only reservations are in the way"
                );
            }
            r => panic!("{r:?}"),
        }
        // Each used 104: the reservations come back.
        for tk in tickets {
            b.settle("a", tk, 104, t, 0);
        }
        assert!(b.reserve("a", 600, t, 0).is_ok());
        assert!(matches!(
            b.reserve("a", 2000, t, 0),
            Err(BudgetRefusal::TooLarge {
                window: "per-day",
                limit: 1000
            })
        ));
    }

    #[test]
    fn a_failed_request_gives_its_reservation_back() {
        let b = TokenBudgets::new(0, 100, 0, HashMap::new(), HashMap::new(), 0);
        let t = Instant::now();
        let r = ok(b.reserve("a", 100, t, 0));
        assert!(b.reserve("a", 1, t, 0).is_err());
        b.settle("a", r, 0, t, 0);
        assert!(b.reserve("a", 100, t, 0).is_ok());
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
        match b.reserve("a", 1, t, noon) {
            Err(BudgetRefusal::Wait { retry_after, .. }) => {
                assert_eq!(retry_after, Duration::from_millis(DAY_MS / 2))
            }
            d => panic!("{d:?}"),
        }
        assert!(b.reserve("a", 1000, t, 11 * DAY_MS).is_ok(), "a new day");
    }

    #[test]
    fn a_request_that_began_yesterday_is_charged_to_yesterday() {
        let b = TokenBudgets::new(0, 100, 0, HashMap::new(), HashMap::new(), 0);
        let t = Instant::now();
        let r = ok(b.reserve("a", 50, t, DAY_MS - 1));
        b.settle("a", r, 50, t, DAY_MS + 1);
        assert!(b.reserve("a", 100, t, DAY_MS + 2).is_ok());
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
        let r = ok(b.reserve("a", 10, t, 0));
        b.settle("a", r, 10, t, 0);
        assert!(matches!(
            b.reserve("a", 1, t, 0),
            Err(BudgetRefusal::Wait {
                window: "total",
                ..
            })
        ));
        assert!(
            b.reserve("a", 1, t + Duration::from_secs(3 * 86_400), 3 * DAY_MS)
                .is_err()
        );
    }

    #[test]
    fn a_vm_budget_is_a_total_for_its_agent_alone_with_the_same_reservations() {
        // No configured budget at all: only the token's.
        let b = TokenBudgets::new(0, 0, 0, HashMap::new(), HashMap::new(), 0);
        assert!(!b.enabled());
        let t = Instant::now();
        let vm = Some(300);
        // Concurrent reservations never sum past it.
        let tickets: Vec<Ticket> = (0..10)
            .filter_map(|_| b.reserve_within("a", 100, vm, t, 0).ok())
            .collect();
        assert_eq!(tickets.len(), 3);
        match b.reserve_within("a", 100, vm, t, 0) {
            Err(BudgetRefusal::Wait {
                window: VM_TOTAL,
                limit: 300,
                left: 0,
                retry_after,
            }) => assert_eq!(retry_after, IN_FLIGHT_RETRY, "only reservations in the way"),
            r => panic!("{r:?}"),
        }
        // The same agent without the budget, and another agent, are not held by it.
        assert_eq!(b.reserve("a", 10_000, t, 0).map(|t| t.tokens), Ok(0));
        assert!(b.reserve_within("b", 300, vm, t, 0).is_ok());
        // Settled at what was used; then spent is spent.
        for tk in tickets {
            b.settle("a", tk, 90, t, 0);
        }
        let r = ok(b.reserve_within("a", 30, vm, t, 0));
        b.settle("a", r, 30, t, 0);
        match b.reserve_within("a", 1, vm, t + Duration::from_secs(3 * 86_400), 3 * DAY_MS) {
            Err(BudgetRefusal::Wait {
                window: VM_TOTAL,
                limit: 300,
                left: 0,
                retry_after,
            }) => assert_eq!(retry_after, Duration::from_secs(86_400)),
            r => panic!("it does not come back: {r:?}"),
        }
        // A request that can never fit is told so.
        assert_eq!(
            b.reserve_within("c", 301, vm, t, 0),
            Err(BudgetRefusal::TooLarge {
                window: VM_TOTAL,
                limit: 300
            })
        );
    }

    #[test]
    fn the_smaller_of_the_configured_and_the_vm_total_applies_and_is_named() {
        let b = TokenBudgets::new(
            0,
            0,
            1000,
            HashMap::new(),
            HashMap::from([("a".to_owned(), 900)]),
            0,
        );
        let t = Instant::now();
        // The VM's 5,000 is above the configured 1,000: the configured one binds.
        match b.reserve_within("a", 200, Some(5000), t, 0) {
            Err(BudgetRefusal::Wait {
                window: "total",
                limit: 1000,
                left: 100,
                ..
            }) => {}
            r => panic!("{r:?}"),
        }
        // The VM's 950 is below: it binds, counting what was spent before it was seen.
        match b.reserve_within("a", 60, Some(950), t, 0) {
            Err(BudgetRefusal::Wait {
                window: VM_TOTAL,
                limit: 950,
                left: 50,
                ..
            }) => {}
            r => panic!("{r:?}"),
        }
        assert!(b.reserve_within("a", 50, Some(950), t, 0).is_ok());
        assert_eq!(
            b.reserve_within("z", 1001, Some(2000), t, 0),
            Err(BudgetRefusal::TooLarge {
                window: "total",
                limit: 1000
            })
        );
    }

    #[test]
    fn spend_without_budgets_is_still_counted_for_a_budget_seen_later() {
        // Seeded from the ledger, and spent since without any budget on.
        let b = TokenBudgets::new(
            0,
            0,
            0,
            HashMap::new(),
            HashMap::from([("a".to_owned(), 100)]),
            0,
        );
        let t = Instant::now();
        let r = ok(b.reserve("a", 50, t, 0));
        assert_eq!(r.tokens, 0, "no budget: nothing reserved");
        b.settle("a", r, 150, t, 0);
        match b.reserve_within("a", 60, Some(300), t, 0) {
            Err(BudgetRefusal::Wait {
                window: VM_TOTAL,
                left: 50,
                ..
            }) => {}
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn in_flight_cap_per_agent() {
        let f = InFlight::new(2);
        assert!(f.try_acquire("a") && f.try_acquire("a"));
        assert!(!f.try_acquire("a"));
        assert!(f.try_acquire("b"));
        f.release("a");
        assert!(f.try_acquire("a"));
    }
}
