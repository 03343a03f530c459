//! Host side of the hybrid vsock (Firecracker's model, also what `vhost-device-vsock`
//! gives QEMU): connect to the VM's Unix socket, send `CONNECT <port>\n`, read
//! `OK <n>\n`, then speak [`clawos_guest_protocol::frames`] with the guest agent.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use clawos_guest_protocol::frames::{
    self as protocol, CONTROL_PORT, Kind, Op, Reply, Request, RuntimeInfo,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::backend::{VSOCK_SOCKET, connect_in_dir};

/// How long a connection attempt (socket + CONNECT handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
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
    /// Opens a stream to a guest port through the hybrid vsock socket.
    pub async fn connect(
        &self,
        port: u32,
    ) -> Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf), VsockError> {
        let unreachable = |detail: String| VsockError::Unreachable { port, detail };
        let attempt = async {
            let stream = connect_in_dir(&self.dir, VSOCK_SOCKET)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let (r, mut w) = stream.into_split();
            w.write_all(format!("CONNECT {port}\n").as_bytes())
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let mut reader = BufReader::new(r);
            let mut line = String::new();
            reader
                .read_line(&mut line)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            if !line.starts_with("OK ") {
                return Err(unreachable(format!("handshake answered {:?}", line.trim())));
            }
            Ok((reader, w))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| unreachable("timed out".into()))?
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
