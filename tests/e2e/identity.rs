//! identity-manager end to end: the real binary on loopback, PyJWT as the independent
//! verifier (fetching the JWKS over HTTP), restarts with the same and another master key.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn python_has_pyjwt() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import jwt, cryptography"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        clawos_e2e::skip(
            "identity",
            "python3 with pyjwt and cryptography is missing (scripts/setup.sh installs them)",
        );
    }
    ok
}

struct Service {
    child: Child,
    url: String,
    state: PathBuf,
    log: PathBuf,
}

impl Service {
    fn start(state: &Path, port: u16, extra: &[&str]) -> Result<Self, String> {
        let log = state.join(format!(
            "identity-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(state).map_err(|e| e.to_string())?;
        let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut child = Command::new(clawos_e2e::bin("identity-manager"))
            .args(["--addr", &format!("127.0.0.1:{port}"), "--state-dir"])
            .arg(state)
            .args(extra)
            .env_remove("CLAWOS_MASTER_KEY")
            .stdout(logf.try_clone().map_err(|e| e.to_string())?)
            .stderr(logf)
            .spawn()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Self {
                    child,
                    url: format!("http://127.0.0.1:{port}"),
                    state: state.to_owned(),
                    log,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "exited {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("did not listen".into())
    }

    /// Graceful stop (SIGINT), so SQLite checkpoints its WAL.
    fn stop(mut self) -> String {
        // SAFETY: kill with plain integers on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn service_token(&self) -> String {
        std::fs::read_to_string(self.state.join("identity/service.token"))
            .expect("service token")
            .trim()
            .to_owned()
    }
}

fn py(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/pyjwt_check.py");
    let o = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        o.status.success(),
        "pyjwt_check {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn pyjwt_verify(s: &Service, aud: &str, token: &str) -> Value {
    let out = py(&[
        "verify",
        &format!("{}/.well-known/jwks.json", s.url),
        &s.url,
        aud,
        token,
    ]);
    serde_json::from_str(&out).expect("json")
}

fn sha256_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("identity.db") && !n.ends_with("-shm")
        })
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn tokens_verify_with_pyjwt_and_the_store_survives_restarts() {
    if !python_has_pyjwt() {
        return;
    }
    let rt = clawos_e2e::runtime();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");
    let port = clawos_e2e::port();
    let s = Service::start(&state, port, &[]).expect("start");
    let svc = s.service_token();
    let call =
        |method: &str, path: &str, auth: Option<&str>, body: Option<Value>| -> (u16, Value) {
            rt.block_on(async {
                let mut r = http.request(
                    method.parse().expect("method"),
                    format!("http://127.0.0.1:{port}{path}"),
                );
                if let Some(a) = auth {
                    r = r.bearer_auth(a);
                }
                if let Some(b) = body {
                    r = r.json(&b);
                }
                let resp = r.send().await.expect("send");
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                (status, serde_json::from_str(&text).unwrap_or(Value::Null))
            })
        };
    let issue = |agent: &str, ttl: u64| {
        let (st, v) = call(
            "POST",
            "/v1/tokens",
            Some(&svc),
            Some(json!({
                "agent": agent, "vm_id": format!("vm-{agent}"), "image_root_hash": "ab".repeat(32),
                "audience": "inference-proxy", "ttl_secs": ttl, "scopes": ["llm:invoke"],
            })),
        );
        assert_eq!(st, 201, "{v}");
        v
    };

    // PyJWT accepts an issued token, fetching the JWKS over HTTP.
    let t1 = issue("agent-1", 900);
    let token = t1["token"].as_str().expect("token").to_owned();
    let ok = pyjwt_verify(&s, "inference-proxy", &token);
    assert_eq!(ok["ok"], true, "{ok}");
    assert_eq!(ok["claims"]["sub"], "spiffe://clawos.local/agent/agent-1");
    assert_eq!(ok["claims"]["vm_id"], "vm-agent-1");

    // ... and rejects a wrong audience, a tampered payload, an alg swap, an expired token.
    let bad = pyjwt_verify(&s, "control-plane", &token);
    assert_eq!(bad["ok"], false);
    assert!(
        bad["error"].as_str().unwrap_or("").contains("Audience"),
        "{bad}"
    );
    let tampered = py(&["tamper", &token]);
    assert_eq!(pyjwt_verify(&s, "inference-proxy", &tampered)["ok"], false);
    let forged = py(&[
        "forge-hs256",
        &format!("{}/.well-known/jwks.json", s.url),
        &token,
    ]);
    let swapped = pyjwt_verify(&s, "inference-proxy", &forged);
    assert_eq!(swapped["ok"], false, "{swapped}");
    let short = issue("agent-1", 1);
    std::thread::sleep(Duration::from_millis(2100));
    let expired = pyjwt_verify(&s, "inference-proxy", short["token"].as_str().expect("t"));
    assert!(
        expired["error"].as_str().unwrap_or("").contains("xpired"),
        "{expired}"
    );
    // The service's own introspection agrees on the forged and tampered ones.
    for t in [&forged, &tampered] {
        let (st, v) = call(
            "POST",
            "/v1/introspect",
            Some(&svc),
            Some(json!({ "token": t })),
        );
        assert_eq!((st, v["active"].clone()), (200, json!(false)));
    }

    // Introspection (RFC 7662, form-encoded) reports a revoked token inactive.
    let introspect_form = |t: &str| -> Value {
        rt.block_on(async {
            http.post(format!("{}/v1/introspect", s.url))
                .bearer_auth(&svc)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("token={t}"))
                .send()
                .await
                .expect("send")
                .json()
                .await
                .expect("json")
        })
    };
    assert_eq!(introspect_form(&token)["active"], true);
    let (st, _) = call(
        "POST",
        "/v1/revoke",
        Some(&svc),
        Some(json!({ "jti": t1["jti"] })),
    );
    assert_eq!(st, 204);
    assert_eq!(introspect_form(&token), json!({ "active": false }));
    let (_, feed) = call("GET", "/v1/revocations", None, None);
    assert!(
        feed["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .any(|t| t["jti"] == t1["jti"]),
        "{feed}"
    );

    // Rotation: tokens signed before still verify; new ones carry the new kid.
    let t2 = issue("agent-2", 900);
    let (st, rot) = call("POST", "/v1/keys/rotate", Some(&svc), None);
    assert_eq!(st, 200, "{rot}");
    assert_ne!(rot["active_kid"], t2["kid"]);
    assert_eq!(
        pyjwt_verify(&s, "inference-proxy", t2["token"].as_str().expect("t"))["ok"],
        true
    );
    let t3 = issue("agent-2", 900);
    assert_eq!(t3["kid"], rot["active_kid"]);

    // Renewal by the agent with its current token.
    let (st, renewed) = call("POST", "/v1/tokens/renew", t3["token"].as_str(), None);
    assert_eq!(st, 200, "{renewed}");
    assert_ne!(renewed["jti"], t3["jti"]);

    // 4xx with a message.
    let long = "a".repeat(80);
    for (method, path, auth, body, want) in [
        (
            "POST",
            "/v1/tokens",
            Some(svc.as_str()),
            Some(json!({"agent": long, "vm_id": "v", "audience": "a"})),
            400,
        ),
        (
            "POST",
            "/v1/tokens",
            Some(svc.as_str()),
            Some(json!({"agent": "a", "vm_id": "v", "audience": "a", "ttl_secs": 7200})),
            400,
        ),
        (
            "POST",
            "/v1/tokens",
            None,
            Some(json!({"agent": "a", "vm_id": "v", "audience": "a"})),
            401,
        ),
        (
            "POST",
            "/v1/tokens",
            Some("wrong"),
            Some(json!({"agent": "a", "vm_id": "v", "audience": "a"})),
            401,
        ),
        (
            "GET",
            "/v1/agents/nobody/key",
            Some(svc.as_str()),
            None,
            404,
        ),
        ("POST", "/v1/tokens/renew", Some(token.as_str()), None, 401),
    ] {
        let (st, v) = call(method, path, auth, body);
        assert_eq!(st, want, "{method} {path}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{method} {path}: {v}"
        );
    }
    let (st, v) = rt.block_on(async {
        let r = http
            .post(format!("{}/v1/tokens", s.url))
            .bearer_auth(&svc)
            .header("content-type", "application/json")
            .body("{oops")
            .send()
            .await
            .expect("send");
        (
            r.status().as_u16(),
            r.json::<Value>().await.unwrap_or(Value::Null),
        )
    });
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("request body"),
        "{v}"
    );

    // Operators see what happened in /metrics.
    let metrics = rt.block_on(async {
        http.get(format!("{}/metrics", s.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    });
    for (name, want) in [
        ("clawos_identity_tokens_issued_total", 4),
        ("clawos_identity_tokens_renewed_total", 1),
        ("clawos_identity_revocations_total", 1),
        ("clawos_identity_service_auth_refused_total", 2),
    ] {
        let v: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"));
        assert_eq!(v, want, "{name}");
    }

    // Restart with the same master key: keys decrypt, old tokens verify.
    s.stop();
    let s = Service::start(&state, port, &[]).expect("restart");
    assert_eq!(
        pyjwt_verify(&s, "inference-proxy", t3["token"].as_str().expect("t"))["ok"],
        true
    );
    let log = s.stop();
    assert!(log.contains("every sealed key decrypts"), "{log}");
    assert!(log.contains("agent_keys=2"), "{log}");

    // Another master key: refuses to start, says why, changes nothing.
    let before = sha256_files(&state.join("identity"));
    let other = work.path().join("other.key");
    std::fs::write(&other, format!("{}\n", "7".repeat(64))).expect("write");
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let err = Service::start(
        &state,
        port,
        &["--master-key-path", other.to_str().expect("utf8")],
    )
    .err()
    .expect("must refuse");
    assert!(err.contains("does not open the key store"), "{err}");
    assert!(
        before == sha256_files(&state.join("identity")),
        "a refused start changed the store"
    );
    let names: Vec<String> = std::fs::read_dir(state.join("identity"))
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with("-wal") || n.ends_with("-shm")),
        "a refused start left {names:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: PathBuf| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(state.join("identity")), 0o700);
    assert_eq!(mode(state.join("identity/identity.db")), 0o600);
    assert_eq!(mode(state.join("identity/master.key")), 0o600);
}

/// Runs a command as `nobody` (uid and gid 65534, no supplementary groups).
fn as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(args)
        .output()
        .expect("setpriv")
}

/// A second local uid (`nobody`) cannot read the key store, the master key or the
/// service credential of a running identity-manager: the directory is 0700 and every
/// file in it 0600, and each layer refuses on its own.
#[test]
fn another_uid_cannot_read_the_key_store_or_the_credentials() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        clawos_e2e::skip(
            "identity: another uid cannot read the key store",
            "not root: cannot switch to the nobody uid (run as root)",
        );
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        clawos_e2e::skip(
            "identity: another uid cannot read the key store",
            "setpriv (util-linux) is missing",
        );
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    let work = tempfile::tempdir().expect("tmp");
    // Everything above the identity directory is open to other users, so what is
    // tested is the service's own modes.
    chmod(work.path(), 0o755);
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).expect("state");
    chmod(&state, 0o755);
    let public = work.path().join("public.txt");
    std::fs::write(&public, "anyone may read this\n").expect("write");
    chmod(&public, 0o644);
    // The control: nobody can read a world-readable file next to the state directory.
    let o = as_nobody(&["cat", public.to_str().expect("utf8")]);
    assert!(
        o.status.success(),
        "nobody cannot read a 0644 file: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let port = clawos_e2e::port();
    let s = Service::start(&state, port, &[]).expect("start");
    // Something worth stealing: an agent key pair and a signed token in the store.
    let rt = clawos_e2e::runtime();
    let issued = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/v1/tokens", s.url))
            .bearer_auth(s.service_token())
            .json(&json!({"agent": "a1", "vm_id": "vm", "audience": "inference-proxy"}))
            .send()
            .await
            .expect("send")
            .status()
    });
    assert_eq!(issued.as_u16(), 201);

    let dir = state.join("identity");
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    for name in ["identity.db", "master.key", "service.token"] {
        assert!(
            files.iter().any(|f| f.ends_with(name)),
            "{name} missing in {files:?}"
        );
    }
    for f in &files {
        assert_eq!(mode(f) & 0o077, 0, "{} is open to others", f.display());
    }
    let refused = |what: &str| {
        for f in &files {
            let o = as_nobody(&["cat", f.to_str().expect("utf8")]);
            assert!(
                !o.status.success() && o.stdout.is_empty(),
                "{what}: nobody read {}",
                f.display()
            );
            assert!(
                String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
                "{what}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    };
    // The directory: nobody can neither list it nor open anything in it.
    let o = as_nobody(&["ls", dir.to_str().expect("utf8")]);
    assert!(!o.status.success(), "nobody listed {}", dir.display());
    refused("0700 directory");
    // The files on their own: with the directory opened for traversal (as an operator's
    // careless chmod would), every file still refuses.
    chmod(&dir, 0o711);
    refused("0600 files");
    chmod(&dir, 0o700);
    s.stop();
}

/// Renewals chain only while the lineage is younger than `--max-lineage-secs`; past
/// it the agent's renewal is a 401 that says why, although its token is still valid.
#[test]
fn renewal_past_the_maximum_lineage_age_is_refused_with_a_reason() {
    let rt = clawos_e2e::runtime();
    let http = reqwest::Client::new();
    let work = tempfile::tempdir().expect("tmp");
    let state = work.path().join("state");
    let port = clawos_e2e::port();
    let s = Service::start(&state, port, &["--max-lineage-secs", "2"]).expect("start");
    let svc = s.service_token();
    let post = |path: &str, auth: &str, body: Option<Value>| -> (u16, Value) {
        rt.block_on(async {
            let mut r = http.post(format!("{}{path}", s.url)).bearer_auth(auth);
            if let Some(b) = body {
                r = r.json(&b);
            }
            let resp = r.send().await.expect("send");
            let status = resp.status().as_u16();
            (status, resp.json().await.unwrap_or(Value::Null))
        })
    };
    let (st, issued) = post(
        "/v1/tokens",
        &svc,
        Some(json!({"agent": "a1", "vm_id": "vm", "audience": "inference-proxy", "ttl_secs": 600})),
    );
    assert_eq!(st, 201, "{issued}");
    let first = issued["token"].as_str().expect("token").to_owned();
    let (st, renewed) = post("/v1/tokens/renew", &first, None);
    assert_eq!(st, 200, "{renewed}");
    let (_, intro) = post(
        "/v1/introspect",
        &svc,
        Some(json!({ "token": renewed["token"] })),
    );
    let (_, intro_first) = post("/v1/introspect", &svc, Some(json!({ "token": first })));
    assert_eq!(intro["auth_time"], intro_first["iat"], "{intro}");
    assert!(
        renewed["expires_at"].as_u64().expect("exp")
            <= intro_first["iat"].as_u64().expect("iat") + 2,
        "a renewed token outlives its lineage: {renewed}"
    );
    std::thread::sleep(Duration::from_millis(3100));
    let (_, still) = post("/v1/introspect", &svc, Some(json!({ "token": first })));
    assert_eq!(
        still["active"], true,
        "the first token itself is still valid"
    );
    let (st, refused) = post("/v1/tokens/renew", &first, None);
    assert_eq!(st, 401, "{refused}");
    let msg = refused["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("lineage") && msg.contains("maximum lineage age is 2s"),
        "{msg}"
    );
    s.stop();
}
