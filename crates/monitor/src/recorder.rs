//! The recorder: one thread that owns the JSONL trail. It turns the kernel's records
//! and the guests' streams into numbered lines, adds alerts and drop reports, flushes
//! once per batch (then acknowledges guest events and rotates the live file), and at
//! start repairs a torn last line and numbers on from where the trail ends.

use std::cell::RefCell;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clawos_service::metrics::Counter;

use crate::daemon::{Config, DaemonError, Monitor};
use crate::event::{AuditEvent, Clock, Kind, RawEvent, c_str, syscall_name};
use crate::ingest::{Ack, GuestBody, GuestMessage, GuestStreams, StreamInfo, Verdict};
use crate::probe::{self, Maps};
use crate::quota::Quotas;
use crate::rules::Rules;
use crate::skills::SkillTrail;
use crate::trail;
use crate::watches::Labels;
use clawos_monitor_api::SourcePlace;

/// The recorder's counters in `/metrics`.
#[derive(Debug, Clone)]
pub(crate) struct Counters {
    events: Counter,
    alerts: Counter,
    kernel_drops: Counter,
    /// Syscall events recorded inside VMs.
    guest_events: Counter,
    /// Guest events that never arrived (guest ring, queue or connection).
    guest_lost: Counter,
    /// Re-sent guest events skipped.
    guest_resent: Counter,
    /// Guest events not written because their VM was over its quota.
    guest_quota_dropped: Counter,
    /// Skill calls followed from skill-manager's trail.
    skill_calls: Counter,
    /// Lines of skill-manager's trail that were no records.
    skill_unreadable: Counter,
}

impl Counters {
    pub(crate) fn register(m: &mut clawos_service::Metrics) -> Self {
        Self {
            events: m.counter(
                "clawos_monitor_events_total",
                "Audit events written (syscalls and alerts).",
            ),
            alerts: m.counter("clawos_monitor_alerts_total", "Rule matches."),
            kernel_drops: m.counter(
                "clawos_monitor_kernel_drops_total",
                "Events lost because the ring buffer was full.",
            ),
            guest_events: m.counter(
                "clawos_monitor_guest_events_total",
                "Syscall events recorded inside VMs and received from their guests.",
            ),
            guest_lost: m.counter(
                "clawos_monitor_guest_lost_total",
                "Guest events that never reached the host (reported as guest_drops).",
            ),
            guest_resent: m.counter(
                "clawos_monitor_guest_resent_total",
                "Guest events sent again after a reconnect and skipped.",
            ),
            guest_quota_dropped: m.counter(
                "clawos_monitor_guest_quota_dropped_total",
                "Guest events not recorded because their VM was over its quota (reported as guest_drops).",
            ),
            skill_calls: m.counter(
                "clawos_monitor_skill_calls_total",
                "Skill calls recorded from skill-manager's audit trail.",
            ),
            skill_unreadable: m.counter(
                "clawos_monitor_skill_records_unreadable_total",
                "Lines of skill-manager's audit trail that were no skill call records (recorded as such).",
            ),
        }
    }
}

/// What the recorder drains after each batch of kernel records.
#[derive(Debug)]
pub(crate) struct Feeds {
    /// Messages of the guests' audit streams.
    pub guests: tokio::sync::mpsc::Receiver<GuestMessage>,
    /// Lines the SIEM forwarders had to skip (a `forward_drops` line each).
    pub forward_drops: Receiver<u64>,
}

/// Cuts a last line the previous run did not finish (it was killed mid-write), so the
/// next line does not run into it. Nothing in it was acknowledged to a guest, which
/// sends it again.
fn drop_torn_tail(path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    else {
        return Ok(());
    };
    let len = f.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        tracing::warn!(path = %path.display(), bytes = len - end, "cutting an unfinished last line");
        f.set_len(end)?;
    }
    Ok(())
}

/// Where an existing trail stands: its last sequence number (0 if none), where each
/// VM's guest stream stood, and the place of the last skill call record followed.
#[derive(Default)]
struct Replayed {
    last: u64,
    guests: GuestStreams,
    skill_place: Option<SourcePlace>,
}

/// Reads where an existing trail stands ([`Replayed`]).
///
/// It reads the newest closed segment and the live file: right after a rotation the
/// live file is empty, and the numbering must go on from the segment.
fn replay_trail(path: &Path) -> Replayed {
    let mut guests = GuestStreams::default();
    let mut last = 0;
    let mut skill_place = None;
    for p in trail::recent(path) {
        let Ok(f) = std::fs::File::open(p) else {
            continue;
        };
        for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
            if let Ok(e) = serde_json::from_str::<AuditEvent>(&line) {
                last = e.seq;
                guests.replay(&e);
                if e.kind == Kind::SkillCall && e.source.is_some() {
                    skill_place = e.source;
                }
            }
        }
    }
    Replayed {
        last,
        guests,
        skill_place,
    }
}

/// Where the last skill call record followed ends, kept beside the trail after each
/// flush that wrote one: the trail's own lines say it too, but the newest segments
/// may hold none once calls are rare.
fn skill_place_file(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("monitor/skills.place")
}

fn load_skill_place(path: &Path) -> Option<SourcePlace> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn save_skill_place(path: &Path, place: SourcePlace) {
    let tmp = path.with_extension("place.tmp");
    let saved = serde_json::to_vec(&place)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = saved {
        tracing::warn!(path = %path.display(), error = %e, "cannot save the place in skill-manager's audit trail");
    }
}

/// Why guest events never arrived: a gap in the sequence numbers.
const LOST_DETAIL: &str = "guest queue full or connection lost while the host was away";
/// Why guest events never arrived: the guest kernel's ring buffer.
const KERNEL_DETAIL: &str = "guest ring buffer full";

/// Guest messages taken per batch at most: a flood cannot keep the recorder from
/// flushing, acknowledging and draining the kernel's ring buffer.
const GUEST_BATCH: usize = 16 * 1024;

/// Turns kernel records and guest streams into JSONL lines.
pub(crate) struct Recorder {
    out: BufWriter<std::fs::File>,
    seq: u64,
    host: String,
    clock: Clock,
    rules: Rules,
    labels: Labels,
    reported_drops: u64,
    guests: GuestStreams,
    /// Each VM's quota, and what it held back.
    quotas: Quotas,
    /// When to forget the quotas of quiet VMs next.
    next_tidy: Instant,
    /// Guest events judged since the last flush: acknowledged after it.
    pending_acks: Vec<(Ack, u64)>,
    jsonl: PathBuf,
    live_bytes: u64,
    rotate_bytes: u64,
    rotate_keep: usize,
    counters: Counters,
    /// skill-manager's audit trail, followed.
    skills: Option<SkillTrail>,
    /// Where the last skill record written ends, once flushed: saved to `skill_place_file`.
    skill_place: (Option<SourcePlace>, PathBuf),
}

/// Opens (creates, 0600) the live trail file for appending.
fn open_trail(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

impl Recorder {
    fn write(&mut self, e: &AuditEvent) {
        if let Ok(line) = serde_json::to_string(e) {
            let _ = self.out.write_all(line.as_bytes());
            let _ = self.out.write_all(b"\n");
            self.live_bytes += line.len() as u64 + 1;
        }
    }

    /// After a flush: rotates the live file once it is big enough, and prunes old
    /// segments (sparing what `readers`, the forwarders' inodes, still need).
    fn maybe_rotate(&mut self, readers: &[u64]) {
        if self.rotate_bytes == 0 || self.live_bytes < self.rotate_bytes {
            return;
        }
        let reopened = trail::rotate(&self.jsonl).and_then(|seg| {
            let f = open_trail(&self.jsonl)?;
            Ok((seg, f))
        });
        match reopened {
            Ok((seg, f)) => {
                self.out = BufWriter::with_capacity(1 << 20, f);
                self.live_bytes = 0;
                tracing::info!(segment = %seg.display(), "audit trail rotated");
                for gone in trail::prune(&self.jsonl, self.rotate_keep, readers) {
                    tracing::info!(segment = %gone.display(), "old audit segment removed");
                }
            }
            Err(e) => {
                // Keep appending to whatever file is open; try again after the next flush.
                tracing::error!(error = %e, path = %self.jsonl.display(), "cannot rotate the audit trail");
            }
        }
    }

    fn next(&mut self, kind: Kind, ts: String) -> AuditEvent {
        self.seq += 1;
        AuditEvent::new(self.seq, ts, &self.host, kind)
    }

    /// A record of the host's probe, labelled by its watch tag.
    fn record(&mut self, raw: &RawEvent) {
        let (agent, vm) = self
            .labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(raw.tag as usize)
            .cloned()
            .unwrap_or_default();
        let ts = self.clock.format(raw.ts_ns);
        let mut e = self.next(Kind::Syscall, ts);
        e.agent = Some(agent).filter(|a| !a.is_empty());
        e.vm = vm;
        self.write_syscall(e, raw);
    }

    /// A `guest_drops` line of `stream`'s VM: `n` events lost (`total`: the guest
    /// kernel's running count).
    fn guest_drops(&mut self, stream: &StreamInfo, n: u64, total: Option<u64>, detail: String) {
        let mut e = self.next(Kind::GuestDrops, Clock::now());
        e.agent = Some(stream.agent.clone());
        e.vm = Some(stream.vm.clone());
        e.guest_boot = Some(stream.boot_id.clone());
        e.dropped = Some(n);
        e.dropped_total = total;
        e.detail = Some(detail);
        self.write(&e);
        self.counters.guest_lost.inc_by(n);
    }

    /// A message of a guest stream: its events go in once each, in order; what never
    /// arrived is reported; what its VM sends beyond its quota is counted, reported
    /// and not written.
    fn record_guest(&mut self, m: GuestMessage, now: Instant) {
        let verdict = self.guests.judge(&m);
        if let GuestBody::Event { seq, .. } = &m.body {
            self.pending_acks.push((m.ack.clone(), *seq));
        }
        let s = &m.stream;
        match verdict {
            Verdict::Duplicate => {
                self.counters.guest_resent.inc();
                return;
            }
            Verdict::Nothing => return,
            _ => {}
        }
        if !self.quotas.admit(&s.vm, now) {
            match (verdict, &m.body) {
                (Verdict::Record { lost }, GuestBody::Event { seq, .. }) => {
                    self.counters.guest_quota_dropped.inc();
                    self.quotas.hold(s, now, |h| {
                        h.events += 1;
                        h.last_seq = *seq;
                        h.lost += lost;
                    });
                }
                (Verdict::KernelDrops { new, total }, _) => {
                    self.quotas.hold(s, now, |h| {
                        h.kernel_new += new;
                        h.kernel_total = Some(total);
                    });
                }
                _ => {}
            }
            return;
        }
        let (lines, bytes) = (self.seq, self.live_bytes);
        match (verdict, &m.body) {
            (Verdict::Record { lost: n }, GuestBody::Event { seq, raw }) => {
                if n > 0 {
                    self.guest_drops(s, n, None, LOST_DETAIL.into());
                }
                let ts = Clock::with_offset(s.clock_offset_ns).format(raw.ts_ns);
                let mut e = self.next(Kind::Syscall, ts);
                e.agent = Some(s.agent.clone());
                e.vm = Some(s.vm.clone());
                e.guest_boot = Some(s.boot_id.clone());
                e.guest_seq = Some(*seq);
                self.write_syscall(e, raw);
                self.counters.guest_events.inc();
            }
            (Verdict::KernelDrops { new, total }, _) => {
                self.guest_drops(s, new, Some(total), KERNEL_DETAIL.into());
            }
            _ => {}
        }
        let (lines, bytes) = (self.seq - lines, self.live_bytes.saturating_sub(bytes));
        self.quotas.charge(&s.vm, lines, bytes, now);
    }

    /// Reports what VMs' quotas held back (each VM once a second at most; everything
    /// when `all`). The reports are charged to the VM too.
    fn report_quotas(&mut self, now: Instant, all: bool) {
        for r in self.quotas.due(now, all) {
            let (s, h) = (&r.stream, &r.held);
            let (lines, bytes) = (self.seq, self.live_bytes);
            if h.events > 0 {
                let q = self.quotas.quota();
                let mut e = self.next(Kind::GuestDrops, Clock::now());
                e.agent = Some(s.agent.clone());
                e.vm = Some(s.vm.clone());
                e.guest_boot = Some(s.boot_id.clone());
                // The last one not recorded: a restarted daemon numbers on after it.
                e.guest_seq = Some(h.last_seq);
                e.dropped = Some(h.events);
                e.detail = Some(format!(
                    "over quota: events not recorded (the VM may write {} events and {} bytes a second, {} s of burst)",
                    q.events_per_sec, q.bytes_per_sec, q.burst_secs
                ));
                self.write(&e);
                tracing::warn!(vm = %s.vm, dropped = h.events, "guest audit stream over its quota");
            }
            if h.lost > 0 {
                self.guest_drops(s, h.lost, None, LOST_DETAIL.into());
            }
            if h.kernel_new > 0 {
                self.guest_drops(s, h.kernel_new, h.kernel_total, KERNEL_DETAIL.into());
            }
            let (lines, bytes) = (self.seq - lines, self.live_bytes.saturating_sub(bytes));
            self.quotas.charge(&s.vm, lines, bytes, now);
        }
    }

    /// Fills in a syscall event from its record, writes it and any alert it raises.
    fn write_syscall(&mut self, mut e: AuditEvent, raw: &RawEvent) {
        let name = syscall_name(raw.nr);
        e.pid = Some(raw.tgid);
        e.tid = Some(raw.tid);
        e.comm = Some(c_str(&raw.comm));
        e.nr = Some(raw.nr);
        e.syscall = Some(name.clone());
        e.args = Some(raw.args);
        e.ret = Some(raw.ret);
        let path = c_str(&raw.path);
        e.path = (!path.is_empty()).then_some(path);
        self.write(&e);
        self.counters.events.inc();
        if let Some((rule, severity)) = self.rules.check(e.agent.as_deref(), &name) {
            let mut a = e.clone();
            self.seq += 1;
            a.seq = self.seq;
            a.kind = Kind::Alert;
            a.rule = Some(rule);
            a.severity = Some(severity);
            self.write(&a);
            self.counters.alerts.inc();
            self.counters.events.inc();
        }
    }

    /// The records skill-manager has added to its trail since the last look.
    fn follow_skills(&mut self, now: Instant) {
        let Some(lines) = self.skills.as_mut().map(|t| t.poll(now)) else {
            return;
        };
        for line in lines {
            self.seq += 1;
            let e = crate::skills::event(line, self.seq, &self.host);
            if e.skill_call.is_some() {
                self.counters.skill_calls.inc();
            } else {
                self.counters.skill_unreadable.inc();
                tracing::warn!(
                    detail = e.detail.as_deref().unwrap_or(""),
                    "unreadable line in skill-manager's audit trail"
                );
            }
            self.skill_place.0 = e.source;
            self.write(&e);
            self.counters.events.inc();
        }
    }

    fn drops(&mut self, total: u64, kind: Kind) {
        let new = match kind {
            Kind::Drops => {
                let new = total.saturating_sub(self.reported_drops);
                self.reported_drops = total;
                self.counters.kernel_drops.inc_by(new);
                new
            }
            _ => total,
        };
        if new == 0 {
            return;
        }
        let mut e = self.next(kind, Clock::now());
        e.dropped = Some(new);
        if kind == Kind::Drops {
            e.dropped_total = Some(total);
        }
        self.write(&e);
    }
}

impl Recorder {
    /// Opens the trail (repairing a torn last line) and reads where it stands.
    pub(crate) fn open(
        cfg: &Config,
        labels: Labels,
        counters: Counters,
    ) -> Result<Self, DaemonError> {
        let io = |source| DaemonError::Io {
            path: cfg.jsonl.clone(),
            source,
        };
        let out = open_trail(&cfg.jsonl).map_err(io)?;
        let live_bytes = out.metadata().map(|m| m.len()).unwrap_or(0);
        drop_torn_tail(&cfg.jsonl).map_err(io)?;
        let Replayed {
            last: seq,
            guests,
            skill_place,
        } = replay_trail(&cfg.jsonl);
        let place_file = skill_place_file(cfg);
        let skill_place = skill_place.or_else(|| load_skill_place(&place_file));
        let skills = cfg.skill_audit.clone().map(|p| {
            tracing::info!(path = %p.display(), from = ?skill_place, "following skill-manager's audit trail");
            SkillTrail::new(p, skill_place, cfg.jsonl.clone())
        });
        Ok(Self {
            skills,
            skill_place: (None, place_file),
            out: BufWriter::with_capacity(1 << 20, out),
            seq,
            guests,
            quotas: Quotas::new(cfg.guest_quota),
            next_tidy: Instant::now(),
            pending_acks: Vec::new(),
            jsonl: cfg.jsonl.clone(),
            live_bytes,
            rotate_bytes: cfg.rotate_bytes,
            rotate_keep: cfg.rotate_keep,
            host: cfg.host.clone(),
            clock: Clock::new(),
            rules: cfg.rules.clone(),
            labels,
            reported_drops: 0,
            counters,
        })
    }

    /// Starts the recorder thread, which loads the eBPF program; returns its maps once
    /// it is attached, and the thread, which ends (flushed) once `stop` is set. The thread creates the maps the [`Monitor`] holds, so it starts
    /// first and finds the Monitor (drop count, forwarders' places) in `monitor` once
    /// that is built; until then it records the kernel's events only.
    pub(crate) fn spawn(
        self,
        ring_bytes: u32,
        mut feeds: Feeds,
        monitor: Arc<OnceLock<Arc<Monitor>>>,
        stop: Arc<AtomicBool>,
    ) -> Result<(Maps, std::thread::JoinHandle<()>), DaemonError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || {
                let rec = RefCell::new(self);
                let result = probe::run(
                    ring_bytes,
                    ready_tx,
                    |data| {
                        if let Some(raw) = RawEvent::parse(data) {
                            rec.borrow_mut().record(&raw);
                        }
                    },
                    || {
                        let stopping = stop.load(Ordering::Relaxed);
                        rec.borrow_mut()
                            .after_batch(monitor.get(), &mut feeds, stopping);
                    },
                    &stop,
                );
                let _ = rec.borrow_mut().out.flush();
                if let Err(e) = result {
                    tracing::error!(error = %e, "recorder stopped");
                }
            })
            .map_err(|source| DaemonError::Io {
                path: "recorder thread".into(),
                source,
            })?;
        let maps = ready_rx
            .recv()
            .map_err(|_| DaemonError::Config("the recorder thread ended during setup".into()))??;
        Ok((maps, thread))
    }

    /// After each drain of the ring buffer: drop reports and guest messages (a
    /// bounded number), quota reports, then a flush, the acknowledgements it makes
    /// safe, and maybe a rotation. `stopping`: the last batch, which reports all that
    /// quotas held back.
    fn after_batch(&mut self, monitor: Option<&Arc<Monitor>>, feeds: &mut Feeds, stopping: bool) {
        if let Some(m) = monitor {
            self.drops(m.watches.maps().drops(), Kind::Drops);
            while let Ok(n) = feeds.forward_drops.try_recv() {
                self.drops(n, Kind::ForwardDrops);
            }
            let now = Instant::now();
            for _ in 0..GUEST_BATCH {
                let Ok(g) = feeds.guests.try_recv() else {
                    break;
                };
                self.record_guest(g, now);
            }
            self.report_quotas(now, stopping);
            self.follow_skills(now);
            if now >= self.next_tidy {
                self.quotas.tidy(now);
                self.next_tidy = now + Duration::from_secs(10);
            }
        }
        if self.out.flush().is_ok() {
            for (ack, seq) in self.pending_acks.drain(..) {
                ack.raise(seq);
            }
            if let Some(place) = self.skill_place.0.take() {
                save_skill_place(&self.skill_place.1, place);
            }
            // Rotation waits until the forwarders exist: pruning must know where each
            // of them reads.
            if let Some(m) = monitor {
                let readers: Vec<u64> = m
                    .forwarders
                    .iter()
                    .map(|(_, s)| s.reading_inode.load(Ordering::Relaxed))
                    .collect();
                self.maybe_rotate(&readers);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unfinished_last_line_is_cut() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("audit.jsonl");
        for (before, after) in [
            ("{\"a\":1}\n{\"b\":", "{\"a\":1}\n"),
            ("{\"a\":1}\n", "{\"a\":1}\n"),
            ("{\"torn", ""),
            ("", ""),
        ] {
            std::fs::write(&p, before).expect("write");
            drop_torn_tail(&p).expect("repair");
            assert_eq!(std::fs::read_to_string(&p).expect("read"), after);
        }
        drop_torn_tail(&d.path().join("missing")).expect("no file is fine");
    }
}
