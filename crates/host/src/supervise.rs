//! Starting, stopping and looking at a host's daemons.
//!
//! Each daemon runs in its own process group (a Ctrl-C at the terminal that ran
//! `clawos up` does not reach it), its output appended to `<state>/logs/<name>.log`,
//! its process recorded in `<state>/run/<name>.json` (pid and the kernel's start time of
//! that pid, so a pid reused by another process is never taken for the daemon).

use std::io::{Read, Seek};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::HostConfig;
use crate::plan::{Daemon, Health, Launch, Plan};

/// Why `up` or `down` could not do all it should.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} could not be started ({}): {source}", binary.display())]
    Spawn {
        name: &'static str,
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{name} cannot listen on {addr}: something else already does (not a daemon `clawos up` started); stop it, or give {name} another address in clawos.toml"
    )]
    AddrInUse { name: &'static str, addr: String },
    #[error("state directory {}: {why}", path.display())]
    UnsafeStateDir { path: PathBuf, why: String },
    #[error("{name} {why}; the last lines of {}:\n{tail}", log.display())]
    NotHealthy {
        name: &'static str,
        why: String,
        log: PathBuf,
        tail: String,
    },
}

/// What is recorded of a started daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidRecord {
    pub pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
    pub addr: String,
    pub binary: PathBuf,
    /// Unix time it was started.
    pub started_unix: u64,
}

/// What happened to one daemon, for progress output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Starting(Daemon),
    Started {
        daemon: Daemon,
        pid: u32,
        ms: u64,
    },
    AlreadyRunning {
        daemon: Daemon,
        pid: u32,
    },
    Skipped {
        daemon: Daemon,
        why: String,
    },
    Stopping {
        daemon: Daemon,
        pid: u32,
    },
    Stopped {
        daemon: Daemon,
        ms: u64,
        killed: bool,
    },
    WasNotRunning(Daemon),
    /// A VM stopped through the launcher before the launcher itself.
    StoppedVm {
        name: String,
        ms: u64,
    },
    /// Something `down` could not do; it went on.
    Warning(String),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Starting(d) => write!(f, "starting {}", d.name()),
            Step::Started { daemon, pid, ms } => {
                write!(f, "{} is up (pid {pid}, {ms} ms)", daemon.name())
            }
            Step::AlreadyRunning { daemon, pid } => {
                write!(f, "{} is already running (pid {pid})", daemon.name())
            }
            Step::Skipped { daemon, why } => write!(f, "{} not started: {why}", daemon.name()),
            Step::Stopping { daemon, pid } => write!(f, "stopping {} (pid {pid})", daemon.name()),
            Step::Stopped { daemon, ms, killed } => {
                if *killed {
                    write!(
                        f,
                        "{} did not stop in time and was killed ({ms} ms)",
                        daemon.name()
                    )
                } else {
                    write!(f, "{} stopped ({ms} ms)", daemon.name())
                }
            }
            Step::WasNotRunning(d) => write!(f, "{} was not running", d.name()),
            Step::StoppedVm { name, ms } => write!(f, "VM {name} stopped ({ms} ms)"),
            Step::Warning(w) => write!(f, "warning: {w}"),
        }
    }
}

/// One row of `clawos status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusRow {
    pub name: &'static str,
    /// `running`, `unhealthy` (its process is there, its health check fails),
    /// `stopped`, or `off` (not part of this host's configuration; `detail` says why).
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_secs: Option<u64>,
    pub log: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The kernel's start time of `pid`, if it exists.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; field 22 (starttime) is fields[19].
    if fields.first() == Some(&"Z") {
        return None; // a zombie has exited: not running
    }
    fields.get(19)?.parse().ok()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Environment variables no daemon inherits from the shell that ran `clawos up`:
/// credentials go only where the plan sends them.
fn is_secret_var(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    n.ends_with("_KEY")
        || n.ends_with("_PASS")
        || n.ends_with("_PASSPHRASE")
        || n.ends_with("_CREDENTIALS")
        || n.ends_with("_SECRET")
        || n.ends_with("_PASSWORD")
        || n.ends_with("_TOKEN")
}

/// Whether a daemon gets the variable `name` of the environment `clawos up` ran in: the
/// process basics, locale, logging, TLS trust and HTTP proxies, and ClawOS's own
/// settings, never a credential.
fn is_passed_var(name: &str) -> bool {
    const PASSED: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "RUST_LOG",
        "RUST_BACKTRACE",
        "NO_COLOR",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "NO_PROXY",
        "https_proxy",
        "http_proxy",
        "no_proxy",
    ];
    !is_secret_var(name)
        && (PASSED.contains(&name) || name.starts_with("LC_") || name.starts_with("CLAWOS_"))
}

/// The daemons of a host, as its configuration and plan say.
#[derive(Debug)]
pub struct Host {
    pub cfg: HostConfig,
    pub plan: Plan,
}

impl Host {
    pub fn new(cfg: HostConfig, plan: Plan) -> Self {
        Self { cfg, plan }
    }

    fn run_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("run")
    }

    pub fn log_path(&self, d: Daemon) -> PathBuf {
        self.cfg
            .state_dir
            .join("logs")
            .join(format!("{}.log", d.name()))
    }

    fn record_path(&self, d: Daemon) -> PathBuf {
        self.run_dir().join(format!("{}.json", d.name()))
    }

    /// The recorded process of `d`, if it is still that process.
    pub fn running(&self, d: Daemon) -> Option<PidRecord> {
        use std::os::unix::fs::MetadataExt;
        // A record is only believed when this user wrote it (a planted one would make
        // `down` signal any process), read without following a link.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.record_path(d))
            .ok()?;
        // SAFETY: geteuid has no preconditions.
        if f.metadata().ok()?.uid() != unsafe { libc::geteuid() } {
            return None;
        }
        let mut text = Vec::new();
        f.read_to_end(&mut text).ok()?;
        let r: PidRecord = serde_json::from_slice(&text).ok()?;
        (start_ticks(r.pid) == Some(r.start_ticks)).then_some(r)
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SuperviseError + '_ {
        move |source| SuperviseError::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn make_dirs(&self) -> Result<(), SuperviseError> {
        use std::os::unix::fs::MetadataExt;
        // One this user does not own, or others may write, is refused: root's daemons
        // would write their logs and trust records there.
        if let Ok(m) = std::fs::symlink_metadata(&self.cfg.state_dir) {
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            let why = if !m.is_dir() {
                Some("not a directory".to_owned())
            } else if m.uid() != me {
                Some(format!(
                    "owned by uid {}, not this user (uid {me})",
                    m.uid()
                ))
            } else if m.mode() & 0o022 != 0 {
                Some(format!("others may write it (mode {:o})", m.mode() & 0o777))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(SuperviseError::UnsafeStateDir {
                    path: self.cfg.state_dir.clone(),
                    why,
                });
            }
        }
        for d in [
            self.cfg.state_dir.clone(),
            self.run_dir(),
            self.cfg.state_dir.join("logs"),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(Self::io(&d))?;
        }
        Ok(())
    }

    /// Starts every planned daemon not already running, in order, each once healthy
    /// before the next. If one fails, the ones this call started are stopped again and
    /// the error carries the failed one's log tail.
    pub async fn up(&self, progress: &mut dyn FnMut(Step)) -> Result<(), SuperviseError> {
        self.make_dirs()?;
        for (daemon, why) in &self.plan.skipped {
            progress(Step::Skipped {
                daemon: *daemon,
                why: why.clone(),
            });
        }
        let mut started: Vec<Daemon> = Vec::new();
        for l in &self.plan.launches {
            let result = match self.running(l.daemon) {
                Some(r) => {
                    // Already up (a second `up`): it must still answer.
                    self.wait_healthy(l, None, Instant::now()).await.map(|()| {
                        progress(Step::AlreadyRunning {
                            daemon: l.daemon,
                            pid: r.pid,
                        });
                    })
                }
                None => {
                    progress(Step::Starting(l.daemon));
                    let t0 = Instant::now();
                    match self.start(l) {
                        Ok((mut child, log_from)) => {
                            started.push(l.daemon);
                            let pid = child.id();
                            let healthy =
                                self.wait_healthy(l, Some((&mut child, log_from)), t0).await;
                            healthy.map(|()| {
                                progress(Step::Started {
                                    daemon: l.daemon,
                                    pid,
                                    ms: t0.elapsed().as_millis() as u64,
                                });
                            })
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(e) = result {
                for d in started.iter().rev() {
                    if self.running(*d).is_some() {
                        self.stop(*d, progress).await;
                    } else {
                        let _ = std::fs::remove_file(self.record_path(*d));
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Spawns `l` and records it; returns the child and where its log stood.
    fn start(&self, l: &Launch) -> Result<(std::process::Child, u64), SuperviseError> {
        // Its address must be free: whatever answers there would pass its health check,
        // and the other daemons would be wired to it.
        if let Err(e) = std::net::TcpListener::bind(&l.addr)
            && e.kind() == std::io::ErrorKind::AddrInUse
        {
            return Err(SuperviseError::AddrInUse {
                name: l.daemon.name(),
                addr: l.addr.clone(),
            });
        }
        let log_path = self.log_path(l.daemon);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&log_path)
            .map_err(Self::io(&log_path))?;
        let log_from = log.metadata().map_or(0, |m| m.len());
        let err = log.try_clone().map_err(Self::io(&log_path))?;
        let mut cmd = std::process::Command::new(&l.binary);
        cmd.args(&l.args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0);
        cmd.env_clear();
        for (k, v) in std::env::vars_os() {
            if k.to_str().is_some_and(is_passed_var) {
                cmd.env(k, v);
            }
        }
        cmd.envs(l.secret_env.iter().map(|(k, v)| (k, v)));
        let child = cmd.spawn().map_err(|source| SuperviseError::Spawn {
            name: l.daemon.name(),
            binary: l.binary.clone(),
            source,
        })?;
        let record = PidRecord {
            pid: child.id(),
            start_ticks: start_ticks(child.id()).unwrap_or(0),
            addr: l.addr.clone(),
            binary: l.binary.clone(),
            started_unix: now_unix(),
        };
        let path = self.record_path(l.daemon);
        let tmp = path.with_extension("json.tmp");
        std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                use std::io::Write;
                f.write_all(&serde_json::to_vec(&record).unwrap_or_default())
            })
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(Self::io(&path))?;
        Ok((child, log_from))
    }

    /// Waits until `l` answers its health check, its process ends (when it is our
    /// `child`), or the start timeout passes.
    async fn wait_healthy(
        &self,
        l: &Launch,
        mut child: Option<(&mut std::process::Child, u64)>,
        t0: Instant,
    ) -> Result<(), SuperviseError> {
        let limit = Duration::from_secs(self.cfg.start_timeout_secs);
        let log_from = child.as_ref().map_or(0, |(_, from)| *from);
        let fail = |why: String| SuperviseError::NotHealthy {
            name: l.daemon.name(),
            why,
            log: self.log_path(l.daemon),
            tail: log_tail(&self.log_path(l.daemon), log_from, 20),
        };
        loop {
            let answered = healthy(&l.health).await;
            // Our process must still be there: an answer from another is not its.
            if let Some((c, _)) = child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(fail(format!("exited at start ({status})")));
            }
            if answered {
                return Ok(());
            }
            if t0.elapsed() > limit {
                return Err(fail(format!(
                    "did not answer {} within {} s (start_timeout_secs)",
                    l.health.url,
                    limit.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops `d` if it runs: SIGTERM, then SIGKILL after the stop timeout. A process
    /// this user may not signal, or one still there 10 s after SIGKILL (stuck in the
    /// kernel), is reported and left.
    async fn stop(&self, d: Daemon, progress: &mut dyn FnMut(Step)) {
        let Some(r) = self.running(d) else {
            let _ = std::fs::remove_file(self.record_path(d));
            progress(Step::WasNotRunning(d));
            return;
        };
        progress(Step::Stopping {
            daemon: d,
            pid: r.pid,
        });
        let t0 = Instant::now();
        let pid = r.pid as libc::pid_t;
        let signal = |sig: libc::c_int| -> Result<(), std::io::Error> {
            // SAFETY: kill() with a pid just checked to be the recorded process (same
            // start time); no memory is involved.
            if unsafe { libc::kill(pid, sig) } == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        let refused = |e: &std::io::Error| e.raw_os_error() == Some(libc::EPERM);
        if let Err(e) = signal(libc::SIGTERM)
            && refused(&e)
        {
            progress(Step::Warning(format!(
                "cannot stop {} (pid {}): {e}; run `clawos down` as the user that started it",
                d.name(),
                r.pid
            )));
            return;
        }
        let limit = Duration::from_secs(self.cfg.stop_timeout_secs);
        let mut killed: Option<Instant> = None;
        while start_ticks(r.pid) == Some(r.start_ticks) {
            match killed {
                None if t0.elapsed() > limit => {
                    let _ = signal(libc::SIGKILL);
                    killed = Some(Instant::now());
                }
                Some(at) if at.elapsed() > Duration::from_secs(10) => {
                    progress(Step::Warning(format!(
                        "{} (pid {}) is still there 10 s after SIGKILL (stuck in the kernel?)",
                        d.name(),
                        r.pid
                    )));
                    return;
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = std::fs::remove_file(self.record_path(d));
        progress(Step::Stopped {
            daemon: d,
            ms: t0.elapsed().as_millis() as u64,
            killed: killed.is_some(),
        });
    }

    /// Stops every daemon of the host that runs (whatever the configuration says now),
    /// in the reverse of start order. The launcher's VMs are stopped through it first
    /// (a launcher that ends leaves its VMs running, to adopt them when it comes back),
    /// unless `keep_vms`.
    pub async fn down(&self, keep_vms: bool, progress: &mut dyn FnMut(Step)) {
        for d in Daemon::ALL.iter().rev() {
            if *d == Daemon::Launcher && !keep_vms {
                self.stop_vms(progress).await;
            }
            if self.record_path(*d).exists() {
                self.stop(*d, progress).await;
            }
        }
    }

    /// Stops the running launcher's active VMs, each gracefully (the launcher's own
    /// stop: the guest is asked, then the hypervisor ended).
    async fn stop_vms(&self, progress: &mut dyn FnMut(Step)) {
        let Some(r) = self.running(Daemon::Launcher) else {
            return;
        };
        let token = match clawos_vm_launcher_api::local_token(&self.cfg.state_dir) {
            Ok(t) => t,
            Err(why) => {
                progress(Step::Warning(format!(
                    "cannot stop the VMs through vm-launcher: {why}"
                )));
                return;
            }
        };
        let client = clawos_vm_launcher_api::LauncherClient::new(&format!("http://{}", r.addr))
            .with_token(&token);
        let vms = match client.list().await {
            Ok(v) => v,
            Err(e) => {
                progress(Step::Warning(format!("cannot list vm-launcher's VMs: {e}")));
                return;
            }
        };
        for vm in vms.iter().filter(|v| v.state.is_active()) {
            let t0 = Instant::now();
            match client.stop(&vm.name).await {
                Ok(_) => progress(Step::StoppedVm {
                    name: vm.name.clone(),
                    ms: t0.elapsed().as_millis() as u64,
                }),
                Err(e) => progress(Step::Warning(format!("VM {}: {e}", vm.name))),
            }
        }
    }

    /// Each daemon's state.
    pub async fn status(&self) -> Vec<StatusRow> {
        let mut rows = Vec::new();
        for d in Daemon::ALL {
            let launch = self.plan.launches.iter().find(|l| l.daemon == d);
            let skipped = self.plan.skipped.iter().find(|(s, _)| *s == d);
            let mut row = StatusRow {
                name: d.name(),
                state: "stopped",
                pid: None,
                addr: launch.map(|l| l.addr.clone()),
                uptime_secs: None,
                log: self.log_path(d),
                detail: None,
            };
            if let Some(r) = self.running(d) {
                let ok = match launch {
                    Some(l) => healthy(&l.health).await,
                    None => true,
                };
                row.state = if ok { "running" } else { "unhealthy" };
                row.pid = Some(r.pid);
                row.addr = Some(r.addr.clone());
                row.uptime_secs = Some(now_unix().saturating_sub(r.started_unix));
                if launch.is_none() {
                    row.detail = Some("running, but not part of this configuration".into());
                }
            } else if let Some((_, why)) = skipped {
                row.state = "off";
                row.detail = Some(why.clone());
            }
            rows.push(row);
        }
        rows
    }
}

/// Whether a health check answers 200 now.
async fn healthy(h: &Health) -> bool {
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy();
    if let Some(ca) = &h.ca {
        let Some(cert) = std::fs::read(ca)
            .ok()
            .and_then(|pem| reqwest::Certificate::from_pem(&pem).ok())
        else {
            return false;
        };
        b = b.add_root_certificate(cert);
    }
    let Ok(client) = b.build() else {
        return false;
    };
    client
        .get(&h.url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// The last `lines` lines of what `path` got after byte `from`.
fn log_tail(path: &Path, from: u64, lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let _ = f.seek(std::io::SeekFrom::Start(from));
    let mut text = String::new();
    let _ = f.take(1 << 20).read_to_string(&mut text);
    let all: Vec<&str> = text.lines().collect();
    // A daemon that fails at start says why in one `Error: …` line, which a backtrace
    // after it would push out of the tail: start there when there is one.
    let from = all
        .iter()
        .rposition(|l| l.starts_with("Error: "))
        .unwrap_or(all.len().saturating_sub(lines));
    all[from..all.len().min(from + lines)].join("\n")
}

/// Why monitor-daemon cannot run on this machine, if it cannot.
pub fn monitor_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("it loads eBPF programs and needs root".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("the kernel has no BTF (/sys/kernel/btf/vmlinux)".into());
    }
    None
}

#[cfg(test)]
mod tests;
