//! What connects a running VM to the host's other services: the LLM relay (guest
//! `127.0.0.1:11435` → vsock → inference-proxy, HTTP-aware: the guest's credentials are
//! dropped and the VM's agent token attached), the skills relay (guest
//! `127.0.0.1:2083` → skill-manager's MCP endpoint, the same way with a token for
//! skill-manager), the guest's syscall audit stream (→
//! monitor-daemon's guest socket), and the registration of the VM's host processes
//! with monitor-daemon. A VM's relays live in one task its supervisor ends with it.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use clawos_guest_protocol::{AUDIT_PORT, PROXY_PORT, SKILLS_PORT};
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

/// The skills relay: MCP requests (each a short POST, and at most a few streams open
/// while a tool runs; a skill's own time limit is far below the idle one).
pub const SKILLS_LIMITS: RelayLimits = RelayLimits {
    max_connections: 16,
    first_byte: Duration::from_secs(30),
    idle: Duration::from_secs(300),
};

/// The audit relay: one stream per VM (a second while the first is being replaced).
pub const AUDIT_LIMITS: RelayLimits = RelayLimits {
    max_connections: 2,
    first_byte: Duration::from_secs(30),
    idle: Duration::from_secs(600),
};

/// The tokens a VM's relays attach, one per host service.
#[derive(Debug, Clone)]
pub struct Identities {
    /// For inference-proxy.
    pub llm: AgentIdentity,
    /// For skill-manager.
    pub skills: AgentIdentity,
}

/// Starts the VM's host-side relays in `sockets` (its directory, or a jailed
/// Firecracker's chroot): LLM traffic always (with the VM's LLM token attached, or 503
/// without one), skills when skill-manager is configured (with the VM's skills token),
/// the audit stream when a monitor is configured. `refused` counts guest connections
/// closed for being over a limit.
pub fn start(
    cfg: &Config,
    name: &VmName,
    sockets: PathBuf,
    identities: Identities,
    refused: Counter,
) -> JoinHandle<()> {
    let llm = HttpRelay {
        name: "llm",
        port: PROXY_PORT,
        target: cfg.inference_proxy_authority.clone(),
        limits: LLM_LIMITS,
        paths: &[],
    };
    let proxy = http_relay(
        sockets.clone(),
        name.clone(),
        llm,
        identities.llm,
        refused.clone(),
    );
    let skills = cfg.skills_authority.clone().map(|target| {
        let relay = HttpRelay {
            name: "skills",
            port: SKILLS_PORT,
            target,
            limits: SKILLS_LIMITS,
            // MCP only: skill-manager's operator API and metrics are not the agents'.
            paths: &["/mcp"],
        };
        http_relay(
            sockets.clone(),
            name.clone(),
            relay,
            identities.skills,
            refused.clone(),
        )
    });
    let audit = cfg
        .monitor_url
        .is_some()
        .then(|| audit_relay(sockets, name.clone(), cfg.state_dir.clone(), refused));
    tokio::spawn(async move {
        tokio::join!(
            proxy,
            async {
                if let Some(s) = skills {
                    s.await;
                }
            },
            async {
                if let Some(a) = audit {
                    a.await;
                }
            }
        );
    })
}

/// Removes the relays' sockets once the VM has ended.
pub fn remove_sockets(dir: &Path) {
    for port in [PROXY_PORT, SKILLS_PORT, AUDIT_PORT] {
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
/// attached: LLM traffic and skills (MCP).
#[derive(Debug, Clone)]
pub struct HttpRelay {
    /// Short name in logs and metrics (`llm`).
    pub name: &'static str,
    pub port: u32,
    /// `host:port` of the service.
    pub target: String,
    pub limits: RelayLimits,
    /// The only paths a guest may ask for (exactly, any query); empty: any path.
    pub paths: &'static [&'static str],
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
    if !relay.paths.is_empty() && !relay.paths.contains(&req.uri().path()) {
        tracing::debug!(vm = %vm, relay = relay.name, path = %req.uri().path(), "guest request for a path the relay does not serve");
        return Ok(relay_error(
            hyper::StatusCode::NOT_FOUND,
            &format!(
                "ClawOS relay: the {} relay serves only {}",
                relay.name,
                relay.paths.join(", ")
            ),
        ));
    }
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
mod tests;
