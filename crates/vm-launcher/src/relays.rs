//! What connects a running VM to the host's other services: the LLM relay (guest
//! `127.0.0.1:11435` → vsock → inference-proxy, HTTP-aware: the guest's credentials are
//! dropped and the VM's agent token attached), the guest's syscall audit stream (→
//! monitor-daemon's guest socket), and the registration of the VM's host processes
//! with monitor-daemon. A VM's relays live in one task its supervisor ends with it.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use clawos_guest_protocol::{AUDIT_PORT, PROXY_PORT};
use clawos_service::metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::backend::{VSOCK_SOCKET, bind_in_dir};
use crate::config::Config;
use crate::identity::AgentIdentity;
use crate::names::VmName;
use crate::store::VmRecord;

/// What one VM's guest may hold open through one relay: every connection costs the
/// launcher (and the service behind it) file descriptors, so a guest gets a bounded
/// share, and a connection that says nothing, or goes quiet, is closed.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Connections open at once; more are closed as soon as they arrive.
    pub max_connections: usize,
    /// How long a new connection may take to send its first byte.
    pub first_byte: Duration,
    /// How long a connection may carry nothing in either direction.
    pub idle: Duration,
}

/// The LLM relay: a few requests in flight per agent, streams that can last minutes
/// (they carry events while the model writes).
pub const LLM_LIMITS: RelayLimits = RelayLimits {
    max_connections: 32,
    first_byte: Duration::from_secs(30),
    idle: Duration::from_secs(300),
};

/// The audit relay: one stream per VM (a second while the first is being replaced).
pub const AUDIT_LIMITS: RelayLimits = RelayLimits {
    max_connections: 2,
    first_byte: Duration::from_secs(30),
    idle: Duration::from_secs(600),
};

/// Starts the VM's host-side relays in `sockets` (its directory, or a jailed
/// Firecracker's chroot): LLM traffic always (with `identity`'s token attached, or 503
/// without one), the audit stream when a monitor is configured. `refused` counts guest
/// connections closed for being over a limit.
pub fn start(
    cfg: &Config,
    name: &VmName,
    sockets: PathBuf,
    identity: AgentIdentity,
    refused: Counter,
) -> JoinHandle<()> {
    let llm = HttpRelay {
        name: "llm",
        port: PROXY_PORT,
        target: cfg.inference_proxy_authority.clone(),
        limits: LLM_LIMITS,
    };
    let proxy = http_relay(
        sockets.clone(),
        name.clone(),
        llm,
        identity,
        refused.clone(),
    );
    let audit = cfg
        .monitor_url
        .is_some()
        .then(|| audit_relay(sockets, name.clone(), cfg.state_dir.clone(), refused));
    tokio::spawn(async move {
        tokio::join!(proxy, async {
            if let Some(a) = audit {
                a.await;
            }
        });
    })
}

/// Removes the relays' sockets once the VM has ended.
pub fn remove_sockets(dir: &Path) {
    for port in [PROXY_PORT, AUDIT_PORT] {
        let _ = std::fs::remove_file(dir.join(format!("{VSOCK_SOCKET}_{port}")));
    }
}

/// Relays the guest's syscall audit stream (its `clawos-audit` connects to host vsock
/// port 2084, which arrives on `<vsock>_2084` here) to monitor-daemon's guest socket.
/// The header line names the VM: the guest cannot choose where its events are filed.
/// A monitor that is down ends the guest's connection; the guest queues and retries.
async fn audit_relay(dir: PathBuf, vm: VmName, state_dir: PathBuf, refused: Counter) {
    use tokio::io::AsyncWriteExt;
    let listener = match bind_in_dir(&dir, &format!("{VSOCK_SOCKET}_{AUDIT_PORT}")) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(vm = %vm, dir = %dir.display(), error = %e, "guest audit relay not available");
            return;
        }
    };
    let socket = clawos_monitor_api::guest_socket_path(&state_dir);
    let token_path = clawos_monitor_api::token_path(&state_dir);
    let mut gate = Gate::new(AUDIT_LIMITS, "audit", &vm, refused);
    loop {
        let Some((guest, permit)) = gate.accept(&listener).await else {
            continue;
        };
        let (vm, socket, token_path) = (vm.clone(), socket.clone(), token_path.clone());
        tracing::debug!(vm = %vm, "guest audit connection");
        tokio::spawn(async move {
            let _permit = permit;
            let Some(mut guest) = first_byte(guest, AUDIT_LIMITS).await else {
                tracing::debug!(vm = %vm, "guest audit connection said nothing");
                return;
            };
            // A monitor that is down (restarting) is waited for, with the guest's
            // connection held: closing a connection the guest has just opened can
            // leave it stuck on the vsock device's side (seen with vhost-device-vsock:
            // the guest's next connections never arrived), while a held one simply
            // carries the queued records once the monitor is back.
            let waited_since = Instant::now();
            let mut told = false;
            let (token, mut monitor) = loop {
                let token = tokio::fs::read_to_string(&token_path)
                    .await
                    .map(|t| t.trim().to_owned());
                let connected = match &token {
                    Ok(_) => tokio::net::UnixStream::connect(&socket).await,
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                };
                match (token, connected) {
                    (Ok(t), Ok(m)) => break (t, m),
                    (_, Err(e)) => {
                        if !told {
                            told = true;
                            tracing::info!(vm = %vm, socket = %socket.display(), error = %e, "monitor-daemon not taking guest streams; holding the guest's stream until it does");
                        }
                        if waited_since.elapsed() > AUDIT_LIMITS.idle {
                            tracing::warn!(vm = %vm, "monitor-daemon still away; closing the guest's audit stream (it reconnects)");
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    (Err(e), Ok(_)) => {
                        tracing::warn!(vm = %vm, path = %token_path.display(), error = %e, "no monitor-daemon token; guest audit stream waits");
                        return;
                    }
                }
            };
            let header = clawos_monitor_api::GuestStreamHeader {
                token,
                agent: vm.to_string(),
                vm: vm.to_string(),
            };
            let mut line = serde_json::to_vec(&header).unwrap_or_default();
            line.push(b'\n');
            // Both ways: records to the monitor, its acknowledgements back.
            if monitor.write_all(&line).await.is_ok() {
                tracing::debug!(vm = %vm, "guest audit stream relayed to monitor-daemon");
                pump(&mut guest, &mut monitor, AUDIT_LIMITS.idle).await;
                tracing::debug!(vm = %vm, "guest audit stream ended");
            }
        });
    }
}

/// A guest-facing host service reached through the VM's relay: the guest connects to
/// host vsock port `port`, the launcher speaks HTTP/1.1 with it, and forwards each
/// request to `target` with the guest's credentials removed and the VM's agent token
/// attached. LLM traffic now; skills and orchestrator messages take the same shape.
#[derive(Debug, Clone)]
pub struct HttpRelay {
    /// Short name in logs and metrics (`llm`).
    pub name: &'static str,
    pub port: u32,
    /// `host:port` of the service.
    pub target: String,
    pub limits: RelayLimits,
}

/// Headers a guest may not send on: its own credentials (the relay attaches the VM's),
/// and hop-by-hop headers that belong to the guest's connection only.
const STRIPPED: [&str; 10] = [
    "x-api-key",
    "authorization",
    "proxy-authorization",
    "cookie",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// How long a guest request waits for the VM's first token (minted while it boots).
const TOKEN_WAIT: Duration = Duration::from_secs(5);

type RelayBody = http_body_util::combinators::BoxBody<hyper::body::Bytes, hyper::Error>;

/// Serves a relay's guest connections: HTTP/1.1 from the guest, each request forwarded
/// with the VM's token in place of whatever the guest sent.
async fn http_relay(
    dir: PathBuf,
    vm: VmName,
    relay: HttpRelay,
    identity: AgentIdentity,
    refused: Counter,
) {
    let listener = match bind_in_dir(&dir, &format!("{VSOCK_SOCKET}_{}", relay.port)) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(vm = %vm, dir = %dir.display(), relay = relay.name, error = %e, "relay not available");
            return;
        }
    };
    let mut gate = Gate::new(relay.limits, relay.name, &vm, refused);
    let relay = Arc::new(relay);
    loop {
        let Some((guest, permit)) = gate.accept(&listener).await else {
            continue;
        };
        let (vm, relay, identity) = (vm.clone(), Arc::clone(&relay), identity.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Some(mut guest) = first_byte(guest, relay.limits).await else {
                return;
            };
            let (idle, name, log_vm) = (relay.limits.idle, relay.name, vm.clone());
            let service = hyper::service::service_fn(move |req| {
                forward(req, Arc::clone(&relay), vm.clone(), identity.clone())
            });
            // Nothing moving to or from the guest for `idle` closes the connection, in
            // the middle of a request or an answer too (a header timeout alone would let
            // a guest hold its slot, and a connection to the service, with a body it
            // never finishes).
            let start = Instant::now();
            let last = Arc::new(AtomicU64::new(0));
            let watched = Watched {
                inner: &mut guest,
                start,
                last: Arc::clone(&last),
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                // Between requests on a kept-alive connection, and for a request's head.
                .header_read_timeout(idle)
                .serve_connection(hyper_util::rt::TokioIo::new(watched), service);
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "guest relay connection ended");
                    }
                }
                () = quiet_for(idle, start, &last) => {
                    tracing::debug!(vm = %log_vm, relay = name, "guest relay connection idle; closed");
                }
            }
        });
    }
}

/// An answer the relay makes itself, in the error shape LLM clients read (Anthropic's,
/// which OpenAI clients also show as a message).
fn relay_error(status: hyper::StatusCode, message: &str) -> hyper::Response<RelayBody> {
    use http_body_util::BodyExt;
    let body = serde_json::json!({
        "type": "error",
        "error": { "type": "api_error", "message": message },
    });
    let mut resp = hyper::Response::new(
        http_body_util::Full::new(hyper::body::Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Forwards one guest request: credentials replaced, `Host` set to the service.
async fn forward(
    mut req: hyper::Request<hyper::body::Incoming>,
    relay: Arc<HttpRelay>,
    vm: VmName,
    identity: AgentIdentity,
) -> Result<hyper::Response<RelayBody>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    let token = match identity.token_within(TOKEN_WAIT).await {
        Ok(t) => t,
        Err(why) => {
            tracing::warn!(vm = %vm, relay = relay.name, path = %req.uri().path(), reason = %why, "guest request refused: no agent token to attach");
            return Ok(relay_error(
                hyper::StatusCode::SERVICE_UNAVAILABLE,
                &format!("ClawOS relay: {why}"),
            ));
        }
    };
    let headers = req.headers_mut();
    // What the guest names in `Connection` is hop-by-hop too (RFC 9110 §7.6.1); the
    // body's framing stays (hyper frames what it forwards from these headers).
    let listed: Vec<hyper::header::HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| hyper::header::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| n != hyper::header::CONTENT_LENGTH && n != hyper::header::TRANSFER_ENCODING)
        .collect();
    for h in listed {
        headers.remove(h);
    }
    for h in STRIPPED {
        headers.remove(h);
    }
    let Ok(bearer) = hyper::header::HeaderValue::from_str(&format!("Bearer {}", token.jwt)) else {
        return Ok(relay_error(
            hyper::StatusCode::INTERNAL_SERVER_ERROR,
            "ClawOS relay: the agent token is not a valid header value",
        ));
    };
    headers.insert(hyper::header::AUTHORIZATION, bearer);
    if let Ok(host) = hyper::header::HeaderValue::from_str(&relay.target) {
        headers.insert(hyper::header::HOST, host);
    }
    // Only the path and query travel: the guest does not choose where this goes.
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    match path.parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => {
            return Ok(relay_error(
                hyper::StatusCode::BAD_REQUEST,
                "ClawOS relay: bad request target",
            ));
        }
    }
    let method = req.method().clone();
    let upstream = match tokio::net::TcpStream::connect(&relay.target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(vm = %vm, relay = relay.name, target = %relay.target, error = %e, "host service unreachable for a guest request");
            return Ok(relay_error(
                hyper::StatusCode::BAD_GATEWAY,
                &format!(
                    "ClawOS relay: the host's {} service is unreachable",
                    relay.name
                ),
            ));
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(
        hyper_util::rt::TokioIo::new(upstream),
    )
    .await
    {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(vm = %vm, relay = relay.name, error = %e, "host service handshake failed");
            return Ok(relay_error(
                hyper::StatusCode::BAD_GATEWAY,
                "ClawOS relay: host service connection failed",
            ));
        }
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    match sender.send_request(req).await {
        Ok(resp) => {
            tracing::debug!(vm = %vm, relay = relay.name, %method, %path, status = resp.status().as_u16(), "guest request relayed");
            Ok(resp.map(|b| b.boxed()))
        }
        Err(e) => {
            tracing::warn!(vm = %vm, relay = relay.name, error = %e, "host service failed a guest request");
            Ok(relay_error(
                hyper::StatusCode::BAD_GATEWAY,
                "ClawOS relay: the host service failed the request",
            ))
        }
    }
}

/// Admits a relay's guest connections up to its limit.
struct Gate {
    slots: Arc<Semaphore>,
    limits: RelayLimits,
    relay: &'static str,
    vm: VmName,
    refused: Counter,
    /// When a refusal was last logged (refusals come in floods; one line a minute).
    last_warned: Option<Instant>,
}

impl Gate {
    fn new(limits: RelayLimits, relay: &'static str, vm: &VmName, refused: Counter) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            relay,
            vm: vm.clone(),
            refused,
            last_warned: None,
        }
    }

    /// The next guest connection with its slot; a connection over the limit is
    /// closed at once (and counted), so it holds no descriptor.
    async fn accept(
        &mut self,
        listener: &tokio::net::UnixListener,
    ) -> Option<(UnixStream, tokio::sync::OwnedSemaphorePermit)> {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: let the ones in use drain a little.
                tracing::warn!(vm = %self.vm, relay = self.relay, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                return None;
            }
        };
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => Some((conn, permit)),
            Err(_) => {
                drop(conn);
                self.refused.inc();
                tracing::debug!(vm = %self.vm, relay = self.relay, "guest connection over the limit closed");
                if self
                    .last_warned
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
                {
                    self.last_warned = Some(Instant::now());
                    tracing::warn!(vm = %self.vm, relay = self.relay, limit = self.limits.max_connections, "guest is over its connection limit; closing its new connections");
                }
                None
            }
        }
    }
}

/// Waits for the guest's first byte; `None` (the connection dropped) if it does not
/// come in time.
async fn first_byte(guest: UnixStream, limits: RelayLimits) -> Option<UnixStream> {
    match tokio::time::timeout(limits.first_byte, guest.readable()).await {
        Ok(Ok(())) => Some(guest),
        _ => None,
    }
}

/// Copies both ways until either side ends or nothing moves for `idle`.
async fn pump<A, B>(a: &mut A, b: &mut B, idle: Duration)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Watched {
        inner: a,
        start,
        last: Arc::clone(&last),
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut a, b) => {}
        () = quiet_for(idle, start, &last) => tracing::debug!("relay connection idle; closed"),
    }
}

/// Returns once a [`Watched`] stream (same `start`, same `last`) has moved nothing for
/// `idle`.
async fn quiet_for(idle: Duration, start: Instant, last: &AtomicU64) {
    loop {
        let quiet = start
            .elapsed()
            .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
        if quiet >= idle {
            return;
        }
        tokio::time::sleep(idle - quiet).await;
    }
}

/// A stream that notes when it last moved bytes (milliseconds since `start`).
struct Watched<'a, S> {
    inner: &'a mut S,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<S> Watched<'_, S> {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Asks monitor-daemon (when configured) to audit the VM's hypervisor and helper
/// processes, tagged with the VM's name. Best effort: a monitor that is down is
/// logged, the VM runs regardless.
pub fn register_with_monitor(cfg: &Config, record: &VmRecord) {
    let Some(url) = cfg.monitor_url.clone() else {
        return;
    };
    let token_path = clawos_monitor_api::token_path(&cfg.state_dir);
    let pids: Vec<u32> = record
        .process
        .iter()
        .chain(record.helpers.iter())
        .map(|p| p.pid)
        .collect();
    let name = record.name.clone();
    tokio::spawn(async move {
        let token = match std::fs::read_to_string(&token_path) {
            Ok(t) => t.trim().to_owned(),
            Err(e) => {
                tracing::warn!(vm = %name, error = %e, path = %token_path.display(), "no monitor-daemon token; VM not audited");
                return;
            }
        };
        let client = clawos_monitor_api::MonitorClient::new(&url, &token);
        for pid in pids {
            let req = clawos_monitor_api::WatchRequest {
                pid: Some(pid),
                cgroup: None,
                agent: name.clone(),
                vm: Some(name.clone()),
            };
            match client.watch(&req).await {
                Ok(()) => tracing::info!(vm = %name, pid, "registered with monitor-daemon"),
                Err(e) => {
                    tracing::warn!(vm = %name, pid, error = %e, "monitor-daemon registration failed")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    const JWT: &str = "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.eyJhZ2VudCI6ImEifQ.c2lnbmF0dXJl";

    /// What the service is answered with: an SSE stream, one event a chunk.
    const EVENTS: [&str; 3] = [
        "event: message_start\ndata: {\"type\":\"message_start\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ];

    const BODY: &str = r#"{"model":"claude-x","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hello"}]}"#;

    fn limits(max_connections: usize) -> RelayLimits {
        RelayLimits {
            max_connections,
            first_byte: Duration::from_secs(20),
            idle: Duration::from_secs(20),
        }
    }

    /// One request as the service received it: the raw head, the body, and the
    /// trailer section of a chunked body.
    #[derive(Debug)]
    struct Received {
        head: String,
        body: Vec<u8>,
        trailers: String,
    }

    impl Received {
        fn request_line(&self) -> &str {
            self.head.lines().next().unwrap_or_default()
        }
        /// Every value of header `name`, as sent on the wire.
        fn values(&self, name: &str) -> Vec<&str> {
            header_values(&self.head, name)
        }
    }

    fn header_values<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
        head.lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect()
    }

    /// A loopback TCP server standing in for the host service: records each request it
    /// gets and answers with [`EVENTS`] chunked; with `gate`, the events after the first
    /// wait for a permit (so a test can tell a relayed stream from a buffered one).
    struct Upstream {
        authority: String,
        received: mpsc::UnboundedReceiver<Received>,
        /// Connections accepted, and connections open now.
        connections: Arc<AtomicUsize>,
        open: Arc<AtomicUsize>,
        gate: Option<Arc<Semaphore>>,
        task: JoinHandle<()>,
    }

    impl Drop for Upstream {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Upstream {
        async fn start(gated: bool) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let authority = listener.local_addr().expect("addr").to_string();
            let (tx, received) = mpsc::unbounded_channel();
            let connections = Arc::new(AtomicUsize::new(0));
            let open = Arc::new(AtomicUsize::new(0));
            let gate = gated.then(|| Arc::new(Semaphore::new(0)));
            let (count, open2, gate2) = (Arc::clone(&connections), Arc::clone(&open), gate.clone());
            let task = tokio::spawn(async move {
                loop {
                    let Ok((conn, _)) = listener.accept().await else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    open2.fetch_add(1, Ordering::SeqCst);
                    let (tx, gate, open) = (tx.clone(), gate2.clone(), Arc::clone(&open2));
                    tokio::spawn(async move {
                        /// Counts the connection closed however its task ends.
                        struct Closed(Arc<AtomicUsize>);
                        impl Drop for Closed {
                            fn drop(&mut self) {
                                self.0.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        let _closed = Closed(open);
                        let (r, mut w) = conn.into_split();
                        let mut r = BufReader::new(r);
                        // One connection may carry several requests.
                        while let Some(head) = read_head(&mut r).await {
                            let Some((body, trailers)) = read_body(&mut r, &head).await else {
                                return;
                            };
                            let _ = tx.send(Received {
                                head,
                                body,
                                trailers,
                            });
                            let answer = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-request-id: req-42\r\ntransfer-encoding: chunked\r\n\r\n";
                            if w.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            for (i, event) in EVENTS.iter().enumerate() {
                                if i == 1
                                    && let Some(g) = &gate
                                {
                                    let Ok(p) = g.acquire().await else { return };
                                    p.forget();
                                }
                                let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                                if w.write_all(chunk.as_bytes()).await.is_err()
                                    || w.flush().await.is_err()
                                {
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            if w.write_all(b"0\r\n\r\n").await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            Self {
                authority,
                received,
                connections,
                open,
                gate,
                task,
            }
        }

        async fn next_request(&mut self) -> Received {
            tokio::time::timeout(Duration::from_secs(10), self.received.recv())
                .await
                .expect("the service got no request within 10 s")
                .expect("service running")
        }
    }

    /// Reads an HTTP head (up to the empty line); `None` at the end of the stream.
    async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<String> {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            if line == "\r\n" {
                return Some(head);
            }
            head.push_str(&line);
        }
    }

    /// Reads one chunk of a chunked body; `None` at the last (empty) one, whose
    /// trailer section is left to read (with [`read_head`]).
    async fn read_chunk<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<Vec<u8>> {
        let mut size = String::new();
        r.read_line(&mut size).await.expect("chunk size");
        let size = usize::from_str_radix(size.trim().split(';').next()?, 16).expect("hex size");
        if size == 0 {
            return None;
        }
        let mut data = vec![0; size + 2];
        r.read_exact(&mut data).await.expect("chunk data");
        assert_eq!(&data[size..], b"\r\n", "chunk ends with CRLF");
        data.truncate(size);
        Some(data)
    }

    /// Reads the body a head announces: its bytes, and the trailer section when it
    /// is chunked. `None` if the connection ends first.
    async fn read_body<R: AsyncBufRead + Unpin>(
        r: &mut R,
        head: &str,
    ) -> Option<(Vec<u8>, String)> {
        let mut body = Vec::new();
        if header_values(head, "transfer-encoding").contains(&"chunked") {
            while let Some(c) = read_chunk(r).await {
                body.extend(c);
            }
            let trailers = read_head(r).await?;
            return Some((body, trailers));
        }
        let len = header_values(head, "content-length")
            .first()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        body.resize(len, 0);
        r.read_exact(&mut body).await.ok()?;
        Some((body, String::new()))
    }

    /// A response as the guest read it.
    #[derive(Debug)]
    struct Reply {
        status: u16,
        head: String,
        body: Vec<u8>,
    }

    impl Reply {
        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).expect("a JSON body")
        }
    }

    fn status_of(head: &str) -> u16 {
        head.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line")
    }

    async fn read_reply<R: AsyncBufRead + Unpin>(r: &mut R) -> Reply {
        let head = tokio::time::timeout(Duration::from_secs(10), read_head(r))
            .await
            .expect("an answer within 10 s")
            .expect("an answer, not the end of the connection");
        let (body, _) = read_body(r, &head).await.expect("the whole body");
        Reply {
            status: status_of(&head),
            head,
            body,
        }
    }

    /// A request as a guest's LLM client would send it, with everything it should not
    /// be able to pass on.
    fn forged_request() -> String {
        format!(
            "POST http://evil.example/v1/messages HTTP/1.1\r\n\
             Host: evil.example\r\n\
             x-api-key: forged\r\n\
             Authorization: Bearer forged\r\n\
             Proxy-Authorization: Basic Zm9yZ2Vk\r\n\
             Cookie: a=b\r\n\
             Connection: keep-alive, x-hop\r\n\
             x-hop: forged\r\n\
             anthropic-version: 2023-06-01\r\n\
             content-type: application/json\r\n\
             content-length: {}\r\n\
             \r\n{BODY}",
            BODY.len()
        )
    }

    /// The LLM relay of a VM in a temporary directory.
    struct Relay {
        dir: tempfile::TempDir,
        refused: Counter,
        task: JoinHandle<()>,
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Relay {
        fn start(target: &str, identity: AgentIdentity, limits: RelayLimits) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let refused = Counter::default();
            let relay = HttpRelay {
                name: "llm",
                port: PROXY_PORT,
                target: target.to_owned(),
                limits,
            };
            let task = tokio::spawn(http_relay(
                dir.path().to_owned(),
                VmName::parse("relay-test").expect("name"),
                relay,
                identity,
                refused.clone(),
            ));
            Self { dir, refused, task }
        }

        /// A guest connection (as the vsock device makes one), once the relay listens.
        async fn guest(&self) -> BufReader<UnixStream> {
            let socket = format!("{VSOCK_SOCKET}_{PROXY_PORT}");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match crate::backend::connect_in_dir(self.dir.path(), &socket).await {
                    Ok(s) => return BufReader::new(s),
                    Err(e) if Instant::now() > deadline => panic!("relay socket: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
    }

    fn fixed() -> AgentIdentity {
        AgentIdentity::fixed(JWT)
    }

    #[test]
    fn the_relay_socket_is_the_vsock_prefix_and_the_guest_port() {
        assert_eq!(VSOCK_SOCKET, "vsock.sock");
        assert_eq!(PROXY_PORT, 11435);
    }

    #[tokio::test]
    async fn the_guests_credentials_are_replaced_by_the_vms_token_and_the_stream_comes_back_intact()
    {
        let mut up = Upstream::start(true).await;
        let relay = Relay::start(&up.authority, fixed(), limits(4));
        let mut guest = relay.guest().await;
        guest
            .get_mut()
            .write_all(forged_request().as_bytes())
            .await
            .expect("send");

        // The answer's head and first event arrive while the service still holds the
        // rest: the relay streams, it does not buffer.
        let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut guest))
            .await
            .expect("an answer head within 10 s")
            .expect("an answer");
        assert_eq!(status_of(&head), 200, "{head}");
        assert_eq!(header_values(&head, "content-type"), ["text/event-stream"]);
        assert_eq!(header_values(&head, "x-request-id"), ["req-42"]);
        let mut body = Vec::new();
        while body.len() < EVENTS[0].len() {
            let chunk = tokio::time::timeout(Duration::from_secs(5), read_chunk(&mut guest))
                .await
                .expect("the first event reaches the guest before the stream ends")
                .expect("more body");
            body.extend(chunk);
        }
        assert_eq!(String::from_utf8_lossy(&body), EVENTS[0]);
        up.gate.as_ref().expect("gated").add_permits(1);
        while let Some(chunk) = read_chunk(&mut guest).await {
            body.extend(chunk);
        }
        read_head(&mut guest).await.expect("the end of the body");
        assert_eq!(String::from_utf8_lossy(&body), EVENTS.concat());

        let got = up.next_request().await;
        assert_eq!(
            got.request_line(),
            "POST /v1/messages HTTP/1.1",
            "{}",
            got.head
        );
        assert_eq!(
            got.values("authorization"),
            [format!("Bearer {JWT}")],
            "{}",
            got.head
        );
        assert_eq!(got.values("host"), [up.authority.as_str()], "{}", got.head);
        for gone in [
            "x-api-key",
            "cookie",
            "proxy-authorization",
            "connection",
            "x-hop",
        ] {
            assert!(
                got.values(gone).is_empty(),
                "{gone} reached the service: {}",
                got.head
            );
        }
        assert!(!got.head.contains("forged"), "{}", got.head);
        assert!(!got.head.contains("evil.example"), "{}", got.head);
        assert_eq!(got.values("anthropic-version"), ["2023-06-01"]);
        assert_eq!(got.values("content-type"), ["application/json"]);
        assert_eq!(String::from_utf8_lossy(&got.body), BODY);
        assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    }

    /// A request with a chunked body whose trailer section tries to add credentials.
    fn chunked_request_with_trailers() -> String {
        let (a, b) = BODY.split_at(BODY.len() / 2);
        format!(
            "POST /v1/messages HTTP/1.1\r\n\
             Host: 127.0.0.1:11435\r\n\
             x-api-key: forged\r\n\
             content-type: application/json\r\n\
             transfer-encoding: chunked\r\n\
             te: trailers\r\n\
             trailer: authorization, x-api-key\r\n\
             \r\n\
             {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\
             authorization: Bearer forged\r\n\
             x-api-key: forged\r\n\
             \r\n",
            a.len(),
            b.len()
        )
    }

    #[tokio::test]
    async fn every_request_on_a_kept_alive_guest_connection_gets_the_token() {
        let mut up = Upstream::start(false).await;
        let relay = Relay::start(&up.authority, fixed(), limits(4));
        let mut guest = relay.guest().await;
        for (i, request) in [
            forged_request(),
            chunked_request_with_trailers(),
            forged_request(),
        ]
        .iter()
        .enumerate()
        {
            guest
                .get_mut()
                .write_all(request.as_bytes())
                .await
                .expect("send");
            let reply = read_reply(&mut guest).await;
            assert_eq!(reply.status, 200, "request {i}: {}", reply.head);
            assert_eq!(String::from_utf8_lossy(&reply.body), EVENTS.concat());
            let got = up.next_request().await;
            assert_eq!(
                got.request_line(),
                "POST /v1/messages HTTP/1.1",
                "request {i}"
            );
            assert_eq!(
                got.values("authorization"),
                [format!("Bearer {JWT}")],
                "request {i}: {}",
                got.head
            );
            assert!(
                got.values("x-api-key").is_empty(),
                "request {i}: {}",
                got.head
            );
            assert!(
                !got.head.contains("forged") && !got.trailers.contains("forged"),
                "request {i}: {}{}",
                got.head,
                got.trailers
            );
            assert_eq!(String::from_utf8_lossy(&got.body), BODY, "request {i}");
        }
        assert_eq!(
            up.connections.load(Ordering::SeqCst),
            3,
            "a new service connection per request"
        );
        assert_eq!(relay.refused.get(), 0);
    }

    #[tokio::test]
    async fn without_an_identity_the_guest_gets_503_and_the_service_no_connection() {
        let up = Upstream::start(false).await;
        let relay = Relay::start(&up.authority, AgentIdentity::unconfigured(), limits(4));
        let mut guest = relay.guest().await;
        let started = Instant::now();
        guest
            .get_mut()
            .write_all(forged_request().as_bytes())
            .await
            .expect("send");
        let reply = read_reply(&mut guest).await;
        assert_eq!(reply.status, 503, "{}", reply.head);
        assert!(
            started.elapsed() < TOKEN_WAIT,
            "no identity configured is final: nothing to wait for ({:?})",
            started.elapsed()
        );
        assert_eq!(
            header_values(&reply.head, "content-type"),
            ["application/json"]
        );
        let v = reply.json();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], "api_error", "{v}");
        let message = v["error"]["message"].as_str().expect("a message");
        assert!(message.starts_with("ClawOS relay: "), "{message}");
        assert!(message.contains("CLAWOS_IDENTITY_URL"), "{message}");
        assert_eq!(
            up.connections.load(Ordering::SeqCst),
            0,
            "a request without a token reached the service"
        );
    }

    #[tokio::test]
    async fn a_service_that_refuses_connections_is_a_502_the_guest_can_read() {
        // A port nothing listens on any more.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .to_string();
        let relay = Relay::start(&closed, fixed(), limits(4));
        let mut guest = relay.guest().await;
        guest
            .get_mut()
            .write_all(forged_request().as_bytes())
            .await
            .expect("send");
        let reply = read_reply(&mut guest).await;
        assert_eq!(reply.status, 502, "{}", reply.head);
        let v = reply.json();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], "api_error", "{v}");
        assert_eq!(
            v["error"]["message"], "ClawOS relay: the host's llm service is unreachable",
            "{v}"
        );
    }

    #[tokio::test]
    async fn a_guest_connection_that_goes_quiet_mid_request_is_closed_after_the_idle_limit() {
        let up = Upstream::start(false).await;
        let limits = RelayLimits {
            idle: Duration::from_millis(300),
            ..limits(2)
        };
        let relay = Relay::start(&up.authority, fixed(), limits);
        let mut guest = relay.guest().await;
        // A head announcing 1000 bytes of body, then 10 of them, then nothing.
        let started = Instant::now();
        guest
            .get_mut()
            .write_all(
                b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{\"model\":",
            )
            .await
            .expect("send");
        let mut rest = Vec::new();
        // Closed (an end of stream or a reset, whichever the close makes).
        let _ = tokio::time::timeout(Duration::from_secs(10), guest.read_to_end(&mut rest))
            .await
            .expect("a quiet guest connection is closed, not held for ever");
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
        // The service's connection, waiting for the rest of the body, is closed too.
        assert_eq!(up.connections.load(Ordering::SeqCst), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while up.open.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "the service's connection stays open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "closed before the idle limit: {:?}",
            started.elapsed()
        );
        // Its slot is free again: two more connections are served, none refused.
        let (mut a, mut b) = (relay.guest().await, relay.guest().await);
        for g in [&mut a, &mut b] {
            g.get_mut()
                .write_all(forged_request().as_bytes())
                .await
                .expect("send");
            assert_eq!(read_reply(g).await.status, 200);
        }
        assert_eq!(relay.refused.get(), 0);
    }

    #[tokio::test]
    async fn a_guest_over_its_connection_limit_has_the_new_connection_closed_and_counted() {
        let mut up = Upstream::start(false).await;
        let relay = Relay::start(&up.authority, fixed(), limits(2));
        let mut first = relay.guest().await;
        let _second = relay.guest().await;
        let mut third = relay.guest().await;
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
            .await
            .expect("the third connection is closed at once");
        assert!(
            matches!(n, Ok(0) | Err(_)),
            "the third connection got data: {n:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while relay.refused.get() == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(relay.refused.get(), 1);

        // The connections within the limit are served.
        first
            .get_mut()
            .write_all(forged_request().as_bytes())
            .await
            .expect("send");
        let reply = read_reply(&mut first).await;
        assert_eq!(reply.status, 200, "{}", reply.head);
        assert_eq!(
            up.next_request().await.values("authorization"),
            [format!("Bearer {JWT}")]
        );

        // A connection that ends gives its slot back.
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut again = relay.guest().await;
            if again
                .get_mut()
                .write_all(forged_request().as_bytes())
                .await
                .is_ok()
                && let Ok(Some(head)) =
                    tokio::time::timeout(Duration::from_secs(5), read_head(&mut again)).await
            {
                assert_eq!(status_of(&head), 200, "{head}");
                break;
            }
            assert!(Instant::now() < deadline, "the slot was never given back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(relay.refused.get() >= 1);
    }
}
