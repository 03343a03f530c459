//! The agent runtime's supervision: the guest agent starts the image's agent runtime as
//! the unprivileged `agent` user inside the audited agent cgroup, restarts it whenever
//! it ends, and reports it ready once its agent API answers on guest port 18789.
//!
//! Which runtime: the image's [`RuntimeDescriptor`] at [`DESCRIPTOR_PATH`] when it has
//! one, else the built-in `clawos-agentd` when the image has it ([`choose`]). The
//! runtime's output reaches the console line by line, each line prefixed with its name
//! ([`prefix_lines`]).
//!
//! Running as uid 1000 with no capabilities and `no_new_privs` is what keeps the agent
//! from the guest's control secret (`/run/clawos`, root 0600), from the audit process
//! (root) and from leaving its cgroup (`cgroup.procs` files are root's).

use std::fmt;
use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use clawos_guest_protocol::runtime::{DESCRIPTOR_PATH, RuntimeDescriptor};

use crate::protocol::{GATEWAY_PORT, RuntimeInfo};
use crate::workspace::{WORKSPACE, Workspace};

/// The built-in agent runtime's binary in the image.
pub const AGENTD_BIN: &str = "/sbin/clawos-agentd";

/// The built-in runtime's name (reported to the host, prefix of its console lines).
pub const AGENTD_NAME: &str = "clawos-agentd";

/// How long the built-in runtime may take to answer before the boot fails.
pub const AGENTD_READY_TIMEOUT_SECS: u64 = 120;

/// The `agent` user and group of the image's `/etc/passwd`.
pub const AGENT_UID: u32 = 1000;
/// See [`AGENT_UID`].
pub const AGENT_GID: u32 = 1000;

/// Where sessions live (the runtime's, owned by the agent user).
pub const SESSIONS_DIR: &str = "/workspace/.clawos/sessions";

/// The VM's environment file, written by `clawos-init` (root's, 0600).
pub const ENV_FILE: &str = "/workspace/.env";

/// Where the per-boot gateway token is kept for diagnosis (tmpfs, root, 0600).
pub const TOKEN_PATH: &str = "/run/clawos/gateway.token";

/// `PATH` of the runtime.
const RUNTIME_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The longest console line taken from the runtime; the rest of a longer line is cut.
pub const MAX_LINE: usize = 4096;

/// The largest descriptor read.
const MAX_DESCRIPTOR: u64 = 1 << 20;

/// The runtime this image runs: its descriptor at `descriptor` when there is one
/// (parsed and validated: a bad one is an error naming the problem), else the built-in
/// runtime when `agentd` exists, else none. `model` is the VM's (`CLAWOS_MODEL` of the
/// environment file), given to the built-in runtime on its command line.
pub fn choose(
    descriptor: &Path,
    agentd: &Path,
    model: Option<&str>,
) -> Result<Option<RuntimeDescriptor>, String> {
    let shown = descriptor.display();
    let mut bytes = Vec::new();
    match fs::File::open(descriptor) {
        Ok(f) => {
            f.take(MAX_DESCRIPTOR)
                .read_to_end(&mut bytes)
                .map_err(|e| format!("{shown}: {e}"))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(agentd.is_file().then(|| builtin(agentd, model)));
        }
        Err(e) => return Err(format!("{shown}: {e}")),
    }
    let d: RuntimeDescriptor =
        serde_json::from_slice(&bytes).map_err(|e| format!("{shown}: {e}"))?;
    d.validate().map_err(|e| format!("{shown}: {e}"))?;
    Ok(Some(d))
}

/// The built-in runtime (`clawos-agentd`, this crate's version) as a descriptor: the
/// model on its command line, `HOME` the workspace, no gateway token.
pub fn builtin(bin: &Path, model: Option<&str>) -> RuntimeDescriptor {
    let mut argv = vec![bin.to_string_lossy().into_owned()];
    if let Some(m) = model {
        argv.extend(["--model".to_owned(), m.to_owned()]);
    }
    RuntimeDescriptor {
        name: AGENTD_NAME.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        argv,
        env: Default::default(),
        model_env: None,
        default_model: None,
        gateway_token_env: None,
        home: WORKSPACE.into(),
        workspace_dirs: Vec::new(),
        ready_timeout_secs: AGENTD_READY_TIMEOUT_SECS,
        skills_env: Default::default(),
    }
}

/// How the runtime is started.
#[derive(Clone)]
pub struct RuntimeSpec {
    /// Its name: in the log lines and the prefix of its console lines.
    pub name: String,
    /// Its version, for the log lines.
    pub version: String,
    pub bin: PathBuf,
    /// Arguments after the binary.
    pub args: Vec<String>,
    /// Its whole environment (`PATH`, `HOME`, `USER` first); nothing else is inherited.
    pub env: Vec<(String, String)>,
    /// The cgroup it runs in (the audited agent cgroup); `None` where there is none.
    pub cgroup: Option<PathBuf>,
    /// Its uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// Its working directory.
    pub workdir: PathBuf,
}

/// Names the environment's variables, never their values (one carries the token).
impl fmt::Debug for RuntimeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeSpec")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("bin", &self.bin)
            .field("args", &self.args)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("cgroup", &self.cgroup)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("workdir", &self.workdir)
            .finish()
    }
}

impl RuntimeSpec {
    /// The start of the runtime `d` describes, as the `agent` user in `/workspace`: its
    /// environment is `PATH`, `HOME` (`d.home`), `USER`, `d.env`, then the model
    /// (`model`, else `d.default_model`) in `d.model_env` and `token` in
    /// `d.gateway_token_env`.
    pub fn from_descriptor(
        d: &RuntimeDescriptor,
        model: Option<&str>,
        token: Option<&str>,
        cgroup: Option<PathBuf>,
    ) -> Self {
        let (bin, args) = d
            .argv
            .split_first()
            .map(|(b, a)| (PathBuf::from(b), a.to_vec()))
            .unwrap_or_default();
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), RUNTIME_PATH.into()),
            ("HOME".into(), d.home.clone()),
            ("USER".into(), "agent".into()),
        ];
        env.extend(d.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(var) = &d.model_env
            && let Some(m) = model.or(d.default_model.as_deref())
        {
            env.push((var.clone(), m.to_owned()));
        }
        if let (Some(var), Some(t)) = (&d.gateway_token_env, token) {
            env.push((var.clone(), t.to_owned()));
        }
        Self {
            name: d.name.clone(),
            version: d.version.clone(),
            bin,
            args,
            env,
            cgroup,
            uid: AGENT_UID,
            gid: AGENT_GID,
            workdir: WORKSPACE.into(),
        }
    }

    /// The host offers skills at `mcp_url`: the runtime is told (`CLAWOS_MCP_URL`) and
    /// gets the descriptor's `skills_env` over its environment.
    pub fn offer_skills(&mut self, d: &RuntimeDescriptor, mcp_url: &str) {
        let set = std::iter::once((MCP_URL_VAR.to_owned(), mcp_url.to_owned()))
            .chain(d.skills_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        for (k, v) in set {
            self.env.retain(|(n, _)| *n != k);
            self.env.push((k, v));
        }
    }
}

pub use clawos_guest_protocol::runtime::MCP_URL_VAR;

/// The model named in the VM's environment file (`CLAWOS_MODEL=...`), if any. The file
/// is root's; the runtime gets the model on its command line or in its environment.
pub fn model_from_env_file(path: &Path) -> Option<String> {
    env_file_value(path, "CLAWOS_MODEL")
}

/// The first non-empty value of `key` in the VM's environment file.
pub fn env_file_value(path: &Path, key: &str) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
}

/// Makes the agent's writable places its own: the workspace directory itself (files the
/// operator copies in are handed over one by one) and the sessions directory. Every step
/// goes through the confined [`Workspace`] (no symlink followed, nothing outside it):
/// the agent owns the workspace, so it could have put a symlink anywhere in it for root
/// to follow at the next boot.
pub fn prepare_workspace(ws: &Workspace, uid: u32, gid: u32) -> io::Result<()> {
    ws.chown(".", uid, gid)?;
    ws.create_dirs(".clawos/sessions", 0o700)?;
    ws.chown(".clawos/sessions", uid, gid)
}

/// [`prepare_workspace`], then the runtime's own places: each of `d.workspace_dirs` and
/// its `HOME`, made if missing and given to `uid`/`gid` (every level of each). Never
/// through a symlink: a level is made with `mkdirat` in its parent's descriptor, opened
/// without following, and given away only once it is known not to be a symlink; a
/// symlink or a file in the way is an error naming it.
pub fn prepare_runtime_dirs(
    ws: &Workspace,
    d: &RuntimeDescriptor,
    uid: u32,
    gid: u32,
) -> io::Result<()> {
    prepare_workspace(ws, uid, gid)?;
    let home = d
        .home
        .strip_prefix(WORKSPACE)
        .filter(|r| r.is_empty() || r.starts_with('/'))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("home {:?} is outside {WORKSPACE}", d.home),
            )
        })?
        .trim_start_matches('/');
    for dir in d.workspace_dirs.iter().map(String::as_str).chain([home]) {
        if dir.is_empty() || dir == "." {
            continue;
        }
        ws.create_dirs_owned(dir, 0o700, Some((uid, gid)))?;
        // Existing levels too (made by root through `exec`, say), outermost first: the
        // last component of each is opened without following, so a level already
        // checked is a directory when the next one is resolved through it.
        let mut level = String::new();
        for part in dir.split('/') {
            if !level.is_empty() {
                level.push('/');
            }
            level.push_str(part);
            ws.chown(&level, uid, gid)?;
        }
    }
    Ok(())
}

/// Fills `buf` from the kernel's random source: getrandom(2), which waits until it is
/// seeded; `/dev/urandom` on a kernel without it.
fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom(2) writes at most `rest.len()` bytes into `rest`, memory we
        // hold mutably for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOSYS) => return fs::File::open("/dev/urandom")?.read_exact(rest),
                _ => return Err(e),
            }
        }
        filled += n as usize;
    }
    Ok(())
}

/// A fresh gateway token: 32 random bytes, hex (64 characters). Made once per boot;
/// every start of the runtime in that boot gets the same one.
pub fn new_gateway_token() -> io::Result<String> {
    let mut bytes = [0u8; 32];
    fill_random(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Keeps the token at `path` for diagnosis: root's, 0600 (also when the file was there
/// before), its directory made 0700 if missing, never through a symlink.
pub fn write_gateway_token(path: &Path, token: &str) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")
}

/// What the control service reports about the runtime of this boot.
#[derive(Clone)]
pub struct RuntimeStatus {
    pub name: String,
    pub version: String,
    /// The per-boot gateway token, when the runtime has one.
    pub gateway_token: Option<String>,
    /// Whether its agent API answers now ([`answers_now`] in the guest).
    pub healthy: fn() -> bool,
}

/// Never shows the token.
impl fmt::Debug for RuntimeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeStatus")
            .field("name", &self.name)
            .field("version", &self.version)
            .field(
                "gateway_token",
                &self.gateway_token.as_ref().map(|_| "<hidden>"),
            )
            .finish_non_exhaustive()
    }
}

impl RuntimeStatus {
    /// The status of the runtime `d` describes, started with `gateway_token`.
    pub fn new(d: &RuntimeDescriptor, gateway_token: Option<String>) -> Self {
        Self {
            name: d.name.clone(),
            version: d.version.clone(),
            gateway_token,
            healthy: answers_now,
        }
    }

    /// The answer to `Op::Runtime`, its health checked now.
    pub fn info(&self) -> RuntimeInfo {
        RuntimeInfo {
            name: self.name.clone(),
            version: self.version.clone(),
            healthy: (self.healthy)(),
            gateway_token: self.gateway_token.clone(),
        }
    }

    /// The answer to `Op::Runtime` for `status`, or for no runtime at all (`none`).
    pub fn report(status: Option<&Self>) -> RuntimeInfo {
        status.map_or_else(
            || RuntimeInfo {
                name: "none".into(),
                version: String::new(),
                healthy: false,
                gateway_token: None,
            },
            Self::info,
        )
    }
}

/// Starts the runtime once: dropped to `spec.uid`, no new privileges, in its cgroup (it
/// does not start outside it), its own process group, only `spec.env` in its
/// environment, stdin `/dev/null`, stdout and stderr piped (see [`prefix_lines`]).
pub fn spawn(spec: &RuntimeSpec) -> io::Result<std::process::Child> {
    let mut cmd = Command::new(&spec.bin);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .uid(spec.uid)
        .gid(spec.gid)
        .process_group(0);
    // Opened here, as root: the kernel checks a cgroup migration against the opener's
    // credentials, so the child can still join after it dropped to the agent's uid.
    let procs = spec
        .cgroup
        .as_ref()
        .map(|c| {
            fs::OpenOptions::new()
                .write(true)
                .open(c.join("cgroup.procs"))
        })
        .transpose()?;
    let procs_fd = procs.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    // SAFETY: the closure runs in the forked child before exec and calls only prctl(2)
    // and write(2), both async-signal-safe, on an fd kept open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = procs_fd
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(procs);
    child
}

/// Copies `from` to `to` line by line, each line as `<prefix>: <line>` (lossy UTF-8; a
/// line longer than [`MAX_LINE`] bytes is cut there and marked ` [cut]`), until `from`
/// ends. Each line is one `write_all`, so lines from several streams do not mix. Keeps
/// reading when `to` fails, so the writer on the other end never waits on a full pipe
/// because of us.
pub fn prefix_lines<R: Read, W: Write>(from: R, prefix: &str, mut to: W) {
    let mut emit = |line: &[u8], cut: bool| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut out = Vec::with_capacity(prefix.len() + line.len() + 10);
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(String::from_utf8_lossy(line).as_bytes());
        if cut {
            out.extend_from_slice(b" [cut]");
        }
        out.push(b'\n');
        let _ = to.write_all(&out).and_then(|()| to.flush());
    };
    let mut r = io::BufReader::with_capacity(16 * 1024, from);
    let mut line: Vec<u8> = Vec::new();
    let mut cut = false;
    loop {
        let buf = match r.fill_buf() {
            Ok([]) => break,
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let (chunk, used, ends) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        let room = MAX_LINE - line.len();
        if chunk.len() > room {
            line.extend_from_slice(&chunk[..room]);
            cut = true;
        } else {
            line.extend_from_slice(chunk);
        }
        r.consume(used);
        if ends {
            emit(&line, cut);
            line.clear();
            cut = false;
        }
    }
    if !line.is_empty() || cut {
        emit(&line, cut);
    }
}

/// Runs the runtime for the life of the VM: `before_start` (a failure is logged), then
/// the runtime, restarted whenever it ends with a backoff that grows while it keeps
/// failing fast. Its stdout and stderr go to ours (the console), each line prefixed with
/// its name. `log` gets one line per event.
pub fn supervise(
    spec: RuntimeSpec,
    mut before_start: impl FnMut() -> io::Result<()>,
    log: fn(&str),
) -> ! {
    let mut backoff = Duration::from_millis(500);
    let what = format!("agent runtime {} {}", spec.name, spec.version);
    loop {
        if let Err(e) = before_start() {
            log(&format!(
                "cannot give the workspace to the agent user for {}: {e}",
                spec.name
            ));
        }
        let started = Instant::now();
        match spawn(&spec) {
            Ok(mut child) => {
                log(&format!(
                    "{what} started ({}, pid {}, uid {})",
                    spec.bin.display(),
                    child.id(),
                    spec.uid
                ));
                let out = child
                    .stdout
                    .take()
                    .map(|o| Box::new(o) as Box<dyn Read + Send>);
                let err = child
                    .stderr
                    .take()
                    .map(|e| Box::new(e) as Box<dyn Read + Send>);
                for pipe in [out, err].into_iter().flatten() {
                    let name = spec.name.clone();
                    let copied = std::thread::Builder::new()
                        .name(format!("{name}-output"))
                        .spawn(move || prefix_lines(pipe, &name, io::stdout()));
                    if let Err(e) = copied {
                        log(&format!("cannot copy the output of {}: {e}", spec.name));
                    }
                }
                let status = child.wait();
                log(&format!("{what} ended ({status:?}); restarting"));
            }
            Err(e) => log(&format!(
                "cannot start the {what} ({}): {e}",
                spec.bin.display()
            )),
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(500);
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Whether the agent API answers `GET /healthz` with 200 on guest port 18789 (within
/// 2 s: the boot's readiness wait).
pub fn healthy() -> bool {
    healthy_within(Duration::from_secs(2))
}

/// Whether the agent API answers now, within 250 ms: what the host's `Op::Runtime`
/// reports before every agent request, so a process holding the port open cannot
/// stall each request for long.
pub fn answers_now() -> bool {
    healthy_within(Duration::from_millis(250))
}

fn healthy_within(limit: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", GATEWAY_PORT as u16)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(limit));
    let _ = s.set_write_timeout(Some(limit));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// Waits until the agent API is healthy, up to `limit`; the time it took, or `None`.
pub fn wait_healthy(limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if healthy() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[cfg(test)]
mod tests;
