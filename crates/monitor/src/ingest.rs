//! Guest audit streams: what each VM's `clawos-audit` records inside the guest reaches
//! the daemon here, relayed by vm-launcher from the VM's vsock port to
//! `<state>/monitor/guest.sock`.
//!
//! A connection starts with a [`GuestStreamHeader`] line from the relay (operator
//! token, agent and VM), then carries the guest's [`stream`] frames unchanged. A
//! thread per connection checks and decodes; the recorder thread owns the
//! per-VM [`GuestStreams`] bookkeeping, so sequence numbers are judged in the order the
//! events are written: re-sent events are skipped, gaps and the guest kernel's drops
//! become [`Kind::GuestDrops`] events.

use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawos_monitor_api::GuestStreamHeader;
use clawos_syscall_probe::RawEvent;
use clawos_syscall_probe::stream::{self, Frame, StreamError};

use crate::event::{AuditEvent, Kind};

/// One decoded frame of a guest, with who it belongs to (from the relay's header).
#[derive(Debug, Clone)]
pub struct GuestMessage {
    pub agent: String,
    pub vm: String,
    pub boot_id: String,
    /// The guest's realtime − boottime (from its hello frame).
    pub clock_offset_ns: i64,
    pub body: GuestBody,
    /// The connection's acknowledgement: the recorder raises it to an event's sequence
    /// number once the event is in the trail (flushed), and the connection sends it
    /// back to the guest, which then forgets the event.
    pub ack: Arc<AtomicU64>,
}

#[derive(Debug, Clone)]
pub enum GuestBody {
    Event { seq: u64, raw: Box<RawEvent> },
    Drops { total: u64 },
}

/// Where one VM's stream stands: the guest boot, the last sequence number written and
/// the last kernel drop total reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StreamState {
    boot_id: String,
    last_seq: u64,
    drops_total: u64,
}

/// What the recorder should write for a guest message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Already written (a re-send after a reconnect).
    Duplicate,
    /// Write the event, after reporting `lost` events that never arrived (0: none).
    Record { lost: u64 },
    /// Report `new` kernel drops (`total` since the guest booted).
    KernelDrops { new: u64, total: u64 },
    /// Nothing to do.
    Nothing,
}

/// Per-VM stream bookkeeping, kept by the recorder thread and rebuilt from the trail
/// when the daemon starts.
#[derive(Debug, Default)]
pub struct GuestStreams {
    by_vm: HashMap<String, StreamState>,
}

impl GuestStreams {
    /// Judges one message and moves the VM's state past it.
    pub fn judge(&mut self, m: &GuestMessage) -> Verdict {
        let s = self.by_vm.entry(m.vm.clone()).or_default();
        if s.boot_id != m.boot_id {
            // A new guest boot (or the first stream of this VM): numbering restarts.
            *s = StreamState {
                boot_id: m.boot_id.clone(),
                ..StreamState::default()
            };
        }
        match &m.body {
            GuestBody::Event { seq, .. } if *seq <= s.last_seq => Verdict::Duplicate,
            GuestBody::Event { seq, .. } => {
                let lost = seq - s.last_seq - 1;
                s.last_seq = *seq;
                Verdict::Record { lost }
            }
            GuestBody::Drops { total } if *total > s.drops_total => {
                let new = total - s.drops_total;
                s.drops_total = *total;
                Verdict::KernelDrops { new, total: *total }
            }
            GuestBody::Drops { .. } => Verdict::Nothing,
        }
    }

    /// Takes in one line of an existing trail (at startup).
    pub fn replay(&mut self, e: &AuditEvent) {
        let (Some(vm), Some(boot)) = (&e.vm, &e.guest_boot) else {
            return;
        };
        let s = self.by_vm.entry(vm.clone()).or_default();
        if &s.boot_id != boot {
            *s = StreamState {
                boot_id: boot.clone(),
                ..StreamState::default()
            };
        }
        if let Some(seq) = e.guest_seq {
            s.last_seq = s.last_seq.max(seq);
        }
        if e.kind == Kind::GuestDrops
            && let Some(total) = e.dropped_total
        {
            s.drops_total = s.drops_total.max(total);
        }
    }
}

/// Binds `path` (0600), replacing a stale socket but never another kind of file.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(_) => {}
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// One lock per VM: a VM's streams are read one after the other, so a reconnect's
/// re-sent events never overtake the tail of the connection it replaces.
#[derive(Debug, Default)]
pub struct VmLocks(Mutex<HashMap<String, Arc<Mutex<()>>>>);

impl VmLocks {
    fn get(&self, vm: &str) -> Arc<Mutex<()>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(m.entry(vm.to_owned()).or_default())
    }
}

/// Accepts relayed guest streams until the process ends; a thread per connection.
pub fn serve(listener: UnixListener, token: String, to_recorder: SyncSender<GuestMessage>) {
    let locks = Arc::new(VmLocks::default());
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (token, tx, locks) = (token.clone(), to_recorder.clone(), Arc::clone(&locks));
        let _ = std::thread::Builder::new()
            .name("guest-stream".into())
            .spawn(move || {
                if let Err(e) = read_stream(conn, &token, &tx, &locks) {
                    tracing::warn!(error = %e, "guest audit stream refused or broken");
                }
            });
    }
}

/// Sets its flag when dropped (ends a connection's acknowledgement thread).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Why a relayed stream was ended.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("header: {0}")]
    Header(String),
    #[error("vm {vm}: {source}")]
    Stream {
        vm: String,
        #[source]
        source: StreamError,
    },
    #[error(
        "vm {vm}: the first frame must be a hello of version {}",
        stream::VERSION
    )]
    NoHello { vm: String },
}

fn read_header(
    reader: &mut std::io::BufReader<UnixStream>,
    token: &str,
) -> Result<GuestStreamHeader, IngestError> {
    let bad = |m: String| IngestError::Header(m);
    reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| bad(e.to_string()))?;
    let mut line = Vec::new();
    reader
        .by_ref()
        .take(4096)
        .read_until(b'\n', &mut line)
        .map_err(|e| bad(e.to_string()))?;
    let header: GuestStreamHeader = serde_json::from_slice(&line)
        .map_err(|e| bad(format!("not a guest stream header: {e}")))?;
    if !clawos_service::bearer_matches(Some(&format!("Bearer {}", header.token)), token) {
        return Err(bad("wrong token".into()));
    }
    header.check().map_err(bad)?;
    reader
        .get_ref()
        .set_read_timeout(None)
        .map_err(|e| bad(e.to_string()))?;
    Ok(header)
}

/// Serves one relayed stream to its end.
pub fn read_stream(
    conn: UnixStream,
    token: &str,
    to_recorder: &SyncSender<GuestMessage>,
    locks: &VmLocks,
) -> Result<(), IngestError> {
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, conn);
    let header = read_header(&mut reader, token)?;
    let vm = header.vm.clone();
    let lock = locks.get(&vm);
    // The connection this one replaces ends as soon as its relay sees the guest's side
    // gone; a stuck one is not waited for forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let _turn = loop {
        match lock.try_lock() {
            Ok(g) => break Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => break Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if std::time::Instant::now() > deadline => {
                tracing::warn!(vm = %vm, "an earlier guest audit stream is still open; reading both");
                break None;
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let stream_err = |source| IngestError::Stream {
        vm: vm.clone(),
        source,
    };
    let (boot_id, clock_offset_ns) = match Frame::read_from(&mut reader).map_err(stream_err)? {
        Some(Frame::Hello {
            version: stream::VERSION,
            boot_id,
            clock_offset_ns,
        }) => (boot_id, clock_offset_ns),
        None => return Ok(()),
        Some(_) => return Err(IngestError::NoHello { vm }),
    };
    tracing::info!(vm = %vm, boot = %boot_id, "guest audit stream connected");
    let ack = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let _stop_acks = StopOnDrop(Arc::clone(&done));
    if let Ok(mut w) = reader.get_ref().try_clone() {
        let (ack, done) = (Arc::clone(&ack), Arc::clone(&done));
        std::thread::spawn(move || {
            use std::io::Write;
            let mut sent = 0;
            while !done.load(Ordering::Relaxed) {
                let now = ack.load(Ordering::Acquire);
                if now != sent {
                    if w.write_all(&now.to_le_bytes()).is_err() {
                        return;
                    }
                    sent = now;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }
    while let Some(frame) = Frame::read_from(&mut reader).map_err(stream_err)? {
        let body = match frame {
            Frame::Event { seq, record } => match RawEvent::parse(&record) {
                Some(raw) => GuestBody::Event {
                    seq,
                    raw: Box::new(raw),
                },
                None => continue,
            },
            Frame::Drops { total } => GuestBody::Drops { total },
            Frame::Hello { .. } => return Err(IngestError::NoHello { vm }),
        };
        let m = GuestMessage {
            agent: header.agent.clone(),
            vm: vm.clone(),
            boot_id: boot_id.clone(),
            clock_offset_ns,
            body,
            ack: Arc::clone(&ack),
        };
        if to_recorder.send(m).is_err() {
            break;
        }
    }
    tracing::info!(vm = %vm, "guest audit stream closed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(vm: &str, boot: &str, body: GuestBody) -> GuestMessage {
        GuestMessage {
            agent: "a".into(),
            vm: vm.into(),
            boot_id: boot.into(),
            clock_offset_ns: 0,
            body,
            ack: Arc::default(),
        }
    }

    fn ev(seq: u64) -> GuestBody {
        let raw = RawEvent::parse(&[0u8; RawEvent::HEAD_SIZE]).expect("raw");
        GuestBody::Event {
            seq,
            raw: Box::new(raw),
        }
    }

    #[test]
    fn resends_are_skipped_gaps_and_kernel_drops_reported() {
        let mut g = GuestStreams::default();
        let j = |g: &mut GuestStreams, vm, boot, body| g.judge(&msg(vm, boot, body));
        assert_eq!(j(&mut g, "v1", "b1", ev(1)), Verdict::Record { lost: 0 });
        assert_eq!(j(&mut g, "v1", "b1", ev(2)), Verdict::Record { lost: 0 });
        // A reconnect re-sends 2, then 3 and 4 were discarded in the guest.
        assert_eq!(j(&mut g, "v1", "b1", ev(2)), Verdict::Duplicate);
        assert_eq!(j(&mut g, "v1", "b1", ev(5)), Verdict::Record { lost: 2 });
        // Another VM has its own numbering.
        assert_eq!(j(&mut g, "v2", "c1", ev(1)), Verdict::Record { lost: 0 });
        let drops = |t| GuestBody::Drops { total: t };
        assert_eq!(
            j(&mut g, "v1", "b1", drops(7)),
            Verdict::KernelDrops { new: 7, total: 7 }
        );
        assert_eq!(j(&mut g, "v1", "b1", drops(7)), Verdict::Nothing);
        assert_eq!(
            j(&mut g, "v1", "b1", drops(9)),
            Verdict::KernelDrops { new: 2, total: 9 }
        );
        // The guest rebooted: numbering and drop totals start over.
        assert_eq!(j(&mut g, "v1", "b2", ev(1)), Verdict::Record { lost: 0 });
        assert_eq!(
            j(&mut g, "v1", "b2", drops(1)),
            Verdict::KernelDrops { new: 1, total: 1 }
        );
    }

    #[test]
    fn a_restarted_daemon_picks_up_where_the_trail_ends() {
        let mut g = GuestStreams::default();
        let mut e = AuditEvent::new(1, String::new(), "h", Kind::Syscall);
        e.vm = Some("v1".into());
        e.guest_boot = Some("b1".into());
        e.guest_seq = Some(41);
        g.replay(&e);
        let mut d = AuditEvent::new(2, String::new(), "h", Kind::GuestDrops);
        d.vm = Some("v1".into());
        d.guest_boot = Some("b1".into());
        d.dropped_total = Some(5);
        g.replay(&d);
        assert_eq!(g.judge(&msg("v1", "b1", ev(41))), Verdict::Duplicate);
        assert_eq!(
            g.judge(&msg("v1", "b1", ev(44))),
            Verdict::Record { lost: 2 }
        );
        assert_eq!(
            g.judge(&msg("v1", "b1", GuestBody::Drops { total: 5 })),
            Verdict::Nothing
        );
    }

    #[test]
    fn streams_without_the_token_or_a_hello_are_refused() {
        use std::io::Write;
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let run = |bytes: Vec<u8>| {
            let (mut a, b) = UnixStream::pair().expect("pair");
            a.write_all(&bytes).expect("write");
            drop(a);
            read_stream(b, "tok", &tx, &VmLocks::default())
        };
        let header = |t: &str, vm: &str| {
            format!("{{\"token\":\"{t}\",\"agent\":\"a\",\"vm\":\"{vm}\"}}\n").into_bytes()
        };
        let err = run(header("nope", "v")).expect_err("wrong token");
        assert!(err.to_string().contains("wrong token"), "{err}");
        let err = run(header("tok", "../etc")).expect_err("bad vm");
        assert!(err.to_string().contains("invalid vm"), "{err}");
        let err = run(b"garbage\n".to_vec()).expect_err("garbage");
        assert!(err.to_string().contains("header"), "{err}");
        let mut no_hello = header("tok", "v");
        Frame::Drops { total: 1 }.encode(&mut no_hello);
        let err = run(no_hello).expect_err("no hello");
        assert!(err.to_string().contains("hello"), "{err}");
        assert!(rx.try_recv().is_err(), "nothing reached the recorder");
        // A good stream: header, hello, one event.
        let mut ok = header("tok", "v");
        Frame::Hello {
            version: stream::VERSION,
            boot_id: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
            clock_offset_ns: 5,
        }
        .encode(&mut ok);
        Frame::Event {
            seq: 1,
            record: vec![0; RawEvent::HEAD_SIZE],
        }
        .encode(&mut ok);
        run(ok).expect("good stream");
        let m = rx.try_recv().expect("event");
        assert_eq!((m.vm.as_str(), m.clock_offset_ns), ("v", 5));
        assert!(matches!(m.body, GuestBody::Event { seq: 1, .. }));
    }
}
