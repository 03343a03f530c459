//! The launcher's API against a hostile local user and a hostile web page, on the real
//! `vm-launcher` binary (no VM is needed: every request here is refused, or answered,
//! before anything boots). Requests are made with `curl`, as another uid with
//! `setpriv` where the test needs one.
//!
//! - a second uid (`nobody`) gets 401 on list, start and exec, and cannot read the
//!   operator credential (root only; skipped loudly otherwise);
//! - a browser-style request is refused even with the credential: a WebSocket upgrade
//!   with a foreign `Origin` (403), a rebinding `Host` (403), a `text/plain` POST (415);
//! - a non-loopback listen address is refused at start.

use clawos_test_ports::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `vm-launcher` process (killed when dropped) with its own state directory.
struct Daemon {
    child: Child,
    port: u16,
    state: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launcher_command(addr: &str, state: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vm-launcher"));
    cmd.args(["--addr", addr, "--state-dir"])
        .arg(state)
        // No image and no real hypervisor: nothing here boots.
        .args(["--allow-unsigned", "--backend", "qemu", "--qemu", "/bin/sh"])
        .args(["--vhost-vsock", "/nonexistent/vhost-device-vsock"])
        .env_remove("CLAWOS_SIGNING_PUBKEY")
        .env_remove("CLAWOS_IMAGE_DIR")
        .env_remove("CLAWOS_LAUNCHER_TOKEN_PATH")
        .env_remove("CLAWOS_LAUNCHER_ALLOWED_ORIGINS")
        .env_remove("CLAWOS_MONITOR_URL")
        .stdin(Stdio::null());
    cmd
}

fn start(state: &Path) -> Daemon {
    let port = free_port();
    let log = std::fs::File::create(state.with_extension("log")).expect("log");
    let child = launcher_command(&format!("127.0.0.1:{port}"), state)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn vm-launcher");
    let mut d = Daemon {
        child,
        port,
        state: state.to_owned(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = d.child.try_wait() {
            panic!(
                "vm-launcher exited with {status}: {}",
                std::fs::read_to_string(state.with_extension("log")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "vm-launcher did not listen");
        std::thread::sleep(Duration::from_millis(30));
    }
    d
}

impl Daemon {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The operator credential, or "" if the launcher made none.
    fn token(&self) -> String {
        std::fs::read_to_string(self.state.join("launcher/admin.token"))
            .map(|t| t.trim().to_owned())
            .unwrap_or_default()
    }
}

/// The answer's status and body to a `curl` request (`as_nobody`: run as uid/gid
/// 65534 with no supplementary groups).
fn curl(as_nobody: bool, args: &[&str]) -> (u16, String) {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "curl",
        ]);
        c
    } else {
        Command::new("curl")
    };
    // A WebSocket that opens stays open: the time limit ends curl, the status stays.
    let out = cmd
        .args(["-sS", "--http1.1", "--max-time", "5", "-o", "-"])
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

const WS_UPGRADE: [&str; 8] = [
    "-H",
    "Connection: Upgrade",
    "-H",
    "Upgrade: websocket",
    "-H",
    "Sec-WebSocket-Version: 13",
    "-H",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
];

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_second_uid_gets_401_everywhere_and_cannot_read_the_credential() {
    let name = "a_second_uid_gets_401_everywhere_and_cannot_read_the_credential";
    if !is_root() {
        return clawos_test_skip::record(name, "needs root to run curl as another uid (nobody)");
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        return clawos_test_skip::record(name, "setpriv (util-linux) is not installed");
    }
    let tmp = tempfile::tempdir().expect("tmp");
    // Another uid may walk into the state directory: only the credential's own mode
    // (and its directory's) keeps it out.
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    for d in [tmp.path(), state.as_path()] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
    }
    let d = start(&state);

    let (status, body) = curl(true, &[&d.url("/v1/vms")]);
    assert_eq!(status, 401, "nobody listed VMs: {body}");
    let (status, body) = curl(
        true,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data",
            r#"{"name":"pwned"}"#,
            &d.url("/v1/vms"),
        ],
    );
    assert_eq!(status, 401, "nobody started a VM: {body}");
    let mut exec = WS_UPGRADE.to_vec();
    let url = d.url("/v1/vms/pwned/exec");
    exec.push(&url);
    let (status, body) = curl(true, &exec);
    assert_eq!(status, 401, "nobody reached exec: {body}");
    assert!(
        !state.join("vms/pwned").exists(),
        "a refused start left a VM"
    );

    // The credential exists, is root's alone, and nobody cannot read it.
    let token_path = state.join("launcher/admin.token");
    let meta = std::fs::metadata(&token_path).expect("the launcher made its credential");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);
    let cat = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "cat",
        ])
        .arg(&token_path)
        .output()
        .expect("cat as nobody");
    assert!(
        !cat.status.success() && cat.stdout.is_empty(),
        "nobody read the credential: {cat:?}"
    );

    // The operator, with it, is served; a wrong one is refused like none.
    let auth = format!("Authorization: Bearer {}", d.token());
    let (status, body) = curl(false, &["-H", &auth, &d.url("/v1/vms")]);
    assert_eq!((status, body.trim()), (200, "[]"));
    let (status, _) = curl(
        false,
        &["-H", "Authorization: Bearer wrong", &d.url("/v1/vms")],
    );
    assert_eq!(status, 401);
    // Liveness stays open (service managers and load balancers probe it).
    let (status, _) = curl(true, &[&d.url("/healthz")]);
    assert_eq!(status, 200);
}

#[test]
fn browser_style_requests_are_refused_even_with_the_credential() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = start(&tmp.path().join("state"));
    let token = d.token();
    let auth = format!("Authorization: Bearer {token}");

    // A page's WebSocket to exec carries its own Origin: refused before the upgrade.
    let url = d.url("/v1/vms/x/exec");
    for origin in ["Origin: http://evil.example", "Origin: null"] {
        let mut args = WS_UPGRADE.to_vec();
        args.extend(["-H", &auth, "-H", origin, &url]);
        let (status, body) = curl(false, &args);
        assert_eq!(status, 403, "{origin}: {body}");
    }
    // DNS rebinding: evil.example resolves to 127.0.0.1, the Host header stays.
    for host in ["Host: evil.example:2080", "Host: evil.example"] {
        let (status, body) = curl(false, &["-H", &auth, "-H", host, &d.url("/v1/vms")]);
        assert_eq!(status, 403, "{host}: {body}");
    }
    // A form or `text/plain` POST (no CORS preflight) is not JSON: 415.
    let (status, body) = curl(
        false,
        &[
            "-H",
            &auth,
            "-H",
            "Content-Type: text/plain",
            "--data",
            r#"{"name":"pwned"}"#,
            &d.url("/v1/vms"),
        ],
    );
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("application/json"), "{body}");
    assert!(!d.state.join("vms/pwned").exists());
    // An upload that is not `application/octet-stream`: 415 too.
    let (status, body) = curl(
        false,
        &[
            "-X",
            "PUT",
            "-H",
            &auth,
            "-H",
            "Content-Type: text/plain",
            "--data",
            "x",
            &d.url("/v1/vms/x/files?path=a"),
        ],
    );
    assert_eq!(status, 415, "{body}");

    // The same requests from the operator's own tools pass the checks.
    assert!(!token.is_empty(), "no credential was made");
    let (status, body) = curl(
        false,
        &["-H", &auth, "-H", "Host: localhost:2080", &d.url("/v1/vms")],
    );
    assert_eq!((status, body.trim()), (200, "[]"));
    let (status, body) = curl(
        false,
        &[
            "-H",
            &auth,
            "-H",
            "Content-Type: application/json",
            "--data",
            r#"{"name":"Bad Name"}"#,
            &d.url("/v1/vms"),
        ],
    );
    assert_eq!(status, 400, "validation, not a refusal: {body}");
    let mut args = WS_UPGRADE.to_vec();
    args.extend(["-H", &auth, &url]);
    let (status, body) = curl(false, &args);
    assert_eq!(status, 404, "no VM x: {body}");
}

#[test]
fn a_non_loopback_listen_address_is_refused_at_start() {
    let tmp = tempfile::tempdir().expect("tmp");
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let mut child = launcher_command(addr, &tmp.path().join("state"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(30));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let status = status.unwrap_or_else(|| panic!("{addr}: the launcher kept listening"));
        assert!(!status.success(), "{addr}: {err}");
        assert!(err.contains("loopback"), "{addr}: {err}");
    }
}
