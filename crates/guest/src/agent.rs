//! The guest agent's control service: one [`protocol`] operation per connection.
//!
//! Written against [`Duplex`] rather than a vsock socket so the whole protocol is
//! tested on the host over a Unix socket pair.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{self, CHUNK, ExecRequest, Kind, Op, Reply, Request};
use crate::runtime::RuntimeStatus;
use crate::workspace::Workspace;

/// A connection that can be split into a reader and a writer.
pub trait Duplex: Read + Write + Send + 'static + Sized {
    fn try_clone_conn(&self) -> io::Result<Self>;
}

impl Duplex for std::fs::File {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl Duplex for std::os::unix::net::UnixStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// What the service needs to know.
#[derive(Debug)]
pub struct Service {
    pub secret: String,
    pub workspace: Workspace,
    pub boot: u64,
    pub started: Instant,
    /// Asks init to power off (sends it SIGTERM in the guest).
    pub on_shutdown: fn(),
    /// The cgroup every command is started in ([`crate::AGENT_CGROUP`] in the guest,
    /// watched by `clawos-audit`); `None` runs commands where the agent runs.
    pub audit_cgroup: Option<std::path::PathBuf>,
    /// uid and gid given to files the host copies in (the agent user's, so the agent
    /// can work on them); `None` leaves them root's.
    pub file_owner: Option<(u32, u32)>,
    /// The agent runtime of this boot, reported by `runtime` (its gateway token
    /// included); `None`: the image has none.
    pub runtime: Option<RuntimeStatus>,
}

fn reply<W: Write>(w: &mut W, r: &Reply) -> io::Result<()> {
    w.write_all(&protocol::encode_json(r))
}

fn error<W: Write>(w: &mut W, message: impl Into<String>) -> io::Result<()> {
    reply(
        w,
        &Reply::Error {
            message: message.into(),
        },
    )
}

impl Service {
    /// Serves one connection to its end.
    pub fn handle<C: Duplex>(&self, mut conn: C) -> io::Result<()> {
        let Some((Kind::Control, payload)) = protocol::read_frame(&mut conn)? else {
            return error(&mut conn, "expected a request");
        };
        let req: Request = match serde_json::from_slice(&payload) {
            Ok(r) => r,
            Err(e) => return error(&mut conn, format!("malformed request: {e}")),
        };
        if !protocol::secrets_match(&req.secret, &self.secret) {
            return error(&mut conn, "unauthorized: wrong or missing VM secret");
        }
        match req.op {
            Op::Health => reply(
                &mut conn,
                &Reply::Health {
                    boot: self.boot,
                    uptime_ms: self.started.elapsed().as_millis() as u64,
                },
            ),
            Op::Exec(x) => exec(conn, x, self.audit_cgroup.as_deref()),
            Op::Put { path, size, mode } => self.put(conn, &path, size, mode.unwrap_or(0o644)),
            Op::Get { path } => self.get(conn, &path),
            Op::List { path } => match self.workspace.list(&path) {
                Ok(entries) => reply(&mut conn, &Reply::Entries { entries }),
                Err(e) => error(&mut conn, e.to_string()),
            },
            Op::Shutdown => {
                reply(&mut conn, &Reply::Ok)?;
                (self.on_shutdown)();
                Ok(())
            }
            Op::Runtime => reply(
                &mut conn,
                &Reply::Runtime(RuntimeStatus::report(self.runtime.as_ref())),
            ),
        }
    }

    fn put<C: Duplex>(&self, mut conn: C, path: &str, size: u64, mode: u32) -> io::Result<()> {
        // Missing parent directories are made (confined like the file itself).
        if let Some((parent, _)) = path.rsplit_once('/')
            && !parent.is_empty()
            && let Err(e) = self
                .workspace
                .create_dirs_owned(parent, 0o755, self.file_owner)
        {
            return error(&mut conn, e.to_string());
        }
        let mut pending = match self.workspace.create(path, mode) {
            Ok(p) => p,
            Err(e) => return error(&mut conn, e.to_string()),
        };
        if let Some((uid, gid)) = self.file_owner
            && let Err(e) = std::os::unix::fs::fchown(&pending.file, Some(uid), Some(gid))
        {
            pending.abort();
            return error(&mut conn, format!("chown {path}: {e}"));
        }
        let mut written = 0u64;
        let outcome = loop {
            match protocol::read_frame(&mut conn) {
                Ok(Some((Kind::Data, data))) => {
                    written += data.len() as u64;
                    if written > size {
                        break Err(format!("more data than the announced {size} bytes"));
                    }
                    if let Err(e) = pending.file.write_all(&data) {
                        break Err(format!("write {path}: {e}"));
                    }
                }
                Ok(Some((Kind::End, _))) if written == size => break Ok(()),
                Ok(Some((Kind::End, _))) => break Err(format!("got {written} of {size} bytes")),
                Ok(_) => break Err("unexpected frame during upload".into()),
                Err(e) => break Err(format!("connection: {e}")),
            }
        };
        match outcome.and_then(|()| pending.commit().map_err(|e| format!("commit {path}: {e}"))) {
            Ok(()) => reply(&mut conn, &Reply::Ok),
            Err(m) => error(&mut conn, m),
        }
    }

    fn get<C: Duplex>(&self, mut conn: C, path: &str) -> io::Result<()> {
        let mut f = match self.workspace.open_read(path) {
            Ok(f) => f,
            Err(e) => return error(&mut conn, e.to_string()),
        };
        let size = f.metadata()?.len();
        reply(&mut conn, &Reply::Size { size })?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            protocol::write_frame(&mut conn, Kind::Data, &buf[..n])?;
        }
        protocol::write_frame(&mut conn, Kind::End, &[])
    }
}

fn pump<R: Read>(mut from: R, kind: Kind, to: Arc<Mutex<impl Write>>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut w = to.lock().unwrap_or_else(|p| p.into_inner());
                if protocol::write_frame(&mut *w, kind, &buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn exec<C: Duplex>(conn: C, x: ExecRequest, cgroup: Option<&std::path::Path>) -> io::Result<()> {
    let writer = Arc::new(Mutex::new(conn.try_clone_conn()?));
    let mut reader = conn;
    let Some(program) = x.argv.first() else {
        return error(
            &mut *writer.lock().unwrap_or_else(|p| p.into_inner()),
            "exec: empty argv",
        );
    };
    let mut cmd = Command::new(program);
    cmd.args(&x.argv[1..])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", crate::workspace::WORKSPACE)
        .envs(x.env.iter().map(|(k, v)| (k, v)))
        .current_dir(x.cwd.as_deref().unwrap_or(crate::workspace::WORKSPACE))
        .stdin(if x.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout or a vanished client kills the whole tree.
        .process_group(0);
    // The command joins the audited cgroup between fork and exec, so its first system
    // call is already recorded. If it cannot join, it does not run.
    let procs = match cgroup.map(|c| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(c.join("cgroup.procs"))
    }) {
        Some(Err(e)) => {
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            return error(&mut *w, format!("exec: audit cgroup unavailable: {e}"));
        }
        Some(Ok(f)) => Some(f),
        None => None,
    };
    if let Some(f) = &procs {
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only calls
        // write(2), which is async-signal-safe, on an fd that stays open until spawn
        // returns (`procs` outlives it).
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
    }
    let spawned = cmd.spawn();
    drop(procs);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            return error(&mut *w, format!("exec {program}: {e}"));
        }
    };
    let pid = child.id();
    reply(
        &mut *writer.lock().unwrap_or_else(|p| p.into_inner()),
        &Reply::Started { pid },
    )?;
    let out = child.stdout.take().map(|o| {
        let w = Arc::clone(&writer);
        std::thread::spawn(move || pump(o, Kind::Stdout, w))
    });
    let err = child.stderr.take().map(|e| {
        let w = Arc::clone(&writer);
        std::thread::spawn(move || pump(e, Kind::Stderr, w))
    });
    // Host → stdin; the host closing the connection kills the command.
    let mut stdin = child.stdin.take();
    let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gone2 = Arc::clone(&gone);
    std::thread::spawn(move || {
        loop {
            match protocol::read_frame(&mut reader) {
                Ok(Some((Kind::Stdin, data))) => {
                    if let Some(s) = stdin.as_mut()
                        && s.write_all(&data).is_err()
                    {
                        stdin = None;
                    }
                }
                Ok(Some((Kind::End, _))) => stdin = None,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    gone2.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
            }
        }
    });
    let deadline = x
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        let expired = deadline.is_some_and(|d| Instant::now() >= d);
        if (expired && !timed_out) || gone.load(std::sync::atomic::Ordering::SeqCst) {
            timed_out |= expired;
            // SAFETY: signals the command's own process group (pgid = its pid).
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if timed_out {
        // Grandchildren may hold the pipes open; the group is already killed.
        // SAFETY: as above.
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    }
    for t in [out, err].into_iter().flatten() {
        let _ = t.join();
    }
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    reply(
        &mut *w,
        &Reply::Exit {
            code: status.code(),
            signal: status.signal(),
            timed_out,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn service(dir: &std::path::Path) -> Service {
        Service {
            secret: "s3cret".into(),
            workspace: Workspace::open(dir).expect("ws"),
            boot: 1,
            started: Instant::now(),
            on_shutdown: || {},
            audit_cgroup: None,
            file_owner: None,
            runtime: None,
        }
    }

    /// Sends a request over a socket pair to a served connection; returns all frames.
    fn call(
        svc: &'static Service,
        req: &Request,
        then: &[(Kind, Vec<u8>)],
    ) -> Vec<(Kind, Vec<u8>)> {
        let (mut host, guest) = UnixStream::pair().expect("pair");
        let t = std::thread::spawn(move || svc.handle(guest));
        host.write_all(&protocol::encode_json(req)).expect("send");
        for (k, p) in then {
            protocol::write_frame(&mut host, *k, p).expect("send");
        }
        let mut frames = Vec::new();
        while let Ok(Some(f)) = protocol::read_frame(&mut host) {
            let last = f.0 == Kind::Control
                && !matches!(
                    serde_json::from_slice(&f.1),
                    Ok(Reply::Started { .. }) | Ok(Reply::Size { .. })
                );
            frames.push(f);
            if last {
                break;
            }
        }
        drop(host);
        let _ = t.join();
        frames
    }

    fn last_reply(frames: &[(Kind, Vec<u8>)]) -> Reply {
        let f = frames
            .iter()
            .rev()
            .find(|f| f.0 == Kind::Control)
            .expect("a reply");
        serde_json::from_slice(&f.1).expect("json")
    }

    fn leak(dir: &std::path::Path) -> &'static Service {
        Box::leak(Box::new(service(dir)))
    }

    fn exec_req(argv: &[&str], stdin: bool, timeout_ms: Option<u64>) -> Request {
        Request {
            secret: "s3cret".into(),
            op: Op::Exec(ExecRequest {
                argv: argv.iter().map(|s| (*s).to_owned()).collect(),
                cwd: Some("/".into()),
                stdin,
                timeout_ms,
                ..ExecRequest::default()
            }),
        }
    }

    #[test]
    fn commands_start_inside_the_audit_cgroup_or_not_at_all() {
        let d = tempfile::tempdir().expect("tmp");
        // A cgroup that does not exist: the command must not run unaudited.
        let svc: &'static Service = Box::leak(Box::new(Service {
            audit_cgroup: Some(d.path().join("no-such-cgroup")),
            ..service(d.path())
        }));
        let frames = call(svc, &exec_req(&["touch", "ran"], false, None), &[]);
        match last_reply(&frames) {
            Reply::Error { message } => assert!(message.contains("audit cgroup"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(!d.path().join("ran").exists());
        // A real cgroup v2: a fresh mount of the unified hierarchy (needs root).
        let mnt = tempfile::tempdir().expect("tmp");
        if let Err(e) = crate::sys::mount(
            "cgroup2",
            mnt.path().to_str().unwrap_or(""),
            Some("cgroup2"),
            0,
            None,
        ) {
            clawos_test_skip::record(
                "commands_start_inside_the_audit_cgroup_or_not_at_all",
                &format!("its real-cgroup half: cannot mount cgroup2 (needs root): {e}"),
            );
            return;
        }
        let cg = mnt
            .path()
            .join(format!("clawos-agent-test-{}", std::process::id()));
        std::fs::create_dir(&cg).expect("create a cgroup");
        let svc: &'static Service = Box::leak(Box::new(Service {
            audit_cgroup: Some(cg.clone()),
            ..service(d.path())
        }));
        let frames = call(
            svc,
            &exec_req(&["cat", "/proc/self/cgroup"], false, None),
            &[],
        );
        let out: Vec<u8> = frames
            .iter()
            .filter(|f| f.0 == Kind::Stdout)
            .flat_map(|f| f.1.clone())
            .collect();
        let _ = std::fs::remove_dir(&cg);
        let _ = crate::sys::umount(mnt.path().to_str().unwrap_or(""), 0);
        assert!(
            matches!(last_reply(&frames), Reply::Exit { code: Some(0), .. }),
            "{:?}",
            last_reply(&frames)
        );
        // The unified hierarchy's line (a hybrid host lists v1 controllers too).
        let want = format!(
            "0::/{}",
            cg.file_name().and_then(|n| n.to_str()).unwrap_or("")
        );
        let text = String::from_utf8_lossy(&out);
        assert!(text.lines().any(|l| l == want), "{text}");
    }

    #[test]
    fn wrong_secret_is_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let svc = leak(d.path());
        let r = Request {
            secret: "nope".into(),
            op: Op::Health,
        };
        match last_reply(&call(svc, &r, &[])) {
            Reply::Error { message } => assert!(message.contains("unauthorized")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn runtime_reports_the_runtime_and_its_token_only_with_the_secret() {
        let d = tempfile::tempdir().expect("tmp");
        let token = "5e".repeat(32);
        let svc: &'static Service = Box::leak(Box::new(Service {
            runtime: Some(RuntimeStatus {
                name: "openclaw".into(),
                version: "2026.9.6".into(),
                gateway_token: Some(token.clone()),
                healthy: || true,
            }),
            ..service(d.path())
        }));
        let ask = |secret: &str| Request {
            secret: secret.into(),
            op: Op::Runtime,
        };
        assert_eq!(
            last_reply(&call(svc, &ask("s3cret"), &[])),
            Reply::Runtime(protocol::RuntimeInfo {
                name: "openclaw".into(),
                version: "2026.9.6".into(),
                healthy: true,
                gateway_token: Some(token.clone()),
            })
        );
        for wrong in ["nope", ""] {
            let frames = call(svc, &ask(wrong), &[]);
            match last_reply(&frames) {
                Reply::Error { message } => assert!(message.contains("unauthorized")),
                other => panic!("{other:?}"),
            }
            assert!(
                !frames
                    .iter()
                    .any(|f| String::from_utf8_lossy(&f.1).contains(&token)),
                "the token leaked"
            );
        }
        // An image without a runtime.
        assert_eq!(
            last_reply(&call(leak(d.path()), &ask("s3cret"), &[])),
            Reply::Runtime(protocol::RuntimeInfo {
                name: "none".into(),
                version: String::new(),
                healthy: false,
                gateway_token: None,
            })
        );
    }

    #[test]
    fn exec_streams_both_outputs_and_the_exit_code() {
        let d = tempfile::tempdir().expect("tmp");
        let svc = leak(d.path());
        let frames = call(
            svc,
            &exec_req(&["sh", "-c", "echo out; echo err >&2; exit 3"], false, None),
            &[],
        );
        let collect = |k| {
            frames
                .iter()
                .filter(|f| f.0 == k)
                .flat_map(|f| f.1.clone())
                .collect::<Vec<u8>>()
        };
        assert_eq!(collect(Kind::Stdout), b"out\n");
        assert_eq!(collect(Kind::Stderr), b"err\n");
        assert_eq!(
            last_reply(&frames),
            Reply::Exit {
                code: Some(3),
                signal: None,
                timed_out: false
            }
        );
    }

    #[test]
    fn exec_stdin_round_trips_and_timeouts_kill() {
        let d = tempfile::tempdir().expect("tmp");
        let svc = leak(d.path());
        let frames = call(
            svc,
            &exec_req(&["cat"], true, None),
            &[(Kind::Stdin, b"ping".to_vec()), (Kind::End, vec![])],
        );
        let out: Vec<u8> = frames
            .iter()
            .filter(|f| f.0 == Kind::Stdout)
            .flat_map(|f| f.1.clone())
            .collect();
        assert_eq!(out, b"ping");
        let t = Instant::now();
        let frames = call(
            svc,
            &exec_req(&["sh", "-c", "sleep 100"], false, Some(300)),
            &[],
        );
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(
            matches!(
                last_reply(&frames),
                Reply::Exit {
                    timed_out: true,
                    signal: Some(9),
                    ..
                }
            ),
            "{:?}",
            last_reply(&frames)
        );
    }

    #[test]
    fn put_get_round_trip_and_size_is_enforced() {
        let d = tempfile::tempdir().expect("tmp");
        let svc = leak(d.path());
        let put = |path: &str, size: u64, data: &[u8]| {
            let r = Request {
                secret: "s3cret".into(),
                op: Op::Put {
                    path: path.into(),
                    size,
                    mode: None,
                },
            };
            last_reply(&call(
                svc,
                &r,
                &[(Kind::Data, data.to_vec()), (Kind::End, vec![])],
            ))
        };
        assert_eq!(put("a.txt", 5, b"hello"), Reply::Ok);
        assert!(matches!(put("b.txt", 9, b"hello"), Reply::Error { .. }));
        assert!(
            !d.path().join("b.txt").exists(),
            "a short upload must leave nothing"
        );
        assert!(matches!(put("../x", 5, b"hello"), Reply::Error { .. }));
        let r = Request {
            secret: "s3cret".into(),
            op: Op::Get {
                path: "a.txt".into(),
            },
        };
        let frames = call(svc, &r, &[]);
        let data: Vec<u8> = frames
            .iter()
            .filter(|f| f.0 == Kind::Data)
            .flat_map(|f| f.1.clone())
            .collect();
        assert_eq!(data, b"hello");
    }
}
