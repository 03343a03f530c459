//! Connections the proxy holds, bounded so a flood cannot exhaust its file descriptors.
//!
//! Every agent's LLM traffic goes through this one process, and a guest can open
//! connections much faster than requests are answered. So:
//!
//! - at most [`ConnLimits::max_connections`] connections in all and
//!   [`ConnLimits::max_per_peer`] per peer address, both sized under the process's
//!   descriptor limit ([`fd_budget`]);
//! - a connection that has not sent a complete request head within
//!   [`ConnLimits::header_timeout`] of connecting, or stays idle between requests
//!   longer than [`ConnLimits::idle_timeout`], is closed;
//! - when a new connection finds the table full, the proxy closes an *idle* one to make
//!   room (one that never sent a request first, oldest first, then the longest idle
//!   keep-alive one, the same peer's first when that peer is at its cap), so a flood of
//!   idle connections only ever displaces itself; a connection serving a request is
//!   never closed for room. Busy connections are bounded by the per-agent in-flight cap.
//!   If nothing is idle, the newcomer gets a 503 and is closed.
//!
//! A connection is "busy" from the moment its request reaches the router
//! ([`track_busy`]) until its response body has been sent or dropped.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::IncomingStream;
use clawos_service::metrics::{Counter, Gauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Connection limits, validated at start ([`crate::config::ProxyConfig::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections held at once, in all.
    pub max_connections: usize,
    /// Connections held at once from one peer address (at most `max_connections`).
    pub max_per_peer: usize,
    /// From connect to a complete first request head.
    pub header_timeout: Duration,
    /// Between the end of a response and the next request head on a keep-alive
    /// connection.
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_per_peer: 512,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// Descriptors kept free of client connections: listener, ledger, audit, logs, the
/// upstream and JWKS clients' idle pools.
pub const FD_RESERVE: u64 = 96;

/// The soft `RLIMIT_NOFILE` of this process.
pub fn fd_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return 1024;
    }
    l.rlim_cur
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (services often start with a soft
/// limit of 1,024); returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return 1024;
    }
    if l.rlim_cur < l.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: l.rlim_max,
            rlim_max: l.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; raising the soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    l.rlim_cur
}

/// How many client connections fit in `nofile` descriptors: each busy one may hold a
/// second descriptor upstream, and [`FD_RESERVE`] stay free.
pub fn fd_budget(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX)
}

/// One client connection.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    peer: IpAddr,
    accepted: Instant,
    /// Requests being served on it.
    busy: AtomicUsize,
    /// Requests begun on it.
    served: AtomicU64,
    /// When it last became idle.
    idle_since: Mutex<Instant>,
    /// Closed to make room or for a timeout: reads return end-of-file.
    closing: AtomicBool,
    /// The reader to wake when it is closed.
    waker: Mutex<Option<Waker>>,
}

impl Conn {
    fn close(&self) -> bool {
        if self.closing.swap(true, Ordering::AcqRel) {
            return false;
        }
        if let Some(w) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
        true
    }

    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self.idle_since.lock().unwrap_or_else(|p| p.into_inner());
        Some(now.saturating_duration_since(since))
    }
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    conns: HashMap<u64, Arc<Conn>>,
    /// Connections not closing, per peer and in all.
    live_per_peer: HashMap<IpAddr, usize>,
    live: usize,
}

impl Table {
    fn forget_live(&mut self, peer: IpAddr) {
        self.live = self.live.saturating_sub(1);
        if let Some(n) = self.live_per_peer.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.live_per_peer.remove(&peer);
            }
        }
    }

    /// Closes the idle connection that matters least (of `peer`, if given): one that
    /// never sent a request, oldest first, else the one idle longest.
    fn close_one_idle(&mut self, peer: Option<IpAddr>, now: Instant) -> bool {
        let victim = self
            .conns
            .values()
            .filter(|c| peer.is_none_or(|p| c.peer == p) && !c.closing.load(Ordering::Acquire))
            .filter_map(|c| {
                let idle = c.idle_for(now)?;
                let never_used = c.served.load(Ordering::Acquire) == 0;
                Some(((never_used, idle), c))
            })
            .max_by_key(|(k, _)| *k)
            .map(|(_, c)| Arc::clone(c));
        match victim {
            Some(c) if c.close() => {
                self.forget_live(c.peer);
                true
            }
            _ => false,
        }
    }
}

/// Metrics of the connection table.
#[derive(Debug, Clone)]
pub struct ConnMetrics {
    /// Idle connections closed to make room.
    pub evicted: Counter,
    /// Connections refused (table full of busy connections).
    pub refused: Counter,
    /// Connections closed by the header or idle timeout.
    pub timed_out: Counter,
    /// Connections held now.
    pub open: Gauge,
}

/// What [`ConnTable::admit`] decided.
#[derive(Debug)]
enum Admit {
    Yes(Arc<Conn>),
    /// Every connection is busy: refuse.
    Full,
    /// Too many closed connections have not left yet: wait for them.
    Draining,
}

/// How long a new connection waits for closed ones to leave before it is refused.
const DRAIN_WAIT: Duration = Duration::from_millis(500);

/// The connection table shared by the listener, the connections and the reaper.
#[derive(Debug)]
pub struct ConnTable {
    limits: ConnLimits,
    table: Mutex<Table>,
    metrics: ConnMetrics,
}

impl ConnTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection from `peer`, closing an idle one if the table is full.
    fn admit(&self, peer: IpAddr) -> Admit {
        let now = Instant::now();
        let mut t = self.lock();
        // Closed connections leave as soon as their tasks run; hold at most an eighth
        // (at least 16) over the cap while they do.
        let slack = (self.limits.max_connections / 8).max(16);
        if t.conns.len() >= self.limits.max_connections + slack {
            return Admit::Draining;
        }
        let per_peer = t.live_per_peer.get(&peer).copied().unwrap_or(0);
        if per_peer >= self.limits.max_per_peer {
            if !t.close_one_idle(Some(peer), now) {
                return Admit::Full;
            }
            self.metrics.evicted.inc();
        }
        if t.live >= self.limits.max_connections {
            if !t.close_one_idle(None, now) {
                return Admit::Full;
            }
            self.metrics.evicted.inc();
        }
        t.next_id += 1;
        let c = Arc::new(Conn {
            id: t.next_id,
            peer,
            accepted: now,
            busy: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            idle_since: Mutex::new(now),
            closing: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        t.conns.insert(c.id, Arc::clone(&c));
        self.metrics.open.inc();
        t.live += 1;
        *t.live_per_peer.entry(peer).or_default() += 1;
        Admit::Yes(c)
    }

    fn remove(&self, c: &Conn) {
        let mut t = self.lock();
        if t.conns.remove(&c.id).is_some() {
            self.metrics.open.dec();
            if !c.closing.load(Ordering::Acquire) {
                t.forget_live(c.peer);
            }
        }
    }

    /// Closes connections past their header or idle timeout.
    fn reap(&self, now: Instant) {
        let mut t = self.lock();
        let expired: Vec<Arc<Conn>> = t
            .conns
            .values()
            .filter(|c| !c.closing.load(Ordering::Acquire))
            .filter(|c| {
                let Some(idle) = c.idle_for(now) else {
                    return false;
                };
                if c.served.load(Ordering::Acquire) == 0 {
                    now.saturating_duration_since(c.accepted) >= self.limits.header_timeout
                } else {
                    idle >= self.limits.idle_timeout
                }
            })
            .cloned()
            .collect();
        for c in expired {
            if c.close() {
                t.forget_live(c.peer);
                self.metrics.timed_out.inc();
            }
        }
    }

    /// Connections held now (closing ones included).
    pub fn open(&self) -> usize {
        self.lock().conns.len()
    }
}

/// A TCP listener that admits connections through a [`ConnTable`].
#[derive(Debug)]
pub struct LimitedListener {
    tcp: TcpListener,
    table: Arc<ConnTable>,
}

impl LimitedListener {
    /// Binds `addr` with a deep accept queue and starts the timeout reaper.
    pub fn bind(
        addr: SocketAddr,
        limits: ConnLimits,
        metrics: ConnMetrics,
    ) -> io::Result<(Self, Arc<ConnTable>)> {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        // A burst of connects waits in the kernel's queue instead of being dropped
        // (the default of 128 drops SYNs, and each costs the client a second).
        let tcp = sock.listen(1024)?;
        let table = Arc::new(ConnTable {
            limits,
            table: Mutex::new(Table::default()),
            metrics,
        });
        let weak: Weak<ConnTable> = Arc::downgrade(&table);
        let tick = limits
            .header_timeout
            .min(limits.idle_timeout)
            .min(Duration::from_secs(1))
            / 2;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(tick.max(Duration::from_millis(50)));
            loop {
                every.tick().await;
                let Some(table) = weak.upgrade() else { return };
                table.reap(Instant::now());
            }
        });
        Ok((
            Self {
                tcp,
                table: Arc::clone(&table),
            },
            table,
        ))
    }
}

/// What a refused connection is told before it is closed (Anthropic's error shape).
fn refused_answer() -> String {
    let body = r#"{"type":"error","error":{"type":"overloaded_error","message":"inference-proxy is at its connection limit"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (LimitedIo, SocketAddr) {
        loop {
            match self.tcp.accept().await {
                Ok((tcp, addr)) => {
                    let _ = tcp.set_nodelay(true);
                    let deadline = Instant::now() + DRAIN_WAIT;
                    loop {
                        match self.table.admit(addr.ip()) {
                            Admit::Yes(conn) => {
                                return (
                                    LimitedIo {
                                        tcp,
                                        conn,
                                        table: Arc::clone(&self.table),
                                    },
                                    addr,
                                );
                            }
                            // Their tasks close them as soon as they run.
                            Admit::Draining if Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            Admit::Full | Admit::Draining => {
                                self.table.metrics.refused.inc();
                                let _ = tcp.try_write(refused_answer().as_bytes());
                                break;
                            }
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => {
                    // Out of descriptors (or kernel memory) although the caps are sized
                    // under the limit: something else holds them. Free an idle
                    // connection and retry soon, rather than stall for a second.
                    tracing::error!(error = %e, open = self.table.open(), "accept failed");
                    let closed = self.table.lock().close_one_idle(None, Instant::now());
                    if closed {
                        self.table.metrics.evicted.inc();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// An admitted connection: a TCP stream that reads end-of-file once the table closes
/// it, and leaves the table when dropped.
#[derive(Debug)]
pub struct LimitedIo {
    tcp: TcpStream,
    conn: Arc<Conn>,
    table: Arc<ConnTable>,
}

impl Drop for LimitedIo {
    fn drop(&mut self) {
        self.table.remove(&self.conn);
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.conn.closing.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        {
            let mut w = this.conn.waker.lock().unwrap_or_else(|p| p.into_inner());
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        if this.conn.closing.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// The connection a request arrived on, for [`track_busy`].
#[derive(Debug, Clone)]
pub struct ConnHandle(pub Arc<Conn>);

impl Connected<IncomingStream<'_, LimitedListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, LimitedListener>) -> Self {
        Self(Arc::clone(&stream.io().conn))
    }
}

/// Marks a connection busy while one of its requests is served.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(c: Arc<Conn>) -> Self {
        c.served.fetch_add(1, Ordering::AcqRel);
        c.busy.fetch_add(1, Ordering::AcqRel);
        Self(c)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Middleware: the connection is busy from here until the response body is done.
pub async fn track_busy(req: Request, next: Next) -> Response {
    let Some(ConnectInfo(ConnHandle(conn))) =
        req.extensions().get::<ConnectInfo<ConnHandle>>().cloned()
    else {
        return next.run(req).await;
    };
    let busy = Busy::new(conn);
    let resp = next.run(req).await;
    if axum::body::HttpBody::size_hint(resp.body())
        .exact()
        .is_some()
    {
        // A whole body: written at once, busy no longer.
        drop(busy);
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let stream = futures_util::StreamExt::map(body.into_data_stream(), move |chunk| {
        let _busy = &busy;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    impl ConnTable {
        fn admit_now(&self, peer: IpAddr) -> Option<Arc<Conn>> {
            match self.admit(peer) {
                Admit::Yes(c) => Some(c),
                Admit::Full | Admit::Draining => None,
            }
        }
    }

    fn table(max: usize, per_peer: usize) -> ConnTable {
        let mut r = clawos_service::Metrics::new();
        ConnTable {
            limits: ConnLimits {
                max_connections: max,
                max_per_peer: per_peer,
                ..ConnLimits::default()
            },
            table: Mutex::new(Table::default()),
            metrics: ConnMetrics {
                evicted: r.counter("e", "e"),
                refused: r.counter("r", "r"),
                timed_out: r.counter("t", "t"),
                open: r.gauge("o", "o"),
            },
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    #[test]
    fn a_full_table_closes_idle_connections_never_busy_ones() {
        let t = table(4, 4);
        let first = t.admit_now(A).expect("admit");
        let busy: Vec<Arc<Conn>> = (0..3).map(|_| t.admit_now(A).expect("admit")).collect();
        let guards: Vec<Busy> = busy.iter().map(|c| Busy::new(Arc::clone(c))).collect();
        // Full: the one idle connection makes room, then nothing more is idle.
        let second = t.admit_now(A).expect("room made");
        assert!(first.closing.load(Ordering::Acquire));
        assert!(!busy.iter().any(|c| c.closing.load(Ordering::Acquire)));
        let _g = Busy::new(Arc::clone(&second));
        assert!(t.admit_now(A).is_none(), "all busy: refused");
        drop(guards);
        assert!(
            t.admit_now(A).is_some(),
            "a finished request leaves its connection idle"
        );
    }

    #[test]
    fn never_used_connections_go_before_keep_alive_ones() {
        let t = table(2, 2);
        let used = t.admit_now(A).expect("admit");
        drop(Busy::new(Arc::clone(&used)));
        let never = t.admit_now(A).expect("admit");
        t.admit_now(A).expect("room");
        assert!(never.closing.load(Ordering::Acquire));
        assert!(!used.closing.load(Ordering::Acquire));
    }

    #[test]
    fn a_peer_at_its_cap_displaces_only_its_own() {
        let t = table(10, 2);
        let b = t.admit_now(B).expect("admit");
        let a1 = t.admit_now(A).expect("admit");
        t.admit_now(A).expect("admit");
        t.admit_now(A).expect("room from A's own");
        assert!(a1.closing.load(Ordering::Acquire));
        assert!(!b.closing.load(Ordering::Acquire));
    }

    #[test]
    fn header_and_idle_timeouts() {
        let t = table(10, 10);
        let silent = t.admit_now(A).expect("admit");
        let kept = t.admit_now(A).expect("admit");
        drop(Busy::new(Arc::clone(&kept)));
        let now = Instant::now();
        t.reap(now + Duration::from_secs(11));
        assert!(
            silent.closing.load(Ordering::Acquire),
            "no request head in 10 s"
        );
        assert!(
            !kept.closing.load(Ordering::Acquire),
            "keep-alive for 120 s"
        );
        t.reap(now + Duration::from_secs(121));
        assert!(kept.closing.load(Ordering::Acquire));
    }
}
