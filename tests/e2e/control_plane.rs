//! control-plane end to end: the real daemon over TLS in front of a real vm-launcher,
//! driven with the real `curl` (and Python's `ssl`/`http.client` and `openssl` where a
//! test needs a connection held open or a certificate made by another tool).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clawos_e2e::stack::ControlPlane;
use clawos_e2e::tls::{HeldConnection, openssl_cert, serial_served, wait_for_serial};
use clawos_e2e::{Launcher, can_boot_vms, show};
use serde_json::{Value, json};

/// Creates an operator token with `role` as the admin; returns its secret and id.
fn token(cp: &ControlPlane, admin: &str, name: &str, role: &str) -> (String, String) {
    let a = cp.call(
        Some(admin),
        "POST",
        "/api/v1/operators/tokens",
        Some(&json!({"name": name, "role": role, "ttl_secs": 3600})),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    let v = a.json();
    (
        v["token"].as_str().expect("token").to_owned(),
        v["info"]["id"].as_str().expect("id").to_owned(),
    )
}

/// `python3 -c script CA PORT …`: a TLS client of the control plane written in Python.
fn tls_script(script: &str, cp: &ControlPlane) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(script)
        .arg(cp.ca())
        .arg(cp.port.to_string());
    cmd
}

/// The audit record of the request with this id.
fn record(cp: &ControlPlane, request_id: &str) -> Value {
    cp.audit()
        .into_iter()
        .find(|r| r["request_id"] == request_id)
        .unwrap_or_else(|| {
            panic!(
                "no audit record for request {request_id}:\n{:#?}",
                cp.audit()
            )
        })
}

fn request_id(a: &clawos_e2e::stack::Answer) -> String {
    a.header("x-request-id")
        .expect("every answer carries its request id")
}

/// Every byte under `dir`, file by file, except the files meant to hold credentials.
fn files_without_credentials(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.ends_with(".token") || name.ends_with(".key") || name == "self-signed.names"
                {
                    continue;
                }
                if let Ok(bytes) = std::fs::read(&p) {
                    out.push((p.display().to_string(), bytes));
                }
            }
        }
    }
    out
}

#[test]
fn operators_roles_bad_input_and_the_audit_trail_over_tls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path();
    let launcher = Launcher::start(state)?;
    let cp = ControlPlane::start(state, &launcher.url, &[])?;
    let admin = cp.admin_token();
    assert!(
        admin.starts_with("clawos-op-"),
        "the bootstrap credential is an operator token"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.join("control-plane/admin.token"))?.permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let fp = cp
        .log()
        .lines()
        .find_map(|l| {
            l.split("fingerprint ")
                .nth(1)?
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .context("the certificate's fingerprint is logged at start")?;
    let openssl_fp = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cp.ca())
        .output()?;
    assert!(
        String::from_utf8_lossy(&openssl_fp.stdout).contains(fp.trim()),
        "logged fingerprint {fp} is not openssl's {}",
        show(&openssl_fp)
    );

    // TLS: the certificate is checked, TLS 1.1 is refused, plain HTTP gets no answer.
    let untrusted = Command::new("curl")
        .args(["-sS", "-o", "/dev/null"])
        .arg(format!("{}/healthz", cp.url))
        .output()?;
    assert_eq!(
        untrusted.status.code(),
        Some(60),
        "an unknown CA: {}",
        show(&untrusted)
    );
    let old_tls = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "--tlsv1.0",
            "--tls-max",
            "1.1",
            "--cacert",
        ])
        .arg(cp.ca())
        .arg(format!("{}/healthz", cp.url))
        .output()?;
    assert!(
        !old_tls.status.success(),
        "TLS 1.1 was accepted: {}",
        show(&old_tls)
    );
    let plain = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--max-time", "20"])
        .arg(format!("http://127.0.0.1:{}/healthz", cp.port))
        .output()?;
    assert!(
        !plain.status.success(),
        "plain HTTP was answered: {}",
        show(&plain)
    );

    // Open routes.
    let health = cp.call(None, "GET", "/healthz", None);
    assert_eq!(health.status, 200);
    assert_eq!(
        health.header("strict-transport-security").as_deref(),
        Some("max-age=31536000"),
        "HSTS on every answer"
    );
    let doc = cp.call(None, "GET", "/api/v1/openapi.json", None);
    assert_eq!(doc.status, 200);
    let kept = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json"),
    )?;
    assert_eq!(
        doc.body, kept,
        "the served OpenAPI document is docs/openapi.json"
    );

    // Authentication.
    let none = cp.call(None, "GET", "/api/v1/vms", None);
    assert_eq!(none.status, 401, "{}", none.body);
    assert!(none.header("www-authenticate").is_some());
    assert_eq!(record(&cp, &request_id(&none))["result"], "refused");
    let forged = cp.call(
        Some("clawos-op-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        "GET",
        "/api/v1/vms",
        None,
    );
    assert_eq!(forged.status, 401);
    let me = cp.call(Some(&admin), "GET", "/api/v1/whoami", None);
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.json()["role"], "admin");

    // Roles.
    let (viewer, viewer_id) = token(&cp, &admin, "vera", "viewer");
    let (operator, _) = token(&cp, &admin, "otto", "operator");
    let listed = cp.call(Some(&viewer), "GET", "/api/v1/vms", None);
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.json(), json!([]));
    for (method, path, body) in [
        ("POST", "/api/v1/vms", Some(json!({"name": "x"}))),
        ("POST", "/api/v1/vms/x/stop", None),
        ("DELETE", "/api/v1/vms/x", None),
    ] {
        let a = cp.call(Some(&viewer), method, path, body.as_ref());
        assert_eq!(a.status, 403, "viewer {method} {path}: {}", a.body);
        assert!(a.body.contains("needs the operator role"), "{}", a.body);
        let r = record(&cp, &request_id(&a));
        assert_eq!(
            (
                r["operator"].as_str(),
                r["role"].as_str(),
                r["result"].as_str()
            ),
            (Some("vera"), Some("viewer"), Some("refused")),
            "{r}"
        );
    }
    let escalate = cp.call(
        Some(&operator),
        "POST",
        "/api/v1/operators/tokens",
        Some(&json!({"name": "mallory", "role": "admin", "ttl_secs": 3600})),
    );
    assert_eq!(
        escalate.status, 403,
        "an operator cannot create operators: {}",
        escalate.body
    );
    let r = record(&cp, &request_id(&escalate));
    assert_eq!(r["action"], "operator.token.create");
    assert_eq!(r["result"], "refused");
    let stop_missing = cp.call(Some(&operator), "POST", "/api/v1/vms/nope/stop", None);
    assert_eq!(
        stop_missing.status, 404,
        "the launcher's own answer: {}",
        stop_missing.body
    );
    let r = record(&cp, &request_id(&stop_missing));
    assert_eq!(
        (
            r["action"].as_str(),
            r["target"].as_str(),
            r["result"].as_str()
        ),
        (Some("vm.stop"), Some("nope"), Some("failed"))
    );

    // Bad input: named, 4xx, nothing created.
    let unknown_field = cp.call(
        Some(&operator),
        "POST",
        "/api/v1/vms",
        Some(&json!({"name": "a", "memory": 5})),
    );
    assert_eq!(unknown_field.status, 400, "{}", unknown_field.body);
    assert!(
        unknown_field.body.contains("memory"),
        "{}",
        unknown_field.body
    );
    let bad_name = cp.call(
        Some(&operator),
        "POST",
        "/api/v1/vms",
        Some(&json!({"name": "../etc"})),
    );
    assert_eq!(bad_name.status, 400, "{}", bad_name.body);
    assert!(
        bad_name.body.contains("\\\"../etc\\\"") || bad_name.body.contains("../etc"),
        "{}",
        bad_name.body
    );
    let path_name = cp.call(Some(&operator), "GET", "/api/v1/vms/..%2Fetc", None);
    assert_eq!(path_name.status, 400, "{}", path_name.body);
    let big = format!("{{\"name\": \"{}\"}}", "a".repeat(2 << 20));
    let big_path = dir.path().join("big.json");
    std::fs::write(&big_path, big)?;
    let too_big = cp.curl_with(
        Some(&operator),
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!("@{}", big_path.display()),
        ],
        "/api/v1/vms",
    );
    assert_eq!(too_big.status, 413, "{}", too_big.body);
    let not_json = cp.curl_with(
        Some(&operator),
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: text/plain",
            "--data",
            "{}",
        ],
        "/api/v1/vms",
    );
    assert_eq!(
        not_json.status, 415,
        "a page's simple form post: {}",
        not_json.body
    );
    let cross_site = cp.curl_with(
        Some(&operator),
        &["-H", "Origin: https://evil.example"],
        "/api/v1/vms",
    );
    assert_eq!(
        cross_site.status, 403,
        "a foreign Origin: {}",
        cross_site.body
    );
    let nowhere = cp.call(Some(&admin), "GET", "/api/v1/nothing", None);
    assert_eq!(nowhere.status, 404);
    assert_eq!(
        cp.call(Some(&viewer), "GET", "/api/v1/vms", None).json(),
        json!([]),
        "nothing was created"
    );

    // A slow client holds only its own connection: headers dribbled one line a second
    // are cut off, and others are served meanwhile.
    let slow = tls_script(SLOW_CLIENT, &cp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    assert_eq!(
        cp.call(Some(&viewer), "GET", "/api/v1/vms", None).status,
        200
    );
    let others_served_in = t.elapsed();
    let slow_out = slow.wait_with_output()?;
    let slow_said = String::from_utf8_lossy(&slow_out.stdout).into_owned();
    assert!(
        slow_said.starts_with("closed after"),
        "the slow client was not cut off: {}",
        show(&slow_out)
    );
    clawos_e2e::measured(&format!(
        "control-plane: a request beside a slowloris client answered in {others_served_in:?}; {slow_said}"
    ));

    // A client that hangs up in the middle of its body leaves a record too (the
    // request failed before anything was done).
    let gone = tls_script(GONE_CLIENT, &cp)
        .arg(&operator)
        .arg("POST /api/v1/vms")
        .arg("100")
        .output()?;
    assert!(gone.status.success(), "{}", show(&gone));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cp.audit().iter().any(|r| {
        r["action"] == "vm.start"
            && r["status"] == 400
            && r["operator"] == "otto"
            && r["target"].is_null()
    }) {
        if Instant::now() > deadline {
            bail!("no record of the cut request: {:#?}", cp.audit().last());
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Revocation takes effect at once.
    let revoked = cp.call(
        Some(&admin),
        "DELETE",
        &format!("/api/v1/operators/tokens/{viewer_id}"),
        None,
    );
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    assert_eq!(
        cp.call(Some(&viewer), "GET", "/api/v1/vms", None).status,
        401
    );
    let listed = cp
        .call(Some(&admin), "GET", "/api/v1/operators/tokens", None)
        .json();
    assert!(
        listed
            .as_array()
            .expect("list")
            .iter()
            .all(|t| t.get("token").is_none()),
        "secrets are never listed"
    );

    // Every request that reached HTTP left exactly one record, with its request id.
    let audit = cp.audit();
    let ids: std::collections::HashSet<&str> = audit
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    assert_eq!(ids.len(), audit.len(), "one record per request id");
    assert!(audit.iter().all(|r| {
        r["remote"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
    }));

    // No credential in any answer, log or state file but its own.
    let launcher_token = launcher.token();
    let secrets = [
        admin.as_str(),
        viewer.as_str(),
        operator.as_str(),
        launcher_token.as_str(),
    ];
    let key_pem = std::fs::read_to_string(state.join("control-plane/tls/self-signed.key"))?;
    let key_body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for (file, bytes) in files_without_credentials(state) {
        let text = String::from_utf8_lossy(&bytes);
        for s in secrets {
            assert!(!text.contains(s), "a credential is in {file}");
        }
        assert!(!text.contains(&key_body[..40]), "the TLS key is in {file}");
    }
    for a in [&me, &listed_answer(&cp, &admin)] {
        for s in secrets {
            assert!(!a.body.contains(s), "a credential in an answer");
        }
    }

    // Plain HTTP off loopback is refused before anything listens.
    let refused = Command::new(clawos_e2e::bin("control-plane"))
        .args(["--tls", "off", "--addr", "0.0.0.0:0", "--state-dir"])
        .arg(dir.path().join("other"))
        .output()?;
    assert!(!refused.status.success());
    assert!(
        show(&refused).contains("--insecure-plain-http"),
        "{}",
        show(&refused)
    );
    assert!(
        !dir.path().join("other/control-plane").exists(),
        "nothing was made"
    );
    Ok(())
}

fn listed_answer(cp: &ControlPlane, admin: &str) -> clawos_e2e::stack::Answer {
    cp.call(Some(admin), "GET", "/api/v1/operators/tokens", None)
}

/// Sends a request (`METHOD PATH`) with the bearer token and, when a length is given,
/// the start of a JSON body that long; then (after an optional pause, so the request
/// is being served) hangs up without waiting for the answer.
const GONE_CLIENT: &str = r#"
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[1])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[2]))), server_hostname="127.0.0.1")
head = sys.argv[4] + " HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + sys.argv[3]
length = int(sys.argv[5])
if length:
    head += "\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{\"name\": " % length
else:
    head += "\r\n\r\n"
s.sendall(head.encode())
if len(sys.argv) > 6:
    time.sleep(float(sys.argv[6]))
s.close()
"#;

/// Opens a TLS connection and sends a request's headers one line a second; prints how
/// long until the server closed it.
const SLOW_CLIENT: &str = r#"
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[1])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[2]))), server_hostname="127.0.0.1")
t = time.monotonic()
s.sendall(b"GET /api/v1/vms HTTP/1.1\r\nHost: 127.0.0.1\r\n")
s.settimeout(1)
while time.monotonic() - t < 90:
    try:
        if s.recv(4096) == b"":
            break
    except socket.timeout:
        pass
    except (ConnectionError, ssl.SSLError):
        break
    try:
        s.sendall(b"X-Slow: 1\r\n")
    except (ConnectionError, ssl.SSLError):
        break
else:
    print("still open after 90s"); sys.exit(1)
print(f"closed after {time.monotonic() - t:.1f}s")
"#;

#[test]
fn a_vm_started_stopped_and_watched_through_the_control_plane() -> Result<()> {
    if !can_boot_vms("a_vm_started_stopped_and_watched_through_the_control_plane") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let state = dir.path();
    let mut launcher = Launcher::start(state)?;
    let cp = ControlPlane::start(state, &launcher.url, &[])?;
    let admin = cp.admin_token();
    let (viewer, _) = token(&cp, &admin, "vera", "viewer");
    let (operator, _) = token(&cp, &admin, "otto", "operator");

    let started = cp.call(
        Some(&operator),
        "POST",
        "/api/v1/vms",
        Some(&json!({"name": "cp-agent", "mem_mib": 256})),
    );
    assert_eq!(started.status, 202, "{}", started.body);
    let r = record(&cp, &request_id(&started));
    assert_eq!(
        (
            r["action"].as_str(),
            r["target"].as_str(),
            r["operator"].as_str(),
            r["result"].as_str()
        ),
        (Some("vm.start"), Some("cp-agent"), Some("otto"), Some("ok")),
        "{r}"
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    let vm = loop {
        let a = cp.call(Some(&viewer), "GET", "/api/v1/vms/cp-agent", None);
        assert_eq!(a.status, 200, "{}", a.body);
        let vm = a.json();
        if vm["state"] == "running" {
            break vm;
        }
        if vm["state"] == "failed" || Instant::now() > deadline {
            bail!("cp-agent did not come up: {vm}\n{}", launcher.log());
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    clawos_e2e::measured(&format!(
        "control-plane: VM booted through the control plane in {} ms",
        vm["boot_ms"]
    ));
    let console = cp.call(
        Some(&viewer),
        "GET",
        "/api/v1/vms/cp-agent/console?offset=0",
        None,
    );
    assert_eq!(console.status, 200);
    assert!(console.header("x-console-offset").is_some());
    assert!(!console.body.is_empty(), "the viewer reads the console");

    let denied = cp.call(Some(&viewer), "POST", "/api/v1/vms/cp-agent/stop", None);
    assert_eq!(denied.status, 403);
    let still = cp
        .call(Some(&viewer), "GET", "/api/v1/vms/cp-agent", None)
        .json();
    assert_eq!(still["state"], "running", "a refused stop did nothing");
    // The operator asks for a stop and hangs up at once: whether or not the request
    // got as far as the launcher, the trail has a record of it (`aborted` when the
    // control plane was still working on it), never nothing.
    let gone = tls_script(GONE_CLIENT, &cp)
        .arg(&operator)
        .arg("POST /api/v1/vms/cp-agent/stop")
        .arg("0")
        .arg("0.3")
        .output()?;
    assert!(gone.status.success(), "{}", show(&gone));
    let deadline = Instant::now() + Duration::from_secs(60);
    let hung_up = loop {
        let found = cp.audit().into_iter().find(|r| {
            r["action"] == "vm.stop" && r["operator"] == "otto" && r["result"] != "refused"
        });
        if let Some(r) = found {
            break r;
        }
        if Instant::now() > deadline {
            bail!("a hung-up stop left no record:\n{}", cp.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        matches!(hung_up["result"].as_str(), Some("aborted" | "ok")),
        "{hung_up}"
    );
    clawos_e2e::measured(&format!(
        "control-plane: a stop whose client hung up 0.3 s in was recorded as {} (status {})",
        hung_up["result"], hung_up["status"]
    ));
    let stopped = cp.call(Some(&operator), "POST", "/api/v1/vms/cp-agent/stop", None);
    assert_eq!(stopped.status, 200, "{}", stopped.body);
    assert_eq!(stopped.json()["state"], "stopped");
    let listed = cp.call(Some(&viewer), "GET", "/api/v1/vms", None).json();
    assert_eq!(listed[0]["state"], "stopped");
    let deleted = cp.call(Some(&operator), "DELETE", "/api/v1/vms/cp-agent", None);
    assert_eq!(deleted.status, 204, "{}", deleted.body);

    let actions: Vec<(String, String)> = cp
        .audit()
        .iter()
        .filter(|r| r["target"] == "cp-agent" && r["action"] != "vm.get")
        .map(|r| {
            let result = r["result"].as_str().unwrap_or("");
            // The hung-up stop is `aborted` or `ok` depending on how far it got.
            let result = if r["request_id"] == hung_up["request_id"] {
                "hung up"
            } else {
                result
            };
            (
                r["action"].as_str().unwrap_or("").to_owned(),
                result.to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("vm.start", "ok"),
        ("vm.console", "ok"),
        ("vm.stop", "refused"),
        ("vm.stop", "hung up"),
        ("vm.stop", "ok"),
        ("vm.delete", "ok"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
    .collect();
    assert_eq!(actions, want);

    // The launcher gone: the control plane says so (503), and still authenticates.
    launcher.kill9();
    let down = cp.call(Some(&viewer), "GET", "/api/v1/vms", None);
    assert_eq!(down.status, 503, "{}", down.body);
    assert!(down.body.contains("cannot be reached"), "{}", down.body);
    assert_eq!(cp.call(None, "GET", "/api/v1/vms", None).status, 401);
    Ok(())
}

#[test]
fn certificate_files_are_reloaded_while_a_client_holds_its_connection() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(state.join("launcher"))?;
    std::fs::create_dir_all(&pki)?;
    // No launcher needed for this: a credential file for one that is not there.
    std::fs::write(state.join("launcher/admin.token"), "unused\n")?;
    let (cert, key) = (pki.join("served.crt"), pki.join("served.key"));
    openssl_cert(&pki, "ca", &cert, &key, 1001)?;
    let cp = ControlPlane::start(
        &state,
        "http://127.0.0.1:9",
        &[
            "--tls",
            "files",
            "--tls-cert",
            cert.to_str().context("utf8")?,
            "--tls-key",
            key.to_str().context("utf8")?,
            "--tls-reload-secs",
            "1",
        ],
    )?;
    let ca = pki.join("ca.crt");
    // 1001 = 0x3E9, 1002 = 0x3EA.
    assert_eq!(serial_served(cp.port, &ca, "127.0.0.1")?, "03E9");
    let mut held = HeldConnection::open(cp.port, &ca, "127.0.0.1")?;
    assert_eq!(held.ask()?, "200 03E9");

    openssl_cert(&pki, "ca", &cert, &key, 1002)?;
    wait_for_serial(
        cp.port,
        &ca,
        "127.0.0.1",
        Duration::from_secs(30),
        |s| s == "03EA",
        || cp.log(),
    )?;
    assert_eq!(
        held.ask()?,
        "200 03E9",
        "the held connection keeps working, on its own certificate"
    );

    // A renewal that writes a broken key: logged, and the last good certificate serves.
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n",
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cp.log().contains("do not load") {
        if Instant::now() > deadline {
            bail!("the failed reload was not logged: {}", cp.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(serial_served(cp.port, &ca, "127.0.0.1")?, "03EA");
    assert_eq!(held.ask()?, "200 03E9");
    Ok(())
}

/// The web console in Debian's Chromium, driven through the DevTools protocol by
/// `playwright-core` (tests/e2e/console/console_check.mjs): log in with an operator
/// token, see the running VM and its console, a cross-site form post that tries to
/// stop it is refused, stop it from the page, log out. Screenshots are kept in
/// `target/e2e/console-shots/`.
#[test]
fn the_web_console_in_chromium() -> Result<()> {
    if !can_boot_vms("the_web_console_in_chromium") {
        return Ok(());
    }
    let script_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/console");
    assert!(
        script_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci` in {} (scripts/test.sh does)",
        script_dir.display()
    );
    let chromium = std::env::var("CLAWOS_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).is_file(),
        "{chromium} is missing: scripts/setup.sh installs Debian's chromium"
    );
    let dir = tempfile::tempdir()?;
    let state = dir.path();
    let launcher = Launcher::start(state)?;
    let cp = ControlPlane::start(state, &launcher.url, &[])?;
    let admin = cp.admin_token();
    let (operator, _) = token(&cp, &admin, "olga", "operator");
    let token_file = state.join("olga.token");
    std::fs::write(&token_file, &operator)?;
    let started = cp.call(
        Some(&operator),
        "POST",
        "/api/v1/vms",
        Some(&json!({"name": "web-agent", "mem_mib": 256})),
    );
    assert_eq!(started.status, 202, "{}", started.body);
    launcher.wait_for(
        "web-agent",
        Duration::from_secs(180),
        clawos_e2e::is(clawos_vm_launcher_api::VmState::Running),
    )?;

    let shots = clawos_e2e::target_profile_dir().join("../e2e/console-shots");
    std::fs::create_dir_all(&shots)?;
    let out = Command::new("node")
        .arg(script_dir.join("console_check.mjs"))
        .args(["--url", &cp.url, "--vm", "web-agent"])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--shots")
        .arg(&shots)
        .arg("--ca")
        .arg(cp.ca())
        .env("CLAWOS_CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .output()?;
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "the console check failed: {}\ncontrol-plane log:\n{}",
        show(&out),
        cp.log()
    );

    // What the browser did is in the audit trail: a session login, the page's stop
    // (through the session, with its CSRF token), and the cross-site post refused.
    let audit = cp.audit();
    let by_olga: Vec<(&str, &str, &str)> = audit
        .iter()
        .filter(|r| {
            r["operator"] == "olga"
                && r["action"] != "vm.list"
                && r["action"] != "vm.get"
                && r["action"] != "vm.console"
        })
        .filter_map(|r| {
            Some((
                r["action"].as_str()?,
                r["via"].as_str()?,
                r["result"].as_str()?,
            ))
        })
        .collect();
    assert!(
        by_olga.contains(&("session.create", "token", "ok")),
        "{by_olga:?}"
    );
    assert!(
        by_olga.contains(&("vm.stop", "session", "ok")),
        "{by_olga:?}"
    );
    let cross_site: Vec<&Value> = audit
        .iter()
        .filter(|r| r["action"] == "vm.stop" && r["result"] != "ok")
        .collect();
    assert!(
        !cross_site.is_empty(),
        "the cross-site post left no refused record"
    );
    let vm = cp
        .call(Some(&operator), "GET", "/api/v1/vms/web-agent", None)
        .json();
    assert_eq!(vm["state"], "stopped");
    Ok(())
}

/// The `clawos` CLI against a remote host: the local admin creates an operator token
/// (`clawos operator token create`, locally), `clawos login --server … --ca …` keeps it
/// (0600), and `vm start`, `vm list`, `vm exec` (a WebSocket relayed by the control
/// plane), `vm logs` and `vm stop` run through the control plane; a wrong pinned
/// fingerprint is refused, the right one works, and a viewer's stop exits 9.
#[test]
fn the_cli_drives_a_remote_host_through_the_control_plane() -> Result<()> {
    if !can_boot_vms("the_cli_drives_a_remote_host_through_the_control_plane") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("host");
    let home = dir.path().join("operator-home");
    std::fs::create_dir_all(&home)?;
    let launcher = Launcher::start(&state)?;
    let cp = ControlPlane::start(&state, &launcher.url, &[])?;
    // On the host, as its admin: make tokens.
    let host_cli = |args: &[&str]| {
        Command::new(clawos_e2e::bin("clawos"))
            .args(args)
            .env("CLAWOS_STATE_DIR", &state)
            .env("CLAWOS_CONTROL_PLANE_URL", &cp.url)
            .env_remove("CLAWOS_SERVER")
            .stdin(Stdio::null())
            .output()
            .expect("clawos")
    };
    let made = host_cli(&[
        "operator",
        "token",
        "create",
        "--name",
        "remote-ops",
        "--role",
        "operator",
        "--ttl",
        "1h",
    ]);
    assert!(made.status.success(), "{}", show(&made));
    let op_token = String::from_utf8_lossy(&made.stdout).trim().to_owned();
    let made = host_cli(&[
        "operator",
        "token",
        "create",
        "--name",
        "remote-view",
        "--role",
        "viewer",
        "--ttl",
        "1h",
    ]);
    assert!(made.status.success(), "{}", show(&made));
    let viewer_token = String::from_utf8_lossy(&made.stdout).trim().to_owned();
    let listed = host_cli(&["operator", "token", "list"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("remote-ops"),
        "{}",
        show(&listed)
    );

    // Elsewhere (another HOME, no state dir): log in, then drive the host.
    let ca = cp.ca();
    let remote = |args: &[&str], stdin: Option<&str>| {
        let mut cmd = Command::new(clawos_e2e::bin("clawos"));
        cmd.arg("--server")
            .arg(&cp.url)
            .args(args)
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .env("CLAWOS_STATE_DIR", dir.path().join("nothing-here"))
            .env_remove("CLAWOS_OPERATOR_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("clawos");
        if let Some(input) = stdin {
            let _ = child
                .stdin
                .take()
                .map(|mut s| std::io::Write::write_all(&mut s, input.as_bytes()));
        } else {
            drop(child.stdin.take());
        }
        child.wait_with_output().expect("clawos")
    };
    let wrong_fp = remote(
        &["--fingerprint", &"AB".repeat(32), "login"],
        Some(&format!("{op_token}\n")),
    );
    assert!(
        !wrong_fp.status.success(),
        "a wrong pinned fingerprint was accepted"
    );
    assert!(
        show(&wrong_fp).contains("fingerprint"),
        "{}",
        show(&wrong_fp)
    );
    let fp = cp
        .log()
        .lines()
        .find_map(|l| {
            l.split("fingerprint ")
                .nth(1)?
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .context("fingerprint logged")?;
    let pinned = remote(&["--fingerprint", &fp, "operator", "whoami"], None);
    assert_eq!(
        pinned.status.code(),
        Some(9),
        "not logged in yet: {}",
        show(&pinned)
    );
    let login = remote(
        &["--ca", ca.to_str().context("utf8")?, "login"],
        Some(&format!("{op_token}\n")),
    );
    assert!(login.status.success(), "{}", show(&login));
    assert!(
        String::from_utf8_lossy(&login.stdout).contains("as remote-ops (operator)"),
        "{}",
        show(&login)
    );
    let creds = home.join(".config/clawos/credentials.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&creds)?.permissions());
    assert_eq!(mode & 0o777, 0o600);
    let whoami = remote(&["--fingerprint", &fp, "operator", "whoami"], None);
    assert!(
        whoami.status.success(),
        "the right pinned fingerprint: {}",
        show(&whoami)
    );

    let t = Instant::now();
    let started = remote(&["vm", "start", "far-agent", "--mem", "256"], None);
    assert!(started.status.success(), "{}", show(&started));
    clawos_e2e::measured(&format!(
        "control-plane: `clawos --server … vm start` (remote, waits for ready) {:?}",
        t.elapsed()
    ));
    let listed = remote(&["--json", "vm", "list"], None);
    assert!(listed.status.success(), "{}", show(&listed));
    let vms: Value = serde_json::from_slice(&listed.stdout)?;
    assert_eq!(vms[0]["name"], "far-agent");
    assert_eq!(vms[0]["state"], "running");
    let exec = remote(
        &[
            "vm",
            "exec",
            "far-agent",
            "--",
            "sh",
            "-c",
            "echo remote-exec-$((6*7)); exit 3",
        ],
        None,
    );
    assert_eq!(
        exec.status.code(),
        Some(3),
        "the command's own exit code: {}",
        show(&exec)
    );
    assert!(
        String::from_utf8_lossy(&exec.stdout).contains("remote-exec-42"),
        "{}",
        show(&exec)
    );
    let logs = remote(&["vm", "logs", "far-agent"], None);
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("CLAWOS_READY"),
        "{}",
        show(&logs)
    );

    // Files both ways, larger than any JSON body the control plane takes (1 MiB): the
    // copy streams through it.
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let local = dir.path().join("big.bin");
    std::fs::write(&local, &big)?;
    let t = Instant::now();
    let put = remote(
        &[
            "vm",
            "cp",
            local.to_str().context("utf8")?,
            "far-agent:/workspace/big.bin",
        ],
        None,
    );
    assert!(put.status.success(), "{}", show(&put));
    let back = dir.path().join("back.bin");
    let get = remote(
        &[
            "vm",
            "cp",
            "far-agent:/workspace/big.bin",
            back.to_str().context("utf8")?,
        ],
        None,
    );
    assert!(get.status.success(), "{}", show(&get));
    clawos_e2e::measured(&format!(
        "control-plane: 3 MB copied into a VM and back through the control plane in {:?}",
        t.elapsed()
    ));
    assert!(std::fs::read(&back)? == big, "the copy came back changed");
    let files = remote(&["--json", "vm", "files", "far-agent"], None);
    assert!(
        String::from_utf8_lossy(&files.stdout).contains("big.bin"),
        "{}",
        show(&files)
    );
    let escape = remote(
        &[
            "vm",
            "cp",
            local.to_str().context("utf8")?,
            "far-agent:/etc/evil",
        ],
        None,
    );
    assert!(
        !escape.status.success() && show(&escape).contains("workspace"),
        "a path out of /workspace: {}",
        show(&escape)
    );
    // Registered images, verified by the launcher, seen from here.
    let images = remote(&["--json", "image", "list"], None);
    assert!(images.status.success(), "{}", show(&images));
    let images: Value = serde_json::from_slice(&images.stdout)?;
    let default = images
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == "default"))
        .context("the default image is listed")?;
    assert!(
        default["verified"]["root_hash"]
            .as_str()
            .is_some_and(|h| h.len() == 64),
        "{default}"
    );
    let verified = remote(&["image", "verify", "--name", "default"], None);
    assert!(verified.status.success(), "{}", show(&verified));
    let missing = remote(&["image", "verify", "--name", "no-such-image"], None);
    assert_eq!(missing.status.code(), Some(3), "{}", show(&missing));
    let add = remote(
        &["image", "add", "x", dir.path().to_str().context("utf8")?],
        None,
    );
    assert_eq!(add.status.code(), Some(2), "{}", show(&add));
    assert!(show(&add).contains("run it on the host"), "{}", show(&add));

    // A long exec through the control plane ends soon after its operator's token is
    // revoked (streams re-check their operator every 5 s).
    let mut long = Command::new(clawos_e2e::bin("clawos"))
        .args([
            "--server",
            &cp.url,
            "vm",
            "exec",
            "far-agent",
            "--",
            "sleep",
            "300",
        ])
        .env("HOME", &home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("CLAWOS_OPERATOR_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(3));
    assert!(long.try_wait()?.is_none(), "the exec is running");
    let ops_id = cp
        .audit()
        .iter()
        .find(|r| r["action"] == "operator.token.create" && r["result"] == "ok")
        .and_then(|r| r["target"].as_str().map(str::to_owned))
        .context("the token's id is in the audit trail")?;
    let revoked = host_cli(&["operator", "token", "revoke", &ops_id]);
    assert!(revoked.status.success(), "{}", show(&revoked));
    let t = Instant::now();
    let ended = loop {
        if let Some(status) = long.try_wait()? {
            break status;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = long.kill();
            bail!("the exec outlived its revoked token by 30 s:\n{}", cp.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    clawos_e2e::measured(&format!(
        "control-plane: an exec stream ended {:?} after its token was revoked ({ended})",
        t.elapsed()
    ));

    // The viewer may look but not stop.
    std::fs::remove_file(&creds)?;
    let login = remote(
        &["--ca", ca.to_str().context("utf8")?, "login"],
        Some(&format!("{viewer_token}\n")),
    );
    assert!(login.status.success(), "{}", show(&login));
    let denied = remote(&["vm", "stop", "far-agent"], None);
    assert_eq!(denied.status.code(), Some(9), "{}", show(&denied));
    assert!(
        show(&denied).contains("needs the operator role"),
        "{}",
        show(&denied)
    );
    let denied_exec = remote(&["vm", "exec", "far-agent", "--", "true"], None);
    assert_ne!(
        denied_exec.status.code(),
        Some(0),
        "a viewer's exec: {}",
        show(&denied_exec)
    );
    // A browser login against a control plane without an OpenID provider fails at
    // once, saying why (not after waiting for a browser).
    let no_idp = remote(
        &[
            "--ca",
            ca.to_str().context("utf8")?,
            "login",
            "--browser",
            "--no-open",
        ],
        None,
    );
    assert_eq!(no_idp.status.code(), Some(3), "{}", show(&no_idp));
    assert!(
        show(&no_idp).contains("OIDC login is not configured"),
        "{}",
        show(&no_idp)
    );
    assert!(
        !show(&no_idp).contains("Log in to"),
        "it asked for a browser: {}",
        show(&no_idp)
    );
    let logout = remote(&["logout"], None);
    assert!(logout.status.success(), "{}", show(&logout));
    let after = remote(&["vm", "list"], None);
    assert_eq!(after.status.code(), Some(9), "logged out: {}", show(&after));

    let stopped = host_cli(&["operator", "whoami"]);
    assert!(stopped.status.success(), "{}", show(&stopped));
    let vm = cp.call(
        Some(&cp.admin_token()),
        "POST",
        "/api/v1/vms/far-agent/stop",
        None,
    );
    assert_eq!(vm.status, 200, "{}", vm.body);
    let audit = cp.audit();
    assert!(
        audit.iter().any(|r| r["action"] == "vm.exec"
            && r["operator"] == "remote-ops"
            && r["result"] == "ok"),
        "exec audited"
    );
    assert!(
        audit.iter().any(|r| r["action"] == "vm.exec"
            && r["operator"] == "remote-view"
            && r["result"] == "refused"),
        "the viewer's exec audited as refused"
    );
    Ok(())
}

/// The other daemons behind the control plane — identity-manager (agent tokens),
/// inference-proxy (usage), the orchestrator (workflows) — each driven from another
/// machine's point of view with the CLI's own commands through `--server`.
#[test]
fn the_cli_reaches_every_daemon_through_the_control_plane() -> Result<()> {
    let script: Value = serde_json::from_slice(&std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/workflows/scripted-model.json"),
    )?)?;
    let s = clawos_e2e::stack::WorkflowStack::start(&script)?;
    let state = s.host.state.clone();
    let orchestrator_url = format!("http://127.0.0.1:{}", s.orchestrator.port);
    let cp = ControlPlane::start(
        &state,
        &s.launcher.url,
        &[
            "--identity-url",
            &s.host.identity_url,
            "--proxy-url",
            &s.host.proxy_url,
            "--orchestrator-url",
            &orchestrator_url,
            // No monitor-daemon on this host: its routes must say so.
            "--monitor-url",
            "http://127.0.0.1:9",
        ],
    )?;
    let admin = cp.admin_token();
    let (admin_token, _) = token(&cp, &admin, "far-admin", "admin");
    let (operator_token, _) = token(&cp, &admin, "far-ops", "operator");
    let home = s.dir().join("operator-home");
    std::fs::create_dir_all(&home)?;
    let ca = cp.ca();
    let remote = |args: &[&str], token: &str| {
        Command::new(clawos_e2e::bin("clawos"))
            .arg("--server")
            .arg(&cp.url)
            .arg("--ca")
            .arg(&ca)
            .args(args)
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .env("CLAWOS_OPERATOR_TOKEN", token)
            .env("CLAWOS_STATE_DIR", s.dir().join("nothing-here"))
            .stdin(Stdio::null())
            .output()
            .expect("clawos")
    };

    // Agent tokens: issued, checked, revoked — identity-manager's own answers.
    let issued = remote(
        &[
            "--json",
            "token",
            "issue",
            "--agent",
            "far-agent",
            "--vm",
            "far-agent-1",
            "--ttl",
            "600",
        ],
        &admin_token,
    );
    assert!(issued.status.success(), "{}", show(&issued));
    let issued: Value = serde_json::from_slice(&issued.stdout)?;
    let jwt = issued["token"].as_str().context("a JWT")?.to_owned();
    assert_eq!(jwt.split('.').count(), 3, "{issued}");
    let checked = remote(&["token", "verify", &jwt], &operator_token);
    assert!(checked.status.success(), "{}", show(&checked));
    let claims: Value = serde_json::from_slice(&checked.stdout)?;
    assert_eq!(
        (claims["active"].as_bool(), claims["agent"].as_str()),
        (Some(true), Some("far-agent")),
        "{claims}"
    );
    let not_admin = remote(
        &[
            "token",
            "issue",
            "--agent",
            "far-agent",
            "--vm",
            "far-agent-1",
        ],
        &operator_token,
    );
    assert_eq!(not_admin.status.code(), Some(9), "{}", show(&not_admin));
    assert!(
        show(&not_admin).contains("needs the admin role"),
        "{}",
        show(&not_admin)
    );
    let revoked = remote(&["token", "revoke", "--agent", "far-agent"], &admin_token);
    assert!(revoked.status.success(), "{}", show(&revoked));
    let after = remote(&["token", "verify", &jwt], &operator_token);
    assert_eq!(after.status.code(), Some(1), "revoked: {}", show(&after));
    assert!(show(&after).contains("not active"), "{}", show(&after));

    // Signing keys rotated from afar (admin only); the token issued before still
    // verifies (its key is retired, not gone).
    let rotated = remote(&["identity", "rotate-keys"], &admin_token);
    assert!(rotated.status.success(), "{}", show(&rotated));
    assert!(
        String::from_utf8_lossy(&rotated.stdout).contains("active signing key:"),
        "{}",
        show(&rotated)
    );
    let not_admin = remote(&["identity", "rotate-keys"], &operator_token);
    assert_eq!(not_admin.status.code(), Some(9), "{}", show(&not_admin));
    let master = remote(&["identity", "rotate-master-key"], &admin_token);
    assert_eq!(master.status.code(), Some(2), "{}", show(&master));

    // Usage: the proxy's ledger (empty on this new host, but the proxy's answer).
    let usage = remote(&["--json", "usage"], &operator_token);
    assert!(usage.status.success(), "{}", show(&usage));
    let usage: Value = serde_json::from_slice(&usage.stdout)?;
    assert!(usage["usage"].is_array(), "{usage}");

    // Workflows: a run that only waits for a person, rejected from here.
    let spec = s.dir().join("gate.yaml");
    std::fs::write(
        &spec,
        "apiVersion: clawos.dev/v1\nkind: Workflow\nmetadata:\n  name: remote-gate\nsteps:\n  - id: gate\n    kind: approval\n    timeout: 1h\n    default: reject\n",
    )?;
    let submitted = remote(
        &["workflow", "run", spec.to_str().context("utf8")?],
        &operator_token,
    );
    assert!(submitted.status.success(), "{}", show(&submitted));
    let run = String::from_utf8_lossy(&submitted.stdout).trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = remote(&["--json", "workflow", "status", &run], &operator_token);
        assert!(status.status.success(), "{}", show(&status));
        let v: Value = serde_json::from_slice(&status.stdout)?;
        if v["steps"][0]["state"] == "waiting" {
            break;
        }
        if Instant::now() > deadline {
            bail!("the approval never waited: {v}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let rejected = remote(
        &[
            "workflow",
            "approve",
            &run,
            "gate",
            "--reject",
            "--reason",
            "from afar",
        ],
        &operator_token,
    );
    assert!(rejected.status.success(), "{}", show(&rejected));
    let logs = remote(&["workflow", "logs", &run], &operator_token);
    assert!(logs.status.success(), "{}", show(&logs));
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("approval_decided"),
        "{}",
        show(&logs)
    );
    let listed = remote(&["--json", "workflow", "list"], &operator_token);
    let runs: Value = serde_json::from_slice(&listed.stdout)?;
    assert_eq!(runs[0]["id"], run.as_str(), "{runs}");
    assert_eq!(runs[0]["state"], "rejected", "{runs}");

    // A daemon that is not there is named, with the exit code for "cannot be reached".
    let audit = remote(&["audit", "tail"], &operator_token);
    assert_eq!(audit.status.code(), Some(7), "{}", show(&audit));
    assert!(show(&audit).contains("monitor-daemon"), "{}", show(&audit));

    // Each of those requests has its record, under the operator who made it.
    let trail = cp.audit();
    for (action, operator, result) in [
        ("agent.token.issue", "far-admin", "ok"),
        ("agent.token.issue", "far-ops", "refused"),
        ("agent.token.introspect", "far-ops", "ok"),
        ("agent.token.revoke", "far-admin", "ok"),
        ("agent.keys.rotate", "far-admin", "ok"),
        ("agent.keys.rotate", "far-ops", "refused"),
        ("usage.get", "far-ops", "ok"),
        ("workflow.submit", "far-ops", "ok"),
        ("workflow.approve", "far-ops", "ok"),
        ("workflow.events", "far-ops", "ok"),
    ] {
        assert!(
            trail.iter().any(|r| r["action"] == action
                && r["operator"] == operator
                && r["result"] == result),
            "no {action} by {operator} ({result}) in the trail"
        );
    }
    // The agent token issued through the control plane is an answer, never a record.
    let raw = std::fs::read_to_string(state.join("control-plane/audit.jsonl"))?;
    assert!(!raw.contains(&jwt), "the audit trail holds the agent token");
    Ok(())
}
