//! The agent runtime's supervision: the guest agent starts the image's agent runtime
//! (`clawos-agentd` by default) as the unprivileged `agent` user inside the audited agent
//! cgroup, restarts it whenever it ends, and reports it ready once its agent API answers
//! on guest port 18789.
//!
//! Running as uid 1000 with no capabilities and `no_new_privs` is what keeps the agent
//! from the guest's control secret (`/run/clawos`, root 0600), from the audit process
//! (root) and from leaving its cgroup (`cgroup.procs` files are root's).

use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::protocol::GATEWAY_PORT;
use crate::workspace::Workspace;

/// The built-in agent runtime's binary in the image.
pub const AGENTD_BIN: &str = "/sbin/clawos-agentd";

/// The `agent` user and group of the image's `/etc/passwd`.
pub const AGENT_UID: u32 = 1000;
/// See [`AGENT_UID`].
pub const AGENT_GID: u32 = 1000;

/// Where sessions live (the runtime's, owned by the agent user).
pub const SESSIONS_DIR: &str = "/workspace/.clawos/sessions";

/// How the runtime is started.
#[derive(Debug, Clone)]
pub struct RuntimeSpec {
    pub bin: PathBuf,
    /// Arguments after the binary.
    pub args: Vec<String>,
    /// The cgroup it runs in (the audited agent cgroup); `None` where there is none.
    pub cgroup: Option<PathBuf>,
    /// Its uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// Its working directory and `HOME`.
    pub home: PathBuf,
}

/// The model named in the VM's environment file (`CLAWOS_MODEL=...`), if any. The file
/// is root's; the runtime gets the model on its command line.
pub fn model_from_env_file(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("CLAWOS_MODEL="))
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

/// Starts the runtime once: dropped to `spec.uid`, no new privileges, in its cgroup (it
/// does not start outside it), its own process group, output to ours (the console).
pub fn spawn(spec: &RuntimeSpec) -> io::Result<std::process::Child> {
    let mut cmd = Command::new(&spec.bin);
    cmd.args(&spec.args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &spec.home)
        .env("USER", "agent")
        .current_dir(&spec.home)
        .stdin(Stdio::null())
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

/// Runs the runtime for the life of the VM: restarted whenever it ends, with a backoff
/// that grows while it keeps failing fast. `log` gets one line per event.
pub fn supervise(spec: RuntimeSpec, log: fn(&str)) -> ! {
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        match spawn(&spec) {
            Ok(mut child) => {
                log(&format!(
                    "agent runtime {} started (pid {}, uid {})",
                    spec.bin.display(),
                    child.id(),
                    spec.uid
                ));
                let status = child.wait();
                log(&format!("agent runtime ended ({status:?}); restarting"));
            }
            Err(e) => log(&format!(
                "cannot start the agent runtime {}: {e}",
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

/// Whether the agent API answers `GET /healthz` with 200 on guest port 18789.
pub fn healthy() -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", GATEWAY_PORT as u16)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
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
mod tests {
    use super::*;

    #[test]
    fn model_comes_from_the_env_file() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join(".env");
        fs::write(&f, "ANTHROPIC_BASE_URL=http://x\nCLAWOS_MODEL=claude-x\n").expect("write");
        assert_eq!(model_from_env_file(&f).as_deref(), Some("claude-x"));
        fs::write(&f, "CLAWOS_MODEL=\n").expect("write");
        assert_eq!(model_from_env_file(&f), None);
        assert_eq!(model_from_env_file(&d.path().join("absent")), None);
    }

    #[test]
    fn a_runtime_that_cannot_join_its_cgroup_does_not_start() {
        let d = tempfile::tempdir().expect("tmp");
        let spec = RuntimeSpec {
            bin: "/bin/true".into(),
            args: vec![],
            cgroup: Some(d.path().join("no-such-cgroup")),
            // SAFETY: getuid/getgid have no preconditions.
            uid: unsafe { libc::getuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getgid() },
            home: d.path().to_owned(),
        };
        assert!(spawn(&spec).is_err());
    }

    #[test]
    fn the_runtime_runs_without_new_privileges() {
        let d = tempfile::tempdir().expect("tmp");
        let out = d.path().join("status");
        let spec = RuntimeSpec {
            bin: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                format!("grep NoNewPrivs /proc/self/status > {}", out.display()),
            ],
            cgroup: None,
            // SAFETY: getuid/getgid have no preconditions.
            uid: unsafe { libc::getuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getgid() },
            home: d.path().to_owned(),
        };
        let status = spawn(&spec).expect("spawn").wait().expect("wait");
        assert!(status.success());
        let text = fs::read_to_string(&out).expect("status");
        assert!(text.contains('1'), "{text}");
    }
}
