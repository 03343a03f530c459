//! What connects a running VM to the host's other services: the LLM relay (guest
//! `127.0.0.1:11435` → vsock → inference-proxy), the guest's syscall audit stream (→
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
/// Firecracker's chroot): LLM traffic always, the audit stream when a monitor is
/// configured. `refused` counts guest connections closed for being over a limit.
pub fn start(cfg: &Config, name: &VmName, sockets: PathBuf, refused: Counter) -> JoinHandle<()> {
    let proxy = proxy_relay(
        sockets.clone(),
        name.clone(),
        cfg.inference_proxy_authority.clone(),
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

/// Relays guest connections to the inference proxy: the guest agent forwards its
/// `127.0.0.1:11435` to host vsock port 11435, which arrives on `<vsock>_11435` here.
async fn proxy_relay(dir: PathBuf, vm: VmName, target: String, refused: Counter) {
    let listener = match bind_in_dir(&dir, &format!("{VSOCK_SOCKET}_{PROXY_PORT}")) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "LLM relay not available");
            return;
        }
    };
    let mut gate = Gate::new(LLM_LIMITS, "llm", &vm, refused);
    loop {
        let Some((guest, permit)) = gate.accept(&listener).await else {
            continue;
        };
        let target = target.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // The proxy connection is opened only once the guest has said something.
            let Some(mut guest) = first_byte(guest, LLM_LIMITS).await else {
                return;
            };
            match tokio::net::TcpStream::connect(&target).await {
                Ok(mut upstream) => {
                    pump(&mut guest, &mut upstream, LLM_LIMITS.idle).await;
                }
                Err(e) => {
                    tracing::warn!(%target, error = %e, "inference proxy unreachable for a guest connection")
                }
            }
        });
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
    let watchdog = async {
        loop {
            let quiet = start
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut a, b) => {}
        () = watchdog => tracing::debug!("relay connection idle; closed"),
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
