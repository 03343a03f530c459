//! The host ↔ guest control protocol spoken over vsock (port [`CONTROL_PORT`]).
//!
//! One operation per connection. Every frame is `u32` big-endian length (of kind +
//! payload), one kind byte, payload. The host opens with a [`Kind::Control`] frame
//! holding a [`Request`] (the VM's secret plus the operation); the guest answers with
//! [`Reply`] control frames and data frames as the operation needs:
//!
//! - `health` → `health`
//! - `exec` → `started`, then `stdout`/`stderr` frames, then `exit`; the host may send
//!   `stdin` frames and one `end` (stdin closed) meanwhile
//! - `put` → host sends `data` frames and `end`; guest answers `ok`
//! - `get` → `size`, `data` frames, `end`
//! - `list` → `entries`
//! - `shutdown` → `ok`, then the guest powers off
//! - `runtime` → `runtime` (which agent runtime runs, whether it answers, and its
//!   per-boot gateway token when it has one)
//!
//! Any failure is an `error` reply, after which the guest closes the connection.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Guest port of the control service.
pub const CONTROL_PORT: u32 = 1024;
/// Host port the guest's `clawos-audit` streams syscall records to; vm-launcher
/// relays `<vsock>_2084` to monitor-daemon.
pub const AUDIT_PORT: u32 = 2084;
/// Port of the LLM relay: guest `127.0.0.1:11435` → host port 11435 → inference proxy.
pub const PROXY_PORT: u32 = 11435;
/// Port of the skills relay: guest `127.0.0.1:2083` → host port 2083 → skill-manager's
/// MCP endpoint (the launcher attaches the VM's token for skill-manager).
pub const SKILLS_PORT: u32 = 2083;
/// Port of the agent gateway (OpenClaw's default), host → guest.
pub const GATEWAY_PORT: u32 = 18789;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// Payload size used for streamed data.
pub const CHUNK: usize = 64 * 1024;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Control = 1,
    Stdin = 2,
    Stdout = 3,
    Stderr = 4,
    Data = 5,
    End = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Control,
            2 => Self::Stdin,
            3 => Self::Stdout,
            4 => Self::Stderr,
            5 => Self::Data,
            6 => Self::End,
            _ => return None,
        })
    }
}

/// The host's opening message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The VM's control secret (hex), which the guest compares in constant time.
    pub secret: String,
    pub op: Op,
}

/// An operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Health,
    Exec(ExecRequest),
    Put {
        path: String,
        size: u64,
        mode: Option<u32>,
    },
    Get {
        path: String,
    },
    List {
        path: String,
    },
    Shutdown,
    /// Which agent runtime the guest runs, and what the host needs to drive it.
    Runtime,
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whether the host will send stdin; otherwise stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the command (and its process group) after this long.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
}

/// The guest's control messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Ok,
    Health {
        boot: u64,
        uptime_ms: u64,
    },
    Started {
        pid: u32,
    },
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    Size {
        size: u64,
    },
    Entries {
        entries: Vec<Entry>,
    },
    Error {
        message: String,
    },
    /// The answer to [`Op::Runtime`].
    Runtime(RuntimeInfo),
}

/// The agent runtime a guest runs, as its guest agent reports it. Its `Debug` leaves
/// the token out, so no log or error message that prints a reply carries it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    /// `clawos-agentd` (the built-in runtime), `openclaw`, ...; `none` when the image
    /// has no agent runtime.
    pub name: String,
    /// Its version, as the image records it.
    pub version: String,
    /// Whether its agent API answers `GET /healthz` on guest port [`GATEWAY_PORT`] now.
    pub healthy: bool,
    /// The token its gateway requires (`Authorization: Bearer`), made fresh at each
    /// boot in the guest's tmpfs; `None` for a runtime without one. It opens only the
    /// gateway on guest loopback: no credential for anything outside the VM.
    #[serde(default)]
    pub gateway_token: Option<String>,
}

impl std::fmt::Debug for RuntimeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeInfo")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("healthy", &self.healthy)
            .field(
                "gateway_token",
                &self.gateway_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Encodes one frame.
pub fn encode(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 5);
    f.extend_from_slice(&(payload.len() as u32 + 1).to_be_bytes());
    f.push(kind as u8);
    f.extend_from_slice(payload);
    f
}

/// Encodes a control frame.
pub fn encode_json<T: Serialize>(msg: &T) -> Vec<u8> {
    encode(Kind::Control, &serde_json::to_vec(msg).unwrap_or_default())
}

/// Checks a frame header (`len` counts kind + payload); returns kind and payload size.
pub fn parse_header(header: [u8; 5]) -> io::Result<(Kind, usize)> {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len == 0 || len - 1 > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad frame length {len}"),
        ));
    }
    let kind = Kind::from_u8(header[4]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad frame kind {}", header[4]),
        )
    })?;
    Ok((kind, len - 1))
}

/// Reads one frame; `None` on a clean end of stream before a header.
pub fn read_frame<R: Read>(r: &mut R) -> io::Result<Option<(Kind, Vec<u8>)>> {
    let mut header = [0u8; 5];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let (kind, len) = parse_header(header)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((kind, payload)))
}

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, kind: Kind, payload: &[u8]) -> io::Result<()> {
    w.write_all(&encode(kind, payload))
}

/// Compares secrets without an early exit on the first differing byte.
pub fn secrets_match(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() || a.is_empty() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_runtime_reply_never_prints_its_token() {
        let info = RuntimeInfo {
            name: "openclaw".into(),
            version: "1".into(),
            healthy: true,
            gateway_token: Some("tok-0123456789abcdef".into()),
        };
        let shown = format!("{:?}", Reply::Runtime(info.clone()));
        assert!(!shown.contains("tok-0123456789abcdef"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
        // The wire still carries it.
        let json = serde_json::to_string(&Reply::Runtime(info)).expect("json");
        assert!(json.contains("tok-0123456789abcdef"));
    }

    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut buf = encode(Kind::Stdout, b"hello");
        buf.extend(encode_json(&Reply::Exit {
            code: Some(3),
            signal: None,
            timed_out: false,
        }));
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).expect("frame"),
            Some((Kind::Stdout, b"hello".to_vec()))
        );
        let (k, p) = read_frame(&mut r).expect("frame").expect("some");
        assert_eq!(k, Kind::Control);
        let reply: Reply = serde_json::from_slice(&p).expect("json");
        assert_eq!(
            reply,
            Reply::Exit {
                code: Some(3),
                signal: None,
                timed_out: false
            }
        );
        assert_eq!(read_frame(&mut r).expect("eof"), None);
        assert!(parse_header([0, 0, 0, 0, 1]).is_err());
        assert!(parse_header([0, 0x20, 0, 0, 1]).is_err());
        assert!(parse_header([0, 0, 0, 1, 99]).is_err());
    }

    #[test]
    fn requests_serialize_with_an_op_tag() {
        let r = Request {
            secret: "s".into(),
            op: Op::Get { path: "a".into() },
        };
        let j = serde_json::to_string(&r).expect("json");
        assert_eq!(j, r#"{"secret":"s","op":{"op":"get","path":"a"}}"#);
    }

    #[test]
    fn secret_comparison() {
        assert!(secrets_match("abc", "abc"));
        assert!(!secrets_match("abc", "abd"));
        assert!(!secrets_match("abc", "ab"));
        assert!(!secrets_match("", ""));
    }
}
