//! Host side of the hybrid vsock (Firecracker's model, also what `vhost-device-vsock`
//! gives QEMU): connect to the VM's Unix socket, send `CONNECT <port>\n`, read
//! `OK <n>\n`, then speak [`clawos_guest_protocol::frames`] with the guest agent.
//!
//! The host side never hangs up while its `CONNECT` waits for the guest's answer:
//! `vhost-device-vsock` (0.3.0, and upstream at the time of writing) panics in its
//! vring worker when it cannot write `OK` to a host socket that closed meanwhile, and
//! with that thread gone the VM's vsock is dead until the VM ends. A caller that stops
//! waiting (a timed-out readiness probe, a dropped HTTP request) therefore leaves the
//! handshake to a task that holds the socket until the guest answers or the device
//! closes it, and at most [`MAX_UNANSWERED_CONNECTS`] such attempts per VM are open.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use clawos_guest_protocol::frames::{
    self as protocol, CONTROL_PORT, Kind, Op, Reply, Request, RuntimeInfo,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::backend::{VSOCK_SOCKET, connect_in_dir};

/// How long a caller waits for a connection (socket + CONNECT handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Host-initiated connections to one VM that may wait for the guest's answer at once;
/// more are refused at once (a guest that never answers costs the launcher at most
/// this many sockets).
pub const MAX_UNANSWERED_CONNECTS: usize = 16;

/// Unanswered `CONNECT`s per VM directory.
static UNANSWERED: LazyLock<Mutex<HashMap<PathBuf, usize>>> = LazyLock::new(Default::default);

/// One unanswered `CONNECT` counted in [`UNANSWERED`] until dropped.
#[derive(Debug)]
struct UnansweredConnect {
    dir: PathBuf,
}

impl UnansweredConnect {
    fn take(dir: &Path) -> Option<Self> {
        let mut map = UNANSWERED.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(dir.to_owned()).or_default();
        if *n >= MAX_UNANSWERED_CONNECTS {
            return None;
        }
        *n += 1;
        Some(Self {
            dir: dir.to_owned(),
        })
    }
}

impl Drop for UnansweredConnect {
    fn drop(&mut self) {
        let mut map = UNANSWERED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.dir) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.dir);
            }
        }
    }
}

/// Connects to the VM's hybrid vsock socket in `dir` and asks for guest `port`;
/// returns once the device answered (`OK`, or closed the socket: nothing listens).
async fn handshake(
    dir: &Path,
    port: u32,
) -> Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf), VsockError> {
    let unreachable = |detail: String| VsockError::Unreachable { port, detail };
    let stream = connect_in_dir(dir, VSOCK_SOCKET)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (r, mut w) = stream.into_split();
    w.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let mut reader = BufReader::new(r);
    let mut line = String::new();
    // `OK <port>` is short; a device that sends more is not one.
    (&mut reader)
        .take(64)
        .read_line(&mut line)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if !line.starts_with("OK ") {
        return Err(unreachable(format!("handshake answered {:?}", line.trim())));
    }
    Ok((reader, w))
}
/// How long the guest may take to say which agent runtime it runs (it asks the
/// runtime's `/healthz` for `healthy`, which has a timeout of its own).
const RUNTIME_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors talking to a guest.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Nothing answers on the guest port (not booted yet, or no vsock device).
    #[error("guest port {port} unreachable: {detail}")]
    Unreachable { port: u32, detail: String },
    /// The guest agent refused or failed the operation.
    #[error("guest: {0}")]
    Guest(String),
    /// The connection broke or carried something unexpected.
    #[error("guest connection: {0}")]
    Protocol(String),
}

impl From<io::Error> for VsockError {
    fn from(e: io::Error) -> Self {
        Self::Protocol(e.to_string())
    }
}

/// Reads one frame from the guest.
pub async fn read_frame(r: &mut BufReader<OwnedReadHalf>) -> io::Result<Option<(Kind, Vec<u8>)>> {
    let mut header = [0u8; 5];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let (kind, len) = protocol::parse_header(header)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((kind, payload)))
}

/// Parses a control frame as a reply; an `error` reply becomes [`VsockError::Guest`].
pub fn parse_reply(kind: Kind, payload: &[u8]) -> Result<Reply, VsockError> {
    if kind != Kind::Control {
        return Err(VsockError::Protocol(format!(
            "expected a reply, got a {kind:?} frame"
        )));
    }
    match serde_json::from_slice(payload) {
        Ok(Reply::Error { message }) => Err(VsockError::Guest(message)),
        Ok(r) => Ok(r),
        Err(e) => Err(VsockError::Protocol(format!("malformed reply: {e}"))),
    }
}

/// An open guest connection with the request already sent.
#[derive(Debug)]
pub struct Call {
    pub reader: BufReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
}

impl Call {
    /// The next control reply, skipping nothing: a data frame here is a protocol error.
    pub async fn reply(&mut self) -> Result<Reply, VsockError> {
        match read_frame(&mut self.reader).await? {
            Some((k, p)) => parse_reply(k, &p),
            None => Err(VsockError::Protocol("guest closed the connection".into())),
        }
    }

    /// Sends one frame.
    pub async fn send(&mut self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        self.writer
            .write_all(&protocol::encode(kind, payload))
            .await
    }
}

/// Client for one VM's guest agent.
#[derive(Debug, Clone)]
pub struct GuestClient {
    pub dir: PathBuf,
    pub secret: String,
}

impl GuestClient {
    /// Opens a stream to a guest port through the hybrid vsock socket. Waits at most
    /// [`CONNECT_TIMEOUT`]; the attempt itself goes on in the background until the
    /// guest answers (see the module's doc), also when this future is dropped.
    pub async fn connect(
        &self,
        port: u32,
    ) -> Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf), VsockError> {
        let unreachable = |detail: String| VsockError::Unreachable { port, detail };
        let slot = UnansweredConnect::take(&self.dir).ok_or_else(|| {
            unreachable(format!(
                "{MAX_UNANSWERED_CONNECTS} earlier connection attempts to this guest are \
                 still unanswered"
            ))
        })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let dir = self.dir.clone();
        tokio::spawn(async move {
            let answered = handshake(&dir, port).await;
            drop(slot);
            // If nobody waits any more, the stream is dropped here: after the guest's
            // answer, when closing it is safe.
            let _ = tx.send(answered);
        });
        match tokio::time::timeout(CONNECT_TIMEOUT, rx).await {
            Ok(Ok(answered)) => answered,
            Ok(Err(_)) => Err(unreachable("the connection attempt ended abruptly".into())),
            Err(_) => Err(unreachable("timed out".into())),
        }
    }

    /// Opens a control connection and sends `op`.
    pub async fn call(&self, op: Op) -> Result<Call, VsockError> {
        let (reader, mut writer) = self.connect(CONTROL_PORT).await?;
        let req = Request {
            secret: self.secret.clone(),
            op,
        };
        writer.write_all(&protocol::encode_json(&req)).await?;
        Ok(Call { reader, writer })
    }

    /// The guest agent's health answer.
    pub async fn health(&self) -> Result<Reply, VsockError> {
        let mut c = self.call(Op::Health).await?;
        tokio::time::timeout(Duration::from_secs(2), c.reply())
            .await
            .map_err(|_| VsockError::Protocol("health timed out".into()))?
    }

    /// Which agent runtime the guest runs, with its per-boot gateway token if it has
    /// one (never logged: [`RuntimeInfo`]'s `Debug` shows it, so callers keep it in a
    /// type of their own). A guest that does not know the operation answers an error
    /// ([`VsockError::Guest`]).
    pub async fn runtime(&self) -> Result<RuntimeInfo, VsockError> {
        let mut c = self.call(Op::Runtime).await?;
        let reply = tokio::time::timeout(RUNTIME_TIMEOUT, c.reply())
            .await
            .map_err(|_| VsockError::Protocol("runtime query timed out".into()))??;
        match reply {
            Reply::Runtime(info) => Ok(info),
            other => Err(VsockError::Protocol(format!(
                "expected a runtime reply, got {}",
                reply_kind(&other)
            ))),
        }
    }
}

/// A reply's kind, for messages (a reply's fields are not for the log).
fn reply_kind(r: &Reply) -> &'static str {
    match r {
        Reply::Ok => "ok",
        Reply::Health { .. } => "health",
        Reply::Started { .. } => "started",
        Reply::Exit { .. } => "exit",
        Reply::Size { .. } => "size",
        Reply::Entries { .. } => "entries",
        Reply::Error { .. } => "error",
        Reply::Runtime(_) => "runtime",
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    use super::*;

    /// A stand-in for the device's socket that answers each `CONNECT` after `delay`;
    /// sends whether each answer found the host side still open.
    fn slow_device(dir: &Path, delay: Duration) -> tokio::sync::mpsc::UnboundedReceiver<bool> {
        let listener = UnixListener::bind(dir.join(VSOCK_SOCKET)).expect("bind");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut line = String::new();
                    let _ = BufReader::new(r).read_line(&mut line).await;
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(w.write_all(b"OK 1\n").await.is_ok());
                });
            }
        });
        rx
    }

    fn client(dir: &Path) -> GuestClient {
        GuestClient {
            dir: dir.to_owned(),
            secret: String::new(),
        }
    }

    #[tokio::test]
    async fn a_caller_giving_up_leaves_the_socket_open_until_the_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut answers = slow_device(dir.path(), Duration::from_millis(300));
        let guest = client(dir.path());
        for _ in 0..3 {
            let gave_up =
                tokio::time::timeout(Duration::from_millis(20), guest.connect(CONTROL_PORT)).await;
            assert!(gave_up.is_err(), "the stand-in answers only after 300 ms");
        }
        for _ in 0..3 {
            assert_eq!(
                answers.recv().await,
                Some(true),
                "the host side hung up before the device's answer"
            );
        }
        // Each abandoned attempt gave its place back once answered.
        let (reader, _writer) = guest.connect(CONTROL_PORT).await.expect("connect");
        drop(reader);
        assert!(!UNANSWERED.lock().expect("lock").contains_key(dir.path()));
    }

    #[tokio::test]
    async fn unanswered_connects_per_vm_are_capped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut answers = slow_device(dir.path(), Duration::from_secs(2));
        let guest = client(dir.path());
        for _ in 0..MAX_UNANSWERED_CONNECTS {
            let gave_up =
                tokio::time::timeout(Duration::from_millis(10), guest.connect(CONTROL_PORT)).await;
            assert!(gave_up.is_err());
        }
        let refused = tokio::time::timeout(Duration::from_millis(100), guest.connect(CONTROL_PORT))
            .await
            .expect("refused at once, not waited for");
        let Err(VsockError::Unreachable { detail, .. }) = refused else {
            panic!("expected a refusal, got {refused:?}");
        };
        assert!(detail.contains("still unanswered"), "{detail}");
        // Another VM is not affected.
        let other = tempfile::tempdir().expect("tempdir");
        let _other_answers = slow_device(other.path(), Duration::ZERO);
        client(other.path())
            .connect(CONTROL_PORT)
            .await
            .expect("another VM's guest");
        // Once the device answers, the places are free again.
        for _ in 0..MAX_UNANSWERED_CONNECTS {
            assert_eq!(answers.recv().await, Some(true));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let late =
            tokio::time::timeout(Duration::from_millis(10), guest.connect(CONTROL_PORT)).await;
        assert!(
            late.is_err(),
            "a new attempt waits for the (slow) device again"
        );
    }
}
