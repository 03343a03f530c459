//! `clawos-agent`: the guest agent started by `clawos-init`.
//!
//! - control service on vsock port 1024 (health, exec, files, shutdown), for the
//!   launcher only: every request carries the VM's secret;
//! - LLM relay: listens on `127.0.0.1:11435` in the guest and forwards each connection
//!   to the host (vsock port 11435), where the launcher relays it to the inference proxy;
//! - skills relay: the same from `127.0.0.1:2083` to host port 2083, which the launcher
//!   relays to skill-manager (the agent runtimes' MCP server);
//! - gateway relay: host → guest vsock port 18789 → `127.0.0.1:18789` in the guest;
//! - syscall audit: runs `/sbin/clawos-audit` (restarted if it ends) and waits for it
//!   to attach before serving; every command starts in the audited agent cgroup;
//! - the agent runtime: the one the image describes in `/etc/clawos/runtime.json` (a
//!   descriptor that does not parse or validate fails the boot), else the built-in
//!   `/sbin/clawos-agentd` when the image has it, else none. Its workspace directories
//!   and `HOME` are made and given to the `agent` user before each start; it runs as
//!   that user in the agent cgroup with only the environment its descriptor gives (the
//!   VM's model, and a gateway token made once per boot, kept in memory and in
//!   `/run/clawos/gateway.token`, root 0600); its output reaches the console line by
//!   line prefixed with its name; it is restarted if it ends; the control service opens
//!   (the VM is ready) only once its agent API answers within the descriptor's
//!   `ready_timeout_secs`, and its `runtime` operation reports the runtime, its health
//!   and its token.
//!
//! It also records each boot in `/workspace/.clawos/boots` and prints the
//! `CLAWOS_READY` console marker (a fallback diagnostic; readiness is the health call).

use std::fs;
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawos_guest::agent::Service;
use clawos_guest::protocol::{CONTROL_PORT, GATEWAY_PORT, PROXY_PORT, SKILLS_PORT};
use clawos_guest::runtime::{
    self, AGENT_GID, AGENT_UID, AGENTD_BIN, DESCRIPTOR_PATH, ENV_FILE, RuntimeSpec, RuntimeStatus,
    TOKEN_PATH,
};
use clawos_guest::workspace::{WORKSPACE, Workspace};
use clawos_guest::{AGENT_CGROUP, AUDIT_BIN, AUDIT_READY, marker, sys};

/// Where init leaves the control secret (tmpfs, 0600, never in the workspace).
const SECRET_PATH: &str = "/run/clawos/control.secret";

fn log(msg: &str) {
    println!("clawos-agent: {msg}");
    let _ = io::stdout().flush();
}

/// Appends this boot to `/workspace/.clawos/boots` and returns its number. Through the
/// confined workspace, never following a symlink, never blocking on a FIFO, reading at
/// most 1 MiB: the agent user owns the workspace and may have left anything there.
fn record_boot() -> u64 {
    let path = ".clawos/boots";
    let recorded = Workspace::open(Path::new(WORKSPACE)).and_then(|ws| {
        ws.create_dirs(".clawos", 0o755)?;
        let mut f = ws.open_append(path, 0o644)?;
        let mut text = String::new();
        io::Read::read_to_string(&mut io::Read::take(&f, 1 << 20), &mut text)?;
        let n = text.lines().count() as u64 + 1;
        writeln!(f, "boot {n}")?;
        f.sync_all()?;
        Ok(n)
    });
    recorded.unwrap_or_else(|e| {
        log(&format!("cannot record boot in {WORKSPACE}/{path}: {e}"));
        0
    })
}

/// Copies bytes both ways between two connections until either side closes.
fn splice(a: fs::File, b: TcpStream) {
    let (Ok(mut a2), Ok(mut b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let (mut a, mut b) = (a, b);
    let t = std::thread::spawn(move || {
        let _ = io::copy(&mut a2, &mut b2);
        let _ = b2.shutdown(std::net::Shutdown::Write);
    });
    let _ = io::copy(&mut b, &mut a);
    sys::shutdown_write(&a);
    let _ = t.join();
}

/// Forwards each connection to guest `127.0.0.1:<port>` to host vsock port `port`
/// (`what` names the relay in the log).
fn host_relay(port: u32, what: &'static str) {
    let Ok(tcp_port) = u16::try_from(port) else {
        return log(&format!(
            "{what} relay disabled: port {port} is not a TCP port"
        ));
    };
    let listener = match TcpListener::bind(("127.0.0.1", tcp_port)) {
        Ok(l) => l,
        Err(e) => return log(&format!("{what} relay disabled: {e}")),
    };
    for conn in listener.incoming().flatten() {
        std::thread::spawn(
            move || match sys::vsock_connect(sys::VMADDR_CID_HOST, port) {
                Ok(host) => splice(host, conn),
                Err(e) => log(&format!("{what} relay: {e}")),
            },
        );
    }
}

fn gateway_relay() {
    let listener = match sys::vsock_listen(GATEWAY_PORT) {
        Ok(l) => l,
        Err(e) => return log(&format!("gateway relay disabled: {e}")),
    };
    loop {
        let Ok(conn) = sys::vsock_accept(&listener) else {
            continue;
        };
        std::thread::spawn(move || {
            if let Ok(gw) = TcpStream::connect(("127.0.0.1", GATEWAY_PORT as u16)) {
                splice(conn, gw);
            }
        });
    }
}

/// Runs `clawos-audit` for the life of the VM, restarting it if it ends. Returns once
/// the first instance reported that it is attached (or failed, or took too long):
/// whether commands can be audited.
fn start_audit() -> bool {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<bool>();
    std::thread::spawn(move || {
        let mut ready_tx = Some(ready_tx);
        let mut backoff = Duration::from_secs(1);
        loop {
            let child = Command::new(AUDIT_BIN)
                .stdout(Stdio::piped())
                .stdin(Stdio::null())
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => {
                    log(&format!(
                        "cannot start {AUDIT_BIN}: {e}; commands run unaudited"
                    ));
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(false);
                    }
                    return;
                }
            };
            let started = Instant::now();
            if let Some(out) = child.stdout.take() {
                let tx = ready_tx.take();
                std::thread::spawn(move || {
                    let mut tx = tx;
                    for line in io::BufRead::lines(io::BufReader::new(out)).map_while(Result::ok) {
                        if line.starts_with(AUDIT_READY)
                            && let Some(tx) = tx.take()
                        {
                            let _ = tx.send(true);
                        }
                        log(&line);
                    }
                });
            }
            let status = child.wait();
            log(&format!("{AUDIT_BIN} ended ({status:?}); restarting"));
            if let Some(tx) = ready_tx.take() {
                let _ = tx.send(false);
            }
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            log("clawos-audit did not report ready within 30 s");
            false
        })
}

/// Prints the `CLAWOS_FATAL` line and asks init to power off; never returns.
fn fatal(msg: &str) -> ! {
    println!("{} {msg}", marker::FATAL);
    let _ = io::stdout().flush();
    // SAFETY: kill(2) with plain integers: ask init (PID 1) to power off.
    unsafe {
        libc::kill(1, libc::SIGTERM);
    }
    loop {
        std::thread::park();
    }
}

/// Starts the image's agent runtime under supervision and waits until it answers; what
/// the control service reports about it, `None` when the image has none. A bad
/// descriptor, or a runtime that never answers, fails the boot with the reason on the
/// console.
fn start_runtime(audited: bool) -> Option<RuntimeStatus> {
    let model = runtime::model_from_env_file(Path::new(ENV_FILE));
    let descriptor = match runtime::choose(
        Path::new(DESCRIPTOR_PATH),
        Path::new(AGENTD_BIN),
        model.as_deref(),
    ) {
        Ok(Some(d)) => d,
        Ok(None) => {
            log("no agent runtime in this image");
            return None;
        }
        Err(e) => fatal(&format!("bad agent runtime descriptor: {e}")),
    };
    // One token per boot: every restart of the runtime gets the same one.
    let token = descriptor.gateway_token_env.as_ref().map(|_| {
        let token = runtime::new_gateway_token()
            .unwrap_or_else(|e| fatal(&format!("cannot make the gateway token: {e}")));
        if let Err(e) = runtime::write_gateway_token(Path::new(TOKEN_PATH), &token) {
            log(&format!(
                "cannot keep the gateway token in {TOKEN_PATH}: {e}"
            ));
        }
        token
    });
    let mut spec = RuntimeSpec::from_descriptor(
        &descriptor,
        model.as_deref(),
        token.as_deref(),
        audited.then(|| AGENT_CGROUP.into()),
    );
    // The host's skills, when it offers them: the runtime's MCP server.
    if let Some(url) = runtime::env_file_value(Path::new(ENV_FILE), runtime::MCP_URL_VAR) {
        spec.offer_skills(&descriptor, &url);
    }
    let status = RuntimeStatus::new(&descriptor, token);
    let limit = Duration::from_secs(descriptor.ready_timeout_secs);
    let name = descriptor.name.clone();
    let prepare = move || {
        Workspace::open(Path::new(WORKSPACE))
            .and_then(|ws| runtime::prepare_runtime_dirs(&ws, &descriptor, AGENT_UID, AGENT_GID))
    };
    std::thread::spawn(move || runtime::supervise(spec, prepare, log));
    match runtime::wait_healthy(limit) {
        Some(took) => {
            log(&format!(
                "agent runtime {name} ready ({} ms)",
                took.as_millis()
            ));
            Some(status)
        }
        None => fatal(&format!(
            "the agent runtime {name} did not answer on port {GATEWAY_PORT} within {} s",
            limit.as_secs()
        )),
    }
}

fn main() {
    let boot = record_boot();
    let t = Instant::now();
    let audited = start_audit() && Path::new(AGENT_CGROUP).is_dir();
    log(&format!(
        "syscall audit {} ({} ms)",
        if audited { "on" } else { "OFF" },
        t.elapsed().as_millis()
    ));
    let runtime = start_runtime(audited);
    let secret = fs::read_to_string(SECRET_PATH)
        .unwrap_or_default()
        .trim()
        .to_owned();
    let workspace = match Workspace::open(Path::new(WORKSPACE)) {
        Ok(w) => w,
        Err(e) => {
            log(&format!("cannot open {WORKSPACE}: {e}"));
            std::process::exit(1);
        }
    };
    let service = Arc::new(Service {
        secret,
        workspace,
        boot,
        started: Instant::now(),
        // SAFETY: kill(2) with plain integers: ask init (PID 1) to power off.
        on_shutdown: || unsafe {
            libc::kill(1, libc::SIGTERM);
        },
        audit_cgroup: audited.then(|| AGENT_CGROUP.into()),
        file_owner: runtime.is_some().then_some((AGENT_UID, AGENT_GID)),
        runtime,
    });
    std::thread::spawn(|| host_relay(PROXY_PORT, "LLM"));
    std::thread::spawn(|| host_relay(SKILLS_PORT, "skills"));
    std::thread::spawn(gateway_relay);
    let listener = match sys::vsock_listen(CONTROL_PORT) {
        Ok(l) => Some(l),
        Err(e) => {
            log(&format!("control service disabled: {e}"));
            None
        }
    };
    let name = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    println!("{} agent={} boot={boot}", marker::READY, name.trim());
    let _ = io::stdout().flush();
    let Some(listener) = listener else {
        loop {
            std::thread::park();
        }
    };
    loop {
        match sys::vsock_accept(&listener) {
            Ok(conn) => {
                let svc = Arc::clone(&service);
                std::thread::spawn(move || {
                    if let Err(e) = svc.handle(conn) {
                        log(&format!("control connection: {e}"));
                    }
                });
            }
            Err(e) => log(&format!("accept: {e}")),
        }
    }
}
