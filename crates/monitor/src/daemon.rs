//! The daemon: configuration (checked before anything is opened), the recorder thread
//! that turns kernel records into JSONL lines, the syslog forwarders, and the HTTP API
//! (`/v1/watch`, `/v1/events`, `/metrics`) on loopback.
//!
//! | method | path | |
//! |---|---|---|
//! | POST | `/v1/watch` | [`WatchRequest`] → 201: watch a pid (and its children) or a cgroup |
//! | DELETE | `/v1/watch?pid=N` or `?cgroup=PATH` | → 204 |
//! | GET | `/v1/watch` | → the watch list |
//! | GET | `/v1/events?agent=A&after=SEQ&limit=N` | → `[AuditEvent]` from the JSONL trail |
//! | GET | `/metrics`, `/healthz` | Prometheus text; liveness |
//!
//! `/v1/*` needs `Authorization: Bearer <state>/monitor/admin.token`.

use std::cell::RefCell;
use std::io::{BufRead, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

pub use clawos_monitor_api::WatchRequest;

use crate::event::{AuditEvent, Clock, Kind, RawEvent, c_str, syscall_name};
use crate::forward::{self, ForwardConfig, ForwardStats, Target};
use crate::ingest::{GuestBody, GuestMessage, GuestStreams, Verdict};
use crate::probe::{self, Maps};
use crate::rules::Rules;
use crate::trail;

/// Default HTTP address (loopback only).
pub const DEFAULT_ADDR: &str = "127.0.0.1:2084";

/// The daemon's configuration, validated before any socket or map is opened.
#[derive(Debug, Clone)]
pub struct Config {
    pub addr: SocketAddr,
    pub state_dir: PathBuf,
    /// The JSONL audit trail.
    pub jsonl: PathBuf,
    /// This host's name in every event.
    pub host: String,
    /// Kernel ring buffer size (power of two, ≥ 4096).
    pub ring_bytes: u32,
    pub watches: Vec<WatchRequest>,
    pub syslog: Vec<Target>,
    /// CA certificates for `tls://` targets.
    pub syslog_tls: Option<forward::TlsTrust>,
    pub spool_max_bytes: u64,
    pub max_message: usize,
    pub rules: Rules,
    /// Rotate the trail when the live file reaches this many bytes (0: never).
    pub rotate_bytes: u64,
    /// Closed segments kept (older ones go, unless a SIEM forwarder still reads them).
    pub rotate_keep: usize,
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Agent and VM label of each tag (index = tag), shared with the recorder thread.
type Labels = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub events: AtomicU64,
    pub alerts: AtomicU64,
    pub kernel_drops: AtomicU64,
    /// Syscall events recorded inside VMs.
    pub guest_events: AtomicU64,
    /// Guest events that never arrived (guest ring, queue or connection).
    pub guest_lost: AtomicU64,
    /// Re-sent guest events skipped.
    pub guest_resent: AtomicU64,
}

/// A watch and the tag its events carry.
#[derive(Debug, Clone)]
struct Watched {
    req: WatchRequest,
    cgroup_id: Option<u64>,
    /// The process's start time (clock ticks after boot), so a restarted daemon does not
    /// re-watch a reused pid.
    start_time: Option<u64>,
    active: bool,
}

/// A watch as persisted in `watches.json`, re-applied when the daemon restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedWatch {
    req: WatchRequest,
    start_time: Option<u64>,
}

/// Field 22 of `/proc/<pid>/stat`.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    stat[stat.rfind(')')? + 2..]
        .split_ascii_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// State shared by the recorder, forwarders and HTTP handlers.
#[derive(Debug)]
pub struct Monitor {
    maps: Maps,
    /// Index = tag in the kernel maps.
    tags: Mutex<Vec<Watched>>,
    labels: Labels,
    pub metrics: Metrics,
    pub forwarders: Vec<(Target, Arc<ForwardStats>)>,
    jsonl: PathBuf,
    /// Active watches, re-applied after a restart.
    watch_file: PathBuf,
    token: String,
}

impl Monitor {
    /// Adds a watch; returns its tag.
    pub fn watch(&self, req: WatchRequest) -> Result<u32, String> {
        req.check()?;
        let cgroup_id = match &req.cgroup {
            Some(c) => {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(c).map_err(|e| format!("{}: {e}", c.display()))?;
                if !m.is_dir() {
                    return Err(format!("{} is not a cgroup directory", c.display()));
                }
                Some(m.ino())
            }
            None => None,
        };
        if let Some(pid) = req.pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            return Err(format!("no process with pid {pid}"));
        }
        let start_time = req.pid.and_then(process_start_time);
        let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = tags.iter().position(|w| w.active && w.req == req) {
            return Ok(i as u32);
        }
        let tag = tags.len() as u32;
        self.labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((req.agent.clone(), req.vm.clone()));
        let result = match (req.pid, cgroup_id) {
            (Some(pid), _) => self.maps.watch_pid(pid, tag),
            (None, Some(id)) => self.maps.watch_cgroup(id, tag),
            (None, None) => Ok(()),
        };
        result.map_err(|e| e.to_string())?;
        tracing::info!(agent = %req.agent, vm = ?req.vm, pid = ?req.pid, cgroup = ?req.cgroup, tag, "watching");
        tags.push(Watched {
            req,
            cgroup_id,
            start_time,
            active: true,
        });
        self.save_watches(&tags);
        Ok(tag)
    }

    /// Persists the active watches (atomically; a failure is logged).
    fn save_watches(&self, tags: &[Watched]) {
        let saved: Vec<SavedWatch> = tags
            .iter()
            .filter(|w| w.active)
            .map(|w| SavedWatch {
                req: w.req.clone(),
                start_time: w.start_time,
            })
            .collect();
        let tmp = self.watch_file.with_extension("tmp");
        let result = serde_json::to_vec_pretty(&saved)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(&tmp, json))
            .and_then(|()| std::fs::rename(&tmp, &self.watch_file));
        if let Err(e) = result {
            tracing::error!(error = %e, path = %self.watch_file.display(), "cannot save the watch list");
        }
    }

    /// Re-applies the watches of an earlier run whose process is still the same one.
    fn restore_watches(&self) {
        let Ok(text) = std::fs::read(&self.watch_file) else {
            return;
        };
        let saved: Vec<SavedWatch> = serde_json::from_slice(&text).unwrap_or_default();
        for w in saved {
            let same = match w.req.pid {
                Some(pid) => {
                    process_start_time(pid).is_some() && process_start_time(pid) == w.start_time
                }
                None => w.req.cgroup.as_ref().is_some_and(|c| c.is_dir()),
            };
            if !same {
                tracing::info!(agent = %w.req.agent, pid = ?w.req.pid, "not re-watching: the process is gone");
                continue;
            }
            if let Err(e) = self.watch(w.req) {
                tracing::warn!(error = %e, "cannot re-apply a saved watch");
            }
        }
    }

    /// Removes the watches of a pid or cgroup; whether there was one.
    pub fn unwatch(&self, pid: Option<u32>, cgroup: Option<&Path>) -> bool {
        let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        let mut found = false;
        for w in tags.iter_mut().filter(|w| w.active) {
            if pid.is_some() && w.req.pid == pid {
                self.maps.unwatch_pid(pid.unwrap_or_default());
                w.active = false;
                found = true;
            }
            if let (Some(c), Some(id)) = (cgroup, w.cgroup_id)
                && w.req.cgroup.as_deref() == Some(c)
            {
                self.maps.unwatch_cgroup(id);
                w.active = false;
                found = true;
            }
        }
        if found {
            self.save_watches(&tags);
        }
        found
    }

    fn watches(&self) -> Vec<WatchRequest> {
        self.tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|w| w.active)
            .map(|w| w.req.clone())
            .collect()
    }

    /// Prometheus text.
    pub fn metrics_text(&self) -> String {
        let mut c = vec![
            (
                "clawos_monitor_events_total",
                "Audit events written (syscalls and alerts).",
                self.metrics.events.load(Ordering::Relaxed),
            ),
            (
                "clawos_monitor_alerts_total",
                "Rule matches.",
                self.metrics.alerts.load(Ordering::Relaxed),
            ),
            (
                "clawos_monitor_kernel_drops_total",
                "Events lost because the ring buffer was full.",
                self.metrics.kernel_drops.load(Ordering::Relaxed),
            ),
            (
                "clawos_monitor_guest_events_total",
                "Syscall events recorded inside VMs and received from their guests.",
                self.metrics.guest_events.load(Ordering::Relaxed),
            ),
            (
                "clawos_monitor_guest_lost_total",
                "Guest events that never reached the host (reported as guest_drops).",
                self.metrics.guest_lost.load(Ordering::Relaxed),
            ),
            (
                "clawos_monitor_guest_resent_total",
                "Guest events sent again after a reconnect and skipped.",
                self.metrics.guest_resent.load(Ordering::Relaxed),
            ),
        ];
        let (mut sent, mut dropped, mut backlog) = (0, 0, 0);
        for (_, s) in &self.forwarders {
            sent += s.sent.load(Ordering::Relaxed);
            dropped += s.dropped.load(Ordering::Relaxed);
            backlog += s.backlog_bytes.load(Ordering::Relaxed);
        }
        c.push((
            "clawos_monitor_siem_sent_total",
            "Events delivered to SIEM targets.",
            sent,
        ));
        c.push((
            "clawos_monitor_siem_dropped_total",
            "Events skipped because a SIEM spool was full.",
            dropped,
        ));
        c.push((
            "clawos_monitor_siem_backlog_bytes",
            "Audit bytes waiting for SIEM targets.",
            backlog,
        ));
        clawos_service::render_counters(&c)
    }
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

/// The last sequence number in an existing trail (0 if none), and where each VM's
/// guest stream stood.
///
/// It reads the newest closed segment and the live file: right after a rotation the
/// live file is empty, and the numbering must go on from the segment.
fn replay_trail(path: &Path) -> (u64, GuestStreams) {
    let mut guests = GuestStreams::default();
    let mut last = 0;
    for p in trail::recent(path) {
        let Ok(f) = std::fs::File::open(p) else {
            continue;
        };
        for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
            if let Ok(e) = serde_json::from_str::<AuditEvent>(&line) {
                last = e.seq;
                guests.replay(&e);
            }
        }
    }
    (last, guests)
}

/// Turns kernel records into JSONL lines.
struct Recorder {
    out: BufWriter<std::fs::File>,
    seq: u64,
    host: String,
    clock: Clock,
    rules: Rules,
    labels: Labels,
    reported_drops: u64,
    guests: GuestStreams,
    /// Guest events written since the last flush: acknowledged after it.
    pending_acks: Vec<(Arc<AtomicU64>, u64)>,
    jsonl: PathBuf,
    live_bytes: u64,
    rotate_bytes: u64,
    rotate_keep: usize,
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
    fn record(&mut self, raw: &RawEvent, metrics: &Metrics) {
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
        self.write_syscall(e, raw, metrics);
    }

    /// A message of a guest stream: its events go in once each, in order; what never
    /// arrived is reported.
    fn record_guest(&mut self, m: GuestMessage, metrics: &Metrics) {
        let verdict = self.guests.judge(&m);
        let lost = |r: &mut Self, n: u64, total: Option<u64>, detail: &str| {
            let mut e = r.next(Kind::GuestDrops, Clock::now());
            e.agent = Some(m.agent.clone());
            e.vm = Some(m.vm.clone());
            e.guest_boot = Some(m.boot_id.clone());
            e.dropped = Some(n);
            e.dropped_total = total;
            e.detail = Some(detail.into());
            r.write(&e);
            metrics.guest_lost.fetch_add(n, Ordering::Relaxed);
        };
        if let GuestBody::Event { seq, .. } = &m.body {
            self.pending_acks.push((Arc::clone(&m.ack), *seq));
        }
        match (verdict, &m.body) {
            (Verdict::Duplicate, _) => {
                metrics.guest_resent.fetch_add(1, Ordering::Relaxed);
            }
            (Verdict::Record { lost: n }, GuestBody::Event { seq, raw }) => {
                if n > 0 {
                    lost(
                        self,
                        n,
                        None,
                        "guest queue full or connection lost while the host was away",
                    );
                }
                let ts = Clock::with_offset(m.clock_offset_ns).format(raw.ts_ns);
                let mut e = self.next(Kind::Syscall, ts);
                e.agent = Some(m.agent.clone());
                e.vm = Some(m.vm.clone());
                e.guest_boot = Some(m.boot_id.clone());
                e.guest_seq = Some(*seq);
                self.write_syscall(e, raw, metrics);
                metrics.guest_events.fetch_add(1, Ordering::Relaxed);
            }
            (Verdict::KernelDrops { new, total }, _) => {
                lost(self, new, Some(total), "guest ring buffer full");
            }
            _ => {}
        }
    }

    /// Fills in a syscall event from its record, writes it and any alert it raises.
    fn write_syscall(&mut self, mut e: AuditEvent, raw: &RawEvent, metrics: &Metrics) {
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
        metrics.events.fetch_add(1, Ordering::Relaxed);
        if let Some((rule, severity)) = self.rules.check(e.agent.as_deref(), &name) {
            let mut a = e.clone();
            self.seq += 1;
            a.seq = self.seq;
            a.kind = Kind::Alert;
            a.rule = Some(rule);
            a.severity = Some(severity);
            self.write(&a);
            metrics.alerts.fetch_add(1, Ordering::Relaxed);
            metrics.events.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn drops(&mut self, total: u64, kind: Kind, metrics: &Metrics) {
        let new = match kind {
            Kind::Drops => {
                let new = total.saturating_sub(self.reported_drops);
                self.reported_drops = total;
                metrics.kernel_drops.store(total, Ordering::Relaxed);
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

/// Starts everything; returns the shared state and the HTTP router. Probe errors
/// (privileges, kernel) come back before any socket is bound.
pub fn start(cfg: &Config, stop: Arc<AtomicBool>) -> Result<(Arc<Monitor>, Router), DaemonError> {
    if cfg.syslog_tls.is_none()
        && let Some(t) = cfg
            .syslog
            .iter()
            .find(|t| t.transport == forward::Transport::Tls)
    {
        return Err(DaemonError::Config(format!(
            "syslog target {t} needs --syslog-ca (the CA that signed the SIEM's certificate)"
        )));
    }
    // The daemon's own files (token, guest socket, watch list, forwarder offsets) live
    // in <state>/monitor, where vm-launcher finds the token and the guest socket; the
    // trail may be elsewhere.
    let dir = &cfg.state_dir.join("monitor");
    for d in [dir.as_path(), cfg.jsonl.parent().unwrap_or(Path::new("."))] {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .map_err(|source| DaemonError::Io {
                path: d.to_owned(),
                source,
            })?;
    }
    let token = clawos_service::operator_token(&clawos_monitor_api::token_path(&cfg.state_dir))
        .map_err(DaemonError::Config)?;
    let out = open_trail(&cfg.jsonl).map_err(|source| DaemonError::Io {
        path: cfg.jsonl.clone(),
        source,
    })?;
    let live_bytes = out.metadata().map(|m| m.len()).unwrap_or(0);
    let guest_socket = clawos_monitor_api::guest_socket_path(&cfg.state_dir);
    let guest_listener = crate::ingest::bind(&guest_socket).map_err(|source| DaemonError::Io {
        path: guest_socket.clone(),
        source,
    })?;
    // Bounded: a recorder that falls behind slows the guests' streams (their queues
    // wait) instead of growing memory here.
    let (guest_tx, guest_rx) = std::sync::mpsc::sync_channel::<GuestMessage>(1 << 16);
    let labels: Labels = Arc::default();
    let (report_tx, report_rx) = std::sync::mpsc::channel::<u64>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // The recorder thread creates the maps the Monitor holds, so it starts first and
    // finds the Monitor (for metrics and drop counts) here once it is built.
    let monitor_slot: Arc<Mutex<Option<Arc<Monitor>>>> = Arc::default();
    drop_torn_tail(&cfg.jsonl).map_err(|source| DaemonError::Io {
        path: cfg.jsonl.clone(),
        source,
    })?;
    let (seq, guests) = replay_trail(&cfg.jsonl);
    let recorder = Recorder {
        out: BufWriter::with_capacity(1 << 20, out),
        seq,
        guests,
        pending_acks: Vec::new(),
        jsonl: cfg.jsonl.clone(),
        live_bytes,
        rotate_bytes: cfg.rotate_bytes,
        rotate_keep: cfg.rotate_keep,
        host: cfg.host.clone(),
        clock: Clock::new(),
        rules: cfg.rules.clone(),
        labels: Arc::clone(&labels),
        reported_drops: 0,
    };
    let ring_bytes = cfg.ring_bytes;
    let stop2 = Arc::clone(&stop);
    let shared = Arc::clone(&monitor_slot);
    std::thread::Builder::new()
        .name("recorder".into())
        .spawn(move || {
            let rec = RefCell::new(recorder);
            let monitor = || shared.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let fallback = Metrics::default();
            let result = probe::run(
                ring_bytes,
                ready_tx,
                |data| {
                    if let Some(raw) = RawEvent::parse(data) {
                        let m = monitor();
                        let metrics = m.as_ref().map_or(&fallback, |m| &m.metrics);
                        rec.borrow_mut().record(&raw, metrics);
                    }
                },
                || {
                    let m = monitor();
                    let mut r = rec.borrow_mut();
                    if let Some(m) = &m {
                        r.drops(m.maps.drops(), Kind::Drops, &m.metrics);
                        while let Ok(n) = report_rx.try_recv() {
                            r.drops(n, Kind::ForwardDrops, &m.metrics);
                        }
                        while let Ok(g) = guest_rx.try_recv() {
                            r.record_guest(g, &m.metrics);
                        }
                    }
                    if r.out.flush().is_ok() {
                        for (ack, seq) in r.pending_acks.drain(..) {
                            ack.fetch_max(seq, Ordering::Release);
                        }
                        // Rotation waits until the forwarders exist: pruning must
                        // know where each of them reads.
                        if let Some(m) = &m {
                            let readers: Vec<u64> = m
                                .forwarders
                                .iter()
                                .map(|(_, s)| s.reading_inode.load(Ordering::Relaxed))
                                .collect();
                            r.maybe_rotate(&readers);
                        }
                    }
                },
                &stop2,
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
    let mut forwarders = Vec::new();
    for (i, t) in cfg.syslog.iter().enumerate() {
        let offset_file = dir.join(format!("forward-{i}.offset"));
        let stats = Arc::new(ForwardStats::default());
        // Known before the first rotation, so pruning spares the forwarder's segment.
        stats
            .reading_inode
            .store(forward::saved_inode(&offset_file), Ordering::Relaxed);
        let fcfg = ForwardConfig {
            target: t.clone(),
            tls: cfg.syslog_tls.clone(),
            jsonl: cfg.jsonl.clone(),
            offset_file,
            spool_max_bytes: cfg.spool_max_bytes,
            max_message: cfg.max_message,
        };
        let (s, stop3, tx) = (Arc::clone(&stats), Arc::clone(&stop), report_tx.clone());
        std::thread::Builder::new()
            .name(format!("forward-{i}"))
            .spawn(move || {
                forward::run(
                    &fcfg,
                    &s,
                    &|n| {
                        let _ = tx.send(n);
                    },
                    &stop3,
                );
            })
            .map_err(|source| DaemonError::Io {
                path: "forwarder thread".into(),
                source,
            })?;
        forwarders.push((t.clone(), stats));
    }
    let monitor = Arc::new(Monitor {
        maps,
        tags: Mutex::new(Vec::new()),
        labels,
        metrics: Metrics::default(),
        forwarders,
        jsonl: cfg.jsonl.clone(),
        watch_file: dir.join("watches.json"),
        token,
    });
    *monitor_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&monitor));
    let token = monitor.token.clone();
    std::thread::Builder::new()
        .name("guest-streams".into())
        .spawn(move || crate::ingest::serve(guest_listener, token, guest_tx))
        .map_err(|source| DaemonError::Io {
            path: "guest stream thread".into(),
            source,
        })?;
    tracing::info!(socket = %guest_socket.display(), "taking guest audit streams");
    monitor.restore_watches();
    for w in &cfg.watches {
        monitor.watch(w.clone()).map_err(DaemonError::Config)?;
    }
    let router = Router::new()
        .route(
            "/v1/watch",
            get(list_watches).post(add_watch).delete(remove_watch),
        )
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Arc::clone(&monitor));
    Ok((monitor, router))
}

/// Runs the daemon until `shutdown`.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (_monitor, router) = start(&cfg, Arc::clone(&stop))?;
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: cfg.addr,
            source,
        })?;
    tracing::info!(addr = %cfg.addr, jsonl = %cfg.jsonl.display(), syslog = ?cfg.syslog.iter().map(ToString::to_string).collect::<Vec<_>>(), "monitor-daemon listening");
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await;
    stop.store(true, Ordering::Relaxed);
    // Let the recorder and forwarders flush.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    served.map_err(|source| DaemonError::Io {
        path: "HTTP server".into(),
        source,
    })
}

type AppState = Arc<Monitor>;

fn authorized(m: &Monitor, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let ok = clawos_service::bearer_matches(
        headers.get("authorization").and_then(|v| v.to_str().ok()),
        &m.token,
    );
    if ok {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "needs the operator credential (<state>/monitor/admin.token)",
        )))
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn add_watch(
    State(m): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<WatchRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&m, &headers) {
        return *r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    match m.watch(req) {
        Ok(tag) => (StatusCode::CREATED, Json(serde_json::json!({ "tag": tag }))).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, &e),
    }
}

#[derive(Debug, Deserialize)]
struct UnwatchQuery {
    pid: Option<u32>,
    cgroup: Option<PathBuf>,
}

async fn remove_watch(
    State(m): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<UnwatchQuery>,
) -> Response {
    if let Err(r) = authorized(&m, &headers) {
        return *r;
    }
    if m.unwatch(q.pid, q.cgroup.as_deref()) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, "no such watch")
    }
}

async fn list_watches(State(m): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&m, &headers) {
        return *r;
    }
    Json(m.watches()).into_response()
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    agent: Option<String>,
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

async fn events(
    State(m): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Response {
    if let Err(r) = authorized(&m, &headers) {
        return *r;
    }
    let path = m.jsonl.clone();
    let limit = q.limit.unwrap_or(1000).min(10_000);
    let found = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        // The newest closed segment and the live file (older segments are for the
        // SIEM and for the operator's tools).
        let lines = trail::recent(&path)
            .into_iter()
            .filter_map(|p| std::fs::File::open(p).ok())
            .flat_map(|f| std::io::BufReader::new(f).lines().map_while(Result::ok));
        for line in lines {
            let Ok(e) = serde_json::from_str::<AuditEvent>(&line) else {
                continue;
            };
            if e.seq <= q.after {
                continue;
            }
            if let Some(a) = &q.agent
                && e.agent.as_ref() != Some(a)
            {
                continue;
            }
            out.push(e);
            if out.len() >= limit {
                break;
            }
        }
        out
    })
    .await
    .unwrap_or_default();
    Json(found).into_response()
}

async fn metrics(State(m): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        m.metrics_text(),
    )
}

/// This host's name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// Default rules when no file is given.
pub fn rules_from(path: Option<&Path>) -> Result<Rules, DaemonError> {
    match path {
        None => Ok(Rules::builtin()),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| DaemonError::Io {
                path: p.to_owned(),
                source,
            })?;
            Rules::from_json(&text)
                .map_err(|e| DaemonError::Config(format!("{}: {e}", p.display())))
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

    #[test]
    fn watch_specs_parse_and_validate() {
        let w: WatchRequest = "pid=12,agent=a1,vm=v1".parse().expect("pid");
        assert_eq!(
            (w.pid, w.agent.as_str(), w.vm.as_deref()),
            (Some(12), "a1", Some("v1"))
        );
        for bad in [
            "agent=a",
            "pid=1,cgroup=/sys/fs/cgroup/x,agent=a",
            "pid=x,agent=a",
            "pid=1,agent=a b",
            "cgroup=/etc,agent=a",
            "pid=1,agent=a,color=red",
        ] {
            assert!(bad.parse::<WatchRequest>().is_err(), "{bad}");
        }
    }
}
