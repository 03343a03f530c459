//! Time, behind a trait so that tests drive it by hand.
//!
//! The engine reads the time only through [`Clock`]: attempt deadlines, retry
//! backoffs and approval timeouts are journaled as absolute Unix milliseconds and
//! waited for with [`Clock::sleep_until`], so a restarted engine resumes them against
//! the same clock and a test advances a [`FakeClock`] instead of sleeping.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock time in Unix milliseconds, and waiting for a moment in it.
pub trait Clock: Send + Sync + 'static {
    /// Now, in Unix milliseconds.
    fn now_ms(&self) -> u64;
    /// Completes once [`Clock::now_ms`] has reached `ms` (at once if it has).
    fn sleep_until(&self, ms: u64) -> impl Future<Output = ()> + Send;
}

/// The real clock: system time, tokio timers (needs a runtime with time enabled).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    async fn sleep_until(&self, ms: u64) {
        // Loop: the wall clock can be stepped while tokio's monotonic timer runs.
        loop {
            let now = self.now_ms();
            if now >= ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(ms - now)).await;
        }
    }
}

/// A clock that moves only when told to ([`FakeClock::advance`]). Clones share it.
#[derive(Debug, Clone)]
pub struct FakeClock {
    inner: Arc<FakeInner>,
}

#[derive(Debug)]
struct FakeInner {
    now: AtomicU64,
    sleepers: Mutex<Sleepers>,
}

#[derive(Debug, Default)]
struct Sleepers {
    next_id: u64,
    /// id → (deadline, waker) of every pending sleep that has been polled.
    waiting: BTreeMap<u64, (u64, Waker)>,
}

impl FakeInner {
    fn sleepers(&self) -> MutexGuard<'_, Sleepers> {
        self.sleepers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl FakeClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: u64) -> Self {
        Self {
            inner: Arc::new(FakeInner {
                now: AtomicU64::new(start_ms),
                sleepers: Mutex::new(Sleepers::default()),
            }),
        }
    }

    /// Moves the clock forward by `d`, waking every sleep whose moment has come.
    pub fn advance(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.set(self.now_ms().saturating_add(ms));
    }

    /// Moves the clock to `ms` (never backwards), waking every sleep whose moment has come.
    pub fn set(&self, ms: u64) {
        let wake: Vec<Waker> = {
            let s = self.inner.sleepers();
            let now = self.inner.now.fetch_max(ms, Ordering::SeqCst).max(ms);
            s.waiting
                .values()
                .filter(|(d, _)| *d <= now)
                .map(|(_, w)| w.clone())
                .collect()
        };
        for w in wake {
            w.wake();
        }
    }

    /// How many sleeps are waiting for a moment still ahead.
    pub fn sleepers(&self) -> usize {
        let now = self.now_ms();
        self.inner
            .sleepers()
            .waiting
            .values()
            .filter(|(d, _)| *d > now)
            .count()
    }

    /// The earliest moment a pending sleep waits for.
    pub fn next_deadline(&self) -> Option<u64> {
        let now = self.now_ms();
        self.inner
            .sleepers()
            .waiting
            .values()
            .map(|(d, _)| *d)
            .filter(|d| *d > now)
            .min()
    }

    /// Every moment pending sleeps wait for, earliest first.
    pub fn deadlines(&self) -> Vec<u64> {
        let now = self.now_ms();
        let mut v: Vec<u64> = self
            .inner
            .sleepers()
            .waiting
            .values()
            .map(|(d, _)| *d)
            .filter(|d| *d > now)
            .collect();
        v.sort_unstable();
        v
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.inner.now.load(Ordering::SeqCst)
    }

    fn sleep_until(&self, ms: u64) -> impl Future<Output = ()> + Send {
        FakeSleep {
            inner: self.inner.clone(),
            deadline: ms,
            id: None,
        }
    }
}

struct FakeSleep {
    inner: Arc<FakeInner>,
    deadline: u64,
    id: Option<u64>,
}

impl Future for FakeSleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        // Checked under the lock that `set` holds while it reads the waiters: a wake
        // cannot fall between the check and the registration.
        let mut s = this.inner.sleepers();
        if this.inner.now.load(Ordering::SeqCst) >= this.deadline {
            if let Some(id) = this.id.take() {
                s.waiting.remove(&id);
            }
            return Poll::Ready(());
        }
        let id = match this.id {
            Some(id) => id,
            None => {
                s.next_id += 1;
                let id = s.next_id;
                this.id = Some(id);
                id
            }
        };
        s.waiting.insert(id, (this.deadline, cx.waker().clone()));
        Poll::Pending
    }
}

impl Drop for FakeSleep {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.inner.sleepers().waiting.remove(&id);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fake_clock_wakes_sleepers_in_order() {
        let c = FakeClock::new(1_000);
        let c2 = c.clone();
        let h = tokio::spawn(async move {
            c2.sleep_until(1_500).await;
            c2.now_ms()
        });
        while c.sleepers() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(c.next_deadline(), Some(1_500));
        c.advance(Duration::from_millis(499));
        tokio::task::yield_now().await;
        assert!(!h.is_finished());
        c.advance(Duration::from_millis(1));
        assert_eq!(h.await.unwrap(), 1_500);
        assert_eq!(c.sleepers(), 0);
        // Already past: immediate.
        c.sleep_until(10).await;
        c.set(5);
        assert_eq!(c.now_ms(), 1_500, "never backwards");
    }

    #[tokio::test]
    async fn system_clock_sleeps() {
        let c = SystemClock;
        let t = c.now_ms();
        c.sleep_until(t + 20).await;
        assert!(c.now_ms() >= t + 20);
    }
}
