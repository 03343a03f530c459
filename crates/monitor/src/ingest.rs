//! Guest audit streams: what each VM's `clawos-audit` records inside the guest reaches
//! the daemon here, relayed by vm-launcher from the VM's vsock port to
//! `<state>/monitor/guest.sock`.
//!
//! A connection starts with a [`GuestStreamHeader`] line from the relay (operator
//! token, agent and VM), then carries the guest's [`stream`] frames unchanged. The
//! connections are tasks on the daemon's async runtime (an idle one costs a few
//! kilobytes, no thread), and what a guest can hold open is bounded:
//!
//! - a connection must finish its handshake (header, then the guest's hello) within
//!   [`Limits::handshake`]; at most [`Limits::max_pending`] connections may be in their
//!   handshake at once (a new one beyond that closes the oldest), and of those at most
//!   one per VM once its header has named the VM (a newer one closes the older);
//! - a VM has **one active stream**: a stream whose hello arrives while another of the
//!   same VM is open replaces it. The older one is closed, and the newer one reads
//!   nothing before the older one has stopped handing messages to the recorder, so
//!   the recorder sees the VM's sequence numbers in the order the guest sent them:
//!   what the older one had not had acknowledged, the guest sends again on the newer
//!   one and the recorder skips what it already wrote (no duplicate), and nothing
//!   between is skipped (no gap).
//!
//! The recorder thread owns the per-VM [`GuestStreams`] bookkeeping, so sequence
//! numbers are judged in the order the events are written: re-sent events are
//! skipped, gaps and the guest kernel's drops become [`Kind::GuestDrops`] events; and
//! it applies each VM's quota ([`crate::quota`]).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawos_monitor_api::GuestStreamHeader;
use clawos_service::metrics::{Counter, Gauge};
use clawos_syscall_probe::RawEvent;
use clawos_syscall_probe::stream::{self, Frame, StreamError};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};

use crate::event::{AuditEvent, Kind};

/// Who a stream's messages belong to: the VM (from the relay's header) and the
/// guest boot (from its hello). Shared by every message of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub agent: String,
    pub vm: String,
    pub boot_id: String,
    /// The guest's realtime − boottime (from its hello frame).
    pub clock_offset_ns: i64,
}

/// The connection's acknowledgement: the recorder raises it to an event's sequence
/// number once the event is in the trail (flushed), and the connection sends it back
/// to the guest, which then forgets the event.
#[derive(Debug, Clone)]
pub struct Ack(Arc<watch::Sender<u64>>);

impl Ack {
    pub fn new() -> (Self, watch::Receiver<u64>) {
        let (tx, rx) = watch::channel(0);
        (Self(Arc::new(tx)), rx)
    }

    /// Raises the acknowledgement to `seq` (never lowers it).
    pub fn raise(&self, seq: u64) {
        self.0.send_if_modified(|v| {
            let up = seq > *v;
            if up {
                *v = seq;
            }
            up
        });
    }
}

impl Ack {
    /// The acknowledgement now.
    pub fn get(&self) -> u64 {
        *self.0.borrow()
    }
}

impl Default for Ack {
    fn default() -> Self {
        Self::new().0
    }
}

/// One decoded frame of a guest, with who it belongs to.
#[derive(Debug, Clone)]
pub struct GuestMessage {
    pub stream: Arc<StreamInfo>,
    pub body: GuestBody,
    pub ack: Ack,
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
        let (vm, boot) = (&m.stream.vm, &m.stream.boot_id);
        if !self.by_vm.contains_key(vm) {
            self.by_vm.insert(vm.clone(), StreamState::default());
        }
        let Some(s) = self.by_vm.get_mut(vm) else {
            return Verdict::Nothing;
        };
        if &s.boot_id != boot {
            // A new guest boot (or the first stream of this VM): numbering restarts.
            *s = StreamState {
                boot_id: boot.clone(),
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
        // A syscall's own number, or the last one a quota report covers.
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

/// What the guest socket allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections in their handshake at once; a new one beyond closes the oldest.
    pub max_pending: usize,
    /// Time from accept to a complete handshake (header and hello).
    pub handshake: Duration,
}

impl Limits {
    pub const DEFAULT_MAX_PENDING: usize = 256;
    pub const DEFAULT_HANDSHAKE_SECS: u64 = 10;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pending: Self::DEFAULT_MAX_PENDING,
            handshake: Duration::from_secs(Self::DEFAULT_HANDSHAKE_SECS),
        }
    }
}

/// The guest socket's counters in `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct IngestMetrics {
    /// Streams past their handshake, open now.
    pub streams: Gauge,
    /// Connections in their handshake now.
    pub pending: Gauge,
    /// Connections closed before their handshake finished (timeout, a newer one, the
    /// pending cap) or refused (bad header or hello).
    pub refused: Counter,
    /// Streams closed because a newer one of the same VM took over.
    pub replaced: Counter,
}

impl IngestMetrics {
    pub fn register(m: &mut clawos_service::Metrics) -> Self {
        Self {
            streams: m.gauge(
                "clawos_monitor_guest_streams",
                "Guest audit streams open (at most one per VM).",
            ),
            pending: m.gauge(
                "clawos_monitor_guest_pending_connections",
                "Guest socket connections still in their handshake.",
            ),
            refused: m.counter(
                "clawos_monitor_guest_refused_total",
                "Guest socket connections closed before or at their handshake.",
            ),
            replaced: m.counter(
                "clawos_monitor_guest_replaced_total",
                "Guest audit streams closed because a newer stream of the same VM took over.",
            ),
        }
    }
}

/// Connections in their handshake, oldest first, each with the means to close it.
#[derive(Debug, Default)]
struct Pending {
    conns: BTreeMap<u64, oneshot::Sender<()>>,
    /// The connection of each VM whose header arrived and whose hello has not.
    by_vm: HashMap<String, u64>,
}

/// One VM's active stream: `latest` is the id of the connection that should read,
/// `turn` is held by the one that does.
#[derive(Debug)]
struct VmSlot {
    latest: watch::Sender<u64>,
    turn: tokio::sync::Mutex<()>,
}

/// What the connections share.
#[derive(Debug)]
struct Shared {
    token: String,
    limits: Limits,
    to_recorder: mpsc::Sender<GuestMessage>,
    metrics: IngestMetrics,
    pending: Mutex<Pending>,
    slots: Mutex<HashMap<String, Arc<VmSlot>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Registers a new connection in its handshake, closing the oldest one if there
    /// are too many; the receiver fires when this one is to close.
    fn admit(&self, id: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut p = lock(&self.pending);
        while p.conns.len() >= self.limits.max_pending.max(1) {
            let Some((_, close)) = p.conns.pop_first() else {
                break;
            };
            let _ = close.send(());
        }
        p.conns.insert(id, tx);
        self.metrics.pending.set(p.conns.len() as i64);
        rx
    }

    /// The header named `vm`: of the VM's connections in their handshake only the
    /// one accepted last stays (a guest cannot pile them up). Whether `id` is it.
    fn named(&self, id: u64, vm: &str) -> bool {
        let mut p = lock(&self.pending);
        let keep = match p.by_vm.get(vm).copied() {
            Some(other) if other > id => false,
            Some(older) => {
                if let Some(close) = p.conns.remove(&older) {
                    let _ = close.send(());
                }
                true
            }
            None => true,
        };
        if keep {
            p.by_vm.insert(vm.to_owned(), id);
        }
        self.metrics.pending.set(p.conns.len() as i64);
        keep
    }

    /// The handshake is over (either way).
    fn settled(&self, id: u64) {
        let mut p = lock(&self.pending);
        p.conns.remove(&id);
        p.by_vm.retain(|_, v| *v != id);
        self.metrics.pending.set(p.conns.len() as i64);
    }

    /// Makes connection `id` the one that should read `vm`'s stream, unless one
    /// accepted later already is (handshakes may finish out of order; the connection
    /// accepted last wins).
    fn claim(&self, vm: &str, id: u64) -> (Arc<VmSlot>, watch::Receiver<u64>) {
        let mut slots = lock(&self.slots);
        let slot = slots
            .entry(vm.to_owned())
            .or_insert_with(|| {
                Arc::new(VmSlot {
                    latest: watch::channel(0).0,
                    turn: tokio::sync::Mutex::new(()),
                })
            })
            .clone();
        slot.latest.send_if_modified(|latest| {
            let newer = id > *latest;
            if newer {
                *latest = id;
            }
            newer
        });
        let rx = slot.latest.subscribe();
        (slot, rx)
    }

    /// Forgets `vm`'s slot once no connection holds it.
    fn release(&self, vm: &str, slot: Arc<VmSlot>) {
        let mut slots = lock(&self.slots);
        // The map's reference and ours.
        if Arc::strong_count(&slot) <= 2 && slots.get(vm).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            slots.remove(vm);
        }
    }
}

/// Accepts relayed guest streams until the process ends: a task per connection.
///
/// Call it on the daemon's runtime.
pub async fn serve(
    listener: UnixListener,
    token: String,
    limits: Limits,
    to_recorder: mpsc::Sender<GuestMessage>,
    metrics: IngestMetrics,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot take guest audit streams");
            return;
        }
    };
    let shared = Arc::new(Shared {
        token,
        limits,
        to_recorder,
        metrics,
        pending: Mutex::default(),
        slots: Mutex::default(),
    });
    let mut next_id = 0u64;
    loop {
        let conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to close rather
                // than spin.
                tracing::warn!(error = %e, "guest socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        let close = shared.admit(id);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            match connection(conn, id, close, &shared).await {
                Ok(()) => {}
                // Connections that never said anything: counted, not each logged.
                Err(e @ (IngestError::Timeout(_) | IngestError::Displaced)) => {
                    tracing::debug!(error = %e, "guest socket connection closed");
                }
                Err(e) => tracing::warn!(error = %e, "guest audit stream refused or broken"),
            }
        });
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
    #[error("no complete handshake within {0:?}")]
    Timeout(Duration),
    #[error("closed in its handshake: too many connections, or a newer one of the same VM")]
    Displaced,
}

/// Reads the relay's header line (at most 4 KiB) and checks it.
async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    token: &str,
) -> Result<GuestStreamHeader, IngestError> {
    let bad = |m: String| IngestError::Header(m);
    let mut line = Vec::new();
    reader
        .take(4096)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| bad(e.to_string()))?;
    let header: GuestStreamHeader = serde_json::from_slice(&line)
        .map_err(|e| bad(format!("not a guest stream header: {e}")))?;
    if !clawos_service::bearer_matches(Some(&format!("Bearer {}", header.token)), token) {
        return Err(bad("wrong token".into()));
    }
    header.check().map_err(bad)?;
    Ok(header)
}

/// Reads the next frame; `None` at a clean end of stream (between frames). The async
/// twin of [`Frame::read_from`], with the same checks.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    body: &mut Vec<u8>,
) -> Result<Option<Frame>, StreamError> {
    let mut len = [0u8; 4];
    if r.read(&mut len[..1]).await? == 0 {
        return Ok(None);
    }
    r.read_exact(&mut len[1..]).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > stream::MAX_BODY {
        return Err(StreamError::Length(len));
    }
    body.resize(len, 0);
    r.read_exact(body).await?;
    Frame::decode(body).map(Some)
}

/// Header and hello.
async fn handshake<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    token: &str,
    id: u64,
    shared: &Shared,
) -> Result<Option<StreamInfo>, IngestError> {
    let header = read_header(reader, token).await?;
    if !shared.named(id, &header.vm) {
        return Err(IngestError::Displaced);
    }
    let vm = header.vm.clone();
    let mut body = Vec::new();
    match read_frame(reader, &mut body)
        .await
        .map_err(|source| IngestError::Stream {
            vm: vm.clone(),
            source,
        })? {
        Some(Frame::Hello {
            version: stream::VERSION,
            boot_id,
            clock_offset_ns,
        }) => Ok(Some(StreamInfo {
            agent: header.agent,
            vm,
            boot_id,
            clock_offset_ns,
        })),
        None => Ok(None),
        Some(_) => Err(IngestError::NoHello { vm }),
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts an open stream while it lives.
struct Open(Gauge);

impl Open {
    fn new(g: &Gauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves one connection: handshake (bounded in time and number), then, as the VM's
/// one active stream, its frames until it ends or a newer stream replaces it.
async fn connection(
    conn: tokio::net::UnixStream,
    id: u64,
    close: oneshot::Receiver<()>,
    shared: &Shared,
) -> Result<(), IngestError> {
    let (read, write) = conn.into_split();
    let mut reader = BufReader::with_capacity(8 * 1024, read);
    let limit = shared.limits.handshake;
    let hs = tokio::select! {
        _ = close => Err(IngestError::Displaced),
        r = tokio::time::timeout(limit, handshake(&mut reader, &shared.token, id, shared)) => {
            r.unwrap_or(Err(IngestError::Timeout(limit)))
        }
    };
    shared.settled(id);
    let info = match hs {
        Ok(Some(info)) => Arc::new(info),
        Ok(None) => return Ok(()),
        Err(e) => {
            shared.metrics.refused.inc();
            return Err(e);
        }
    };
    let (slot, mut latest) = shared.claim(&info.vm, id);
    let result = stream_frames(&mut reader, write, &info, id, &slot, &mut latest, shared).await;
    shared.release(&info.vm, slot);
    result
}

/// Whether `id` is no longer the VM's latest connection.
async fn superseded(latest: &mut watch::Receiver<u64>, id: u64) {
    // The sender lives in the slot, which the caller holds.
    let _ = latest.wait_for(|v| *v != id).await;
}

/// Waits for the VM's turn, then hands the stream's frames to the recorder.
async fn stream_frames(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: tokio::net::unix::OwnedWriteHalf,
    info: &Arc<StreamInfo>,
    id: u64,
    slot: &VmSlot,
    latest: &mut watch::Receiver<u64>,
    shared: &Shared,
) -> Result<(), IngestError> {
    let vm = &info.vm;
    // The stream this one replaces stops at its next await; the turn comes once it
    // has (its messages are then all in the recorder's queue, ahead of ours).
    let _turn = tokio::select! {
        biased;
        () = superseded(latest, id) => {
            shared.metrics.replaced.inc();
            return Ok(());
        }
        t = slot.turn.lock() => t,
    };
    if *latest.borrow() != id {
        shared.metrics.replaced.inc();
        return Ok(());
    }
    let _open = Open::new(&shared.metrics.streams);
    tracing::info!(vm = %vm, boot = %info.boot_id, "guest audit stream connected");
    let (ack, mut acks) = Ack::new();
    let _acks = AbortOnDrop(tokio::spawn(async move {
        while acks.changed().await.is_ok() {
            let now = *acks.borrow_and_update();
            if write.write_all(&now.to_le_bytes()).await.is_err() {
                return;
            }
        }
    }));
    let mut body = Vec::with_capacity(stream::MAX_BODY);
    loop {
        let frame = tokio::select! {
            biased;
            () = superseded(latest, id) => {
                tracing::debug!(vm = %vm, "guest audit stream replaced by a newer one");
                shared.metrics.replaced.inc();
                return Ok(());
            }
            f = read_frame(reader, &mut body) => f.map_err(|source| IngestError::Stream {
                vm: vm.clone(),
                source,
            })?,
        };
        let Some(frame) = frame else { break };
        let body = match frame {
            Frame::Event { seq, record } => match RawEvent::parse(&record) {
                Some(raw) => GuestBody::Event {
                    seq,
                    raw: Box::new(raw),
                },
                None => continue,
            },
            Frame::Drops { total } => GuestBody::Drops { total },
            Frame::Hello { .. } => return Err(IngestError::NoHello { vm: vm.clone() }),
        };
        let m = GuestMessage {
            stream: Arc::clone(info),
            body,
            ack: ack.clone(),
        };
        tokio::select! {
            biased;
            () = superseded(latest, id) => {
                shared.metrics.replaced.inc();
                return Ok(());
            }
            sent = shared.to_recorder.send(m) => if sent.is_err() { break },
        }
    }
    tracing::info!(vm = %vm, "guest audit stream closed");
    Ok(())
}

#[cfg(test)]
mod tests;
