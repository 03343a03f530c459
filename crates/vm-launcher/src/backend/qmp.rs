//! A minimal QMP client (QEMU's JSON control protocol on the VM's `qmp.sock`):
//! greeting, capabilities, then one command at a time; events that arrive meanwhile
//! are kept for [`Qmp::wait_event`].

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::qemu::QMP_SOCKET;
use super::{BackendError, connect_in_dir};
use crate::store::VmDir;

/// Longest a save or load of the migration stream may take.
const MIGRATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// A minimal QMP client: greeting, capabilities, then one command at a time.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    /// Events that arrived while waiting for a command's answer.
    events: Vec<Value>,
}

pub(super) fn qmp_err(detail: impl std::fmt::Display) -> BackendError {
    BackendError::Control {
        backend: "qemu",
        detail: format!("QMP: {detail}"),
    }
}

impl Qmp {
    /// [`Qmp::connect`] to a QEMU that was just started (`qemu`): its socket may not
    /// exist yet, or exist and not accept yet (QEMU binds, then listens — a connection
    /// in between is refused), so both are retried until `limit`, as long as QEMU
    /// runs. The greeting and negotiation count against the same limit.
    pub async fn connect_new(
        dir: &VmDir,
        qemu: &mut tokio::process::Child,
        limit: std::time::Duration,
    ) -> Result<Self, BackendError> {
        let deadline = tokio::time::Instant::now() + limit;
        let socket = dir.root.join(QMP_SOCKET);
        let stream = loop {
            match connect_in_dir(&dir.root, QMP_SOCKET).await {
                Ok(stream) => break stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if let Ok(Some(status)) = qemu.try_wait() {
                        return Err(qmp_err(format!(
                            "QEMU exited ({status}) before its control socket accepted \
                             (see hypervisor.log)"
                        )));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(qmp_err(format!(
                            "QEMU's control socket {} did not accept within {limit:?}: {e}",
                            socket.display()
                        )));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => {
                    return Err(qmp_err(format!(
                        "connecting to QEMU's control socket {}: {e}",
                        socket.display()
                    )));
                }
            }
        };
        tokio::time::timeout_at(deadline, Self::negotiate(stream))
            .await
            .map_err(|_| {
                qmp_err(format!(
                    "QEMU did not greet on its control socket within {limit:?}"
                ))
            })?
    }

    /// Connects to a VM's QMP socket and negotiates capabilities.
    pub async fn connect(dir: &VmDir) -> Result<Self, BackendError> {
        let stream = connect_in_dir(&dir.root, QMP_SOCKET)
            .await
            .map_err(qmp_err)?;
        Self::negotiate(stream).await
    }

    /// Reads the greeting and negotiates capabilities on a fresh connection.
    async fn negotiate(stream: tokio::net::UnixStream) -> Result<Self, BackendError> {
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
            events: Vec::new(),
        };
        let greeting = qmp.read().await?;
        if greeting.get("QMP").is_none() {
            return Err(qmp_err(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read(&mut self) -> Result<Value, BackendError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await.map_err(qmp_err)? == 0 {
            return Err(qmp_err("connection closed"));
        }
        serde_json::from_str(&line).map_err(qmp_err)
    }

    /// Runs one command and returns its `return` value (events in between are skipped).
    pub async fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, BackendError> {
        let mut req = json!({ "execute": cmd });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(qmp_err)?;
        loop {
            let v = self.read().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(qmp_err(format!("{cmd}: {e}")));
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Hands QEMU an open descriptor under `name` (`getfd`, the descriptor travelling
    /// as `SCM_RIGHTS` with the command). A hypervisor that runs unprivileged cannot
    /// open the launcher's files or sockets itself; commands then name the descriptor
    /// (`fd:NAME` for a migration, an `fd` socket address for a chardev).
    pub async fn pass_fd(
        &mut self,
        name: &str,
        fd: &impl std::os::fd::AsRawFd,
    ) -> Result<(), BackendError> {
        let mut line = json!({ "execute": "getfd", "arguments": { "fdname": name } }).to_string();
        line.push('\n');
        let stream: &tokio::net::UnixStream = self.writer.as_ref();
        let raw = fd.as_raw_fd();
        loop {
            stream.writable().await.map_err(qmp_err)?;
            match stream.try_io(tokio::io::Interest::WRITABLE, || {
                send_with_fd(stream, line.as_bytes(), raw)
            }) {
                Ok(n) if n == line.len() => break,
                Ok(n) => {
                    return Err(qmp_err(format!(
                        "getfd: short write ({n} of {} bytes)",
                        line.len()
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(qmp_err(format!("getfd: {e}"))),
            }
        }
        loop {
            let v = self.read().await?;
            if v.get("return").is_some() {
                return Ok(());
            }
            if let Some(e) = v.get("error") {
                return Err(qmp_err(format!("getfd: {e}")));
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Waits for an event (for `device`, one whose `data.device` is it).
    pub async fn wait_event(
        &mut self,
        name: &str,
        device: Option<&str>,
        limit: std::time::Duration,
    ) -> Result<Value, BackendError> {
        let matches = |v: &Value| {
            v.get("event").and_then(Value::as_str) == Some(name)
                && device
                    .is_none_or(|d| v.pointer("/data/device").and_then(Value::as_str) == Some(d))
        };
        if let Some(i) = self.events.iter().position(matches) {
            return Ok(self.events.remove(i));
        }
        tokio::time::timeout(limit, async {
            loop {
                let v = self.read().await?;
                if matches(&v) {
                    return Ok(v);
                }
            }
        })
        .await
        .map_err(|_| qmp_err(format!("no {name} event within {limit:?}")))?
    }

    /// Polls `query-migrate` until the migration completes; its error if it fails.
    pub async fn wait_migration(&mut self) -> Result<(), BackendError> {
        let deadline = std::time::Instant::now() + MIGRATE_TIMEOUT;
        loop {
            let r = self.execute("query-migrate", None).await?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    let why = r
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(qmp_err(format!("migration failed: {why}")));
                }
                _ => {}
            }
            if std::time::Instant::now() > deadline {
                return Err(qmp_err(format!(
                    "migration did not finish within {MIGRATE_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// One `sendmsg(2)` of `data` with `fd` attached (`SCM_RIGHTS`).
fn send_with_fd(
    stream: &tokio::net::UnixStream,
    data: &[u8],
    fd: std::os::fd::RawFd,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid; every pointer set below outlives sendmsg, and
    // the control buffer is CMSG_SPACE bytes for one descriptor, so CMSG_FIRSTHDR is
    // non-null and the descriptor fits at CMSG_DATA.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
        let n = libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}
