//! Per-VM quotas of the guests' audit streams.
//!
//! Everything a VM's guest stream makes the recorder write (its syscall events, the
//! alerts they raise, the reports of its gaps and kernel drops) is charged to that VM:
//! a token bucket of events and one of bytes, each refilled at its rate and holding
//! `burst_secs` of it. A message that arrives while either bucket is empty is not
//! written: it is counted, and once a second at most the VM's excess is reported as
//! `guest_drops` lines naming the VM (the reports are charged too).
//!
//! So no guest can make the trail grow faster than its quota, and hence cannot rotate
//! it (and prune the oldest segments, other VMs' history in them) faster than that: a
//! single flooding guest needs at least `(rotate_keep × rotate_bytes − burst) ÷
//! bytes_per_sec` seconds to push an event of another VM out of the kept segments
//! ([`retention_floor`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ingest::StreamInfo;

/// A guest stream's allowance. 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestQuota {
    /// Lines per second.
    pub events_per_sec: u64,
    /// Trail bytes per second.
    pub bytes_per_sec: u64,
    /// Seconds of either rate a quiet VM saves up for a burst (at least 1).
    pub burst_secs: u64,
}

impl GuestQuota {
    pub const DEFAULT_EVENTS_PER_SEC: u64 = 2000;
    pub const DEFAULT_BYTES_PER_SEC: u64 = 1 << 20;
    pub const DEFAULT_BURST_SECS: u64 = 10;

    /// Bytes one guest may write at once after a quiet spell.
    pub fn burst_bytes(&self) -> u64 {
        self.bytes_per_sec.saturating_mul(self.burst_secs.max(1))
    }
}

impl Default for GuestQuota {
    fn default() -> Self {
        Self {
            events_per_sec: Self::DEFAULT_EVENTS_PER_SEC,
            bytes_per_sec: Self::DEFAULT_BYTES_PER_SEC,
            burst_secs: Self::DEFAULT_BURST_SECS,
        }
    }
}

/// How long another VM's event stays in the kept segments against one guest writing
/// at its byte quota (`None`: no byte quota or no rotation, so no such bound).
pub fn retention_floor(q: &GuestQuota, rotate_bytes: u64, rotate_keep: usize) -> Option<Duration> {
    if q.bytes_per_sec == 0 || rotate_bytes == 0 {
        return None;
    }
    let kept = rotate_bytes.saturating_mul(rotate_keep as u64);
    Some(Duration::from_secs(
        kept.saturating_sub(q.burst_bytes()) / q.bytes_per_sec,
    ))
}

/// How often at most a VM's held excess is reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    rate: f64,
    cap: f64,
}

impl Bucket {
    fn new(rate: u64, burst_secs: u64) -> Self {
        let rate = rate as f64;
        let cap = rate * burst_secs.max(1) as f64;
        Self {
            tokens: cap,
            rate,
            cap,
        }
    }

    fn unlimited(&self) -> bool {
        self.rate == 0.0
    }

    fn refill(&mut self, secs: f64) {
        self.tokens = (self.tokens + self.rate * secs).min(self.cap);
    }

    fn has(&self, n: f64) -> bool {
        self.unlimited() || self.tokens >= n
    }

    /// May go below zero: what was written is paid for by what comes next.
    fn take(&mut self, n: f64) {
        if !self.unlimited() {
            self.tokens -= n;
        }
    }
}

/// What a VM's stream lost to its quota and has not yet been reported.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Held {
    /// Events not written.
    pub events: u64,
    /// The highest guest sequence number among them (of `stream`'s boot).
    pub last_seq: u64,
    /// Events the stream's sequence numbers showed missing while it was over quota.
    pub lost: u64,
    /// New guest-kernel drops while it was over quota, and the last total.
    pub kernel_new: u64,
    pub kernel_total: Option<u64>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.events == 0 && self.lost == 0 && self.kernel_new == 0
    }
}

#[derive(Debug)]
struct VmQuota {
    events: Bucket,
    bytes: Bucket,
    at: Instant,
    held: Held,
    /// The stream the held excess came from (its latest message).
    stream: Option<Arc<StreamInfo>>,
    /// When the oldest held excess happened.
    held_since: Option<Instant>,
}

/// A report the recorder writes: `held` of `stream`'s VM.
#[derive(Debug)]
pub struct Report {
    pub stream: Arc<StreamInfo>,
    pub held: Held,
}

/// Every VM's buckets, kept by the recorder thread.
#[derive(Debug)]
pub struct Quotas {
    quota: GuestQuota,
    by_vm: HashMap<String, VmQuota>,
}

impl Quotas {
    pub fn new(quota: GuestQuota) -> Self {
        Self {
            quota,
            by_vm: HashMap::new(),
        }
    }

    /// The quota every VM gets.
    pub fn quota(&self) -> GuestQuota {
        self.quota
    }

    fn vm(&mut self, vm: &str, now: Instant) -> &mut VmQuota {
        if !self.by_vm.contains_key(vm) {
            let q = self.quota;
            self.by_vm.insert(
                vm.to_owned(),
                VmQuota {
                    events: Bucket::new(q.events_per_sec, q.burst_secs),
                    bytes: Bucket::new(q.bytes_per_sec, q.burst_secs),
                    at: now,
                    held: Held::default(),
                    stream: None,
                    held_since: None,
                },
            );
        }
        let v = self.by_vm.get_mut(vm).expect("just inserted");
        let secs = now.saturating_duration_since(v.at).as_secs_f64();
        v.events.refill(secs);
        v.bytes.refill(secs);
        v.at = now;
        v
    }

    /// Whether `vm` may have one more line written now.
    pub fn admit(&mut self, vm: &str, now: Instant) -> bool {
        let v = self.vm(vm, now);
        v.events.has(1.0) && v.bytes.has(f64::MIN_POSITIVE)
    }

    /// Charges what was written for `vm`.
    pub fn charge(&mut self, vm: &str, lines: u64, bytes: u64, now: Instant) {
        let v = self.vm(vm, now);
        v.events.take(lines as f64);
        v.bytes.take(bytes as f64);
    }

    /// Holds an excess of `stream`'s VM until it is reported.
    pub fn hold(&mut self, stream: &Arc<StreamInfo>, now: Instant, f: impl FnOnce(&mut Held)) {
        let v = self.vm(&stream.vm, now);
        if v.stream
            .as_ref()
            .is_some_and(|s| s.boot_id != stream.boot_id)
        {
            // A new guest boot: its sequence numbers start over.
            v.held.last_seq = 0;
        }
        v.stream = Some(Arc::clone(stream));
        v.held_since.get_or_insert(now);
        f(&mut v.held);
    }

    /// The held excess due for a report: held for [`REPORT_EVERY`] (or any, `all`).
    pub fn due(&mut self, now: Instant, all: bool) -> Vec<Report> {
        let mut out = Vec::new();
        for v in self.by_vm.values_mut() {
            let due = v
                .held_since
                .is_some_and(|t| all || now.saturating_duration_since(t) >= REPORT_EVERY);
            if !due || v.held.is_empty() {
                continue;
            }
            if let Some(stream) = v.stream.clone() {
                let mut held = std::mem::take(&mut v.held);
                // The next report goes on numbering this boot from where this one ends.
                v.held.last_seq = held.last_seq;
                held.kernel_total = held.kernel_total.filter(|_| held.kernel_new > 0);
                out.push(Report { stream, held });
            }
            v.held_since = None;
        }
        out
    }

    /// Forgets VMs that have nothing held and a full bucket (they would start afresh
    /// the same way), so the map does not keep every VM ever seen.
    pub fn tidy(&mut self, now: Instant) {
        let q = self.quota;
        self.by_vm.retain(|_, v| {
            let idle = now.saturating_duration_since(v.at).as_secs();
            !(v.held.is_empty() && v.held_since.is_none() && idle >= q.burst_secs.max(1) * 2)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(vm: &str, boot: &str) -> Arc<StreamInfo> {
        Arc::new(StreamInfo {
            agent: vm.into(),
            vm: vm.into(),
            boot_id: boot.into(),
            clock_offset_ns: 0,
        })
    }

    #[test]
    fn a_vm_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        let q = GuestQuota {
            events_per_sec: 10,
            bytes_per_sec: 1000,
            burst_secs: 2,
        };
        let mut quotas = Quotas::new(q);
        let t0 = Instant::now();
        let mut admitted = 0;
        for _ in 0..100 {
            if quotas.admit("a", t0) {
                quotas.charge("a", 1, 10, t0);
                admitted += 1;
            }
        }
        assert_eq!(admitted, 20, "two seconds of burst");
        assert!(quotas.admit("b", t0), "another VM has its own bucket");
        // Half a second later: five more.
        let t1 = t0 + Duration::from_millis(500);
        let mut more = 0;
        while quotas.admit("a", t1) {
            quotas.charge("a", 1, 10, t1);
            more += 1;
        }
        assert_eq!(more, 5);
        // Bytes bind too: one big line empties the byte bucket.
        let t2 = t1 + Duration::from_secs(10);
        assert!(quotas.admit("a", t2));
        quotas.charge("a", 1, 5000, t2);
        assert!(!quotas.admit("a", t2));
        assert!(quotas.admit("a", t2 + Duration::from_secs(4)));
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let mut quotas = Quotas::new(GuestQuota {
            events_per_sec: 0,
            bytes_per_sec: 0,
            burst_secs: 1,
        });
        let t = Instant::now();
        for _ in 0..10_000 {
            assert!(quotas.admit("a", t));
            quotas.charge("a", 1, 1 << 20, t);
        }
    }

    #[test]
    fn held_excess_is_reported_once_a_second_and_numbered_per_boot() {
        let mut quotas = Quotas::new(GuestQuota::default());
        let t0 = Instant::now();
        let s = stream("a", "b1");
        for seq in 1..=3 {
            quotas.hold(&s, t0, |h| {
                h.events += 1;
                h.last_seq = seq;
            });
        }
        quotas.hold(&s, t0, |h| h.lost += 2);
        assert!(quotas.due(t0, false).is_empty(), "not yet a second");
        let r = quotas.due(t0 + REPORT_EVERY, false);
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].held,
            Held {
                events: 3,
                last_seq: 3,
                lost: 2,
                ..Held::default()
            }
        );
        assert!(quotas.due(t0 + REPORT_EVERY * 5, true).is_empty());
        // A new boot numbers from its own start.
        let s2 = stream("a", "b2");
        quotas.hold(&s2, t0, |h| {
            h.events += 1;
            h.last_seq = h.last_seq.max(1);
        });
        let r = quotas.due(t0, true);
        assert_eq!(
            (r[0].held.last_seq, r[0].stream.boot_id.as_str()),
            (1, "b2")
        );
    }

    #[test]
    fn the_retention_floor_follows_the_byte_quota() {
        let q = GuestQuota {
            events_per_sec: 2000,
            bytes_per_sec: 1 << 20,
            burst_secs: 10,
        };
        assert_eq!(
            retention_floor(&q, 256 << 20, 8),
            Some(Duration::from_secs(2038))
        );
        assert_eq!(retention_floor(&q, 0, 8), None);
        let off = GuestQuota {
            bytes_per_sec: 0,
            ..q
        };
        assert_eq!(retention_floor(&off, 256 << 20, 8), None);
    }
}
