//! Forwards the audit trail to a SIEM as CEF over syslog (RFC 5424; octet-counted over
//! TCP and TLS (RFC 5425), one datagram per message over UDP).
//!
//! The forwarder tails the JSONL file from an offset it persists, so the file is its
//! on-disk spool: while the SIEM is unreachable nothing is sent and nothing is lost,
//! and once it is back the backlog goes out in order. The backlog is bounded
//! (`spool_max_bytes`): when it grows past that, the oldest lines are skipped, counted,
//! and reported as a `forward_drops` event — never silently.
//!
//! Delivery: over TCP a line counts as sent once written to a connection that was not
//! closed by the peer just before (checked before every write), so a SIEM that stops
//! does not swallow the gap. UDP has no delivery guarantee at all. A forwarder that
//! crashes resends at most the lines since its last offset save (~200 ms).

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::event::AuditEvent;
use crate::{cef, trail};

/// How a syslog target is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
    /// TCP with TLS; the server certificate must chain to the configured CA and name
    /// the target's IP address.
    Tls,
}

/// A syslog receiver: `tcp://HOST:PORT` or `udp://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub transport: Transport,
    pub addr: SocketAddr,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = match self.transport {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
            Transport::Tls => "tls",
        };
        write!(f, "{t}://{}", self.addr)
    }
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!("syslog target {s:?}: expected tcp://HOST:PORT or udp://HOST:PORT")
        })?;
        let transport = match scheme {
            "tcp" => Transport::Tcp,
            "udp" => Transport::Udp,
            "tls" => Transport::Tls,
            other => return Err(format!("syslog target {s:?}: unknown scheme {other:?}")),
        };
        let addr = rest
            .parse()
            .map_err(|e| format!("syslog target {s:?}: {e} (give an IP address and port)"))?;
        Ok(Self { transport, addr })
    }
}

/// Trust for TLS targets: the CA certificates (PEM) the SIEM's certificate must chain to.
#[derive(Debug, Clone)]
pub struct TlsTrust(pub Arc<rustls::ClientConfig>);

impl TlsTrust {
    /// Reads a PEM bundle; an unreadable file or one without certificates is an error.
    pub fn from_pem_file(path: &std::path::Path) -> Result<Self, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("syslog CA file {}: {e}", path.display()))?;
        for c in certs {
            let c = c.map_err(|e| format!("syslog CA file {}: {e}", path.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("syslog CA file {}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "syslog CA file {} holds no certificate",
                path.display()
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self(Arc::new(cfg)))
    }
}

/// One forwarder's settings.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub target: Target,
    /// Required for `tls://` targets.
    pub tls: Option<TlsTrust>,
    /// The JSONL audit file it tails.
    pub jsonl: PathBuf,
    /// Where it keeps the byte offset of the next line to send.
    pub offset_file: PathBuf,
    /// Largest backlog kept for the SIEM before the oldest lines are dropped.
    pub spool_max_bytes: u64,
    /// Largest syslog message (header included).
    pub max_message: usize,
}

/// Counters of one forwarder.
#[derive(Debug, Default)]
pub struct ForwardStats {
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub backlog_bytes: AtomicU64,
    pub connected: AtomicBool,
    pub connect_failures: AtomicU64,
    /// Inode of the trail file it reads (rotation keeps segments it has not finished).
    pub reading_inode: AtomicU64,
}

enum Conn {
    Tcp(TcpStream),
    Udp(UdpSocket),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

/// Whether the peer closed `s` (or sent something, which a syslog receiver only does to
/// close: a TLS close_notify).
fn peer_gone(s: &TcpStream) -> std::io::Result<bool> {
    s.set_nonblocking(true)?;
    let mut probe = [0u8; 1];
    let peek = s.peek(&mut probe);
    s.set_nonblocking(false)?;
    match peek {
        Ok(0) => Ok(true),
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

impl Conn {
    fn open(t: &Target, tls: Option<&TlsTrust>) -> std::io::Result<Self> {
        match t.transport {
            Transport::Tls => {
                let trust = tls.ok_or_else(|| std::io::Error::other("no CA configured"))?;
                let s = TcpStream::connect_timeout(&t.addr, Duration::from_secs(2))?;
                s.set_nodelay(true)?;
                s.set_write_timeout(Some(Duration::from_secs(5)))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let name = rustls::pki_types::ServerName::IpAddress(t.addr.ip().into());
                let conn = rustls::ClientConnection::new(Arc::clone(&trust.0), name)
                    .map_err(std::io::Error::other)?;
                let mut stream = rustls::StreamOwned::new(conn, s);
                // Handshake now, so a bad certificate shows as a failed connect.
                while stream.conn.is_handshaking() {
                    stream.conn.complete_io(&mut stream.sock)?;
                }
                Ok(Self::Tls(Box::new(stream)))
            }
            Transport::Tcp => {
                let s = TcpStream::connect_timeout(&t.addr, Duration::from_secs(2))?;
                s.set_nodelay(true)?;
                s.set_write_timeout(Some(Duration::from_secs(5)))?;
                Ok(Self::Tcp(s))
            }
            Transport::Udp => {
                let local: SocketAddr = if t.addr.is_ipv4() {
                    "0.0.0.0:0".parse().map_err(std::io::Error::other)?
                } else {
                    "[::]:0".parse().map_err(std::io::Error::other)?
                };
                let s = UdpSocket::bind(local)?;
                s.connect(t.addr)?;
                Ok(Self::Udp(s))
            }
        }
    }

    /// Sends one message; an error means the connection is gone.
    fn send(&mut self, msg: &str) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => {
                // A peer that closed shows as end-of-file here before our write would
                // vanish into its dead socket.
                if peer_gone(s)? {
                    return Err(std::io::ErrorKind::ConnectionAborted.into());
                }
                s.write_all(&cef::octet_counted(msg))
            }
            Self::Tls(s) => {
                if peer_gone(&s.sock)? {
                    return Err(std::io::ErrorKind::ConnectionAborted.into());
                }
                s.write_all(&cef::octet_counted(msg))?;
                s.flush()
            }
            Self::Udp(s) => s.send(msg.as_bytes()).map(drop),
        }
    }
}

/// The saved place: `inode offset` (a bare offset, from before rotation existed,
/// means the live file).
fn read_position(path: &std::path::Path) -> (u64, u64) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut it = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(inode), Some(offset)) => (inode, offset),
        (Some(offset), None) => (0, offset),
        _ => (0, 0),
    }
}

/// The inode of the trail file a forwarder's saved place is in (0: none saved).
pub fn saved_inode(offset_file: &std::path::Path) -> u64 {
    read_position(offset_file).0
}

fn save_position(path: &std::path::Path, inode: u64, offset: u64) {
    // A failed save is retried at the next one; at worst a restart re-sends lines.
    let _ = clawos_service::atomic_write(path, format!("{inode} {offset}").as_bytes(), 0o600);
}

/// Runs a forwarder until `stop`. `report_drops(n)` records a `forward_drops` event.
///
/// It reads the trail's files in order (closed segments, then the live file), keeping
/// its place as (inode, offset) so that a rotation does not move it.
pub fn run(
    cfg: &ForwardConfig,
    stats: &Arc<ForwardStats>,
    report_drops: &dyn Fn(u64),
    stop: &AtomicBool,
) {
    use std::os::unix::fs::MetadataExt;
    let (mut inode, mut offset) = read_position(&cfg.offset_file);
    let mut saved = (inode, offset);
    let mut last_save = Instant::now();
    let mut conn: Option<Conn> = None;
    let mut retry_at = Instant::now();
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) {
        let pieces = trail::pieces(&cfg.jsonl);
        let Some(last) = pieces.len().checked_sub(1) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let idx = match pieces.iter().position(|p| p.inode == inode) {
            Some(i) => i,
            None if inode == 0 => last,
            None => {
                tracing::warn!(target = %cfg.target, "the trail file being forwarded is gone; going on with the oldest one left");
                offset = 0;
                0
            }
        };
        inode = pieces[idx].inode;
        stats.reading_inode.store(inode, Ordering::Relaxed);
        let Ok(mut file) = std::fs::File::open(&pieces[idx].path) else {
            continue;
        };
        let Ok(meta) = file.metadata() else { continue };
        if meta.ino() != inode {
            // Rotated between the listing and the open: list again.
            continue;
        }
        let len = meta.len();
        if offset > len {
            offset = 0;
        }
        let closed = pieces[idx].generation.is_some();
        if closed && offset == len && idx < last {
            // A closed segment is never written again: on to the next file.
            inode = pieces[idx + 1].inode;
            offset = 0;
            continue;
        }
        let later: u64 = pieces[idx + 1..].iter().map(|p| p.len).sum();
        let mut backlog = len - offset + later;
        if backlog > cfg.spool_max_bytes {
            let excess = backlog - cfg.spool_max_bytes;
            let skipped = skip_to_line(&mut file, offset, (offset + excess).min(len));
            if let Some((new_offset, lines)) = skipped {
                offset = new_offset;
                backlog = len - offset + later;
                stats.dropped.fetch_add(lines, Ordering::Relaxed);
                tracing::warn!(target = %cfg.target, lines, "SIEM spool full; oldest events dropped");
                report_drops(lines);
                if closed && offset == len {
                    continue;
                }
            }
        }
        let remaining = len - offset;
        stats.backlog_bytes.store(backlog, Ordering::Relaxed);
        if backlog > 0 && conn.is_none() && Instant::now() >= retry_at {
            match Conn::open(&cfg.target, cfg.tls.as_ref()) {
                Ok(c) => {
                    tracing::info!(target = %cfg.target, "connected to the SIEM");
                    conn = Some(c);
                    backoff = Duration::from_millis(100);
                    stats.connected.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(target = %cfg.target, error = %e, "SIEM unreachable; spooling");
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        let mut progressed = false;
        if let Some(c) = conn.as_mut()
            && remaining > 0
            && file.seek(SeekFrom::Start(offset)).is_ok()
        {
            let mut reader = BufReader::new((&mut file).take(remaining.min(1 << 20)));
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if !line.ends_with('\n') => break, // a line still being written
                    Ok(n) => {
                        let msg = match serde_json::from_str::<AuditEvent>(line.trim_end()) {
                            Ok(e) => {
                                Some(cef::syslog_message(&e, &cef::encode(&e), cfg.max_message))
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "skipping an unreadable audit line");
                                None
                            }
                        };
                        if let Some(m) = msg {
                            if let Err(e) = c.send(&m) {
                                tracing::warn!(target = %cfg.target, error = %e, "SIEM connection lost; spooling");
                                conn = None;
                                stats.connected.store(false, Ordering::Relaxed);
                                break;
                            }
                            stats.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        offset += n as u64;
                        progressed = true;
                    }
                }
            }
        }
        if (inode, offset) != saved
            && (last_save.elapsed() > Duration::from_millis(200) || !progressed)
        {
            save_position(&cfg.offset_file, inode, offset);
            saved = (inode, offset);
            last_save = Instant::now();
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if (inode, offset) != saved {
        save_position(&cfg.offset_file, inode, offset);
    }
}

/// Moves from `from` to the first line start at or after `at`; returns the new offset
/// and how many lines were passed over.
fn skip_to_line(file: &mut std::fs::File, from: u64, at: u64) -> Option<(u64, u64)> {
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut reader = BufReader::new(file);
    let mut pos = from;
    let mut lines = 0;
    let mut buf = Vec::new();
    while pos < at {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).ok()?;
        if n == 0 || buf.last() != Some(&b'\n') {
            break;
        }
        pos += n as u64;
        lines += 1;
    }
    Some((pos, lines))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_or_say_why_not() {
        let t: Target = "tcp://127.0.0.1:5514".parse().expect("tcp");
        assert_eq!(t.transport, Transport::Tcp);
        assert_eq!(t.to_string(), "tcp://127.0.0.1:5514");
        assert!("udp://[::1]:514".parse::<Target>().is_ok());
        let t: Target = "tls://127.0.0.1:6514".parse().expect("tls");
        assert_eq!(t.transport, Transport::Tls);
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").expect("write");
        let e = TlsTrust::from_pem_file(&empty).expect_err("empty");
        assert!(e.contains("holds no certificate"), "{e}");
        assert!(TlsTrust::from_pem_file(&dir.path().join("absent.pem")).is_err());
        assert!("127.0.0.1:514".parse::<Target>().is_err());
        assert!(
            "tcp://localhost:514"
                .parse::<Target>()
                .expect_err("name")
                .contains("IP address")
        );
    }
}
